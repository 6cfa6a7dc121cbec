import numpy as np
import pytest
import torch
from pydantic import ValidationError

from streamhash.codes import unpack_signs
from streamhash.learn.dihn import DIHNLearner, dcc_update, relearn_mode
from streamhash.learn.mi import mi_quality
from streamhash.learn.online import OnlineHasher, in_holdout
from streamhash.config import LearnSettings
from streamhash.model.hashnet import HashNet, HashNetConfig

PATTERNS = np.random.default_rng(123).integers(0, 256, (10, 28, 28))


def synth(n, classes, seed):
    """Class-specific random patterns plus noise: learnable, no dataset needed."""
    rng = np.random.default_rng(seed)
    y = rng.choice(classes, n)
    x = np.clip(PATTERNS[y] * 0.6 + rng.normal(0, 40, (n, 28, 28)) + 50, 0, 255).astype(np.uint8)
    return x, y


def learner(bits=16, seed=0, **kw):
    kw = {"omega": 200, "iters": 2, "epochs": 1, "batch_size": 50, **kw}
    return DIHNLearner(HashNet(HashNetConfig(bits=bits, seed=seed)), seed=seed, **kw)


def dcc_objective(B_all, U, S, c, gamma, new_rows, omega_rows):
    obj = ((c * S - U @ B_all.t()) ** 2).sum()
    for i, r in enumerate(omega_rows):
        if r in new_rows:
            obj += gamma * ((U[i] - B_all[r]) ** 2).sum()
    return obj.item()


def test_dcc_never_increases_the_b_objective():
    g = torch.Generator().manual_seed(0)
    c, n, m, gamma = 12, 30, 10, 5.0
    labels = torch.randint(0, 4, (n,), generator=g)
    omega_rows = list(range(0, n, 3))[:m]
    new_rows = list(range(15, n))
    S = torch.where(labels[omega_rows][:, None] == labels[None, :], 1.0, -0.4).double()
    U = torch.tanh(torch.randn(m, c, generator=g)).double()
    B = torch.randint(0, 2, (n, c), generator=g).double() * 2 - 1
    ubar = torch.zeros(len(new_rows), c, dtype=torch.float64)
    for i, r in enumerate(omega_rows):
        if r in new_rows:
            ubar[new_rows.index(r)] = U[i]
    Q = c * S[:, new_rows].t() @ U + gamma * ubar
    before = dcc_objective(B, U, S, c, gamma, new_rows, omega_rows)
    old = B[:15].clone()
    for _ in range(4):
        B[new_rows] = dcc_update(B[new_rows], Q, U).double()
        after = dcc_objective(B, U, S, c, gamma, new_rows, omega_rows)
        assert after <= before + 1e-9
        before = after
    assert torch.equal(B[:15], old)
    assert set(B.unique().tolist()) <= {-1.0, 1.0}


def test_learner_dcc_step_decreases_dense_objective():
    """The grouped (label-set) statistics the learner uses give the same B-step as the dense problem."""
    x, y = synth(120, [0, 1, 2], 0)
    L = learner(bits=8, omega=40)
    net_codes = L.encode(x)
    L.add_items(list(range(60)), net_codes[:60], y[:60], frozen=True)
    L.add_items(list(range(60, 120)), net_codes[60:], y[60:], frozen=False)
    omega_rows = L._sample_omega()
    stats = L._group_stats(omega_rows)
    from streamhash.model.hashnet import images_to_tensor
    U = L._embed(images_to_tensor(x[omega_rows], L.net.cfg))
    S = torch.where(torch.from_numpy(y[omega_rows][:, None] == y[None, :]), 1.0, stats["s_neg"]).double()
    new_rows = list(range(60, 120))
    B0 = torch.from_numpy(L._pm1(np.arange(120)).astype(np.float64))
    before = dcc_objective(B0, U, S, 8, L.gamma, new_rows, omega_rows.tolist())
    L._dcc(np.arange(60, 120), omega_rows, U, stats)
    B1 = torch.from_numpy(L._pm1(np.arange(120)).astype(np.float64))
    assert dcc_objective(B1, U, S, 8, L.gamma, new_rows, omega_rows.tolist()) <= before + 1e-9
    assert torch.equal(B0[:60], B1[:60])
    # and the same as the dense update
    ubar = torch.zeros(60, 8, dtype=torch.float64)
    for i, r in enumerate(omega_rows):
        if r >= 60:
            ubar[r - 60] = U[i]
    Q = 8 * S[:, 60:].t() @ U + L.gamma * ubar
    torch.testing.assert_close(dcc_update(B0[60:], Q, U).double(), B1[60:])


