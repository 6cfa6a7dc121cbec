"""Where each partition resumes: the store's offsets are the truth, Kafka's committed offsets a hint.

:class:`Positions` owns the next offset already applied to the store for every (topic, partition)
and the broker's topic ids seen when they were stored. After each poll (:meth:`reconcile`):

* newly assigned partitions are sought to the stored offset where it is ahead of Kafka's committed
  one (a crash between the store's commit and Kafka's leaves Kafka behind);
* a partition whose log no longer holds what the store says it consumed is rewound to its log start,
  stored offset too. Two signs: a changed topic id (the topic was deleted and re-created, or a
  memory-storage broker restarted) rewinds *every* stored partition of the topic, assigned or not,
  since a new log may already be past the old offset; a high watermark below the stored offset (a
  consumer never reads past the high watermark, so a consistent log cannot be behind us) rewinds
  that partition. Without this, the new log's records were skipped as "replayed".

kafka-python 3 runs rebalance listeners on its IO thread, where the blocking ``committed()`` call is
not allowed: :meth:`on_assigned` only records, :meth:`reconcile` runs on the polling thread.
"""

from __future__ import annotations

import logging

from kafka import TopicPartition
from kafka.errors import KafkaError

from streamhash import metrics as m

log = logging.getLogger("streamhash.worker")

Key = tuple[str, int]


class Positions:
    def __init__(self, consumer, store):
        self.consumer, self.store = consumer, store
        self.applied: dict[Key, int] = store.offsets()  # we are the store's only writer
        self.topic_ids: dict[str, str] = store.topic_ids()
        self._newly_assigned: set[TopicPartition] = set()
        self.epoch = 0  # counts rewinds: a batch prepared at an older epoch may hold records of a rewound log
        self._rewound_at: dict[Key, int] = {}

    def on_assigned(self, assigned) -> None:
        self._newly_assigned.update(assigned)

    def reconcile(self) -> set[TopicPartition]:
        """Resume newly assigned partitions and rewind reset logs; returns the rewound partitions
        (their records of this poll must be dropped: they are fetched again)."""
        self._resume_assigned()
        return self._rewind_reset_logs()

    def keep(self, polled: dict) -> list:
        """The records of a poll not yet applied, in order; rewound partitions are dropped."""
        reset = self.reconcile()
        got = [r for tp, batch in polled.items() if tp not in reset for r in batch]
        records = [r for r in got if r.offset >= self.applied.get((r.topic, r.partition), 0)]
        if len(records) < len(got):
            m.MESSAGES_REPLAYED.inc(len(got) - len(records))
        return records

    def rewound_since(self, epoch: int) -> set[Key]:
        """Partitions rewound after ``epoch``: a batch prepared then must not write them, or its offsets
        would move the partition past the head of the new log again (fetched anew from its start)."""
        return {key for key, at in self._rewound_at.items() if at > epoch}

    def advance(self, next_offsets: dict[Key, int]) -> None:
        """Offsets the store has just committed."""
        self.applied.update(next_offsets)

    def lag(self) -> int:
        """Sum over assigned partitions of high watermark minus position (not ``end_offsets()``: wrong on Tansu)."""
        lag = 0
        for tp in self.consumer.assignment():
            hw = self.consumer.highwater(tp)
            if hw is not None:
                lag += max(0, hw - self.consumer.position(tp))
        return lag

    def _resume_assigned(self) -> None:
        while self._newly_assigned:
            tp = self._newly_assigned.pop()
            ours = self.applied.get((tp.topic, tp.partition))
            if ours is None:
                continue
            committed = self.consumer.committed(tp)
            if (committed is None or ours > committed) and self.consumer.position(tp) < ours:
                log.info("resuming %s[%d] at LMDB offset %d (Kafka committed %s)", tp.topic, tp.partition, ours, committed)
                self.consumer.seek(tp, ours)

    def _rewind_reset_logs(self) -> set[TopicPartition]:
        reset: set[TopicPartition] = set()
        for topic in {tp.topic for tp in self.consumer.assignment()}:
            new_id = self._changed_topic_id(topic)
            if new_id is not None:
                for (t, p), ours in list(self.applied.items()):
                    if t == topic:
                        reset |= self._rewind(TopicPartition(t, p), ours, "topic id changed")
                self.store.set_topic_id(topic, new_id)  # after the offsets: a crash in between rewinds again
                self.topic_ids[topic] = new_id
        for tp in self.consumer.assignment():
            ours, hw = self.applied.get((tp.topic, tp.partition)), self.consumer.highwater(tp)
            if tp not in reset and ours is not None and hw is not None and hw < ours:
                reset |= self._rewind(tp, ours, f"high watermark {hw} behind the stored offset")
        return reset

    def _rewind(self, tp: TopicPartition, ours: int, why: str) -> set[TopicPartition]:
        start = self._log_start(tp)
        log.warning("log of %s[%d] was reset (%s): stored next offset %d; consuming again from offset %d "
                    "(re-sent ids overwrite)", tp.topic, tp.partition, why, ours, start)
        self.store.set_offset(tp.topic, tp.partition, start)
        self.applied[(tp.topic, tp.partition)] = start
        self.epoch += 1
        self._rewound_at[(tp.topic, tp.partition)] = self.epoch
        m.OFFSET_RESETS.labels(topic=tp.topic, partition=str(tp.partition)).inc()
        if tp in self.consumer.assignment():
            self.consumer.seek(tp, start)
            return {tp}
        return set()  # sought to the new stored offset when it is assigned

    def _changed_topic_id(self, topic: str) -> str | None:
        """The broker's id of ``topic`` if it differs from the stored one; the first id seen is stored."""
        cluster = getattr(getattr(self.consumer, "_client", None), "cluster", None)
        seen = cluster.topic_id(topic) if cluster is not None and hasattr(cluster, "topic_id") else None
        if seen is None or seen.int == 0:  # brokers before topic ids report none, or the null uuid
            return None
        stored = self.topic_ids.get(topic)
        if stored == str(seen):
            return None
        if stored is None:
            self.store.set_topic_id(topic, str(seen))
            self.topic_ids[topic] = str(seen)
            return None
        return str(seen)

    def _log_start(self, tp: TopicPartition) -> int:
        try:
            return int(self.consumer.beginning_offsets([tp])[tp])
        except KafkaError as exc:
            log.warning("could not read the log start of %s[%d] (%r); using 0", tp.topic, tp.partition, exc)
            return 0
