"""Items removed from the index (tombstones) leave what the learner knows: a round never asks for their images,
they are no longer pending, and the MI reservoir drops them (issue 28, deletes)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np

from streamhash.config import LearnSettings
from streamhash.index.feed import ShardFeed
from streamhash.index.store.root import ShardKey, StoreRoot
from streamhash.learn.online import OnlineHasher
from streamhash.learn.reservoir import Reservoir
from streamhash.model.hashnet import HashNet, HashNetConfig
from streamhash.records import ImageSpec

BITS = 32


def test_a_reservoir_discards_ids_and_refills_their_slots():
    r = Reservoir(4, seed=0)
    r.update_many(["a", "b", "c", "d"], [1, 2, 3, 4])
    assert r.discard(["b", "x"]) == 1 and r.ids == ["a", "c", "d"] and r.payloads == [1, 3, 4]
    r.update("e", 5)
    assert r.ids == ["a", "c", "d", "e"]


def test_a_removed_item_is_never_fetched_by_a_round_nor_pending():
    settings = LearnSettings(omega=64, epochs=1, iters=1, round_every=10, holdout_fraction=0.0)
    h = OnlineHasher(HashNet(HashNetConfig(bits=BITS)), settings, seed=0)
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(40)]
    h.observe(ids, rng.integers(0, 256, (40, BITS // 8), dtype=np.uint8), [{k % 4} for k in range(40)])
    gone = ids[::2]
    h.forget(gone)
    assert set(h.learner.pending_ids) == set(ids[1::2])
    assert not set(gone) & set(h.reservoir.ids)
    asked: list[str] = []

    def fetch(batch):
        asked.extend(batch)
        return rng.integers(0, 256, (len(batch), 28, 28), dtype=np.uint8)

    report = h.learn_round(fetch)
    assert not set(gone) & set(asked) and set(report.round.ids) == set(ids[1::2])


def in_worker(path, code: str) -> None:
    """Write the shard as its worker would, in another process (one LMDB environment per process)."""
    script = textwrap.dedent(f"""
        import numpy as np
        from streamhash.index.store import ItemWrite, Store
        from streamhash.records import encode_png
        store = Store({str(path)!r}, bits={BITS}, shard=0)
        png = encode_png(np.zeros((28, 28), np.uint8))
        {code}
        store.close()
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)


def test_the_shard_feed_tells_the_learner_what_a_worker_removed(tmp_path):
    root = StoreRoot(tmp_path, create=True)
    path = root.shard_path(ShardKey("t", 0))
    in_worker(path, "store.write_batch([])")
    h = OnlineHasher(HashNet(HashNetConfig(bits=BITS)), LearnSettings(holdout_fraction=0.0), seed=0)
    feed = ShardFeed(root, "t", h, ImageSpec())
    feed.poll()  # the shard opened, empty
    in_worker(path, 'store.write_batch([ItemWrite(f"i{k}", bytes(4), png, "image/png", (k % 3,)) for k in range(10)])')
    feed.poll()
    assert len(feed.pending_at) == 10
    in_worker(path, 'store.write_batch([], deletes=["i1", "i2"])')
    assert feed.poll() == 2
    assert set(feed.pending_at) == {f"i{k}" for k in range(10)} - {"i1", "i2"}
    h.ready()  # folds what was observed into the learner
    assert set(h.learner.pending_ids) == set(feed.pending_at)
    assert len(feed.fetch_images(h.learner.pending_ids)) == 8
    feed.close()
