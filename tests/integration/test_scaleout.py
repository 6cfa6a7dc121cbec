"""Scale-out on Kafka itself, on real processes: two workers in one group over one store root, a shard
per partition, one killed with -9 mid-stream; the survivor takes its partitions and their shards.

Before shards, two workers with stores of their own left 2,040 ids in both stores, 1,828 of them with
different labels, after one stopped and ids were re-sent.
"""

from __future__ import annotations

import signal

import httpx
import numpy as np
import pytest

from streamhash.kafka.broker import free_port
from streamhash.kafka.produce import from_arrays, make_producer, send
from streamhash.services.processes import scrape, total
from tests.support import (committed_through, env_for, high_watermarks, module_kafka, partition_of, read_store, start_worker,
                           stop, wait_for, wait_http)

pytestmark = pytest.mark.integration


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
    # the lag gauge follows the fetch position, which may lead the last commit by a batch: wait for the commit
    ends = high_watermarks(kafka, kafka.topic)
    wait_for(lambda: committed_through(root, kafka.topic, ends), 60, "every image committed", interval=0.5)
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


def test_a_worker_follows_the_learners_topics_codes_by_partition_models_by_version_reencodes_by_generation(broker, tmp_path):
    """What the learner publishes, applied by the worker owning each shard: a model of the shards' generation
    becomes their network; learned codes land in the shard of their partition, by seq; a model of a higher
    generation is re-encoded into by each shard, learned codes kept and stale inferred ones encoded anew."""
    from streamhash.config import ModelSettings
    from streamhash.index.store import Store
    from streamhash.index.store.root import StoreRoot
    from streamhash.kafka.modelbus import CodeUpdate, ModelAnnouncement, ModelPublisher
    from streamhash.model.hashnet import HashNet, HashNetConfig
    from streamhash.records import decode_image
    from tests.conftest import synthetic_images
    from tests.support import produce

    kafka = module_kafka(broker, "follow")
    root = tmp_path / "index"
    worker, url = start_worker(env_for(kafka, root, free_port()), tmp_path / "worker.log")
    produce(kafka, 2000, "img-", seed=4)
    wait_for(lambda: scrape(url).get('streamhash_index_items{process="worker"}', 0) >= 2000, 60, "2,000 indexed")
    publisher = ModelPublisher(kafka)
    mc = ModelSettings()
    net2 = HashNet(HashNetConfig(bits=mc.bits, seed=2))
    publisher.publish_model(ModelAnnouncement(2, 1, False, net2.to_bytes()))
    wait_for(lambda: all(v == 2 for k, v in scrape(url).items() if k.startswith("streamhash_shard_model_version")), 30,
             "every shard to take model 2")
    before = read_store(root)
    learned = {}
    for name, shard in before["shards"].items():
        p = int(name.rsplit("/", 1)[1])
        for seq, item_id in enumerate(shard["ids"][:5], start=1):  # first five of each shard: seqs 1..5
            learned[item_id] = (p, CodeUpdate(item_id, seq, "learned", 2, bytes([p, seq, 0, 255])))
    stale = CodeUpdate(before["shards"][f"{kafka.topic}/0"]["ids"][5], 999, "learned", 2, b"\0\0\0\0")
    publisher.publish_codes([pu for pu in learned.values()] + [(0, stale)])
    wait_for(lambda: total(scrape(url), "streamhash_code_updates_total") >= 21, 30, "the code updates applied")
    s = scrape(url)
    assert s['streamhash_code_updates_total{result="applied"}'] == 20
    assert s['streamhash_code_updates_total{result="stale"}'] == 1

    net3 = HashNet(HashNetConfig(bits=mc.bits, seed=3))
    publisher.publish_model(ModelAnnouncement(3, 2, True, net3.to_bytes()))
    wait_for(lambda: all(v == 2 for k, v in scrape(url).items() if k.startswith("streamhash_shard_generation")), 60,
             "every shard re-encoded into generation 2")
    assert scrape(url)["streamhash_shard_reencodes_total"] == 4
    publisher.close()
    assert stop(worker) == 0
    images, _ = synthetic_images(2000, seed=4)
    inferred = {}
    store_root = StoreRoot(root, create=False)
    for key in store_root.shards():
        store = Store(store_root.shard_path(key), readonly=True)
        meta = store.read_meta()
        assert (meta["generation"], meta["model_version"]) == (2, 3)
        for item_id in store.snapshot().ids:
            rec = store.get_item(item_id, with_blob=True)
            if item_id in learned:
                assert rec["code"] == learned[item_id][1].code  # learned: frozen across the re-encode
            else:
                inferred[item_id] = (rec["code"], rec["blob"])
        store.close()
    from streamhash.config import Settings
    from streamhash.services.spec import image_spec

    spec = image_spec(Settings())
    some = list(inferred.items())[:50]
    expected = net3.encode(np.stack([decode_image(blob, "application/x-npy", spec) for _, (_, blob) in some]))
    assert [code for _, (code, _) in some] == [row.tobytes() for row in expected]  # inferred: encoded by model 3


