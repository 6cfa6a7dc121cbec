"""Two query servers, each from its own checkout, over one store: alternating wrk runs, the A/B this noise allows.

On a shared 2-core machine the same server's rate moves by 2x within hours, so two whole benchmark runs
cannot rank two versions of the code. Here both servers are up at once over the same store (no ingest) and
take turns: round r runs wrk against A, then B, each for ``--seconds``. Then the next round starts with the
other one, so neither always goes second. What counts is each pair's ratio and how many pairs each won.

    git worktree add ../base <commit> && (cd ../base && ../main/.venv/bin/python setup.py build_ext --inplace)
    .venv/bin/python benchmarks/ab_serve.py --a ../base --b . --items 1000000 --connections 1 8 --rounds 6

Each tree runs its own ``streamhash`` package and compiled kernel (build it there first; a tree without one
is refused, as it would rank with numpy). Bodies are searches by code (k = 10) unless ``--bodies`` names a
file of JSON bodies, one a line (searches by image, say: the store then needs a model, as ``--root`` can give).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_serve import PARTITIONS, TOPIC, _get, build_store, wrk  # noqa: E402

from streamhash.index.store import Store  # noqa: E402
from streamhash.index.store.root import StoreRoot  # noqa: E402
from streamhash.kafka.broker import free_port  # noqa: E402
from streamhash.services.processes import spawn, stop, wait_for, wait_http  # noqa: E402


def count_items(path: Path) -> int:
    store = Store(path, readonly=True)
    try:
        return store.count()
    finally:
        store.close()


def start(tree: Path, root: Path, work: Path, name: str, min_items: int):
    if not list((tree / "streamhash" / "index").glob("_hamming*.so")):
        raise SystemExit(f"{tree} has no compiled kernel: run `python setup.py build_ext --inplace` there first")
    port, log = free_port(), work / f"serve-{name}.log"
    proc = spawn(["serve"], env={"STREAMHASH_STORE__PATH": str(root), "STREAMHASH_SERVER__PORT": str(port),
                                 "STREAMHASH_LOG_LEVEL": "WARNING"}, log_path=log, cwd=tree)
    wait_http(f"http://127.0.0.1:{port}/healthz", 300, proc, log)
    wait_for(lambda: json.loads(_get(port, "/healthz"))["index_size"] >= min_items, 300, "the index to load")
    return proc, port


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", type=Path, required=True, help="checkout A (the base)")
    ap.add_argument("--b", type=Path, required=True, help="checkout B (the change)")
    ap.add_argument("--root", type=Path, help="an existing store root (default: build one of --items random codes)")
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--bodies", type=Path, help="request bodies, one JSON a line (default: searches by code)")
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--json", action="store_true", help="end with one JSON line")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt install wrk)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="ab-serve-"))
    procs = []
    try:
        root, items = args.root, args.items
        if root is None:
            root = work / "index"
            build_store(root, args.items, args.bits, partitions=PARTITIONS, topic=TOPIC)
        else:  # both servers must have loaded all of it before the first run
            found = StoreRoot(root, create=False)
            items = sum(count_items(found.shard_path(key)) for key in found.shards())
        bodies = args.bodies
        if bodies is None:
            bodies = work / "bodies.jsonl"
            codes = np.random.default_rng(1).integers(0, 256, (5000, args.bits // 8), dtype=np.uint8)
            bodies.write_text("".join(json.dumps({"code_hex": c.tobytes().hex(), "k": 10}) + "\n" for c in codes))
        ports = {}
        for name, tree in (("a", args.a), ("b", args.b)):
            proc, ports[name] = start(tree.resolve(), root, work, name, items)
            procs.append(proc)
        result = {"a": str(args.a), "b": str(args.b), "rounds": args.rounds, "seconds": args.seconds}
        for c in args.connections:
            for port in ports.values():
                wrk(port, c, 2, bodies, work)  # warm-up
            runs = {"a": [], "b": []}
            for r in range(args.rounds):
                for name in ("a", "b") if r % 2 == 0 else ("b", "a"):
                    runs[name].append(wrk(ports[name], c, args.seconds, bodies, work))
                a, b = runs["a"][-1], runs["b"][-1]
                print(f"{c:>3} connection(s), round {r + 1}: A {a['rps']:>6} req/s p50 {a['p50_ms']:.3f} ms | "
                      f"B {b['rps']:>6} req/s p50 {b['p50_ms']:.3f} ms | B/A {b['rps'] / a['rps']:.3f}", file=sys.stderr)
            ratios = [b["rps"] / a["rps"] for a, b in zip(runs["a"], runs["b"])]
            summary = {f"{k}_rps_median": statistics.median(x["rps"] for x in runs[k]) for k in runs}
            summary.update({f"{k}_p50_ms_median": round(statistics.median(x["p50_ms"] for x in runs[k]), 3) for k in runs})
            summary.update(ratio_median=round(statistics.median(ratios), 3), ratio_min=round(min(ratios), 3),
                           ratio_max=round(max(ratios), 3), b_won=sum(x > 1 for x in ratios))
            print(f"{c:>3} connection(s): B/A {summary['ratio_median']} (pairs {summary['ratio_min']}-"
                  f"{summary['ratio_max']}), B won {summary['b_won']} of {args.rounds}", file=sys.stderr)
            result[f"c{c}"] = summary
        if args.json:
            print(json.dumps(result))
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
