"""A shard restored from the changelog against the same shard ingested, in one run (issue 25).

    python benchmarks/bench_restore.py [--items 100000] [--relabels 0.02] [--learned 0.25] [--json]

On the embedded broker, one images partition of ``--items`` Fashion-MNIST PNGs (synthetic images if the data set
is absent), then ``--relabels`` of them sent again with other labels:

1. **ingest**: a worker (in this process) consumes the partition into an empty store root; the rate is the items
   written over the time from its shard opened to the last batch committed. Its checkpoint writes the changelog;
   ``changelog_bytes_per_item`` is what it sent (key + value) per record, beside the mean image's size. Before it,
   the same partition is ingested once with no changelog (another group and root): ``changelog_ingest_cost`` is
   the ingest rate with the changelog over the rate without.
2. **takeover**: the root is deleted (a machine lost with its disk) and a second worker of the group is started:
   ``takeover_s`` runs from its start to the partition ready to ingest (group join, then the restore);
   ``restore_items_per_s`` is the restored shard's items over the restore's own time.
   Between the two, ``--learned`` of the items get a learned code on the codes topic (as the learner publishes
   them, by seq), which the worker applies; ``changelog_bytes_per_learned_code`` is what that sent per code.
3. **exactly_once**: the restored shard holds every id once, with its latest labels, and the same codes, learned
   flags and blobs as the ingested shard (``same_as_ingested``), in the same order (``same_order_as_ingested``:
   arrival order, which Hamming ties break in; a learned item keeps its place).

``restore_vs_ingest`` is the ratio of the two rates (the target: at least 3).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamhash import metrics as m  # noqa: E402
from streamhash.config import KafkaSettings, Settings, StoreSettings, WorkerSettings  # noqa: E402
from streamhash.index.store import Store  # noqa: E402
from streamhash.index.store.root import StoreRoot  # noqa: E402
from streamhash.kafka.broker import EmbeddedBroker, free_port  # noqa: E402
from streamhash.kafka.modelbus import CodeUpdate, ModelPublisher  # noqa: E402
from streamhash.kafka.produce import from_arrays, make_producer, send  # noqa: E402
from streamhash.kafka.topics import ensure_topics  # noqa: E402
from streamhash.services.worker import app  # noqa: E402


def images(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    try:
        from streamhash.data.fashion_mnist import load_all

        x, y = load_all()
        reps = -(-n // len(x))
        return np.concatenate([x] * reps)[:n], np.concatenate([y] * reps)[:n], "fashion-mnist"
    except Exception:  # noqa: BLE001  (no data set here: synthetic images of the same size)
        rng = np.random.default_rng(0)
        y = rng.integers(0, 10, n)
        x = (rng.random((n, 28, 28)) < 0.3).astype(np.uint8) * 200 + (y[:, None, None] * 5).astype(np.uint8)
        return x, y, "synthetic"


def counter(metric) -> float:
    return metric._value.get()


class Running:
    """A worker on its own thread."""

    def __init__(self, settings: Settings):
        self.started = time.monotonic()
        self.worker = app.Worker(settings)
        self.worker.connect()
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()

    def wait(self, predicate, timeout_s: float = 3600) -> float:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise SystemExit(f"bench_restore: gave up waiting ({predicate.__doc__ or 'a condition'})")
            time.sleep(0.01)
        return time.monotonic()

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(120)


def ingest(settings: Settings, records: int, *, changelog: bool = True) -> float:
    """Seconds a worker takes to ingest ``records`` into an empty root (shard opened -> last batch committed)."""
    real = app.ChangelogWriter
    if not changelog:  # the checkpoint without its changelog step, as before issue 25
        app.ChangelogWriter = lambda *a, **kw: None
    try:
        indexed0 = counter(m.ITEMS_INDEXED)
        w = Running(settings)
        t_open = w.wait(lambda: len(w.worker.owner.shards) > 0)
        t_done = w.wait(lambda: counter(m.ITEMS_INDEXED) - indexed0 >= records)
        w.stop()
    finally:
        app.ChangelogWriter = real
    return t_done - t_open


def contents(root: Path) -> dict:
    """id -> (labels, code, learned, blob digest), every shard; a duplicate id appears as a second key."""
    out: dict = {}
    r = StoreRoot(root, create=False)
    for key in r.shards():
        s = Store(r.shard_path(key), readonly=True)
        ids, _, _ = s.provenance()
        for i in ids:
            rec = s.get_item(i, with_blob=True)
            k = i if i not in out else (i, key)
            out[k] = (rec["labels"], rec["code"].hex(), bool(rec.get("learned")), hashlib.sha1(rec["blob"]).hexdigest())
        s.close()
    return out


def learn(settings: Settings, root: Path, share: float) -> tuple[int, float]:
    """A learned code for every ``1 / share``-th item, published by seq and applied by a worker; returns how many
    and the changelog bytes sent per code."""
    r = StoreRoot(root, create=False)
    (key,) = r.shards()
    s = Store(r.shard_path(key), readonly=True)
    ids, _, _ = s.provenance()
    picked = [(i, s.get_item(i)["seq"]) for i in ids[::max(1, round(1 / share))]]
    s.close()
    rng = np.random.default_rng(1)
    publisher = ModelPublisher(settings.kafka)
    publisher.publish_codes([(key.partition, CodeUpdate(i, seq, "learned", 1, rng.integers(0, 256, 4, np.uint8).tobytes()))
                             for i, seq in picked])
    publisher.close()
    applied, bytes0, sent0 = m.CODE_UPDATES.labels(result="applied"), counter(m.CHANGELOG_BYTES), counter(m.CHANGELOG_RECORDS)
    applied0 = counter(applied)
    w = Running(settings)
    w.wait(lambda: counter(applied) - applied0 >= len(picked))
    w.wait(lambda: counter(m.CHANGELOG_RECORDS) - sent0 >= len(picked))
    w.stop()
    # the batches' offsets markers are counted too: a few per thousand codes
    return len(picked), (counter(m.CHANGELOG_BYTES) - bytes0) / len(picked)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--relabels", type=float, default=0.02)
    ap.add_argument("--learned", type=float, default=0.25)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-restore-"))
    x, y, source = images(args.items)
    relabel = np.arange(0, args.items, max(1, int(1 / args.relabels))) if args.relabels > 0 else np.arange(0)
    latest = {f"r-{i}": [int(y[i])] for i in range(args.items)}
    latest.update({f"r-{i}": [int((y[i] + 1) % 10)] for i in relabel})
    with EmbeddedBroker(home=work / "broker") as broker:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic="bench.restore.images",
                              group_id="bench-restore", topic_partitions=1)
        ensure_topics(kafka)
        producer = make_producer(kafka)
        send(producer, kafka.topic, from_arrays(x, y, prefix="r-"), progress=False)
        for i in relabel:  # the same id, another label (and the same image)
            send(producer, kafka.topic, from_arrays(x[i:i + 1], [int((y[i] + 1) % 10)], prefix="r-", start=int(i)),
                 progress=False)
        producer.flush()
        producer.close()
        records = args.items + len(relabel)
        blob_bytes = float(np.mean([len(o.value) for o in from_arrays(x[:1000], y[:1000], prefix="r-")]))
        root = work / "index"
        settings = Settings(kafka=kafka, store=StoreSettings(path=root),
                            worker=WorkerSettings(metrics_port=free_port()))
        bare = settings.model_copy(update={"kafka": kafka.model_copy(update={"group_id": "bench-restore-bare"}),
                                           "store": StoreSettings(path=work / "bare")})
        bare_s = ingest(bare, records, changelog=False)
        shutil.rmtree(work / "bare")

        bytes0, sent0 = counter(m.CHANGELOG_BYTES), counter(m.CHANGELOG_RECORDS)
        ingest_s = ingest(settings, records)
        cl_bytes, cl_records = counter(m.CHANGELOG_BYTES) - bytes0, counter(m.CHANGELOG_RECORDS) - sent0
        n_learned, learned_bytes = learn(settings, root, args.learned) if args.learned > 0 else (0, 0.0)
        ingested = contents(root)

        shutil.rmtree(root)
        restored0, rs0 = counter(m.RESTORE_RECORDS), counter(m.RESTORE_SECONDS)
        w = Running(settings)
        t_ready = w.wait(lambda: w.worker.owner._ready and not w.worker.owner.restoring)
        restore_s = counter(m.RESTORE_SECONDS) - rs0
        w.stop()
        restored = contents(root)
    shutil.rmtree(work, ignore_errors=True)

    labels_ok = all(restored.get(i, (None,))[0] == lab for i, lab in latest.items())
    out = {
        "bench": "restore", "source": source, "items": args.items, "records": records,
        "ingest_items_per_s": round(records / ingest_s), "ingest_s": round(ingest_s, 2),
        "ingest_without_changelog_items_per_s": round(records / bare_s),
        "changelog_ingest_cost": round(bare_s / ingest_s, 2),
        "restore_items_per_s": round(len(restored) / restore_s), "restore_s": round(restore_s, 2),
        "restore_records": int(counter(m.RESTORE_RECORDS) - restored0),
        "restore_vs_ingest": round((len(restored) / restore_s) / (records / ingest_s), 2),
        "takeover_s": round(t_ready - w.started, 2),
        "changelog_records": int(cl_records), "changelog_bytes_per_item": round(cl_bytes / records),
        "image_bytes_mean": round(blob_bytes), "changelog_overhead_bytes_per_item": round(cl_bytes / records - blob_bytes),
        "learned_codes": n_learned, "changelog_bytes_per_learned_code": round(learned_bytes, 1),
        "exactly_once": len(restored) == len(latest) and set(restored) == set(latest) and labels_ok,
        "same_as_ingested": restored == ingested, "same_order_as_ingested": list(restored) == list(ingested),
    }
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
