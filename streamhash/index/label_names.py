"""The class name of each label, kept with the index: what the search page shows instead of a bare number.

Names come with the images (the ``label-names`` header, :func:`streamhash.records.parse_label_names`), so a
foreign producer names its classes the same way ``streamhash produce`` does, and the map lives where the items
live: each shard's meta key ``label_names``, ``{"3": ["cat", ts]}``, ``ts`` the Kafka timestamp (seconds) of the
message that named it. The worker records a pair it has not seen before writing the batch that carries it
(:func:`record`: one small transaction, only when something changed), so a follower that sees an item finds
its name already there. A label named again differently: the later message wins, the replacement counted
(``streamhash_label_names_replaced_total``) and logged, since a renamed class usually means two producers
disagree. The query server merges its shards' maps (:func:`merge`): per label, the newest name.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Sequence

import orjson

from streamhash import metrics as m

log = logging.getLogger(__name__)
META_KEY = "label_names"
Stored = dict[int, tuple[str, float]]  # label -> (name, Kafka timestamp of the message that named it)

# store -> its map as last written or read by this process: a batch naming nothing new costs no transaction
_known: "weakref.WeakKeyDictionary[object, Stored]" = weakref.WeakKeyDictionary()


def stored(store, txn=None) -> Stored:
    """The shard's map as kept in its meta; empty for a shard that never saw a name (or an older one)."""
    def read(t):
        raw = t.get(META_KEY.encode(), db=store.db["meta"])
        return {int(label): (str(name), float(ts)) for label, (name, ts) in orjson.loads(raw).items()} if raw else {}

    return read(txn) if txn is not None else store._read(read)


def named_in(records, stamps: Sequence[float]) -> Stored:
    """The (label, name) pairs a batch carries, each with the time of the last record naming it."""
    out: Stored = {}
    for rec, ts in zip(records, stamps):
        if rec.label_names:  # most streams name nothing: one attribute read per record
            for label, name in rec.label_names:
                out[label] = (name, ts)
    return out


def record(store, records, stamps: Sequence[float]) -> int:
    """Keep the names ``records`` carry in ``store``'s meta (before the batch itself is written); returns how
    many stored names were replaced by another (counted and logged). No transaction when nothing is new."""
    batch = named_in(records, stamps)
    known = _known.get(store)
    if not batch or (known is not None and all(known.get(label, ("",))[0] == name for label, (name, _) in batch.items())):
        return 0

    def txn_fn(txn):
        names = stored(store, txn)
        replaced = [(label, names[label][0], name) for label, (name, _) in batch.items()
                    if label in names and names[label][0] != name]
        changed = {label: v for label, v in batch.items() if names.get(label, ("",))[0] != v[0]}
        if changed:
            names.update(changed)
            txn.put(META_KEY.encode(), orjson.dumps({str(k): list(v) for k, v in sorted(names.items())}),
                    db=store.db["meta"])
        return names, replaced

    _known[store], replaced = store._write(txn_fn)
    for label, old, new in replaced:
        log.warning("label %d of %s was named %r and is now %r: the later message wins (two producers disagree?)",
                    label, getattr(store, "path", store), old, new)
    m.LABEL_NAMES_REPLACED.inc(len(replaced))
    return len(replaced)


def after(store, records, stamps: Sequence[float]) -> Stored:
    """The map ``store`` will hold once :func:`record` kept what ``records`` name (nothing written): what the
    changelog carries with each batch, so a shard restored from it shows the same names."""
    known = _known.get(store)
    if known is None:
        known = _known[store] = stored(store)
    changed = {label: v for label, v in named_in(records, stamps).items() if known.get(label, ("",))[0] != v[0]}
    return {**known, **changed} if changed else known


def replace(store, names: Stored) -> None:
    """Write ``names`` as the shard's map (a restore: the changelog's newest map is the shard's)."""
    value = orjson.dumps({str(k): list(v) for k, v in sorted(names.items())})
    store._write(lambda txn: txn.put(META_KEY.encode(), value, db=store.db["meta"]))
    _known[store] = dict(names)


def merge(maps: Iterable[Stored], seen_conflicts: set | None = None) -> dict[int, str]:
    """One ``{label: name}`` from several shards' maps: per label, the name given last (ties: the later map).
    A label named differently by two shards is logged once per ``seen_conflicts`` set (the caller's memory)."""
    best: Stored = {}
    names_of: dict[int, set[str]] = {}
    for stored_map in maps:
        for label, (name, ts) in stored_map.items():
            names_of.setdefault(label, set()).add(name)
            if label not in best or ts >= best[label][1]:
                best[label] = (name, ts)
    for label, names in names_of.items():
        key = (label, frozenset(names))
        if len(names) > 1 and seen_conflicts is not None and key not in seen_conflicts:
            seen_conflicts.add(key)
            log.warning("label %d has the names %s in different shards; showing the newest, %r",
                        label, sorted(names), best[label][0])
    return {label: name for label, (name, _) in best.items()}


class IndexNames:
    """The names a query server shows: its shards' maps merged (:func:`merge`) under ``configured``, the
    operator's own map (``STREAMHASH_DATA__CLASS_NAMES``), which wins where it names a label: anyone who can
    produce to the topic can name a label, the setting is the operator's word. Read again only when the view
    changed (a shard followed a write): a search over an unchanged index reads no meta."""

    def __init__(self, index, configured: dict[int, str] | None = None):
        self.index, self.configured = index, dict(configured or {})
        self._cached: tuple[tuple, dict[int, str]] = ((), dict(self.configured))
        self._conflicts: set = set()

    def current(self, view=None) -> dict[int, str]:
        """``{label: name}`` for the shards of ``view`` (default: the index's view now)."""
        view = view if view is not None else self.index.view()
        key = tuple((v.name, id(v.g), v.g.last_seq) for v in view.shards)
        cached_key, names = self._cached
        if key != cached_key:
            names = {**merge((stored(v.shard.store) for v in view.shards), self._conflicts), **self.configured}
            self._cached = (key, names)  # one reference swap: searches on other threads see one or the other
        return names
