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
from streamhash.services.processes import scrape, spawn, stop, total, wait_for
from tests.support import env_for, produce, read_store, start_worker

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


def test_a_second_worker_on_the_same_store_is_refused_and_signals_never_kill(broker, kafka_settings, tmp_path):
    """Two workers on one store once swapped generations under each other and livelocked. SIGUSR1 once
    killed a worker started without learning (rc -10)."""
    ensure_topics(kafka_settings)
    env = env_for(kafka_settings, tmp_path / "index", free_port())
    first, url = start_worker(env, tmp_path / "worker1.log")
    second = spawn(["worker"], env={**env, "STREAMHASH_WORKER__METRICS_PORT": str(free_port())},
                   log_path=tmp_path / "worker2.log")
    assert second.wait(timeout=60) == 73  # EX_CANTCREAT: restarting will not help while the first runs
    assert "already open for writing by pid" in (tmp_path / "worker2.log").read_text()
    os.kill(first.pid, signal.SIGUSR1)  # learning is off in env_for
    produce(kafka_settings, 50, "u-", seed=6)
    wait_for(lambda: scrape(url).get('streamhash_index_items{process="worker"}', 0) >= 50, 60, "ingest after SIGUSR1")
    assert first.poll() is None
    assert "SIGUSR1 ignored: learning is disabled" in (tmp_path / "worker1.log").read_text()
    assert stop(first) == 0


def test_sigusr1_during_start_up_is_not_a_kill(broker, kafka_settings, tmp_path):
    env = env_for(kafka_settings, tmp_path / "index", free_port())
    env["STREAMHASH_LEARN__ENABLED"] = "true"
    log = tmp_path / "worker.log"
    proc = spawn(["worker"], env=env, log_path=log)
    for _ in range(4):  # importing torch, loading the model, before and after the learner exists
        time.sleep(0.7)
        os.kill(proc.pid, signal.SIGUSR1)
    url = f"http://127.0.0.1:{env['STREAMHASH_WORKER__METRICS_PORT']}/metrics"
    wait_for(lambda: proc.poll() is not None or _up(url), 60, "the worker to start")
    assert proc.poll() is None, log.read_text()[-2000:]
    assert stop(proc, timeout=60) == 0


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
