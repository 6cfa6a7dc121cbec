"""CPU cost of the MIHash re-encode test (`streamhash.learn.mi.mi_gain`) against its previous dense form.

The learner calls ``mi_gain`` once per round on its reservoir (n = 1000 labeled items, 200 bootstrap
resamples). ``dense_mi_gain_reference`` below is the formulation it replaced, kept here only as the
reference: per distance value, (anchors x items) 0/1 masks times the (items x resamples) weights in
float32. Both run on the same codes in interleaved rounds, one thread; the figure is the median
process CPU time per call, and the results are checked to agree (live, candidate, gain within 1e-9,
sigma within 1e-6 relative; with ``--db-weights`` the reference's float32 sums of non-integer weights
only agree to about 1e-7, so the check is 1e-6 there).

    nice -n 10 .venv/bin/python benchmarks/bench_mi.py                 # n 1000, 32 bits, 200 resamples
    nice -n 10 .venv/bin/python benchmarks/bench_mi.py --bits 64 --db-weights
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads its BLAS thread pool

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from streamhash.learn.labels import neighbour_matrix  # noqa: E402
from streamhash.learn.mi import MIGain, hamming_matrix, mi_gain  # noqa: E402


def _dense_mi(h_pos: np.ndarray, h_neg: np.ndarray) -> np.ndarray:
    def entropy(counts):
        total = counts.sum(-1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = counts / np.maximum(total, 1e-12)
            logp = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
        return -(p * logp).sum(-1)

    n_pos, n_neg = h_pos.sum(-1), h_neg.sum(-1)
    total = np.maximum(n_pos + n_neg, 1e-12)
    mi = entropy(h_pos + h_neg) - (n_pos / total) * entropy(h_pos) - (n_neg / total) * entropy(h_neg)
    return np.maximum(mi, 0.0)


def dense_mi_gain_reference(query_codes, live_codes, candidate_codes, labels, bits, *, n_boot=200, seed=0,
                            chunk=50, db_weights=None) -> MIGain:
    """The previous mi_gain (at 273b561), for changed > 0 and n >= 2: a dense mask product per distance."""
    n = len(query_codes)
    ch = np.any(live_codes != candidate_codes, axis=1)
    off = ~np.eye(n, dtype=bool)
    nbr = neighbour_matrix(labels)
    pos, neg = nbr & off, ~nbr & off
    d_live = hamming_matrix(query_codes, live_codes)
    d_cand = hamming_matrix(query_codes, candidate_codes[ch])
    uc = ~ch
    rng = np.random.default_rng(seed)
    weights = np.concatenate([np.ones((n, 1)), rng.multinomial(n, np.full(n, 1.0 / n), size=max(n_boot, 0)).T], axis=1)
    weights = weights.astype(np.float32)
    live_mi, cand_mi = [], []
    for b0 in range(0, weights.shape[1], chunk):
        w = weights[:, b0:b0 + chunk]
        if db_weights is not None:
            w = w * np.asarray(db_weights, np.float32)[:, None]
        w_u, w_c = w[uc], w[ch]
        hists = {k: np.zeros((n, bits + 1, w.shape[1]), np.float32) for k in ("lp", "ln", "cp", "cn")}
        for d in range(bits + 1):
            eq_u = d_live[:, uc] == d
            shared_p = (eq_u & pos[:, uc]).astype(np.float32) @ w_u
            shared_n = (eq_u & neg[:, uc]).astype(np.float32) @ w_u
            eq_l, eq_c = d_live[:, ch] == d, d_cand == d
            hists["lp"][:, d] = shared_p + (eq_l & pos[:, ch]).astype(np.float32) @ w_c
            hists["ln"][:, d] = shared_n + (eq_l & neg[:, ch]).astype(np.float32) @ w_c
            hists["cp"][:, d] = shared_p + (eq_c & pos[:, ch]).astype(np.float32) @ w_c
            hists["cn"][:, d] = shared_n + (eq_c & neg[:, ch]).astype(np.float32) @ w_c
        live_mi.append(_dense_mi(hists["lp"].transpose(0, 2, 1).astype(np.float64),
                                 hists["ln"].transpose(0, 2, 1).astype(np.float64)))
        cand_mi.append(_dense_mi(hists["cp"].transpose(0, 2, 1).astype(np.float64),
                                 hists["cn"].transpose(0, 2, 1).astype(np.float64)))
    live_all, cand_all = np.concatenate(live_mi, axis=1), np.concatenate(cand_mi, axis=1)
    qw = weights.astype(np.float64)
    live_q = (qw * live_all).sum(0) / qw.sum(0)
    cand_q = (qw * cand_all).sum(0) / qw.sum(0)
    gains = cand_q - live_q
    sigma = float(gains[1:].std()) if n_boot > 0 else 0.0
    return MIGain(float(live_q[0]), float(cand_q[0]), float(gains[0]), sigma, n, int(ch.sum()))


def learner_like(n: int, bits: int, changed: float, seed: int):
    """Codes shaped like the learner's reservoir: 10 classes around prototypes; the network's encodings
    close to theirs, the stale inferred codes (a fraction ``changed`` of the items) noisier."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    proto = rng.integers(0, 2, (10, bits), dtype=np.uint8)
    flip = lambda p: proto[y] ^ (rng.random((n, bits)) < p).astype(np.uint8)  # noqa: E731
    query, live = flip(0.15), flip(0.15)
    stale = rng.random(n) < changed
    live[stale] = flip(0.35)[stale]
    cand = live.copy()
    cand[stale] = query[stale]
    pack = lambda b: np.packbits(b, axis=1)  # noqa: E731
    return pack(query), pack(live), pack(cand), [[int(v)] for v in y], stale


