"""Prometheus metrics: every name in one place, ``streamhash_`` prefix, base units, ``_total`` counters.

No item ids or labels are ever used as label values; the only labels are small closed sets
(``stage``, ``process``, ``endpoint``/``status``, ``topic``/``partition``).

Each process kind has its own registry and serves only that one, so a query server does not
export the worker's lag or learning metrics as constant zeros (nor the worker the query ones):
:data:`WORKER_REGISTRY` (the ingest worker), :data:`LEARNER_REGISTRY` (``streamhash learner``) and
:data:`QUERY_REGISTRY` (``streamhash serve``). All carry the process, platform and GC collectors and
``streamhash_build_info``; the gauges labelled ``process`` are in all, each process setting only its own
label value. Per-shard gauges are labelled ``shard`` (``topic/partition``: one per partition, a closed set).

>>> names = lambda r: {f.name for f in r.collect()}
>>> "streamhash_consumer_lag_messages" in names(WORKER_REGISTRY) - names(QUERY_REGISTRY)
True
>>> "process_start_time_seconds" in names(WORKER_REGISTRY) & names(QUERY_REGISTRY) & names(LEARNER_REGISTRY)
True
>>> "streamhash_learning_rounds" in names(LEARNER_REGISTRY) - names(WORKER_REGISTRY)
True
"""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)

from streamhash import __version__

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def _process_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    # The same collector objects as the default registry: they read /proc and gc at scrape time, per process.
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


WORKER_REGISTRY = _process_registry()
QUERY_REGISTRY = _process_registry()
LEARNER_REGISTRY = _process_registry()
REGISTRIES = {"worker": WORKER_REGISTRY, "query": QUERY_REGISTRY, "learner": LEARNER_REGISTRY}


def _in_both(metric):
    """Registered in every process's registry (the name keeps its history: it once meant two)."""
    QUERY_REGISTRY.register(metric)
    LEARNER_REGISTRY.register(metric)
    return metric


# both processes
BUILD_INFO = _in_both(Info("streamhash_build", "streamhash build information", registry=WORKER_REGISTRY))
BUILD_INFO.info({"version": __version__})
INDEX_ITEMS = _in_both(Gauge("streamhash_index_items", "Items in the index", ["process"], registry=WORKER_REGISTRY))
MODEL_VERSION = _in_both(Gauge("streamhash_model_version", "Model version in use", ["process"], registry=WORKER_REGISTRY))
INDEX_GENERATION = _in_both(Gauge("streamhash_index_generation", "Index generation in use", ["process"], registry=WORKER_REGISTRY))
# topic: models or codes. Workers dead-letter what they refuse; the learner and query servers skip it with a warning.
INTERNAL_REJECTED = _in_both(Counter("streamhash_internal_rejected_total", "Records of the internal models and codes topics "
                                     "refused (malformed, unsigned, out of order, a network that does not load or fit)",
                                     ["topic"], registry=WORKER_REGISTRY))
# why: reencode (a worker's re-encode) or learn (the learner's rounds). A network with a frozen backbone reads the
# features stored with each item instead (issue 23): it decodes only items stored without one (an older shard).
STORED_IMAGES_DECODED = _in_both(Counter("streamhash_stored_images_decoded_total", "Stored images decoded again "
                                         "after ingest, by why", ["purpose"], registry=WORKER_REGISTRY))

# ingest worker
_W = WORKER_REGISTRY
MESSAGES_CONSUMED = Counter("streamhash_messages_consumed_total", "Messages read from the image topic", registry=_W)
MESSAGES_REPLAYED = Counter("streamhash_messages_replayed_total", "Messages consumed again after a crash and skipped: already in LMDB", registry=_W)
ITEMS_INDEXED = Counter("streamhash_items_indexed_total", "Items written to the LMDB index (overwrites included)", registry=_W)
DEAD_LETTERED = Counter("streamhash_messages_dead_lettered_total", "Messages sent to the dead-letter topic", ["stage"], registry=_W)
TOMBSTONES = Counter("streamhash_tombstones_total", "Tombstones (a null value for an item id) applied: the item removed "
                     "from its shard, if it held it", registry=_W)
LABEL_NAMES_REPLACED = Counter("streamhash_label_names_replaced_total", "Class names of labels replaced by another name "
                               "a later message gave the same label (label-names header)", registry=_W)
