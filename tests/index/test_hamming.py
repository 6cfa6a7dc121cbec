"""Every Hamming backend against brute force (streamhash.codes.hamming_brute) and a reference model."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from streamhash.codes import hamming_brute
from streamhash.index import hamming
from streamhash.index.hamming import PAD_DISTANCE, make_index

torch = pytest.importorskip("torch")
HAVE_CUDA = torch.cuda.is_available()


def _torch_cpu(d, threads=1):
    from streamhash.index.torch_backend import TorchIndex

    return TorchIndex(d, device="cpu")


FACTORIES = {
    "numpy": lambda d, threads=1: make_index(d, "numpy", threads),
    "native": lambda d, threads=1: make_index(d, "native", threads),
    "torch-cpu": _torch_cpu,
}


@pytest.fixture(params=list(FACTORIES))
def factory(request):
    if request.param == "native" and not hamming.native_available():
        pytest.skip("native kernel not built")
    return FACTORIES[request.param]


class Model:
    """The reference: a list of (id, code) in insertion order, ranked by brute force with a stable sort."""

    def __init__(self):
        self.items: dict[int, np.ndarray] = {}  # dict order = insertion order of the latest add

    def add(self, codes, ids):
        for c, i in zip(codes, ids.tolist()):
            self.items.pop(i, None)
            self.items[i] = c

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


def check(index, model, q, ks=(1, 5, 64), radii=(0, 1, 3)):
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


@pytest.mark.parametrize("d", [8, 16, 24, 40, 64, 72, 128, 192, 256])
def test_random_vs_brute(factory, d):
    rng = np.random.default_rng(d)
    index, model = factory(d), Model()
    for n in (300, 1, 700):  # several adds: the arrays grow past their initial capacity
        codes, ids = rand_codes(rng, n, d), rng.integers(-(2**62), 2**62, n)
        index.add_with_ids(codes, ids)
        model.add(codes, ids)
    q = np.concatenate([rand_codes(rng, 5, d), index.reconstruct(int(ids[0]))[None]])
    check(index, model, q, ks=(1, 7, 100, 2000), radii=(0, 1, d // 4, d // 2 + 1, d + 1, d + 50))


@pytest.mark.parametrize("d", [24, 64, 72])
def test_adversarial_ties(factory, d):
    rng = np.random.default_rng(0)
    index, model = factory(d), Model()
    # All codes equal: every distance ties, so the answer is pure insertion order.
    same = np.repeat(rand_codes(rng, 1, d), 200, axis=0)
    ids = rng.permutation(10_000)[:200]
    index.add_with_ids(same, ids)
    model.add(same, ids)
    check(index, model, np.concatenate([same[:1], ~same[:1], rand_codes(rng, 3, d)]), ks=(1, 50, 199, 200, 201))
    # Low-entropy codes: few distinct distances, long runs of ties everywhere.
    sparse = rand_codes(rng, 3000, d, density=0.03)
    ids2 = np.arange(3000) + 20_000
    index.add_with_ids(sparse, ids2)
    model.add(sparse, ids2)
    check(index, model, rand_codes(rng, 4, d, density=0.03), ks=(1, 10, 333, 3500))


def test_empty_and_k_larger_than_index(factory):
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
    check(index, model, q)
    with pytest.raises(ValueError):
        index.search(q, 0)


def test_radius_is_strict(factory):
    index = factory(16)
    index.add_with_ids(np.array([[0, 0], [0, 1], [0, 3], [0, 7]], np.uint8), np.arange(4))
    q = np.zeros((1, 2), np.uint8)
    for radius, want in [(0, []), (1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (4, [0, 1, 2, 3])]:
        lims, D, I = index.range_search(q, radius)
        assert I.tolist() == want and D.tolist() == want and lims.tolist() == [0, len(want)]


def test_overwrite_and_remove_change_tie_order(factory):
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
    check(index, model, np.concatenate([q, far]))
    # Duplicate ids within one batch: the last occurrence wins.
    codes = np.array([[1, 0, 0, 0], [2, 0, 0, 0], [3, 0, 0, 0]], np.uint8)
    index.add_with_ids(codes, np.array([7, 8, 7]))
    model.add(codes, np.array([7, 8, 7]))
    check(index, model, np.concatenate([q, far, codes]))
    index.reset()
    assert index.ntotal == 0 and index.search(q, 1)[1].tolist() == [[-1]]


def test_churn_with_compaction(factory):
    """Interleaved adds, overwrites and removes (tombstones, then compaction) against the model."""
    rng = np.random.default_rng(7)
    d = 40
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
            check(index, model, rand_codes(rng, 3, d, density=0.2), ks=(1, 20, 2000), radii=(4, 9))
    assert index.remove_ids(np.array(list(model.items))) == len(model.items)
    model.items.clear()
    check(index, model, rand_codes(rng, 2, d))


def test_threads_split_matches(factory):
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


def test_search_while_adding(factory):
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


def test_validation():
    with pytest.raises(ValueError):
        make_index(12)
    with pytest.raises(ValueError):
        make_index(64, backend="faiss")
    index = make_index(64, "numpy")
    with pytest.raises(ValueError):
        index.add_with_ids(np.zeros((2, 4), np.uint8), np.arange(2))
    with pytest.raises(ValueError):
        index.add_with_ids(np.zeros((2, 8), np.uint8), np.arange(3))
    with pytest.raises(ValueError):
        index.search(np.zeros((1, 8), np.int64), 1)


def test_auto_backend():
    want = "native" if hamming.native_available() else "numpy"
    assert make_index(64).backend == want


@pytest.mark.skipif(HAVE_CUDA, reason="checks the error raised without CUDA")
def test_torch_backend_without_cuda_raises():
    with pytest.raises(RuntimeError, match="CUDA"):
        make_index(64, backend="torch")


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="needs CUDA")
def test_torch_cuda_matches_brute():
    rng = np.random.default_rng(11)
    index, model = make_index(72, backend="torch"), Model()
    codes, ids = rand_codes(rng, 5000, 72, density=0.2), rng.permutation(10**6)[:5000]
    index.add_with_ids(codes, ids)
    model.add(codes, ids)
    index.remove_ids(ids[::3])
    model.remove(ids[::3])
    check(index, model, rand_codes(rng, 9, 72, density=0.2), ks=(1, 10, 4000), radii=(3, 9))


def test_reconstruct_batch(factory):
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


@pytest.mark.parametrize("backend", ["numpy"] + (["native"] if hamming.native_available() else []))
def test_reconstruct_batch_follows_churn_of_store_like_ids(backend):
    """Increasing ids with gaps (the store's seqs), removals, compaction, then an out-of-order add:
    reconstruct_batch agrees with a plain dict model at every step."""
    rng = np.random.default_rng(5)
    index, model, next_id = make_index(24, backend=backend), {}, 1
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


def test_int64_multimap_matches_a_dict_of_lists():
    """Adds (repeated keys), removals and value remaps, across several folds of the small run into
    the large one (> 4096 pairs), against a plain Python model."""
    rng = np.random.default_rng(11)
    mm, model, next_v = hamming.Int64Multimap(), {}, 0
    for step in range(40):
        keys = rng.integers(-300, 300, int(rng.integers(1, 400)))
        vals = np.arange(next_v, next_v + len(keys))
        next_v += len(keys)
        mm.add(keys, vals)
        for k, v in zip(keys.tolist(), vals.tolist()):
            model.setdefault(k, set()).add(v)
        if step % 4 == 1:  # remove some present pairs and some absent ones
            pairs = [(k, v) for k, vs in model.items() for v in vs]
            pick = rng.choice(len(pairs), size=min(len(pairs), 150), replace=False)
            rk = np.array([pairs[i][0] for i in pick] + [5000], np.int64)
            rv = np.array([pairs[i][1] for i in pick] + [1], np.int64)
            assert mm.remove(rk, rv) == len(pick)
            for i in pick:
                model[pairs[i][0]].discard(pairs[i][1])
        if step == 30:  # a compaction-like renumbering of the values
            new_of_old = rng.permutation(next_v)
            mm.remap_values(new_of_old)
            model = {k: {int(new_of_old[v]) for v in vs} for k, vs in model.items()}
        probe = np.unique(rng.integers(-310, 310, 200))
        which, vals = mm.find(probe)
        got = {}
        for w, v in zip(which.tolist(), vals.tolist()):
            got.setdefault(int(probe[w]), []).append(v)
        for k in set(probe.tolist()):
            assert sorted(got.get(k, [])) == sorted(model.get(k, ())), (step, k)
        assert len(mm) == sum(len(vs) for vs in model.values())
    with pytest.raises(ValueError):
        mm.add(np.array([1]), np.array([-1]))
