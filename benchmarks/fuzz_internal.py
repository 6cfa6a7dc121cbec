"""The internal topics' fuzzing campaign (``bench_fuzz.py --internal``): forged models-topic and codes-topic records
against a live worker, learner and query server on the embedded broker, while valid images keep streaming.

Every forged record must be accounted for: each forged model dead-lettered (stage ``models``) and counted in
``streamhash_internal_rejected_total{topic="models"}``; each malformed code dead-lettered (stage ``codes``); each
well-formed code for an unknown item or seq skipped by the store (``streamhash_code_updates_total{result="missing"|
"stale"}``). No process may exit, ingest may not stall (every valid image indexed, progress in every chunk), the
query server answers, and a learner restarted afterwards reads the forged models topic at start, skips what it
cannot use, and starts.

No model key is set: a key would refuse everything at the signature, and the point is the parsers and checks. A
network that loads, fits and encodes, published as the next version, is a model like any other without a key; that
case is the key's (tests/integration/test_internal_topics.py) and is not forged here.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

import httpx

import bench_faults as bf
from streamhash.config import ModelSettings
from streamhash.kafka.modelbus import MODEL_HEADER, model_key
from streamhash.kafka.produce import make_producer
from streamhash.model.state import initial_net
from streamhash.services.processes import scrape, spawn, stop, total, wait_for, wait_http
from tests.support import partition_of

MODEL_KINDS = ["version_null", "version_string", "version_float", "version_bool", "version_huge", "version_zero",
               "generation_null", "generation_above_version", "reencode_string", "published_string", "no_header",
               "header_not_json", "header_array", "two_headers", "empty_value", "wrong_key", "junk_weights_next",
               "junk_weights_gap", "truncated_network_next", "nan_network_next", "wrong_bits_network_next",
               "real_network_backwards", "real_network_gap"]
CODE_KINDS = ["wrong_length_short", "wrong_length_long", "seq_null", "seq_string", "seq_negative", "version_null",
              "version_zero", "kind_unknown", "code_not_hex", "code_number", "not_json", "json_array", "huge_value",
              "empty_key", "quarantine_with_code"]
WELL_FORMED_CODE_KINDS = ["unknown_id", "stale_seq"]  # skipped by the store, not dead-lettered


class Forger:
    """Forged records, each ``(kind, topic, partition, key, value, headers)``; ``next_version()`` reads what the
    worker's shards serve, so that "next" forgeries aim at the version a real one would take."""

    def __init__(self, rig: bf.Rig, rng: random.Random, next_version, ids: list[str]):
        self.rig, self.rng, self.next_version, self.ids = rig, rng, next_version, ids
        mc = ModelSettings()
        self.real = initial_net(mc).to_bytes()
        nan = initial_net(mc)
        for p in nan.parameters():
            p.data.fill_(float("nan"))
        self.nan = nan.to_bytes()
        self.wide = initial_net(ModelSettings(bits=64)).to_bytes()

    def model(self, kind: str):
        v = self.next_version()
        meta = {"version": v, "generation": 1, "reencode": False, "published": time.time()}
        value, key = b"junk weights " + bytes(self.rng.randrange(256) for _ in range(32)), None
        headers = None
        if kind.startswith("version_") or kind.startswith("generation_") or kind in ("reencode_string", "published_string"):
            field, what = {"version_null": ("version", None), "version_string": ("version", str(v)),
                           "version_float": ("version", float(v)), "version_bool": ("version", True),
                           "version_huge": ("version", 2**40), "version_zero": ("version", 0),
                           "generation_null": ("generation", None), "generation_above_version": ("generation", v + 1),
                           "reencode_string": ("reencode", "yes"), "published_string": ("published", "now")}[kind]
            meta[field] = what
            value = self.real
        elif kind == "no_header":
            headers = []
        elif kind == "header_not_json":
            headers = [(MODEL_HEADER, b"{version: 2")]
        elif kind == "header_array":
            headers = [(MODEL_HEADER, b"[2, 1, false]")]
        elif kind == "two_headers":
            headers = [(MODEL_HEADER, json.dumps(meta).encode())] * 2
            value = self.real
        elif kind == "empty_value":
            value = b""
        elif kind == "wrong_key":
            key, value = b"model-000000000001", self.real
        elif kind == "junk_weights_gap":
            meta["version"] = v + self.rng.randrange(2, 10**6)
        elif kind == "truncated_network_next":
            value = self.real[: self.rng.randrange(1, len(self.real))]
        elif kind == "nan_network_next":
            value = self.nan
        elif kind == "wrong_bits_network_next":
            value = self.wide
        elif kind == "real_network_backwards":
            meta["version"], value = 1, self.real
        elif kind == "real_network_gap":
            meta["version"], value = v + self.rng.randrange(2, 1000), self.real
        if headers is None:
            headers = [(MODEL_HEADER, json.dumps(meta).encode())]
        version = meta["version"]
        if key is None:
            key = model_key(version) if type(version) is int and 0 <= version < 10**12 else b"model-forged"
        return kind, self.rig.kafka.models_topic, 0, key, value, headers

    def code(self, kind: str):
        item = self.rng.choice(self.ids)
        good = {"seq": 0, "kind": "learned", "model_version": 2, "code": "00" * 4}
        key, value = item.encode(), None
        edits = {"wrong_length_short": {"code": "abcd"}, "wrong_length_long": {"code": "00" * 8},
                 "seq_null": {"seq": None}, "seq_string": {"seq": "0"}, "seq_negative": {"seq": -5},
                 "version_null": {"model_version": None}, "version_zero": {"model_version": 0},
                 "kind_unknown": {"kind": "promoted"}, "code_not_hex": {"code": "zz" * 4}, "code_number": {"code": 1234},
                 "quarantine_with_code": {"kind": "quarantine"}, "stale_seq": {"seq": 10**9}}
        if kind in edits:
            value = json.dumps({**good, **edits[kind]}).encode()
        elif kind == "not_json":
            value = b"\x00not json"
        elif kind == "json_array":
            value = b"[0, \"learned\", 2]"
        elif kind == "huge_value":
            value = json.dumps({**good, "pad": "x" * 10_000}).encode()
        elif kind == "empty_key":
            key, value = b"", json.dumps(good).encode()
        elif kind == "unknown_id":
            key, value = f"forged-{self.rng.randrange(10**9)}".encode(), json.dumps(good).encode()
        part = partition_of(key.decode(errors="replace")) if key else 0
        return kind, self.rig.kafka.codes_topic, part, key, value, []


