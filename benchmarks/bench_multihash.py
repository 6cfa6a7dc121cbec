"""Radius search at small radii: streamhash's in-memory multi-index tables vs FAISS IndexBinaryMultiHash vs flat scans.

Engines, all one thread, same codes, same queries, interleaved rounds, median per-query latency:

* ``tables``: :meth:`RadiusIndex.range_search_tables <streamhash.index.radius.RadiusIndex.range_search_tables>`,
  the query server's tables path: :class:`streamhash.index.memhash.MemHash` probes + verification
  against the flat index's codes in one native call (the product's code, nothing copied here).
* ``faiss_mh``: FAISS ``IndexBinaryMultiHash(d, nhash=m, b=d/m)`` with ``nflip = (radius-1)//m``
  (the smallest setting that is exact for the strict radius; FAISS's budget: its own defaults,
  one OpenMP thread like every other engine, the same batch).
* ``faiss_flat`` / ``flat``: FAISS ``IndexBinaryFlat.range_search`` / streamhash's native
  :class:`BinaryIndex` ``range_search``.
* ``auto``: :meth:`RadiusIndex.range_search`, whichever of ``tables`` / ``flat``
  :func:`choose_radius_strategy` picks (the server's call).
* ``tables_1q`` / ``faiss_mh_1q``: the same two, one query per call (the server's shape: one
  request, one query), per-call overhead included.

Queries are database codes with one random bit flipped, so every radius has true neighbours.
All engines' result sets are checked equal. ``--fit`` least-squares fits the cost model's
constants (``TABLE_US_*``, ``SCAN_US_FIXED`` in ``streamhash/index/multihash.py``) to the
``tables_1q`` times against probes and bucket entries per query, and the flat scan per row.

    python benchmarks/bench_multihash.py                      # 1M x 64 bits, m = 4, radii 1..8
    python benchmarks/bench_multihash.py --n 100000 --json    # JSON object on the last line
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from streamhash.index.hamming import make_index  # noqa: E402
from streamhash.index.multihash import Substrings  # noqa: E402
from streamhash.index.radius import RadiusIndex  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--m", type=int, default=0, help="tables (default Substrings.default_m)")
    p.add_argument("--radii", type=int, nargs="+", default=list(range(1, 9)))
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--fit", action="store_true", help="fit the cost model's constants")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import faiss

    faiss.omp_set_num_threads(1)
    m = args.m or Substrings.default_m(args.bits)
    rng = np.random.default_rng(99)
    codes = rng.integers(0, 256, (args.n, args.bits // 8), dtype=np.uint8)
    q = codes[rng.integers(0, args.n, args.queries)].copy()
    flip = rng.integers(0, args.bits, args.queries)
    q[np.arange(args.queries), flip // 8] ^= (1 << (7 - flip % 8)).astype(np.uint8)

    index = make_index(args.bits)
    index.add_with_ids(codes, np.arange(args.n, dtype=np.int64))
    radius_index = RadiusIndex(index, m=m, wait=True)
    t0 = time.perf_counter()
    radius_index.tables.build()
    build_s = time.perf_counter() - t0
    print(f"# n={args.n} bits={args.bits} m={m} backend={index.backend}: in-memory tables built in {build_s:.3f}s "
          f"(skew {radius_index.tables.skew:.3f})")
    fflat = faiss.IndexBinaryFlat(args.bits)
    fflat.add(codes)
    t0 = time.perf_counter()
    fmh = faiss.IndexBinaryMultiHash(args.bits, m, args.bits // m)
    fmh.add(codes)
    print(f"# FAISS IndexBinaryMultiHash built in {time.perf_counter() - t0:.3f}s")
    def faiss_mh(queries, radius):
        fmh.nflip = max(0, (radius - 1) // m)
        return fmh.range_search(queries, radius)

    def one_by_one(fn, radius):
        parts = [fn(q[i : i + 1], radius) for i in range(len(q))]
        lims = np.concatenate([[0], np.cumsum([len(x[2]) for x in parts])])
        return lims, np.concatenate([x[1] for x in parts]), np.concatenate([x[2] for x in parts])

    rows = []
    print(f"{'radius':>6} {'engine':>11} {'us/query':>10} {'vs faiss_mh':>11} {'results':>8} {'cands':>8} {'probes':>6}")
    for radius in args.radii:
        choice = radius_index.strategy(radius)
        engines = {
            "tables": lambda: radius_index.range_search_tables(q, radius),
            "faiss_mh": lambda: faiss_mh(q, radius),
            "tables_1q": lambda: one_by_one(radius_index.range_search_tables, radius),
            "faiss_mh_1q": lambda: one_by_one(faiss_mh, radius),
            "faiss_flat": lambda: fflat.range_search(q, radius),
            "flat": lambda: index.range_search(q, radius),
            "auto": lambda: radius_index.range_search(q, radius),
        }
        ref, same = None, {}
        for name, fn in engines.items():
            lims, _, ids = fn()
            got = sorted((i, int(x)) for i in range(len(q)) for x in ids[lims[i] : lims[i + 1]])
            ref = got if ref is None else ref
            same[name] = got == ref
        times = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, fn in engines.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) / len(q) * 1e6)
        med = {name: statistics.median(v) for name, v in times.items()}
        cands = float(radius_index.tables.bucket_entries(q, radius).mean())
        probes = radius_index.tables.n_probes(radius)
        for name, us in med.items():
            print(f"{radius:>6} {name:>11} {us:>10.2f} {us / med['faiss_mh']:>11.3f} {len(ref) / len(q):>8.1f} "
                  f"{cands:>8.0f} {probes:>6}" + (f"  (picked {choice})" if name == "auto" else "")
                  + ("" if same[name] else "  MISMATCH"), flush=True)
        rows.append({"radius": radius, "us": med, "same": same, "choice": choice, "cands": cands, "probes": probes,
                     "results": len(ref) / len(q)})

    print("\n| radius (strict) | tables | FAISS MultiHash | ratio | tables, 1 query/call | FAISS MH, 1 query/call "
          "| ratio | flat (native) | FAISS flat | auto (picked) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        u = r["us"]
        print(f"| {r['radius']} | {u['tables']:.2f} | {u['faiss_mh']:.2f} | {u['tables'] / u['faiss_mh']:.2f}× "
              f"| {u['tables_1q']:.2f} | {u['faiss_mh_1q']:.2f} | {u['tables_1q'] / u['faiss_mh_1q']:.2f}× "
              f"| {u['flat']:.1f} | {u['faiss_flat']:.1f} | {u['auto']:.2f} ({r['choice']}) |")

    fit = None
    if args.fit:
        # Per probe and per bucket entry from the batch times (the per-call overhead amortised away), least
        # squares with non-negative coefficients; the fixed part is a single query's: the median of
        # tables_1q - tables over the radii, plus the batch intercept.
        A = np.array([[r["probes"], r["cands"], 1.0] for r in rows])
        y = np.array([r["us"]["tables"] for r in rows])
        use = [0, 1, 2]
        while True:
            coef = np.zeros(3)
            coef[use] = np.linalg.lstsq(A[:, use], y, rcond=None)[0]
            neg = [i for i in use if coef[i] < 0]
            if not neg:
                break
            use = [i for i in use if i not in neg]
        fixed = statistics.median(r["us"]["tables_1q"] - r["us"]["tables"] for r in rows) + coef[2]
        scan_ns = statistics.median(r["us"]["flat"] for r in rows) * 1e3 / args.n / ((args.bits + 63) // 64)
        fit = {"TABLE_US_FIXED": float(fixed), "TABLE_US_PER_PROBE": float(coef[0]),
               "TABLE_US_PER_CANDIDATE": float(coef[1]), "scan_ns_per_row": scan_ns}
        print("# fit:", ", ".join(f"{k} = {v:.4g}" for k, v in fit.items()))
    if args.json:
        identical = all(all(r["same"].values()) for r in rows)
        print(json.dumps({"n": args.n, "bits": args.bits, "m": m, "build_s": build_s, "identical": identical,
                          "points": rows, "fit": fit}))


if __name__ == "__main__":
    main()
