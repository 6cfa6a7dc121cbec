"""Fencing the shards whose partition went to another machine.

A shard is a cache of Kafka (:mod:`streamhash.kafka.changelog`): when its partition is revoked from every worker
on this store root, the partition lives on elsewhere, and the copy here goes stale. :class:`Fences` tracks the
shards of this root that no local worker has been assigned since they were revoked (or since this worker
started: a root left by a machine that died holds such shards). After ``fence_after_s`` such a shard's meta says
``fenced: true``: query servers stop serving it (the partition is answered by the machine that owns it now).
After ``drop_after_s`` more it is deleted. A partition assigned back before that restores only what it missed
from the changelog and is served again (:class:`~streamhash.kafka.restorer.Restorer` clears the flag).

A shard held by another worker on this root (its ``writer.lock``) is that worker's: never fenced from here.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable

from streamhash import metrics as m
from streamhash.errors import StoreLockedError
from streamhash.index.store.restore import set_flags
from streamhash.index.store.root import ShardKey, StoreRoot

log = logging.getLogger("streamhash.worker")

CHECK_EVERY_S = 1.0


class Fences:
    def __init__(self, root: StoreRoot, open_store: Callable, *, topic: str, fence_after_s: float,
                 drop_after_s: float, clock: Callable[[], float] = time.monotonic):
        self.root, self.open_store, self.clock = root, open_store, clock
        self.fence_after_s, self.drop_after_s = fence_after_s, drop_after_s
        now = clock()
        self._since: dict[ShardKey, float] = {k: now for k in root.shards() if k.topic == topic}
        self._fenced: set[ShardKey] = set()
        self._next = now

    def assigned(self, key: ShardKey) -> None:
        self._since.pop(key, None)
        self._fenced.discard(key)

    def revoked(self, key: ShardKey) -> None:
        self._since[key] = self.clock()

    def due(self) -> None:
        """Fence or drop what is due (checked at most once a second)."""
        now = self.clock()
        if now < self._next:
            return
        self._next = now + CHECK_EVERY_S
        for key, since in list(self._since.items()):
            age = now - since
            drop = age >= self.fence_after_s + self.drop_after_s
            if age < self.fence_after_s or (key in self._fenced and not drop):
                continue
            path = self.root.shard_path(key)
            if not (path / "data.mdb").exists():
                self._since.pop(key)
                continue
            try:
                store = self.open_store(path)
            except StoreLockedError:  # another worker on this root owns it now
                self._since.pop(key)
                continue
            try:
                if drop:  # under the shard's lock: no worker of this root opens it meanwhile
                    shutil.rmtree(path)
                else:
                    set_flags(store, fenced=True)
                    self._fenced.add(key)
                    m.SHARDS_FENCED.inc()
                    log.info("shard %s fenced: its partition has not been assigned here for %.0fs", key, age)
            finally:
                store.close()
            if drop:
                self._since.pop(key)
                self._fenced.discard(key)
                m.SHARDS_DROPPED.inc()
                log.info("shard %s dropped: fenced for %.0fs", key, age - self.fence_after_s)
