"""An id lives in one shard whatever the producer's partitioner (issue 25, item 4), on a real broker, worker and
query server: ids sent by a murmur2 producer (Java's, kafka-python's), re-sent with new labels by a CRC32 producer
(librdkafka's default) with the worker killed -9 mid-way and restarted, then re-sent with explicit wrong partitions,
then (the worker paused) re-sent by CRC32 and again, newer, by murmur2, and some removed by misplaced tombstones:
every id in exactly one shard (its murmur2 home), with its latest labels, the index counting each id once, every
partition committed to its end.

Before: 500 ids re-sent through another partitioner each lived in two shards; a search returned 9,813 distinct ids
in 10,000 hits, ``GET /items`` answered a stale label, ``index_size`` said 15,500 for 15,000 ids.
"""

from __future__ import annotations

import signal

import httpx
import pytest
from kafka.partitioner import Partitioner

from streamhash.kafka.broker import free_port
from streamhash.kafka.partitioner import crc32_partition
from streamhash.kafka.produce import from_arrays, make_producer, send
from streamhash.services.processes import scrape, spawn, total
from tests.support import (committed_through, env_for, high_watermarks, module_kafka, partition_of, read_store,
                           start_worker, stop, wait_for, wait_http)

pytestmark = pytest.mark.integration

N = 300


class Librdkafka(Partitioner):
    """librdkafka's default ``consistent_random`` for keyed records: CRC32 of the key."""

    def partition(self, topic, key, serialized_key, value, serialized_value, cluster):
        return crc32_partition(serialized_key, len(cluster.partitions_for_topic(topic)))


class Elsewhere(Partitioner):
    """A producer naming a partition itself: the one after the key's murmur2 home."""

    def partition(self, topic, key, serialized_key, value, serialized_value, cluster):
        return (partition_of(serialized_key.decode()) + 1) % len(cluster.partitions_for_topic(topic))


def send_all(kafka, images, labels, partitioner=None) -> None:
    producer = make_producer(kafka, **({"partitioner": partitioner} if partitioner else {}))
    send(producer, kafka.topic, from_arrays(images, labels, prefix="r-", fmt="npy"), progress=False)
    producer.close()


def wait_labels(store, expected: dict[str, list[int]], what: str) -> None:
    """Wait until the shards hold exactly ``expected`` (id -> labels); on timeout, fail with the difference."""
    try:
        wait_for(lambda: read_store(store)["labels"] == expected, 90, what, interval=0.5)
    except TimeoutError:
        held = read_store(store)["labels"]
        wrong = {i: (held.get(i), expected.get(i)) for i in set(held) | set(expected) if held.get(i) != expected.get(i)}
        raise AssertionError(f"{what}: {len(wrong)} ids differ (held, expected), e.g. {dict(list(wrong.items())[:8])}")


