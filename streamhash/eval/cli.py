"""``streamhash eval`` / ``python -m streamhash.eval``: run a protocol, print a table, optionally JSON.

    python -m streamhash.eval --protocol class-incremental --bits 32 --quick --json --out benchmarks/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from streamhash.errors import DatasetMissingError
from streamhash.eval import METHODS

QUICK = {"retrieval_limit": 12_000, "queries_per_class": 50, "chunks": 3, "stream": 6_000, "chunk_size": 2_000,
         "init_iters": 10, "round_iters": 3, "omega": 1000, "reservoir": 500}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", choices=["class-incremental", "online"], default="class-incremental")
    parser.add_argument("--bits", type=int, default=32, choices=[16, 32, 48, 64])
    parser.add_argument("--quick", action="store_true", help="reduced run (12k retrieval, 500 queries), < 5 min on 2 cores")
    parser.add_argument("--json", action="store_true", help="last line of output: one JSON object")
    parser.add_argument("--out", type=Path, default=None, help="folder: the plot goes to OUT/plots/incremental_<protocol>_<bits>.png")
    parser.add_argument("--save-json", type=Path, default=None, help="write the full result (curves, MI log) here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--chunks", type=int, default=None, help="class-incremental: number of stream chunks")
    parser.add_argument("--chunk-size", type=int, default=None, help="online: items per chunk")
    parser.add_argument("--init-iters", type=int, default=None)
    parser.add_argument("--round-iters", type=int, default=None)
    parser.add_argument("--omega", type=int, default=None)
    parser.add_argument("--mi-threshold", type=float, default=None)
    parser.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST folder")


def config_from_args(args):
    from streamhash.eval.protocols import ProtocolConfig

    kw = dict(QUICK) if args.quick else {}
    kw.update(protocol=args.protocol, bits=args.bits, seed=args.seed)
    for name in ("chunks", "chunk_size", "init_iters", "round_iters", "omega", "mi_threshold"):
        v = getattr(args, name)
        if v is not None:
            kw[name] = v
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = set(methods) - set(METHODS)
    if bad:
        raise ValueError(f"unknown methods {sorted(bad)}; choose from {METHODS}")
    kw["methods"] = methods
    return ProtocolConfig(**kw)


def run(args) -> int:
    import torch

    from streamhash.data.fashion_mnist import load_all
    from streamhash.eval.protocols import run_protocol
    from streamhash.eval.report import curve_table, markdown_table, plot

    torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    try:
        images, labels = load_all(args.data_dir)
    except DatasetMissingError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    result = run_protocol(cfg, images, labels, log=log)
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    table = markdown_table(result)
    log(table)
    log(curve_table(result))
    if args.out:
        tag = f"{cfg.protocol}_{cfg.bits}{'_quick' if args.quick else ''}"
        png = plot(result, args.out / "plots" / f"incremental_{tag}.png")
        log(f"wrote {png}")
    if args.save_json:
        args.save_json.write_text(json.dumps(result, indent=1, default=str))
    if args.json:
        slim = {"protocol": result["protocol"], "bits": result["bits"], "methods": {
            n: {k: m[k] for k in ("map", "map_at_1000", "p_r2", "reencodes", "train_seconds", "reencode_seconds")}
            for n, m in result["methods"].items()}}
        print(json.dumps(slim))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="streamhash eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
