"""Kafka positions kept with the data: the next offset of each partition, and the broker's id of each topic.

Offsets advance in the same transaction as the items they cover (:meth:`Offsets.put` inside a batch),
so a crash loses both or neither. A topic's id tells a worker at start-up that the topic was
deleted and recreated under the same name, when its stored offsets no longer mean anything.
"""

from __future__ import annotations

from streamhash.index.store.env import Environment
from streamhash.index.store.layout import from_u64, offset_key, u64


class Offsets:
    def __init__(self, env: Environment):
        self.env = env

    def put(self, txn, offsets: dict[tuple[str, int], int]) -> None:
        for (topic, partition), nxt in offsets.items():
            txn.put(offset_key(topic, partition), u64(nxt), db=self.env.db["offsets"])

    def set(self, topic: str, partition: int, next_offset: int) -> None:
        """Move a partition's stored offset (backwards too: after the broker's log was reset)."""
        self.env.write(lambda txn: self.put(txn, {(topic, partition): next_offset}))

    def all(self) -> dict[tuple[str, int], int]:
        def read(txn):
            out = {}
            for k, v in txn.cursor(db=self.env.db["offsets"]):
                topic, part = k.decode().rsplit("\0", 1)
                out[(topic, int(part))] = from_u64(v)
            return out

        return self.env.read(read)

    def topic_ids(self) -> dict[str, str]:
        """topic -> the broker's id of it when its offsets were stored."""
        return dict(self.env.read_meta().get("topic_ids") or {})

    def set_topic_id(self, topic: str, topic_id: str) -> None:
        def txn_fn(txn):
            ids = self.env.read_meta(txn).get("topic_ids") or {}
            self.env.put_meta(txn, {"topic_ids": {**ids, topic: topic_id}})

        self.env.write(txn_fn)
