"""Exact top-k Hamming search: FAISS IndexBinaryFlat vs every streamhash backend, one thread.

All engines search the same random codes in interleaved rounds inside one process (so drift in
machine load hits them alike); the reported figure is the median over rounds of the per-query
latency. Batch 1 times single-query calls; batch B times one call with B queries, divided by B.
Every engine's top-k distance lists are checked against FAISS's.

    python benchmarks/bench_hamming.py                                  # the full grid
    python benchmarks/bench_hamming.py --n 1000000 --bits 64 --json     # one point, JSON last line

Needs the ``bench`` extra (``pip install -e '.[bench]'``, i.e. faiss-cpu).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy / faiss / torch load their thread pools

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from streamhash.index import hamming  # noqa: E402


def engines(bits: int, include_numpy: bool) -> dict:
    import faiss

    faiss.omp_set_num_threads(1)
    out = {"faiss": faiss.IndexBinaryFlat(bits)}
    if hamming.native_available():
        out["native"] = hamming.make_index(bits, "native")
    if include_numpy:
        out["numpy"] = hamming.make_index(bits, "numpy")
    try:
        import torch

        if torch.cuda.is_available():
            out["torch"] = hamming.make_index(bits, "torch")
    except ImportError:
        pass
    return out


def run_point(n: int, bits: int, batches: list[int], k: int, rounds: int, single_queries: int, include_numpy: bool):
    rng = np.random.default_rng(1234)
    codes = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
    queries = rng.integers(0, 256, (max(batches + [single_queries]), bits // 8), dtype=np.uint8)
    eng = engines(bits, include_numpy)
    for name, ix in eng.items():
        if name == "faiss":
            ix.add(codes)
        else:
            ix.add_with_ids(codes, np.arange(n, dtype=np.int64))  # ids = FAISS's sequential ids

    def one_round(ix, batch):
        if batch == 1:
            t0 = time.perf_counter()
            for j in range(single_queries):
                ix.search(queries[j : j + 1], k)
            return (time.perf_counter() - t0) / single_queries
        t0 = time.perf_counter()
        ix.search(queries[:batch], k)
        return (time.perf_counter() - t0) / batch

    rows = []
    for batch in batches:
        nq = single_queries if batch == 1 else batch
        ref_D, ref_I = eng["faiss"].search(queries[:nq], k)
        same_D, same_I = {}, {}
        for name, ix in eng.items():
            D, I = ix.search(queries[:nq], k)
            same_D[name], same_I[name] = bool(np.array_equal(D, ref_D)), bool(np.array_equal(I, ref_I))
        times = {name: [] for name in eng}
        for _ in range(rounds):
            for name, ix in eng.items():
                times[name].append(one_round(ix, batch) * 1e3)
        med = {name: statistics.median(t) for name, t in times.items()}
        rows.append({"n": n, "bits": bits, "batch": batch, "k": k, "ms": med,
                     "identical_D": same_D, "identical_I": same_I})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000, 4_000_000])
    p.add_argument("--bits", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--single-queries", type=int, default=32, help="single-query calls timed per batch-1 round")
    p.add_argument("--no-numpy", action="store_true", help="skip the (slow) numpy backend")
    p.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    args = p.parse_args(argv)

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, one thread; "
          f"native kernel: {hamming.NativeIndex(64).kernel if hamming.native_available() else 'not built'}")
    print(f"{'n':>9} {'bits':>4} {'batch':>5} {'engine':>7} {'ms/query':>9} {'vs faiss':>8} "
          f"{'same D':>6} {'same I':>6}")
    results = []
    for n in args.n:
        for bits in args.bits:
            for row in run_point(n, bits, args.batch, args.k, args.rounds, args.single_queries, not args.no_numpy):
                results.append(row)
                f = row["ms"]["faiss"]
                for name, ms in row["ms"].items():
                    print(f"{n:>9} {bits:>4} {row['batch']:>5} {name:>7} {ms:>9.4f} {ms / f:>8.3f} "
                          f"{str(row['identical_D'][name]):>6} {str(row['identical_I'][name]):>6}", flush=True)

    if args.json:
        out = {"k": args.k, "identical": all(all(r["identical_D"].values()) for r in results), "points": results}
        # Headline keys for the first (n, bits) point: the best streamhash backend per batch size.
        head = [r for r in results if (r["n"], r["bits"]) == (results[0]["n"], results[0]["bits"])]
        out.update(n=head[0]["n"], bits=head[0]["bits"])
        for r in head:
            b = r["batch"]
            best = min((ms, name) for name, ms in r["ms"].items() if name != "faiss")
            out[f"faiss_ms_batch{b}"] = r["ms"]["faiss"]
            out[f"best_ms_batch{b}"], out[f"best_backend_batch{b}"] = best
            out[f"ratio_batch{b}"] = best[0] / r["ms"]["faiss"]
        print(json.dumps(out))


if __name__ == "__main__":
    main()
