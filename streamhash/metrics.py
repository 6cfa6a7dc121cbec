"""Prometheus metrics: every name in one place, ``streamhash_`` prefix, base units, ``_total`` counters.

No item ids or labels are ever used as label values; the only labels are small closed sets
(``stage``, ``process``, ``endpoint``/``status``).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

from streamhash import __version__

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

BUILD_INFO = Info("streamhash_build", "streamhash build information")
BUILD_INFO.info({"version": __version__})

# ingest worker
MESSAGES_CONSUMED = Counter("streamhash_messages_consumed_total", "Messages read from the image topic")
MESSAGES_REPLAYED = Counter("streamhash_messages_replayed_total", "Messages consumed again after a crash and skipped: already in LMDB")
ITEMS_INDEXED = Counter("streamhash_items_indexed_total", "Items written to the LMDB index (overwrites included)")
DEAD_LETTERED = Counter("streamhash_messages_dead_lettered_total", "Messages sent to the dead-letter topic", ["stage"])
BATCHES = Counter("streamhash_batches_total", "Batches processed and committed")
ENCODE_SECONDS = Histogram("streamhash_encode_duration_seconds", "Hash-network encode time per batch", buckets=_LATENCY_BUCKETS)
COMMIT_SECONDS = Histogram("streamhash_lmdb_commit_duration_seconds", "LMDB write transaction time per batch", buckets=_LATENCY_BUCKETS)
INDEX_ITEMS = Gauge("streamhash_index_items", "Items in the index", ["process"])
ASSIGNED_PARTITIONS = Gauge("streamhash_assigned_partitions", "Partitions of the image topic assigned to this worker")
CONSUMER_LAG = Gauge("streamhash_consumer_lag_messages", "Sum over assigned partitions of high watermark minus position")
LAST_COMMIT = Gauge("streamhash_last_commit_timestamp_seconds", "Unix time of the last committed batch")
STORE_FULL = Counter("streamhash_store_full_total", "Writes refused because the disk or map-size ceiling is full")

# learning (issue 3)
LEARNING_ROUNDS = Counter("streamhash_learning_rounds_total", "DIHN learning rounds completed")
LEARNING_ROUND_SECONDS = Histogram("streamhash_learning_round_duration_seconds", "DIHN round duration", buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
INDEX_MI = Gauge("streamhash_index_mi", "Mutual-information quality of the live codes on the reservoir")
CANDIDATE_MI = Gauge("streamhash_candidate_mi", "Mutual-information quality of the candidate codes on the reservoir")
REENCODE_TRIGGERS = Counter("streamhash_reencode_triggers_total", "Re-encodes triggered by the MI test")
REENCODE_SECONDS = Histogram("streamhash_reencode_duration_seconds", "Re-encode duration", buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))
DRIFT_DETECTIONS = Counter("streamhash_drift_detections_total", "Drifts detected on the live index MI")
MODEL_VERSION = Gauge("streamhash_model_version", "Model version in use", ["process"])
INDEX_GENERATION = Gauge("streamhash_index_generation", "Index generation in use", ["process"])

# query worker
QUERIES = Counter("streamhash_queries_total", "Search requests answered", ["endpoint", "status"])
QUERY_SECONDS = Histogram("streamhash_query_duration_seconds", "Search latency, request in to response out", ["endpoint"], buckets=_LATENCY_BUCKETS)
FRESHNESS_SECONDS = Histogram(
    "streamhash_freshness_seconds", "Kafka message timestamp to visible in the query index",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
INDEX_REFRESH_SECONDS = Histogram("streamhash_index_refresh_duration_seconds", "Time to apply one batch of store changes", buckets=_LATENCY_BUCKETS)


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics on a background thread (port 0 disables it)."""
    if port:
        start_http_server(port, addr=host)
