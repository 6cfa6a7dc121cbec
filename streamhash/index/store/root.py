"""A store root: one shard (one LMDB environment, one :class:`~streamhash.index.store.Store`) per
(topic, partition), the way Kafka Streams and quix-streams keep per-partition state.

::

    <root>/streamhash-root.json          {"layout": "shard-per-partition", "version": 1}
    <root>/shards/<topic>/<partition>/   data.mdb, lock.mdb, writer.lock

An item lives in the shard of the partition its key hashes to, so it is in exactly one shard; a shard
holds its own offsets, items, codes, blobs, models and generation, and its ``writer.lock``
(an exclusive ``flock``) makes the worker that holds it the only writer. Ownership moves with the
partition: the old owner commits and closes the shard on revoke, the new one opens it (waiting for the
lock while the old owner finishes its batch) and resumes from the shard's stored offset.

Shards are ordered by (topic, partition): that order is the tie-break between shards of a merged search.

A root written by streamhash before shards (``data.mdb`` directly under it) is refused with what to do
(:class:`LegacyLayoutError`): its items were never split by partition, and the topic is the way to
rebuild them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from streamhash.errors import StoreError

LAYOUT = {"layout": "shard-per-partition", "version": 1}
LAYOUT_FILE = "streamhash-root.json"
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")  # Kafka's legal topic names: safe as a directory name


class LegacyLayoutError(StoreError):
    """The root holds a single-environment store from before shards."""


@dataclass(frozen=True, order=True)
class ShardKey:
    topic: str
    partition: int

    def __str__(self) -> str:
        """``topic/partition``: its directory under ``shards/``, the ``shard`` label of metrics and responses."""
        return f"{self.topic}/{self.partition}"


class StoreRoot:
    """The directory of a sharded store: its layout check and where each shard lives."""

    def __init__(self, path: str | os.PathLike, *, create: bool = True):
        self.path = Path(path)
        if (self.path / "data.mdb").exists():
            raise LegacyLayoutError(
                f"{self.path} holds a single-environment store from an older streamhash (data.mdb directly under "
                f"it); this version keeps one shard per (topic, partition) under shards/. Move it aside (or delete "
                f"it) and start the workers on an empty root: each new shard consumes its partition from the log "
                f"start. The earlier streamhash version can keep serving the old directory meanwhile.")
        marker = self.path / LAYOUT_FILE
        if marker.exists():
            found = json.loads(marker.read_text())
            if found.get("layout") != LAYOUT["layout"] or int(found.get("version", 0)) > LAYOUT["version"]:
                raise StoreError(f"{self.path} has store layout {found}, this build reads {LAYOUT}")
        elif create:
            (self.path / "shards").mkdir(parents=True, exist_ok=True)
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps(LAYOUT) + "\n")
            os.replace(tmp, marker)  # atomic: two workers starting at once both end with one valid marker

    def shard_path(self, key: ShardKey) -> Path:
        if not _TOPIC.match(key.topic) or key.topic in (".", ".."):
            raise StoreError(f"topic name {key.topic!r} is not a legal Kafka topic name")
        return self.path / "shards" / key.topic / str(int(key.partition))

    def shards(self) -> list[ShardKey]:
        """Every shard that holds data, in shard order (topic, partition)."""
        base = self.path / "shards"
        if not base.is_dir():
            return []
        found = []
        for topic_dir in base.iterdir():
            for part in topic_dir.iterdir() if topic_dir.is_dir() else ():
                if part.name.isdigit() and (part / "data.mdb").exists():
                    found.append(ShardKey(topic_dir.name, int(part.name)))
        return sorted(found)

