"""An image is not held behind a backlog of the learner's code updates (serving issue, item 3).

A learner round publishes thousands of learned codes at once; kafka-python hands out a fetched
partition's records before later fetches', so an image fetched after them waited until every code
before it was applied (bench_ingest --learn: ack -> commit p99 0.19-0.32 s). Here a real broker holds
20,000 code updates when an image is sent; applying them is slowed to a known cost so the order, not
the machine's speed, decides the outcome.
"""

from __future__ import annotations

import threading
import time

import pytest

from streamhash.index.store import Store
from streamhash.kafka.broker import free_port
from streamhash.kafka.modelbus import CodeUpdate, ModelPublisher
from streamhash.kafka.produce import from_arrays, make_producer, send
from streamhash.services.worker import app
from tests.support import committed_through, high_watermarks, module_kafka, read_store, wait_for

pytestmark = pytest.mark.integration

BACKLOG = 5000  # code updates per codes partition (four partitions)
APPLY_S = 50e-6  # the added cost of one applied update: the backlog takes >= 1 s to apply


def test_an_image_overtakes_a_backlog_of_learned_codes_and_every_code_is_applied_once(broker, tmp_path, monkeypatch):
    from streamhash.config import Settings, StoreSettings, WorkerSettings
    from tests.conftest import synthetic_images

    kafka = module_kafka(broker, "backlog")
    events: list[tuple[str, int, float]] = []  # ("codes", n applied, t) or ("image", n items, t), on the worker's thread
    first_codes = threading.Event()
    real_apply, real_write = Store.apply_updates, Store.write_batch

    def apply_updates(self, updates, offsets):
        time.sleep(APPLY_S * len(updates))
        events.append(("codes", len(updates), time.monotonic()))
        if updates:
            first_codes.set()
        return real_apply(self, updates, offsets)

    def write_batch(self, items, *args, **kwargs):
        items = list(items)
        if items:
            events.append(("image", len(items), time.monotonic()))
        return real_write(self, items, *args, **kwargs)

    monkeypatch.setattr(Store, "apply_updates", apply_updates)
    monkeypatch.setattr(Store, "write_batch", write_batch)

    # the backlog: learned codes for ids no shard holds (each counted "missing"), already on the broker
    publisher = ModelPublisher(kafka)
    publisher.publish_codes([(p, CodeUpdate(f"gone-{p}-{i}", 1, "learned", 1, b"\0\0\0\0"))
                             for p in range(4) for i in range(BACKLOG)])
    publisher.close()

    settings = Settings(kafka=kafka, store=StoreSettings(path=tmp_path / "index"),
                        worker=WorkerSettings(metrics_port=free_port()))
    worker = app.Worker(settings)
    worker.connect()
    done = {}
    thread = threading.Thread(target=lambda: done.setdefault("rc", worker.run()), daemon=True)
    thread.start()
    assert first_codes.wait(60), "the worker applied no code update"

    images, labels = synthetic_images(1, seed=3)
    producer = make_producer(kafka)
    send(producer, kafka.topic, from_arrays(images, labels, prefix="probe-", fmt="npy"), progress=False)
    producer.close()
    acked = time.monotonic()
    wait_for(lambda: sum(n for kind, n, _ in events if kind == "codes") >= 4 * BACKLOG
             and any(kind == "image" for kind, _, _ in events), 60, "the backlog and the image applied")
    # nothing more may come: every codes message is committed, so a re-applied one would have been counted
    codes_end = high_watermarks(kafka, kafka.codes_topic)
    wait_for(lambda: committed_through(tmp_path / "index", kafka.codes_topic, codes_end), 60, "the codes topic committed",
             interval=0.5)
    worker.stop()
    thread.join(60)
    assert not thread.is_alive() and done["rc"] == 0

    codes_total = sum(n for kind, n, _ in events if kind == "codes")
    assert codes_total == 4 * BACKLOG  # every update applied once: none skipped, none twice (the cap's seek-back)
    at_image = next(i for i, (kind, _, t) in enumerate(events) if kind == "image" and t >= acked)
    applied_before = sum(n for kind, n, t in events[:at_image] if kind == "codes" and t >= acked)
    # Held behind the backlog (before the fix), the image waited for 14,000 updates (0.86 s); overtaking them, for the codes
    # applied while it was fetched plus one short batch.
    print(f"image committed after {applied_before} code updates, {events[at_image][2] - acked:.3f} s")
    assert applied_before <= 4 * BACKLOG // 4, f"{applied_before} code updates, {events[at_image][2] - acked:.3f} s"
    assert max(n for kind, n, _ in events if kind == "codes") <= app.CODES_PER_BATCH

    # each codes partition's offset is in its shard, with the updates it applied (exactly once, checkpointed)
    offsets = read_store(tmp_path / "index")["offsets"]
    assert {k: v for k, v in offsets.items() if k.startswith(kafka.codes_topic + ":")} == \
        {f"{kafka.codes_topic}:{p}": BACKLOG for p in range(4)}
