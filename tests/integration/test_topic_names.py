"""`--topic` on the command line moves every internal topic (issue 26: two pipelines started with `--topic
A.images` / `--topic B.images` shared one models and one codes topic, and the DLQ never followed the topic at
all). A real worker on the real broker, its images topic from the flag while the environment names another:
the topics it creates and the DLQ it writes are the flag's, and none of the environment's exists."""

from __future__ import annotations

import uuid

import pytest
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient

from streamhash.config import KafkaSettings
from streamhash.kafka.produce import make_producer
from streamhash.services.processes import spawn
from tests.support import stop, wait_for

pytestmark = pytest.mark.integration


def test_the_topic_flag_moves_the_dlq_models_and_codes_topics(broker, tmp_path):
    tag = uuid.uuid4().hex[:8]
    env_topic, flag_topic = f"a{tag}.images", f"b{tag}.images"
    env = {"STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers, "STREAMHASH_KAFKA__TOPIC": env_topic,
           "STREAMHASH_KAFKA__GROUP_ID": f"g{tag}", "STREAMHASH_WORKER__METRICS_PORT": "0"}
    log = tmp_path / "worker.log"
    proc = spawn(["worker", "--topic", flag_topic, "--store", str(tmp_path / "root")], env=env, log_path=log)
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    try:
        wanted = {flag_topic, f"{flag_topic}.dlq", f"b{tag}.models", f"b{tag}.codes"}

        def created():
            assert proc.poll() is None, log.read_text()[-3000:]
            return wanted <= set(admin.list_topics())

        wait_for(created, 90, f"the worker to create {sorted(wanted)}")
        assert not [t for t in admin.list_topics() if t.startswith(f"a{tag}")]
        producer = make_producer(KafkaSettings(bootstrap_servers=broker.bootstrap_servers))
        producer.send(flag_topic, key=b"bad-1", value=b"")  # an empty value: dead-lettered
        producer.flush()
        producer.close()
        consumer = KafkaConsumer(f"{flag_topic}.dlq", bootstrap_servers=broker.bootstrap_servers, group_id=None,
                                 auto_offset_reset="earliest", consumer_timeout_ms=1000)
        try:
            letters = wait_for(lambda: [r for r in consumer if r.key == b"bad-1"], 90, "the dead letter on the flag's DLQ")
        finally:
            consumer.close()
        assert dict(letters[0].headers)["source.topic"] == flag_topic.encode()
    finally:
        admin.close()
        stop(proc)
