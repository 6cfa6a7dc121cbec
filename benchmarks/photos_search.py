"""bench_photos, search by photo (issue 23 item 5): ``POST /search`` by photo p50/p99 at 50,000 stored photos,
beside the bare engine time for one photo, same run.

The store: a root of 4 shards (``--partitions``) holding ``--items`` CIFAR-10 photos written through
``Store.write_batch`` (not a worker: 50,000 photos through the frozen part take over 40 minutes on 2 busy
cores), each item as a worker writes it: the JPEG file's bytes as the blob, its label, the stored feature from
the product's ``HashNet.prepare`` (the network ``streamhash eval --dataset cifar10`` chose, ``eval.cifar.MODEL``:
EfficientNet-Lite0 cut ``stage7`` at input 128 today, 192x4x4 float16, the JSON's ``model``; the engine the product picks) and its code from
the same network's tail and head (``HashNet.encode`` over that feature); every shard holds that network as model
version 1 (``model.state.initial_net``, what a worker writes first). ``--photos`` distinct
train photos are prepared, the rest of the items repeat them (blob, label, feature and code): a search's cost
(the query's frozen part and head, the exact Hamming scan of every code, the second stage's read and cosine of
``server.rerank_candidates`` stored features) does not depend on the values.

A real ``streamhash serve`` over that root (the photo settings, ``--threads`` torch threads) answers
``--queries`` searches by CIFAR-10 *test* photos (never stored), each a multipart upload of the JPEG file as a
user's browser sends it, k=10, one at a time from an httpx client in this process. Interleaved with them, the
bare engine time for one photo: this process decodes the same JPEG bytes and runs the product's network on them
(``HashNet.encode_images``: frozen part + head, same threads), so load drifts hit both alike.
``search_vs_engine_p50`` = the search's p50 / the engine's p50 (what the server adds: HTTP, the scan over
``--items`` codes, the second stage). Then, same server: ``by_item_id_p50_ms`` (a search by a stored item: the
scan and the second stage, no frozen part) and ``by_code_p50_ms`` (the scan alone), to say where the rest goes.

    nice -n 10 python benchmarks/photos_search.py --cifar10 <cifar10-jpg.tar.gz> --json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamhash.data import cifar10  # noqa: E402
from streamhash.eval import cifar as cifar_eval  # noqa: E402
from streamhash.data.photos import iter_photo_files  # noqa: E402
from streamhash.imaging import Conversion  # noqa: E402
from streamhash.index.store import ItemWrite, Store  # noqa: E402
from streamhash.index.store.root import ShardKey, StoreRoot  # noqa: E402
from streamhash.kafka.broker import free_port  # noqa: E402
from streamhash.records import ImageSpec, decode_images  # noqa: E402
from streamhash.services.processes import spawn, stop, wait_for, wait_http  # noqa: E402

SPEC = ImageSpec(32, 32, 3, conversion=Conversion(mode="rgb", resize="fill"))
# the photo network `streamhash eval --dataset cifar10` chose and `streamhash demo --dataset cifar10` runs
MODEL = {**cifar_eval.MODEL}
TOPIC = "bench.photos.images"


def model_settings(bits: int):
    from streamhash.config import ModelSettings

    return ModelSettings(bits=bits, **MODEL)


def server_env(root: Path, port: int, bits: int, threads: int) -> dict[str, str]:
    return {"STREAMHASH_STORE__PATH": str(root), "STREAMHASH_SERVER__PORT": str(port), "STREAMHASH_LOG_LEVEL": "WARNING",
            "STREAMHASH_MODEL__BITS": str(bits), "STREAMHASH_MODEL__TORCH_THREADS": str(threads),
            "STREAMHASH_IMAGE__MODE": "rgb", "STREAMHASH_IMAGE__RESIZE": "fill",
            **{f"STREAMHASH_MODEL__{k.upper()}": str(v) for k, v in MODEL.items()}}


def files(source: Path, split: str, n: int) -> tuple[list[bytes], np.ndarray]:
    """The first ``n`` photo files of ``split`` (their bytes as stored) and their labels."""
    found = list(itertools.islice(iter_photo_files(source, split), n))
    return [f.data for f in found], np.array([cifar10.CLASSES.index(f.class_name) for f in found])


def build_root(root: Path, net, blobs: list[bytes], labels, items: int, partitions: int, say) -> dict:
    """A store root of ``items`` photos over ``partitions`` shards (see the module docstring); seconds it took."""
    t0 = time.perf_counter()
    feats = np.concatenate([net.prepare(decode_images([(b, "image/jpeg") for b in blobs[i:i + 64]], SPEC))
                            for i in range(0, len(blobs), 64)])
    prepare_s = time.perf_counter() - t0
    codes = net.encode(feats)
    say(f"{len(blobs)} photos prepared in {prepare_s:.1f} s ({len(blobs) / prepare_s:.1f}/s); writing {items} items")
    t1, store_root, raw = time.perf_counter(), StoreRoot(root), net.to_bytes()
    for p in range(partitions):
        store = Store(store_root.shard_path(ShardKey(TOPIC, p)), bits=net.cfg.bits, shard=p, backbone=net.cfg.backbone,
                      features=net.feature_spec())
        store.put_model(raw, make_current=True, version=1)
        mine = range(p, items, partitions)
        for start in range(0, len(mine), 2000):
            store.write_batch([ItemWrite(f"photo-{i}", codes[i % len(blobs)].tobytes(), blobs[i % len(blobs)],
                                         "image/jpeg", (int(labels[i % len(blobs)]),),
                                         feature=feats[i % len(blobs)].tobytes())
                               for i in mine[start:start + 2000]], model_version=1)
        store.close()
    return {"prepare_s": round(prepare_s, 1), "write_s": round(time.perf_counter() - t1, 1)}


def timed_searches(base: str, net, queries: list[bytes], k: int) -> tuple[list[float], list[float], dict]:
    """Each query photo searched over HTTP then run through the bare engine here, alternately (seconds each),
    and what the server's answers said (reranked, hits)."""
    import httpx

    search_s, engine_s, seen = [], [], {"reranked": 0, "hits": 0}
    with httpx.Client(timeout=60) as client:
        for i, jpeg in enumerate(queries):
            t = time.perf_counter()
            r = client.post(f"{base}/search", files={"image": (f"q{i}.jpg", jpeg, "image/jpeg")}, data={"k": str(k)})
            search_s.append(time.perf_counter() - t)
            r.raise_for_status()
            body = r.json()
            seen["reranked"] += bool(body.get("reranked"))
            seen["hits"] += len(body["results"])
            t = time.perf_counter()
            net.encode_images(decode_images([(jpeg, "image/jpeg")], SPEC))
            engine_s.append(time.perf_counter() - t)
    return search_s, engine_s, seen


