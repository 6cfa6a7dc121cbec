"""Which shards a query server serves: none that is fenced.

A worker fences a shard whose partition moved to another machine (meta ``fenced: true``,
:mod:`streamhash.services.worker.fencing`): the copy here is stale, and the partition is answered by the server
beside its new owner. A fenced shard is set aside (its store kept open: LMDB allows one handle per environment in a
process, and a later unfence serves it again from the same one), and served again when the flag clears (the
partition came back and its shard caught up from the changelog).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def is_fenced(store) -> bool:
    return bool(store.read_meta().get("fenced"))


def split_fenced(shards, fenced: dict) -> tuple[list, bool]:
    """The shards to serve, from ``shards`` (served or new) and ``fenced`` (key -> shard set aside, updated in
    place); and whether any shard moved between the two."""
    serve, moved = [], False
    for s in list(shards) + list(fenced.values()):
        now = is_fenced(s.store)
        if now and s.key not in fenced:
            fenced[s.key] = s
            moved = True
            log.info("shard %s is fenced (its partition moved to another worker): not served", s.key)
        elif not now:
            moved = moved or fenced.pop(s.key, None) is not None
            serve.append(s)
    return serve, moved
