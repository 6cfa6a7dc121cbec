"""A worker on a real broker learns from a stream of class-structured images: precision@10 of the live
index rises, an MI-triggered re-encode swaps generations, and queries during the swap all succeed
against one complete generation each."""

from __future__ import annotations

import base64
import threading
import time

import httpx
import numpy as np
import pytest

from streamhash.kafka.broker import free_port
from streamhash.kafka.produce import from_arrays, make_producer, send
from streamhash.kafka.topics import ensure_topics
from streamhash.records import encode_png
from streamhash.services.processes import scrape, spawn, stop, wait_for, wait_http
from tests.conftest import synthetic_images
from tests.support import env_for, start_worker

pytestmark = pytest.mark.integration


def precision_at_10(base: str, images, labels) -> float:
    hits = []
    with httpx.Client(timeout=30) as c:
        for img, lab in zip(images, labels):
            r = c.post(f"{base}/search", json={"image_base64": base64.b64encode(encode_png(img)).decode(), "k": 10})
            r.raise_for_status()
            hits += [h["labels"] == [int(lab)] for h in r.json()["results"]]
    return float(np.mean(hits))


def test_worker_learns_reencodes_and_queries_survive_the_swap(kafka_settings, tmp_path):
    ensure_topics(kafka_settings)
    images, labels = synthetic_images(2600, seed=11, noise=70, shift=2)
    stream, queries, q_labels = images[:2400], images[2400:], labels[2400:]
    env = env_for(kafka_settings, tmp_path / "index", free_port(), free_port())
    env.update({"STREAMHASH_LEARN__ENABLED": "true", "STREAMHASH_LEARN__ROUND_EVERY": "1200",
                "STREAMHASH_LEARN__OMEGA": "1000", "STREAMHASH_LEARN__EPOCHS": "3", "STREAMHASH_LEARN__RESERVOIR_SIZE": "300",
                # threshold below any possible gain: the first round's trigger must fire
                "STREAMHASH_LEARN__MI_THRESHOLD": "-10"})
    worker, metrics_url = start_worker(env, tmp_path / "worker.log")
    server = spawn(["serve"], env=env, log_path=tmp_path / "serve.log")
    base = f"http://127.0.0.1:{env['STREAMHASH_SERVER__PORT']}"
    try:
        wait_http(f"{base}/healthz", 60, server, tmp_path / "serve.log")
        producer = make_producer(kafka_settings)
        # a first half, indexed with the untrained network, below the round threshold
        send(producer, kafka_settings.topic, from_arrays(stream[:1000], labels[:1000], prefix="s-"), progress=False)
        wait_for(lambda: httpx.get(f"{base}/healthz").json()["index_size"] >= 1000, 60, "first half indexed")
        before = precision_at_10(base, queries, q_labels)
        assert httpx.get(f"{base}/healthz").json()["generation"] == 1

        seen, errors, stop_q = [], [], threading.Event()

        def hammer():  # queries all through the round and the swap
            with httpx.Client(timeout=30) as c:
                while not stop_q.is_set():
                    r = c.post(f"{base}/search", json={"image_base64": base64.b64encode(encode_png(queries[0])).decode(), "k": 5})
                    if r.status_code != 200:
                        errors.append(r.text)
                    else:
                        j = r.json()
                        seen.append((j["generation"], j["model_version"], j["index_size"]))

        t = threading.Thread(target=hammer)
        t.start()
        send(producer, kafka_settings.topic, from_arrays(stream[1000:], labels[1000:2400], prefix="s-", start=1000), progress=False)
        producer.close()
        wait_for(lambda: scrape(metrics_url).get("streamhash_reencode_triggers_total", 0) >= 1
                 and httpx.get(f"{base}/healthz").json()["generation"] >= 2, 300, "a round and a re-encode")
        wait_for(lambda: httpx.get(f"{base}/healthz").json()["index_size"] >= 2400, 60, "everything indexed")
        time.sleep(0.5)
        stop_q.set()
        t.join()
        after = precision_at_10(base, queries, q_labels)
    finally:
        stop(server)
        stop(worker)

    assert not errors, errors[:3]
    gens = [g for g, _, _ in seen]
    assert gens == sorted(gens) and gens[0] == 1 and gens[-1] >= 2  # one generation per answer, never back
    # a generation is complete when it becomes visible: the index never shrinks across the swap
    sizes = [n for _, _, n in seen]
    assert all(b >= a for a, b in zip(sizes, sizes[1:]))
    print(f"precision@10 before learning {before:.3f}, after {after:.3f}; {len(seen)} queries during the swap")
    assert after > before + 0.1, (before, after)
