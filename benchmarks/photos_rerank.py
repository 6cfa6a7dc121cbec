"""Results ordered by what they look like (issue 23 item 6): the two-stage search on CIFAR-10, measured.

After learning, every item of a class carries (nearly) the same code, so a Hamming search returns its class at
one distance in id order. The query server re-ranks its Hamming candidates (``server.rerank_candidates`` of
them): within a distance by a vote of the query's most similar labelled candidates, then by the cosine of their
stored features (:mod:`streamhash.index.rerank`). This script measures, in one run:

- quality on CIFAR-10: a database of --db-per-class train images per class, --queries-per-class test queries
  per class, features from the product's backbone (``HashNet.prepare``: EfficientNet-Lite0, cut ``pooled``,
  1280-d float16, the engine the product picks; cached under --cache, they are deterministic), codes learned by
  the learner's own DIHN code (``DIHNLearner``, --rounds rounds over the database); for Hamming order alone and
  re-ranked at each candidate count, by the cosine alone and by the product's order (vote, then cosine; further
  learnings with --learnings): mAP@all (the rest of the database after the candidates, in Hamming order)
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
import shutil
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


def learned_codes(net, db: np.ndarray, db_labels: np.ndarray, queries: np.ndarray, rounds: int, seed: int = 0):
    """Database codes as the learner leaves them (one DIHN round per ``rounds``, the learner's own code over the
    stored features) and the queries' codes from the learned network."""
    from streamhash.learn.dihn import DIHNLearner

    learner = DIHNLearner(net, seed=seed)
    ids = [str(i) for i in range(len(db))]
    learner.learn_many(db, [[int(y)] for y in db_labels], ids=ids)
    for _ in range(rounds - 1):
        learner.learn_round()
    return learner.codes(ids), net.encode(queries)


def average_precision(ranked_relevant: np.ndarray) -> float:
    cum = np.cumsum(ranked_relevant)
    n = cum[-1]
    return float((cum / np.arange(1, len(cum) + 1) * ranked_relevant).sum() / n) if n else 0.0


# the second stage's orders measured: the cosine alone (the first one), the product's (vote, then cosine), and one
# tried beside it: the query's real-valued network output (pre-sign) dotted with the candidate's code, then cosine
ORDERS = ("cosine", "vote", "output")


def quality(dist: np.ndarray, db_vec: np.ndarray, q_vec: np.ndarray, db_labels, q_labels, counts,
            q_real: np.ndarray, db_signs: np.ndarray) -> dict:
    """mAP@all and the top-10 feature overlap of Hamming order and, at each candidate count, of the two stages in
    each of ``ORDERS`` (``rerank.order`` without and with the candidates' labels; ``q_real`` (n, bits) the
    queries' real-valued outputs, ``db_signs`` the database codes as ±1); per order at each count, how many
    queries' AP fell and rose against Hamming order."""
    from streamhash.index.rerank import order

    labels = [[int(y)] for y in db_labels]
    rows = {"hamming": [], **{(c, o): [] for c in counts for o in ORDERS}}
    for r in range(len(dist)):
        same = np.flatnonzero(db_labels == q_labels[r])
        sims = db_vec @ q_vec[r]
        exact = set(same[np.argsort(-sims[same], kind="stable")[:10]].tolist())
        hamming = np.argsort(dist[r], kind="stable")
        for key in rows:
            ranked = hamming
            if key != "hamming":
                head = hamming[:key[0]]
                if key[1] == "output":
                    got = np.lexsort((np.arange(len(head)), -sims[head], -(db_signs[head] @ q_real[r]), dist[r][head]))
                else:
                    got = order(dist[r][head], sims[head], [labels[i] for i in head] if key[1] == "vote" else None)
                ranked = np.concatenate([head[got], hamming[key[0]:]])
            rows[key].append((average_precision(db_labels[ranked] == q_labels[r]),
                              len(exact.intersection(ranked[:10].tolist())) / 10))
    base = np.array(rows["hamming"])[:, 0]

    def summary(v):
        v = np.array(v)
        return {"map": round(float(v[:, 0].mean()), 5), "top10_feature_overlap": round(float(v[:, 1].mean()), 4),
                "queries_ap_lower": int((v[:, 0] < base - 1e-12).sum()),
                "queries_ap_higher": int((v[:, 0] > base + 1e-12).sum())}
    out = {"hamming": {k: v for k, v in summary(rows["hamming"]).items() if not k.startswith("queries")}}
    for c in counts:
        out[str(c)] = {o: summary(rows[(c, o)]) for o in ORDERS}
    return out


