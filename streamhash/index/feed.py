"""The learner's read-only view of a store root: every shard of the images topic, followed through its change log.

:class:`ShardFeed` opens each shard under the root read-only as it appears (a worker creates a shard
when it is first assigned the partition) and feeds its items to a :class:`Learning` sink (the learner
process's :class:`~streamhash.learn.online.OnlineHasher`), the way the query server's LiveIndex follows a
store: from the last seq it read, O(new items). It never opens a shard writable. It sits with the store it
follows, so that ``learn/`` holds the algorithms alone and neither package imports the other.

- A shard seen for the first time (a start, a restart, a new partition) is read whole from one
  snapshot: learned codes frozen, quarantined items out of learning, labeled items indexed but never
  learned pending (:func:`observe_snapshot`).
- A change with a Kafka timestamp is a new or re-sent item: observed. A change without one is a learned
  code the shard's worker applied (``put_codes`` / ``apply_updates`` log it in ``recodes`` under a new seq): the
  hasher's code of that item is set to it, or, for an item pending again after a restart (its code
  was in flight), the seq it will be published with moves on, so the newer learned code wins.
- A shard whose generation changed (its worker re-encoded it) is read again: the codes of every item
  already seen are replaced by the new generation's (:meth:`Learning.apply_reencode`), so DIHN
  keeps training against the codes the index serves.

The stored inputs for a round (Omega, the MI reservoir) are read from the shard that holds each id: the features
kept with each item for a network with a frozen backbone, the decoded blobs for one trained end to end. An id lives in
exactly one shard (``index.store.root``), so no id -> shard map is kept, which would cost more than the
hasher's own bookkeeping (~45 B an item): each shard is asked for the ids the earlier ones lacked.
Only items that will be learned keep where they live (partition, seq), until their code is published; a code a
round re-learned (``relearn``) for an item learned before is published where a look-up at that time finds it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import lmdb
import numpy as np

from streamhash import metrics as m
from streamhash.errors import FeatureSpecMismatch, SchemaMismatchError, StoreError
from streamhash.index.store import Snapshot, Store
from streamhash.index.store.layout import describe_features
from streamhash.index.store.root import ShardKey, StoreRoot
from streamhash.records import ImageSpec, decode_images

log = logging.getLogger(__name__)


class Learning(Protocol):
    """Where the feed puts what it reads (:class:`~streamhash.learn.online.OnlineHasher` is one)."""

    @property
    def net(self) -> Any:
        """The network being trained: the feed refuses a shard whose codes have another length than ``net.cfg.bits``."""

    def observe(self, ids: Sequence, codes: np.ndarray, labels=None, *, frozen: bool = False, learned: bool = True) -> None:
        """Items indexed: labeled ones to learn (``frozen=False``), or old codes (``frozen=True``: learned ones, or
        with ``learned=False`` quarantined ones, never learned from)."""

    def apply_reencode(self, ids: Sequence, codes: np.ndarray) -> None:
        """The codes the index now holds for these items (a re-encode, or a learned code a worker applied)."""


@dataclass
class _Shard:
    key: ShardKey
    store: Store
    generation: int
    last_seq: int = 0


class ShardFeed:
    """The shards of ``topic`` under ``root``, followed into ``hasher``; ``pending_at`` maps each item a
    round will learn to (partition, seq) — where its learned code goes and which version of it was learned."""

    def __init__(self, root: StoreRoot, topic: str, hasher: Learning, spec: ImageSpec, *, chunk: int = 10_000):
        self.root, self.topic, self.hasher, self.spec, self.chunk = root, topic, hasher, spec, chunk
        self.shards: dict[ShardKey, _Shard] = {}
        self.pending_at: dict[str, tuple[int, int]] = {}

    def poll(self) -> int:
        """Open the shards that appeared, read what every shard wrote since; returns the changes read."""
        for key in self.root.shards():
            if key.topic == self.topic and key not in self.shards:
                self._open(key)
        return sum(self._follow(s) for s in self.shards.values())

    def behind(self, generation: int) -> list[ShardKey]:
        """Shards still below ``generation``: their workers have not re-encoded them yet."""
        return [s.key for s in self.shards.values() if s.generation < generation]

    def generations(self) -> dict[ShardKey, int]:
        return {k: s.generation for k, s in self.shards.items()}

    def _open(self, key: ShardKey) -> None:
        try:
            store = Store(self.root.shard_path(key), readonly=True)
        except (StoreError, lmdb.Error, KeyError) as exc:  # its worker is still creating it: next poll
            log.debug("shard %s not readable yet: %r", key, exc)
            return
        if store.bits != self.hasher.net.cfg.bits:
            store.close()
            raise SchemaMismatchError(f"shard {key} holds {store.bits}-bit codes, the learner's model "
                                      f"{self.hasher.net.cfg.bits}-bit ones (model.bits)")
        held, want = store.feature_spec(), getattr(self.hasher.net, "feature_spec", lambda: None)()
        if held and want and held != want:
            store.close()
            raise FeatureSpecMismatch(f"shard {key} keeps {describe_features(held)}, the learner's network takes "
                                      f"{describe_features(want)} (model.backbone / model.cut)")
        snap = store.snapshot()
        shard = _Shard(key, store, snap.generation, int(snap.seqs.max()) if len(snap.seqs) else 0)
        new = observe_snapshot(self.hasher, snap)
        self._remember_pending(key, [snap.ids[i] for i in new], snap.seqs[new].tolist(), [snap.labels[i] for i in new])
        self.shards[key] = shard
        log.info("following shard %s: %d items, generation %d%s", key, len(snap.ids), snap.generation,
                 f"; {len(new)} labeled items indexed but never learned are learned next" if len(new) else "")

    def _follow(self, shard: _Shard) -> int:
        gen, _, changes = shard.store.changes_since(shard.last_seq, self.chunk)
        if gen != shard.generation:
            self._reread(shard)
            gen, _, changes = shard.store.changes_since(shard.last_seq, self.chunk)
            if gen != shard.generation:  # swapped again meanwhile: next poll
                return 0
        last = changes[-1].seq if changes else shard.last_seq
        removed = [c.id for c in changes if c.deleted]
        if removed:  # tombstones: the item is gone from its shard, and from what the learner knows
            self.hasher.forget(removed)
            for item_id in removed:
                self.pending_at.pop(item_id, None)
        changes = [c for c in changes if not c.deleted] if removed else changes
        fresh = [c for c in changes if c.ts is not None]
        if fresh:
            ids = [c.id for c in fresh]
            self.hasher.observe(ids, _codes(fresh), [set(c.labels) if c.labels else None for c in fresh])
            self._remember_pending(shard.key, ids, [c.seq for c in fresh], [c.labels for c in fresh])
        recoded = [c for c in changes if c.ts is None and not self._moved(shard.key, c.id, c.seq)]
        if recoded:
            self.hasher.apply_reencode([c.id for c in recoded], _codes(recoded))
        shard.last_seq = last
        return len(changes) + len(removed)

    def _moved(self, key: ShardKey, item_id: str, seq: int) -> bool:
        """A learned code applied to an item pending here (in flight when the learner restarted): the code
        this learner learns will follow it, so it is published with the item's new seq."""
        if item_id not in self.pending_at:
            return False
        self.pending_at[item_id] = (key.partition, seq)
        return True

    def _reread(self, shard: _Shard) -> None:
        """The shard's worker swapped in another generation: the codes of the items seen so far, from it."""
        def on_chunk(seqs, codes, ids):
            seen = np.flatnonzero(seqs <= shard.last_seq)
            self.hasher.apply_reencode([ids[i] for i in seen], codes[seen])

        before = shard.generation
        shard.generation, _, _ = shard.store.read_generation(on_chunk, self.chunk)
        log.info("shard %s re-encoded: generation %d -> %d", shard.key, before, shard.generation)

    def _remember_pending(self, key: ShardKey, ids: list[str], seqs: list[int], labels: list) -> None:
        """(partition, seq) of the items a round will learn: the labeled ones."""
        for item_id, seq, lab in zip(ids, seqs, labels):
            if lab:
                self.pending_at[item_id] = (key.partition, int(seq))
            else:
                self.pending_at.pop(item_id, None)  # re-sent unlabeled: nothing of it to publish any more

    def take_pending(self, ids: list[str]) -> list[tuple[str, int, int, float | None]]:
        """(id, partition, seq, ts) of items whose code is about to be published; pending ones leave the map and
        name the seq they were read at (ts None). The others were learned in an earlier round and re-learned by this
        one (``relearn``): looked up in the shards (:meth:`_held`); an id found nowhere (removed meanwhile) is
        skipped with a warning."""
        out: dict[str, tuple[int, int, float | None]] = {}
        elsewhere = []
        for item_id in ids:
            at = self.pending_at.pop(item_id, None)
            if at is None:
                elsewhere.append(item_id)
            else:
                out[item_id] = (*at, None)
        if elsewhere:
            held, resent = self._held(elsewhere)
            out.update(held)
            for item_id in elsewhere:
                if item_id not in held and item_id not in resent:
                    log.warning("item %r was learned but its shard is unknown: its code is not published", item_id)
        return [(i, *out[i]) for i in ids if i in out]

    def _held(self, ids: list[str]) -> tuple[dict[str, tuple[int, int, float | None]], set[str]]:
        """(partition, current seq, ts) of items already learned, read from the shard that holds each, at publish
        time (no id -> shard map: see the module docstring). The update is matched by the item's timestamp, which a
        learned code applied keeps: a re-learned code published before the worker applied the last one's is then
        applied after it, not refused as stale. Returned apart (not published): ids written again since this feed
        last read their shard (a re-sent item, not a learned code): the feed observes them as new, and the round
        that learns them publishes their code."""
        found: dict[str, tuple[int, int, float | None]] = {}
        resent: set[str] = set()
        wanted = list(dict.fromkeys(ids))
        for shard in self.shards.values():  # each shard asked once, in one read, for the ids the earlier ones lacked
            missing = [i for i in wanted if i not in found and i not in resent]
            if not missing:
                break
            for item_id, rec in zip(missing, shard.store.get_items(missing)):
                if rec is None:
                    continue
                seq = int(rec["seq"])
                if seq > shard.last_seq and not rec.get("recoded"):
                    resent.add(item_id)
                else:
                    ts = rec.get("ts")
                    found[item_id] = (shard.key.partition, seq, None if ts is None else float(ts))
        if resent:
            log.info("%d re-learned codes not published: their items were sent again since (learned as new), e.g. %s",
                     len(resent), sorted(resent)[:3])
        return found, resent

    def fetch_images(self, ids: list) -> np.ndarray:
        """The network's stored input for each id, from the shard that holds it: the features stored with the item
        for a network with a frozen backbone (a round then never decodes an image nor runs the frozen part), the
        decoded blob for one trained end to end (or an item stored without a feature, in an older shard)."""
        net = self.hasher.net
        if getattr(net, "frozen", False):
            return self._fetch_features(ids, net)
        return self._decode(ids)

    def _fetch_features(self, ids: list, net) -> np.ndarray:
        found: dict[str, np.ndarray] = {}
        for shard in self.shards.values():
            missing = [i for i in ids if i not in found]
            if not missing:
                break
            found.update((i, f) for i, f in zip(missing, shard.store.features(missing)) if f is not None)
        lack = [i for i in ids if i not in found]
        if lack:  # written before its shard kept features: its image, through the frozen part, this once
            found.update(zip(lack, net.prepare(self._decode(lack))))
        out = np.stack([found[i] for i in ids]) if ids else np.zeros((0, *net.stored_shape), net.stored_dtype)
        if out.shape[1:] != tuple(net.stored_shape):
            raise SchemaMismatchError(f"stored features of shape {out.shape[1:]}, the learner's network takes "
                                      f"{tuple(net.stored_shape)} (model.backbone / model.cut)")
        return out

    def _decode(self, ids: list) -> np.ndarray:
        """Images decoded from the blobs in the shards that hold them."""
        found: dict[str, tuple[bytes, str]] = {}
        for shard in self.shards.values():
            missing = [i for i in ids if i not in found]
            if not missing:
                break
            found.update((i, b) for i, b in zip(missing, shard.store.get_blobs(missing)) if b is not None)
        absent = [i for i in ids if i not in found]
        if absent:
            raise StoreError(f"{len(absent)} items have no stored image in any shard, e.g. {absent[:3]}")
        m.STORED_IMAGES_DECODED.labels(purpose="learn").inc(len(ids))
        return decode_images([found[i] for i in ids], self.spec)

    def close(self) -> None:
        for s in self.shards.values():
            s.store.close()
        self.shards.clear()


