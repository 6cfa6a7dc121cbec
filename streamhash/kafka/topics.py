"""Create the topics up front: images, dead letters, the learner's models and codes, the shards' changelog.

Partitions are the unit of scale (DESIGN.md) and Tansu cannot add partitions later, so the count
is chosen here, once. Topics that exist are left as they are, except that the codes and changelog topics must
have the images topic's partition count (co-partitioning: the worker owning images partition p owns codes
partition p): a mismatch is refused with what to do.
"""

from __future__ import annotations

import logging

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from streamhash.config import KafkaSettings
from streamhash.errors import ConfigError
from streamhash.kafka.modelbus import MAX_MODEL_BYTES

log = logging.getLogger(__name__)


def ensure_topics(kafka: KafkaSettings) -> None:
    admin = KafkaAdminClient(client_id="streamhash-admin", **kafka.client_kwargs())
    try:
        existing = set(admin.list_topics())
        n = partition_count(admin, kafka.topic) if kafka.topic in existing else kafka.topic_partitions
        wanted = {
            kafka.topic: NewTopic(kafka.topic, num_partitions=n, replication_factor=1),
            kafka.dlq_topic: NewTopic(kafka.dlq_topic, num_partitions=n, replication_factor=1),
            kafka.codes_topic: NewTopic(kafka.codes_topic, num_partitions=n, replication_factor=1),
            # the shards' state (streamhash.kafka.changelog): compacted, one record per live item, blobs included
            kafka.changelog_topic: NewTopic(kafka.changelog_topic, num_partitions=n, replication_factor=1, topic_configs={
                "cleanup.policy": "compact", "max.message.bytes": str(16 << 20)}),
            kafka.models_topic: NewTopic(kafka.models_topic, num_partitions=1, replication_factor=1, topic_configs={
                "cleanup.policy": "compact", "max.message.bytes": str(MAX_MODEL_BYTES)}),
        }
        new = [t for name, t in wanted.items() if name not in existing]
        if new:
            try:
                admin.create_topics(new)
                log.info("created topics %s", [t.name for t in new])
            except TopicAlreadyExistsError:
                pass  # another process won the race
        for topic, var in ((kafka.codes_topic, "CODES_TOPIC"), (kafka.changelog_topic, "CHANGELOG_TOPIC")):
            if topic in existing and (got := partition_count(admin, topic)) != n:
                raise ConfigError(
                    f"topic {topic} has {got} partitions but {kafka.topic} has {n}: they must be co-partitioned "
                    f"(a worker owns partition p of both). Delete {topic} and let streamhash create it, or set "
                    f"STREAMHASH_KAFKA__{var} to a new name.")
    finally:
        admin.close()


def partition_count(admin: KafkaAdminClient, topic: str) -> int:
    return len(admin.describe_topics([topic])[0]["partitions"])
