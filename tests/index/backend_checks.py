"""The check suite every Hamming backend passes, river style: one suite, run against every registered backend.

Each check takes ``factory(d, threads=1)``, which makes an empty index of the backend, and compares
it with :class:`Model`, a brute-force reference (:func:`streamhash.codes.hamming_brute` and a
stable sort). :func:`yield_checks` lists them; ``test_hamming`` runs them against the built-in
backends (the native one under each of its scans), ``test_backend_registry`` against one registered by a test.
"""

from __future__ import annotations

import sys
import threading
from functools import partial

import numpy as np
import pytest

from streamhash.codes import hamming_brute
from streamhash.index import hamming
from streamhash.index.backends import get_backend, make_index
from streamhash.index.hamming import PAD_DISTANCE


def yield_checks():
    for d in [8, 16, 24, 32, 40, 64, 72, 128, 192, 256]:
        yield partial(check_random_vs_brute, d=d)
    for d in [24, 32, 64, 72]:
        yield partial(check_adversarial_ties, d=d)
    for d in [32, 40]:  # one word of 32 bits (tombstones in the narrow scan), one of 64
        yield partial(check_churn_with_compaction, d=d)
    yield from (check_empty_and_k_larger_than_index, check_radius_is_strict, check_overwrite_and_remove_change_tie_order,
                check_update_codes_keeps_places,
                check_threads_split_matches, check_search_while_adding, check_ntotal_never_sees_half_a_write,
                check_reconstruct_batch, check_reconstruct_batch_follows_churn_of_store_like_ids)


def check_id(check) -> str:
    if isinstance(check, partial):
        return check.func.__name__ + "".join(f"[{k}={v}]" for k, v in check.keywords.items())
    return check.__name__


def limit_to(request, kernel: str) -> None:
    """Hold the native scans to ``kernel`` for one test (skipped where the CPU cannot run that scan)."""
    if not hamming.native_available():
        pytest.skip("the native kernel is not built here")
    previous = hamming.limit_kernel(kernel)
    request.addfinalizer(lambda: hamming.limit_kernel(previous))
    for d in (32, 64):
        if not hamming.make_index(d, "native").kernel.startswith(kernel):
            pytest.skip(f"this CPU cannot run the {kernel} scan")


def factory_for(name: str):
    """make_index for a registered backend, skipping one this machine cannot run; ``torch-cpu`` is the
    torch backend on the CPU, which exercises its code where there is no GPU."""
    if name == "torch-cpu":
        cls = get_backend("torch").load()
        return lambda d, threads=1: cls(d, device="cpu")
    if not get_backend(name).load().available():
        pytest.skip(f"backend {name} is not available here")
    return lambda d, threads=1: make_index(d, name, threads)


class Model:
    """The reference: a list of (id, code) in insertion order, ranked by brute force with a stable sort."""

    def __init__(self):
        self.items: dict[int, np.ndarray] = {}  # dict order = insertion order of the latest add

    def add(self, codes, ids):
        for c, i in zip(codes, ids.tolist()):
            self.items.pop(i, None)
            self.items[i] = c

    def update(self, codes, ids):
        """Codes replaced where they stand; returns which ids were there."""
        found = np.array([i in self.items for i in ids.tolist()], bool)
        for c, i in zip(codes[found], ids[found].tolist()):
            self.items[i] = c
        return found

    def remove(self, ids):
        return sum(self.items.pop(i, None) is not None for i in np.unique(ids).tolist())

    def arrays(self, nbytes):
        ids = np.array(list(self.items), np.int64)
        codes = np.array(list(self.items.values()), np.uint8).reshape(-1, nbytes)
        return ids, codes

    def search(self, q, k, nbytes):
        ids, codes = self.arrays(nbytes)
        D = np.full((len(q), k), PAD_DISTANCE, np.int32)
        I = np.full((len(q), k), -1, np.int64)
        if len(ids):
            dist = hamming_brute(q, codes)
            order = np.argsort(dist, axis=1, kind="stable")[:, :k]
            D[:, : order.shape[1]] = np.take_along_axis(dist, order, 1)
            I[:, : order.shape[1]] = ids[order]
        return D, I

    def range_search(self, q, radius, nbytes):
        ids, codes = self.arrays(nbytes)
        out = []
        dist = hamming_brute(q, codes) if len(ids) else np.zeros((len(q), 0), np.int32)
        for row in dist:
            order = np.argsort(row, kind="stable")
            order = order[row[order] < radius]
            out.append((row[order], ids[order]))
        return out


