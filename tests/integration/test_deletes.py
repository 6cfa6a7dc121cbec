"""Deletes (issue 28): a Kafka tombstone (a null value for an item id) removes the item from its shard, the live
index, ``GET /items`` and every search, across a re-encode and a restarted query server; an id sent again after
its tombstone is back. Real broker, worker and query server processes."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from streamhash.config import ModelSettings
from streamhash.kafka.broker import free_port
from streamhash.kafka.modelbus import ModelAnnouncement, ModelPublisher
from streamhash.kafka.produce import make_producer
from streamhash.model.state import initial_net
from streamhash.services.processes import spawn
from tests.support import env_for, module_kafka, produce, read_store, start_worker, stop, wait_for, wait_http

pytestmark = pytest.mark.integration


def tombstones(kafka, ids) -> None:
    producer = make_producer(kafka)
    for f in [producer.send(kafka.topic, key=i.encode(), value=None) for i in ids]:
        f.get(30)
    producer.close()


def served_ids(base: str) -> set[str]:
    r = httpx.post(f"{base}/search", json={"code_hex": "00" * 4, "k": 10_000}, timeout=30)
    r.raise_for_status()
    return {h["id"] for h in r.json()["results"]}


def start_server(env, log):
    server = spawn(["serve"], env=env, log_path=log)
    base = f"http://127.0.0.1:{env['STREAMHASH_SERVER__PORT']}"
    wait_http(f"{base}/healthz", 60, server, log)
    return server, base


def test_a_tombstone_removes_the_item_everywhere_across_a_re_encode_and_a_restart(broker, tmp_path):
    kafka = module_kafka(broker, "deletes")
    store = tmp_path / "index"
    env = env_for(kafka, store, metrics_port=free_port(), http_port=free_port())
    worker, _ = start_worker(env, tmp_path / "worker.log")
    server = None
    try:
        produce(kafka, 300, "d-", seed=1)
        wait_for(lambda: len(read_store(store)["ids"]) == 300, 90, "300 items indexed", interval=0.5)
        server, base = start_server(env, tmp_path / "serve.log")
        wait_for(lambda: len(served_ids(base)) == 300, 60, "the query server to serve 300", interval=0.5)

        first = [f"d-{i}" for i in range(0, 300, 10)]
        tombstones(kafka, first + ["never-sent"])
        wait_for(lambda: len(read_store(store)["ids"]) == 270, 60, "30 items removed", interval=0.5)
        live = {f"d-{i}" for i in range(300)} - set(first)
        assert set(read_store(store)["ids"]) == live
        wait_for(lambda: served_ids(base) == live, 30, "the live index without the removed items", interval=0.3)
        assert httpx.get(f"{base}/items/d-0", timeout=10).status_code == 404
        assert httpx.get(f"{base}/items/d-1", timeout=10).status_code == 200

        # a re-encode (generation 2) does not bring them back; removals after it work the same
        publisher = ModelPublisher(kafka)
        publisher.publish_model(ModelAnnouncement(2, 2, True, initial_net(ModelSettings()).to_bytes()))
        publisher.close()
        wait_for(lambda: all(s["generation"] == 2 for s in read_store(store)["shards"].values()), 90,
                 "every shard re-encoded into generation 2", interval=0.5)
        assert set(read_store(store)["ids"]) == live
        second = [f"d-{i}" for i in range(1, 300, 10)]
        out = subprocess.run([sys.executable, "-m", "streamhash", "delete", *second], capture_output=True, text=True,
                             timeout=120, env={**os.environ, **env})  # the CLI's tombstones
        assert out.returncode == 0 and "sent 30 tombstone(s)" in out.stdout, out.stderr
        produce(kafka, 1, "d-", seed=1, start=0)  # d-0 sent again after its tombstone: back
        live = (live - set(second)) | {"d-0"}
        wait_for(lambda: set(read_store(store)["ids"]) == live, 60, "the second removals and d-0 back", interval=0.5)
        wait_for(lambda: served_ids(base) == live, 30, "the live index after the re-encode", interval=0.3)
        stop(server)
        server, base = start_server(env, tmp_path / "serve2.log")  # a restarted query server reads the shards anew
        wait_for(lambda: served_ids(base) == live, 60, "the restarted server", interval=0.5)
        assert httpx.get(f"{base}/items/d-1", timeout=10).status_code == 404
        assert httpx.get(f"{base}/items/d-0", timeout=10).status_code == 200
    finally:
        if server is not None:
            stop(server)
        assert stop(worker) == 0
