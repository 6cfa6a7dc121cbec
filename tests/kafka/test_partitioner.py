"""An id's home partition (issue 25, item 4): murmur2 is exactly where kafka-python's own producer partitioner puts
a key (the Java client's rule), crc32 is librdkafka's ``consistent`` partitioner (known values)."""

from __future__ import annotations

import random
import zlib

import pytest
from kafka.partitioner import DefaultPartitioner

from streamhash.kafka.partitioner import HomePartitioner, crc32_partition, home_partitioner, murmur2_partition


class Cluster:
    """What a producer partitioner reads of kafka-python's ClusterMetadata: ``topic`` with ``partitions`` partitions."""

    def __init__(self, topic: str, partitions: int):
        self.topic, self.ids = topic, set(range(partitions))

    def topics(self):
        return {self.topic}

    def partitions_for_topic(self, topic):
        return set(self.ids) if topic == self.topic else None

    available_partitions_for_topic = partitions_for_topic


def random_keys(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) for _ in range(n)] + \
        [f"img-{i}".encode() for i in range(n)]


@pytest.mark.parametrize("partitions", [1, 2, 3, 4, 7, 16, 100])
def test_murmur2_is_where_kafka_pythons_producer_puts_each_key(partitions):
    meta = Cluster("t", partitions)
    producer = DefaultPartitioner()
    for key in random_keys(500, seed=partitions):
        assert murmur2_partition(key, partitions) == producer.partition("t", key, key, b"v", b"v", meta)


def test_murmur2_known_values_of_the_java_client():
    # org.apache.kafka.common.utils.Utils.murmur2, as the Java client's tests pin them (toPositive(hash) % n)
    assert murmur2_partition(b"21", 1 << 31) == (-973932308) & 0x7FFFFFFF
    assert murmur2_partition(b"abc", 1 << 31) == 479470107


def test_crc32_is_librdkafkas_consistent_partitioner():
    # rd_crc32 is the IEEE CRC-32: the check value of "123456789" is 0xCBF43926
    assert crc32_partition(b"123456789", 1 << 32) == 0xCBF43926
    assert crc32_partition(b"123456789", 4) == 0xCBF43926 % 4 == 2
    assert crc32_partition(b"c3-1", 4) == zlib.crc32(b"c3-1") % 4
    for key in random_keys(200):
        assert 0 <= crc32_partition(key, 7) < 7
    # the two rules disagree on many keys: that is the duplicate this issue removes
    keys = [f"c3-{i}".encode() for i in range(400)]
    assert sum(crc32_partition(k, 4) != murmur2_partition(k, 4) for k in keys) > 200


def test_home_partitioner_names_and_a_producer_partitioner_that_follows_them():
    assert home_partitioner("murmur2") is murmur2_partition and home_partitioner("crc32") is crc32_partition
    with pytest.raises(ValueError, match="murmur2, crc32"):
        home_partitioner("fnv1a")
    meta = Cluster("t", 4)
    for key in random_keys(100):
        assert HomePartitioner("crc32").partition("t", key, key, b"v", b"v", meta) == crc32_partition(key, 4)
        assert HomePartitioner("murmur2").partition("t", key, key, b"v", b"v", meta) == murmur2_partition(key, 4)
    assert HomePartitioner("crc32").partition("t", None, None, b"v", b"v", meta) in range(4)


def test_the_setting_takes_the_two_rules_only(monkeypatch):
    from pydantic import ValidationError

    from streamhash.config import KafkaSettings, Settings

    assert KafkaSettings().partitioner == "murmur2"
    monkeypatch.setenv("STREAMHASH_KAFKA__PARTITIONER", "crc32")
    assert Settings().kafka.partitioner == "crc32"
    with pytest.raises(ValidationError):
        KafkaSettings(partitioner="consistent_random")
