"""Restoring one shard from its changelog partition before its worker ingests the partition (Kafka Streams'
restore phase; quix-streams' recovery).

A :class:`Restorer` reads changelog partition p from the shard's own changelog offset (stored with every batch
the shard committed; none: from the log start) to the partition's high watermark, and writes it in runs of
``batch_records`` records in one LMDB transaction each (:func:`~streamhash.index.store.restore.apply_changelog`),
each run storing the changelog offset it reached: a crash mid-restore resumes there. The offsets markers in the
log give the shard the images and codes offsets that its state covers; the worker resumes ingesting from them.

Edge cases, each a known failure of changelog restores elsewhere:

* the shard's changelog offset is **below the log start** (records deleted or the topic re-created: the
  restore that never finished in quix-streams #1114): what the shard holds may miss removals, so it is reset
  (``reset()``: emptied) and restored from the log start;
* the offset is **above the high watermark** (the changelog lost records, e.g. a memory-storage broker
  restarted): the shard's copy is the better one; it keeps it and stores the high watermark;
* a record that does not parse (or is not signed with the pipeline's key) is counted and skipped;
* a shard that holds items but no changelog offset was written before the changelog existed (an upgrade): once
  restored, its items are sent to the changelog (``writer``), so that it can move like any other.

:meth:`step` does at most ``budget_s`` of work so that the worker's poll loop goes on (group heartbeats,
other partitions' batches) while a large partition restores.
"""

from __future__ import annotations

import logging
import time

from kafka import TopicPartition

from streamhash import metrics as m
from streamhash.errors import InternalRecordRejected
from streamhash.index import label_names
from streamhash.index.store.restore import apply_changelog, set_flags
from streamhash.kafka import changelog as cl

log = logging.getLogger("streamhash.worker")


class Restorer:
    def __init__(self, consumer, store, topic: str, partition: int, *, secret: bytes | None = None,
                 batch_records: int = 20_000, reset=None, writer=None):
        self.consumer, self.store, self.secret = consumer, store, secret
        self.tp = TopicPartition(topic, partition)
        self.batch_records, self.reset, self.writer = batch_records, reset, writer
        self.legacy = False  # a shard written before the changelog: its items are sent there once restored
        self.records = self.rejected = 0
        self.seconds = 0.0
        self.started = False
        self.done = False
        self.lag = 0

    def _start(self) -> None:
        self.consumer.assign([self.tp])
        at = self.store.offsets().get((self.tp.topic, self.tp.partition))
        low = int(self.consumer.beginning_offsets([self.tp])[self.tp])
        if at is not None and at < low:
            log.warning("shard %s: its changelog offset %d is below the log start %d: emptied and restored from there",
                        self.store.path, at, low)
            if self.reset is not None:
                self.store = self.reset()
            at = None
        if at is None:  # a new (or emptied) shard: partial from now on, before its first run is written
            self.legacy = self.store.count() > 0
            set_flags(self.store, restoring=True)
        self.consumer.seek(self.tp, low if at is None else at)
        self.started = True

    def step(self, budget_s: float = 1.0) -> bool:
        """Restore for about ``budget_s`` (one run at least); True once the shard is caught up."""
        t0 = time.monotonic()
        if not self.started:
            self._start()
        while not self.done:
            self._run(t0 + budget_s)
            if time.monotonic() - t0 >= budget_s:
                break
        spent = time.monotonic() - t0
        self.seconds += spent
        m.RESTORE_SECONDS.inc(spent)
        return self.done

    def _run(self, deadline: float) -> None:
        """One transaction's worth of records (or the rest, or what came by ``deadline``)."""
        entries, offsets, names, n = [], {}, None, 0
        key = (self.tp.topic, self.tp.partition)
        while n < self.batch_records:
            polled = self.consumer.poll(timeout_ms=200, max_records=self.batch_records - n).get(self.tp, [])
            for rec in polled:
                try:
                    got = cl.parse(rec.key, rec.value, rec.headers, topic=rec.topic, secret=self.secret)
                except InternalRecordRejected as exc:
                    self.rejected += 1
                    log.warning("changelog record skipped: %s", exc)
                    continue
                if isinstance(got, cl.Offsets):
                    offsets.update(got.offsets)
                    names = got.label_names or names
                else:
                    entries.append(got)
            n += len(polled)
            position, hw = self.consumer.position(self.tp), self.consumer.highwater(self.tp)
            if hw is not None:
                self.lag = max(0, hw - position)
            if hw is not None and position >= hw:
                self.done = True
                break
            if time.monotonic() > deadline:
                break
        position = self.consumer.position(self.tp)
        stored = self.store.offsets().get(key)
        if stored is not None and stored > position and self.done:  # the changelog is behind the shard
            log.warning("shard %s is ahead of its changelog (%d > high watermark %d): kept as it is",
                        self.store.path, stored, position)
        offsets[key] = position
        if entries or offsets.keys() - {key} or stored != position:
            if not self.records:
                set_flags(self.store, restoring=True)
            apply_changelog(self.store, entries, offsets)
        if names:  # the newest marker's map is the shard's (class names, streamhash.index.label_names)
            label_names.replace(self.store, names)
        self.records += n
        m.RESTORE_RECORDS.inc(n)
        if self.done and self.legacy and self.writer is not None:
            sent = self.writer.send_shard(self.store, self.tp.partition)
            self.store.set_offset(self.tp.topic, self.tp.partition, sent[self.tp.partition])
            log.info("shard %s held %d items written before the changelog: sent there", self.store.path, self.store.count())
        if self.done:
            set_flags(self.store, restoring=False, fenced=False)

    def close(self) -> None:
        self.consumer.close()
