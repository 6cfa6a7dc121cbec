"""The learner's view of every partition through the shards' changelog (issue 25 item 2): no store root needed.

:class:`ChangelogFeed` plays :class:`~streamhash.index.feed.ShardFeed`'s part for a learner that runs on any
machine: it reads every partition of the changelog topic (:mod:`streamhash.kafka.changelog`; assigned by hand,
no group: it must read all of them, always) into its own state store (:class:`~.changelog_state.LearnerState`, in
the learner's data directory) and feeds a :class:`~streamhash.index.feed.Learning` sink:

- an id never seen, or seen with another timestamp (a re-sent id), is a new item: observed (labeled ones to learn;
  a learned or quarantined state, as a replay from the log start meets them, frozen);
- a state of a known item with the same timestamp is a change its worker made; so is an update record (a learned
  code applied: the sink's code of the item becomes it; a quarantine mark) naming the timestamp the item has;
- a tombstone forgets the item, unless the item lives in another partition now (a stale copy removed);
- the offsets markers are skipped; what this feed has read is stored with the items, one transaction per poll.

A restart observes the state store, then reads the changelog's tail from the stored offsets (a stored offset below
the log start: that partition is forgotten and read again from the start, removals included).

Re-encodes: the changelog does not carry the codes a worker's re-encode writes (it would re-send every blob), so
the feed does the same re-encode on its copy: every inferred code (not learned) of a network older than the one
that opened the current generation (``base``) is encoded again with that network from the stored input, as each
worker's re-encoder does. An item arriving with a stale code (its worker had not re-encoded yet) is re-encoded as it
is read. The sink then trains against the codes the index holds once every worker has swapped, so a round never
waits on the workers' re-encodes (:meth:`behind` is always empty).

A learned code (a new one, or one a round re-learned for an item learned before) is published to its item's codes
partition with the item's timestamp (``CodeUpdate.ts``): the feed knows no shard seq, which a restore renumbers
anyway; a learned code applied keeps the timestamp, a re-sent item has another one (its worker finds the update stale).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
from kafka import TopicPartition

from streamhash import metrics as m
from streamhash.errors import InternalRecordRejected, StoreError
from streamhash.kafka import changelog as cl
from streamhash.kafka.changelog_state import LearnerState, pack_input, unpack_input
from streamhash.kafka.modelbus import CodeUpdate
from streamhash.records import ImageSpec, decode_images

log = logging.getLogger(__name__)

_ENCODE_CHUNK = 512  # stored inputs decoded and encoded at a time in a re-encode (224x224 photos: ~77 MB)


def _same_ts(a: float, b: float) -> bool:
    return round(a * 1000) == round(b * 1000)  # as CodeUpdate.matches compares them


@dataclass
class _Read:
    """One poll's worth of records, an id's last entry winning (a removal from another partition never does)."""

    last: dict = field(default_factory=dict)  # id -> (partition, ItemState | Removed)
    updates: dict = field(default_factory=dict)  # id -> (partition, Updated): applied after the states
    offsets: dict = field(default_factory=dict)  # partition -> next offset
    n: int = 0
    bytes: int = 0

    def add(self, partition: int, got) -> None:
        if isinstance(got, cl.Offsets):
            return
        if isinstance(got, cl.Updated):
            self.updates[got.id] = (partition, got)
            return
        held = self.last.get(got.id)
        if isinstance(got, cl.Removed) and held is not None and held[0] != partition:
            return  # the id was re-routed: this is its stale copy's removal
        self.last[got.id] = (partition, got)


class ChangelogFeed:
    def __init__(self, consumer, topic: str, hasher, spec: ImageSpec, state: LearnerState, *,
                 secret: bytes | None = None, chunk: int = 10_000, max_bytes: int = 64 << 20,
                 base: tuple[int, object | None] = (1, None)):
        self.consumer, self.topic, self.hasher, self.spec, self.state = consumer, topic, hasher, spec, state
        self.secret, self.chunk, self.max_bytes = secret, chunk, max_bytes
        self.base_version, self.base_net = base
        self.pending_at: dict[str, tuple[int, float]] = {}
        self.tps: list[TopicPartition] | None = None
        self.records_read = self.rejected = 0
        self.caught_up = False

    # -- reading ----------------------------------------------------------------------------------------------
    def poll(self) -> int:
        """Read what the changelog has beyond the stored offsets (``chunk`` records at most); returns the records."""
        if self.tps is None and not self._start():
            return 0
        got, seen = _Read(), 0
        while got.n < self.chunk and got.bytes < self.max_bytes:  # blobs in hand, bounded: large photos too
            polled = self.consumer.poll(timeout_ms=100, max_records=self.chunk - got.n)
            for tp, recs in polled.items():
                for rec in recs:
                    self._parse(got, tp.partition, rec)
                    got.bytes += len(rec.value or b"")
            got.n += sum(len(r) for r in polled.values())
            if got.n == seen or self._caught_up():
                break
            seen = got.n
        if got.n:
            self._apply(got)
            self.records_read += got.n
        if not self.caught_up and self._caught_up():
            self.caught_up = True
            log.info("changelog read to its end: %d records since the stored offsets, %d items known",
                     self.records_read, self.state.count())
        return got.n

    def _parse(self, got: _Read, partition: int, rec) -> None:
        got.offsets[partition] = rec.offset + 1
        try:
            state = cl.parse(rec.key, rec.value, rec.headers, topic=rec.topic, secret=self.secret)
            bits = self.hasher.net.cfg.bits
            coded = isinstance(state, cl.ItemState) or (isinstance(state, cl.Updated) and state.kind == "learned")
            if coded and len(state.code) * 8 != bits:
                raise InternalRecordRejected("changelog", f"{state.id!r}: a {len(state.code) * 8}-bit code, the "
                                             f"learner's model has {bits} (model.bits)")
            got.add(partition, state)
        except InternalRecordRejected as exc:
            self.rejected += 1
            m.INTERNAL_REJECTED.labels(topic="changelog").inc()
            log.warning("changelog record skipped: %s", exc)

    def _caught_up(self) -> bool:
        ends = [(self.consumer.position(tp), self.consumer.highwater(tp)) for tp in self.tps]
        return all(hw is not None and at >= hw for at, hw in ends)

    def _start(self) -> bool:
        """Assign every partition at its stored offset; observe what the state store holds. False: no topic yet."""
        parts = self.consumer.partitions_for_topic(self.topic)
        if not parts:
            return False
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        low, stored = self.consumer.beginning_offsets(tps), self.state.offsets()
        for tp in tps:
            at = stored.get(tp.partition)
            if at is not None and at < low[tp]:  # removals may be gone with the records below: forget, read again
                log.warning("learner state: changelog partition %d at offset %d, below the log start %d: %d items "
                            "forgotten, read again from the start", tp.partition, at, low[tp],
                            self.state.drop_partition(tp.partition))
                at = None
            self.consumer.seek(tp, low[tp] if at is None else at)
        self.tps = tps
        self._load()
        return True

    def _load(self) -> None:
        """The state store into the sink, as :func:`~streamhash.index.feed.observe_snapshot` reads a shard."""
        n = 0
        for batch in self.state.scan(self.chunk):
            self._observe([(i, r) for i, r in batch], fresh_only=False)
            n += len(batch)
        if n:
            log.info("learner state: %d items from %s, changelog read on from %s", n, self.state.path,
                     self.state.offsets())
        self.rebase(self.base_version, self.base_net)

    # -- applying ---------------------------------------------------------------------------------------------
    def _apply(self, got: _Read) -> None:
        updates = _merge_updates(got)
        entries = [(i, p, e) for i, (p, e) in got.last.items()]
        states = [(i, p, e) for i, p, e in entries if isinstance(e, cl.ItemState)]
        codes = self._effective_codes([e for _, _, e in states])
        new, changed, removed = [], [], []

        def fn(txn):
            for i, p, e in entries:
                old = self.state.get(txn, i)
                if isinstance(e, cl.Removed):
                    if old is not None and old["p"] == p:
                        self.state.delete(txn, i)
                        removed.append(i)
                    continue
                code, model = codes[i]
                rec = {"p": p, "ts": e.ts, "labels": list(e.labels) if e.labels else None, "code": code.hex(),
                       "model": model, "learned": e.learned, "learned_by": e.learned_by, "quarantined": e.quarantined}
                fresh = old is None or not _same_ts(old["ts"], e.ts)
                self.state.put(txn, i, rec, pack_input(e.feature, e.blob, e.ctype) if fresh else None)
                (new if fresh else changed).append((i, rec))
            for i, (p, u) in updates.items():
                old = self.state.get(txn, i)
                if old is None or old["p"] != p or not _same_ts(old["ts"], u.ts):
                    continue  # removed, or sent again since: the update is stale
                fields = _updated_fields(u)
                if "code" in fields:
                    fields["code"] = fields["code"].hex()  # as the state store keeps codes
                rec = {**old, **fields}
                self.state.put(txn, i, rec)
                changed.append((i, rec))
            self.state.put_offsets(txn, got.offsets)

        self.state.write(fn)
        if removed:
            self.hasher.forget(removed)
            for i in removed:
                self.pending_at.pop(i, None)
        if new:
            self._observe(new, fresh_only=True)
        if changed:
            self.hasher.apply_reencode([i for i, _ in changed], _codes([r for _, r in changed]))

    def _effective_codes(self, states: list) -> dict[str, tuple[bytes, int | None]]:
        """Each state's code as the index holds it once re-encoded: inferred by a network older than ``base``, it
        is the base network's encoding of the stored input (what the worker's re-encoder writes)."""
        out = {e.id: (e.code, e.model) for e in states}
        stale = [e for e in states if self._stale(e.learned, e.model)]
        for at in range(0, len(stale), _ENCODE_CHUNK):
            part = stale[at:at + _ENCODE_CHUNK]
            stored = self._stored([pack_input(e.feature, e.blob, e.ctype) for e in part], self.base_net)
            for e, code in zip(part, self.base_net.encode(stored)):
                out[e.id] = (code.tobytes(), self.base_version)
        return out

    def _stale(self, learned: bool, model: int | None) -> bool:
        return self.base_net is not None and not learned and (model or 0) < self.base_version

    def _observe(self, rows: list[tuple[str, dict]], *, fresh_only: bool) -> None:
        """Items into the sink: learned (and unlabeled, on a load) codes frozen, quarantined ones frozen out of
        learning, labeled ones never learned pending (their partition and timestamp kept for publishing)."""
        groups: dict[tuple, list] = {}
        for i, r in rows:
            labeled = bool(r["labels"])
            if r["learned"] or (not fresh_only and not labeled and not r["quarantined"]):
                kind = (True, True)
            elif r["quarantined"]:
                kind = (True, False)
            else:
                kind = (False, True)
                if labeled:
                    self.pending_at[i] = (r["p"], r["ts"])
            if not labeled or kind[0]:
                self.pending_at.pop(i, None)
            groups.setdefault(kind, []).append((i, r))
        for (frozen, learned), grp in groups.items():
            self.hasher.observe([i for i, _ in grp], _codes([r for _, r in grp]),
                                [set(r["labels"]) if r["labels"] else None for _, r in grp],
                                frozen=frozen, learned=learned)

    def rebase(self, version: int, net, *, learned=frozenset()) -> int:
        """The index's generation opened with model ``version`` (``net``): inferred codes of older networks are
        re-encoded with it, in the state store and the sink (not for the ids in ``learned``: the round just learned
        their codes, which the sink holds; their workers' records of them follow). Returns how many."""
        self.base_version, self.base_net = version, net
        if net is None:
            return 0
        done = 0
        for batch in self.state.scan(self.chunk):
            stale = [(i, r) for i, r in batch if self._stale(r["learned"], r["model"])]
            for at in range(0, len(stale), _ENCODE_CHUNK):
                part = stale[at:at + _ENCODE_CHUNK]
                codes = net.encode(self._stored(self.state.inputs([i for i, _ in part]), net))

                def fn(txn, part=part, codes=codes):
                    for (i, r), code in zip(part, codes):
                        self.state.put(txn, i, {**r, "code": code.tobytes().hex(), "model": version})

                self.state.write(fn)
                keep = [k for k, (i, _) in enumerate(part) if i not in learned]
                self.hasher.apply_reencode([part[k][0] for k in keep], codes[keep])
                done += len(part)
        if done:
            log.info("learner state: %d inferred codes re-encoded with model version %d, as the workers do", done, version)
        return done

    # -- what the learner asks ----------------------------------------------------------------------------------
    def behind(self, generation: int) -> list:
        return []  # re-encoded here (rebase): a round never waits for the workers' re-encodes

    def generations(self) -> dict:
        return {}

    def code_updates(self, ids: list, kind: str, version: int, codes: dict | None = None) -> list[tuple[int, CodeUpdate]]:
        """(codes partition, update) for each id about to be published (learned codes, or quarantine marks); pending
        ids leave the pending map. An id learned in an earlier round, whose code this round re-learned (``relearn``),
        goes where its state record says, with the timestamp of the version read: a re-sent item not read yet has
        another, so its worker finds the update stale. An id in neither (removed meanwhile) is skipped."""
        at: dict = {}
        for i in ids:
            if i in self.pending_at:
                at[i] = self.pending_at.pop(i)
        held = [i for i in ids if i not in at]
        for i, rec in zip(held, self.state.records(held) if held else []):
            if rec is not None:
                at[i] = (rec["p"], rec["ts"])
        out = []
        for i in ids:
            if i not in at:
                log.warning("item %r was learned but is no longer in the changelog: its code is not published", i)
                continue
            code = codes[i].tobytes() if codes is not None else b""
            out.append((at[i][0], CodeUpdate(i, 0, kind, version, code, ts=at[i][1])))
        return out

    def fetch_images(self, ids: list) -> np.ndarray:
        """The network's stored input of each id (features for a frozen backbone, images else), from the state store."""
        raw = self.state.inputs(list(ids))
        absent = [i for i, r in zip(ids, raw) if r is None]
        if absent:
            raise StoreError(f"{len(absent)} items have no stored input in the learner's state, e.g. {absent[:3]}")
        return self._stored(raw, self.hasher.net)

    def _stored(self, raw: list[bytes], net) -> np.ndarray:
        unpacked = [unpack_input(r) for r in raw]
        if not getattr(net, "frozen", False):
            if any(b is None for _, b in unpacked):
                raise StoreError("the changelog holds features where the learner's network takes images "
                                 "(model.backbone / model.cut)")
            m.STORED_IMAGES_DECODED.labels(purpose="learn").inc(len(unpacked))
            return decode_images([b for _, b in unpacked], self.spec)
        shape, dtype = tuple(net.stored_shape), np.dtype(net.stored_dtype)
        out = np.zeros((len(raw), *shape), dtype)
        lack = [k for k, (f, _) in enumerate(unpacked) if f is None]
        for k, (f, _) in enumerate(unpacked):
            if f is not None:
                if len(f) != dtype.itemsize * int(np.prod(shape)):
                    raise StoreError(f"a stored feature of {len(f)} bytes; the learner's network takes {shape} "
                                     f"{dtype} (model.backbone / model.cut)")
                out[k] = np.frombuffer(f, dtype).reshape(shape)
        if lack:  # stored without a feature: its image, through the frozen part, this once
            m.STORED_IMAGES_DECODED.labels(purpose="learn").inc(len(lack))
            out[lack] = net.prepare(decode_images([unpacked[k][1] for k in lack], self.spec))
        return out

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        finally:
            self.state.close()


def _merge_updates(got: _Read) -> dict:
    """Updates of states read with them folded into those states (an item new to the feed comes in learned or
    quarantined, as a replay of its full state would); the rest, for items read before, returned."""
    rest = {}
    for i, (p, u) in got.updates.items():
        held = got.last.get(i)
        if held is not None and held[0] == p and isinstance(held[1], cl.ItemState) and _same_ts(held[1].ts, u.ts):
            got.last[i] = (p, dataclasses.replace(held[1], **_updated_fields(u)))
        elif held is None:
            rest[i] = (p, u)
    return rest


def _updated_fields(u: cl.Updated) -> dict:
    """What an update changes in an item's state."""
    if u.kind == "learned":
        return {"code": u.code, "learned": True, "learned_by": u.learned_by}
    return {"quarantined": True}


def _codes(recs: list[dict]) -> np.ndarray:
    return np.frombuffer(b"".join(bytes.fromhex(r["code"]) for r in recs), np.uint8).reshape(len(recs), -1)