def observe_snapshot(hasher: Learning, snap: Snapshot) -> np.ndarray:
    """Register a shard read whole; returns the rows observed as new (labeled, never learned nor quarantined).

    Learned codes stay frozen; quarantined ones keep their inferred codes, out of learning; labeled
    items indexed but never learned (the learner stopped before their round, or their code was never
    applied) are pending again, so the next round learns them (the hold-out among them, chosen by id, the
    same items as before: learned, never trained on, its stored code its shadow in the re-encode test).
    """
    labels = [set(x) if x else None for x in snap.labels]
    unlabeled = np.array([x is None for x in labels], bool)
    learned = np.flatnonzero(snap.learned | (unlabeled & ~snap.quarantined))
    quarantined = np.flatnonzero(snap.quarantined & ~snap.learned)
    new = np.setdiff1d(np.arange(len(snap.ids)), np.concatenate([learned, quarantined]))
    for rows, frozen, was_learned in ((learned, True, True), (quarantined, True, False), (new, False, False)):
        if len(rows):
            hasher.observe([snap.ids[i] for i in rows], snap.codes[rows], [labels[i] for i in rows],
                           frozen=frozen, learned=was_learned)
    return new


def _codes(changes) -> np.ndarray:
    return np.frombuffer(b"".join(c.code for c in changes), np.uint8).reshape(len(changes), -1)
