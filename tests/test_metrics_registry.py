"""Each process kind exports its own metrics and no one else's, plus the process collectors."""

import socket
import urllib.request

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from streamhash import metrics as m


def exposed(registry) -> set[str]:
    """Series names as a scrape shows them (HELP lines too: an untouched labelled family is still announced)."""
    text = generate_latest(registry).decode()
    return {line.split()[2] if line.startswith("#") else line.split("{")[0].split()[0]
            for line in text.splitlines() if line}


def test_a_metric_is_one_process_kinds_own_or_in_all_three_labelled_by_process():
    """Each kind exports its own metrics and no one else's. The few in every registry say whose value they are:
    a ``process`` label (or they are the build's, the same in all); else the query server would serve the
    worker's lag as a constant zero."""
    names = {kind: exposed(r) for kind, r in m.REGISTRIES.items()}
    everywhere = set.intersection(*names.values())
    for name in set.union(*names.values()) - everywhere:
        owners = [kind for kind, ns in names.items() if name in ns]
        assert len(owners) == 1 or not name.startswith("streamhash_"), (name, owners)
    assert "process_start_time_seconds" in everywhere  # the process collectors, per process
    shared = [x for x in vars(m).values() if isinstance(x, MetricWrapperBase) and x._name in everywhere]
    assert shared  # the index size, model version and generation, and the build
    for metric in shared:
        assert "process" in metric._labelnames or metric._type == "info", metric._name


@pytest.mark.parametrize("kind,metric", [("worker", m.CONSUMER_LAG), ("learner", m.LEARNING_ROUNDS), ("query", m.QUERIES)])
def test_a_process_serves_what_its_code_updates(kind, metric):
    """A metric the process's code sets is in that process's registry (the one it serves), and in no other."""
    name = metric._name
    homes = [k for k, r in m.REGISTRIES.items() if any(f.name == name for f in r.collect())]
    assert homes == [kind], (name, homes)


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
