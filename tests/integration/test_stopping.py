"""Stopping and the broker going away, on real processes: the learner stops within 10 s of a signal
whatever it is doing (a long round, a wait on a broker that is gone), and keeps learning across a broker
restart that resets its log; `streamhash broker` owns its Tansu and refuses a port already taken; the
demo's processes end with it, however it ends.

Each test here failed on a9a6b47: the learner finished the round it was in, then waited 120 s on the
stopped broker; after a log reset its next publication failed with UnknownProducerIdError and it exited;
a kill -9 of `streamhash broker` left Tansu on the port, and a second one reported "listening" on it;
the demo's children outlived a SIGHUP or a SIGKILL of the demo.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from streamhash.kafka.broker import EmbeddedBroker, free_port
from streamhash.kafka.modelbus import ModelReader
from streamhash.kafka.topics import ensure_topics
from streamhash.services.processes import scrape, spawn
from tests.services.test_learner import write_shard
from tests.support import env_for, have_fashion_mnist, produce, start_worker, stop, wait_for, wait_http

pytestmark = pytest.mark.integration


def learner_env(kafka, root, **learn) -> dict:
    env = env_for(kafka, root)
    env.update({"STREAMHASH_LEARN__METRICS_PORT": str(free_port()), "STREAMHASH_MODEL__BITS": "32",
                "STREAMHASH_KAFKA__TOPIC_PARTITIONS": "2", "STREAMHASH_LEARN__ROUND_EVERY": "100000",
                "STREAMHASH_LEARN__ROUND_MAX_AGE_S": "0", "STREAMHASH_LEARN__MI_BOOTSTRAP": "20"})
    env.update({f"STREAMHASH_LEARN__{k.upper()}": str(v) for k, v in learn.items()})
    return env


def start_learner(env: dict, log) -> object:
    proc = spawn(["learner"], env=env, log_path=log)
    wait_http(f"http://127.0.0.1:{env['STREAMHASH_LEARN__METRICS_PORT']}/metrics", 90, proc, log)
    wait_for(lambda: "following shard" in log.read_text(), 60, "the learner to read the shard")
    return proc


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stopped_within(proc, sig: int, seconds: float) -> tuple[int, float]:
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        rc = proc.wait(seconds + 20)  # past the bound: the assertion says by how much
    except Exception:
        proc.kill()
        rc = proc.wait()
    return rc, time.monotonic() - t0


def shard_versions(worker_url: str) -> list[float]:
    """The model version each of the worker's shards encodes with."""
    return [v for k, v in scrape(worker_url).items() if k.startswith("streamhash_shard_model_version{")]


def adopted(worker_url: str, version: int) -> bool:
    """Every shard the worker owns at ``version`` or later (False while it owns none: a rebalance)."""
    versions = shard_versions(worker_url)
    return bool(versions) and min(versions) >= version


def models_on(kafka) -> list:
    reader = ModelReader(kafka)
    try:
        return reader.read_to_end()
    finally:
        reader.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_learner_abandons_a_long_round_and_exits_0_within_10s(kafka_settings, tmp_path, sig):
    kafka = kafka_settings.model_copy(update={"topic_partitions": 2})
    ensure_topics(kafka)
    root = tmp_path / "index"
    write_shard(root, kafka.topic, 0, n=600)  # 400 labeled; 200 epochs of Omega: minutes of training
    env = learner_env(kafka, root, omega=400, epochs=200)
    log = tmp_path / "learner.log"
    proc = start_learner(env, log)
    try:
        cpu = cpu_seconds(proc.pid)
        proc.send_signal(signal.SIGUSR1)
        # its log says so; an older learner's does not, but it trains: 2 s of CPU in a process that idled
        wait_for(lambda: "learning round:" in log.read_text() or cpu_seconds(proc.pid) - cpu > 2, 60, "the round to start")
        time.sleep(1.0)  # well into it
        rc, took = stopped_within(proc, sig, 10)
    finally:
        stop(proc)
    text = log.read_text()
    print(f"signal {sig} mid-round: exit {rc} after {took:.1f}s")
    assert rc == 0 and took < 10, (rc, took, text[-2000:])
    assert "round abandoned" in text and "streamhash.worker" not in text, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    assert models_on(kafka) == []  # nothing of the abandoned round


def catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler for ``sig`` (SigCgt in /proc/PID/status)."""
    try:
        line = next(x for x in open(f"/proc/{pid}/status") if x.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)


def test_the_learner_exits_0_on_sigterm_while_it_is_still_importing(kafka_settings, tmp_path):
    """Not a kill by the default action (exit -15) while torch loads: it has nothing to clean up yet."""
    log = tmp_path / "learner.log"
    proc = spawn(["learner"], env=learner_env(kafka_settings, tmp_path / "index"), log_path=log)
    try:
        wait_for(lambda: proc.poll() is not None or catches(proc.pid, signal.SIGTERM), 30, "a SIGTERM handler",
                 interval=0.01)
        starting = "starting with settings" not in log.read_text()
        rc, took = stopped_within(proc, signal.SIGTERM, 10)
    finally:
        stop(proc)
    assert rc == 0 and took < 10, (rc, took, log.read_text()[-2000:])
    print(f"SIGTERM {'during the imports' if starting else 'after the start'}: exit {rc} in {took:.1f}s")


def test_the_learner_exits_0_within_10s_while_it_waits_on_a_stopped_broker(tmp_path):
    from streamhash.config import KafkaSettings

    broker = EmbeddedBroker(home=tmp_path / "broker").start()
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic="gone.images", topic_partitions=2)
    root = tmp_path / "index"
    proc = None
    try:
        ensure_topics(kafka)
        write_shard(root, kafka.topic, 0)
        env = learner_env(kafka, root, omega=64, epochs=1, publish_timeout_s=60)
        log = tmp_path / "learner.log"
        proc = start_learner(env, log)
        broker.stop()
        proc.send_signal(signal.SIGUSR1)  # a round, learned, then published to a broker that is gone
        wait_for(lambda: "round 1:" in log.read_text(), 60, "the round to end and its publication to begin")
        time.sleep(1.0)
        rc, took = stopped_within(proc, signal.SIGTERM, 10)
        text = log.read_text()
        print(f"SIGTERM while publishing to a stopped broker: exit {rc} after {took:.1f}s")
        assert rc == 0 and took < 10, (rc, took, text[-2000:])
        assert "not waiting for the broker" in text, text[-2000:]
    finally:
        if proc is not None:
            stop(proc)
        broker.stop()


def test_the_learner_keeps_learning_across_a_broker_log_reset(tmp_path):
    """The embedded broker keeps its log in memory: restarted on the same port, every topic is gone and the
    learner's producer id unknown (UnknownProducerIdError), as after a topic re-created on real Kafka. The
    learner makes a new producer and publishes the round on the new log; the worker goes on indexing."""
    from streamhash.config import KafkaSettings

    broker = EmbeddedBroker(home=tmp_path / "broker").start()
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic="reset.images", group_id="reset-workers")
    env = env_for(kafka, tmp_path / "index", free_port())
    env.update({"STREAMHASH_LEARN__METRICS_PORT": str(free_port()), "STREAMHASH_LEARN__ROUND_EVERY": "150",
                "STREAMHASH_LEARN__ROUND_MAX_AGE_S": "0", "STREAMHASH_LEARN__OMEGA": "200",
                "STREAMHASH_LEARN__EPOCHS": "1", "STREAMHASH_LEARN__ITERS": "1", "STREAMHASH_LEARN__MI_BOOTSTRAP": "10",
                "STREAMHASH_LEARN__RESERVOIR_SIZE": "100", "STREAMHASH_LEARN__PUBLISH_TIMEOUT_S": "5"})
    learner_url = f"http://127.0.0.1:{env['STREAMHASH_LEARN__METRICS_PORT']}/metrics"
    published = lambda: scrape(learner_url).get("streamhash_learner_published_model_version", 0)  # noqa: E731
    worker = learner = None
    try:
        ensure_topics(kafka)
        worker, worker_url = start_worker(env, tmp_path / "worker.log")
        learner = spawn(["learner"], env=env, log_path=tmp_path / "learner.log")
        wait_http(learner_url, 90, learner, tmp_path / "learner.log")
        produce(kafka, 200, "old-", seed=1)
        wait_for(lambda: published() >= 2, 90, "a first round published")
        wait_for(lambda: adopted(worker_url, 2), 60,
                 "the worker to adopt version 2")

        broker.stop()
        broker.start()  # same port, empty log: the topics and the producer ids are gone
        ensure_topics(kafka)
        produce(kafka, 200, "new-", seed=2)
        wait_for(lambda: published() >= 3, 120, "a round after the reset published")
        assert [a.version for a in models_on(kafka)] == [3]  # on the new log
        wait_for(lambda: scrape(worker_url).get("streamhash_items_indexed_total", 0) >= 400, 60, "the new items indexed")
        assert learner.poll() is None and worker.poll() is None
        assert "published model version 3 at attempt" in (tmp_path / "learner.log").read_text()
        # the worker's models reader sees the log behind its position and reads the new log from its start
        wait_for(lambda: adopted(worker_url, 3), 30, "the worker to adopt version 3")
        assert stop(learner) == 0
    finally:
        for p in (learner, worker):
            if p is not None:
                stop(p)
        broker.stop()


# ---------------------------------------------------------------- processes that die with their parent

def start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, it names one process, never a reuse."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` (children, theirs...), each with its start time."""
    parent_of = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parent_of[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for child, parent in parent_of.items():
            if parent == p and child not in out and (t := start_time(child)) is not None:
                out[child] = t
                todo.append(child)
    return out


def still_running(procs: dict[int, str]) -> list[int]:
    return [pid for pid, t in procs.items() if start_time(pid) == t and _not_zombie(pid)]


def _not_zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_kill_9_of_streamhash_broker_leaves_no_tansu_running(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamhash", "broker", "--port", str(port)],
                            env={**os.environ, "STREAMHASH_DATA__HOME": str(tmp_path)}, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert "listening on" in proc.stdout.readline()
        tansu = descendants(proc.pid)
        assert len(tansu) == 1, tansu
        proc.kill()
        proc.wait()
        wait_for(lambda: not still_running(tansu), 10, "Tansu to die with `streamhash broker`")
        wait_for(lambda: not listening(port), 10, "nothing listening on the port")
    finally:
        proc.kill()
        for pid in still_running(tansu if "tansu" in locals() else {}):
            os.kill(pid, signal.SIGKILL)


def test_streamhash_broker_refuses_a_port_already_taken(broker, tmp_path):
    out = subprocess.run([sys.executable, "-m", "streamhash", "broker", "--port", str(broker.port)],
                         env={**os.environ, "STREAMHASH_DATA__HOME": str(tmp_path)}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "listening" not in out.stdout, (out.returncode, out.stdout, out.stderr)
    assert f"port {broker.port}" in out.stderr and "already in use" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr


def listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST not installed (make data)")
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGKILL])
def test_the_demo_leaves_no_process_of_its_own_when_it_ends(tmp_path, sig):
    """SIGHUP (its terminal closed) stops every process cleanly; SIGKILL leaves it to the kernel. Both once left
    the broker, worker, learner and query server running (each in a session of its own)."""
    log = open(tmp_path / "demo.out", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamhash", "demo", "--serve", "--limit", "300", "--queries", "5",
                             "--probes", "2", "--workdir", str(tmp_path / "demo")], stdout=log, stderr=subprocess.STDOUT)
    mine: dict[int, str] = {}
    try:
        # Tansu, the worker, the learner and the query server (in that order): all four started
        wait_for(lambda: proc.poll() is not None or len(descendants(proc.pid)) >= 4, 120, "the demo's four processes",
                 interval=0.3)
        assert proc.poll() is None, (tmp_path / "demo.out").read_text()[-2000:]
        mine = descendants(proc.pid)
        proc.send_signal(sig)
        rc = proc.wait(60)
        wait_for(lambda: not still_running(mine), 30, "every process of the demo to end")
        if sig == signal.SIGHUP:
            text = (tmp_path / "demo.out").read_text()
            assert rc == 130 and "interrupted" in text and "Traceback" not in text, (rc, text[-2000:])
    finally:
        proc.kill()
        for pid in still_running(mine):
            os.kill(pid, signal.SIGKILL)
