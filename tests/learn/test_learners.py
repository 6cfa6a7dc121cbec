"""Every learner passes the learner check suite (``learner_checks.py``): DIHN, and a minimal learner written here
that is a complete example of the contract in ``streamhash/learn/base.py``."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from streamhash.codes import pack_signs, unpack_signs
from streamhash.learn.base import RoundResult
from streamhash.learn.dihn import DIHNLearner
from streamhash.learn.labels import normalise_label_sets
from streamhash.model.hashnet import HashNet, HashNetConfig
from tests.learn.learner_checks import BITS, check_id, yield_checks


class ClassMeanLearner:
    """A round gives each pending item the sign of the mean code of its labels' items (every labeled item,
    frozen or pending; ties to +1), the network stays as it was: DCC without the network, and no image read."""

    def __init__(self, net: HashNet):
        self.net, self.bits = net, net.cfg.bits
        self._codes: dict = {}  # id -> packed code
        self._labels: dict = {}  # id -> label set, for labeled items in learning (not quarantined)
        self._pending: dict = {}  # insertion-ordered set of pending ids
        self.rounds = 0

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    @property
    def pending_ids(self) -> list:
        return list(self._pending)

    def add_items(self, ids, codes, labels=None, *, frozen=True, held=None):
        sets = normalise_label_sets(labels) if labels is not None else [frozenset()] * len(ids)
        for i, code, lab in zip(ids, np.asarray(codes, np.uint8), sets):
            self._codes[i] = code.copy()
            self._pending.pop(i, None)
            self._labels.pop(i, None)
            if lab:
                self._labels[i] = lab
                if not frozen:
                    self._pending[i] = None

    def learn_round(self, fetch_images, *, iters=None, should_stop=None):
        ids = list(self._pending)
        before = np.stack([self._codes[i] for i in ids]) if ids else np.zeros((0, self.bits // 8), np.uint8)
        sums: dict = {}
        for i, lab in self._labels.items():
            for label in lab:
                total, n = sums.get(label, (0.0, 0))
                sums[label] = (total + unpack_signs(self._codes[i][None], self.bits)[0], n + 1)
        for i in ids:
            mean = sum(sums[label][0] / sums[label][1] for label in self._labels[i])
            self._codes[i] = pack_signs(np.where(mean >= 0, 1.0, -1.0)[None])[0]
        self._pending = {}
        self.rounds += 1
        codes = np.stack([self._codes[i] for i in ids]) if ids else before
        return RoundResult(ids, codes, int((codes != before).any(axis=1).sum()), float("nan"), 0.0, 1, 0, self.rounds)

    def codes(self, ids):
        return np.stack([self._codes[i] for i in ids])

    def set_codes(self, ids, codes):
        for i, code in zip(ids, np.asarray(codes, np.uint8)):
            self._codes[i] = code.copy()
            self._pending.pop(i, None)

    def encode(self, images):
        return self.net.encode(images)

    def quarantine_pending(self):
        ids = list(self._pending)
        for i in ids:
            self._labels.pop(i)
        self._pending = {}
        return ids

    def forget(self, ids):
        known = [i for i in ids if i in self._codes]
        for i in known:
            del self._codes[i]
            self._labels.pop(i, None)
            self._pending.pop(i, None)
        return len(known)

    def to_bytes(self) -> bytes:
        ids = list(self._codes)
        state = {"ids": ids, "labels": [sorted(self._labels.get(i, ())) for i in ids], "pending": list(self._pending),
                 "rounds": self.rounds, "net": self.net.to_bytes().hex()}
        buf = io.BytesIO()
        np.savez(buf, state=np.frombuffer(json.dumps(state).encode(), np.uint8), codes=self.codes(ids) if ids else
                 np.zeros((0, self.bits // 8), np.uint8))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "ClassMeanLearner":
        arrays = np.load(io.BytesIO(raw))
        state = json.loads(arrays["state"].tobytes())
        self = cls(HashNet.from_bytes(bytes.fromhex(state["net"])))
        self._codes = {i: c.copy() for i, c in zip(state["ids"], arrays["codes"])}
        self._labels = {i: frozenset(lab) for i, lab in zip(state["ids"], state["labels"]) if lab}
        self._pending = dict.fromkeys(state["pending"])
        self.rounds = state["rounds"]
        return self


def dihn():
    return DIHNLearner(HashNet(HashNetConfig(bits=BITS, seed=0)), omega=60, iters=2, epochs=1, batch_size=30, seed=0)


def class_mean():
    return ClassMeanLearner(HashNet(HashNetConfig(bits=BITS, seed=0)))


@pytest.mark.parametrize("check", list(yield_checks()), ids=check_id)
@pytest.mark.parametrize("factory", [dihn, class_mean], ids=["dihn", "class_mean"])
def test_learner_passes_the_suite(factory, check):
    check(factory)
