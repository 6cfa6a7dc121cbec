"""Each process kind exports its own metrics and no one else's, plus the process collectors."""

import socket
import urllib.request

import pytest
from prometheus_client import REGISTRY, generate_latest

from streamhash import metrics as m

WORKER_ONLY = {
    "streamhash_messages_consumed_total", "streamhash_items_indexed_total", "streamhash_messages_dead_lettered_total",
    "streamhash_consumer_lag_messages", "streamhash_last_commit_timestamp_seconds", "streamhash_store_full_total",
    "streamhash_offset_resets_total", "streamhash_reencoded_images_total", "streamhash_shards_open",
    "streamhash_shard_lock_waits_total", "streamhash_shard_reencodes_total", "streamhash_code_updates_total",
}
LEARNER_ONLY = {
    "streamhash_learning_rounds_total", "streamhash_index_mi", "streamhash_candidate_mi",
    "streamhash_reencode_triggers_total", "streamhash_drift_detections_total",
    "streamhash_learning_round_failures_total", "streamhash_learning_quarantined_items_total",
    "streamhash_learn_lag_seconds", "streamhash_learning_blocked", "streamhash_learner_published_model_version",
    "streamhash_learned_codes_published_total",
}
QUERY_ONLY = {
    "streamhash_queries_total", "streamhash_query_duration_seconds", "streamhash_freshness_seconds",
    "streamhash_index_refresh_duration_seconds", "streamhash_query_shards", "streamhash_router_shard_requests_total",
}
BOTH = {"streamhash_build_info", "streamhash_index_items", "streamhash_model_version", "streamhash_index_generation",
        "process_start_time_seconds", "python_info"}


def exposed(registry) -> set[str]:
    """Series names as a scrape shows them (HELP lines too: an untouched labelled family is still announced)."""
    text = generate_latest(registry).decode()
    return {line.split()[2] if line.startswith("#") else line.split("{")[0].split()[0]
            for line in text.splitlines() if line}


@pytest.mark.parametrize("kind,own,foreign", [("worker", WORKER_ONLY, QUERY_ONLY | LEARNER_ONLY),
                                               ("learner", LEARNER_ONLY, QUERY_ONLY | WORKER_ONLY),
                                               ("query", QUERY_ONLY, WORKER_ONLY | LEARNER_ONLY)])
def test_each_registry_has_its_own_metrics_only(kind, own, foreign):
    names = exposed(m.REGISTRIES[kind])
    assert own <= names
    assert BOTH <= names
    assert not names & foreign


def test_every_streamhash_metric_belongs_to_a_process_registry():
    # Anything defined against the default registry would be served by no process.
    default_only = {f.name for f in REGISTRY.collect()} - {f.name for r in m.REGISTRIES.values() for f in r.collect()}
    assert not {n for n in default_only if n.startswith("streamhash_")}


def test_serve_metrics_serves_the_given_registry_only():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m.serve_metrics(port, "127.0.0.1", m.QUERY_REGISTRY)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "streamhash_queries_total" in text and "process_start_time_seconds" in text
    assert "streamhash_consumer_lag_messages" not in text and "streamhash_reencode_triggers_total" not in text
