"""Run every method over one stream: one round per chunk, every method evaluated after each chunk.

Every method starts where a new store starts: the untrained initial network (version 1), the first chunk
(a protocol's D0, where it has one) encoded by it and learned by the first round, as the learner process's
first round learns the first labeled items it reads. One round per chunk stands for the learner's
``round_every`` / ``round_max_age_s`` cadence; every other learner setting is ``LearnSettings``' default.

Metrics (:mod:`streamhash.eval.metrics`): queries encoded by the method's current network against the
codes its shard serves. ``seconds`` / ``cpu_seconds`` are what the method spent on the stream (arrival
encodes and writes, rounds, the MI tests it uses, re-encodes). ``full_retrain`` gets the ``streamhash``
method's CPU seconds (or the first incremental method's) as its budget, so it runs after them at each step.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from streamhash.config import LearnSettings, ModelSettings
from streamhash.eval import DEFAULT_METHODS, METHODS
from streamhash.eval.methods import POLICIES, FullRetrain, Incremental, LSHMethod, Method
from streamhash.eval.metrics import hamming_distances, retrieval_metrics
from streamhash.eval.protocols import Stream
from streamhash.eval.shard import EvalShard
from streamhash.model.state import initial_net


@dataclass
class EvalConfig:
    protocol: str = "class-incremental"
    bits: int = 32
    seed: int = 0
    topk: int = 1000
    methods: tuple = DEFAULT_METHODS
    # the learner process's settings, with one round per chunk: round_every / round_max_age_s play no part
    learn: LearnSettings = field(default_factory=LearnSettings)


def served(m: Method, stream: Stream) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, codes, learned, query_codes)``: the database a query of ``m`` meets, in the shard's order (the
    order its ties break in), and the queries encoded by ``m``'s current network."""
    ids, codes, learned = m.shard.snapshot()
    if stream.everything is not None:  # the rest of the database, encoded now
        rest = np.setdiff1d(stream.everything, ids)
        ids, codes = np.concatenate([ids, rest]), np.concatenate([codes, m.encode(rest)])
        learned = np.concatenate([learned, np.zeros(len(rest), bool)])
    return ids, codes, learned, m.encode(stream.queries)


def evaluate(m: Method, stream: Stream, cfg: EvalConfig, position: int) -> dict:
    ids, codes, learned, q_codes = served(m, stream)
    metrics = retrieval_metrics(q_codes, stream.labels[stream.queries], codes, stream.labels[ids], cfg.bits, topk=cfg.topk)
    metrics |= inferred_share(q_codes, codes, learned)
    m.curve.append((position, metrics))
    return metrics


def inferred_share(q_codes: np.ndarray, codes: np.ndarray, learned: np.ndarray, k: int = 10) -> dict:
    """Share of inferred codes among each query's top ``k`` (stable Hamming order, as the metrics rank),
    beside their share of the index: equal when learned and inferred codes of a class rank together."""
    top = np.argsort(hamming_distances(q_codes, codes), axis=1, kind="stable")[:, :k]
    return {"inferred_top10": float((~learned[top]).mean()), "inferred_index": float((~learned).mean())}


def make_methods(stream: Stream, cfg: EvalConfig, tmp: Path) -> dict[str, Method]:
    net = initial_net(ModelSettings(bits=cfg.bits, seed=cfg.seed, **stream.model))  # photos: the stream's network
    start, features = net.to_bytes(), net.feature_spec()
    s, methods = cfg.learn, {}

    def shard(name):
        return EvalShard(tmp / name, cfg.bits, stream.images, stream.labels, stream.labeled, features=features)

    for name in cfg.methods:
        if name in POLICIES:
            methods[name] = Incremental(name, stream, cfg.bits, shard(name), s, start, cfg.seed)
        elif name == "lsh":
            methods[name] = LSHMethod(stream, cfg.bits, shard(name), cfg.seed)
        elif name not in ("full_retrain", "full_retrain_same_labels"):
            raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
    retrains = [name for name in ("full_retrain", "full_retrain_same_labels") if name in cfg.methods]
    ref = methods.get("streamhash") or next((m for m in methods.values() if isinstance(m, Incremental)), None)
    if retrains and ref is None:
        raise ValueError(f"{retrains[0]} is given an incremental method's CPU seconds: name one beside it")
    for name in retrains:
        held = (lambda: set(ref.hasher.learner.held_ids)) if name == "full_retrain_same_labels" else None
        methods[name] = FullRetrain(stream, cfg.bits, shard(name), s, start, cfg.seed, lambda: ref.cpu_seconds,
                                    name=name, held=held)
    return methods


def run(stream: Stream, cfg: EvalConfig, log=print, final=None) -> dict:
    """``final(name, method)``, if given, is called for every method after the last chunk, before its shard
    closes (``benchmarks/learned_ties.py`` reads what it serves)."""
    torch.manual_seed(cfg.seed)
    s = cfg.learn
    chunks = stream.arrivals()
    order = np.concatenate(chunks)
    log(f"[{cfg.protocol}] {len(stream.queries)} queries, {len(chunks)} chunks of ~{len(chunks[0])}, "
        f"{stream.labeled[order].mean():.0%} labeled, bits {cfg.bits}, from the untrained initial network")
    with tempfile.TemporaryDirectory(prefix="streamhash-eval-") as tmp:
        methods = make_methods(stream, cfg, Path(tmp))
        position = 0
        for step, chunk in enumerate(chunks, 1):
            position += len(chunk)
            for m in methods.values():
                m.arrive(chunk, position, step == len(chunks))
                evaluate(m, stream, cfg, position)
            log(f"step {step} pos {position}: " + ", ".join(
                f"{n} {m.curve[-1][1]['map']:.4f}{'*' if position in m.events else ''}" for n, m in methods.items()))
        out = {"protocol": cfg.protocol, "bits": cfg.bits, "database": int(len(order) if stream.everything is None
                                                                           else len(stream.everything)),
               "budget": {"rounds": len(chunks), "round_alternations": s.iters, "omega": s.omega, "epochs": s.epochs},
               "config": {"seed": cfg.seed, "topk": cfg.topk, "learn": s.model_dump()}, "methods": {}}
        for name, m in methods.items():
            if final is not None:
                final(name, m)
            last = m.curve[-1][1]
            out["methods"][name] = {"map": last["map"], "map_at_1000": last["map_at_k"], "p_r2": last["p_r2"],
                                    "p_at_1000": last["p_at_k"], "inferred_top10": last["inferred_top10"],
                                    "inferred_index": last["inferred_index"], **m.result()}
            if m.mi_log:
                out["methods"][name]["mi_log"] = m.mi_log
            m.shard.close()
        for name in ("full_retrain", "full_retrain_same_labels"):
            if name in methods:
                r = out["methods"][name]
                out["budget"] |= {f"{name}_cpu_seconds": r["budget_cpu_seconds"], f"{name}_alternations": r["alternations"]}
    return out
