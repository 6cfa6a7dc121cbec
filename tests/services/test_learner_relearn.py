"""The learner process with ``learn.relearn``: a round that re-learns the codes of items a former round learned
publishes them, each to its shard's codes partition under the item's current seq and timestamp, and the worker's
apply path writes them (real shards, real broker; helpers of tests/services/test_learner.py)."""

from __future__ import annotations

import json
import logging

from streamhash.index.store.root import ShardKey, StoreRoot
from tests.services.test_learner import (  # noqa: F401 (fixtures)
    in_subprocess, items, kafka, learners, published_codes, round_now, settings_for, start, write_shard)


def worker_does(root, topic: str, code: str) -> dict:
    """``code`` run by partition 0's worker (``store``; another process, as the learner holds the shard open)."""
    return json.loads(in_subprocess(f"""
        import json
        from streamhash.index.store import ItemWrite, Store
        from streamhash.kafka.modelbus import CodeUpdate
        store = Store({str(StoreRoot(root).shard_path(ShardKey(topic, 0)))!r}, bits=32)
        out = {{}}
        {code}
        store.close()
        print(json.dumps(out))
    """))


def apply(root, topic: str, updates) -> dict:
    """The worker applying the codes partition; returns id -> (seq, ts, code hex, learned_by) after."""
    rows = [(u.item_id, u.seq, u.kind, u.model_version, u.code.hex(), u.ts) for u in updates]
    return worker_does(root, topic, f"rows = {rows!r}; "
                       "out['results'] = store.apply_updates([CodeUpdate(i, s, k, v, bytes.fromhex(c), t) "
                       "for i, s, k, v, c, t in rows], {}); "
                       "out['items'] = {i: (r['seq'], r['ts'], r['code'].hex(), r['learned_by']) "
                       "for i in [r[0] for r in rows] for r in [store.get_item(i)]}")


def test_a_round_that_relearns_old_codes_publishes_them_and_the_worker_applies_them(kafka, tmp_path, learners, caplog):
    root = tmp_path / "index"
    write_shard(root, kafka.topic, 0)
    learner = start(settings_for(kafka, root, relearn="always"), learners)
    round_now(learner)
    first = [u for _, _, u in published_codes(kafka)]
    applied = apply(root, kafka.topic, first)
    assert applied["results"]["applied"] == 40

    new = items(0, n=9, seed=7, prefix="n")
    rows = [(w.id, w.code.hex(), w.blob.hex(), w.labels) for w in new if w.labels]
    worker_does(root, kafka.topic, f"store.write_batch([ItemWrite(i, bytes.fromhex(c), bytes.fromhex(v), "
                                   f"'application/x-npy', l) for i, c, v, l in {rows!r}], model_version=1)")
    with caplog.at_level(logging.WARNING, logger="streamhash.index.feed"):
        learner.step()  # follows the applied codes and the new items
        round_now(learner)
    assert "its code is not published" not in caplog.text
    second = [(p, u) for p, _, u in published_codes(kafka) if u.model_version == 3]
    old = {u.item_id: (p, u) for p, u in second if u.item_id in applied["items"]}
    assert old, "the round re-learned no old code (relearn=always)"
    for p, u in old.values():  # partition 0, the seq the applied code linked it under, the item's timestamp
        seq, ts, _, _ = applied["items"][u.item_id]
        assert (p, u.seq, u.ts) == (0, seq, ts)
    after = apply(root, kafka.topic, [u for _, u in old.values()])
    assert after["results"]["applied"] == len(old)
    for _, u in old.values():
        _, _, code, learned_by = after["items"][u.item_id]
        assert code == u.code.hex() and learned_by == 3