def test_two_workers_a_learner_and_a_query_server_one_worker_killed_merged_results_equal_brute_force(broker, tmp_path):
    """The issue's whole picture on one machine: the learner's codes reach the shards of their partitions
    across a worker's kill -9 and the takeover, and the query server's merged top-k over the four shards
    equals brute force over the union (ties: distance, then shard order, then seq)."""
    from streamhash.codes import from_hex, hamming_brute
    from streamhash.services.processes import spawn
    from tests.conftest import synthetic_images

    kafka = module_kafka(broker, "scale3")
    root = tmp_path / "index"
    env = env_for(kafka, root, free_port(), free_port())
    env.update({"STREAMHASH_LEARN__METRICS_PORT": str(free_port()), "STREAMHASH_LEARN__ROUND_EVERY": "2000",
                "STREAMHASH_LEARN__OMEGA": "1000", "STREAMHASH_LEARN__EPOCHS": "1", "STREAMHASH_LEARN__ITERS": "3"})
    workers = [start_worker({**env, "STREAMHASH_WORKER__METRICS_PORT": str(free_port())}, tmp_path / f"worker{n}.log")
               for n in range(2)]
    learner = spawn(["learner"], env=env, log_path=tmp_path / "learner.log")
    server = spawn(["serve"], env=env, log_path=tmp_path / "serve.log")
    base, lurl = f"http://127.0.0.1:{env['STREAMHASH_SERVER__PORT']}", f"http://127.0.0.1:{env['STREAMHASH_LEARN__METRICS_PORT']}/metrics"
    try:
        wait_http(lurl, 60, learner, tmp_path / "learner.log")
        wait_http(f"{base}/healthz", 60, server, tmp_path / "serve.log")
        images, labels = synthetic_images(8000, seed=12)
        producer = make_producer(kafka)
        send(producer, kafka.topic, from_arrays(images[:4000], labels[:4000], prefix="img-", fmt="npy"), progress=False)
        wait_for(lambda: scrape(lurl).get("streamhash_learned_codes_published_total", 0) > 0, 120, "learned codes")
        workers[0][0].send_signal(signal.SIGKILL)
        workers[0][0].wait()
        send(producer, kafka.topic, from_arrays(images[4000:], labels[4000:], prefix="img-", fmt="npy", start=4000),
             progress=False)
        producer.close()
        survivor = workers[1][1]
        wait_for(lambda: scrape(survivor).get('streamhash_index_items{process="worker"}', 0) >= 8000, 120, "all indexed")
        learner.send_signal(signal.SIGUSR1)  # learn what is pending now rather than at the age limit
        published = scrape(lurl)["streamhash_learned_codes_published_total"]
        wait_for(lambda: scrape(lurl)["streamhash_learned_codes_published_total"] > published, 120, "a round after the kill")
        # it exits at most learn.stop_grace_s after handling SIGTERM, which waits for the torch op in progress
        assert stop(learner, timeout=60) == 0
        wait_for(lambda: scrape(survivor).get("streamhash_consumer_lag_messages", 1) == 0, 60, "the survivor caught up")
        codes_end = high_watermarks(kafka, kafka.codes_topic)
        wait_for(lambda: committed_through(root, kafka.codes_topic, codes_end), 60, "the codes topic's last batch applied",
                 interval=0.5)
        s = scrape(survivor)
        assert stop(workers[1][0]) == 0
        content = read_store(root)
        last = {name: sh["next_seq"] - 1 for name, sh in content["shards"].items()}
        wait_for(lambda: {s["shard"]: s["last_seq"] for s in httpx.get(f"{base}/healthz").json()["shards"]} == last, 30,
                 "the query server on the shards' last writes")
        assert s.get('streamhash_code_updates_total{result="missing"}', 0) == 0  # every code went to its item's shard
        assert sum(sh["learned"] for sh in content["shards"].values()) > 0
        ids = content["ids"]
        assert len(ids) == len(set(ids)) == 8000
        # brute force over the union, in (shard order, seq order) = read_store's order
        codes = np.stack([from_hex(content["codes"][i], 32) for i in ids])
        rng = np.random.default_rng(0)
        queries = np.concatenate([codes[rng.choice(len(codes), 5)], rng.integers(0, 256, (5, 4), dtype=np.uint8)])
        dist = hamming_brute(queries, codes)
        for q, d in zip(queries, dist):
            order = np.argsort(d, kind="stable")[:50]
            r = httpx.post(f"{base}/search", json={"code_hex": q.tobytes().hex(), "k": 50}).json()
            assert not r["partial"] and len(r["shards"]) == 4
            assert [(h["id"], h["distance"]) for h in r["results"]] == [(ids[j], int(d[j])) for j in order]
    finally:
        for p in (learner, server, *(w for w, _ in workers)):
            stop(p)


def test_a_worker_started_after_a_reencode_was_announced_reencodes_its_shards(broker, tmp_path):
    """The announcement is read from the models topic at start-up, before any shard opens: a restarted worker
    whose shards are behind re-encodes them with the announced network (it is in no shard yet)."""
    from streamhash.config import ModelSettings
    from streamhash.kafka.modelbus import ModelAnnouncement, ModelPublisher
    from streamhash.model.hashnet import HashNet, HashNetConfig
    from tests.support import produce

    kafka = module_kafka(broker, "restart")
    root = tmp_path / "index"
    env = env_for(kafka, root, free_port())
    worker, url = start_worker(env, tmp_path / "worker1.log")
    produce(kafka, 400, "img-", seed=5)
    wait_for(lambda: scrape(url).get('streamhash_index_items{process="worker"}', 0) >= 400, 60, "400 indexed")
    assert stop(worker) == 0
    publisher = ModelPublisher(kafka)
    publisher.publish_model(ModelAnnouncement(2, 2, True, HashNet(HashNetConfig(bits=ModelSettings().bits, seed=9)).to_bytes()))
    publisher.close()
    worker, url = start_worker(env, tmp_path / "worker2.log")
    wait_for(lambda: scrape(url).get("streamhash_shard_reencodes_total", 0) >= 4, 60, "the four shards re-encoded")
    assert stop(worker) == 0
    content = read_store(root)
    assert {(sh["generation"], sh["model_version"]) for sh in content["shards"].values()} == {(2, 2)}
    assert len(content["ids"]) == 400
