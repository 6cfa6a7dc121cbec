"""A learner with no store root (issue 25 item 2): a worker writes its shards and their changelog, the learner reads
the changelog only (its own state store, another directory), and its learned codes reach every partition's shard;
its round fires a re-encode, which it redoes on its copy: it then holds exactly the codes the shards serve.
Restarted, it reads only the changelog's tail from its stored offsets."""

from __future__ import annotations

import re

import pytest

from streamhash.kafka.broker import free_port
from streamhash.kafka.produce import from_arrays, make_producer, send
from streamhash.kafka.topics import ensure_topics
from streamhash.services.processes import scrape, spawn
from tests.conftest import synthetic_images
from tests.support import committed_through, env_for, high_watermarks, read_store, start_worker, stop, wait_for, wait_http

pytestmark = pytest.mark.integration

CAUGHT_UP = re.compile(r"changelog read to its end: (\d+) records since the stored offsets")


def learner_env(env: dict, state) -> dict:
    out = {k: v for k, v in env.items() if k != "STREAMHASH_STORE__PATH"}  # no root: the changelog feed
    out.update({"STREAMHASH_LEARN__STATE_PATH": str(state), "STREAMHASH_LEARN__METRICS_PORT": str(free_port()),
                "STREAMHASH_LEARN__ROUND_EVERY": "100", "STREAMHASH_LEARN__ROUND_MAX_AGE_S": "0",
                "STREAMHASH_LEARN__OMEGA": "200", "STREAMHASH_LEARN__EPOCHS": "1", "STREAMHASH_LEARN__ITERS": "1",
                "STREAMHASH_LEARN__RESERVOIR_SIZE": "50", "STREAMHASH_LEARN__NICE": "0",
                "STREAMHASH_LEARN__MI_THRESHOLD": "-10"})  # below any gain: the round announces a re-encode
    return out


def learner_codes(path, kafka) -> dict[str, str]:
    """Every item's code as the learner's state holds it (hex)."""
    from streamhash.kafka.changelog_state import LearnerState

    state = LearnerState(path, kafka.changelog_topic)
    try:
        return {i: r["code"] for batch in state.scan() for i, r in batch}
    finally:
        state.close()


def learner_offsets(path, kafka) -> dict[int, int]:
    """The changelog offsets the learner's state says it has read to (per partition)."""
    from streamhash.kafka.changelog_state import LearnerState

    state = LearnerState(path, kafka.changelog_topic)
    try:
        return state.offsets()
    finally:
        state.close()


def test_a_learner_without_a_store_root_teaches_every_partition_and_resumes_from_its_offsets(kafka_settings, tmp_path):
    ensure_topics(kafka_settings)
    root = tmp_path / "index"
    env = env_for(kafka_settings, root, free_port(), free_port())
    lenv = learner_env(env, tmp_path / "learner-state")
    images, labels = synthetic_images(240, seed=5)
    shown = [None if i % 4 == 0 else int(y) for i, y in enumerate(labels)]
    learner = spawn(["learner"], env=lenv, log_path=tmp_path / "learner.log")  # starts while the worker does
    lurl = f"http://127.0.0.1:{lenv['STREAMHASH_LEARN__METRICS_PORT']}/metrics"
    worker = None
    try:
        worker, _ = start_worker(env, tmp_path / "worker.log")
        wait_http(lurl, 60, learner, tmp_path / "learner.log")
        producer = make_producer(kafka_settings)
        send(producer, kafka_settings.topic, from_arrays(images[:200], shown[:200], prefix="c-"), progress=False)
        wait_for(lambda: scrape(lurl).get("streamhash_learned_codes_published_total", 0) >= 100, 240,
                 "a round over the changelog and its codes published")
        codes_end = high_watermarks(kafka_settings, kafka_settings.codes_topic)
        wait_for(lambda: committed_through(root, kafka_settings.codes_topic, codes_end), 60,
                 "the worker to apply every learned code", interval=0.5)
        wait_for(lambda: {s["generation"] for s in read_store(root)["shards"].values()} == {2}, 120,
                 "the worker's re-encode into generation 2", interval=0.5)
        shards = read_store(root)["shards"]
        assert len(shards) == 4 and all(s["learned"] > 0 for s in shards.values()), shards
        assert not (root / "learner-state").exists() and (tmp_path / "learner-state" / "data.mdb").exists()
        log = (tmp_path / "learner.log").read_text()
        assert "learning from the changelog" in log and "not published" not in log

        # stopped, more items meanwhile, restarted: only the changelog records written since are read
        assert stop(learner, timeout=60) == 0
        # where the learner's state stands, not the log's end: the worker may still apply the last round's codes
        before = learner_offsets(tmp_path / "learner-state", kafka_settings)
        send(producer, kafka_settings.topic, from_arrays(images[200:], shown[200:], prefix="c-", start=200),
             progress=False)
        producer.close()
        ends = high_watermarks(kafka_settings, kafka_settings.topic)
        wait_for(lambda: committed_through(root, kafka_settings.topic, ends), 60, "the last items indexed", interval=0.5)
        after = high_watermarks(kafka_settings, kafka_settings.changelog_topic)
        learner = spawn(["learner"], env=lenv, log_path=tmp_path / "learner2.log")
        got = wait_for(lambda: CAUGHT_UP.search((tmp_path / "learner2.log").read_text()), 120,
                       "the restarted learner caught up with the changelog")
        tail = sum(after.values()) - sum(before.values())
        assert 40 <= int(got.group(1)) == tail < sum(after.values()) // 2
        assert "learner state: 200 items" in (tmp_path / "learner2.log").read_text()
        assert stop(learner, timeout=60) == 0
        assert learner_codes(tmp_path / "learner-state", kafka_settings) == read_store(root)["codes"]
    finally:
        for p in (learner, worker):
            if p is not None:
                stop(p, timeout=30)
