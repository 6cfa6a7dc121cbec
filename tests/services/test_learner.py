"""The learner process over real shards (a store root in tmp, written directly) and a real broker: what it
publishes on the models and codes topics, in which order, after a restart, a failed round or a re-encode,
and that it never writes a shard."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaTimeoutError

from streamhash import metrics as m
from streamhash.config import KafkaSettings, Settings
from streamhash.errors import EXIT_TEMPFAIL
from streamhash.index.store import ItemWrite, Store
from streamhash.index.store.root import ShardKey, StoreRoot
from streamhash.kafka.modelbus import CodeUpdate, ModelReader
from streamhash.kafka.topics import ensure_topics
from streamhash.model.hashnet import HashNet, HashNetConfig
from streamhash.records import encode_npy
from streamhash.services.learner import Learner
from streamhash.services.processes import spawn
from tests.support import stop, wait_for, wait_http
from tests.conftest import synthetic_images

PARTITIONS = 2
N = 60  # items per shard; every third unlabeled, so 40 labeled


@pytest.fixture
def kafka(broker) -> KafkaSettings:
    """Topics of the test's own: images (2 partitions), its dead letters, models and codes."""
    tag = uuid.uuid4().hex[:8]
    k = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic=f"images-{tag}", dlq_topic=f"images-{tag}.dlq",
                      models_topic=f"models-{tag}", codes_topic=f"codes-{tag}", topic_partitions=PARTITIONS)
    ensure_topics(k)
    return k


def settings_for(kafka: KafkaSettings, root, **learn) -> Settings:
    return Settings(kafka=kafka, store={"path": root}, model={"bits": 32}, learn={
        "round_every": 10_000, "round_max_age_s": 0, "omega": 64, "epochs": 1, "reservoir_size": 50,
        "holdout_fraction": 0.0, "mi_bootstrap": 20, "metrics_port": 0, **learn})


def items(partition: int, *, n: int = N, seed: int = 2, prefix: str = "i", labeled: bool = True) -> list[ItemWrite]:
    """Labeled synthetic images encoded by the seeded initial network (version 1), as a worker writes them."""
    images, labels = synthetic_images(n, seed=seed + partition)
    codes = HashNet(HashNetConfig(bits=32)).encode(images)
    return [ItemWrite(f"p{partition}-{prefix}{i}", codes[i].tobytes(), encode_npy(images[i]), "application/x-npy",
                      (int(labels[i]),) if i % 3 and labeled else None) for i in range(n)]


def write_shard(root, topic: str, partition: int, **kw) -> dict[str, int]:
    """A shard written and closed here (the learner must not have it open: one LMDB environment per process);
    returns item id -> seq."""
    store = Store(StoreRoot(root).shard_path(ShardKey(topic, partition)), bits=32)
    batch = items(partition, **kw)
    seqs = store.write_batch(batch, model_version=1)
    store.close()
    return {it.id: s for it, s in zip(batch, seqs)}


