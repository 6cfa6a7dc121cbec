"""Fashion-MNIST protocols and the methods compared on them, all in one run.

Split (both protocols, seeded): 1,000 queries, 100 per class, drawn from the 70,000 images; the other
69,000 form the retrieval set R.

**class-incremental** (DIHN's): the initial database D0 = items of R with classes 0-6; the stream =
items of R with classes 7-9 in a seeded shuffle, cut into ``chunks`` equal chunks. At step t the
database is D0 + chunks 1..t; queries whose class is not yet in the database have no relevant item
and are left out of mAP@all (see metrics).

**online** (the online-hashing literature's): the stream is the first ``stream`` items of a seeded
shuffle of R, cut into chunks of ``chunk_size``; the first chunk plays D0. The database is always all
of R: streamed items hold the codes the method gave them; items not streamed yet are encoded with the
method's current network when the index is evaluated (they are indexed "now").

Every method starts from the same initial model: ADSH (= DIHN with every code learnable) trained on
D0 for ``init_iters`` alternations; D0's codes are its learned codes. Then, per chunk:

* ``streamhash``: a DIHN round on the chunk (old codes frozen, the chunk's codes learned), then the MI
  test on a reservoir of the labeled items seen so far: re-encode every stored item with the new
  network iff Q(candidate) - Q(live) > threshold.
* ``dihn_no_reencode``: the same rounds, never re-encodes.
* ``reencode_every_round``: the same rounds, re-encodes after every round.
* ``full_retrain``: ADSH from a fresh network on everything seen (D0 + chunks 1..t), ``init_iters``
  alternations; every stored code is replaced (learned codes for the training items, network codes
  for the rest) — the accuracy upper bound.
* ``frozen``: the initial model; new items get its encodings on arrival.
* ``lsh``: random projections of centred pixels (mean of D0).

A re-encode replaces every stored code with the current network's encoding. Queries are always
encoded with the method's current network. ``train_seconds`` is the stream learning time (the shared
initial training is reported once as ``init_seconds``); ``reencode_seconds`` the time spent
re-encoding; ``mi_seconds`` the MI tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from streamhash.eval import METHODS
from streamhash.eval.lsh import LSH
from streamhash.eval.metrics import retrieval_metrics
from streamhash.learn.dihn import DIHNLearner
from streamhash.learn.mi import mi_quality
from streamhash.learn.reservoir import Reservoir
from streamhash.learn.trigger import MITrigger
from streamhash.model.hashnet import HashNet, HashNetConfig


@dataclass
class ProtocolConfig:
    protocol: str = "class-incremental"
    bits: int = 32
    seed: int = 0
    queries_per_class: int = 100
    retrieval_limit: int | None = None  # subsample R (quick mode)
    chunks: int = 5  # class-incremental
    stream: int = 20_000  # online
    chunk_size: int = 2_000  # online
    init_iters: int = 40
    round_iters: int = 8
    omega: int = 2000
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 64
    gamma: float = 200.0
    mu: float = 50.0
    new_fraction: float = 0.5
    reservoir: int = 1000
    mi_threshold: float = 0.0
    topk: int = 1000
    methods: tuple = METHODS


@dataclass
class MethodState:
    name: str
    learner: DIHNLearner | None = None
    lsh: LSH | None = None
    train_seconds: float = 0.0
    reencode_seconds: float = 0.0
    mi_seconds: float = 0.0
    reencodes: int = 0
    events: list = field(default_factory=list)  # stream positions of re-encodes
    curve: list = field(default_factory=list)  # (stream position, metrics dict)
    mi_log: list = field(default_factory=list)


def split_queries(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                        for c in np.unique(labels)])
    q = np.sort(q)
    mask = np.ones(len(labels), bool)
    mask[q] = False
    return q, np.flatnonzero(mask)


def make_learner(cfg: ProtocolConfig, seed_offset: int = 0) -> DIHNLearner:
    net = HashNet(HashNetConfig(bits=cfg.bits, seed=cfg.seed + seed_offset))
    return DIHNLearner(net, gamma=cfg.gamma, mu=cfg.mu, omega=cfg.omega, epochs=cfg.epochs,
                       iters=cfg.round_iters, lr=cfg.lr, batch_size=cfg.batch_size,
                       new_fraction=cfg.new_fraction, seed=cfg.seed + seed_offset)


def run_protocol(cfg: ProtocolConfig, images: np.ndarray, labels: np.ndarray, log=print) -> dict:
    torch.manual_seed(cfg.seed)
    q_idx, r_idx = split_queries(labels, cfg.queries_per_class, cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    if cfg.retrieval_limit and cfg.retrieval_limit < len(r_idx):
        r_idx = np.sort(rng.choice(r_idx, cfg.retrieval_limit, replace=False))
    if cfg.protocol == "class-incremental":
        d0 = r_idx[labels[r_idx] < 7]
        stream = rng.permutation(r_idx[labels[r_idx] >= 7])
        chunks = np.array_split(stream, cfg.chunks)
        background = np.zeros(0, np.int64)  # every database item is in D0 or the stream
    elif cfg.protocol == "online":
        order = rng.permutation(r_idx)
        s = order[: cfg.stream]
        d0 = s[: cfg.chunk_size]
        chunks = [s[i:i + cfg.chunk_size] for i in range(cfg.chunk_size, len(s), cfg.chunk_size)]
        background = np.sort(order[cfg.stream:])  # in the database, not in the stream
        # stream items past the stream length are the background; first-chunk items are D0
    else:
        raise ValueError(f"unknown protocol {cfg.protocol!r}")
    fetch = lambda ids: images[np.asarray(ids, dtype=np.int64)]  # noqa: E731  ids = dataset indices
    q_images, q_labels = images[q_idx], labels[q_idx]
    log(f"[{cfg.protocol}] {len(q_idx)} queries, D0 {len(d0)}, {len(chunks)} chunks of ~{len(chunks[0]) if chunks else 0}, "
        f"background {len(background)}, bits {cfg.bits}")

    # ---- shared initial model: ADSH on D0
    t0 = time.perf_counter()
    init = make_learner(cfg)
    init.add_items(d0.tolist(), init.encode(images[d0]), labels[d0], frozen=False)
    init.learn_round(fetch, iters=cfg.init_iters)
    init_seconds = time.perf_counter() - t0
    log(f"initial model: {init_seconds:.1f}s")
    init_bytes = init.to_bytes()

    states: dict[str, MethodState] = {}
    for name in cfg.methods:
        st = MethodState(name)
        if name == "lsh":
            st.lsh = LSH(cfg.bits, images[0].size, seed=cfg.seed).fit(images[d0])
        else:
            st.learner = DIHNLearner.from_bytes(init_bytes)
        states[name] = st
    reservoir = Reservoir(cfg.reservoir, seed=cfg.seed)
    reservoir.update_many(d0.tolist(), labels[d0].tolist())
    trigger = MITrigger(cfg.mi_threshold)
    seen = [d0]
    pos = len(d0) if cfg.protocol == "online" else 0

    def evaluate(st: MethodState, position: int) -> dict:
        db_idx = np.concatenate(seen)
        if st.lsh is not None:
            db_codes = st.lsh.encode(images[db_idx])
            q_codes = st.lsh.encode(q_images)
        else:
            db_codes = st.learner.codes(db_idx.tolist())
            q_codes = st.learner.encode(q_images)
        if len(background):
            enc = st.lsh.encode if st.lsh is not None else st.learner.encode
            db_codes = np.concatenate([db_codes, enc(images[background])])
            db_idx = np.concatenate([db_idx, background])
        m = retrieval_metrics(q_codes, q_labels, db_codes, labels[db_idx], cfg.bits, topk=cfg.topk)
        st.curve.append((position, m))
        return m

    for st in states.values():
        evaluate(st, pos)
    log(f"step 0 pos {pos}: " + ", ".join(f"{n} {s.curve[-1][1]['map']:.4f}" for n, s in states.items()))

    for step, chunk in enumerate(chunks, 1):
        seen.append(chunk)
        pos += len(chunk)
        reservoir.update_many(chunk.tolist(), labels[chunk].tolist())
        for name, st in states.items():
            if name == "lsh":
                continue
            L = st.learner
            if name == "full_retrain":
                t = time.perf_counter()
                all_idx = np.concatenate(seen)
                L = make_learner(cfg)
                L.add_items(all_idx.tolist(), L.encode(images[all_idx]), labels[all_idx], frozen=False)
                L.learn_round(fetch, iters=cfg.init_iters)
                st.learner = L
                st.train_seconds += time.perf_counter() - t
                st.reencodes += 1
                st.events.append(pos)
                continue
            # arrival: provisional codes from the current network
            L.add_items(chunk.tolist(), L.encode(images[chunk]), labels[chunk], frozen=(name == "frozen"))
            if name == "frozen":
                continue
            t = time.perf_counter()
            L.learn_round(fetch)
            st.train_seconds += time.perf_counter() - t
            fire = name == "reencode_every_round"
            if name == "streamhash":
                t = time.perf_counter()
                r_ids = list(reservoir.ids)
                r_lab = list(reservoir.payloads)
                live = mi_quality(L.codes(r_ids), r_lab, cfg.bits)
                cand = mi_quality(L.encode(fetch(r_ids)), r_lab, cfg.bits)
                dec = trigger.update(live, cand)
                st.mi_seconds += time.perf_counter() - t
                st.mi_log.append({"pos": pos, "live": live, "candidate": cand, "gain": dec.gain,
                                  "fire": dec.fire, "drift": dec.drift})
                fire = dec.fire
            if fire:
                t = time.perf_counter()
                L.reencode(fetch)
                st.reencode_seconds += time.perf_counter() - t
                st.reencodes += 1
                st.events.append(pos)
        for st in states.values():
            evaluate(st, pos)
        log(f"step {step} pos {pos}: " + ", ".join(f"{n} {s.curve[-1][1]['map']:.4f}" for n, s in states.items()))

    out = {"protocol": cfg.protocol, "bits": cfg.bits, "init_seconds": init_seconds, "config": cfg.__dict__ | {"methods": list(cfg.methods)},
           "methods": {}}
    for name, st in states.items():
        final = st.curve[-1][1]
        out["methods"][name] = {
            "map": final["map"], "map_at_1000": final["map_at_k"], "p_r2": final["p_r2"],
            "p_at_1000": final["p_at_k"], "reencodes": st.reencodes, "train_seconds": round(st.train_seconds, 2),
            "reencode_seconds": round(st.reencode_seconds, 2), "mi_seconds": round(st.mi_seconds, 2),
            "events": st.events, "curve": [(p, m["map"]) for p, m in st.curve],
        }
        if st.mi_log:
            out["methods"][name]["mi_log"] = st.mi_log
    return out
