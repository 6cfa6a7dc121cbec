"""The methods compared on a stream. Every learning method drives the learner process's own code:
an :class:`~streamhash.learn.online.OnlineHasher` built from the same :class:`LearnSettings`, one
round per chunk, its MI test deciding (``streamhash``) or a fixed policy overriding it (the others).

The database stands in for a shard: per item its code and where the code came from, *learned* (DCC)
or *inferred* by network version v. An arriving item is encoded by the current network (version v,
as a worker encodes it); a round's learned codes replace their items' codes (as the learner's
published codes do); a re-encode to version v replaces what :func:`streamhash.codes.stale` says (the
rule the store's generation builder applies), or every code for ``full_every_round``.

* ``streamhash``: selective re-encode when the MI test fires.
* ``selective_every_round``: selective re-encode after every round.
* ``full_every_round``: every stored code replaced by the network's after every round (learned ones too).
* ``never_reencode``: plain DIHN.
* ``full_retrain``: ADSH on every labeled item seen, from a fresh network, with the incremental
  learner's cumulative budget (initial + rounds x iters alternations), once, after the last chunk;
  every code replaced (learned for its training items). Before that, the initial model encodes arrivals.
* ``lsh``: signs of random projections of centred pixels (mean of D0).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np

from streamhash.codes import stale
from streamhash.config import LearnSettings
from streamhash.eval.lsh import LSH
from streamhash.learn.dihn import DIHNLearner
from streamhash.learn.online import OnlineHasher, in_holdout
from streamhash.model.hashnet import HashNet, HashNetConfig

POLICIES = {"streamhash": "mi", "selective_every_round": "selective", "full_every_round": "full",
            "never_reencode": "never"}


class CodeTable:
    """Codes and their provenance, addressed by dataset index."""

    def __init__(self, n: int, bits: int):
        self.codes = np.zeros((n, bits // 8), np.uint8)
        self.present = np.zeros(n, bool)
        self.learned = np.zeros(n, bool)
        self.model = np.full(n, -1, np.int64)

    def put(self, idx, codes, *, learned: bool, model: int) -> None:
        idx = np.asarray(idx, np.int64)
        self.codes[idx], self.present[idx], self.learned[idx], self.model[idx] = codes, True, learned, model

    @property
    def ids(self) -> np.ndarray:
        return np.flatnonzero(self.present)


class Initial:
    """The shared starting point: ADSH (DIHN with every code learnable) on D0's labeled items, minus the
    learner's labeled hold-out, whose images the learner never trains on (the first round learns their codes)."""

    def __init__(self, stream, settings: LearnSettings, bits: int, seed: int, iters: int, fetch):
        self.hasher = OnlineHasher(HashNet(HashNetConfig(bits=bits, seed=seed)), settings, seed=seed)
        d0 = stream.d0
        lab = stream.labeled[d0]
        self.trained = d0[lab & ~self._holdout(d0)] if stream.train_initial else d0[:0]
        self.seconds = 0.0
        learner = self.hasher.learner
        codes = learner.encode(stream.images[d0]) if len(d0) else np.zeros((0, bits // 8), np.uint8)
        if len(self.trained):
            t0 = time.perf_counter()
            learner.add_items(self.trained.tolist(), codes[np.isin(d0, self.trained)], stream.labels[self.trained], frozen=False)
            learner.learn_round(fetch, iters=iters)
            self.seconds = time.perf_counter() - t0
            codes[np.isin(d0, self.trained)] = learner.codes(self.trained.tolist())
        self.d0, self.codes, self.bytes = d0, codes, learner.to_bytes()
        self.iters = iters if len(self.trained) else 0

    def _holdout(self, ids: np.ndarray) -> np.ndarray:
        return in_holdout(ids.tolist(), self.hasher.settings.holdout_fraction)


class Method:
    def __init__(self, name: str, stream, bits: int):
        self.name, self.stream, self.bits = name, stream, bits
        self.table = CodeTable(len(stream.labels), bits)
        # wall seconds (all, re-encodes, MI tests) and CPU seconds of this process (all threads): on a shared
        # machine the CPU time is the steadier measure of what a method costs
        self.seconds = self.reencode_seconds = self.mi_seconds = self.cpu_seconds = 0.0
        self.reencodes = self.images_reencoded = 0
        self.events: list = []
        self.curve: list = []
        self.mi_log: list = []

    @contextmanager
    def clock(self, part: str = ""):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        wall = time.perf_counter() - wall
        self.seconds += wall
        self.cpu_seconds += time.process_time() - cpu
        if part == "reencode":
            self.reencode_seconds += wall

    def encode(self, idx) -> np.ndarray:
        raise NotImplementedError

    def arrive(self, chunk: np.ndarray, position: int, last: bool) -> None:
        raise NotImplementedError

    def result(self) -> dict:
        return {"reencodes": self.reencodes, "images_reencoded": self.images_reencoded,
                "seconds": round(self.seconds, 2), "cpu_seconds": round(self.cpu_seconds, 2),
                "train_seconds": round(self.seconds - self.reencode_seconds - self.mi_seconds, 2),
                "reencode_seconds": round(self.reencode_seconds, 2), "mi_seconds": round(self.mi_seconds, 2),
                "events": self.events, "curve": [(p, m["map"]) for p, m in self.curve]}


class Incremental(Method):
    def __init__(self, name: str, stream, bits: int, settings: LearnSettings, init: Initial, seed: int, fetch):
        super().__init__(name, stream, bits)
        self.policy, self.fetch = POLICIES[name], fetch
        learner = DIHNLearner.from_bytes(init.bytes)
        self.hasher = OnlineHasher(learner.net, settings, seed=seed, learner=learner)
        self.version = 0
        d0, trained = init.d0, np.isin(init.d0, init.trained)
        if len(d0):
            self.table.put(d0, init.codes, learned=False, model=0)
            self.table.learned[d0[trained]] = True
            labels = self._labels(d0)
            # as the learner process finds a shard: learned and unlabeled codes frozen; the labeled ones never
            # learned (D0's hold-out, left out of the initial model) observed as new: the first round learns
            # their codes, and their codes at arrival are the re-encode test's shadows
            holdout = ~trained & stream.labeled[d0]
            for mask, frozen in ((~holdout, True), (holdout, False)):
                if mask.any():
                    self.hasher.observe(d0[mask].tolist(), init.codes[mask], [labels[i] for i in np.flatnonzero(mask)],
                                        frozen=frozen)

    def _labels(self, idx: np.ndarray) -> list:
        s = self.stream
        return [int(s.labels[i]) if s.labeled[i] else None for i in idx.tolist()]

    def encode(self, idx) -> np.ndarray:
        return self.hasher.learner.encode(self.stream.images[np.asarray(idx, np.int64)])

    def arrive(self, chunk: np.ndarray, position: int, last: bool) -> None:
        with self.clock():
            codes = self.encode(chunk)
            self.table.put(chunk, codes, learned=False, model=self.version)
            self.hasher.observe(chunk.tolist(), codes, self._labels(chunk))
            report = self.hasher.learn_round(self.fetch, test=self.policy == "mi")
            self.version += 1
            self.table.put(report.round.ids, report.round.codes, learned=True, model=self.version)
        if self.policy == "mi":
            self.mi_seconds += report.mi_seconds
            self.mi_log.append({"pos": position, "live": report.mi_live, "candidate": report.mi_candidate,
                                "gain": report.gain, "sigma": report.sigma, "bound": report.decision.bound,
                                "fire": report.reencode, "cost": report.cost})
        fire = {"mi": report.reencode, "selective": True, "full": True, "never": False}[self.policy]
        if fire:
            self.reencode(position, full=self.policy == "full")

    def reencode(self, position: int, *, full: bool) -> None:
        t = self.table
        with self.clock("reencode"):
            ids = t.ids if full else t.ids[stale(t.learned[t.ids], t.model[t.ids], self.version)]
            codes = self.encode(ids)
            t.put(ids, codes, learned=False, model=self.version)
            self.hasher.apply_reencode(ids.tolist(), codes)
        self.reencodes += 1
        self.images_reencoded += len(ids)
        self.events.append(position)


class FullRetrain(Method):
    def __init__(self, stream, bits: int, settings: LearnSettings, init: Initial, seed: int, fetch, budget: int):
        super().__init__("full_retrain", stream, bits)
        self.settings, self.seed, self.fetch, self.budget = settings, seed, fetch, budget
        self.learner = DIHNLearner.from_bytes(init.bytes)
        if len(init.d0):
            self.table.put(init.d0, init.codes, learned=False, model=0)

    def encode(self, idx) -> np.ndarray:
        return self.learner.encode(self.stream.images[np.asarray(idx, np.int64)])

    def arrive(self, chunk: np.ndarray, position: int, last: bool) -> None:
        with self.clock():
            self.table.put(chunk, self.encode(chunk), learned=False, model=0)
        if not last:
            return
        s, ids = self.stream, self.table.ids
        train = ids[s.labeled[ids]]
        with self.clock():
            fresh = OnlineHasher(HashNet(HashNetConfig(bits=self.bits, seed=self.seed)), self.settings, seed=self.seed)
            self.learner = fresh.learner
            self.learner.add_items(train.tolist(), self.encode(train), s.labels[train], frozen=False)
            self.learner.learn_round(self.fetch, iters=self.budget)
            self.table.put(ids, self.encode(ids), learned=False, model=1)
            self.table.put(train, self.learner.codes(train.tolist()), learned=True, model=1)
        self.reencodes, self.images_reencoded = 1, len(ids)
        self.events.append(position)


class LSHMethod(Method):
    def __init__(self, stream, bits: int, seed: int):
        super().__init__("lsh", stream, bits)
        fit_on = stream.d0 if len(stream.d0) else stream.chunks[0]
        self.lsh = LSH(bits, stream.images[0].size, seed=seed).fit(stream.images[fit_on])
        if len(stream.d0):
            self.table.put(stream.d0, self.encode(stream.d0), learned=False, model=0)

    def encode(self, idx) -> np.ndarray:
        return self.lsh.encode(self.stream.images[np.asarray(idx, np.int64)])

    def arrive(self, chunk: np.ndarray, position: int, last: bool) -> None:
        with self.clock():
            self.table.put(chunk, self.encode(chunk), learned=False, model=0)