def in_subprocess(code: str) -> str:
    """Write to a shard the learner holds open: from another process, as its worker would; returns its stdout."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, cwd=os.getcwd(),
                          capture_output=True, text=True).stdout


def apply_codes(root, topic: str, updates: list[CodeUpdate]) -> dict[str, int]:
    """What the worker owning partition 0 does with the codes partition: apply them by seq; returns id -> new seq."""
    rows = [(u.item_id, u.seq, u.kind, u.model_version, u.code.hex()) for u in updates]
    return json.loads(in_subprocess(f"""
        import json
        from streamhash.index.store import Store
        from streamhash.kafka.modelbus import CodeUpdate
        store = Store({str(StoreRoot(root).shard_path(ShardKey(topic, 0)))!r}, bits=32)
        store.apply_updates([CodeUpdate(i, s, k, v, bytes.fromhex(c)) for i, s, k, v, c in {rows!r}], {{}})
        print(json.dumps({{i: store.get_item(i)["seq"] for i, *_ in {rows!r}}}))
    """))


def published_models(kafka) -> list:
    reader = ModelReader(kafka)
    try:
        return reader.read_to_end()
    finally:
        reader.close()


def published_codes(kafka, timeout: float = 30) -> list[tuple[int, int, CodeUpdate]]:
    """(partition, broker timestamp in ms, update) of everything on the codes topic."""
    consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    tps = [TopicPartition(kafka.codes_topic, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    out, deadline = [], time.monotonic() + timeout
    try:
        while True:
            for tp, recs in consumer.poll(timeout_ms=200).items():
                out += [(tp.partition, r.timestamp, CodeUpdate.from_record(r.key, r.value)) for r in recs]
            ends = [consumer.highwater(tp) for tp in tps]
            if all(e is not None and consumer.position(tp) >= e for tp, e in zip(tps, ends)):
                return out
            assert time.monotonic() < deadline, "could not read the codes topic to its end"
    finally:
        consumer.close()


def shard_files(root) -> dict[str, str]:
    """Digest of every shard's data file: the learner must leave them as they are."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("data.mdb"))}


def blocked(reason: str) -> float:
    return m.LEARNER_REGISTRY.get_sample_value("streamhash_learning_blocked", {"reason": reason})


@pytest.fixture
def learners():
    made = []
    yield made
    for learner in made:
        learner.close()


def start(settings, learners, **kw) -> Learner:
    learner = Learner(settings, **kw)
    learners.append(learner)
    return learner


def round_now(learner: Learner) -> None:
    learner.request_round()
    assert learner.step(), "no round ran"


@pytest.mark.parametrize("holdout", [0.0, 0.3])
def test_models_in_version_order_then_each_code_on_its_shards_partition(kafka, tmp_path, learners, holdout):
    """With a hold-out too: its images are never trained on, but its codes are learned and published."""
    root = tmp_path / "index"
    seqs = write_shard(root, kafka.topic, 0)
    files = shard_files(root)
    learner = start(settings_for(kafka, root, holdout_fraction=holdout), learners)
    assert (learner.version, learner.generation) == (1, 1)  # nothing published yet: the seeded network
    round_now(learner)
    # a shard that appears later (its partition's first message) is followed too
    seqs1 = write_shard(root, kafka.topic, 1)
    round_now(learner)

    models = published_models(kafka)
    assert [(a.version, a.generation, a.reencode) for a in models] == [(2, 1, False), (3, 1, False)]
    # the MI test's cost: every inferred code (the unlabeled items of both shards) predates the new network
    assert m.LEARNER_REGISTRY.get_sample_value("streamhash_reencode_cost_items") == 40
    assert HashNet.from_bytes(models[-1].raw).to_bytes() == learner.hasher.net.to_bytes()
    codes = published_codes(kafka)
    labeled = {f"p{p}-i{i}" for p in (0, 1) for i in range(N) if i % 3}
    assert sorted(u.item_id for _, _, u in codes) == sorted(labeled)  # each learned once, unlabeled never
    for partition, ts, u in codes:
        assert u.kind == "learned" and len(u.code) == 4
        assert partition == int(u.item_id[1])  # the partition of the shard the item lives in
        assert u.seq == {**seqs, **seqs1}[u.item_id]
        assert u.model_version == (2 if partition == 0 else 3)
        model = models[u.model_version - 2]
        assert ts >= model.published * 1000  # sent after its model was acknowledged
    after = shard_files(root)
    assert {f: after[f] for f in files} == files  # the learner never wrote the shard


def test_codes_are_never_published_before_their_model(kafka, tmp_path, learners):
    root = tmp_path / "index"
    write_shard(root, kafka.topic, 0)
    learner = start(settings_for(kafka, root, publish_retry_s=0), learners)  # no retry: the first failure is the last

    def unacknowledged(announcement):
        raise KafkaTimeoutError("the broker did not acknowledge the model")

    learner.publisher.publish_model = unacknowledged
    learner.request_round()
    assert learner.run() == EXIT_TEMPFAIL  # the process stops; a restart learns the same items again
    assert published_models(kafka) == [] and published_codes(kafka) == []
    learner.close()
    learners.remove(learner)
    restarted = start(settings_for(kafka, root), learners)
    assert restarted.version == 1
    round_now(restarted)
    assert [a.version for a in published_models(kafka)] == [2] and len(published_codes(kafka)) == 40


