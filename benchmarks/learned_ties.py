"""Where learned and inferred codes rank (issue 24 item 3): the same final index under three tie orders.

A learned code is DCC's code for its label set, so the learned items of a class carry (nearly) one code, and
the network's codes of that class sit around it: many items share each distance. Which of them a query meets
first is the tie order. The product's is arrival order (schema 4, :mod:`streamhash.index.store.layout`): a
learned code replaces its item's code where the item stands. Before it, a learned code gave its item a new
``seq`` at the end of the shard, so at equal distance every learned code ranked after every inferred one. This
script runs ``streamhash eval``'s harness (the product's learner, shard and re-encode; it takes the same flags)
and ranks each method's final index, queries encoded by its final network, three ways:

- ``arrival``: the shard's order, what the eval and the query server rank by (the reference);
- ``latest write``: each item's latest write, the order before schema 4;
- ``learned first``: learned codes before inferred ones at equal distance, then arrival.

Per order: mAP@all, precision@10 and the inferred codes' share of the top 10 beside their share of the index.

    nice -n 5 python benchmarks/learned_ties.py --protocol domain-shift --bits 32 --quick \\
        --methods streamhash,selective_every_round,full_retrain
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamhash.eval.cli import add_arguments, config_from_args, load_stream  # noqa: E402
from streamhash.eval.harness import inferred_share, run, served  # noqa: E402
from streamhash.eval.metrics import retrieval_metrics  # noqa: E402


def orders(m, ids: np.ndarray, learned: np.ndarray) -> dict[str, np.ndarray]:
    """Permutations of what ``served`` gives (the shard in arrival order, then ``online``'s rest of the database)."""
    latest = m.shard.store.snapshot().seqs
    latest = np.concatenate([latest, latest.max(initial=0) + 1 + np.arange(len(ids) - len(latest))])
    return {"arrival": np.arange(len(ids)), "latest write": np.argsort(latest, kind="stable"),
            "learned first": np.argsort(~learned, kind="stable")}


def measure(stream, bits: int, m) -> dict:
    ids, codes, learned, q_codes = served(m, stream)
    q_labels, out = stream.labels[stream.queries], {}
    for name, perm in orders(m, ids, learned).items():
        r = retrieval_metrics(q_codes, q_labels, codes[perm], stream.labels[ids[perm]], bits, topk=10)
        out[name] = {"map": r["map"], "p_at_10": r["p_at_k"]} | inferred_share(q_codes, codes[perm], learned[perm])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    import torch

    cfg = config_from_args(args)
    torch.set_num_threads(args.threads or cfg.learn.torch_threads)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731 (stdout carries the table)
    stream = load_stream(args, log)
    found = {}
    run(stream, cfg, log=log,
        final=lambda name, m: found.__setitem__(name, measure(stream, cfg.bits, m)))
    print(f"{args.protocol}, {cfg.bits} bits, seed {cfg.seed}{', quick' if args.quick else ''}")
    print("| method | tie order | mAP@all | vs arrival | P@10 | inferred in top 10 (index) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, rows in found.items():
        ref = rows["arrival"]["map"]
        for order, r in rows.items():
            print(f"| {name} | {order} | {r['map']:.4f} | {r['map'] - ref:+.4f} | {r['p_at_10']:.3f} "
                  f"| {r['inferred_top10']:.3f} ({r['inferred_index']:.3f}) |")
    if args.json:
        print(json.dumps({"protocol": args.protocol, "bits": cfg.bits, "seed": cfg.seed, "methods": found}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
