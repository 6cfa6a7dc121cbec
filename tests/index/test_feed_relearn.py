"""A learner on a store root publishes the codes a round re-learned (``LearnSettings.relearn``) for items learned in
an earlier round: the update names the shard that holds the item and its current seq (a worker's applied learned
code re-links it), and the worker's own apply path (``Store.apply_updates``) writes it. Real LMDB shards, written by
another process as a worker does (one LMDB environment per process); the learner's publishing function itself."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from types import SimpleNamespace

import numpy as np

from streamhash.index.feed import ShardFeed
from streamhash.index.store.root import ShardKey, StoreRoot
from streamhash.kafka.modelbus import CodeUpdate
from streamhash.records import ImageSpec
from streamhash.services.learner.app import code_updates

BITS = 32


class Sink:
    """A Learning sink that keeps each item's code as the feed tells it."""

    def __init__(self):
        self.net = SimpleNamespace(cfg=SimpleNamespace(bits=BITS))
        self.codes: dict[str, bytes] = {}

    def observe(self, ids, codes, labels=None, *, frozen=False, learned=True):
        self.codes.update((i, c.tobytes()) for i, c in zip(ids, codes))

    def apply_reencode(self, ids, codes):
        self.codes.update((i, c.tobytes()) for i, c in zip(ids, codes))

    def forget(self, ids):
        for i in ids:
            self.codes.pop(i, None)


def worker(root: StoreRoot, code: str) -> dict:
    """Run ``code`` as the worker of shards t/0 and t/1 (``shards[p]``), in another process; returns what it
    leaves in ``out``."""
    paths = {p: str(root.shard_path(ShardKey("t", p))) for p in (0, 1)}
    script = "\n".join([
        "import json",
        "from streamhash.index.store import ItemWrite, Store",
        "from streamhash.kafka.modelbus import CodeUpdate",
        f"shards = {{p: Store(path, bits={BITS}, shard=p) for p, path in {paths!r}.items()}}",
        "out = {}",
        code,
        "for s in shards.values():",
        "    s.close()",
        "print(json.dumps(out))",
    ])
    done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write(ids_by_shard: dict[int, list[str]], ts: float) -> str:
    return "\n".join(f"shards[{p}].write_batch([ItemWrite(i, bytes(4), b'png', 'image/png', (1,), {ts}) "
                     f"for i in {ids!r}])" for p, ids in ids_by_shard.items())


def apply(updates: list[tuple[int, CodeUpdate]]) -> str:
    """The worker applying the codes topic's records, each partition's in order, through its own apply path."""
    by = {p: [(u.item_id, u.seq, u.kind, u.model_version, u.code, u.ts) for q, u in updates if q == p] for p in (0, 1)}
    return (f"out['results'] = {{p: shards[p].apply_updates([CodeUpdate(*u) for u in ups], {{}}) "
            f"for p, ups in {by!r}.items()}}")