def test_a_producer_the_broker_forgot_is_made_again_and_the_round_published(kafka, tmp_path, learners):
    """After a broker restart or a log reset the idempotent producer's id is unknown to the broker and every
    send fails: the learner used to stop there (exit 75) and learning ended until someone restarted it."""
    from kafka.errors import UnknownProducerIdError

    root = tmp_path / "index"
    write_shard(root, kafka.topic, 0)
    learner = start(settings_for(kafka, root), learners)
    forgotten = learner.publisher

    def fenced(*args):
        raise UnknownProducerIdError("the broker no longer knows this producer id")

    forgotten.publish_model = forgotten.publish_codes = fenced
    round_now(learner)
    assert learner.publisher is not forgotten
    assert [a.version for a in published_models(kafka)] == [2] and len(published_codes(kafka)) == 40


def test_a_stop_request_ends_a_wait_on_a_broker_that_does_not_answer(kafka, tmp_path, learners):
    root = tmp_path / "index"
    write_shard(root, kafka.topic, 0)
    learner = start(settings_for(kafka, root, publish_timeout_s=60), learners)

    def hangs(announcement):
        learner.stopping.set()  # a SIGTERM while the broker does not answer
        time.sleep(60)

    learner.publisher.publish_model = hangs
    learner.request_round()
    t0 = time.monotonic()
    assert learner.run() == 0
    assert time.monotonic() - t0 < 10
    assert published_models(kafka) == [] and published_codes(kafka) == []


def test_a_restarted_learner_resumes_from_the_latest_published_model(kafka, tmp_path, learners):
    root = tmp_path / "index"
    write_shard(root, kafka.topic, 0)
    first = start(settings_for(kafka, root), learners)
    round_now(first)
    weights = first.hasher.net.to_bytes()
    first.close()
    learners.remove(first)

    restarted = start(settings_for(kafka, root), learners)
    assert (restarted.version, restarted.generation) == (2, 1)
    assert restarted.hasher.net.to_bytes() == weights  # the published network, not the seeded one
    # no worker applied the codes: the shard does not show them learned, so they are learned again
    assert not restarted.step() and restarted.hasher.n_pending == 40
    round_now(restarted)
    assert [a.version for a in published_models(kafka)] == [2, 3]
    again = [u for _, _, u in published_codes(kafka) if u.model_version == 3]
    assert len(again) == 40


def test_learned_codes_applied_by_the_worker_are_followed_and_one_in_flight_at_a_restart_is_superseded(
        kafka, tmp_path, learners):
    root = tmp_path / "index"
    write_shard(root, kafka.topic, 0)
    first = start(settings_for(kafka, root), learners)
    round_now(first)
    published = [u for _, _, u in published_codes(kafka)]
    first.close()  # stops before the worker applied its codes
    learners.remove(first)

    restarted = start(settings_for(kafka, root), learners)
    assert not restarted.step() and restarted.hasher.n_pending == 40  # not learned in the shard yet
    new_seqs = apply_codes(root, kafka.topic, published)  # the worker catches up with the first learner's codes
    restarted.step()
    assert restarted.hasher.n_pending == 40  # still learned next: its own codes follow the applied ones
    round_now(restarted)
    again = [u for _, _, u in published_codes(kafka) if u.model_version == 3]
    assert {u.item_id: u.seq for u in again} == new_seqs  # so the worker applies them, not skips them as stale

    after = apply_codes(root, kafka.topic, again)
    restarted.step()  # learned codes the index now serves are the learner's own: nothing pending, nothing changed
    assert restarted.hasher.n_pending == 0 and set(after) == set(new_seqs)
    codes = restarted.hasher.learner.codes([u.item_id for u in again])
    assert [c.tobytes() for c in codes] == [u.code for u in again]


