"""Run every method over one stream: one round per chunk, every method evaluated after each chunk.

Metrics (:mod:`streamhash.eval.metrics`): queries encoded by the method's current network against the
database's stored codes. ``seconds`` is what the method spent on the stream (arrival encodes, rounds,
the MI tests it uses, re-encodes); the shared initial model is reported once (``init_seconds``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from streamhash.config import LearnSettings
from streamhash.eval import METHODS
from streamhash.eval.methods import POLICIES, FullRetrain, Incremental, Initial, LSHMethod, Method
from streamhash.eval.metrics import retrieval_metrics
from streamhash.eval.protocols import Stream


# the learner process's defaults, except alternations per round (the harness runs one round per chunk)
EVAL_LEARN = {"iters": 8, "reservoir_size": 1000}


@dataclass
class EvalConfig:
    protocol: str = "class-incremental"
    bits: int = 32
    seed: int = 0
    init_iters: int = 40  # alternations of the initial model (ADSH on D0)
    topk: int = 1000
    methods: tuple = METHODS
    # the learner process's settings, with one round per chunk: round_every / round_max_age_s play no part
    learn: LearnSettings = field(default_factory=lambda: LearnSettings(**EVAL_LEARN))


def evaluate(m: Method, stream: Stream, q_codes: np.ndarray, cfg: EvalConfig, position: int) -> dict:
    ids = m.table.ids
    codes = m.table.codes[ids]
    if stream.everything is not None:  # the rest of the database, encoded now
        rest = np.setdiff1d(stream.everything, ids)
        ids, codes = np.concatenate([ids, rest]), np.concatenate([codes, m.encode(rest)])
    metrics = retrieval_metrics(q_codes, stream.labels[stream.queries], codes, stream.labels[ids], cfg.bits, topk=cfg.topk)
    m.curve.append((position, metrics))
    return metrics


def run(stream: Stream, cfg: EvalConfig, log=print) -> dict:
    torch.manual_seed(cfg.seed)
    s = cfg.learn
    fetch = lambda ids: stream.images[np.asarray(ids, dtype=np.int64)]  # noqa: E731  ids = dataset indices
    log(f"[{cfg.protocol}] {len(stream.queries)} queries, D0 {len(stream.d0)}, {len(stream.chunks)} chunks of "
        f"~{len(stream.chunks[0])}, {stream.labeled[np.concatenate([stream.d0, *stream.chunks])].mean():.0%} labeled, "
        f"bits {cfg.bits}")
    init = Initial(stream, s, cfg.bits, cfg.seed, cfg.init_iters, fetch)
    log(f"initial model: {init.seconds:.1f}s, {init.iters} alternations on {len(init.trained)} labeled items")
    budget = init.iters + len(stream.chunks) * s.iters
    methods: dict[str, Method] = {}
    for name in cfg.methods:
        if name in POLICIES:
            methods[name] = Incremental(name, stream, cfg.bits, s, init, cfg.seed, fetch)
        elif name == "full_retrain":
            methods[name] = FullRetrain(stream, cfg.bits, s, init, cfg.seed, fetch, budget)
        elif name == "lsh":
            methods[name] = LSHMethod(stream, cfg.bits, cfg.seed)
        else:
            raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
    q = stream.queries
    position = 0
    if len(stream.d0):
        for m in methods.values():
            evaluate(m, stream, m.encode(q), cfg, position)
        log("step 0: " + ", ".join(f"{n} {m.curve[-1][1]['map']:.4f}" for n, m in methods.items()))
    for step, chunk in enumerate(stream.chunks, 1):
        position += len(chunk)
        last = step == len(stream.chunks)
        for m in methods.values():
            m.arrive(chunk, position, last)
            evaluate(m, stream, m.encode(q), cfg, position)
        log(f"step {step} pos {position}: " + ", ".join(
            f"{n} {m.curve[-1][1]['map']:.4f}{'*' if position in m.events else ''}" for n, m in methods.items()))
    out = {"protocol": cfg.protocol, "bits": cfg.bits, "init_seconds": round(init.seconds, 2),
           "database": len(methods[next(iter(methods))].table.ids) if stream.everything is None else len(stream.everything),
           "budget": {"initial_alternations": init.iters, "round_alternations": s.iters, "rounds": len(stream.chunks),
                      "full_retrain_alternations": budget, "omega": s.omega, "epochs": s.epochs},
           "config": {"seed": cfg.seed, "init_iters": cfg.init_iters, "topk": cfg.topk, "learn": s.model_dump()},
           "methods": {}}
    for name, m in methods.items():
        final = m.curve[-1][1]
        out["methods"][name] = {"map": final["map"], "map_at_1000": final["map_at_k"], "p_r2": final["p_r2"],
                                "p_at_1000": final["p_at_k"], **m.result()}
        if m.mi_log:
            out["methods"][name]["mi_log"] = m.mi_log
    return out