def test_old_codes_bit_identical_and_learning_helps():
    torch.set_num_threads(2)
    L = learner(bits=16, relearn="never")  # plain DIHN: new labels arrive below, and old codes stay as learned
    x1, y1 = synth(300, [0, 1, 2, 3], 1)
    r1 = L.learn_many(x1, y1)
    assert r1.ids == list(range(300)) and L.n_pending == 0
    snapshot = L.codes().copy()
    x2, y2 = synth(200, [4, 5, 6], 2)
    r2 = L.learn_many(x2, y2)
    np.testing.assert_array_equal(L.codes()[:300], snapshot)
    x3, y3 = synth(100, [0, 7], 3)
    L.learn_many(x3, y3)
    np.testing.assert_array_equal(L.codes()[:300], snapshot)
    np.testing.assert_array_equal(L.codes(r2.ids), r2.codes)
    allx, ally = np.concatenate([x1, x2, x3]), np.concatenate([y1, y2, y3])
    q_learned = mi_quality(L.codes(), ally, 16)
    fresh = HashNet(HashNetConfig(bits=16, seed=0))
    assert q_learned > mi_quality(fresh.encode(allx), ally, 16) + 0.05


def test_deterministic_and_save_load(tmp_path):
    x, y = synth(200, [0, 1, 2], 4)
    a, b = learner(seed=3), learner(seed=3)
    ra, rb = a.learn_many(x, y), b.learn_many(x, y)
    np.testing.assert_array_equal(ra.codes, rb.codes)
    assert a.net.to_bytes() == b.net.to_bytes()
    a.save(tmp_path / "l.pt")
    c = DIHNLearner.load(tmp_path / "l.pt")
    np.testing.assert_array_equal(c.codes(), a.codes())
    x2, y2 = synth(100, [3], 5)
    c._cache = dict(a._cache)
    np.testing.assert_array_equal(a.learn_many(x2, y2).codes, c.learn_many(x2, y2).codes)
    np.testing.assert_array_equal(a.encode(x2), c.encode(x2))


def test_unlabeled_items_never_enter_the_loss():
    x, y = synth(200, [0, 1], 6)
    L = learner(omega=1000)
    codes = L.encode(x)
    L.add_items(list(range(100)), codes[:100], y[:100], frozen=False)
    L.add_items([f"u{i}" for i in range(100)], codes[100:], [None] * 100, frozen=False)
    asked = []

    def fetch(ids):
        asked.extend(ids)
        return np.stack([x[i] if isinstance(i, int) else x[100 + int(i[1:])] for i in ids])

    res = L.learn_round(fetch)
    assert asked and not any(isinstance(i, str) for i in asked)
    assert not any(isinstance(i, str) for i in res.ids)
    np.testing.assert_array_equal(L.codes([f"u{i}" for i in range(100)]), codes[100:])


def test_multilabel_and_pm1_codes_and_reencode():
    x, y = synth(120, [0, 1, 2], 7)
    L = learner(bits=8)
    pm1 = unpack_signs(L.encode(x), 8)
    labels = [{int(a), 9} if i % 5 == 0 else [int(a)] for i, a in enumerate(y)]
    L.add_items(range(120), pm1, labels, frozen=False)
    L.learn_round(lambda ids: x[np.asarray(ids)])
    ids, codes = L.reencode(lambda ids: x[np.asarray(ids)])
    np.testing.assert_array_equal(codes, L.encode(x))
    np.testing.assert_array_equal(L.codes(), codes)