def test_a_failed_round_publishes_quarantine_marks_and_the_next_round_learns(kafka, tmp_path, learners):
    root = tmp_path / "index"
    seqs = write_shard(root, kafka.topic, 0)
    learner = start(settings_for(kafka, root), learners)
    failures = m.LEARNING_ROUND_FAILURES._value.get()
    real, calls = learner.hasher.learn_round, []

    def fail_once(fetch, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("Maximum allowed dimension exceeded")  # what an unbounded label once did
        return real(fetch, **kw)

    learner.hasher.learn_round = fail_once
    round_now(learner)
    assert m.LEARNING_ROUND_FAILURES._value.get() == failures + 1
    assert learner.hasher.n_pending == 0 and published_models(kafka) == []
    marks = published_codes(kafka)
    assert len(marks) == 40
    for partition, _, u in marks:
        assert (partition, u.kind, u.seq, u.model_version, u.code) == (0, "quarantine", seqs[u.item_id], 1, b"")

    in_subprocess(f"""
        from streamhash.index.store import Store
        from tests.services.test_learner import items
        store = Store({str(StoreRoot(root).shard_path(ShardKey(kafka.topic, 0)))!r}, bits=32)
        store.write_batch(items(0, n=12, seed=9, prefix="n"), model_version=1)
    """)
    round_now(learner)  # new labeled items: learned as usual
    assert [a.version for a in published_models(kafka)] == [2]
    assert sorted(u.item_id for _, _, u in published_codes(kafka) if u.kind == "learned") == \
        sorted(f"p0-n{i}" for i in range(12) if i % 3)


def test_a_reencode_is_announced_and_rounds_wait_for_every_shard_to_reach_it(kafka, tmp_path, learners):
    root = tmp_path / "index"
    write_shard(root, kafka.topic, 0)
    write_shard(root, kafka.topic, 1)
    learner = start(settings_for(kafka, root, mi_threshold=-10.0), learners)  # every round re-encodes
    round_now(learner)
    assert [(a.version, a.generation, a.reencode) for a in published_models(kafka)] == [(2, 2, True)]
    unlabeled = [f"p0-i{i}" for i in range(0, N, 3)]

    # the workers have not re-encoded yet: new labeled items wait
    shard0 = StoreRoot(root).shard_path(ShardKey(kafka.topic, 0))
    reencode = """
        import numpy as np
        from streamhash.index.store import GenerationBuilder, Store
        from tests.services.test_learner import items
        store = Store({path!r}, bits=32)
        builder = GenerationBuilder(store, encode_ids=lambda ids: np.full((len(ids), 4), {fill}, np.uint8))
        builder.build(2)  # what a worker does on the announcement of generation 2
        builder.drop_replaced()
        store.write_batch(items({p}, n=6, seed=7, prefix="late"), generation=2, model_version=2)
    """
    in_subprocess(reencode.format(path=str(shard0), fill=0xAB, p=0))
    learner.request_round()
    assert not learner.step()
    assert blocked("reencode") == 1
    # the codes of the re-encoded shard are the ones DIHN trains against now
    assert (learner.hasher.learner.codes(unlabeled) == 0xAB).all()

    in_subprocess(reencode.format(path=str(StoreRoot(root).shard_path(ShardKey(kafka.topic, 1))), fill=0xCD, p=1))
    assert learner.step()  # the requested round, now that both shards are at generation 2
    assert blocked("reencode") == 0
    assert [(a.version, a.generation) for a in published_models(kafka)] == [(2, 2), (3, 3)]
    late = sorted(u.item_id for _, _, u in published_codes(kafka) if u.model_version == 3)
    assert late == sorted(f"p{p}-late{i}" for p in (0, 1) for i in range(6) if i % 3)


def lag_count() -> float:
    return m.LEARNER_REGISTRY.get_sample_value("streamhash_learn_lag_seconds_count") or 0.0


def test_a_round_runs_once_the_oldest_labeled_item_waited_round_max_age_s(kafka, tmp_path, learners):
    root = tmp_path / "index"
    write_shard(root, kafka.topic, 0)
    learner = start(settings_for(kafka, root, round_max_age_s=0.5), learners)  # 40 pending, far below round_every
    lags, published = lag_count(), m.LEARNER_CODES_PUBLISHED._value.get()
    assert not learner.step()
    time.sleep(0.5)
    assert learner.step()
    assert m.LEARNER_CODES_PUBLISHED._value.get() - published == 40
    assert lag_count() - lags == 40  # one learn lag per code published


def test_an_unlabeled_only_stream_says_it_cannot_learn(kafka, tmp_path, learners, caplog):
    caplog.set_level(logging.INFO, logger="streamhash.learner")
    root = tmp_path / "index"
    write_shard(root, kafka.topic, 0, labeled=False)
    learner = start(settings_for(kafka, root, round_every=50), learners)
    learner.step()
    learner.step()
    assert blocked("no_labels") == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot learn" in warnings[0].getMessage()
    in_subprocess(f"""
        from streamhash.index.store import Store
        from tests.services.test_learner import items
        store = Store({str(StoreRoot(root).shard_path(ShardKey(kafka.topic, 0)))!r}, bits=32)
        store.write_batch(items(0, n=3, seed=9, prefix="n"), model_version=1)
    """)
    learner.step()
    assert blocked("no_labels") == 0 and "learning unblocked (no_labels)" in caplog.text


def test_the_learner_process_runs_niced_learns_on_sigusr1_and_never_locks_a_shard(kafka, tmp_path):
    from streamhash.kafka.broker import free_port

    root = tmp_path / "index"
    write_shard(root, kafka.topic, 0)
    files = shard_files(root)
    port = free_port()
    env = {"STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "STREAMHASH_KAFKA__TOPIC": kafka.topic,
           "STREAMHASH_KAFKA__DLQ_TOPIC": kafka.dlq_topic, "STREAMHASH_KAFKA__MODELS_TOPIC": kafka.models_topic, "STREAMHASH_KAFKA__CODES_TOPIC": kafka.codes_topic,
           "STREAMHASH_KAFKA__TOPIC_PARTITIONS": str(PARTITIONS), "STREAMHASH_STORE__PATH": str(root),
           "STREAMHASH_LEARN__METRICS_PORT": str(port), "STREAMHASH_LEARN__NICE": "7",
           "STREAMHASH_LEARN__ROUND_MAX_AGE_S": "0", "STREAMHASH_LEARN__OMEGA": "64",
           "STREAMHASH_LEARN__EPOCHS": "1", "STREAMHASH_LEARN__MI_BOOTSTRAP": "20",
           "STREAMHASH_LEARN__MI_THRESHOLD": "10"}  # no re-encode: generation 1 stays
    log = tmp_path / "learner.log"
    proc = spawn(["learner"], env=env, log_path=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics", 120, proc, log)
        niceness = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == niceness
        autogroup = Path(f"/proc/{proc.pid}/autogroup")  # it leads its session: its autogroup yields too
        if autogroup.exists():
            assert autogroup.read_text().split()[-1] == str(niceness)
        wait_for(lambda: "following shard" in log.read_text(), 60, "the learner to read the shard")
        proc.send_signal(signal.SIGUSR1)  # a round now, though round_every is far away
        models = wait_for(lambda: published_models(kafka), 120, "a published model")
        assert [(a.version, a.generation) for a in models] == [(2, 1)]
        for lock in root.rglob("writer.lock"):  # no writer lock held: another process could take it
            with open(lock, "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        assert stop(proc) == 0, log.read_text()[-3000:]
    assert shard_files(root) == files
    assert "Traceback" not in log.read_text(), json.dumps(log.read_text()[-3000:])
