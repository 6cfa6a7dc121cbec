"""The shards one worker writes: opened when their partition is assigned, closed when it is revoked.

A shard is keyed by its images partition; the codes topic is co-partitioned with it (same partition
count, same assignment), so codes partition p's offset lives in images partition p's shard beside the
items it updates. :class:`OwnedShards` is also the store the worker's
:class:`~streamhash.kafka.positions.Positions` reads and moves offsets in: each (topic, partition)
goes to the shard that owns it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from streamhash.errors import StoreLockedError
from streamhash.index.store.root import ShardKey, StoreRoot

log = logging.getLogger("streamhash.worker")


class OwnedShards:
    def __init__(self, root: StoreRoot, open_store: Callable[[Path], object], *, images_topic: str,
                 codes_topic: str | None = None):
        self.root, self.open_store = root, open_store
        self.images_topic, self.codes_topic = images_topic, codes_topic
        self._open: dict[ShardKey, object] = {}

    def key_of(self, topic: str, partition: int) -> ShardKey:
        """The shard holding a partition's state: the codes topic's partition p is stored with images partition p."""
        return ShardKey(self.images_topic if topic == self.codes_topic else topic, partition)

    def open(self, key: ShardKey):
        """The shard's store, opened if needed; None while another process holds its lock (the previous owner
        finishing its batch after a rebalance: the caller pauses the partition and tries again)."""
        if key not in self._open:
            try:
                self._open[key] = self.open_store(self.root.shard_path(key))
            except StoreLockedError:
                return None
            log.info("opened shard %s", key)
        return self._open[key]

    def close(self, key: ShardKey) -> None:
        store = self._open.pop(key, None)
        if store is not None:
            store.close()
            log.info("closed shard %s", key)

    def close_all(self) -> None:
        for key in list(self._open):
            self.close(key)

    def get(self, key: ShardKey):
        return self._open.get(key)

    def __contains__(self, key: ShardKey) -> bool:
        return key in self._open

    def __iter__(self) -> Iterator[tuple[ShardKey, object]]:
        return iter(list(self._open.items()))

    def __len__(self) -> int:
        return len(self._open)

    # what Positions reads and moves
    def offsets(self) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for _, store in self:
            out.update(store.offsets())
        return out

    def offsets_of(self, topic: str, partition: int) -> dict[tuple[str, int], int]:
        """The offsets stored in the shard owning this partition (its images and codes partitions)."""
        return self._open[self.key_of(topic, partition)].offsets()

    def set_offset(self, topic: str, partition: int, next_offset: int) -> None:
        self._open[self.key_of(topic, partition)].set_offset(topic, partition, next_offset)

    def topic_id(self, topic: str, partition: int) -> str | None:
        """The broker's id of ``topic`` when the shard owning ``partition`` stored its offsets."""
        return self._open[self.key_of(topic, partition)].topic_ids().get(topic)

    def set_topic_id(self, topic: str, partition: int, topic_id: str) -> None:
        self._open[self.key_of(topic, partition)].set_topic_id(topic, topic_id)
