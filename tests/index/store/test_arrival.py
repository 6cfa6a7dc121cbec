"""Arrival order: a learned code keeps its item's place in ``changes`` and is logged in ``recodes``; a follower that
reads both from any seq, in chunks of any size, ends where a snapshot of the store is (issue 24's tie order)."""

import numpy as np
import pytest

from streamhash.index.store import Store
from tests.index.store.support import items


def raw_log(store, name: str) -> dict[int, str]:
    with store.env.begin() as txn:
        return {int.from_bytes(k, "big"): v.decode() for k, v in txn.cursor(db=store.db[name])}


def test_a_learned_code_keeps_its_item_in_place_and_a_resent_item_moves_to_the_end(tmp_path):
    s = Store(tmp_path, bits=32)
    s.write_batch(items(4))  # arrivals 1-4
    s.put_codes(["id1"], np.full((1, 4), 5, np.uint8))  # seq 5
    s.put_codes(["id1", "id2"], np.full((2, 4), 6, np.uint8))  # seqs 6, 7: id1's entry at 5 goes
    snap = s.snapshot()
    assert snap.ids == ["id0", "id1", "id2", "id3"] and snap.arrivals.tolist() == [1, 2, 3, 4]
    assert snap.seqs.tolist() == [1, 6, 7, 4] and snap.learned.tolist() == [False, True, True, False]
    assert raw_log(s, "changes") == {1: "id0", 2: "id1", 3: "id2", 4: "id3"}
    assert raw_log(s, "recodes") == {6: "id1", 7: "id2"}
    changes = s.changes_since(4)[2]
    assert [(c.seq, c.id, c.arrival, c.ts) for c in changes] == [(6, "id1", 2, None), (7, "id2", 3, None)]
    assert s.items_at([2, 6]) == [("id1", (1,)), None]  # the in-memory index's ids are arrivals
    s.write_batch(items(2, seed=3)[1:])  # id1 sent again: a new arrival (8), its learned code gone with the old image
    s.write_batch([], deletes=["id2"])  # seq 9
    assert raw_log(s, "changes") == {1: "id0", 4: "id3", 8: "id1"} and raw_log(s, "recodes") == {}
    assert [c.id for c in s.changes_since(7)[2]] == ["id1", "id2"] and s.changes_since(7)[2][1].deleted
    assert s.snapshot().ids == ["id0", "id3", "id1"] and s.items_at([2]) == [None]


def follow(store, limit: int) -> tuple[dict[int, tuple[str, bytes]], int]:
    """What a follower holds after reading the store from seq 0 ``limit`` changes at a time: arrival -> (id, code)."""
    held, at, by_id = {}, 0, {}
    while True:
        _, _, changes = store.changes_since(at, limit)
        if not changes:
            return held, at
        for c in changes:
            if c.deleted:
                held.pop(by_id.pop(c.id, None), None)
            elif c.arrived is None:  # an arrival: a re-sent id replaces what it had
                held.pop(by_id.get(c.id), None)
                held[c.seq], by_id[c.id] = (c.id, c.code), c.seq
            else:
                assert held[c.arrived][0] == c.id, "a learned code came before its item's arrival"
                held[c.arrived] = (c.id, c.code)
        at = changes[-1].seq


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 1000])
def test_a_follower_reading_in_chunks_of_any_size_ends_at_the_snapshot(tmp_path, limit):
    """Random arrivals, re-sent ids, learned codes and removals; the follower's final state against the snapshot's,
    and every learned code read after its item's arrival."""
    rng = np.random.default_rng(limit)
    s = Store(tmp_path, bits=32)
    pool = [f"x{i}" for i in range(40)]
    for step in range(30):
        op = rng.integers(0, 3)
        some = list(rng.choice(pool, int(rng.integers(1, 6)), replace=False))
        if op == 0:
            batch = items(40, prefix="x", seed=step)
            s.write_batch([batch[int(i[1:])] for i in some])
        elif op == 1:
            s.put_codes(some, rng.integers(0, 256, (len(some), 4), dtype=np.uint8))
        else:
            s.write_batch([], deletes=some)
    held, at = follow(s, limit)
    snap = s.snapshot()
    assert sorted(held) == snap.arrivals.tolist()
    assert [held[a] for a in snap.arrivals.tolist()] == [(i, c.tobytes()) for i, c in zip(snap.ids, snap.codes)]
    assert at >= int(snap.seqs.max(initial=0))


def test_a_read_cut_between_the_two_logs_leaves_the_rest_for_the_next(tmp_path):
    """Two arrivals and two learned codes after seq 10, then a removal: three at a time, the removal must wait for the
    learned code it comes after (a follower goes on from the last seq it gets)."""
    s = Store(tmp_path, bits=32)
    s.write_batch(items(10))
    s.write_batch(items(2, prefix="y"))  # 11, 12
    s.put_codes(["id0", "id1"], np.zeros((2, 4), np.uint8))  # 13, 14
    s.write_batch([], deletes=["id2"])  # 15
    first = s.changes_since(10, 3)[2]
    assert [(c.seq, c.deleted) for c in first] == [(11, False), (12, False), (13, False)]
    assert [(c.seq, c.deleted) for c in s.changes_since(13, 3)[2]] == [(14, False), (15, True)]


def test_a_restore_keeps_arrival_order_and_applies_updates_by_timestamp(tmp_path):
    """The changelog as the worker writes it now: states where items arrived, learned codes and quarantine marks as
    updates after them. A restored shard holds the items in arrival order (a learned one keeps its place), and a run
    replayed into it changes nothing."""
    from streamhash.index.store.restore import apply_changelog
    from streamhash.kafka import changelog as cl

    def state(k: int) -> cl.ItemState:
        return cl.ItemState(f"id{k}", bytes([k] * 4), b"blob", "image/png", (k,), 100.0 + k, model=1)

    s = Store(tmp_path, bits=32)
    assert apply_changelog(s, [state(0), state(1), state(2)], {})["written"] == 3
    run = [state(3), cl.Updated("id1", 101.0, "learned", bytes([9] * 4), 2), cl.Updated("id2", 102.0, "quarantine"),
           cl.Updated("id0", 555.0, "learned", bytes([8] * 4), 2)]  # id0's names another image: stale
    got = apply_changelog(s, run, {})
    assert (got["written"], got["updated"], got["stale"]) == (1, 2, 1)
    snap = s.snapshot()
    assert snap.ids == ["id0", "id1", "id2", "id3"] and snap.learned.tolist() == [False, True, False, False]
    rec = s.get_item("id1")
    assert rec["code"] == bytes([9] * 4) and rec["learned_by"] == 2 and s.get_item("id2")["quarantined"]
    assert raw_log(s, "recodes") == {5: "id1"}  # after arrivals 1-4
    seq = s.read_meta()["next_seq"]
    again = apply_changelog(s, run, {})
    assert (again["unchanged"], again["updated"], s.read_meta()["next_seq"]) == (3, 0, seq)