def test_online_hasher_round_and_trigger():
    x, y = synth(300, [0, 1, 2, 3], 8)
    net = HashNet(HashNetConfig(bits=16, seed=0))
    h = OnlineHasher(net, LearnSettings(round_every=100, omega=200, epochs=1, reservoir_size=50), iters=1)
    fetch = lambda ids: x[np.asarray(ids)]  # noqa: E731
    h.observe(range(150), net.encode(x[:150]), y[:150])
    assert h.ready()
    rep = h.learn_round(fetch)
    held = in_holdout(range(150), h.settings.holdout_fraction)
    assert 0 < held.sum() < 40  # the default hold-out: ~10% of the labeled items, learned, never trained on
    # stratified: 25 slots for the learned items, the hold-out's 8 in a stratum of their own
    assert sorted(rep.round.ids) == list(range(150)) and (len(h.reservoir), len(h.inferred_reservoir)) == (25, held.sum())
    assert rep.cost == 0 and not rep.reencode  # every code learned: nothing to re-encode
    assert rep.gain == pytest.approx(rep.mi_candidate - rep.mi_live)


def test_group_stats_equal_the_dense_similarity_block(monkeypatch):
    """SB, s2 and B^T B from label-set groups, accumulated a few rows at a time, equal the dense
    Omega x Gamma computation; label values (10**20 among them) only name labels."""
    monkeypatch.setattr(DIHNLearner, "_STATS_CHUNK", 7)
    rng = np.random.default_rng(0)
    L = learner(bits=16, omega=30)
    vocab = [0, 3, 10**8, 10**20]
    sets = [set(rng.choice(vocab, int(rng.integers(1, 3)), replace=False).tolist()) for _ in range(90)]
    labels = [s if i % 9 else None for i, s in enumerate(sets)]  # some unlabeled: not in Gamma
    codes = rng.integers(0, 256, (90, 2), dtype=np.uint8)
    L.add_items([f"img-{i}" for i in range(90)], codes, labels, frozen=False)
    omega = L._sample_omega()
    st = L._group_stats(omega)
    gamma = [i for i in range(90) if labels[i] is not None]
    B = unpack_signs(codes[gamma], 16).astype(np.float64)
    inter = np.array([[bool(sets[i] & sets[j]) for j in gamma] for i in omega])
    S = np.where(inter, 1.0, st["s_neg"])
    g = torch.from_numpy(L._group[omega].astype(np.int64))
    np.testing.assert_allclose(st["SB"][g].numpy(), S @ B, rtol=1e-6, atol=1e-4)  # float32 sums of a soft s_neg
    np.testing.assert_allclose(st["s2"][g].numpy(), (S**2).sum(1), rtol=1e-6)
    np.testing.assert_array_equal(st["BtB"].numpy(), B.T @ B)
    assert st["n"] == len(gamma)


def test_huge_label_values_cost_what_small_ones_do():
    """A round with labels 10**8 and 10**20 gives exactly the round with labels 1 and 3 (the hot
    matrix has one column per label that occurs, not one per value up to the largest)."""
    x, y = synth(150, [0, 1], 10)
    fetch = lambda ids: x[np.asarray(ids)]  # noqa: E731
    results = []
    for big in (False, True):
        L = learner(bits=16)
        names = {0: 10**8, 1: 99999999999999999999} if big else {0: 1, 1: 3}
        L.add_items(range(150), L.encode(x), [names[int(a)] for a in y], frozen=False)
        results.append(L.learn_round(fetch))
    np.testing.assert_array_equal(results[0].codes, results[1].codes)
    assert results[0].loss == results[1].loss


def test_packed_bookkeeping_ids_and_overwrites_match_a_dict_model(monkeypatch):
    """int and str ids side by side, re-sent ids (also twice in one batch), +-1 and packed codes;
    with every id hash colliding the byte comparison still keeps ids apart."""
    import streamhash.learn.items as items

    for collide in (False, True):
        if collide:
            monkeypatch.setattr(items, "_hashes", lambda keys: np.zeros(len(keys), np.int64))
        rng = np.random.default_rng(1)
        L, model = learner(bits=16), {}
        pool = [*range(40), *(str(i) for i in range(40)), *(f"img-{i}" for i in range(40))]
        for step in range(8):
            ids = [pool[i] for i in rng.integers(0, len(pool), 30)]
            codes = rng.integers(0, 256, (30, 2), dtype=np.uint8)
            labels = [int(v) if v < 4 else None for v in rng.integers(0, 6, 30)]
            frozen = bool(step % 2)
            L.add_items(ids, codes if step % 3 else unpack_signs(codes, 16), labels, frozen=frozen)
            for i, c, lab in zip(ids, codes, labels):
                model[i] = (c, frozen or lab is None)  # a new id goes last; a re-sent one keeps its row
        assert L.ids == list(model) and L.n_items == len(model)
        np.testing.assert_array_equal(L.codes(list(model)), np.array([c for c, _ in model.values()]))
        assert set(L.pending_ids) == {i for i, (_, fz) in model.items() if not fz}
        assert L.n_pending == len(L.pending_ids)
        with pytest.raises(KeyError):
            L.codes(["nope"])
        with pytest.raises(TypeError):
            L.add_items([1.5], codes[:1])


