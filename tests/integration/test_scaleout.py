"""Scale-out on Kafka itself, on real processes: two workers in one group over one store root, a shard
per partition, one killed with -9 mid-stream; the survivor takes its partitions and their shards.

Before shards, two workers with stores of their own left 2,040 ids in both stores, 1,828 of them with
different labels, after one stopped and ids were re-sent.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
from kafka.partitioner.default import murmur2

from streamhash.kafka.broker import free_port
from streamhash.kafka.produce import from_arrays, make_producer, send
from streamhash.services.processes import scrape, stop, total, wait_for
from tests.support import env_for, module_kafka, read_store, start_worker

pytestmark = pytest.mark.integration


def partition_of(item_id: str, partitions: int = 4) -> int:
    """Where kafka-python's default partitioner puts a key (the Java client's murmur2)."""
    return (murmur2(item_id.encode()) & 0x7FFFFFFF) % partitions


def test_two_workers_one_killed_mid_stream_leave_every_id_in_exactly_one_shard_once(broker, tmp_path):
    from tests.conftest import synthetic_images

    kafka = module_kafka(broker, "scale2")
    root = tmp_path / "index"
    workers = []
    for n in range(2):
        env = env_for(kafka, root, free_port())
        workers.append(start_worker(env, tmp_path / f"worker{n}.log"))
    urls = [url for _, url in workers]
    wait_for(lambda: all(scrape(u).get("streamhash_assigned_partitions", 0) == 2 for u in urls), 60,
             "two partitions each")
    images, labels = synthetic_images(20_000, seed=11)
    producer = make_producer(kafka)
    send(producer, kafka.topic, from_arrays(images, labels, prefix="img-", fmt="npy"), progress=False)
    wait_for(lambda: total(scrape(urls[0]), "streamhash_items_indexed_total") >= 3000, 60, "worker 0 mid-stream")
    workers[0][0].send_signal(signal.SIGKILL)  # no drain, no commit, no revoke: its flocks die with it
    workers[0][0].wait()
    relabeled = (labels[:1000] + 1) % 10
    send(producer, kafka.topic, from_arrays(images[:1000], relabeled, prefix="img-", fmt="npy"), progress=False)
    producer.close()
    survivor = urls[1]
    wait_for(lambda: scrape(survivor).get("streamhash_assigned_partitions", 0) == 4, 60, "the survivor to take all four")

    def caught_up():
        s = scrape(survivor)
        return s.get("streamhash_consumer_lag_messages", 1) == 0 and s.get('streamhash_index_items{process="worker"}', 0) >= 20_000

    wait_for(caught_up, 120, "the survivor to index everything")
    time.sleep(1.0)  # one more poll: the lag gauge may lead the last commit by a batch
    assert stop(workers[1][0]) == 0

    content = read_store(root)
    ids = content["ids"]
    assert len(ids) == len(set(ids)) == 20_000  # every id in exactly one shard, once
    assert sorted(content["shards"]) == [f"{kafka.topic}/{p}" for p in range(4)]
    for name, shard in content["shards"].items():
        p = int(name.rsplit("/", 1)[1])
        assert all(partition_of(i) == p for i in shard["ids"])  # the shard of the partition its key hashes to
    # nothing written twice: one seq per message (20,000 + the 1,000 re-sent), across the kill and the takeover
    assert sum(sh["next_seq"] - 1 for sh in content["shards"].values()) == 21_000
    latest = {f"img-{i}": [int(x)] for i, x in enumerate(np.concatenate([relabeled, labels[1000:]]))}
    assert {i: list(v) for i, v in content["labels"].items()} == latest
    log = (tmp_path / "worker1.log").read_text()
    assert "opened shard" in log
