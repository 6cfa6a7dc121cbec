"""Radius search at small radii: LMDB multi-index tables vs FAISS IndexBinaryMultiHash vs flat scans.

Engines, all one thread, same codes, same queries, interleaved rounds, median per-query latency:

* ``tables``: :class:`streamhash.index.multihash.MultiHashTables` probes in LMDB (``candidates_batch``)
  plus verification against the in-memory index's codes (``reconstruct_batch`` + popcount),
  i.e. what the query server does on the "tables" path.
* ``faiss_mh``: FAISS ``IndexBinaryMultiHash(d, nhash=m, b=d/m)`` with ``nflip = (radius-1)//m``
  (the smallest exact setting).
* ``faiss_flat`` / ``flat``: FAISS ``IndexBinaryFlat.range_search`` / streamhash's best
  :class:`BinaryIndex` ``range_search``.
* ``auto``: whichever of ``tables`` / ``flat`` :func:`choose_radius_strategy` picks.

Queries are database codes with one random bit flipped, so every radius has true neighbours.
All engines' result sets are checked equal. The probe and candidate counts printed beside the
``tables`` times are what the cost model's constants were fitted to.

    python benchmarks/bench_multihash.py                      # 1M x 64 bits, radii 2 4 8
    python benchmarks/bench_multihash.py --n 100000 --json    # JSON object on the last line

The tables are bulk-loaded with ``putmulti`` (the same keys and values ``Store.write_batch``
writes item by item, only faster to build).
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import lmdb  # noqa: E402
import numpy as np  # noqa: E402

from streamhash.index.hamming import make_index  # noqa: E402
from streamhash.index.multihash import TABLES_DB_FLAGS, MultiHashTables, choose_radius_strategy, verify  # noqa: E402

GEN = 1


def build_tables(path: str, tables: MultiHashTables, codes: np.ndarray):
    env = lmdb.open(path, map_size=1 << 36, max_dbs=2, sync=False, writemap=True)
    db = env.open_db(b"tables", **TABLES_DB_FLAGS)
    raw, cb = codes.tobytes(), codes.shape[1]
    items = []
    for seq in range(len(codes)):
        sv = seq.to_bytes(8, "big")
        items.extend((k, sv) for k in tables._keys(GEN, raw[seq * cb : (seq + 1) * cb]))
    items.sort()
    with env.begin(write=True) as txn:
        txn.cursor(db=db).putmulti(items, dupdata=True, append=True)
    return env, db


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--m", type=int, default=0, help="tables (default MultiHashTables.default_m)")
    p.add_argument("--radii", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import faiss

    faiss.omp_set_num_threads(1)
    m = args.m or MultiHashTables.default_m(args.bits)
    rng = np.random.default_rng(99)
    codes = rng.integers(0, 256, (args.n, args.bits // 8), dtype=np.uint8)
    q = codes[rng.integers(0, args.n, args.queries)].copy()
    flip = rng.integers(0, args.bits, args.queries)
    q[np.arange(args.queries), flip // 8] ^= (1 << (7 - flip % 8)).astype(np.uint8)

    tables = MultiHashTables(args.bits, m)
    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="bench_mh_")
    env, db = build_tables(tmp.name, tables, codes)
    print(f"# n={args.n} bits={args.bits} m={m}: LMDB tables built in {time.perf_counter() - t0:.1f}s")
    index = make_index(args.bits)
    index.add_with_ids(codes, np.arange(args.n, dtype=np.int64))
    fflat = faiss.IndexBinaryFlat(args.bits)
    fflat.add(codes)
    fmh = faiss.IndexBinaryMultiHash(args.bits, m, args.bits // m)
    fmh.add(codes)

    def tables_search(radius):
        with env.begin() as txn:
            lims, seqs = tables.candidates_batch(txn, db, GEN, q, radius)
        cand_codes, _ = index.reconstruct_batch(seqs)
        return verify(q, lims, seqs, cand_codes, radius)

    def faiss_mh(radius):
        fmh.nflip = max(0, (radius - 1) // m)
        return fmh.range_search(q, radius)

    rows = []
    print(f"{'radius':>6} {'engine':>10} {'us/query':>10} {'vs faiss_mh':>11} {'results':>8} "
          f"{'cands':>8} {'probes':>6}")
    for radius in args.radii:
        choice = choose_radius_strategy(args.n, args.bits, m, radius, backend=index.backend)
        engines = {
            "tables": lambda: tables_search(radius),
            "faiss_mh": lambda: faiss_mh(radius),
            "faiss_flat": lambda: fflat.range_search(q, radius),
            "flat": lambda: index.range_search(q, radius),
        }
        engines["auto"] = engines["tables" if choice == "tables" else "flat"]
        ref = None
        same = {}
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
        with env.begin() as txn:
            cands = len(tables.candidates_batch(txn, db, GEN, q, radius)[1]) / len(q)
        probes = tables.n_probes(radius)
        for name, us in med.items():
            print(f"{radius:>6} {name:>10} {us:>10.1f} {us / med['faiss_mh']:>11.3f} {len(ref) / len(q):>8.1f} "
                  f"{cands:>8.0f} {probes:>6}" + (f"  (picked {choice})" if name == "auto" else "")
                  + ("" if same[name] else "  MISMATCH"), flush=True)
        rows.append({"radius": radius, "us": med, "same": same, "choice": choice, "cands": cands, "probes": probes})

    if args.json:
        identical = all(all(r["same"].values()) for r in rows)
        print(json.dumps({"n": args.n, "bits": args.bits, "m": m, "identical": identical, "points": rows}))
    env.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
