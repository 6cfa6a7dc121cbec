"""CIFAR-10 photos with their class names, end to end: ``streamhash produce --dataset cifar10`` (100
JPEGs of the shared tarball, sent as they are) → a worker (32x32 RGB) → a query server that shows the names the
shard keeps (``cat``, not ``labels 3``); a foreign producer renaming a label wins and is counted; names that do
not match their labels are dead-lettered with the reason; a worker restoring the shards from the changelog
restores the names too."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest

from streamhash.data.cifar10 import CLASSES
from streamhash.kafka.broker import free_port
from streamhash.kafka.produce import make_producer
from streamhash.records import encode_png
from streamhash.services.processes import scrape, spawn
from tests.data.test_cifar10 import TARBALL
from tests.support import env_for, module_kafka, start_worker, stop, wait_for, wait_http

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not TARBALL.exists(), reason=f"the shared CIFAR-10 tarball is not at {TARBALL}")]

PER_CLASS = 10  # of the test split: 100 photos
PHOTOS = {"STREAMHASH_MODEL__IMAGE_SIZE": "32", "STREAMHASH_MODEL__CHANNELS": "3", "STREAMHASH_IMAGE__MODE": "rgb"}


def test_cifar10_photos_are_searched_by_class_name(broker, tmp_path):
    kafka = module_kafka(broker, "photonames")
    env = {**env_for(kafka, tmp_path / "index", free_port(), free_port()), **PHOTOS}
    worker, metrics = start_worker(env, tmp_path / "worker.log")
    server = spawn(["serve"], env=env, log_path=tmp_path / "serve.log")
    base = f"http://127.0.0.1:{env['STREAMHASH_SERVER__PORT']}"
    try:
        wait_http(f"{base}/healthz", 60, server, tmp_path / "serve.log")
        sent = subprocess.run([sys.executable, "-m", "streamhash", "produce", "--dataset", "cifar10", "--path",
                               str(TARBALL), "--split", "test", "--per-class", str(PER_CLASS), "--quiet"],
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0 and f"sent {10 * PER_CLASS} images" in sent.stdout, sent.stderr[-2000:]
        n = 10 * PER_CLASS
        wait_for(lambda: httpx.get(f"{base}/healthz").json()["index_size"] >= n, 90, f"{n} photos in the query index")
        assert httpx.get(f"{base}/status").json()["label_names"] == {str(i): c for i, c in enumerate(CLASSES)}
        cat = httpx.get(f"{base}/items/cifar10-test-cat-0003").json()
        assert cat["labels"] == [3] and cat["label_names"] == ["cat"] and cat["content_type"] == "image/jpeg"
        hits = httpx.post(f"{base}/search", json={"item_id": "cifar10-test-ship-0000", "k": 20}).json()["results"]
        assert hits[0]["id"] == "cifar10-test-ship-0000" and hits[0]["label_names"] == ["ship"]
        assert all(h["label_names"] == [CLASSES[h["labels"][0]]] for h in hits)

        # a foreign producer: label 3 renamed (the later name wins, counted), and names that do not fit their labels
        image = httpx.get(f"{base}/items/cifar10-test-cat-0003/image").content
        producer = make_producer(kafka)
        producer.send(kafka.topic, key=b"foreign-1", value=image,
                      headers=[("labels", b"3"), ("label-names", b"kitten")])
        producer.send(kafka.topic, key=b"foreign-2", value=encode_png(np.zeros((32, 32, 3), np.uint8)),
                      headers=[("labels", b"3,5"), ("label-names", b"kitten")])
        producer.flush()
        producer.close()
        wait_for(lambda: scrape(metrics).get("streamhash_label_names_replaced_total", 0) >= 1, 60, "the rename counted")
        wait_for(lambda: scrape(metrics).get('streamhash_messages_dead_lettered_total{stage="headers"}', 0) >= 1, 60,
                 "the mismatched names dead-lettered")
        wait_for(lambda: httpx.get(f"{base}/items/foreign-1").status_code == 200, 60, "the foreign photo served")
        assert httpx.get(f"{base}/items/cifar10-test-cat-0003").json()["label_names"] == ["kitten"]
        assert httpx.get(f"{base}/status").json()["label_names"]["3"] == "kitten"

        # the shards are a cache of Kafka: a worker with an empty store restores them, names included
        stop(worker)
        env2 = {**env, "STREAMHASH_STORE__PATH": str(tmp_path / "index2"), "STREAMHASH_WORKER__METRICS_PORT": str(free_port())}
        worker, _ = start_worker(env2, tmp_path / "worker2.log")
        restored = wait_for(lambda: (got := shard_names(tmp_path / "index2"))[0] >= n + 1 and got, 90, "the restore")
        assert restored[1] == {**{str(i): c for i, c in enumerate(CLASSES)}, "3": "kitten"}
    finally:
        stop(server)
        stop(worker)


def shard_names(root) -> tuple[int, dict]:
    """(items, merged class names) of the shards under ``root``, read in a fresh process (one LMDB env per process)."""
    code = f"""
import json
from streamhash.index import label_names
from streamhash.index.store import Store
from streamhash.index.store.root import StoreRoot
try:
    root = StoreRoot({str(root)!r}, create=False)
except Exception:
    print(json.dumps([0, {{}}])); raise SystemExit
n, maps = 0, []
for key in root.shards():
    s = Store(root.shard_path(key), readonly=True)
    n, maps = n + s.count(), maps + [label_names.stored(s)]
    s.close()
print(json.dumps([n, label_names.merge(maps)]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    n, names = json.loads(out)
    return n, names
