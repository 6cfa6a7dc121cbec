"""Faults on real processes: a broker whose log is reset under a running worker, poison messages among
valid ones, a second worker on the same store, signals at awkward moments.

Each test here failed on the code before the reliability issue's fixes.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from kafka import KafkaConsumer

from streamhash.kafka.broker import EmbeddedBroker, free_port
from streamhash.kafka.produce import from_arrays, make_producer, send
from streamhash.kafka.topics import ensure_topics
from streamhash.records import encode_png
from streamhash.services.processes import scrape, spawn, total
from tests.support import env_for, produce, read_store, start_worker, stop, wait_for

pytestmark = pytest.mark.integration


def test_a_broker_log_reset_under_a_running_worker_loses_nothing(tmp_path):
    """Memory storage: a restarted broker's log starts again at 0, far behind the worker's stored offsets.

    Before the fix, the worker kept its stored offsets: every message of the new log was skipped as
    "replayed", none was indexed, and the lag read 0.
    """
    from streamhash.config import KafkaSettings

    broker = EmbeddedBroker(home=tmp_path / "broker").start()
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic="reset.images", dlq_topic="reset.dlq",
                          group_id="reset-workers")
    env = env_for(kafka, tmp_path / "index", free_port())
    worker = None
    try:
        ensure_topics(kafka)
        worker, url = start_worker(env, tmp_path / "worker.log")
        produce(kafka, 3000, "old-", seed=1)
        wait_for(lambda: scrape(url).get('streamhash_index_items{process="worker"}', 0) >= 3000, 90, "3,000 indexed")

        broker.stop()
        broker.start()  # same port, empty log
        ensure_topics(kafka)
        produce(kafka, 500, "new-", seed=2)
        wait_for(lambda: scrape(url).get('streamhash_index_items{process="worker"}', 0) >= 3500, 120,
                 "the 500 messages of the new log to be indexed")
        s = scrape(url)
        assert total(s, "streamhash_offset_resets_total") >= 1
        assert s["streamhash_consumer_lag_messages"] == 0
        assert stop(worker) == 0
        log = (tmp_path / "worker.log").read_text()
        assert "was reset" in log and "reset.images" in log
        ids = read_store(tmp_path / "index")["ids"]
        assert sorted(ids) == sorted([f"old-{i}" for i in range(3000)] + [f"new-{i}" for i in range(500)])
    finally:
        if worker is not None:
            stop(worker)
        broker.stop()


def test_poison_messages_go_to_the_dlq_and_the_batch_around_them_is_indexed(broker, kafka_settings, tmp_path):
    """A decompression bomb and an unbounded label once crashed the worker on every restart, or broke
    every later learning round; now they are dead-lettered and the valid records of the batch indexed."""
    from tests.test_records import jpeg_declaring, png_declaring

    ensure_topics(kafka_settings)
    from tests.conftest import synthetic_images

    images, labels = synthetic_images(200, seed=4)
    ok = encode_png(images[0])
    poison = {
        b"bomb-png": (png_declaring(30000, 30000), []),
        b"bomb-jpeg": (jpeg_declaring(60000, 60000), []),
        b"huge-label": (ok, [("labels", b"99999999999999999999")]),
    }
    producer = make_producer(kafka_settings)
    send(producer, kafka_settings.topic, from_arrays(images[:100], labels[:100], prefix="ok-"), progress=False)
    for key, (value, headers) in poison.items():  # same partition as their neighbours: one batch
        producer.send(kafka_settings.topic, key=key, value=value, headers=headers, partition=0)
    send(producer, kafka_settings.topic, from_arrays(images[100:], labels[100:], prefix="ok-", start=100), progress=False)
    producer.close()
    env = env_for(kafka_settings, tmp_path / "index", free_port())
    worker, url = start_worker(env, tmp_path / "worker.log")
    wait_for(lambda: total(scrape(url), "streamhash_messages_dead_lettered_total") >= len(poison), 60, "dead letters")
    wait_for(lambda: scrape(url).get('streamhash_index_items{process="worker"}', 0) >= 200, 60, "the valid records")
    assert worker.poll() is None
    assert stop(worker) == 0
    consumer = KafkaConsumer(kafka_settings.dlq_topic, **kafka_settings.client_kwargs(), auto_offset_reset="earliest",
                             consumer_timeout_ms=5000, enable_auto_commit=False)
    got = {r.key: dict(r.headers) for r in consumer}
    consumer.close()
    assert set(got) == set(poison)
    assert got[b"bomb-png"]["error.stage"] in (b"decode", b"shape") and b"pixels" in got[b"bomb-png"]["error.message"]
    assert got[b"huge-label"]["error.stage"] == b"headers"
    assert sorted(read_store(tmp_path / "index")["ids"]) == sorted(f"ok-{i}" for i in range(200))


def test_a_shard_held_by_another_process_pauses_its_partition_until_released(broker, kafka_settings, tmp_path):
    """The previous owner of a partition may still hold its shard (finishing a batch, or hung): the new owner
    pauses that partition, goes on with the others, and resumes it where the shard left off once it is free.
    Two workers on one store once swapped generations under each other and livelocked; now the shard's
    lock makes its owner the only writer. SIGUSR1 (learning is another process now) never kills a worker."""
    import subprocess
    import sys

    from streamhash.index.store.root import ShardKey, StoreRoot
    from tests.support import partition_of

    ensure_topics(kafka_settings)
    path = StoreRoot(tmp_path / "index").shard_path(ShardKey(kafka_settings.topic, 2))
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys
from streamhash.index.store import Store
s = Store({str(path)!r}, bits=32)
print("held", flush=True)
sys.stdin.readline()
s.close()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        env = env_for(kafka_settings, tmp_path / "index", free_port())
        worker, url = start_worker(env, tmp_path / "worker.log")
        produce(kafka_settings, 400, "u-", seed=6)
        on_2 = sum(partition_of(f"u-{i}") == 2 for i in range(400))
        wait_for(lambda: scrape(url).get('streamhash_index_items{process="worker"}', 0) >= 400 - on_2, 60, "the free partitions")
        os.kill(worker.pid, signal.SIGUSR1)
        wait_for(lambda: "SIGUSR1: learning rounds run in" in (tmp_path / "worker.log").read_text(), 30, "SIGUSR1 handled")
        s = scrape(url)
        assert s['streamhash_index_items{process="worker"}'] == 400 - on_2
        assert s["streamhash_shard_lock_waits_total"] == 2  # images and codes partition 2: one shard
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=10)
        wait_for(lambda: scrape(url).get('streamhash_index_items{process="worker"}', 0) >= 400, 60, "partition 2 after release")
        assert worker.poll() is None
        assert stop(worker) == 0
    finally:
        holder.kill()
    log = (tmp_path / "worker.log").read_text()
    assert "still held by its previous owner" in log and "is free after" in log and "streamhash learner" in log
    content = read_store(tmp_path / "index")
    assert sorted(content["ids"]) == sorted(f"u-{i}" for i in range(400))


def test_sigusr1_during_start_up_is_not_a_kill(broker, kafka_settings, tmp_path):
    env = env_for(kafka_settings, tmp_path / "index", free_port())
    log = tmp_path / "worker.log"
    proc = spawn(["worker"], env=env, log_path=log)
    # Until the interpreter has run the entry point's first line, SIGUSR1's default action kills any Python
    # process; from then on (importing torch, opening the root, joining the group) it must not.
    wait_for(lambda: proc.poll() is not None or _handles_sigusr1(proc.pid), 60, "the entry point to run")
    for _ in range(4):  # spread over the rest of start-up: pacing, the point of the test
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(0.7)
    url = f"http://127.0.0.1:{env['STREAMHASH_WORKER__METRICS_PORT']}/metrics"
    wait_for(lambda: proc.poll() is not None or _up(url), 60, "the worker to start")
    assert proc.poll() is None, log.read_text()[-2000:]
    assert stop(proc, timeout=60) == 0


def _handles_sigusr1(pid: int) -> bool:
    """Whether the process ignores or catches SIGUSR1 yet (its SigIgn / SigCgt masks in /proc)."""
    masks = [int(line.split()[1], 16) for line in open(f"/proc/{pid}/status") if line.startswith(("SigIgn:", "SigCgt:"))]
    return any(mask >> (signal.SIGUSR1 - 1) & 1 for mask in masks)


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_store_of_the_single_environment_layout_is_refused_with_what_to_do(tmp_path):
    """Before shards a store was one LMDB environment at the store path; opening shards beside it would
    split an index in two without a word. The worker exits 78 (EX_CONFIG) saying what to do."""
    from streamhash.index.store import Store

    Store(tmp_path / "index", bits=32).close()
    env = {"STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1", "STREAMHASH_STORE__PATH": str(tmp_path / "index"),
           "STREAMHASH_WORKER__METRICS_PORT": "0"}
    proc = spawn(["worker"], env=env, log_path=tmp_path / "worker.log")
    assert proc.wait(timeout=60) == 78
    assert "Move it aside" in (tmp_path / "worker.log").read_text()