REROUTED = Counter("streamhash_rerouted_total", "Records that arrived away from their key's home partition (another "
                   "producer partitioner, an explicit partition), produced to it instead of indexed", ["topic"], registry=_W)
REROUTED_STALE = Counter("streamhash_rerouted_stale_total", "Re-routed records not written at home: the shard held a newer "
                         "write of their id (by the producers' timestamps)", ["topic"], registry=_W)
BATCHES = Counter("streamhash_batches_total", "Batches processed and committed", registry=_W)
ENCODE_SECONDS = Histogram("streamhash_encode_duration_seconds", "Hash-network encode time per batch", buckets=_LATENCY_BUCKETS, registry=_W)
COMMIT_SECONDS = Histogram("streamhash_lmdb_commit_duration_seconds", "LMDB write transaction time per batch", buckets=_LATENCY_BUCKETS, registry=_W)
ASSIGNED_PARTITIONS = Gauge("streamhash_assigned_partitions", "Partitions of the image topic assigned to this worker", registry=_W)
CONSUMER_LAG = Gauge("streamhash_consumer_lag_messages", "Sum over assigned partitions of high watermark minus position", registry=_W)
LAST_COMMIT = Gauge("streamhash_last_commit_timestamp_seconds", "Unix time of the last committed batch", registry=_W)
STORE_FULL = Counter("streamhash_store_full_total", "Writes refused because the disk or map-size ceiling is full", registry=_W)
SHARDS_OPEN = Gauge("streamhash_shards_open", "Shards (one per assigned partition) this worker holds open", registry=_W)
SHARD_ITEMS = Gauge("streamhash_shard_items", "Items in each shard this worker owns", ["shard"], registry=_W)
SHARD_GENERATION = Gauge("streamhash_shard_generation", "Index generation of each shard this worker owns", ["shard"], registry=_W)
SHARD_MODEL_VERSION = Gauge("streamhash_shard_model_version", "Model version each owned shard encodes with", ["shard"], registry=_W)
SHARD_LOCK_WAITS = Counter("streamhash_shard_lock_waits_total",
                           "Assigned partitions paused because the previous owner still held the shard's lock", registry=_W)
SHARD_REENCODES = Counter("streamhash_shard_reencodes_total", "Shards re-encoded into an announced generation", registry=_W)
CODE_UPDATES = Counter("streamhash_code_updates_total", "Learned-code messages from the learner, by result (applied, stale: "
                       "the item was written again since; missing: not in the shard; quarantined)", ["result"], registry=_W)
OFFSET_RESETS = Counter("streamhash_offset_resets_total", "Partition positions moved because the committed or stored offset was out of range",
                        ["topic", "partition"], registry=_W)
# the shards' changelog (streamhash.kafka.changelog) and restores from it (streamhash.index.store.restore)
CHANGELOG_RECORDS = Counter("streamhash_changelog_records_total", "Records the checkpoint sent to the changelog (item "
                            "states, tombstones, offsets markers), acknowledged", registry=_W)
CHANGELOG_BYTES = Counter("streamhash_changelog_bytes_total", "Key and value bytes of the changelog records sent", registry=_W)
RESTORE_RECORDS = Counter("streamhash_restore_records_total", "Changelog records replayed into shards", registry=_W)
RESTORE_SECONDS = Counter("streamhash_restore_seconds_total", "Time spent replaying the changelog into shards", registry=_W)
RESTORE_LAG = Gauge("streamhash_restore_lag_records", "Changelog records left to replay, over the shards restoring now", registry=_W)
RESTORING_SHARDS = Gauge("streamhash_restoring_shards", "Shards this worker is restoring from the changelog", registry=_W)
SHARDS_FENCED = Counter("streamhash_shards_fenced_total", "Shards fenced: their partition was revoked and not assigned "
                        "back within the grace period (never served; dropped later)", registry=_W)
SHARDS_DROPPED = Counter("streamhash_shards_dropped_total", "Fenced shards deleted from disk", registry=_W)