def campaign(broker, work: Path, *, models: int, codes: int, images: int, chunks: int = 10, seed: int = 0) -> dict:
    rng = random.Random(seed)
    rig = bf.Rig(broker, work, "internal", learn=True, env={"STREAMHASH_LEARN__ROUND_EVERY": "200",
                                                             "STREAMHASH_LEARN__ROUND_MAX_AGE_S": "5"})
    rig.start_worker()
    rig.start_server()
    per = max(images // (chunks + 1), 1)
    bf.produce(rig.kafka, rig.ledger, bf.valid_messages(per, "warm-", seed=seed))
    # the learner's first model before any forgery: the worker's reader then holds a real version to order from
    wait_for(lambda: rig.learner_metric("streamhash_learner_published_model_version") >= 2, 300,
             "the learner's first model", 0.5)

    def next_version() -> int:
        return int(rig.learner_metric("streamhash_learner_published_model_version", 1)) + 1

    forger = Forger(rig, rng, next_version, list(rig.ledger.valid))
    plan = [("models", rng.choice(MODEL_KINDS)) for _ in range(models)]
    plan += [("codes", rng.choice(CODE_KINDS + WELL_FORMED_CODE_KINDS)) for _ in range(codes)]
    rng.shuffle(plan)
    sent: Counter = Counter()
    producer = make_producer(rig.kafka, max_request_size=32 << 20)
    progress, crashes = [], []
    t0 = time.monotonic()
    for c in range(chunks):
        part = plan[c * len(plan) // chunks:(c + 1) * len(plan) // chunks]
        futures = []
        for topic, kind in part:
            kind, topic, p, key, value, headers = forger.model(kind) if topic == "models" else forger.code(kind)
            futures.append(producer.send(topic, key=key, value=value, partition=p, headers=headers))
            sent[(("models" if topic == rig.kafka.models_topic else "codes"), kind)] += 1
        producer.flush()
        for f in futures:
            f.get(60)
        before = rig.metric("streamhash_items_indexed_total")
        bf.produce(rig.kafka, rig.ledger, bf.valid_messages(per, f"c{c}-", seed=seed + c + 1))
        # ingest goes on while the forged records are read: this chunk's images are indexed within a deadline
        try:
            wait_for(lambda: rig.metric("streamhash_items_indexed_total") >= before + per, 120,
                     f"chunk {c}'s images indexed", 0.5)
            progress.append(round(time.monotonic() - t0, 1))
        except TimeoutError:
            progress.append(None)
        for name, proc in (("worker", rig.worker), ("server", rig.server), ("learner", rig.learner)):
            if proc.poll() is not None and name not in crashes:
                crashes.append(name)
    producer.close()
    forged_models = sum(n for (t, _), n in sent.items() if t == "models")
    malformed_codes = sum(n for (t, k), n in sent.items() if t == "codes" and k in CODE_KINDS)
    well_formed_codes = sum(n for (t, k), n in sent.items() if t == "codes" and k in WELL_FORMED_CODE_KINDS)
    end = time.monotonic() + 300
    while time.monotonic() < end:  # until the worker has read every forged record
        w = scrape(rig.metrics_url)
        if (w.get('streamhash_internal_rejected_total{topic="models"}', 0) >= forged_models
                and w.get('streamhash_internal_rejected_total{topic="codes"}', 0) >= malformed_codes):
            break
        time.sleep(1)
    settled = rig.settle(len(rig.ledger.valid), 300)
    w = scrape(rig.metrics_url)
    skipped = {r: w.get(f'streamhash_code_updates_total{{result="{r}"}}', 0) for r in ("missing", "stale")}
    dlq = bf.read_dlq(rig.kafka)
    internal = Counter(d["stage"] for d in dlq if d["topic"] in (rig.kafka.models_topic, rig.kafka.codes_topic))
    reasons = Counter(d["message"].split(": ", 1)[-1][:60] for d in dlq if d["stage"] in ("models", "codes"))
    try:
        r = httpx.post(f"{rig.base}/search", json={"code_hex": "00" * 4, "k": 5}, timeout=10)
        query_status = r.status_code
    except httpx.HTTPError as exc:
        query_status = repr(exc)

    # a learner started now reads the whole forged models topic at start: it skips what it cannot use and starts
    stop(rig.learner, 30)
    relearner = spawn(["learner"], env=rig.env, log_path=rig.log("learner2"))
    bf.SPAWNED.append(relearner)
    try:
        wait_http(rig.learner_url, 120, relearner, rig.log("learner2"))
        learner_skipped = wait_for(lambda: total(scrape(rig.learner_url), "streamhash_internal_rejected_total"), 60,
                                   "the restarted learner's skipped records", 0.5)
        learner_restarted = relearner.poll() is None
    except (TimeoutError, RuntimeError) as exc:
        learner_skipped, learner_restarted = repr(exc), False
    acc = rig.finish({})
    out = {
        "forged": {"models": forged_models, "codes_malformed": malformed_codes, "codes_well_formed": well_formed_codes,
                   "total": forged_models + malformed_codes + well_formed_codes},
        "forged_by_kind": {f"{t}:{k}": n for (t, k), n in sorted(sent.items())},
        "dead_lettered": {"models": internal.get("models", 0), "codes": internal.get("codes", 0)},
        "rejected_metric": {t: w.get(f'streamhash_internal_rejected_total{{topic="{t}"}}', 0) for t in ("models", "codes")},
        "skipped_well_formed": skipped,
        "reasons": dict(reasons.most_common(40)),
        "crashes": len(crashes), "crashed": crashes, "restarts": 0,
        "ingest_stalled": None in progress or settled.get("settled") != "complete",
        "chunks_indexed_at_s": progress, "images_produced": len(rig.ledger.valid), "images_indexed": acc["indexed"],
        "images_lost": acc["lost"], "query_status": query_status,
        "learner_restarted_over_forged_topic": learner_restarted, "learner_skipped_at_start": learner_skipped,
        "worker_exit_on_sigterm": acc["worker_exit_on_sigterm"],
    }
    out["unaccounted"] = (forged_models - out["dead_lettered"]["models"]) + (malformed_codes - out["dead_lettered"]["codes"]) \
        + max(well_formed_codes - skipped["missing"] - skipped["stale"], 0)
    out["ok"] = bool(out["crashes"] == 0 and not out["ingest_stalled"] and out["unaccounted"] == 0
                     and out["dead_lettered"]["models"] == forged_models and out["dead_lettered"]["codes"] == malformed_codes
                     and acc["lost"] == 0 and query_status == 200 and learner_restarted
                     and acc["worker_exit_on_sigterm"] == 0)
    return out
