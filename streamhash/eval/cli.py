"""``streamhash eval`` / ``python -m streamhash.eval``: run a protocol, print a table, optionally JSON.

    python -m streamhash.eval --protocol partial-labels --bits 32 --quick --json --out benchmarks/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from streamhash.errors import DatasetMissingError
from streamhash.eval import DEFAULT_METHODS, METHODS
from streamhash.eval.protocols import PROTOCOLS

# stream sizes (make_stream) of a reduced run; the learner's settings stay LearnSettings' defaults
QUICK_STREAM = {"retrieval_limit": 12_000, "queries_per_class": 50, "chunks": 3, "stream": 6_000, "chunk_size": 1_500}
JSON_KEYS = ("map", "map_stream", "map_at_1000", "p_r2", "p_at_1000", "reencodes", "images_reencoded", "seconds",
             "cpu_seconds", "inferred_top10", "inferred_index")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", choices=PROTOCOLS, default="class-incremental")
    parser.add_argument("--dataset", choices=("fashion-mnist", "cifar10"), default="fashion-mnist",
                        help="cifar10: photos, the network of streamhash.eval.cifar.MODEL on cached stored inputs")
    parser.add_argument("--bits", type=int, default=32, choices=[16, 32, 48, 64])
    parser.add_argument("--quick", action="store_true", help="reduced run (12k retrieval, 500 queries, short stream)")
    parser.add_argument("--json", action="store_true", help="last line of output: one JSON object")
    parser.add_argument("--out", type=Path, default=None, help="folder: the plot goes to OUT/plots/incremental_<protocol>_<bits>.png")
    parser.add_argument("--save-json", type=Path, default=None, help="write the full result (curves, MI log) here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the learner's, learn.torch_threads)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated subset of " + ",".join(METHODS) + " (default: all but the last)")
    parser.add_argument("--labeled-fraction", type=float, default=None,
                        help="share of items that arrive labeled (default: 1 for class-incremental and online, 0.25 otherwise)")
    parser.add_argument("--chunks", type=int, default=None, help="class-incremental: number of stream chunks")
    parser.add_argument("--stream", type=int, default=None, help="online, partial-labels, domain-shift, cold-start: Fashion-MNIST items streamed")
    parser.add_argument("--chunk-size", type=int, default=None, help="items per chunk (all but class-incremental)")
    parser.add_argument("--round-iters", type=int, default=None, help="alternations per round (LearnSettings.iters)")
    parser.add_argument("--omega", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="LearnSettings.lr (the learner's and the retrain's)")
    parser.add_argument("--mi-threshold", type=float, default=None)
    parser.add_argument("--holdout-fraction", type=float, default=None, help="LearnSettings.holdout_fraction")
    parser.add_argument("--reservoir", type=int, default=None, help="LearnSettings.reservoir_size")
    parser.add_argument("--reservoir-strata", action=argparse.BooleanOptionalAction, default=None,
                        help="LearnSettings.reservoir_strata: half the MI test's reservoir for the hold-out")
    parser.add_argument("--fresh-optimizer", action=argparse.BooleanOptionalAction, default=None,
                        help="LearnSettings.fresh_optimizer: each round starts Adam afresh")
    parser.add_argument("--relearn", choices=("never", "new-labels", "always"), default=None,
                        help="LearnSettings.relearn: when a round's DCC step re-learns every labeled code, old ones too")
    parser.add_argument("--restart-head", action=argparse.BooleanOptionalAction, default=None,
                        help="LearnSettings.restart_head: a round that brings a new label starts the hash head afresh")
    parser.add_argument("--restart-factor", type=int, default=None,
                        help="LearnSettings.restart_factor: such a round's most alternations, in rounds' worth")
    parser.add_argument("--data-dir", type=Path, default=None, help="Fashion-MNIST folder, or CIFAR-10's (streamhash.data.cifar10)")


def stream_kwargs(args) -> dict:
    kw = dict(QUICK_STREAM) if args.quick else {}
    for name in ("chunks", "stream", "chunk_size", "labeled_fraction"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    return kw | {"seed": args.seed}


def config_from_args(args):
    from streamhash.config import LearnSettings
    from streamhash.eval.harness import EvalConfig

    learn = {}
    for arg, key in (("round_iters", "iters"), ("omega", "omega"), ("lr", "lr"), ("mi_threshold", "mi_threshold"),
                     ("holdout_fraction", "holdout_fraction"), ("reservoir", "reservoir_size"),
                     ("reservoir_strata", "reservoir_strata"), ("fresh_optimizer", "fresh_optimizer"),
                     ("relearn", "relearn"), ("restart_head", "restart_head"),
                     ("restart_factor", "restart_factor")):
        if getattr(args, arg) is not None:
            learn[key] = getattr(args, arg)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = set(methods) - set(METHODS)
    if bad:
        raise ValueError(f"unknown methods {sorted(bad)}; choose from {METHODS}")
    return EvalConfig(protocol=args.protocol, bits=args.bits, seed=args.seed, methods=methods, learn=LearnSettings(**learn))


def load_stream(args, log):
    """The stream ``args`` name (raises :class:`DatasetMissingError` when its data is not installed)."""
    if args.dataset == "cifar10":
        return cifar_stream(args, log)
    from streamhash.data.fashion_mnist import load_all
    from streamhash.eval.protocols import make_stream

    images, labels = load_all(args.data_dir)
    digits = None
    if args.protocol == "domain-shift":
        from streamhash.data.digits import load_digits_28

        digits = load_digits_28()
    return make_stream(args.protocol, images, labels, digits=digits, **stream_kwargs(args))


def run(args) -> int:
    import torch

    from streamhash.eval.harness import run as run_stream
    from streamhash.eval.report import curve_table, markdown_table, plot

    cfg = config_from_args(args)
    torch.set_num_threads(args.threads or cfg.learn.torch_threads)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    try:
        stream = load_stream(args, log)
    except DatasetMissingError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    result = run_stream(stream, cfg, log=log)
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    log(markdown_table(result))
    log(curve_table(result))
    if args.out:
        tag = f"{cfg.protocol}_{cfg.bits}{'_quick' if args.quick else ''}"
        png = plot(result, args.out / "plots" / f"incremental_{tag}.png")
        log(f"wrote {png}")
    if args.save_json:
        args.save_json.write_text(json.dumps(result, indent=1, default=str))
    if args.json:
        slim = {"protocol": result["protocol"], "bits": result["bits"], "database": result["database"],
                "budget": result["budget"], "methods": {
                    n: {k: m[k] for k in JSON_KEYS} | ({"mi_log": m["mi_log"]} if "mi_log" in m else {})
                    for n, m in result["methods"].items()}}
        print(json.dumps(slim))
    return 0


def cifar_stream(args, log):
    from streamhash.data.cifar10 import data_home
    from streamhash.eval.cifar import make_cifar_stream

    return make_cifar_stream(args.protocol, data_home(), args.data_dir, bits=args.bits, log=log,
                             **stream_kwargs(args))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="streamhash eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