def compare(index, model, q, ks=(1, 5, 64), radii=(0, 1, 3)):
    nbytes = index.code_size
    assert index.ntotal == len(model.items)
    for k in ks:
        D, I = index.search(q, k)
        rD, rI = model.search(q, k, nbytes)
        assert D.dtype == np.int32 and I.dtype == np.int64 and D.shape == I.shape == (len(q), k)
        np.testing.assert_array_equal(D, rD)
        np.testing.assert_array_equal(I, rI)
    for radius in radii:
        lims, D, I = index.range_search(q, radius)
        assert lims.dtype == np.int64 and D.dtype == np.int32 and I.dtype == np.int64
        for j, (rd, ri) in enumerate(model.range_search(q, radius, nbytes)):
            np.testing.assert_array_equal(D[lims[j] : lims[j + 1]], rd)
            np.testing.assert_array_equal(I[lims[j] : lims[j + 1]], ri)


def rand_codes(rng, n, d, density=0.5):
    return np.packbits(rng.random((n, d)) < density, axis=1)


def check_random_vs_brute(factory, d):
    rng = np.random.default_rng(d)
    index, model = factory(d), Model()
    for n in (300, 1, 700):  # several adds: the arrays grow past their initial capacity
        codes, ids = rand_codes(rng, n, d), rng.integers(-(2**62), 2**62, n)
        index.add_with_ids(codes, ids)
        model.add(codes, ids)
    q = np.concatenate([rand_codes(rng, 5, d), index.reconstruct(int(ids[0]))[None]])
    compare(index, model, q, ks=(1, 7, 100, 2000), radii=(0, 1, d // 4, d // 2 + 1, d + 1, d + 50))


def check_adversarial_ties(factory, d):
    rng = np.random.default_rng(0)
    index, model = factory(d), Model()
    # All codes equal: every distance ties, so the answer is pure insertion order.
    same = np.repeat(rand_codes(rng, 1, d), 200, axis=0)
    ids = rng.permutation(10_000)[:200]
    index.add_with_ids(same, ids)
    model.add(same, ids)
    compare(index, model, np.concatenate([same[:1], ~same[:1], rand_codes(rng, 3, d)]), ks=(1, 50, 199, 200, 201))
    # Low-entropy codes: few distinct distances, long runs of ties everywhere.
    sparse = rand_codes(rng, 3000, d, density=0.03)
    ids2 = np.arange(3000) + 20_000
    index.add_with_ids(sparse, ids2)
    model.add(sparse, ids2)
    compare(index, model, rand_codes(rng, 4, d, density=0.03), ks=(1, 10, 333, 3500))


def check_empty_and_k_larger_than_index(factory):
    index, model = factory(64), Model()
    q = np.zeros((2, 8), np.uint8)
    D, I = index.search(q, 3)
    assert (D == PAD_DISTANCE).all() and (I == -1).all()
    lims, D, I = index.range_search(q, 65)
    assert lims.tolist() == [0, 0, 0] and len(D) == len(I) == 0
    codes = np.array([[1] * 8, [0] * 8], np.uint8)
    index.add_with_ids(codes, np.array([5, 6]))
    model.add(codes, np.array([5, 6]))
    D, I = index.search(q, 4)
    assert D.tolist() == [[0, 8, PAD_DISTANCE, PAD_DISTANCE]] * 2 and I.tolist() == [[6, 5, -1, -1]] * 2
    compare(index, model, q)
    with pytest.raises(ValueError):
        index.search(q, 0)


def check_radius_is_strict(factory):
    index = factory(16)
    index.add_with_ids(np.array([[0, 0], [0, 1], [0, 3], [0, 7]], np.uint8), np.arange(4))
    q = np.zeros((1, 2), np.uint8)
    for radius, want in [(0, []), (1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (4, [0, 1, 2, 3])]:
        lims, D, I = index.range_search(q, radius)
        assert I.tolist() == want and D.tolist() == want and lims.tolist() == [0, len(want)]


def check_overwrite_and_remove_change_tie_order(factory):
    index, model = factory(32), Model()
    code = np.zeros((1, 4), np.uint8)
    for i in (1, 2, 3):
        index.add_with_ids(code, np.array([i]))
        model.add(code, np.array([i]))
    q = code
    assert index.search(q, 3)[1].tolist() == [[1, 2, 3]]
    index.add_with_ids(code, np.array([1]))  # re-add: 1 is now the newest
    model.add(code, np.array([1]))
    assert index.search(q, 3)[1].tolist() == [[2, 3, 1]]
    far = np.full((1, 4), 255, np.uint8)
    index.add_with_ids(far, np.array([2]))  # overwrite with a different code
    model.add(far, np.array([2]))
    D, I = index.search(q, 4)
    assert I.tolist() == [[3, 1, 2, -1]] and D.tolist() == [[0, 0, 32, PAD_DISTANCE]]
    np.testing.assert_array_equal(index.reconstruct(2), far[0])
    assert index.remove_ids(np.array([3, 3, 42])) == 1 and model.remove(np.array([3])) == 1
    assert index.ntotal == 2 and 3 not in index
    with pytest.raises(KeyError):
        index.reconstruct(3)
    compare(index, model, np.concatenate([q, far]))
    # Duplicate ids within one batch: the last occurrence wins.
    codes = np.array([[1, 0, 0, 0], [2, 0, 0, 0], [3, 0, 0, 0]], np.uint8)
    index.add_with_ids(codes, np.array([7, 8, 7]))
    model.add(codes, np.array([7, 8, 7]))
    compare(index, model, np.concatenate([q, far, codes]))
    index.reset()
    assert index.ntotal == 0 and index.search(q, 1)[1].tolist() == [[-1]]


def check_update_codes_keeps_places(factory):
    """update_codes replaces codes in place (ties keep the rows' order) through adds, removals and compactions; ids
    not in the index are reported, not added."""
    rng = np.random.default_rng(11)
    index, model = factory(32), Model()
    code = np.zeros((1, 4), np.uint8)
    for i in (1, 2, 3):
        index.add_with_ids(code, np.array([i]))
        model.add(code, np.array([i]))
    found = index.update_codes(np.repeat(code, 2, 0), np.array([1, 9]))
    assert found.tolist() == [True, False] and 9 not in index
    assert index.search(code, 3)[1].tolist() == [[1, 2, 3]]  # 1 kept its place (a re-add would put it last)
    next_id = 4
    for step in range(10):
        n = int(rng.integers(1, 300))
        codes = rand_codes(rng, n, 32, density=0.1)
        ids = np.arange(next_id, next_id + n)
        next_id += n
        index.add_with_ids(codes, ids)
        model.add(codes, ids)
        some = rng.choice(np.array(list(model.items)), min(len(model.items), 120), replace=False)
        new = rand_codes(rng, len(some), 32, density=0.1)
        np.testing.assert_array_equal(index.update_codes(new, some), model.update(new, some))
        gone = rng.choice(np.array(list(model.items)), int(rng.integers(0, 150)))
        assert index.remove_ids(gone) == model.remove(gone)
        compare(index, model, rand_codes(rng, 3, 32, density=0.1), ks=(1, 20, 2000), radii=(3, 6))


def check_churn_with_compaction(factory, d):
    """Interleaved adds, overwrites and removes (tombstones, then compaction) against the model."""
    rng = np.random.default_rng(7)
    index, model = factory(d), Model()
    for step in range(12):
        n = int(rng.integers(1, 400))
        codes = rand_codes(rng, n, d, density=0.2)
        ids = rng.integers(0, 1500, n)  # small id space: many overwrites
        index.add_with_ids(codes, ids)
        model.add(codes, ids)
        gone = rng.integers(0, 1500, int(rng.integers(0, 500)))
        assert index.remove_ids(gone) == model.remove(gone)
        if step % 3 == 0:
            compare(index, model, rand_codes(rng, 3, d, density=0.2), ks=(1, 20, 2000), radii=(4, 9))
    assert index.remove_ids(np.array(list(model.items))) == len(model.items)
    model.items.clear()
    compare(index, model, rand_codes(rng, 2, d))


def check_threads_split_matches(factory):
    rng = np.random.default_rng(3)
    codes = rand_codes(rng, 40_000, 64, density=0.1)
    ids = np.arange(40_000)
    one, many = factory(64), factory(64, threads=2)
    for ix in (one, many):
        ix.add_with_ids(codes, ids)
        ix.remove_ids(ids[::7])
    for nq in (1, 5):
        q = rand_codes(rng, nq, 64, density=0.1)
        for a, b in zip(one.search(q, 50), many.search(q, 50)):
            np.testing.assert_array_equal(a, b)


def check_ntotal_never_sees_half_a_write(factory):
    """ntotal is read without the lock: a reader must still never see a replacement's old rows gone and its new
    ones not yet added (items re-coded under new ids, as the store's seqs are, keep the count constant)."""
    rng = np.random.default_rng(6)
    index = factory(32)
    n = 300
    index.add_with_ids(rand_codes(rng, n, 32), np.arange(n))
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(index.ntotal)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over as often as possible: inside a write, too
    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(200):
            old = np.arange(n) + n * i
            index.add_with_ids(rand_codes(rng, n, 32), old + n, replacing=old)
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(switch)
    assert seen == {n}


def check_search_while_adding(factory):
    """Reader threads search while a writer adds: no errors, every answer well-formed."""
    rng = np.random.default_rng(5)
    index = factory(64)
    index.add_with_ids(rand_codes(rng, 1000, 64), np.arange(1000))
    errors, stop = [], threading.Event()

    def reader():
        q = rand_codes(np.random.default_rng(), 2, 64)
        while not stop.is_set():
            try:
                D, I = index.search(q, 10)
                assert (I >= 0).all() and (np.diff(D, axis=1) >= 0).all()
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(30):
        index.add_with_ids(rand_codes(rng, 500, 64), np.arange(500) + 1000 + 500 * i)
        index.remove_ids(np.arange(50) + 500 * i)
    stop.set()
    for t in threads:
        t.join()
    assert not errors


def check_reconstruct_batch(factory):
    rng = np.random.default_rng(9)
    codes = rand_codes(rng, 12, 24)
    index = factory(24)
    index.add_with_ids(codes[:10], np.arange(10))  # increasing ids: the vectorised lookup
    index.remove_ids([3])
    got, found = index.reconstruct_batch([0, 3, 9, 42, -1])
    assert found.tolist() == [True, False, True, False, False]
    np.testing.assert_array_equal(got[[0, 2]], codes[[0, 9]])
    assert not got[[1, 3, 4]].any()
    index.add_with_ids(codes[10:12], np.array([5, 1]))  # overwrites, out of order: the id -> row multimap
    got, found = index.reconstruct_batch([1, 5, 3, 2])
    assert found.tolist() == [True, True, False, True]
    np.testing.assert_array_equal(got[[0, 1, 3]], codes[[11, 10, 2]])


def check_reconstruct_batch_follows_churn_of_store_like_ids(factory):
    """Increasing ids with gaps (the store's seqs), removals, compaction, then an out-of-order add:
    reconstruct_batch agrees with a plain dict model at every step."""
    rng = np.random.default_rng(5)
    index, model, next_id = factory(24), {}, 1
    for step in range(60):
        n = int(rng.integers(1, 200))
        ids = next_id + np.cumsum(rng.integers(1, 4, n))  # increasing, with gaps
        next_id = int(ids[-1]) + 1
        codes = rng.integers(0, 256, (n, 3), dtype=np.uint8)
        index.add_with_ids(codes, ids)
        model.update(zip(ids.tolist(), map(bytes, codes)))
        if step % 3 == 0 and model:
            gone = rng.choice(list(model), size=min(len(model), int(rng.integers(1, 150))), replace=False)
            index.remove_ids(gone)
            for g in gone.tolist():
                model.pop(g)
        if step == 45:  # an id added again out of order: the fast path must step aside
            old = next(iter(model))
            index.add_with_ids(np.array([[1, 2, 3]], np.uint8), np.array([old]))
            model[old] = bytes([1, 2, 3])
        probe = np.concatenate([np.array(list(model), np.int64), rng.integers(-5, next_id + 50, 300)])
        got, found = index.reconstruct_batch(probe)
        for i, p in enumerate(probe.tolist()):
            assert found[i] == (p in model), (step, p)
            if p in model:
                assert bytes(got[i]) == model[p]
