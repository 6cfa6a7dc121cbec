"""bench_photos, stored features (issue 23): a learning round and a re-encode from the features kept with each
photo vs the same from the photos' images, same run, through the product's code.

- ``engine_images_per_s``: the frozen part (``HashNet.prepare``: ONNX Runtime on the CPU, ``--stored-threads``) over
  CIFAR-10 train JPEGs as stored (decoded, then upsampled to 224), the rate the worker's encode step pays once
  per photo. ``ingest_vs_engine``: a worker process (same threads) ingesting ``--ingest-photos`` of those JPEG
  files from a topic of the embedded broker into a committed shard, features stored (``bench_ingest``'s
  measure: photos / (last commit - partitions assigned)), over that rate. Beside it, not in it: the worker's own
  encode and commit seconds (``ingest_worker``) and the bare rate measured again right after the worker
  (``ingest_vs_engine_after``), to tell the worker's overhead from a load swing between the two measures.
- ``round_features_vs_images`` (one thread, as the learner): one DIHN round (``DIHNLearner.learn_round``, the same seed, items, Omega and
  iterations) whose fetch reads the stored features (``Store.features``, what ``ShardFeed`` reads for a frozen
  network) vs one whose fetch decodes the stored blobs into images (``Store.get_blobs`` + ``decode_images``) that
  the network prepares on every fetch (what a round on images costs: decode + frozen part per alternation).
- ``reencode_vs_images`` (one thread, as the worker's re-encoder): seconds per photo of a re-encode (``index.reencode.shard_builder``: begin, copy or
  encode, swap) of ``--reencode-items`` photos from stored features, over the same per photo from images
  (a shard of ``--reencode-images`` photos stored without features, the fallback path: decode + frozen part +
  head); ``reencode_features_s`` is the whole re-encode, the issue's "≤ 10 s at 50,000" (head only).
  The features of the large shard are the real features of the first photos, repeated (the head's cost
  does not depend on the values); the blobs are the real JPEG files.

    python benchmarks/photos_stored.py --cifar10 <cifar10-jpg.tar.gz> --json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamhash.data import cifar10  # noqa: E402
from streamhash.data.photos import iter_photo_files  # noqa: E402
from streamhash.imaging import Conversion  # noqa: E402
from streamhash.kafka.broker import EmbeddedBroker, free_port  # noqa: E402
from streamhash.kafka.produce import make_producer  # noqa: E402
from streamhash.kafka.topics import ensure_topics  # noqa: E402
from streamhash.index.reencode import shard_builder  # noqa: E402
from streamhash.index.store import ItemWrite, Store  # noqa: E402
from streamhash.learn.dihn import DIHNLearner  # noqa: E402
from streamhash.model.hashnet import HashNet, HashNetConfig  # noqa: E402
from streamhash.records import ImageSpec, decode_images, message_headers  # noqa: E402
from streamhash.services.processes import scrape, spawn, stop, wait_for, wait_http  # noqa: E402

SPEC = ImageSpec(32, 32, 3, conversion=Conversion(mode="rgb"))
# How often the ingest's end is polled. The end time is the worker's own last-commit gauge, so this sets no
# precision; a scrape every 50 ms (this process's request and the worker's rendering of its metrics) took CPU
# from the worker's 2-thread encode on 2 cores: journal/2026-12-07-bench-photos.md. The start (the assignment)
# is still polled every 50 ms: it is the measure's start.
DONE_POLL_S = 0.5


def photos(source: Path, n: int) -> tuple[list[bytes], np.ndarray]:
    """The first ``n`` train photos as stored (their files' bytes) and their labels."""
    files = list(itertools.islice(iter_photo_files(source, "train"), n))
    return [f.data for f in files], np.array([cifar10.CLASSES.index(f.class_name) for f in files])


def write(path: Path, net: HashNet, blobs: list[bytes], labels, feats: np.ndarray | None, n: int) -> Store:
    """A shard of ``n`` items cycling over ``blobs`` (and ``feats``, when given), inferred by model version 1."""
    store = Store(path, bits=net.cfg.bits, backbone=net.cfg.backbone, features=net.feature_spec() if feats is not None else None)
    code = bytes(net.cfg.bits // 8)
    for start in range(0, n, 2000):
        batch = [ItemWrite(f"p-{i}", code, blobs[i % len(blobs)], "image/jpeg", (int(labels[i % len(blobs)]),),
                           feature=None if feats is None else feats[i % len(feats)].tobytes())
                 for i in range(start, min(n, start + 2000))]
        store.write_batch(batch, model_version=1)
    return store


def timed_round(net: HashNet, store: Store, labels, fetch, args) -> float:
    learner = DIHNLearner(copy.deepcopy(net), omega=args.omega, epochs=args.epochs, iters=args.iters, seed=0)
    ids = [f"p-{i}" for i in range(len(labels))]
    learner.add_items(ids, np.zeros((len(ids), net.cfg.bits // 8), np.uint8), [{int(y)} for y in labels], frozen=False)
    t0 = time.perf_counter()
    learner.learn_round(fetch)
    return time.perf_counter() - t0


def timed_reencode(store: Store, net: HashNet) -> float:
    t0 = time.perf_counter()
    builder = shard_builder(store, net, SPEC, chunk=64)
    builder.build(2)
    builder.drop_replaced()
    return time.perf_counter() - t0


def ingest_rate(blobs: list[bytes], labels, work: Path, threads: int) -> tuple[float, dict, dict]:
    """Photos/s of a worker process, topic -> committed shard with features, the shard's feature spec, and where
    the worker's time went."""
    from streamhash.config import KafkaSettings

    with EmbeddedBroker(home=work) as broker:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        ensure_topics(kafka)
        producer = make_producer(kafka)
        for i, (value, y) in enumerate(zip(blobs, labels)):
            producer.send(kafka.topic, key=f"p-{i}".encode(), value=value, headers=message_headers(int(y), "image/jpeg"))
        producer.flush()
        producer.close()
        port = free_port()
        env = {"STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers, "STREAMHASH_STORE__PATH": str(work / "index"),
               "STREAMHASH_WORKER__METRICS_PORT": str(port), "STREAMHASH_LEARN__ENABLED": "false",
               "STREAMHASH_MODEL__BACKBONE": "efficientnet_lite0", "STREAMHASH_MODEL__IMAGE_SIZE": "32",
               "STREAMHASH_MODEL__CHANNELS": "3", "STREAMHASH_IMAGE__MODE": "rgb",
               "STREAMHASH_MODEL__TORCH_THREADS": str(threads)}
        worker = spawn(["worker"], env=env, log_path=work / "worker.log")
        url = f"http://127.0.0.1:{port}/metrics"
        try:
            wait_http(url, 180, worker, work / "worker.log")
            wait_for(lambda: scrape(url).get("streamhash_assigned_partitions", 0) > 0, 120, "assignment")
            t_assigned = time.time()
            wait_for(lambda: scrape(url).get("streamhash_items_indexed_total", 0) >= len(blobs), 1200, "ingest",
                     interval=DONE_POLL_S)
            end = scrape(url)
            rate = len(blobs) / (end["streamhash_last_commit_timestamp_seconds"] - t_assigned)
            # where the worker's time went (not in the ratio): its encode step (frozen part + head, its own
            # histogram: one observation a batch) and its LMDB commits, beside the whole
            parts = {"wall_s": round(end["streamhash_last_commit_timestamp_seconds"] - t_assigned, 2),
                     "encode_s": round(end["streamhash_encode_duration_seconds_sum"], 2),
                     "encode_batches": int(end["streamhash_encode_duration_seconds_count"]),
                     "commit_s": round(end.get("streamhash_lmdb_commit_duration_seconds_sum", 0.0), 2)}
        finally:
            stop(worker)
    shard = next((work / "index").rglob("data.mdb")).parent
    store = Store(shard, readonly=True)
    spec = store.feature_spec()
    store.close()
    return rate, spec, parts


def timed_prepare(net: HashNet, blobs: list[bytes]) -> tuple[np.ndarray, float]:
    """The frozen part over the photos as stored (decoded, then prepared): its output and photos/s."""
    t0 = time.perf_counter()
    feats = net.prepare(decode_images([(b, "image/jpeg") for b in blobs], SPEC))
    return feats, len(blobs) / (time.perf_counter() - t0)


def stored_figures(source: Path, args, say=lambda *a: None) -> dict:
    torch.manual_seed(0)
    with contextlib.redirect_stdout(sys.stderr):  # the weights package prints a line: stdout is the JSON's
        net = HashNet(HashNetConfig(bits=32, backbone="efficientnet_lite0", image_size=32, channels=3))
    blobs, labels = photos(source, max(args.photos, args.ingest_photos))
    work = Path(tempfile.mkdtemp(prefix="bench-photos-stored-"))
    torch.set_num_threads(args.stored_threads)
    net.prepare(decode_images([(b, "image/jpeg") for b in blobs[:16]], SPEC))  # the export and a session: not timed
    feats, engine_rate = timed_prepare(net, blobs)
    say(f"frozen part: {engine_rate:.1f} photos/s ({len(blobs)} decoded and prepared, {args.stored_threads} threads)")
    ingest = {}
    if args.ingest_photos:
        rate, spec, parts = ingest_rate(blobs[:args.ingest_photos], labels, work / "ingest", args.stored_threads)
        # the bare engine again right after the worker, beside the ratio, not in it: a load swing between the
        # two measures (seconds apart, on 2 contended cores, 2 threads each) shows as the two engine rates apart
        after = timed_prepare(net, blobs[:args.ingest_photos])[1]
        ingest = {"ingest_images_per_s": round(rate, 1), "ingest_vs_engine": round(rate / engine_rate, 3),
                  "engine_after_ingest_images_per_s": round(after, 1), "ingest_vs_engine_after": round(rate / after, 3),
                  "ingest_feature_spec": spec, "ingest_worker": parts}
        say(f"worker ingest: {rate:.1f} photos/s, features stored as {spec}; {parts}; engine after it {after:.1f}/s")
    blobs, labels, feats = blobs[:args.photos], labels[:args.photos], feats[:args.photos]
    # the round and the re-encode on one thread, as the learner (learn.torch_threads) and the worker's re-encoder
    # run them: at 2 threads on a loaded machine each small op of the head's training waited on its thread pool
    torch.set_num_threads(1)

    small = write(work / "round", net, blobs, labels, feats, len(blobs))
    timed_round(net, small, labels, lambda ids: np.stack(small.features(ids)), args)  # warm-up: torch's first round
    by_features = timed_round(net, small, labels, lambda ids: np.stack(small.features(ids)), args)
    by_images = timed_round(net, small, labels, lambda ids: decode_images(small.get_blobs(ids), SPEC), args)
    say(f"round (omega {args.omega}, {args.iters} iters, {args.epochs} epochs): {by_features:.2f} s on stored features, "
        f"{by_images:.2f} s on images")

    with contextlib.redirect_stdout(sys.stderr):  # another head: every inferred code is stale
        other = HashNet(HashNetConfig(bits=32, backbone="efficientnet_lite0", image_size=32, channels=3, seed=7))
    big = write(work / "reencode", net, blobs, labels, feats, args.reencode_items)
    feat_s = timed_reencode(big, other)
    noted = write(work / "reencode-images", net, blobs, labels, None, args.reencode_images)
    img_s = timed_reencode(noted, other)
    say(f"re-encode: {args.reencode_items} photos from stored features in {feat_s:.1f} s; "
        f"{args.reencode_images} from images in {img_s:.1f} s")
    for s in (small, big, noted):
        s.close()
    shutil.rmtree(work, ignore_errors=True)  # ~360 MB at 50,000 stored features
    per_feature, per_image = feat_s / args.reencode_items, img_s / args.reencode_images
    return {
        "engine_images_per_s": round(engine_rate, 1), "threads": args.stored_threads, **ingest,
        "round": {"omega": args.omega, "iters": args.iters, "epochs": args.epochs,
                  "features_s": round(by_features, 3), "images_s": round(by_images, 3)},
        "round_features_vs_images": round(by_features / by_images, 4),
        "reencode": {"features_items": args.reencode_items, "features_s": round(feat_s, 2),
                     "images_items": args.reencode_images, "images_s": round(img_s, 2),
                     "images_s_at_features_items": round(per_image * args.reencode_items, 1)},
        "reencode_features_s": round(feat_s, 2),
        "reencode_vs_images": round(per_feature / per_image, 4),
    }


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--photos", type=int, default=400, help="real photos: the round's items, the features' source")
    ap.add_argument("--ingest-photos", type=int, default=600, help="photos a worker ingests (0: skip)")
    ap.add_argument("--stored-threads", type=int, default=2, help="threads of the frozen part, in-process and in the worker")
    ap.add_argument("--omega", type=int, default=200)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--reencode-items", type=int, default=50_000)
    ap.add_argument("--reencode-images", type=int, default=300, help="photos of the re-encode from images (timed, "
                    "then scaled per photo: 50,000 would take minutes at the frozen part's rate)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar10", type=Path, default=None, help="CIFAR-10 as image files (the JPEG tarball)")
    ap.add_argument("--json", action="store_true")
    add_arguments(ap)
    args = ap.parse_args()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    print(json.dumps(stored_figures(cifar10.find_source(args.cifar10), args, say)))


if __name__ == "__main__":
    main()
