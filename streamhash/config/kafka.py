"""The Kafka client settings (connection, security, the internal topics' names) and the secrets that guard the
internal topics and the HTTP API: sections of :class:`streamhash.config.Settings`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode


def derived_topics(topic: str) -> dict[str, str]:
    """The internal topics' names for the images topic ``topic``: the one rule, applied to every internal topic
    (a new one is added here) left empty in the settings.

    >>> derived_topics("shop.images")
    {'dlq_topic': 'shop.images.dlq', 'models_topic': 'shop.models', 'codes_topic': 'shop.codes', \
'changelog_topic': 'shop.images.changelog', 'serving_topic': 'shop.images.serving'}
    """
    base = topic.removesuffix(".images")
    return {"dlq_topic": f"{topic}.dlq", "models_topic": f"{base}.models", "codes_topic": f"{base}.codes",
            "changelog_topic": f"{topic}.changelog", "serving_topic": f"{topic}.serving"}


class KafkaSettings(BaseModel):
    # None means "start the embedded broker" for the demo; workers require a value.
    bootstrap_servers: str | None = None
    topic: str = "streamhash.images"
    # Every internal topic is named after `topic` unless set explicitly (DERIVED_TOPICS), whichever source set
    # `topic` (flag, environment, STREAMHASH_CONFIG file): two pipelines on one cluster never share a DLQ, a
    # model or a learned code. The DLQ: `<topic>.dlq`. The learner's topics (streamhash.kafka.modelbus): model
    # versions (compacted, one partition) and learned codes (co-partitioned with `topic`: same partition count,
    # created with it), named after `topic` without its ".images" suffix: streamhash.images -> streamhash.models,
    # streamhash.codes.
    dlq_topic: str = ""
    models_topic: str = ""
    codes_topic: str = ""
    # The shards' changelog (streamhash.kafka.changelog): compacted, co-partitioned with `topic`, written by the
    # workers' checkpoint, replayed into a shard that is missing or behind. `<topic>.changelog`.
    changelog_topic: str = ""
    # Which query server serves which partition (streamhash.kafka.directory): compacted, one partition, one record
    # per advertising query server, read by the router. `<topic>.serving`.
    serving_topic: str = ""
    group_id: str = "streamhash-worker"
    # Tansu holds JoinGroup for about half the session timeout (docs/KAFKA.md); the defaults
    # below suit both it and real Kafka. Raise them for a busy real cluster.
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 2000
    max_poll_interval_ms: int = 300_000
    request_timeout_ms: int = 30_000
    max_poll_records: int = 1000
    # Kafka's committed offsets are a hint (each shard stores its partitions' offsets with its data): the
    # worker commits them at most this often, not after every batch (streamhash.kafka.checkpoint).
    offset_commit_interval_s: float = Field(1.0, ge=0)
    fetch_max_bytes: int = 52_428_800
    # How long the broker may hold a fetch waiting for data. Real Kafka answers a waiting fetch as soon as
    # data comes; the embedded broker did not for the worker's fetches (images and codes topics): a probe
    # image reached the worker's poll 15-20 ms after its ack at 100 ms, 5-9 ms at 10 ms (bench_ingest).
    # An idle worker sends at most 1000/fetch_max_wait_ms fetches a second.
    fetch_max_wait_ms: int = 20
    # PLAINTEXT, SSL (TLS), SASL_PLAINTEXT or SASL_SSL (SASL over TLS); the ssl_* files apply to SSL and SASL_SSL
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None  # the CA that signed the brokers' certificates (None: the system's CAs)
    ssl_certfile: Path | None = None  # this client's certificate (mutual TLS), PEM
    ssl_keyfile: Path | None = None  # its private key, PEM
    ssl_password: SecretStr | None = None  # the private key's passphrase
    ssl_check_hostname: bool = True
    topic_partitions: int = 4
    # Where an item id belongs: the partition this producer partitioner gives its key (streamhash.kafka.partitioner).
    # The worker re-routes a record that arrived on another partition (librdkafka's default, an explicit partition)
    # to that one, so an id lives in one shard. murmur2: Java's and kafka-python's default; crc32: librdkafka's.
    partitioner: Literal["murmur2", "crc32"] = "murmur2"

    @model_validator(mode="after")
    def _derived_topics(self) -> "KafkaSettings":
        for name, derived in derived_topics(self.topic).items():
            if not getattr(self, name):
                setattr(self, name, derived)
        return self

    def client_kwargs(self) -> dict:
        """Connection keyword arguments shared by kafka-python producers and consumers."""
        if not self.bootstrap_servers:
            raise ValueError("kafka.bootstrap_servers is not set (STREAMHASH_KAFKA__BOOTSTRAP_SERVERS)")
        kw: dict = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism:
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        if self.security_protocol in ("SSL", "SASL_SSL"):
            kw["ssl_check_hostname"] = self.ssl_check_hostname
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                if getattr(self, name) is not None:
                    kw[name] = str(getattr(self, name))
            if self.ssl_password is not None:
                kw["ssl_password"] = self.ssl_password.get_secret_value()
        return kw

    @model_validator(mode="after")
    def _tls_files_need_tls(self) -> "KafkaSettings":
        given = [n for n in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password") if getattr(self, n) is not None]
        if given and self.security_protocol not in ("SSL", "SASL_SSL"):
            # silently connecting in plain text with TLS files configured would hide a typo in the protocol
            raise ValueError(f"{', '.join(given)} set but security_protocol is {self.security_protocol}: "
                             "use SSL or SASL_SSL")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together (mutual TLS)")
        return self


class SecuritySettings(BaseModel):
    # A shared secret with which the learner signs every model version and learned-code message (HMAC-SHA256)
    # and workers verify before adopting: a principal that may write to the models or codes topic but does not
    # hold the key cannot plant a model. None: unsigned, every well-formed internal message is taken.
    model_key: SecretStr | None = None
    # The query server's and the router's API key: every request must carry `Authorization: Bearer <key>`, else
    # 401 with a JSON error (streamhash.services.auth), except the paths in api_key_exempt: exact paths, or
    # prefixes ending in "*". The search page `/` and its assets /ui/* hold no data and load without it; the page
    # asks for the key and sends it. None: no authentication.
    api_key: SecretStr | None = None
    api_key_exempt: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["/", "/ui/*", "/healthz", "/metrics"])
    # The key a router sends to its query servers; None: api_key.
    upstream_api_key: SecretStr | None = None

    @field_validator("api_key_exempt", mode="before")
    @classmethod
    def _split_paths(cls, v):
        if isinstance(v, str):  # the env holds /a,/b (or a JSON list)
            v = json.loads(v) if v.lstrip().startswith("[") else v.split(",")
        return [p.strip() for p in v if p.strip()]

    @field_validator("api_key", "upstream_api_key")
    @classmethod
    def _key_not_blank(cls, v):
        if v is not None and not v.get_secret_value().strip():
            raise ValueError("an API key must not be blank (unset it for no authentication)")
        return v
