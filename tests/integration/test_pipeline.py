"""End to end on real processes: Tansu broker, worker subprocess, LMDB files, HTTP query server, /metrics.

produce -> ingest -> query, dead letters with reasons, kill -9 mid-stream without loss or duplicates,
the HTTP API's 4xx paths, and the metric values a scrape shows.
"""

from __future__ import annotations

import base64
import os
import signal
import time

import httpx
import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from streamhash.kafka.broker import free_port
from streamhash.kafka.produce import from_arrays, make_producer, send
from streamhash.kafka.topics import ensure_topics
from streamhash.records import encode_png
from streamhash.services.demo import MALFORMED
from streamhash.services.processes import scrape, spawn, total
from tests.support import env_for, read_store, scaled, start_worker, stop, wait_for, wait_http

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pipeline(broker, tmp_path_factory):
    """1,000 labeled images and every kind of malformed message through one worker and one query server."""
    from streamhash.config import KafkaSettings
    from tests.conftest import synthetic_images

    tmp = tmp_path_factory.mktemp("pipeline")
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic="pipe.images", dlq_topic="pipe.images.dlq",
                          group_id="pipe-workers")
    ensure_topics(kafka)
    env = env_for(kafka, tmp / "index", free_port(), free_port())
    worker, metrics_url = start_worker(env, tmp / "worker.log")
    server = spawn(["serve"], env=env, log_path=tmp / "serve.log")  # serving while ingestion goes on
    base = f"http://127.0.0.1:{env['STREAMHASH_SERVER__PORT']}"
    wait_http(f"{base}/healthz", 60, server, tmp / "serve.log")
    images, labels = synthetic_images(1000, seed=3)
    producer = make_producer(kafka)
    send(producer, kafka.topic, from_arrays(images[:500], labels[:500], prefix="img-", fmt="png"), progress=False)
    send(producer, kafka.topic, from_arrays(images[500:], labels[500:], prefix="img-", fmt="npy", start=500), progress=False)
    for key, value, headers, _ in MALFORMED:
        producer.send(kafka.topic, key=key, value=value, headers=headers)
    producer.flush()
    producer.close()

    def done():
        s = scrape(metrics_url)
        dead = total(s, "streamhash_messages_dead_lettered_total")
        return s if s.get("streamhash_items_indexed_total", 0) >= 1000 and dead >= len(MALFORMED) else None

    final_metrics = wait_for(done, 90, "1,000 items indexed and all malformed dead-lettered")
    wait_for(lambda: httpx.get(f"{base}/healthz").json()["index_size"] >= 1000, 30, "query index to load")
    yield {"kafka": kafka, "base": base, "metrics": final_metrics, "metrics_url": metrics_url, "images": images,
           "labels": labels, "store": tmp / "index", "worker": worker}
    stop(server)
    stop(worker)


def test_every_valid_image_is_indexed_exactly_once(pipeline):
    stop(pipeline["worker"])  # SIGTERM: drains, commits, closes LMDB cleanly
    assert pipeline["worker"].returncode == 0
    content = read_store(pipeline["store"])
    assert sorted(content["ids"]) == sorted(f"img-{i}" for i in range(1000))
    assert sum(sh["next_seq"] - 1 for sh in content["shards"].values()) == 1000  # no message was written twice
    assert len(content["shards"]) == 4  # a shard per partition, each id in the one its key hashes to
    total = sum(o for k, o in content["offsets"].items() if k.startswith(pipeline["kafka"].topic + ":"))
    assert total == 1000 + len(MALFORMED)  # every offset, malformed ones included, is accounted for
    # Kafka's committed offsets (a hint, committed at most once a second) caught up with the shards' by the stop
    kafka = pipeline["kafka"]
    reader = KafkaConsumer(**kafka.client_kwargs(), group_id=kafka.group_id, enable_auto_commit=False)
    try:
        committed = {f"{kafka.topic}:{p}": reader.committed(TopicPartition(kafka.topic, p)) for p in range(4)}
    finally:
        reader.close(autocommit=False)
    assert committed == {k: v for k, v in content["offsets"].items() if k.startswith(kafka.topic + ":")}


def test_every_malformed_message_is_in_the_dlq_with_its_reason(pipeline):
    kafka = pipeline["kafka"]
    consumer = KafkaConsumer(kafka.dlq_topic, **kafka.client_kwargs(), auto_offset_reset="earliest",
                             consumer_timeout_ms=5000, enable_auto_commit=False)
    got = [(r.key, dict(r.headers)) for r in consumer]
    consumer.close()
    assert len(got) == len(MALFORMED)
    by_key = {k: h for k, h in got}
    for key, value, headers, stage in MALFORMED:
        h = by_key[key]
        assert h["error.stage"].decode() == stage
        # the decoder's own exception where one failed, else the contract's rejection
        assert h["error.class"] == (b"UnidentifiedImageError" if key == b"bad-bytes" else b"RecordRejected")
        assert h["error.message"]
        assert h["source.topic"].decode() == kafka.topic
        assert int(h["source.offset"]) >= 0 and int(h["source.partition"]) in range(4)
        for name, v in headers:  # the original headers travel with it
            assert h[name] == v


