"""Slow clients against a real query server: N connections that trickle their headers, and a normal client.

    python benchmarks/bench_slow_clients.py [--connections 2000] [--seconds 30] [--no-reconnect]
                                            [--server-nofile 1024] [--checkout PATH] [--env NAME=VALUE ...]

Starts ``streamhash serve`` (``--checkout``: another checkout's code, e.g. the commit before the bounds) over a
small store root, opens ``--connections`` connections that each send a request line and then one header byte a
second, never ending the headers (slowloris), and reconnects any the server closes (unless
``--no-reconnect``), as an attacker would. Meanwhile a normal client sends one ``POST /search`` every 0.25 s.

Prints one JSON line: ``held_max`` and ``held_second_half_median`` (connections the server holds: its open
files, sampled every second, less those it had before the attack; the median over the second half of the run is
what it keeps holding), ``closed_by_server`` (times the attacker saw one cut off: 408, 503, a close or a reset),
``refused`` (connects that failed or waited over 5 s), and the normal client's ``search_ok`` / ``search_failed``
counts (failures by kind) and latency (p50, p99, max, ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from streamhash.kafka.broker import free_port  # noqa: E402
from streamhash.services.processes import spawn, stop, wait_http  # noqa: E402
from tests.services.test_query_server import close_all, make_root  # noqa: E402


class Attack:
    def __init__(self, port: int, until: float, reconnect: bool):
        self.port, self.until, self.reconnect = port, until, reconnect
        self.open = self.held_max = self.closed = self.refused = 0

    async def one(self) -> None:
        while time.monotonic() < self.until:
            try:
                # a server that no longer accepts leaves connects in the kernel's queue: bounded wait
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 5.0)
            except (OSError, asyncio.TimeoutError):
                self.refused += 1
                await asyncio.sleep(1.0)
                if not self.reconnect:
                    return
                continue
            self.open += 1
            self.held_max = max(self.held_max, self.open)
            cut = False
            try:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nX-Slow: ")
                while time.monotonic() < self.until:
                    writer.write(b"a")
                    await writer.drain()
                    try:
                        await asyncio.wait_for(reader.read(1024), 1.0)  # anything (408, 503, EOF) means it is cut
                        cut = True
                        break
                    except asyncio.TimeoutError:
                        pass
            except OSError:
                cut = True
            finally:
                self.open -= 1
                writer.close()
            if cut:
                self.closed += 1
                if not self.reconnect:
                    return
            else:
                return  # time is up, still held: counted in held_at_end by the caller before this returns


def normal_client(url: str, until: float) -> tuple[list[float], Counter]:
    """One search every 0.25 s, each on a new connection (a client arriving while the attack goes on)."""
    latencies, failed = [], Counter()
    body = {"code_hex": "00000000", "k": 10}
    # one client (httpx.post alone builds one, TLS context included, every call: tens of ms of its own), no
    # connection kept: each search connects anew, as a newly arriving client does
    client = httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0))
    while time.monotonic() < until:
        t0 = time.perf_counter()
        try:
            r = client.post(url + "/search", json=body)
            if r.status_code == 200:
                latencies.append((time.perf_counter() - t0) * 1000)
            else:
                failed[f"HTTP {r.status_code}"] += 1
        except httpx.HTTPError as exc:
            failed[type(exc).__name__] += 1
        time.sleep(0.25)
    client.close()
    return latencies, failed


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sample_server(pid: int, until: float, out: list[int]) -> None:
    """The server's open files every second: its connections, plus what it held before the attack."""
    while time.monotonic() < until - 0.5:
        out.append(open_files(pid))
        time.sleep(1.0)


async def attack_for(port: int, connections: int, until: float, reconnect: bool) -> dict:
    attack = Attack(port, until, reconnect)
    tasks = []
    for i in range(connections):  # in bursts of 100, as fast as the loop goes
        tasks.append(asyncio.create_task(attack.one()))
        if i % 100 == 99:
            await asyncio.sleep(0.01)
    await asyncio.sleep(max(0.0, until - time.monotonic()))
    if tasks:
        _, late = await asyncio.wait(tasks, timeout=10)
        for task in late:
            task.cancel()
    return {"client_open_max": attack.held_max, "closed_by_server": attack.closed, "refused": attack.refused}


def attacker(port: int, connections: int, until: float, reconnect: bool, out) -> None:
    out.put(asyncio.run(attack_for(port, connections, until, reconnect)))


def measure(pid: int, port: int, connections: int, seconds: float, reconnect: bool) -> dict:
    """The attacker in a process of its own, so that the normal client's latency is the server's, not the
    attacker's event loop's."""
    baseline = open_files(pid)
    until = time.monotonic() + seconds  # CLOCK_MONOTONIC: the same clock in both processes
    files: list[int] = []
    sampler = threading.Thread(target=sample_server, args=(pid, until, files), daemon=True)
    sampler.start()
    out = multiprocessing.Queue()
    proc = multiprocessing.Process(target=attacker, args=(port, connections, until, reconnect, out))
    proc.start()
    time.sleep(min(3.0, seconds / 4))  # the attack under way first
    latencies, failed = normal_client(f"http://127.0.0.1:{port}", until)
    stats = out.get(timeout=seconds + 60)
    proc.join()
    sampler.join()
    held = [n - baseline for n in files]
    second_half = held[len(held) // 2:] or [0]  # what the server keeps holding once the attack is established
    stats.update(held_max=max(held, default=0), held_second_half_median=statistics.median(second_half))
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {"connections": connections, "seconds": seconds, "reconnect": reconnect, **stats,
            "search_ok": len(latencies), "search_failed": sum(failed.values()), "search_failures": dict(failed),
            "search_p50_ms": round(q[49], 2), "search_p99_ms": round(q[98], 2),
            "search_max_ms": round(max(latencies), 2) if latencies else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--no-reconnect", dest="reconnect", action="store_false")
    ap.add_argument("--checkout", type=Path, help="run this checkout's streamhash (default: this one)")
    ap.add_argument("--server-nofile", type=int, help="the soft open-file limit the server starts with (1024 is a "
                    "common default; the hard limit stays this machine's)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="for the server, e.g. "
                    "STREAMHASH_SERVER__HEADER_TIMEOUT_S=5")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        close_all(make_root(tmp / "root", n=1000)[0])
        port = free_port()
        env = dict(kv.split("=", 1) for kv in args.env)
        limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        if args.server_nofile:  # inherited by the server; this process (and the attacker it forks) keeps its own
            resource.setrlimit(resource.RLIMIT_NOFILE, (args.server_nofile, limits[1]))
        proc = spawn(["serve", "--store", str(tmp / "root"), "--port", str(port)], env=env, log_path=tmp / "serve.log",
                     cwd=args.checkout)
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", 120, proc, tmp / "serve.log")
            result = measure(proc.pid, port, args.connections, args.seconds, args.reconnect)
            result["server_alive"] = proc.poll() is None
            result["server_nofile"] = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)[0]
        finally:
            stop(proc)
    result["checkout"] = str(args.checkout or Path(__file__).resolve().parents[1])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
