"""Results ordered by what they look like (issue 23 item 6): the two-stage search on CIFAR-10, measured.

After learning, every item of a class carries (nearly) the same code, so a Hamming search returns its class at
one distance in id order. The query server re-ranks its Hamming candidates (``server.rerank_candidates`` of
them) by the cosine of their stored features (:mod:`streamhash.index.rerank`). This script measures, in one run:

- quality on CIFAR-10: a database of --db-per-class train images per class, --queries-per-class test queries
  per class, features from the product's backbone (``HashNet.prepare``: EfficientNet-Lite0, cut ``pooled``,
  1280-d float16, the engine the product picks; cached under --cache, they are deterministic), codes learned by
  the learner's own DIHN code (``DIHNLearner``, --rounds rounds over the database); for Hamming order alone and
  re-ranked at each candidate count: mAP@all (the rest of the database after the candidates, in Hamming order)
  and ``top10_feature_overlap``: the share of the top 10 that are among the query's 10 exact nearest neighbours
  in feature space among the database items of its class (the query item's own class, cosine);
- the second stage's cost per query (candidates' features read from a real LMDB shard, vectors, cosine, order)
  at 50,000 items (the CIFAR-10 features where there are enough, else random) and at 1M items (random
  features), beside the first stage (the exact Hamming top-k' over the same codes) measured in the same run.

    nice -n 10 python benchmarks/photos_rerank.py --cache /tmp/rerank-cache --json

``bench_photos.py`` calls :func:`measure` at its end. Needs the extra ``natural``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamhash.data import cifar10  # noqa: E402

CANDIDATES = (100, 200, 1000, 5000)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def product_net(bits: int, seed: int = 0):
    """The photo network the product builds (EfficientNet-Lite0 cut at the pooled feature, a hash head)."""
    from streamhash.model.hashnet import HashNet, HashNetConfig

    with contextlib.redirect_stdout(sys.stderr):  # the weights package prints a line: stdout is the JSON's
        return HashNet(HashNetConfig(bits=bits, backbone="efficientnet_lite0", image_size=32, channels=3, seed=seed,
                                     cut="pooled"))


def cached_features(net, images: np.ndarray, cache: Path, tag: str, batch: int = 256) -> np.ndarray:
    """``net.prepare(images)`` (float16), computed once per image set: kept in ``cache`` under a digest of the
    pixels, written in parts so an interrupted run resumes."""
    digest = hashlib.sha256(images.tobytes()).hexdigest()[:16]
    path = cache / f"cifar10-{tag}-{net.cfg.backbone}-{net.backbone.cut}-{digest}.npy"
    if path.exists():
        return np.load(path)
    cache.mkdir(parents=True, exist_ok=True)
    parts = []
    for start in range(0, len(images), batch):
        part = cache / f"{path.stem}.part{start // batch:05d}.npy"
        if not part.exists():
            t0 = time.perf_counter()
            np.save(part, net.prepare(images[start:start + batch]))
            log(f"{tag}: features {start + batch}/{len(images)} ({batch / (time.perf_counter() - t0):.0f} images/s)")
        parts.append(part)
    out = np.concatenate([np.load(p) for p in parts])
    np.save(path, out)
    for p in parts:
        p.unlink()
    return out


def load(source, db_per_class: int, queries_per_class: int):
    train = cifar10.load_split("train", source, per_class=db_per_class)
    test = cifar10.load_split("test", source, per_class=queries_per_class)
    return train, test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar10", type=Path, default=None, help="CIFAR-10 source (default: the data home)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "streamhash-rerank-cache")
    ap.add_argument("--db-per-class", type=int, default=1000)
    ap.add_argument("--queries-per-class", type=int, default=100)
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--features-only", action="store_true", help="compute (cache) the features and stop")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()
    source = cifar10.find_source(args.cifar10)
    train, test = load(source, args.db_per_class, args.queries_per_class)
    log(f"CIFAR-10 from {source}: {len(train)} database, {len(test)} query images")
    net = product_net(args.bits)
    cached_features(net, test.images, args.cache, "test")
    cached_features(net, train.images, args.cache, "train")
    if args.features_only:
        return


if __name__ == "__main__":
    main()
