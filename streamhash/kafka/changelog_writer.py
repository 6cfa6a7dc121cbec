"""The checkpoint's changelog step: each shard write's new item states sent to changelog partition p, acknowledged
before the shard's transaction stores where the changelog stands (:mod:`streamhash.kafka.changelog`).

A record is what the shard will hold once the write commits: an image written with its code (its state), a
learned code or a quarantine mark as an update of the item with its timestamp (the code only: the item's state
record stays where it arrived), a removal as tombstones. A learned code the shard would skip (its item written
again since, in this batch or before: another seq) sends nothing. The batch's offsets follow as one marker record. A batch retried after a failure
sends its records again: later records of an id replace earlier ones, so a duplicate changes no restored state.
An image's code is the one encoded for the batch: if a re-encode swapped the shard meanwhile and the write encodes
again, the changelog keeps the earlier code with the network that made it (``model``), which a restored shard's
re-encode redoes like any stale code.
"""

from __future__ import annotations

from streamhash import metrics as m
from streamhash.index import label_names
from streamhash.kafka import changelog as cl


class ChangelogWriter:
    def __init__(self, producer, topic: str, secret: bytes | None = None):
        self.producer, self.topic, self.secret = producer, topic, secret
        self._futures: list = []  # (partition, size, future)

    def send(self, w) -> None:
        """Send one shard write's records (``w``: a :class:`~streamhash.services.worker.pipeline.ShardWrite`)."""
        p = w.key.partition
        for key, value in self.records(w):
            self._send(p, key, value)

    def use(self, producer) -> None:
        """Send on ``producer`` from now on (a failed batch sends its records again: nothing is kept pending)."""
        self.producer, self._futures = producer, []

    def flush(self, timeout: float = 30.0) -> dict[int, int]:
        """Wait until every record sent is acknowledged; return each partition's next changelog offset. A failure
        raises (the batch is retried and sends its records again)."""
        futures, self._futures = self._futures, []
        if not futures:
            return {}
        self.producer.flush(timeout)
        nxt: dict[int, int] = {}
        for p, _, fut in futures:
            md = fut.get(timeout=0)  # a KafkaError propagates: the batch is retried
            nxt[p] = max(nxt.get(p, 0), md.offset + 1)
        m.CHANGELOG_RECORDS.inc(len(futures))
        m.CHANGELOG_BYTES.inc(sum(n for _, n, _ in futures))
        return nxt

    def send_shard(self, store, partition: int, chunk: int = 2000) -> dict[int, int]:
        """Every item ``store`` holds, then its offsets, acknowledged: a shard written before the changelog existed
        (an upgrade) becomes restorable. Returns the partition's next changelog offset, as :meth:`flush`."""
        ids = store.provenance()[0]
        nxt: dict[int, int] = {}
        for at in range(0, len(ids), chunk):
            for item_id in ids[at:at + chunk]:
                rec = store.get_item(item_id, with_blob=True)
                if rec is not None:
                    key, value = cl.encode(_state(item_id, rec, _feature(store, item_id)))
                    self._send(partition, key, value)
            nxt.update(self.flush())
        topic_offsets = {k: v for k, v in store.offsets().items() if k[0] != self.topic}
        self._send(partition, *cl.encode_offsets(topic_offsets, label_names.stored(store)))
        nxt.update(self.flush())
        return nxt

    def _send(self, p: int, key: bytes, value: bytes | None) -> None:
        headers = cl.sign_headers(self.secret, self.topic, key, value)
        fut = self.producer.send(self.topic, key=key, value=value, partition=p, headers=headers)
        self._futures.append((p, len(key) + len(value or b""), fut))

    def records(self, w) -> list[tuple[bytes, bytes | None]]:
        generation, version = w.serving
        features = getattr(w, "features", None) or [None] * len(w.records)
        out = [cl.encode(cl.ItemState(r.id, w.codes[j].tobytes(), r.value, r.content_type, r.labels, w.stamps[j],
                                      model=version, generation=generation, feature=features[j]))
               for j, r in enumerate(w.records)]
        rewritten = {r.id for r in w.records} | set(w.removals)  # an update for them is stale once the write commits
        out += [rec for u in w.updates if u.item_id not in rewritten and (rec := self._updated(w.store, u))]
        out += [t for i in w.removals for t in cl.encode_tombstones(i)]
        out.append(cl.encode_offsets(w.offsets, label_names.after(w.store, w.records, w.stamps)))
        return out

    def _updated(self, store, u) -> tuple[bytes, bytes] | None:
        """The update record of a learned code or quarantine mark; None if the shard will skip it."""
        rec = store.get_item(u.item_id)
        if rec is None or not u.matches(rec):
            return None
        learned = u.kind == "learned"
        return cl.encode_update(cl.Updated(u.item_id, float(rec["ts"]), u.kind, u.code if learned else b"",
                                           u.model_version if learned else None))


def _feature(store, item_id: str) -> bytes | None:
    f = store.features([item_id])[0] if hasattr(store, "features") else None
    return None if f is None else f.tobytes()


def _state(item_id: str, rec: dict, feature: bytes | None = None) -> cl.ItemState:
    """An item as :meth:`Store.get_item` reads it (with its blob), as a changelog state."""
    labels = rec.get("labels")
    return cl.ItemState(item_id, bytes(rec["code"] or b""), bytes(rec.get("blob") or b""), rec["ctype"],
                        tuple(labels) if labels is not None else None, float(rec["ts"]), model=rec.get("model"),
                        learned=bool(rec.get("learned")), learned_by=rec.get("learned_by"),
                        quarantined=bool(rec.get("quarantined")), generation=int(rec["generation"]), feature=feature)
