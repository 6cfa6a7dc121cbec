"""Test support: start streamhash processes against a real broker and read what they stored.

Used by the integration tests (and nothing in the library): worker and query-server environments,
a worker started and waited for, a store read back in a fresh process, a batch of synthetic images
produced to a topic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from streamhash.kafka.produce import from_arrays, make_producer, send
from streamhash.services import processes
from streamhash.services.processes import scrape, spawn

# A slow or busy machine is slower, not red: STREAMHASH_TEST_TIME_SCALE=3 stretches every deadline the tests wait
# on (wait_for, wait_http and stop below, the demo's and the eval CLI's subprocess timeouts) and every test's
# pytest-timeout (tests/conftest.py) by 3. Read here only; default 1.
TIME_SCALE = float(os.environ.get("STREAMHASH_TEST_TIME_SCALE") or 1)


def scaled(seconds: float) -> float:
    """A deadline of ``seconds`` on an idle machine, stretched by ``STREAMHASH_TEST_TIME_SCALE``."""
    return seconds * TIME_SCALE


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """:func:`streamhash.services.processes.wait_for` with its deadline :func:`scaled`."""
    return processes.wait_for(predicate, scaled(timeout), what, interval)


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log_path: Path | None = None) -> None:
    """:func:`streamhash.services.processes.wait_http` with its deadline :func:`scaled`."""
    processes.wait_http(url, scaled(timeout), proc, log_path)


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """:func:`streamhash.services.processes.stop` (SIGTERM, then SIGKILL after ``timeout``, :func:`scaled`)."""
    return processes.stop(proc, scaled(timeout))


def module_kafka(broker, name: str):
    """Topics and a group of a module's own (``{name}.images``, ``{name}.images.dlq``, ``{name}.models``,
    ``{name}.codes``, ``{name}-workers``), created."""
    from streamhash.config import KafkaSettings
    from streamhash.kafka.topics import ensure_topics

    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic=f"{name}.images",
                          dlq_topic=f"{name}.images.dlq", group_id=f"{name}-workers")
    ensure_topics(kafka)
    return kafka


def env_for(kafka, store: Path, metrics_port: int = 0, http_port: int = 0) -> dict:
    return {
        "STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "STREAMHASH_KAFKA__TOPIC": kafka.topic,
        "STREAMHASH_KAFKA__DLQ_TOPIC": kafka.dlq_topic, "STREAMHASH_KAFKA__GROUP_ID": kafka.group_id,
        "STREAMHASH_KAFKA__MODELS_TOPIC": kafka.models_topic, "STREAMHASH_KAFKA__CODES_TOPIC": kafka.codes_topic,
        "STREAMHASH_STORE__PATH": str(store), "STREAMHASH_WORKER__METRICS_PORT": str(metrics_port),
        "STREAMHASH_SERVER__PORT": str(http_port), "STREAMHASH_LEARN__ENABLED": "false",
    }


def start_worker(env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    proc = spawn(["worker"], env=env, log_path=log)
    url = f"http://127.0.0.1:{env['STREAMHASH_WORKER__METRICS_PORT']}/metrics"
    wait_http(url, 60, proc, log)
    wait_for(lambda: scrape(url).get("streamhash_assigned_partitions", 0) > 0, 60, "partition assignment")
    return proc, url


def read_store(path: Path) -> dict:
    """Open every shard under the store root read-only in a fresh process (one LMDB env per process) and
    report their contents: ``ids`` (all shards, shard order then seq order), ``labels`` and ``codes`` (hex) by id,
    ``offsets``, and per shard
    ``shards[name] = {"ids", "next_seq", "generation", "model_version"}``."""
    code = textwrap.dedent(f"""
        import json
        from streamhash.index.store import Store
        from streamhash.index.store.root import StoreRoot
        root = StoreRoot({str(path)!r}, create=False)
        out = {{"ids": [], "labels": {{}}, "codes": {{}}, "offsets": {{}}, "shards": {{}}}}
        for key in root.shards():
            s = Store(root.shard_path(key), readonly=True)
            snap, meta = s.snapshot(), s.read_meta()
            out["ids"] += snap.ids
            out["labels"].update(zip(snap.ids, snap.labels))
            out["codes"].update(zip(snap.ids, (c.tobytes().hex() for c in snap.codes)))
            out["offsets"].update({{f"{{t}}:{{p}}": o for (t, p), o in s.offsets().items()}})
            out["shards"][f"{{key.topic}}/{{key.partition}}"] = {{
                "ids": snap.ids, "next_seq": meta["next_seq"], "generation": meta["generation"],
                "model_version": meta["model_version"], "learned": int(snap.learned.sum())}}
            s.close()
        print(json.dumps(out))
    """)
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def partition_of(item_id: str, partitions: int = 4) -> int:
    """Where kafka-python's default partitioner puts a key (the Java client's murmur2)."""
    from kafka.partitioner.default import murmur2

    return (murmur2(item_id.encode()) & 0x7FFFFFFF) % partitions


def produce(kafka, n: int, prefix: str, seed: int, start: int = 0) -> None:
    """``n`` labeled synthetic images as .npy messages keyed ``{prefix}{start + i}``."""
    from tests.conftest import synthetic_images

    images, labels = synthetic_images(n, seed=seed)
    producer = make_producer(kafka)
    send(producer, kafka.topic, from_arrays(images, labels, prefix=prefix, fmt="npy", start=start), progress=False)
    producer.close()


def high_watermarks(kafka, topic: str, timeout_s: float = 30) -> dict[int, int]:
    """Each partition of ``topic`` and the offset after its last message, as a fetch reports it (ListOffsets
    "latest", ``end_offsets()``, is wrong on Tansu: docs/KAFKA.md)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    try:
        parts = wait_for(lambda: consumer.partitions_for_topic(topic), timeout_s, f"{topic}'s partitions")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        wait_for(lambda: consumer.poll(timeout_ms=100) is not None and all(consumer.highwater(tp) is not None for tp in tps),
                 timeout_s, f"a fetch from every partition of {topic}")
        return {tp.partition: consumer.highwater(tp) for tp in tps}
    finally:
        consumer.close(autocommit=False)


def committed_through(store: Path, topic: str, ends: dict[int, int]) -> bool:
    """Whether the shards under ``store`` have committed ``topic`` up to ``ends`` (partition -> offset), in
    their own transactions: what a worker has applied, not what it has fetched."""
    offsets = read_store(store)["offsets"]
    return all(offsets.get(f"{topic}:{p}", 0) >= end for p, end in ends.items())


def have_fashion_mnist() -> bool:
    """Whether the Fashion-MNIST files are where the loader looks (tests that need them skip without)."""
    from streamhash.data.fashion_mnist import find_dir
    from streamhash.errors import DatasetMissingError

    try:
        find_dir()
        return True
    except DatasetMissingError:
        return False
