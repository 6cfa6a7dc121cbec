"""An item id's home partition: where the configured producer partitioner puts its key.

An id must live in one shard (re-sending it overwrites), and a shard is a partition. Kafka guarantees neither:
the partition is the producer's choice, and the common clients hash the same key differently — Java's and
kafka-python's default is murmur2, librdkafka's (confluent-kafka, its Go/.NET/Node clients) is ``consistent_random``:
CRC32 — or a producer names a partition itself. So the worker decides where an id belongs, by one rule
(``kafka.partitioner``), and re-routes a record that arrived elsewhere
(:mod:`streamhash.services.worker.rehome`).

- ``murmur2``: the Java client's ``Utils.toPositive(Utils.murmur2(key)) % n``, which is also kafka-python's
  ``DefaultPartitioner`` and librdkafka's ``murmur2``/``murmur2_random``; kafka-python's own ``murmur2`` is
  used, so the two cannot drift (pure Python: the worker's whole check of a record at home took 0.06-0.10 of
  the time parsing that record took, a 28x28 .npy, in ``benchmarks/bench_rehome.py``).
- ``crc32``: librdkafka's ``consistent``/``consistent_random`` (its default), ``rd_crc32(key) % n``: the IEEE
  CRC-32 of ``zlib.crc32``, unsigned, so no mask.

Both depend on the partition count: adding partitions to the topic moves the home of most ids (as it moves
where any keyed producer sends them); ids already stored stay where they were written.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from kafka.partitioner import Partitioner
from kafka.partitioner.default import DefaultPartitioner, murmur2

PARTITIONERS = ("murmur2", "crc32")


def murmur2_partition(key: bytes, partitions: int) -> int:
    """The Java client's (and kafka-python's) partition for ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def crc32_partition(key: bytes, partitions: int) -> int:
    """librdkafka's ``consistent`` partition for ``key``."""
    return zlib.crc32(key) % partitions


_BY_NAME: dict[str, Callable[[bytes, int], int]] = {"murmur2": murmur2_partition, "crc32": crc32_partition}


def home_partitioner(name: str) -> Callable[[bytes, int], int]:
    """``(key, partition count) -> partition`` for a partitioner named in :data:`PARTITIONERS`."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown partitioner {name!r}: one of {', '.join(PARTITIONERS)}") from None


class HomePartitioner(Partitioner):
    """A kafka-python producer partitioner that sends each keyed record to its home under ``name`` (a null key:
    kafka-python's default, a random partition), so a producer of this project never makes a worker re-route."""

    def __init__(self, name: str):
        self.home = home_partitioner(name)
        self._default = DefaultPartitioner()

    def partition(self, topic, key, serialized_key, value, serialized_value, cluster):
        if serialized_key is None:
            return self._default.partition(topic, key, serialized_key, value, serialized_value, cluster)
        partitions = sorted(cluster.partitions_for_topic(topic))
        return partitions[self.home(serialized_key, len(partitions))]
