"""Forged records on the models and codes topics never stop ingest (issue 26, items 1-3), against a real broker
and real worker processes.

On a9a6b47: a junk model with a high version became every shard's model and sent every later image to the
DLQ (600 of 600), across restarts; a ``"version": null`` header made every later start exit 1; a 2-byte
learned code crash-looped the worker on every restart. Here each is dead-lettered with its stage and reason,
counted, and ingest goes on with the previous model; with a model key, only what the key signed is adopted.
"""

from __future__ import annotations

import json

import pytest
from kafka import KafkaConsumer

from streamhash.kafka.broker import free_port
from streamhash.kafka.modelbus import MODEL_HEADER, CodeUpdate, ModelAnnouncement, ModelPublisher, model_key
from streamhash.kafka.produce import make_producer
from streamhash.services.processes import scrape
from tests.support import env_for, module_kafka, produce, read_store, start_worker, stop, wait_for

pytestmark = pytest.mark.integration


def dead_letters(kafka, n: int, timeout_s: float = 60) -> list[dict]:
    """The first ``n`` dead letters, each as its headers (str -> str)."""
    consumer = KafkaConsumer(kafka.dlq_topic, **kafka.client_kwargs(), group_id=None, auto_offset_reset="earliest",
                             enable_auto_commit=False)
    out: list[dict] = []
    try:
        def more():
            for batch in consumer.poll(timeout_ms=200).values():
                out.extend({k: v.decode(errors="replace") for k, v in r.headers} for r in batch)
            return len(out) >= n
        wait_for(more, timeout_s, f"{n} dead letters on {kafka.dlq_topic}")
        return out
    finally:
        consumer.close(autocommit=False)


def forge_model(kafka, version, value: bytes, **meta) -> None:
    producer = make_producer(kafka)
    header = json.dumps({"version": version, "generation": 1, "reencode": False, **meta}).encode()
    key = model_key(version) if isinstance(version, int) else b"model-forged"
    producer.send(kafka.models_topic, key=key, value=value, partition=0, headers=[(MODEL_HEADER, header)]).get(30)
    producer.close()


def indexed(store) -> int:
    return len(read_store(store)["ids"])


def test_forged_models_and_codes_are_dead_lettered_and_ingest_goes_on_across_restarts(broker, tmp_path):
    kafka = module_kafka(broker, "forged")
    store = tmp_path / "index"
    env = env_for(kafka, store, metrics_port=free_port())
    # before any worker: a junk model far ahead, and a header whose version is null (both once stopped every start)
    forge_model(kafka, 999999, b"junk weights")
    forge_model(kafka, None, b"junk weights")
    worker, metrics = start_worker(env, tmp_path / "worker.log")
    try:
        produce(kafka, 300, "a-", seed=1)
        wait_for(lambda: indexed(store) == 300, 90, "300 images indexed beside the forged models", interval=0.5)
        assert read_store(store)["shards"][f"{kafka.topic}/0"]["model_version"] == 1  # the seeded network serves

        # a learned code of 2 bytes for a real item (4-byte codes here), and one for an unknown seq
        shard = read_store(store)["shards"]
        part, sh = next((int(k.rsplit("/", 1)[1]), v) for k, v in shard.items() if v["ids"])
        victim = sh["ids"][0]
        producer = make_producer(kafka)
        producer.send(kafka.codes_topic, key=victim.encode(), partition=part, value=json.dumps(
            {"seq": 0, "kind": "learned", "model_version": 1, "code": "abcd"}).encode()).get(30)
        producer.send(kafka.codes_topic, key=victim.encode(), partition=part, value=json.dumps(
            {"seq": "0", "kind": "learned", "model_version": None, "code": "00000000"}).encode()).get(30)
        producer.close()
        letters = dead_letters(kafka, 4)
        stages = sorted(d["error.stage"] for d in letters)
        assert stages == ["codes", "codes", "models", "models"], letters
        assert any("version must be an integer" in d["error.message"] for d in letters)
        assert any("does not load" in d["error.message"] for d in letters)
        assert any("a learned code of 2 bytes" in d["error.message"] for d in letters)
        assert all(d["source.offset"].isdigit() for d in letters)
        got = scrape(metrics)
        assert got['streamhash_internal_rejected_total{topic="models"}'] == 2
        assert got['streamhash_internal_rejected_total{topic="codes"}'] == 2
        produce(kafka, 300, "b-", seed=2)
        wait_for(lambda: indexed(store) == 600, 90, "300 more images after the forged codes", interval=0.5)
        assert worker.poll() is None
    finally:
        assert stop(worker) == 0
    # a restart reads the same forged records at start and starts
    worker, metrics = start_worker(env, tmp_path / "worker2.log")
    try:
        produce(kafka, 300, "c-", seed=3)
        wait_for(lambda: indexed(store) == 900, 90, "300 images after a restart", interval=0.5)
    finally:
        assert stop(worker) == 0


def test_with_a_model_key_only_a_signed_model_is_adopted(broker, tmp_path):
    from streamhash.config import ModelSettings
    from streamhash.model.state import initial_net

    kafka = module_kafka(broker, "signed")
    store = tmp_path / "index"
    env = {**env_for(kafka, store, metrics_port=free_port()), "STREAMHASH_SECURITY__MODEL_KEY": "k3y"}
    worker, metrics = start_worker(env, tmp_path / "worker.log")
    try:
        produce(kafka, 100, "a-", seed=1)
        wait_for(lambda: indexed(store) == 100, 90, "100 images indexed", interval=0.5)
        net = initial_net(ModelSettings()).to_bytes()  # a network that loads and fits: only the key tells them apart
        unsigned, signed = ModelPublisher(kafka), ModelPublisher(kafka, key=b"k3y")
        unsigned.publish_model(ModelAnnouncement(2, 1, False, net))
        wait_for(lambda: scrape(metrics).get('streamhash_internal_rejected_total{topic="models"}', 0) == 1, 60,
                 "the unsigned model refused")
        # a code signed with another key is refused too; the signed model is adopted
        ModelPublisher(kafka, key=b"other").publish_codes([(0, CodeUpdate("x", 0, "learned", 2, b"\0" * 4))])
        signed.publish_model(ModelAnnouncement(2, 1, False, net))
        wait_for(lambda: all(s["model_version"] == 2 for s in read_store(store)["shards"].values()), 60,
                 "every shard at the signed version 2", interval=0.5)
        wait_for(lambda: scrape(metrics).get('streamhash_internal_rejected_total{topic="codes"}', 0) == 1, 60,
                 "the code signed with another key refused")
        letters = dead_letters(kafka, 2)
        assert sorted(d["error.stage"] for d in letters) == ["codes", "models"]
        assert any("not signed" in d["error.message"] for d in letters)
        assert any("bad signature" in d["error.message"] for d in letters)
        for p in (unsigned, signed):
            p.close()
    finally:
        assert stop(worker) == 0