def test_query_with_a_stored_image_returns_it_at_distance_zero(pipeline):
    images, labels = pipeline["images"], pipeline["labels"]
    for i in (0, 123, 777):
        # k = the whole index: an untrained network gives many items the same code as this one
        body = {"image_base64": base64.b64encode(encode_png(images[i])).decode(), "k": 1000}
        r = httpx.post(f"{pipeline['base']}/search", json=body)
        assert r.status_code == 200, r.text
        res = r.json()
        zero = [h for h in res["results"] if h["distance"] == 0]
        assert f"img-{i}" in [h["id"] for h in zero]
        assert [h["distance"] for h in res["results"]] == sorted(h["distance"] for h in res["results"])
        assert res["model_version"] == 1 and res["generation"] == 1 and res["index_size"] == 1000
        hit = next(h for h in zero if h["id"] == f"img-{i}")
        assert hit["labels"] == [int(labels[i])]
    # the same by code and by multipart upload, with a radius
    code = httpx.get(f"{pipeline['base']}/items/img-5").json()["code_hex"]
    r = httpx.post(f"{pipeline['base']}/search", json={"code_hex": code, "k": 1000, "radius": 1})
    assert r.status_code == 200 and "img-5" in [h["id"] for h in r.json()["results"]]
    assert all(h["distance"] == 0 for h in r.json()["results"])
    r = httpx.post(f"{pipeline['base']}/search", files={"image": ("q.png", encode_png(images[5]), "image/png")}, data={"k": "3"})
    assert r.status_code == 200 and len(r.json()["results"]) == 3


@pytest.mark.parametrize("kwargs,status,fragment", [
    ({"json": {}}, 400, "exactly one of"),
    ({"json": {"code_hex": "00ff00ff", "image_base64": "AA=="}}, 400, "exactly one of"),
    ({"json": {"code_hex": "abc"}}, 400, "8 hex digits"),
    ({"json": {"code_hex": "zzzzzzzz"}}, 400, "not a hex string"),
    ({"json": {"image_base64": "!!!not base64"}}, 400, "not valid base64"),
    ({"json": {"image_base64": base64.b64encode(b"not an image").decode()}}, 400, "query image rejected"),
    ({"json": {"image_base64": base64.b64encode(encode_png(np.zeros((5, 5), np.uint8))).decode()}}, 400, "expected 28x28"),
    ({"json": {"code_hex": "00ff00ff", "k": 0}}, 400, "k"),
    ({"json": {"code_hex": "00ff00ff", "k": 10**6}}, 400, "exceeds the limit"),
    ({"json": {"code_hex": "00ff00ff", "radius": -1}}, 400, "radius"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "bad search request"),
    ({"files": {"other": ("x", b"1")}}, 400, "needs an `image` file"),
])
def test_bad_queries_get_4xx_with_a_message(pipeline, kwargs, status, fragment):
    r = httpx.post(f"{pipeline['base']}/search", **kwargs)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]


def test_unknown_item_is_404_and_docs_are_published(pipeline):
    r = httpx.get(f"{pipeline['base']}/items/no-such-id")
    assert r.status_code == 404 and "no-such-id" in r.json()["detail"]
    spec = httpx.get(f"{pipeline['base']}/openapi.json").json()
    assert {"/search", "/items/{item_id}", "/healthz", "/metrics"} <= set(spec["paths"])


def test_metrics_show_the_right_counts(pipeline):
    s = pipeline["metrics"]
    assert s["streamhash_messages_consumed_total"] == 1000 + len(MALFORMED)
    assert s["streamhash_items_indexed_total"] == 1000
    want: dict[str, int] = {}
    for *_, stage in MALFORMED:
        want[stage] = want.get(stage, 0) + 1
    for stage, n in want.items():
        assert s[f'streamhash_messages_dead_lettered_total{{stage="{stage}"}}'] == n
    assert s['streamhash_index_items{process="worker"}'] == 1000
    assert s["streamhash_encode_duration_seconds_count"] >= 1
    assert s["streamhash_lmdb_commit_duration_seconds_count"] == s["streamhash_batches_total"]
    assert s["streamhash_last_commit_timestamp_seconds"] > time.time() - 300
    assert s["streamhash_consumer_lag_messages"] == 0
    assert 'streamhash_build_info{version="0.1.0"}' in s
    q = scrape(f"{pipeline['base']}/metrics")
    assert q['streamhash_index_items{process="query"}'] == 1000
    assert q["streamhash_freshness_seconds_count"] == 1000  # every item seen live, none from a reload
    before = q.get('streamhash_queries_total{endpoint="/search",status="200"}', 0)
    httpx.post(f"{pipeline['base']}/search", json={"code_hex": "00000000"})
    httpx.post(f"{pipeline['base']}/search", json={"code_hex": "0"})
    q = scrape(f"{pipeline['base']}/metrics")
    assert q['streamhash_queries_total{endpoint="/search",status="200"}'] == before + 1
    assert q['streamhash_queries_total{endpoint="/search",status="400"}'] >= 1