def test_bookkeeping_holds_at_most_64_bytes_an_item_beyond_the_code():
    """What the worker's learner grows by per stored item, traced (numpy arrays included)."""
    import gc
    import tracemalloc

    n, bits = 30_000, 32  # just under a power of two: capacity doubling adds little
    L = learner(bits=bits)
    rng = np.random.default_rng(2)
    batches = [([f"img-{i:07d}" for i in range(a, a + 256)], rng.integers(0, 256, (256, bits // 8), dtype=np.uint8),
                [int(v) for v in rng.integers(0, 20, 256)]) for a in range(0, n, 256)]
    L.add_items(["warm-up"], batches[0][1][:1], [0])  # first-use imports and caches are not per item
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for ids, codes, labels in batches:
        L.add_items(ids, codes, labels, frozen=False)
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert L.n_items == len(batches) * 256 + 1
    assert grown / L.n_items - bits // 8 <= 64, grown / L.n_items


def test_online_hasher_ready_folds_unlabeled_items_into_the_learner():
    net = HashNet(HashNetConfig(bits=16, seed=0))
    h = OnlineHasher(net, LearnSettings(round_every=10, holdout_fraction=0.0))
    h.observe([f"u{i}" for i in range(50)], np.zeros((50, 2), np.uint8), None)
    assert not h.ready()  # unlabeled items never make a round due ...
    assert h._buffer == [] and h.learner.n_items == 50  # ... but leave the per-item buffer
    h.observe(["a", "b"], np.zeros((2, 2), np.uint8), [1, 2])
    assert h.n_pending == 2 and not h.ready() and h.learner.n_pending == 2


def test_quarantined_items_keep_their_codes_and_leave_learning():
    x, y = synth(120, [0, 1, 2], 12)
    net = HashNet(HashNetConfig(bits=16, seed=0))
    h = OnlineHasher(net, LearnSettings(round_every=10, omega=100, epochs=1, holdout_fraction=0.0), iters=1)
    codes = net.encode(x)
    h.observe(range(60), codes[:60], y[:60], frozen=True)
    h.observe(range(60, 120), codes[60:], y[60:])
    assert h.quarantine_pending() == list(range(60, 120)) and h.n_pending == 0
    np.testing.assert_array_equal(h.learner.codes(), codes)
    h.observe(range(120, 130), codes[:10], y[:10])
    h.ready()  # folds them in
    asked = []
    res = h.learner.learn_round(lambda ids: asked.extend(ids) or x[np.asarray(ids) % 120])
    assert res.ids == list(range(120, 130))
    assert asked and not set(asked) & set(range(60, 120))  # not in Omega either


def test_dihn_learner_is_an_incremental_hasher_and_another_one_plugs_in():
    from streamhash.learn.base import IncrementalHasher

    net = HashNet(HashNetConfig(bits=16))
    dihn = DIHNLearner(net)
    assert isinstance(dihn, IncrementalHasher)
    hasher = OnlineHasher(net, LearnSettings(round_every=1), learner=dihn)
    assert hasher.learner is dihn


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_round_is_due_by_count_or_by_the_age_of_the_oldest_labeled_item():
    clock = FakeClock()
    net = HashNet(HashNetConfig(bits=16, seed=0))
    h = OnlineHasher(net, LearnSettings(round_every=10, round_max_age_s=60, round_min_items=2, holdout_fraction=0.0),
                     clock=clock)
    h.observe(["u0", "u1"], np.zeros((2, 2), np.uint8), None)
    clock.t += 100
    assert not h.ready() and h.oldest_pending_age() is None  # unlabeled items never wait for a round
    h.observe(["a"], np.zeros((1, 2), np.uint8), [1])
    clock.t += 30
    h.observe(["b"], np.zeros((1, 2), np.uint8), [2])
    assert h.oldest_pending_age() == 30 and not h.ready()
    clock.t += 29
    assert not h.ready()
    clock.t += 1
    assert h.ready()  # "a" waited 60 s: two items are enough
    clock.t += 5
    x, _ = synth(2, [1, 2], 0)
    report = h.learn_round(lambda ids: x[: len(ids)])
    assert report.round.ids == ["a", "b"]
    np.testing.assert_array_equal(clock() - report.arrivals, [65, 35])
    assert h.oldest_pending_age() is None and not h.ready()
    h.observe([f"c{i}" for i in range(10)], np.zeros((10, 2), np.uint8), list(range(10)))
    assert h.ready()  # round_every still triggers at once
    lone = OnlineHasher(net, LearnSettings(round_every=10, round_max_age_s=60, round_min_items=2), clock=clock)
    lone.observe(["z"], np.zeros((1, 2), np.uint8), [1])
    clock.t += 600
    assert not lone.ready()  # fewer than round_min_items: it waits for company or for round_every
    off = OnlineHasher(net, LearnSettings(round_every=10, round_max_age_s=0), clock=clock)
    off.observe(["a", "b"], np.zeros((2, 2), np.uint8), [1, 2])
    clock.t += 10**6
    assert not off.ready()


def test_cannot_learn_after_a_rounds_worth_of_unlabeled_items_or_of_time():
    clock = FakeClock()
    net = HashNet(HashNetConfig(bits=16, seed=0))
    h = OnlineHasher(net, LearnSettings(round_every=100, round_max_age_s=60), clock=clock)
    assert not h.cannot_learn()  # nothing seen yet: nothing to say
    h.observe([f"u{i}" for i in range(10)], np.zeros((10, 2), np.uint8), None)
    assert not h.cannot_learn()
    clock.t += 60
    assert h.cannot_learn()
    h.observe(["a"], np.zeros((1, 2), np.uint8), [1])
    assert not h.cannot_learn()
    by_count = OnlineHasher(net, LearnSettings(round_every=100, round_max_age_s=0), clock=clock)
    by_count.observe([f"u{i}" for i in range(99)], np.zeros((99, 2), np.uint8), None)
    assert not by_count.cannot_learn()
    by_count.observe(["u99"], np.zeros((1, 2), np.uint8), None)
    assert by_count.cannot_learn()


def test_apply_reencode_leaves_items_observed_since_the_round_pending_with_their_new_code():
    net = HashNet(HashNetConfig(bits=16, seed=0))
    h = OnlineHasher(net, LearnSettings(round_every=1000))
    h.observe(["old", "u"], np.zeros((2, 2), np.uint8), [1, None], frozen=True)
    h.ready()  # drained: the learner holds them
    h.observe(["new"], np.zeros((1, 2), np.uint8), [2])  # observed after the round, still buffered
    h.apply_reencode(["u", "new", "stored-not-observed"], np.array([[1, 1], [2, 2], [3, 3]], np.uint8))
    assert h.n_pending == 1 and h.ready() is False and h.learner.pending_ids == ["new"]
    np.testing.assert_array_equal(h.learner.codes(["old", "u", "new"]), [[0, 0], [1, 1], [2, 2]])


def test_online_hasher_holds_at_most_64_bytes_an_item_beyond_the_code_while_items_wait():
    """The arrival bookkeeping of the age trigger is per observed batch, never per item."""
    import gc
    import tracemalloc

    n, bits = 30_000, 32
    net = HashNet(HashNetConfig(bits=bits, seed=0))
    h = OnlineHasher(net, LearnSettings(round_every=10**9, reservoir_size=10))
    rng = np.random.default_rng(2)
    batches = [([f"img-{i:07d}" for i in range(a, a + 256)], rng.integers(0, 256, (256, bits // 8), dtype=np.uint8),
                [int(v) for v in rng.integers(0, 20, 256)]) for a in range(0, n, 256)]
    h.observe(["warm-up"], batches[0][1][:1], [0])
    h.ready()
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for ids, codes, labels in batches:
        h.observe(ids, codes, labels)
        h.ready()
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert h.n_pending == len(batches) * 256 + 1 and h.oldest_pending_age() is not None
    assert grown / h.learner.n_items - bits // 8 <= 64, grown / h.learner.n_items


def test_relearn_rewrites_old_codes_by_dcc_and_returns_only_the_ones_that_moved():
    """relearn: every labeled code is in the B-step (a code rewrite, no image read for it beyond Omega); the
    round returns its new items and the old ones whose code changed, and those are what the learner holds."""
    torch.set_num_threads(2)
    L = learner(bits=16, relearn=True, fresh_optimizer=False)  # this scenario moves old codes with Adam carried over
    x1, y1 = synth(200, [0, 1], 1)
    L.learn_many(x1, y1)
    before = L.codes().copy()
    x2, y2 = synth(200, [2, 3, 4, 5, 6, 7], 2)  # six new classes: two codes no longer separate the old ones
    r2 = L.learn_many(x2, y2)
    moved = np.flatnonzero((L.codes()[:200] != before).any(axis=1))
    assert len(moved) > 0 and L.n_pending == 0
    assert sorted(r2.ids) == sorted(list(range(200, 400)) + moved.tolist())
    np.testing.assert_array_equal(L.codes(r2.ids), r2.codes)
    assert r2.changed <= 200  # counted over the new items, as without relearn


@pytest.mark.parametrize("relearn", ["never", "new-labels", "always"])
def test_learn_settings_relearn_reaches_the_rounds_of_the_learner_process(relearn):
    """LearnSettings.relearn (the learner process's and the eval's setting): old items whose codes moved come back
    from a round that brings new labels unless it is "never"; from a round of known labels only when "always"."""
    torch.set_num_threads(2)
    x1, y1 = synth(200, [0, 1], 1)
    x2, y2 = synth(200, [2, 3, 4, 5, 6, 7], 2)  # new labels
    x3, y3 = synth(200, [0, 1, 2, 3, 4, 5, 6, 7], 3)  # known labels only
    x, y = np.concatenate([x1, x2, x3]), np.concatenate([y1, y2, y3])
    net = HashNet(HashNetConfig(bits=16, seed=0))
    s = LearnSettings(omega=200, epochs=1, iters=2, batch_size=50, holdout_fraction=0.0, relearn=relearn,
                      fresh_optimizer=False)
    h = OnlineHasher(net, s)
    fetch = lambda ids: x[np.asarray(ids)]  # noqa: E731
    moved = []
    for start in (0, 200, 400):
        h.observe(range(start, start + 200), h.learner.encode(x[start:start + 200]), y[start:start + 200])
        moved.append(any(i < start for i in h.learn_round(fetch, test=False).round.ids))
    assert moved == [False, relearn != "never", relearn == "always"]


def test_relearn_modes_and_old_learner_states():
    assert [relearn_mode(v) for v in (True, False, "new-labels")] == ["always", "never", "new-labels"]
    with pytest.raises(ValueError, match="relearn must be one of"):
        relearn_mode("sometimes")
    with pytest.raises(ValidationError):
        LearnSettings(relearn="sometimes")


def test_a_round_until_a_budget_stops_between_alternations():
    L = learner(bits=16)
    x, y = synth(100, [0, 1], 1)
    L.add_items(list(range(100)), L.encode(x), y, frozen=False)
    calls = []
    r = L.learn_round(lambda ids: x[np.asarray(ids)], iters=50, until=lambda: calls.append(1) or len(calls) >= 3)
    assert r.iterations == 3 and L.n_pending == 0


def test_a_fresh_optimizer_starts_each_round_without_the_last_rounds_moments():
    """fresh_optimizer: Adam's state after round 2 holds round 2's steps only (the default carries round 1's);
    the flag survives a save and load."""
    steps = {}
    for fresh in (True, False):
        L = learner(bits=16, fresh_optimizer=fresh)
        x1, y1 = synth(200, [0, 1], 1)
        L.learn_many(x1, y1)
        first = int(next(iter(L._opt.state.values()))["step"])
        L.learn_many(*synth(200, [2, 3], 2))
        steps[fresh] = (first, int(next(iter(L._opt.state.values()))["step"]))
        assert DIHNLearner.from_bytes(L.to_bytes()).fresh_optimizer is fresh
    (first, after_fresh), (first_default, after_default) = steps[True], steps[False]
    assert first == first_default and after_default == first + after_fresh