def strata_weights(inferred: np.ndarray, index_share: float = 0.8) -> np.ndarray:
    """The learner's database weights (OnlineHasher._strata_weights): each provenance's share of the index
    over its share of the sample, scaled to a mean of 1 — two distinct values."""
    w = np.where(inferred, index_share / inferred.mean(), (1 - index_share) / (~inferred).mean())
    return w * (len(w) / w.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--changed", type=float, default=0.4, help="fraction of stale codes the re-encode changes")
    ap.add_argument("--db-weights", action="store_true", help="the learner's stratified-sample database weights")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    q, live, cand, labels, stale = learner_like(a.n, a.bits, a.changed, seed=7)
    dbw = strata_weights(stale) if a.db_weights else None
    kw = dict(n_boot=a.n_boot, seed=11, db_weights=dbw)
    times = {"sparse": [], "dense_reference": []}
    for _ in range(a.rounds):
        for name, fn in (("sparse", mi_gain), ("dense_reference", dense_mi_gain_reference)):
            t0 = time.process_time()
            out = fn(q, live, cand, labels, a.bits, **kw)
            times[name].append(time.process_time() - t0)
            if name == "sparse":
                new = out
            else:
                ref = out
    tol = 1e-6 if a.db_weights else 1e-9
    agree = (abs(new.live - ref.live) <= tol and abs(new.candidate - ref.candidate) <= tol
             and abs(new.gain - ref.gain) <= tol and abs(new.sigma - ref.sigma) <= 1e-6 * abs(ref.sigma))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "bench": "mi_gain", "n": a.n, "bits": a.bits, "n_boot": a.n_boot, "changed": new.changed,
        "db_weights": a.db_weights, "rounds": a.rounds, "threads": 1,
        "sparse_cpu_s": round(med["sparse"], 4), "dense_reference_cpu_s": round(med["dense_reference"], 4),
        "speedup": round(med["dense_reference"] / med["sparse"], 2), "agree": agree,
        "max_abs_diff": max(abs(new.live - ref.live), abs(new.candidate - ref.candidate), abs(new.gain - ref.gain)),
        "sigma_rel_diff": abs(new.sigma - ref.sigma) / max(abs(ref.sigma), 1e-300),
        "gain": new.gain, "sigma": new.sigma, "numpy": np.__version__, "python": platform.python_version(),
        "load_avg": os.getloadavg()[0],
    }))
    if not agree:
        raise SystemExit("mi_gain and the dense reference disagree")


if __name__ == "__main__":
    main()
