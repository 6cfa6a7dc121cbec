"""Fencing (issue 25): a shard whose partition was revoked and not assigned back is fenced, never served, then
dropped; assigned back in time, it is never fenced; unfenced, it is served again."""

from __future__ import annotations

import numpy as np

from streamhash.index.sharded import ShardedIndex
from streamhash.index.store import ItemWrite, Store
from streamhash.index.store.restore import set_flags
from streamhash.index.store.root import ShardKey, StoreRoot
from streamhash.services.worker.fencing import Fences


def _root(tmp_path, parts=(0, 1)) -> StoreRoot:
    root = StoreRoot(tmp_path / "index")
    for p in parts:
        s = Store(root.shard_path(ShardKey("t", p)), bits=16, shard=p)
        s.write_batch([ItemWrite(f"i{p}", bytes([0, p]), b"png", "image/png", (p,))])
        s.close()
    return root


def _fenced(root, p) -> bool:
    s = Store(root.shard_path(ShardKey("t", p)), readonly=True)
    try:
        return bool(s.read_meta().get("fenced"))
    finally:
        s.close()


def test_revoked_and_not_assigned_back_is_fenced_then_dropped(tmp_path):
    root, now = _root(tmp_path), [0.0]
    fences = Fences(root, lambda path: Store(path), topic="t", fence_after_s=10, drop_after_s=100,
                    clock=lambda: now[0])
    fences.assigned(ShardKey("t", 0))  # shard 1 was found at start-up and never assigned here
    now[0] = 9.0
    fences.due()
    assert not _fenced(root, 1)
    now[0] = 11.0
    fences.due()
    assert _fenced(root, 1) and not _fenced(root, 0)
    fences.revoked(ShardKey("t", 0))
    now[0] = 15.0
    fences.assigned(ShardKey("t", 0))  # back within the grace period: never fenced
    now[0] = 30.0
    fences.due()
    assert not _fenced(root, 0)
    now[0] = 111.0
    fences.due()
    assert root.shards() == [ShardKey("t", 0)]  # shard 1 dropped from disk


def test_a_shard_held_by_another_worker_is_not_fenced(tmp_path):
    root, now = _root(tmp_path, parts=(0,)), [0.0]
    held = Store(root.shard_path(ShardKey("t", 0)))  # its writer.lock: another worker of this root owns it
    fences = Fences(root, lambda path: Store(path), topic="t", fence_after_s=1, drop_after_s=1, clock=lambda: now[0])
    now[0] = 5.0
    fences.due()
    held.close()
    assert not _fenced(root, 0) and root.shards() == [ShardKey("t", 0)]


def test_the_query_side_never_serves_a_fenced_shard(tmp_path):
    root = _root(tmp_path)
    stores = {p: Store(root.shard_path(ShardKey("t", p))) for p in (0, 1)}
    index = ShardedIndex(root, open_store=lambda key, path: stores[key.partition])
    try:
        def served():
            view = index.view()
            D, S, I = view.search([np.zeros((1, 2), np.uint8)] * len(view), k=4)
            return sorted(r[0] for r in view.resolve(S[0], I[0]) if r)

        assert served() == ["i0", "i1"]
        set_flags(stores[1], fenced=True)
        index.rescan()
        assert served() == ["i0"] and [s.name for s in index.shards] == ["t/0"]
        set_flags(stores[1], fenced=False)  # assigned back and caught up
        index.rescan()
        assert served() == ["i0", "i1"]
    finally:
        index.close()
        for s in stores.values():
            s.close()
