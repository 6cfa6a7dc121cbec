"""The methods compared on a stream. Every learning method drives the learner process's own code:
an :class:`~streamhash.learn.online.OnlineHasher` built from the same :class:`LearnSettings`, starting
from the network a new store starts from (:func:`streamhash.model.state.initial_net`, untrained), one
round per chunk, its MI test deciding (``streamhash``) or a fixed policy overriding it (the others).

Each method's database is a real shard (:class:`~streamhash.eval.shard.EvalShard`): an arriving item is
written with the code the current network (version v) gives it, as a worker writes it; a round's learned
codes are applied as a worker applies the learner's; a re-encode is the worker's own generation build
(stale inferred codes only, :func:`streamhash.codes.stale`), and the learner is told the new codes as its
feed tells it after a swap.

* ``streamhash``: selective re-encode when the MI test fires.
* ``selective_every_round``: selective re-encode after every round.
* ``full_every_round``: every stored item written again with the network's code after every round
  (learned ones too).
* ``never_reencode``: plain DIHN.
* ``full_retrain``: ADSH (DIHN with every code learnable) on every labeled item seen, from the same
  untrained network, once, after the last chunk, for as many alternations as fit in the CPU seconds the
  ``streamhash`` method spent over the whole stream (its budget, stated in the result); every item then
  written again with the new network's code (learned for its training items). Before that, the untrained
  network encodes arrivals.
* ``full_retrain_same_labels`` (named only): the same retrain with the labeled items the ``streamhash``
  learner held out (its MI test's and stop rule's unseen labels) held out too: their codes are learned,
  their images never trained on. A retrain on the labels the learner can train on.
* ``lsh``: signs of random projections of centred pixels (mean of the first chunk).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np

from streamhash.config import LearnSettings
from streamhash.eval.lsh import LSH
from streamhash.eval.shard import EvalShard, ids_of
from streamhash.learn.online import OnlineHasher
from streamhash.model.hashnet import HashNet

POLICIES = {"streamhash": "mi", "selective_every_round": "selective", "full_every_round": "full",
            "never_reencode": "never"}


def fetcher(images: np.ndarray):
    """The learner's ``fetch_images`` over the stream's images (ids: dataset indices as strings)."""
    return lambda ids: images[np.fromiter((int(i) for i in ids), np.int64, len(ids))]


class Method:
    def __init__(self, name: str, stream, bits: int, shard: EvalShard):
        self.name, self.stream, self.bits, self.shard = name, stream, bits, shard
        # wall seconds (all, re-encodes, MI tests) and CPU seconds of this process: on a shared machine the
        # CPU time is the steadier measure of what a method costs (one torch thread, as the learner runs)
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

    def _labels(self, idx: np.ndarray) -> list:
        s = self.stream
        return [int(s.labels[i]) if s.labeled[i] else None for i in np.asarray(idx).tolist()]

    def result(self) -> dict:
        maps = [m["map"] for _, m in self.curve]
        return {"reencodes": self.reencodes, "images_reencoded": self.images_reencoded,
                "seconds": round(self.seconds, 2), "cpu_seconds": round(self.cpu_seconds, 2),
                "train_seconds": round(self.seconds - self.reencode_seconds - self.mi_seconds, 2),
                "reencode_seconds": round(self.reencode_seconds, 2), "mi_seconds": round(self.mi_seconds, 2),
                "map_stream": float(np.mean(maps)) if maps else 0.0,
                "events": self.events, "curve": [(p, m["map"]) for p, m in self.curve]}


class Incremental(Method):
    def __init__(self, name: str, stream, bits: int, shard: EvalShard, settings: LearnSettings, start: bytes, seed: int):
        super().__init__(name, stream, bits, shard)
        self.policy, self.fetch = POLICIES[name], fetcher(stream.images)
        self.hasher = OnlineHasher(HashNet.from_bytes(start), settings, seed=seed)
        self.version = 1  # a new store's initial network

    def encode(self, idx) -> np.ndarray:
        return self.hasher.learner.encode(self.stream.images[np.asarray(idx, np.int64)])

    def arrive(self, chunk: np.ndarray, position: int, last: bool) -> None:
        with self.clock():
            codes = self.encode(chunk)
            self.shard.write(chunk, codes, self.version)
            self.hasher.observe(ids_of(chunk), codes, self._labels(chunk))
            report = self.hasher.learn_round(self.fetch, test=self.policy == "mi")
            self.version += 1
            self.shard.learned(report.round.ids, report.round.codes, self.version)
        if self.policy == "mi":
            self.mi_seconds += report.mi_seconds
            self.mi_log.append({"pos": position, "live": report.mi_live, "candidate": report.mi_candidate,
                                "gain": report.gain, "sigma": report.sigma, "bound": report.decision.bound,
                                "fire": report.reencode, "cost": report.cost})
        fire = {"mi": report.reencode, "selective": True, "full": True, "never": False}[self.policy]
        if fire:
            self.reencode(position, full=self.policy == "full")

    def reencode(self, position: int, *, full: bool) -> None:
        with self.clock("reencode"):
            if full:  # not a product path: every item sent again, learned codes lost
                idx = self.shard.snapshot()[0]
                self.shard.write(idx, self.encode(idx), self.version)
                n = len(idx)
            else:
                n = self.shard.reencode(self.hasher.net, self.version)
            idx, codes, _ = self.shard.snapshot()  # as the learner's feed reads a swapped shard
            self.hasher.apply_reencode(ids_of(idx), codes)
        self.reencodes += 1
        self.images_reencoded += n
        self.events.append(position)


class FullRetrain(Method):
    """``budget()``: the CPU seconds to match (the reference method's, read after its last round)."""

    def __init__(self, stream, bits: int, shard: EvalShard, settings: LearnSettings, start: bytes, seed: int, budget,
                 *, name: str = "full_retrain", held=None):
        super().__init__(name, stream, bits, shard)
        self.settings, self.start, self.seed, self.budget, self.held = settings, start, seed, budget, held
        self.net = HashNet.from_bytes(start)
        self.alternations, self.budget_seconds, self._encode_rate = 0, 0.0, []

    def encode(self, idx) -> np.ndarray:
        return self.net.encode(self.stream.images[np.asarray(idx, np.int64)])

    def arrive(self, chunk: np.ndarray, position: int, last: bool) -> None:
        cpu = time.process_time()
        with self.clock():
            self.shard.write(chunk, self.encode(chunk), 1)
        self._encode_rate.append((time.process_time() - cpu) / max(len(chunk), 1))
        if last:
            self.retrain(position)

    def retrain(self, position: int) -> None:
        s = self.stream
        idx = self.shard.snapshot()[0]
        train = idx[s.labeled[idx]]
        self.budget_seconds = float(self.budget())
        # what is left for training: the budget less what arrivals cost and what the final writes will (the same
        # work as an arrival: encode and write every item once; twice that left a CIFAR-10 retrain 22% short)
        left = self.budget_seconds - self.cpu_seconds - float(np.mean(self._encode_rate)) * len(idx)
        with self.clock():
            t0, done = time.process_time(), [0]

            def until() -> bool:  # stop at the alternation boundary nearest the budget (the error: half of one)
                done[0] += 1
                spent = time.process_time() - t0
                return spent + spent / done[0] / 2 >= left

            learner = OnlineHasher(HashNet.from_bytes(self.start), self.settings, seed=self.seed).learner
            ids = ids_of(train)
            held = self.held() if self.held is not None else set()
            learner.add_items(ids, learner.encode(s.images[train]), self._labels(train), frozen=False,
                              held=[i in held for i in ids])
            res = learner.learn_round(fetcher(s.images), iters=10**6, until=until)
            self.net, self.alternations = learner.net, res.iterations
            self.shard.write(idx, self.encode(idx), 2)
            self.shard.learned(ids, learner.codes(ids), 2)
        self.reencodes, self.images_reencoded = 1, len(idx)
        self.events.append(position)

    def result(self) -> dict:
        return super().result() | {"alternations": self.alternations, "budget_cpu_seconds": round(self.budget_seconds, 2)}


class LSHMethod(Method):
    def __init__(self, stream, bits: int, shard: EvalShard, seed: int):
        super().__init__("lsh", stream, bits, shard)
        fit_on = stream.d0 if len(stream.d0) else stream.chunks[0]
        self.lsh = LSH(bits, stream.images[0].size, seed=seed).fit(stream.images[fit_on])

    def encode(self, idx) -> np.ndarray:
        return self.lsh.encode(self.stream.images[np.asarray(idx, np.int64)])

    def arrive(self, chunk: np.ndarray, position: int, last: bool) -> None:
        with self.clock():
            self.shard.write(chunk, self.encode(chunk), 1)