def test_kill_9_mid_stream_loses_nothing_and_duplicates_nothing(broker, kafka_settings, tmp_path):
    from tests.conftest import synthetic_images

    ensure_topics(kafka_settings)
    n = 4000
    images, labels = synthetic_images(n, seed=7)
    producer = make_producer(kafka_settings)
    send(producer, kafka_settings.topic, from_arrays(images, labels, prefix="k-", fmt="npy"), progress=False)
    producer.close()
    env = env_for(kafka_settings, tmp_path / "index", free_port())
    env["STREAMHASH_KAFKA__MAX_POLL_RECORDS"] = "100"  # many small batches: the kill lands mid-stream
    worker, url = start_worker(env, tmp_path / "worker1.log")
    wait_for(lambda: scrape(url).get("streamhash_items_indexed_total", 0) >= 600, 60, "some progress")
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    partial = read_store(tmp_path / "index")
    assert 600 <= len(partial["ids"]) < n

    worker, url = start_worker(env, tmp_path / "worker2.log")
    wait_for(lambda: scrape(url).get('streamhash_index_items{process="worker"}', 0) >= n, 90, "the restarted worker to catch up")
    assert stop(worker) == 0
    content = read_store(tmp_path / "index")
    assert sorted(content["ids"]) == sorted(f"k-{i}" for i in range(n))
    assert sum(sh["next_seq"] - 1 for sh in content["shards"].values()) == n  # nothing indexed twice across the crash
    assert sum(o for k, o in content["offsets"].items() if k.startswith(kafka_settings.topic + ":")) == n


def test_dead_broker_is_survived_and_sigterm_still_stops_cleanly(tmp_path):
    """The broker dies under a running worker: no crash loop, no exit; SIGTERM then stops it at once."""
    from streamhash.config import KafkaSettings
    from streamhash.kafka.broker import EmbeddedBroker

    broker = EmbeddedBroker(home=tmp_path / "broker").start()
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
    try:
        ensure_topics(kafka)
        worker, url = start_worker(env_for(kafka, tmp_path / "index", free_port()), tmp_path / "worker.log")
    finally:
        broker.stop()
    time.sleep(8)  # a span of time is the point: a crash loop would have ended the process by now
    assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
    assert scrape(url)["streamhash_items_indexed_total"] == 0
    t = time.monotonic()
    assert stop(worker, timeout=30) == 0
    assert time.monotonic() - t < 10


def test_full_store_stops_the_worker_cleanly_and_loses_nothing(kafka_settings, tmp_path):
    """The map-size ceiling stands in for a full disk: the worker retries, stops with 75, and a
    restart with room to grow indexes every image exactly once."""
    from tests.conftest import synthetic_images

    ensure_topics(kafka_settings)
    images, labels = synthetic_images(3000, seed=5)
    producer = make_producer(kafka_settings)
    send(producer, kafka_settings.topic, from_arrays(images, labels, prefix="f-", fmt="npy"), progress=False)
    producer.close()
    env = env_for(kafka_settings, tmp_path / "index", free_port())
    # per shard: the model takes ~1.2 MB and its ~750 of the 3,000 images ~0.8 MB
    env.update({"STREAMHASH_STORE__INITIAL_MAP_SIZE_BYTES": str(1 << 20), "STREAMHASH_STORE__MAX_MAP_SIZE_BYTES": str(7 << 18),
                "STREAMHASH_WORKER__WRITE_ATTEMPTS": "2", "STREAMHASH_KAFKA__MAX_POLL_RECORDS": "200"})
    worker = spawn(["worker"], env=env, log_path=tmp_path / "worker1.log")
    assert worker.wait(timeout=scaled(120)) == 75
    log = (tmp_path / "worker1.log").read_text()
    assert "map-size ceiling" in log and "Nothing was lost" in log
    partial = read_store(tmp_path / "index")
    assert 0 < len(partial["ids"]) < 3000
    env["STREAMHASH_STORE__MAX_MAP_SIZE_BYTES"] = str(1 << 30)
    worker, url = start_worker(env, tmp_path / "worker2.log")
    wait_for(lambda: scrape(url).get('streamhash_index_items{process="worker"}', 0) >= 3000, 90, "catch-up after the restart")
    assert stop(worker) == 0
    content = read_store(tmp_path / "index")
    assert sorted(content["ids"]) == sorted(f"f-{i}" for i in range(3000))
    assert sum(sh["next_seq"] - 1 for sh in content["shards"].values()) == 3000