def test_ids_re_sent_through_other_partitioners_stay_in_their_home_shard_with_their_latest_labels(broker, tmp_path):
    from tests.conftest import synthetic_images

    kafka = module_kafka(broker, "rehome")
    store = tmp_path / "index"
    env = env_for(kafka, store, metrics_port=free_port(), http_port=free_port())
    images, first = synthetic_images(N, seed=25)
    ids = [f"r-{i}" for i in range(N)]
    assert sum(crc32_partition(i.encode(), 4) != partition_of(i) for i in ids) > N // 2  # most would move
    worker, url = start_worker(env, tmp_path / "worker.log")
    server = None
    try:
        send_all(kafka, images, first)
        wait_labels(store, {i: [int(x)] for i, x in zip(ids, first)}, "the murmur2 sends")
        second = (first + 1) % 10
        send_all(kafka, images, second, Librdkafka())
        wait_for(lambda: sum(total(scrape(url), f"streamhash_{name}_total") for name in ("messages_consumed", "rerouted"))
                 > N, 60, "the worker into the re-sends")
        worker.send_signal(signal.SIGKILL)  # mid-way: re-routed produces acked or not, offsets committed or not
        worker.wait()
        worker, url = start_worker(env, tmp_path / "worker2.log")
        wait_labels(store, {i: [int(x)] for i, x in zip(ids, second)}, "the CRC32 re-sends, re-routed, across a restart")

        third = (first + 2) % 10
        send_all(kafka, images, third, Elsewhere())
        wait_labels(store, {i: [int(x)] for i, x in zip(ids, third)}, "the explicit-partition re-sends")
        # a worker behind: a CRC32 send, then a newer murmur2 one of the same ids, both read after they were sent;
        # each misplaced first copy reaches its home after the newer write, and is not written there
        before = {name: total(scrape(url), f"streamhash_{name}_total") for name in ("rerouted", "rerouted_stale")}
        worker.send_signal(signal.SIGSTOP)  # well inside the session timeout: no rebalance
        try:
            fourth, fifth = (first + 3) % 10, (first + 4) % 10
            send_all(kafka, images, fourth, Librdkafka())
            send_all(kafka, images, fifth)
        finally:
            worker.send_signal(signal.SIGCONT)
        misplaced = sum(crc32_partition(i.encode(), 4) != partition_of(i) for i in ids)
        wait_for(lambda: total(scrape(url), "streamhash_rerouted_total") - before["rerouted"] == misplaced, 60,
                 f"{misplaced} old copies re-routed")
        ends = high_watermarks(kafka, kafka.topic)  # the re-routed copies included
        wait_for(lambda: committed_through(store, kafka.topic, ends), 60, "the copies read at home", interval=0.5)
        wait_labels(store, {i: [int(x)] for i, x in zip(ids, fifth)}, "the newer direct sends, kept")
        assert total(scrape(url), "streamhash_rerouted_stale_total") - before["rerouted_stale"] == misplaced

        gone = ids[::10]  # after the re-sends were read: two partitions' records have no order (rehome.py)
        producer = make_producer(kafka, partitioner=Librdkafka())  # tombstones follow their id home too
        for f in [producer.send(kafka.topic, key=i.encode(), value=None) for i in gone]:
            f.get(30)
        producer.close()
        latest = {i: [int(x)] for i, x in zip(ids, fifth) if i not in gone}
        wait_labels(store, latest, "misplaced tombstones")
        ends = high_watermarks(kafka, kafka.topic)
        wait_for(lambda: committed_through(store, kafka.topic, ends), 60, "every partition committed", interval=0.5)

        content = read_store(store)
        assert sorted(content["ids"]) == sorted(latest)  # each id once: no shard holds a second copy
        for shard, held in content["shards"].items():
            assert all(partition_of(i) == int(shard.rsplit("/", 1)[1]) for i in held["ids"]), shard
        rerouted = total(scrape(url), "streamhash_rerouted_total")
        assert rerouted > 0

        server = spawn(["serve"], env=env, log_path=tmp_path / "serve.log")
        base = f"http://127.0.0.1:{env['STREAMHASH_SERVER__PORT']}"
        wait_http(f"{base}/healthz", 60, server, tmp_path / "serve.log")
        hits = httpx.post(f"{base}/search", json={"code_hex": "00" * 4, "k": 10 * N}, timeout=30).json()
        assert hits["index_size"] == len(latest)
        assert sorted(h["id"] for h in hits["results"]) == sorted(latest)
        assert httpx.get(f"{base}/items/r-1", timeout=10).json()["labels"] == latest["r-1"]
        assert httpx.get(f"{base}/items/r-0", timeout=10).status_code == 404
    finally:
        if server is not None:
            stop(server)
        assert stop(worker) == 0


def test_a_producer_of_this_project_sends_each_key_to_its_home_under_the_setting(broker):
    """``streamhash produce`` and ``delete`` (make_producer) follow ``kafka.partitioner``: nothing of theirs is
    re-routed."""
    kafka = module_kafka(broker, "rehome-crc32").model_copy(update={"partitioner": "crc32"})
    producer = make_producer(kafka)
    keys = [f"p-{i}".encode() for i in range(40)]
    got = [f.get(30).partition for f in [producer.send(kafka.topic, key=k, value=b"x") for k in keys]]
    producer.close()
    assert got == [crc32_partition(k, 4) for k in keys] != [partition_of(k.decode()) for k in keys]
