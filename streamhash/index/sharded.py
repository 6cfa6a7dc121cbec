"""Exact search over every shard of a store root: one :class:`~streamhash.index.live.LiveIndex` per shard,
merged so that the answer is the one a single index over the union of the shards would give.

Order of a merged result (top-k and radius alike): **distance, then shard, then arrival**. Shards are
ordered by (topic, partition) (:meth:`StoreRoot.shards`); within a shard, ties keep the index's own
order, arrival order: the seq the item arrived under in its shard (a write or an overwrite gives the
item a new, larger one; a learned code does not move it). Merging is exact: each shard answers its own
top-k (or its hits within the radius), and the global top-k is a subset of the union of those, so one
stable sort by distance of the per-shard answers laid side by side in shard order gives the global order.

A query takes a :class:`View` (one :class:`~streamhash.index.live.Generation` per shard and its model version,
each read once: a re-encode or a learning round is seen by the next query, never halfway by this one) and ranks
with :meth:`View.rank`, which every ``/search`` path of the query server calls.

Shards appear while serving (a worker is assigned a new partition): a thread rescans the root every
``rescan_s`` and adds each new shard with no restart; a fenced one is not served (:mod:`streamhash.index.fenced`).

>>> import tempfile
>>> from streamhash.index.store import ItemWrite, Store
>>> from streamhash.index.store.root import ShardKey, StoreRoot
>>> root = StoreRoot(tempfile.mkdtemp())
>>> stores = {p: Store(root.shard_path(ShardKey("t", p)), bits=16, shard=p) for p in (1, 0)}
>>> _ = stores[1].write_batch([ItemWrite("b", bytes([0, 0]), b"", "image/png", None)])
>>> _ = stores[0].write_batch([ItemWrite("a", bytes([0, 1]), b"", "image/png", None),
...                            ItemWrite("c", bytes([0, 0]), b"", "image/png", None)])
>>> index = ShardedIndex(root, open_store=lambda key, path: stores[key.partition])
>>> view = index.view()
>>> D, S, I = view.search([np.zeros((1, 2), np.uint8)] * len(view), k=4)
>>> D.tolist(), [view.shards[s].name if s >= 0 else None for s in S[0]]
([[0, 0, 1, 2147483647]], ['t/0', 't/1', 't/0', None])
>>> [r[0] for r in view.resolve(S[0], I[0]) if r]
['c', 'b', 'a']
>>> index.close()
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np

from streamhash import metrics as m
from streamhash.index.backends import check_backend
from streamhash.index.fenced import split_fenced
from streamhash.index.hamming import PAD_DISTANCE
from streamhash.index.live import Generation, LiveIndex, Resolved
from streamhash.index.radius import RadiusIndex
from streamhash.index.store import Store, arrival
from streamhash.index.store.root import ShardKey, StoreRoot

log = logging.getLogger(__name__)

OpenStore = Callable[[ShardKey, Path], Store]


class Hit(TypedDict):
    """One ranked item as a search returns it (and the server renders it)."""
    id: str
    distance: int
    labels: list[int] | None
    shard: str  # the shard's name, topic/partition


def shard_name(key: ShardKey) -> str:
    """How responses and metrics name a shard: ``topic/partition``."""
    return f"{key.topic}/{key.partition}"


def _open_readonly(_key: ShardKey, path: Path) -> Store:
    return Store(path, readonly=True)


class _Follower(LiveIndex):
    """The LiveIndex following one shard's store (not a name for the shard: that is :class:`Shard`). The
    process gauges (items, generation, model version) are the root's, not the shard's: each shard publishing
    its own numbers would leave whichever refreshed last."""

    def __init__(self, store: Store, publish: Callable[[], None], **kw):
        self._publish_root = publish  # before LiveIndex.__init__, which publishes
        super().__init__(store, **kw)

    def _publish(self, g: Generation) -> None:
        self._publish_root()


@dataclass(frozen=True)
class Shard:
    """A shard being served: its key, its store (read-only) and the follower keeping its index in step.
    Lives as long as the server; what one query sees of it is a :class:`ShardView`."""

    key: ShardKey
    store: Store
    live: LiveIndex

    @property
    def name(self) -> str:
        return shard_name(self.key)

    def visible(self, rec: dict) -> bool:
        """Whether the latest write of the item (its record) is in the generation served now."""
        return self.live.current.last_seq >= int(rec["seq"]) and arrival(rec) in self.live.current.index


@dataclass(frozen=True)
class ShardView:
    """One :class:`Shard` as one query sees it: the generation it served when the :class:`View` was taken,
    and that generation's model version, fixed for the whole query."""

    pos: int  # place in shard order, the merge's tie-break
    shard: Shard
    g: Generation
    model_version: int

    @property
    def name(self) -> str:
        return self.shard.name

    def describe(self, size: int | None = None) -> dict:
        """Name, generation, model version and ``size`` (default: the index's size now)."""
        return {"shard": self.name, "generation": self.g.generation, "model_version": self.model_version,
                "index_size": self.g.index.ntotal if size is None else size}