def codes(ids, fill: int) -> dict[str, np.ndarray]:
    return {i: np.full(BITS // 8, fill + k, np.uint8) for k, i in enumerate(ids)}


def learned_once(tmp_path):
    """Eight labeled items over two shards, learned by a first round whose codes the workers applied."""
    root = StoreRoot(tmp_path, create=True)
    worker(root, write({0: ["a0", "a1", "a2", "a3"], 1: ["b0", "b1", "b2", "b3"]}, 100.0))
    sink = Sink()
    feed = ShardFeed(root, "t", sink, ImageSpec())
    feed.poll()
    ids = sorted(feed.pending_at)
    first = code_updates(feed, ids, "learned", 2, codes(ids, 10))
    assert len(first) == 8 and not feed.pending_at
    got = worker(root, apply(first))
    assert [got["results"][p]["applied"] for p in ("0", "1")] == [4, 4]
    feed.poll()  # the applied codes, re-linked under new seqs
    return root, feed, sink


def current(feed: ShardFeed, p: int, item_id: str) -> dict:
    return feed.shards[ShardKey("t", p)].store.get_item(item_id)


def test_a_relearned_code_of_an_item_learned_before_is_published_to_its_shard_and_applied(tmp_path, caplog):
    root, feed, sink = learned_once(tmp_path)
    before = {i: current(feed, p, i) for p, i in ((1, "b1"), (0, "a2"))}
    assert all(r["learned"] and r["learned_by"] == 2 for r in before.values())
    new = codes(["b1", "a2"], 50)
    with caplog.at_level(logging.WARNING, logger="streamhash.index.feed"):
        ups = code_updates(feed, ["b1", "a2"], "learned", 3, new)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert ups == [(1, CodeUpdate("b1", before["b1"]["seq"], "learned", 3, new["b1"].tobytes(), ts=100.0)),
                   (0, CodeUpdate("a2", before["a2"]["seq"], "learned", 3, new["a2"].tobytes(), ts=100.0))]
    got = worker(root, apply(ups))
    assert [got["results"][p]["applied"] for p in ("0", "1")] == [1, 1]
    feed.poll()
    for p, i in ((1, "b1"), (0, "a2")):
        rec = current(feed, p, i)
        assert rec["code"] == new[i].tobytes() and rec["learned_by"] == 3 and rec["seq"] > before[i]["seq"]
        assert sink.codes[i] == new[i].tobytes()
    assert current(feed, 0, "a1")["code"] == codes(sorted(["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3"]), 10)["a1"].tobytes()
    feed.close()


def test_relearned_codes_in_flight_together_apply_in_order_and_a_resent_item_is_not_overwritten(tmp_path, caplog):
    root, feed, sink = learned_once(tmp_path)
    # two rounds re-learn a0 before its worker applied the first one's code: the later code wins, not "stale"
    r2, r3 = codes(["a0"], 60), codes(["a0"], 70)
    both = code_updates(feed, ["a0"], "learned", 3, r2) + code_updates(feed, ["a0"], "learned", 4, r3)
    assert worker(root, apply(both))["results"]["0"]["applied"] == 2
    assert current(feed, 0, "a0")["code"] == r3["a0"].tobytes()
    # a1 re-learned, then sent again (new labels, new timestamp) before its worker applied the code: stale, the
    # re-sent item keeps its inferred code and is learned as new
    ups = code_updates(feed, ["a1"], "learned", 3, codes(["a1"], 80))
    got = worker(root, write({0: ["a1"]}, 200.0) + "\n" + apply(ups))
    assert got["results"]["0"]["stale"] == 1 and current(feed, 0, "a1")["code"] == bytes(4)
    # a2 sent again before this feed read it: its re-learned code (of the old version) is not published, no warning
    worker(root, write({0: ["a2"]}, 300.0))
    with caplog.at_level(logging.WARNING, logger="streamhash.index.feed"):
        assert code_updates(feed, ["a2"], "learned", 3, codes(["a2"], 90)) == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    feed.poll()
    assert feed.pending_at["a2"] == (0, current(feed, 0, "a2")["seq"])
    # an id in no shard: warned, skipped
    with caplog.at_level(logging.WARNING, logger="streamhash.index.feed"):
        assert code_updates(feed, ["gone"], "learned", 3, codes(["gone"], 1)) == []
    assert "gone" in caplog.text
    feed.close()


def test_relearned_ids_are_looked_up_with_one_read_per_shard(tmp_path):
    """Re-learned ids over both shards (and one in neither): each shard is asked once, in one read transaction,
    for the ids the shards before it lacked (one read per id per shard made a publish take about a second)."""
    from tests.index.store.test_items import CountingEnv

    root, feed, sink = learned_once(tmp_path)
    ids = ["a0", "b0", "gone", "a1", "b1", "b2", "a3", "a2", "b3"]
    expected = {}
    for p, prefix in ((0, "a"), (1, "b")):
        for item_id in (i for i in ids if i.startswith(prefix)):
            rec = current(feed, p, item_id)
            expected[item_id] = (p, rec["seq"], rec["ts"])
    counting = {}
    for key, shard in feed.shards.items():
        shard.store._env.env = counting[key.partition] = CountingEnv(shard.store._env.env)
    assert feed.take_pending(ids) == [(i, *expected[i]) for i in ids if i != "gone"]
    assert {p: c.begun for p, c in counting.items()} == {0: 1, 1: 1}
    feed.close()
