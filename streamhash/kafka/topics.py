"""Create the image and dead-letter topics up front.

Partitions are the unit of scale (DESIGN.md) and Tansu cannot add partitions later, so the count
is chosen here, once. Topics that exist are left as they are.
"""

from __future__ import annotations

import logging

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from streamhash.config import KafkaSettings

log = logging.getLogger(__name__)


def ensure_topics(kafka: KafkaSettings) -> None:
    admin = KafkaAdminClient(client_id="streamhash-admin", **kafka.client_kwargs())
    try:
        existing = set(admin.list_topics())
        wanted = [kafka.topic, kafka.dlq_topic]
        new = [NewTopic(t, num_partitions=kafka.topic_partitions, replication_factor=1) for t in wanted if t not in existing]
        if new:
            try:
                admin.create_topics(new)
                log.info("created topics %s", [t.name for t in new])
            except TopicAlreadyExistsError:
                pass  # another worker won the race
    finally:
        admin.close()