class View:
    """The shards a query uses, each at the generation it served when the view was taken."""

    def __init__(self, shards: Sequence[Shard]):
        views = []
        for pos, s in enumerate(shards):
            g = s.live.current  # read once: the reference a follower swaps
            views.append(ShardView(pos, s, g, g.model_version))
        self.shards: tuple[ShardView, ...] = tuple(views)
        # Requests whose views hold the same generations may be ranked together (the micro-batcher's key).
        self.key = tuple(v.g for v in self.shards)

    def __len__(self) -> int:
        return len(self.shards)

    @property
    def index_size(self) -> int:
        return sum(v.g.index.ntotal for v in self.shards)

    @property
    def newest(self) -> ShardView | None:
        """The shard of the highest (generation, model version): what a response names at its top level."""
        return max(self.shards, key=lambda v: (v.g.generation, v.model_version), default=None)

    def by_name(self, name: str) -> ShardView | None:
        return next((v for v in self.shards if v.name == name), None)

    def search(self, queries: Sequence[np.ndarray | None], k: int, ranked: Sequence[np.ndarray | None] | None = None,
               nq: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Merged exact top-k. ``queries[i]``: the (nq, bits/8) query codes for shard i of this view (each shard
        gets codes of its own model), or None to leave shard i out; ``ranked[i]``: an optional bool (nq,) mask
        of the rows shard i ranks (the others get nothing from it).

        Returns (D int32, S int32, I int64), each (nq, k): distance, shard position in this view, seq in
        that shard; padded with PAD_DISTANCE, -1, -1 like FAISS, in the module's order.
        """
        nq = nq if nq is not None else next((len(q) for q in queries if q is not None), 0)
        Ds, Is, pos = [], [], []
        for v, q, mask in zip(self.shards, queries, ranked or [None] * len(queries)):
            if q is None:
                continue
            D, I = v.g.index.search(q, k)
            if mask is not None:
                D[~mask], I[~mask] = PAD_DISTANCE, -1
            Ds.append(D)
            Is.append(I)
            pos.append(v.pos)
        if not Ds:
            return np.full((nq, k), PAD_DISTANCE, np.int32), np.full((nq, k), -1, np.int32), np.full((nq, k), -1, np.int64)
        # Side by side in shard order, each shard's k in its own order: a stable sort by distance is the merge,
        # and column c came from the (c // k)-th shard searched. Few numpy calls: at one query they cost more
        # than the sort itself.
        D, I = np.concatenate(Ds, axis=1), np.concatenate(Is, axis=1)
        order = np.argsort(D, axis=1, kind="stable")[:, :k]
        rows = np.arange(len(D))[:, None]
        D, I = D[rows, order], I[rows, order]
        S = np.array(pos, np.int32)[order // k]
        S[I < 0] = -1
        return D, S, I

    def range_search(self, queries: Sequence[np.ndarray | None], radius: int,
                     ranked: Sequence[np.ndarray | None] | None = None, nq: int | None = None):
        """Merged hits at distance < radius (strict, as FAISS), ``queries`` and ``ranked`` as in :meth:`search`.

        Returns (lims int64 (nq+1,), D int32, S int32, I int64): query r's hits in [lims[r], lims[r+1]),
        in the module's order. Each shard answers with its :class:`RadiusIndex` (tables or flat scan).
        """
        nq = nq if nq is not None else next((len(q) for q in queries if q is not None), 0)
        rows, Ds, Ss, Is = [], [], [], []
        for v, q, mask in zip(self.shards, queries, ranked or [None] * len(queries)):
            if q is None:
                continue
            lims, D, I = RadiusIndex.over_store(v.g.index, v.shard.store, v.g.generation).range_search(q, radius)
            row = np.repeat(np.arange(len(q)), np.diff(lims))
            if mask is not None:
                keep = mask[row]
                row, D, I = row[keep], D[keep], I[keep]
            rows.append(row)
            Ds.append(D)
            Is.append(I)
            Ss.append(np.full(len(I), v.pos, np.int32))
        if not rows:
            return np.zeros(nq + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64)
        row, D, S, I = (np.concatenate(x) for x in (rows, Ds, Ss, Is))
        order = np.lexsort((D, row))  # stable: within (row, distance), shard order, then each shard's own order
        lims = np.zeros(nq + 1, np.int64)
        np.cumsum(np.bincount(row, minlength=nq), out=lims[1:])
        return lims, D[order], S[order], I[order]

    def rank(self, codes: Sequence[Sequence[np.ndarray | None]], ks: Sequence[int],
             radius: int | None = None) -> list[list[Hit]]:
        """Each search's hits, merged over the shards in the module's order and resolved to their items.
        ``codes[r][i]``: search r's query code for shard i (None: shard i does not rank it), ``ks[r]``: its k;
        the searches share one kernel call per shard. Top-k: one search at the largest k; the merged order does
        not depend on k, so each row's first k are exactly its own top-k. Radius: hits at distance < radius,
        each row's first k. An item removed between search and lookup is skipped."""
        nq = len(codes)
        queries, ranked = [], []
        for i in range(len(self)):
            col = [c[i] for c in codes]
            have = [c is not None for c in col]
            if not any(have) or all(have):
                queries.append(None if not have[0] else col[0][None] if nq == 1 else np.stack(col))
                ranked.append(None)
            else:  # rows this shard does not rank get a stand-in code and are masked out
                zero = np.zeros(self.shards[i].g.index.code_size, np.uint8)
                queries.append(np.stack([c if c is not None else zero for c in col]))
                ranked.append(np.array(have))
        # A few hits per search: past the kernel, plain lists cost less than numpy's per-call overhead.
        if radius is None:
            D, S, I = self.search(queries, max(ks), ranked, nq=nq)
            rows = [(d[:k], s[:k], i[:k]) for d, s, i, k in zip(D.tolist(), S.tolist(), I.tolist(), ks)]
        else:
            lims, D, S, I = self.range_search(queries, radius, ranked, nq=nq)
            lims, D, S, I = lims.tolist(), D.tolist(), S.tolist(), I.tolist()
            rows = [(D[a:b][:k], S[a:b][:k], I[a:b][:k]) for a, b, k in zip(lims, lims[1:], ks)]
        return self._hits(rows)

    def _hits(self, rows: list[tuple[list, list, list]]) -> list[list[Hit]]:
        """(distances, shard positions, seqs) per search -> its hits; one store read per shard for the batch"""
        wanted: dict[int, list[int]] = {}  # shard position -> the seqs of every hit of the batch there (-1: padding)
        for _, s, i in rows:
            for pos, seq in zip(s, i):
                if seq >= 0:
                    wanted.setdefault(pos, []).append(seq)
        found = {pos: dict(zip(seqs, self.shards[pos].g.resolve(seqs))) for pos, seqs in wanted.items()}
        names = [v.name for v in self.shards]
        out = []
        for d, s, i in rows:
            hits = []
            for dist, pos, seq in zip(d, s, i):
                got = found[pos][seq] if seq >= 0 else None
                if got is not None:  # None: padding, or removed between search and lookup
                    hits.append({"id": got[0], "distance": dist, "labels": None if got[1] is None else list(got[1]),
                                 "shard": names[pos]})
            out.append(hits)
        return out

    def query_first(self, hits: list[Hit], item_id: str, k: int) -> list[Hit]:
        """``hits`` of a search by ``item_id``, that item first (k ties at distance 0 in index order may omit it)."""
        own = [h for h in hits if h["id"] == item_id]
        found = None if own else next(((v, r) for v in self.shards if (r := v.shard.store.get_item(item_id))), None)
        if found is not None:  # (shard view, record)
            own = [{"id": item_id, "distance": 0, "labels": None if found[1]["labels"] is None else list(found[1]["labels"]),
                    "shard": found[0].name}]
        return (own + [h for h in hits if h["id"] != item_id])[:k]

    def resolve(self, S: np.ndarray, I: np.ndarray) -> list[Resolved | None]:
        """(id, labels) of each (shard position, seq) pair, None for padding or an item gone meanwhile;
        one store read per shard with hits."""
        S, I = np.asarray(S).reshape(-1), np.asarray(I).reshape(-1)
        out: list[Resolved | None] = [None] * len(I)
        for pos in np.unique(S[S >= 0]).tolist():
            where = np.flatnonzero(S == pos)
            for i, got in zip(where.tolist(), self.shards[pos].g.resolve(I[where].tolist())):
                out[i] = got
        return out


class ShardedIndex:
    """Every shard under a store root, each followed by its own LiveIndex (see the module docstring).

    ``open_store(key, path)`` opens a shard read-only; tests hand in the stores they write (LMDB refuses a
    second handle on one environment in a process). Stores opened here are closed by :meth:`close`.
    ``live_options`` go to each shard's LiveIndex (backend, threads, refresh and notification settings)."""

    def __init__(self, root: StoreRoot | str | Path, *, open_store: OpenStore | None = None, rescan_s: float = 1.0,
                 **live_options):
        self.root = root if isinstance(root, StoreRoot) else StoreRoot(root, create=False)
        self._open = open_store or _open_readonly
        self._owns_stores = open_store is None
        check_backend(live_options.get("backend", "auto"))  # at start, not when the first shard appears
        self.rescan_s, self.live_options = rescan_s, live_options
        self.bits: int | None = None  # the first shard's; a shard of other bits is not served
        self._shards: tuple[Shard, ...] = ()
        self._refused: set[ShardKey] = set()  # logged once: a shard that failed to open is retried quietly
        self._fenced: dict[ShardKey, Shard] = {}  # open, not served (streamhash.index.fenced)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._running = False
        self._thread: threading.Thread | None = None
        self.rescan()

    @property
    def shards(self) -> tuple[Shard, ...]:
        return self._shards

    def view(self) -> View:
        return View(self._shards)

    def rescan(self) -> list[ShardKey]:
        """Add the shards that appeared under the root since the last scan, set fenced ones aside; returns those added."""
        with self._lock:
            known, added = {s.key for s in self._shards} | set(self._fenced), []
            for key in self.root.shards():
                shard = None if key in known else self._add(key)
                if shard is not None:
                    added.append(shard)
            serve, moved = split_fenced(self._shards + tuple(added), self._fenced)
            if added or moved:
                self._shards = tuple(sorted(serve, key=lambda s: s.key))  # one reference swap
                log.info("serving %d shards (added %s)", len(self._shards), ", ".join(s.name for s in added))
                self._publish()
            return [s.key for s in added]

    def _add(self, key: ShardKey) -> Shard | None:
        store = None
        try:
            store = self._open(key, self.root.shard_path(key))
            if self.bits is not None and store.bits != self.bits:
                raise ValueError(f"shard holds {store.bits}-bit codes, the others {self.bits}-bit")
            live = _Follower(store, self._publish, **self.live_options)
        except Exception as exc:  # a shard being created (no meta yet) opens on a later scan
            if self._owns_stores and store is not None:
                store.close()
            if key not in self._refused:
                self._refused.add(key)
                log.warning("shard %s not served yet: %s: %s", shard_name(key), type(exc).__name__, exc)
            return None
        self._refused.discard(key)
        self.bits = store.bits if self.bits is None else self.bits
        if self._running:
            live.start()
        return Shard(key, store, live)

    def _publish(self) -> None:
        view = self.view()
        newest = view.newest
        m.INDEX_ITEMS.labels(process="query").set(view.index_size)
        m.INDEX_GENERATION.labels(process="query").set(newest.g.generation if newest else 0)
        m.MODEL_VERSION.labels(process="query").set(newest.model_version if newest else 0)
        m.QUERY_SHARDS.set(len(view))

    def find_item(self, item_id: str) -> tuple[Shard, dict] | None:
        """The shard holding ``item_id`` and its record (an id lives in exactly one shard), or None."""
        for shard in self._shards:
            rec = shard.store.get_item(item_id)
            if rec is not None:
                return shard, rec
        return None

    def start(self) -> "ShardedIndex":
        with self._lock:
            self._running = True
            for s in self._shards:
                s.live.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._rescan_loop, name="shard-rescan", daemon=True)
        self._thread.start()
        return self

    def _rescan_loop(self) -> None:
        while not self._stop.wait(self.rescan_s):
            try:
                self.rescan()
            except Exception:  # the root unreadable for a moment: keep serving the shards we have
                log.exception("rescanning %s failed; retrying", self.root.path)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self._running = False
            for s in self._shards:
                s.live.stop()

    def close(self) -> None:
        self.stop()
        if self._owns_stores:
            for s in self._shards + tuple(self._fenced.values()):
                s.store.close()