def learning_quality(db_feat, q_feat, db_vec, q_vec, db_labels, q_labels, bits, seed, rounds, counts) -> dict:
    """One learning (``bits``, ``seed``) and its :func:`quality`."""
    from streamhash.eval.metrics import hamming_distances, retrieval_metrics

    net = product_net(bits, seed)
    t0 = time.perf_counter()
    db_codes, q_codes = learned_codes(net, db_feat, db_labels, q_feat, rounds, seed)
    learn_s = time.perf_counter() - t0
    dist = hamming_distances(q_codes, db_codes)
    signs = np.unpackbits(db_codes, axis=1).astype(np.float32) * 2 - 1  # pack_signs' bit order
    return {"bits": bits, "seed": seed, "learn_s": round(learn_s, 1),
            "mean_items_at_the_nearest_distance": round(float(np.mean([np.sum(d == d.min()) for d in dist])), 1),
            "map_hamming_eval_metrics": round(float(retrieval_metrics(q_codes, q_labels, db_codes, db_labels,
                                                                      bits)["map"]), 5),
            "by_candidates": quality(dist, db_vec, q_vec, db_labels, q_labels, counts, net.encode_real(q_feat), signs)}


def random_shard(path: Path, n: int, dim: int, bits: int, seed: int = 0, chunk: int = 20_000, classes: int = 10):
    """A real LMDB shard of ``n`` items with random float16 features of ``dim``, each item with its class's code
    (as learning leaves them: item i in class i % classes); returns the store and the class codes."""
    from streamhash.index.store import ItemWrite, Store

    spec = {"backbone": "efficientnet_lite0", "cut": "pooled", "feature_shape": [dim], "dtype": "float16"}
    store = Store(path, bits=bits, backbone="efficientnet_lite0", features=spec, initial_map_size=n * (dim * 2 + 600) + (1 << 30))
    rng = np.random.default_rng(seed)
    class_codes = rng.integers(0, 256, (classes, bits // 8), dtype=np.uint8)
    codes = class_codes[np.arange(n) % classes]
    for start in range(0, n, chunk):
        feats = rng.standard_normal((min(chunk, n - start), dim)).astype(np.float16)
        store.write_batch([ItemWrite(f"item-{start + i}", codes[start + i].tobytes(), b"x", "image/png", (0,),
                                     feature=f.tobytes()) for i, f in enumerate(feats)])
    return store, class_codes


def stage_costs(n: int, dim: int, bits: int, counts, queries: int, workdir: Path) -> dict:
    """ms per query, k = 10, through the server's own calls over a real LMDB shard (a ShardedIndex's view): the
    plain search (``View.rank`` at k), and the two stages (``View.rank`` at k' candidates, then ``Rerank.apply``:
    features read, cosine, order) at each candidate count k', same run. The query is a class's code: a class is
    n/10 items at distance 0, so every candidate is a tie the second stage orders (the learned case)."""
    from streamhash.index.rerank import Rerank
    from streamhash.index.sharded import ShardedIndex
    from streamhash.index.store.root import ShardKey, StoreRoot

    t0 = time.perf_counter()
    root = StoreRoot(workdir / f"root-{n}")
    store, class_codes = random_shard(root.shard_path(ShardKey("images", 0)), n, dim, bits)
    built = time.perf_counter() - t0
    index = ShardedIndex(StoreRoot(workdir / f"root-{n}", create=False), open_store=lambda _k, _p: store)
    view = index.view()
    rng = np.random.default_rng(1)
    out = {"items": n, "store_build_s": round(built, 1)}
    ms = lambda xs, p=50: round(float(np.percentile(xs, p)) * 1e3, 3)  # noqa: E731
    for c in counts:
        plain, first, second = [], [], []
        for _ in range(queries):
            q = class_codes[rng.integers(len(class_codes))]
            t = time.perf_counter()
            view.rank([[q]], [10])
            plain.append(time.perf_counter() - t)
            plan = Rerank.plan(rng.standard_normal(dim).astype(np.float16), 10, c)
            t = time.perf_counter()
            hits = view.rank([[q]], [plan.candidates])[0]
            t1 = time.perf_counter()
            plan.apply(hits, view, 10)
            first.append(t1 - t)
            second.append(time.perf_counter() - t1)
        both = np.add(first, second)
        out[str(c)] = {"plain_ms_p50": ms(plain), "first_stage_ms_p50": ms(first), "second_stage_ms_p50": ms(second),
                       "second_stage_ms_p99": ms(second, 99), "two_stages_ms_p50": ms(both), "two_stages_ms_p99": ms(both, 99),
                       "two_stages_vs_plain": round(float(np.median(both) / np.median(plain)), 1)}
    index.close()
    store.close()
    shutil.rmtree(workdir / f"root-{n}")
    return out


def order_ms(candidates: int = 1000, reps: int = 200, seed: int = 0) -> dict:
    """p50 ms of ``rerank.order`` over ``candidates`` hits at 3 distances, 10 labels, without labels (the cosine
    alone) and with them (the vote first): what the vote adds to the second stage."""
    from streamhash.index.rerank import order

    rng = np.random.default_rng(seed)
    dist, sims = rng.integers(0, 3, candidates), rng.random(candidates)
    labels = [[int(y)] for y in rng.integers(0, 10, candidates)]
    out = {}
    for name, lab in (("cosine", None), ("vote", labels)):
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            order(dist, sims, lab)
            times.append(time.perf_counter() - t)
        out[f"order_ms_p50_{name}"] = round(float(np.median(times)) * 1e3, 3)
    return out


def photo_encode_ms(net, images: np.ndarray) -> float:
    """p50 ms of one query photo's encode (``prepare`` then the head), as the server runs it: the reference the
    second stage is set beside."""
    times = []
    for img in images:
        t = time.perf_counter()
        net.encode(net.prepare(img[None]))
        times.append(time.perf_counter() - t)
    return round(float(np.median(times)) * 1e3, 2)


def measure(source=None, cache: Path | None = None, db_per_class: int = 1000, queries_per_class: int = 100,
            bits: int = 32, rounds: int = 1, counts=CANDIDATES, default: int = 1000, cost_sizes=(50_000, 1_000_000),
            cost_queries: int = 200, cost_counts=(100, 200, 1000), learnings=()) -> dict:
    """The whole measurement as a dict (``bench_photos.py`` calls this). ``learnings``: further (bits, seed)
    learnings whose quality is measured too (the headline is ``bits`` at seed 0)."""
    from streamhash.index.rerank import vectors

    started = time.perf_counter()
    cache = cache or Path(tempfile.gettempdir()) / "streamhash-rerank-cache"
    source = cifar10.find_source(source)
    train, test = load(source, db_per_class, queries_per_class)
    log(f"CIFAR-10 from {source}: {len(train)} database, {len(test)} query images")
    net = product_net(bits)
    q_feat, db_feat = cached_features(net, test.images, cache, "test"), cached_features(net, train.images, cache, "train")
    db_vec, q_vec = vectors(db_feat), vectors(q_feat)
    runs = []
    for b, seed in [(bits, 0), *learnings]:
        runs.append(learning_quality(db_feat, q_feat, db_vec, q_vec, train.labels, test.labels, b, seed, rounds, counts))
        log(json.dumps(runs[-1]))
    head, at = runs[0], runs[0]["by_candidates"][str(default)]
    result = {"data": f"CIFAR-10 ({'JPEG files' if 'jpg' in source.name else 'official'}): {len(train)} train images "
                      f"as the database, {len(test)} test queries",
              "features": f"{net.cfg.backbone} cut {net.backbone.cut}, {db_feat.shape[1]}-d float16 "
                          f"({net.backbone.engine_name()})",
              "learn_rounds": rounds, **{k: v for k, v in head.items() if k != "by_candidates"},
              "by_candidates": head["by_candidates"], "default_candidates": default,
              "rerank_map": at["vote"]["map"], "rerank_map_cosine_only": at["cosine"]["map"],
              "rerank_map_without": head["by_candidates"]["hamming"]["map"],
              "rerank_top10_feature_overlap": at["vote"]["top10_feature_overlap"],
              "rerank_top10_feature_overlap_cosine_only": at["cosine"]["top10_feature_overlap"],
              "rerank_top10_feature_overlap_without": head["by_candidates"]["hamming"]["top10_feature_overlap"],
              "learnings": [{"bits": r["bits"], "seed": r["seed"], "hamming": r["by_candidates"]["hamming"],
                             **r["by_candidates"][str(default)]} for r in runs]}
    if cost_sizes:
        with tempfile.TemporaryDirectory(dir=cache) as work:
            result["cost"] = {str(n): stage_costs(n, db_feat.shape[1], bits, cost_counts, cost_queries, Path(work))
                              for n in cost_sizes}
            log(json.dumps(result["cost"]))
        for n in cost_sizes:
            result[f"rerank_ms_per_query_{n}"] = result["cost"][str(n)].get(str(default), {}).get("second_stage_ms_p50")
    result["order_1000_candidates"] = order_ms()
    result["query_photo_encode_ms_p50"] = photo_encode_ms(net, test.images[:20])
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar10", type=Path, default=None, help="CIFAR-10 source (default: the data home)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "streamhash-rerank-cache")
    ap.add_argument("--db-per-class", type=int, default=1000)
    ap.add_argument("--queries-per-class", type=int, default=100)
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="learning rounds over the database")
    ap.add_argument("--candidates", default=",".join(map(str, CANDIDATES)), help="candidate counts measured")
    ap.add_argument("--default", type=int, default=1000, help="the candidate count the headline numbers are at")
    ap.add_argument("--learnings", default="", help="further learnings measured, bits:seed,... (e.g. 32:1,64:0)")
    ap.add_argument("--cost-sizes", default="50000,1000000", help="shard sizes the stage costs are timed at (none: '')")
    ap.add_argument("--cost-queries", type=int, default=200)
    ap.add_argument("--cost-candidates", default="100,200,1000", help="candidate counts the costs are timed at")
    ap.add_argument("--features-only", action="store_true", help="compute (cache) the features and stop")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()
    if args.features_only:
        train, test = load(cifar10.find_source(args.cifar10), args.db_per_class, args.queries_per_class)
        net = product_net(args.bits)
        cached_features(net, test.images, args.cache, "test")
        cached_features(net, train.images, args.cache, "train")
        return
    counts = [int(c) for c in args.candidates.split(",")]
    result = measure(args.cifar10, args.cache, args.db_per_class, args.queries_per_class, args.bits, args.rounds,
                     counts, args.default, [int(n) for n in args.cost_sizes.split(",") if n], args.cost_queries,
                     [int(c) for c in args.cost_candidates.split(",")],
                     [tuple(int(x) for x in b.split(":")) for b in args.learnings.split(",") if b])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
