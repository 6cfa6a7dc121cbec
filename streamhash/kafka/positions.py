"""Where each partition resumes: the shards' offsets are the truth, Kafka's committed offsets a hint.

:class:`Positions` owns the next offset already applied for every (topic, partition) whose shard this
worker holds open (:class:`~streamhash.index.store.shards.OwnedShards`), and checks each poll that the
broker's logs still hold what the shards say they consumed:

* a partition whose shard was just opened (assigned to this worker) is sought to the shard's stored
  offset; with none stored, to the log start (never to Kafka's committed offset: a shard holds its whole
  partition). Records polled for it before that are dropped and fetched again from there, so a
  rebalance neither skips nor repeats a record;
* a partition whose log no longer holds what its shard consumed is rewound to its log start, stored
  offset too. Two signs: a topic id that differs from the one stored in the shard (the topic was
  deleted and re-created, or a memory-storage broker restarted: a new log may already be past the old
  offset), or a fetch high watermark below the stored offset (a consistent log is never behind us).
  Without this, the new log's records were skipped as "replayed".

kafka-python 3 runs rebalance listeners on its IO thread, where blocking calls like ``committed()`` are
not allowed: the worker records assignments there and calls :meth:`resume` from the polling thread.
"""

from __future__ import annotations

import logging

from kafka import TopicPartition
from kafka.errors import KafkaError

from streamhash import metrics as m

log = logging.getLogger("streamhash.worker")

Key = tuple[str, int]


class Positions:
    def __init__(self, consumer, shards):
        self.consumer, self.shards = consumer, shards
        self.applied: dict[Key, int] = shards.offsets()  # we are the open shards' only writer
        self.epoch = 0  # counts rewinds: a batch prepared at an older epoch may hold records of a rewound log
        self._rewound_at: dict[Key, int] = {}
        self._topic_ids: dict[Key, str] = {}  # what each open shard stored: read once, not on every poll

    def resume(self, tps) -> None:
        """Seek partitions whose shards were just opened to where their shards left off."""
        for tp in tps:
            ours = self.shards.offsets_of(tp.topic, tp.partition)
            self.applied.update(ours)
            at = ours.get((tp.topic, tp.partition))
            if at is None:
                # Not Kafka's committed offset: a new shard must hold its whole partition, and a group's
                # commits may come from a shard that is elsewhere (another root, or moved aside).
                self.consumer.seek_to_beginning(tp)
                log.info("%s[%d]: no offset in its shard, consuming from the log start", tp.topic, tp.partition)
                continue
            log.info("resuming %s[%d] at offset %d (from its shard)", tp.topic, tp.partition, at)
            self.consumer.seek(tp, at)

    def forget(self, tps) -> None:
        """Partitions whose shards were closed (revoked): another worker owns their offsets now."""
        for tp in tps:
            self.applied.pop((tp.topic, tp.partition), None)
            self._topic_ids.pop((tp.topic, tp.partition), None)

    def keep(self, polled: dict, skip: set[TopicPartition] = frozenset()) -> list:
        """The records of a poll not yet applied, in order; partitions in ``skip`` (shard not open, or
        just opened and sought) and partitions rewound now are dropped: they are fetched again."""
        drop = set(skip) | self._rewind_reset_logs()
        got = [r for tp, batch in polled.items() if tp not in drop for r in batch]
        records = [r for r in got if r.offset >= self.applied.get((r.topic, r.partition), 0)]
        if len(records) < len(got):
            m.MESSAGES_REPLAYED.inc(len(got) - len(records))
        return records

    def rewound_since(self, epoch: int) -> set[Key]:
        """Partitions rewound after ``epoch``: a batch prepared then must not write them, or its offsets
        would move the partition past the head of the new log again (fetched anew from its start)."""
        return {key for key, at in self._rewound_at.items() if at > epoch}

    def advance(self, next_offsets: dict[Key, int]) -> None:
        """Offsets the shards have just committed."""
        self.applied.update(next_offsets)

    def lag(self, topic: str | None = None) -> int:
        """Sum over assigned partitions (of ``topic``) of high watermark minus position (not ``end_offsets()``:
        wrong on Tansu)."""
        lag = 0
        for tp in self.consumer.assignment():
            hw = self.consumer.highwater(tp)
            if hw is not None and topic in (None, tp.topic):
                lag += max(0, hw - self.consumer.position(tp))
        return lag

    def _rewind_reset_logs(self) -> set[TopicPartition]:
        reset: set[TopicPartition] = set()
        for tp in self.consumer.assignment():
            ours = self.applied.get((tp.topic, tp.partition))
            if ours is None:
                continue  # shard not open yet
            new_id = self._changed_topic_id(tp)
            hw = self.consumer.highwater(tp)
            if new_id is not None:
                reset |= self._rewind(tp, ours, "topic id changed")
                self.shards.set_topic_id(tp.topic, tp.partition, new_id)
                self._topic_ids[(tp.topic, tp.partition)] = new_id
            elif hw is not None and hw < ours:
                reset |= self._rewind(tp, ours, f"high watermark {hw} behind the stored offset")
        return reset

    def _rewind(self, tp: TopicPartition, ours: int, why: str) -> set[TopicPartition]:
        start = self._log_start(tp)
        log.warning("log of %s[%d] was reset (%s): stored next offset %d; consuming again from offset %d "
                    "(re-sent ids overwrite)", tp.topic, tp.partition, why, ours, start)
        self.shards.set_offset(tp.topic, tp.partition, start)
        self.applied[(tp.topic, tp.partition)] = start
        self.epoch += 1
        self._rewound_at[(tp.topic, tp.partition)] = self.epoch
        m.OFFSET_RESETS.labels(topic=tp.topic, partition=str(tp.partition)).inc()
        self.consumer.seek(tp, start)
        return {tp}

    def _changed_topic_id(self, tp: TopicPartition) -> str | None:
        """The broker's id of the topic if it differs from the one the partition's shard stored; the first
        id seen is stored."""
        cluster = getattr(getattr(self.consumer, "_client", None), "cluster", None)
        seen = cluster.topic_id(tp.topic) if cluster is not None and hasattr(cluster, "topic_id") else None
        if seen is None or seen.int == 0:  # brokers before topic ids report none, or the null uuid
            return None
        key, seen = (tp.topic, tp.partition), str(seen)
        stored = self._topic_ids.get(key) or self.shards.topic_id(tp.topic, tp.partition)
        if stored is None:
            self.shards.set_topic_id(tp.topic, tp.partition, seen)
        elif stored != seen:
            return seen  # stored by the caller after the rewind: a crash in between rewinds again
        self._topic_ids[key] = seen
        return None

    def _log_start(self, tp: TopicPartition) -> int:
        try:
            return int(self.consumer.beginning_offsets([tp])[tp])
        except KafkaError as exc:
            log.warning("could not read the log start of %s[%d] (%r); using 0", tp.topic, tp.partition, exc)
            return 0