def timed_others(base: str, ids: list[str], codes: np.ndarray, k: int) -> tuple[list[float], list[float]]:
    """Seconds per search by a stored item's id (no frozen part: its stored feature re-ranks) and by a code (the
    Hamming scan alone, nothing to re-rank), alternately: where a search by photo spends what the engine does not."""
    import httpx

    by_id, by_code = [], []
    with httpx.Client(timeout=60) as client:
        for item_id, code in zip(ids, codes):
            for body, out in (({"item_id": item_id, "k": k}, by_id), ({"code_hex": code.tobytes().hex(), "k": k}, by_code)):
                t = time.perf_counter()
                client.post(f"{base}/search", json=body).raise_for_status()
                out.append(time.perf_counter() - t)
    return by_id, by_code


def ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 2)


def search_figures(source: Path, args, say=lambda *a: None) -> dict:
    import torch

    from streamhash.model.state import initial_net

    torch.set_num_threads(args.search_threads)
    with contextlib.redirect_stdout(sys.stderr):  # the weights package prints a line: stdout is the JSON's
        net = initial_net(model_settings(args.search_bits))
    blobs, labels = files(source, "train", args.search_photos)
    queries, _ = files(source, "test", args.search_queries + args.search_warmup)
    work = Path(tempfile.mkdtemp(prefix="bench-photos-search-"))
    built = build_root(work / "index", net, blobs, labels, args.search_items, args.search_partitions, say)
    port = free_port()
    log = work / "serve.log"
    proc = spawn(["serve"], env=server_env(work / "index", port, args.search_bits, args.search_threads), log_path=log)
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        wait_http(f"{base}/healthz", 300, proc, log)
        wait_for(lambda: httpx.get(f"{base}/healthz").json()["index_size"] >= args.search_items, 300, "the index to load")
        timed_searches(base, net, queries[:args.search_warmup], args.search_k)  # the server's first ONNX session, caches
        search_s, engine_s, seen = timed_searches(base, net, queries[args.search_warmup:], args.search_k)
        picks = np.random.default_rng(0).choice(args.search_items, size=len(search_s), replace=False)
        by_id, by_code = timed_others(base, [f"photo-{i}" for i in picks],
                                      np.random.default_rng(1).integers(0, 256, (len(picks), args.search_bits // 8),
                                                                        dtype=np.uint8), args.search_k)
    finally:
        stop(proc)
        shutil.rmtree(work, ignore_errors=True)  # hundreds of MB at 50,000 photos
    say(f"POST /search by photo at {args.search_items} items: p50 {ms(search_s, 50)} ms, p99 {ms(search_s, 99)} ms; "
        f"bare engine, one photo: p50 {ms(engine_s, 50)} ms ({len(search_s)} queries, {seen['reranked']} re-ranked); "
        f"by stored id p50 {ms(by_id, 50)} ms, by code {ms(by_code, 50)} ms")
    return {"items": args.search_items, "partitions": args.search_partitions, "distinct_photos": len(blobs),
            "queries": len(search_s), "k": args.search_k, "threads": args.search_threads,
            "store": "Store.write_batch, features and codes from HashNet.prepare/encode", "model": MODEL,
            **built, "search_by_photo_p50_ms": ms(search_s, 50), "search_by_photo_p99_ms": ms(search_s, 99),
            "engine_one_photo_p50_ms": ms(engine_s, 50), "engine_one_photo_p99_ms": ms(engine_s, 99),
            "search_vs_engine_p50": round(statistics.median(search_s) / statistics.median(engine_s), 2),
            "by_item_id_p50_ms": ms(by_id, 50), "by_code_p50_ms": ms(by_code, 50),
            "reranked_answers": seen["reranked"], "hits_per_answer": round(seen["hits"] / len(search_s), 2)}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--search-items", dest="search_items", type=int, default=50_000, help="photos in the served store")
    ap.add_argument("--search-photos", dest="search_photos", type=int, default=1000,
                    help="distinct train photos prepared (the rest of the items repeat them)")
    ap.add_argument("--search-queries", dest="search_queries", type=int, default=200, help="test photos searched (timed)")
    ap.add_argument("--search-warmup", dest="search_warmup", type=int, default=10, help="test photos searched first, not timed")
    ap.add_argument("--search-threads", dest="search_threads", type=int, default=1,
                    help="torch/ONNX threads of the server and of the bare engine here (the server's default: 1)")
    ap.add_argument("--search-partitions", dest="search_partitions", type=int, default=4)
    ap.add_argument("--search-bits", dest="search_bits", type=int, default=32)
    ap.add_argument("--search-k", dest="search_k", type=int, default=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar10", type=Path, default=None, help="CIFAR-10 as image files (the JPEG tarball)")
    ap.add_argument("--json", action="store_true")
    add_arguments(ap)
    args = ap.parse_args()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    print(json.dumps(search_figures(cifar10.find_source(args.cifar10), args, say)))


if __name__ == "__main__":
    main()