# learning: the learner process (`streamhash learner`); the worker applies what it publishes
_W_ = _W
_W = LEARNER_REGISTRY
LEARNER_MODEL_VERSION = Gauge("streamhash_learner_published_model_version", "Latest model version the learner published", registry=_W)
LEARNER_GENERATION = Gauge("streamhash_learner_published_generation", "Generation of the latest model the learner published", registry=_W)
LEARNER_CODES_PUBLISHED = Counter("streamhash_learned_codes_published_total", "Learned codes published on the codes topic", registry=_W)
LEARNING_ROUNDS = Counter("streamhash_learning_rounds_total", "DIHN learning rounds completed", registry=_W)
LEARNING_ROUND_SECONDS = Histogram("streamhash_learning_round_duration_seconds", "DIHN round duration",
                                   buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=_W)
LEARNING_ROUND_FAILURES = Counter("streamhash_learning_round_failures_total", "DIHN learning rounds that raised and were abandoned", registry=_W)
LEARNING_QUARANTINED = Counter("streamhash_learning_quarantined_items_total", "Labeled items excluded from learning after a failed round", registry=_W)
INDEX_MI = Gauge("streamhash_index_mi", "Mutual-information quality of the live codes on the reservoir", registry=_W)
CANDIDATE_MI = Gauge("streamhash_candidate_mi", "Mutual-information quality of the candidate codes on the reservoir", registry=_W)
MI_GAIN_SIGMA = Gauge("streamhash_mi_gain_sigma", "Bootstrap standard deviation of the MI gain of a re-encode, last round", registry=_W)
REENCODE_COST_ITEMS = Gauge("streamhash_reencode_cost_items",
                            "Images a re-encode would decode and encode (stale inferred codes), estimated at the last round", registry=_W)
REENCODE_TRIGGERS = Counter("streamhash_reencode_triggers_total", "Re-encodes triggered by the MI test", registry=_W)
# a re-encode runs in the worker, shard by shard
REENCODE_SECONDS = Histogram("streamhash_reencode_duration_seconds", "Re-encode duration of one shard",
                             buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800), registry=_W_)
DRIFT_DETECTIONS = Counter("streamhash_drift_detections_total", "Drifts detected on the live index MI", registry=_W)
REENCODED_IMAGES = Counter("streamhash_reencoded_images_total",
                           "Images decoded and encoded by re-encodes (learned and up-to-date codes are copied, not counted)", registry=_W_)
LEARN_LAG_SECONDS = Histogram("streamhash_learn_lag_seconds", "Time from a labeled item reaching the learner to its learned code stored",
                              buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 10800), registry=_W)
# 1 while the worker cannot learn; reason "no_labels": only unlabeled items seen, the initial network serves
LEARNING_BLOCKED = Gauge("streamhash_learning_blocked", "1 while the learner cannot learn, by reason", ["reason"], registry=_W)

_W = _W_
# query worker
_Q = QUERY_REGISTRY
QUERIES = Counter("streamhash_queries_total", "Search requests answered, by response status", ["endpoint", "status"], registry=_Q)
QUERY_SECONDS = Histogram("streamhash_query_duration_seconds", "Search latency, request in to response out", ["endpoint"],
                          buckets=_LATENCY_BUCKETS, registry=_Q)
FRESHNESS_SECONDS = Histogram(
    "streamhash_freshness_seconds", "Kafka message timestamp to visible in the query index",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=_Q,
)
INDEX_REFRESH_SECONDS = Histogram("streamhash_index_refresh_duration_seconds", "Time to apply one batch of store changes",
                                  buckets=_LATENCY_BUCKETS, registry=_Q)
QUERY_SHARDS = Gauge("streamhash_query_shards", "Shards this query server serves (a router: shards its remotes answered with)",
                     registry=_Q)
# shard: the remote's position in --shards (a closed set; URLs are not label values), "discovered" for every server a
# discovering router found (which one failed is in the answer's partial shards); result: ok, timeout or error
ROUTER_SHARD_REQUESTS = Counter("streamhash_router_shard_requests_total", "Requests a router sent to each remote query server, "
                                "by result", ["shard", "result"], registry=_Q)
# reason: header_timeout, header_size, connection_cap (a new one refused), evicted_idle (an idle one closed for it)
HTTP_CONNECTIONS_CLOSED = Counter("streamhash_http_connections_closed_total", "Client connections a query server or "
                                  "router closed to stay within its bounds, by reason", ["reason"], registry=_Q)


def serve_metrics(port: int, host: str = "127.0.0.1", registry: CollectorRegistry = WORKER_REGISTRY) -> None:
    """Expose ``registry`` on /metrics from a background thread (port 0 disables it)."""
    if port:
        start_http_server(port, addr=host, registry=registry)
