"""The LMDB store: the single source of truth for items, codes, image blobs, models and offsets.

One :class:`Store` per shard, over parts that each own one piece of it:

- :mod:`.layout`: the sub-databases, their keys and values, the schema check;
- :mod:`.env`: the environment and its writer discipline (one write transaction at a time, growth, full disk);
- :mod:`.items`: item records and blobs, linked into codes and the change log in one transaction;
- :mod:`.changes`: the followers' reads through the change log;
- :mod:`.offsets`: Kafka offsets and topic ids, committed with the items;
- :mod:`.models`: versioned networks;
- :mod:`.generations`: re-encodes, built beside the live generation and swapped in;
- :mod:`.builder`: :class:`GenerationBuilder`, one selective re-encode (learned and up-to-date codes copied).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

from streamhash.index.store.builder import GenerationBuilder
from streamhash.index.store.changes import Change, ChangeLog, Snapshot
from streamhash.index.store.env import Environment
from streamhash.index.store.generations import TXN_KEYS_DROPPED, Generations
from streamhash.index.store.items import Items, ItemWrite, arrival
from streamhash.index.store.layout import DB_NAMES, SCHEMA_VERSION, check_readable, from_u64, init_meta, offset_key, u64
from streamhash.index.store.models import Models
from streamhash.index.store.offsets import Offsets

__all__ = ["DB_NAMES", "SCHEMA_VERSION", "Change", "GenerationBuilder", "ItemWrite", "Snapshot", "Store",
           "arrival", "from_u64", "offset_key", "u64"]


class Store:
    """An LMDB environment holding one shard of the index.

    Open it writable in exactly one process (the worker owning the shard) and read-only in any
    number of others. Read-only handles see consistent MVCC snapshots and follow map growth.

    ``backbone`` and ``features`` (the writer's network: :meth:`HashNet.feature_spec`, None for a network
    trained end to end) are checked against what the shard was written with; another backbone, cut or
    feature shape is refused at open (:class:`~streamhash.errors.FeatureSpecMismatch`).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        bits: int | None = None,
        readonly: bool = False,
        shard: int = 0,
        backbone: str | None = None,
        features: dict | None = None,
        initial_map_size: int = 64 << 20,
        max_map_size: int = 1 << 40,
        map_growth_factor: float = 2.0,
    ):
        self._env = Environment(path, readonly=readonly, initial_map_size=initial_map_size,
                                max_map_size=max_map_size, map_growth_factor=map_growth_factor)
        self.path, self.readonly, self.env, self.db = self._env.path, readonly, self._env.env, self._env.db
        try:
            meta = (check_readable(self.read_meta(), self.path) if readonly
                    else init_meta(self._env, bits=bits, shard=shard, backbone=backbone, features=features))
        except BaseException:  # refused: the writer lock goes with it, so the right network may open the shard
            self._env.close()
            raise
        self.bits = int(meta["bits"])
        self.code_bytes = self.bits // 8
        self.offset_map = Offsets(self._env)
        self.items = Items(self._env, self.code_bytes, self.offset_map, features)
        self.changes = ChangeLog(self._env, self.code_bytes)
        self.models = Models(self._env)
        self.generations = Generations(self._env, self.items)

    # transactions and meta, for the parts and for tests that reach under the facade
    def _read(self, fn):
        return self._env.read(fn)

    def _write(self, fn):
        return self._env.write(fn)

    def read_meta(self, txn=None) -> dict:
        return self._env.read_meta(txn)

    def _put_meta(self, txn, meta: dict) -> None:
        self._env.put_meta(txn, meta)

    def close(self) -> None:
        self._env.close()

    # items
    def write_batch(self, items: Iterable[ItemWrite], offsets: dict[tuple[str, int], int] | None = None,
                    *, generation: int | None = None, model_version: int | None = None,
                    deletes: Iterable[str] = ()) -> list[int]:
        return self.items.write_batch(items, offsets, generation=generation, model_version=model_version,
                                      deletes=deletes)

    def put_codes(self, ids: list[str], codes: np.ndarray, *, model_version: int | None = None) -> list[int]:
        return self.items.put_codes(ids, codes, model_version=model_version)

    def quarantine(self, ids: list[str]) -> None:
        self.items.quarantine(ids)

    def apply_updates(self, updates, offsets: dict[tuple[str, int], int]) -> dict[str, int]:
        return self.items.apply_updates(updates, offsets)

    def count(self) -> int:
        return self.items.count()

    def get_item(self, item_id: str, *, with_blob: bool = False) -> dict | None:
        return self.items.get(item_id, with_blob=with_blob)

    def get_items(self, ids: Iterable[str]) -> list[dict | None]:
        """:meth:`get_item` (without blob) for each id, None where absent, from one read transaction."""
        return self.items.get_many(ids)

    def get_blobs(self, ids: Iterable[str]) -> list[tuple[bytes, str] | None]:
        return self.items.blobs(ids)

    def features(self, ids: Iterable[str]) -> list[np.ndarray | None]:
        """Each item's stored feature (float16, the meta's ``feature_shape``), None where it has none."""
        return self.items.features(ids)

    def feature_spec(self) -> dict | None:
        """What the shard keeps per item for its network (meta ``features``), None before its first feature."""
        return self.read_meta().get("features")

    # the change log
    def changes_since(self, after_seq: int, limit: int = 100_000) -> tuple[int, int, list[Change]]:
        return self.changes.changes_since(after_seq, limit)

    def changes_if_committed(self, after_seq: int, seen_txnid: int,
                             limit: int = 100_000) -> tuple[int, int, int, list[Change]] | None:
        return self.changes.changes_if_committed(after_seq, seen_txnid, limit)

    def snapshot(self) -> Snapshot:
        return self.changes.snapshot()

    def read_generation(self, on_chunk, chunk: int = 65536) -> tuple[int, int, int]:
        return self.changes.read_generation(on_chunk, chunk)

    def items_at(self, seqs: Sequence[int]) -> list[tuple[str, tuple[int, ...] | None] | None]:
        return self.changes.items_at(seqs)

    def labels_of(self, ids: Sequence[str]) -> list[tuple[int, ...] | None]:
        return self.changes.labels_of(ids)

    def ids_after(self, after_seq: int) -> list[str]:
        return self.changes.ids_after(after_seq)

    def seqs_live(self, seqs: Sequence[int]) -> np.ndarray:
        return self.changes.seqs_live(seqs)

    # offsets and topic ids
    def offsets(self) -> dict[tuple[str, int], int]:
        return self.offset_map.all()

    def set_offset(self, topic: str, partition: int, next_offset: int) -> None:
        self.offset_map.set(topic, partition, next_offset)

    def topic_ids(self) -> dict[str, str]:
        return self.offset_map.topic_ids()

    def set_topic_id(self, topic: str, topic_id: str) -> None:
        self.offset_map.set_topic_id(topic, topic_id)

    # models
    def put_model(self, raw: bytes, *, make_current: bool = False, version: int | None = None) -> int:
        return self.models.put(raw, make_current=make_current, version=version)

    def get_model(self, version: int | None = None) -> tuple[int, bytes | None]:
        return self.models.get(version)

    # generations: GenerationBuilder drives these; the steps stay here for tests and tools
    def begin_generation(self, gen: int | None = None) -> tuple[int, int]:
        return self.generations.begin(gen)

    def put_generation_codes(self, gen: int, ids: list[str], codes: np.ndarray) -> None:
        self.generations.put_codes(gen, ids, codes)

    def ids_missing_from(self, gen: int, after_seq: int = 0) -> list[str]:
        return self.generations.ids_missing(gen, after_seq)[0]

    def swap_generation(self, gen: int, model_version: int, ids: list[str], codes: np.ndarray, *,
                        after_seq: int = 0, encode_blobs=None, encode_features=None,
                        reencoded: list[str] | None = None) -> int:
        return self.generations.swap(gen, model_version, ids, codes, after_seq=after_seq, encode_blobs=encode_blobs,
                                     encode_features=encode_features, reencoded=reencoded)

    def provenance(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Every live item's (ids, learned, model version that inferred its code or -1), in seq order."""
        return self.generations.provenance()

    def drop_generation(self, gen: int, chunk: int = TXN_KEYS_DROPPED) -> int:
        return self.generations.drop(gen, chunk)

    def abandon_pending_generation(self) -> int | None:
        """Start-up clean-up after a crash; returns the half-built generation it dropped, if any."""
        return self.generations.clean_up_after_crash()
