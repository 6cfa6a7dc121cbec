"""A shard is a cache of Kafka (issue 25): wiped, it comes back from the changelog as it was, without encoding."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from streamhash.kafka.broker import free_port
from streamhash.kafka.modelbus import CodeUpdate, ModelPublisher
from streamhash.kafka.produce import make_producer
from streamhash.services.worker import app
from tests.support import committed_through, high_watermarks, module_kafka, partition_of, produce, wait_for

pytestmark = pytest.mark.integration


def dump(root: Path) -> dict:
    """Every item's full state (labels, code, provenance, blob digest) and each shard's offsets, read in a fresh
    process (one LMDB environment per process)."""
    code = textwrap.dedent(f"""
        import hashlib, json
        from streamhash.index.store import Store
        from streamhash.index.store.root import StoreRoot
        root = StoreRoot({str(root)!r}, create=False)
        out = {{"items": {{}}, "offsets": {{}}, "meta": {{}}}}
        for key in root.shards():
            s = Store(root.shard_path(key), readonly=True)
            ids, learned, model = s.provenance()
            for i in ids:
                r = s.get_item(i, with_blob=True)
                out["items"][i] = [key.partition, r["labels"], r["code"].hex(), r.get("learned", False),
                                   r.get("learned_by"), r["model"], bool(r.get("quarantined")), r["ctype"], r["ts"],
                                   hashlib.sha1(r["blob"]).hexdigest()]
            out["offsets"].update({{f"{{t}}:{{p}}": o for (t, p), o in s.offsets().items()}})
            meta = s.read_meta()
            out["meta"][str(key)] = {{k: meta.get(k) for k in ("restoring", "fenced")}}
            s.close()
        print(json.dumps(out))
    """)
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def run_worker(settings, until) -> None:
    """A worker in this process until ``until()`` holds, then stopped cleanly."""
    worker = app.Worker(settings)
    worker.connect()
    done: dict = {}
    thread = threading.Thread(target=lambda: done.setdefault("rc", worker.run()), daemon=True)
    thread.start()
    try:
        wait_for(until, 90, "the worker to catch up", interval=0.5)
    finally:
        worker.stop()
        thread.join(60)
    assert not thread.is_alive() and done["rc"] == 0


def caught_up(kafka, root: Path):
    ends = {t: high_watermarks(kafka, t) for t in (kafka.topic, kafka.codes_topic)}

    def done() -> bool:
        try:
            return all(committed_through(root, t, e) for t, e in ends.items())
        except subprocess.CalledProcessError:  # a shard being created has no meta yet
            return False
    return done


def test_a_wiped_root_restores_from_the_changelog_to_the_same_shards(broker, tmp_path):
    from streamhash.config import Settings, StoreSettings, WorkerSettings

    kafka = module_kafka(broker, "restore")
    root = tmp_path / "index"
    settings = Settings(kafka=kafka, store=StoreSettings(path=root, restore_batch_records=50),
                        worker=WorkerSettings(metrics_port=free_port()))
    produce(kafka, 240, "r-", seed=1)
    produce(kafka, 30, "r-", seed=2)  # relabels: r-0..r-29 sent again with other images and labels
    producer = make_producer(kafka)
    for i in range(30, 40):  # removals
        producer.send(kafka.topic, key=f"r-{i}".encode(), value=None)
    producer.flush()
    producer.close()
    run_worker(settings, caught_up(kafka, root))

    # learned codes and a quarantine mark for some items, addressed by their seq as the learner does
    seqs = json.loads(subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import json
        from streamhash.index.store import Store
        from streamhash.index.store.root import StoreRoot
        root = StoreRoot({str(root)!r}, create=False)
        out = {{}}
        for key in root.shards():
            s = Store(root.shard_path(key), readonly=True)
            out.update({{i: s.get_item(i)["seq"] for i in ("r-1", "r-50", "r-51", "r-52", "r-53") if s.get_item(i)}})
            s.close()
        print(json.dumps(out))""")], capture_output=True, text=True, check=True).stdout)
    publisher = ModelPublisher(kafka)
    publisher.publish_codes([(partition_of(i), CodeUpdate(i, seq, "learned", 1, bytes([7, 7, 7, 7])))
                             for i, seq in seqs.items() if i != "r-53"]
                            + [(partition_of("r-53"), CodeUpdate("r-53", seqs["r-53"], "quarantine", 1))])
    publisher.close()
    run_worker(settings, caught_up(kafka, root))
    before = dump(root)
    assert len(before["items"]) == 230
    assert sum(v[3] for v in before["items"].values()) == 4 and before["items"]["r-53"][6]

    shutil.rmtree(root)
    encoded: list = []
    real = app.BatchPipeline.encode
    app.BatchPipeline.encode = lambda self, valid, serving: (encoded.append(len(valid)), real(self, valid, serving))[1]
    try:
        run_worker(settings, caught_up(kafka, root))
    finally:
        app.BatchPipeline.encode = real
    after = dump(root)
    assert after["items"] == before["items"]  # ids, labels, codes, provenance, blobs
    assert list(after["items"]) == list(before["items"]), "the restored shards hold their items in another order"
    assert {k: v for k, v in after["offsets"].items() if not k.endswith(".changelog:0")} == \
        {k: v for k, v in before["offsets"].items() if not k.endswith(".changelog:0")}
    assert sum(encoded) == 0, "a restore encoded images"
    assert all(m == {"restoring": False, "fenced": False} for m in after["meta"].values())
