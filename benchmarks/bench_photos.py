"""The photo path's backbone: EfficientNet-Lite0 features in torch eager and in ONNX Runtime, same run.

Issue 23's benchmark. The stored part (worker ingest with features stored, a round and a re-encode from stored
features vs from images: ``benchmarks/photos_stored.py``, its docstring says how) runs last; ``--no-stored``
skips it; then the two-stage search's quality and cost (``benchmarks/photos_rerank.py``'s ``measure``, its
``rerank_top10_feature_overlap`` beside ``..._without``; ``--no-rerank`` skips it, ``--rerank-cache`` is its
``--cache``: the features it computes once per image set, keyed by a digest of the pixels); then ``POST /search``
by photo at 50,000 items beside the bare engine (``benchmarks/photos_search.py``; ``--no-search`` skips it). The engines, in one process, interleaved so drift in machine load hits every engine alike:

- images/s of the frozen feature extractor (pooled 1280-d), batch 16, at 2 and 1 threads, at input sizes
  224, 160 and 128 (CIFAR-10 is 32x32, upsampled bilinearly): torch eager NCHW (as the project ran it),
  torch eager channels-last, ONNX Runtime fp32, and ONNX Runtime int8: dynamic (weights only) and static (QDQ,
  per channel, calibrated on --calibration train images); ``engine_vs_torch`` = ONNX Runtime fp32 / torch eager
  NCHW at the first size and thread count (224, 2), ``int8_*_vs_fp32`` the same for the int8 engines;
- what int8 does to the features: cosine similarity to the fp32 features of the same CIFAR-10 test images;
- what the input size does to the features' quality: a linear probe (logistic regression on standardised
  features) trained on --probe-train CIFAR-10 train images and scored on --probe-test test images, per size,
  fp32 and static int8 (dynamic int8 too with --probe-int8-dynamic).

    nice -n 10 python benchmarks/bench_photos.py --cifar10 /path/to/cifar10 --rerank-cache /tmp/rerank-cache --json

``--cifar10``: anything streamhash.data.cifar10 reads (the official release, or the JPEG class-folder tarball:
then its pixels carry JPEG artifacts, and the JSON says so). Needs the extras natural and eval.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_serve import cpu_model  # noqa: E402
from photos_rerank import measure as measure_rerank  # noqa: E402  (issue 23 item 6, its one implementation)
from photos_search import add_arguments as search_arguments, search_figures  # noqa: E402
from photos_stored import add_arguments as stored_arguments, stored_figures  # noqa: E402

from streamhash.data import cifar10  # noqa: E402
from streamhash.model.efficientnet import EfficientNetLite0Backbone, PooledFeatures  # noqa: E402
from streamhash.model.engine import FeatureEngine, to_network_input  # noqa: E402



def interleaved_rates(runs: dict, x, rounds: int, seconds: float) -> dict[str, float]:
    """images/s of each ``runs[name](x)``: one warm-up call each, then ``rounds`` rounds in which every engine in
    turn runs for ``seconds`` (at least one call); the median over rounds, so a load swing hits all alike."""
    for run in runs.values():
        run(x)
    per: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            done, start = 0, time.perf_counter()
            while done < 1 or time.perf_counter() - start < seconds:
                run(x)
                done += 1
            per[name].append(done * len(x) / (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in per.items()}


def runners(net: torch.nn.Module, size: int, cache: Path, calibration: np.ndarray) -> tuple[dict, dict]:
    """The timed callables by engine name, and the ONNX Runtime engines by variant."""
    nchw = PooledFeatures(net)
    cl = PooledFeatures(copy.deepcopy(net).to(memory_format=torch.channels_last))
    engines = {"fp32": FeatureEngine(nchw, "efficientnet_lite0", size, cache_dir=cache),
               "int8_dynamic": FeatureEngine(nchw, "efficientnet_lite0", size, cache_dir=cache, quantize="dynamic"),
               "int8_static": FeatureEngine(nchw, "efficientnet_lite0", size, cache_dir=cache, quantize="static",
                                            calibration=calibration)}

    def torch_run(module, channels_last):
        def run(x):
            with torch.inference_mode():
                return module(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        return run

    def ort_run(engine):
        return lambda x: engine.session(torch.get_num_threads()).run(None, {"input": x.numpy()})[0]

    return ({"torch_eager": torch_run(nchw, False), "torch_channels_last": torch_run(cl, True),
             "onnxruntime": ort_run(engines["fp32"]), "onnxruntime_int8_dynamic": ort_run(engines["int8_dynamic"]),
             "onnxruntime_int8_static": ort_run(engines["int8_static"])}, engines)


def features(engine: FeatureEngine, images: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([engine.features(images[i:i + batch]) for i in range(0, len(images), batch)])


def probe(train_x, train_y, test_x, test_y) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=3000).fit(scaler.transform(train_x), train_y)
    return float((clf.predict(scaler.transform(test_x)) == test_y).mean())


def parts(result: dict, source: Path, args, say) -> None:
    """The stored part, the re-rank and search by photo, in that order, their headline keys lifted to the top."""
    if not args.no_stored:
        result["stored"] = stored_figures(source, args, say)
        for key in ("ingest_vs_engine", "round_features_vs_images", "reencode_vs_images", "reencode_features_s"):
            if key in result["stored"]:
                result[key] = result["stored"][key]
    if not args.no_rerank:  # results ordered by what they look like: photos_rerank.measure, as it runs alone
        with contextlib.redirect_stdout(sys.stderr):
            result["rerank"] = measure_rerank(source, args.rerank_cache)
        for key in ("rerank_top10_feature_overlap", "rerank_top10_feature_overlap_without", "rerank_map",
                    "rerank_map_without"):
            result[key] = result["rerank"][key]
        say(f"re-rank: top-10 feature overlap {result['rerank_top10_feature_overlap']} "
            f"(without {result['rerank_top10_feature_overlap_without']})")
    if not args.no_search:  # POST /search by photo over 50,000 stored photos, beside the bare engine
        result["search"] = search_figures(source, args, say)
        for key in ("search_by_photo_p50_ms", "search_by_photo_p99_ms", "engine_one_photo_p50_ms", "search_vs_engine_p50"):
            result[key] = result["search"][key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar10", type=Path, default=None, help="CIFAR-10 source (default: the data home)")
    ap.add_argument("--sizes", default="224,160,128")
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per point (median reported)")
    ap.add_argument("--seconds", type=float, default=1.5, help="least time each engine runs per round")
    ap.add_argument("--probe-train", type=int, default=2000)
    ap.add_argument("--probe-test", type=int, default=1000)
    ap.add_argument("--cosine-images", type=int, default=200)
    ap.add_argument("--calibration", type=int, default=100, help="train images that calibrate static int8")
    ap.add_argument("--probe-int8-dynamic", action="store_true",
                    help="also probe the dynamic int8 features (slow: it ran 5-7x slower than fp32 here)")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--no-stored", action="store_true", help="skip the stored-features part (photos_stored.py)")
    ap.add_argument("--no-search", action="store_true", help="skip search by photo at 50,000 (photos_search.py)")
    ap.add_argument("--no-rerank", action="store_true", help="skip the two-stage search's measure (photos_rerank.py)")
    ap.add_argument("--rerank-cache", type=Path, default=None,
                    help="photos_rerank's feature cache (--cache there; keyed by a digest of the pixels, backbone and cut)")
    stored_arguments(ap)
    search_arguments(ap)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    started = time.perf_counter()
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs a warning per padding tensor it skips

    source = cifar10.find_source(args.cifar10)
    train = cifar10.load_split("train", source, per_class=args.probe_train // 10)
    test = cifar10.load_split("test", source, per_class=args.probe_test // 10)
    say(f"CIFAR-10 from {source}: {len(train)} train, {len(test)} test images")
    with contextlib.redirect_stdout(sys.stderr):  # the weights package prints a line: stdout is the JSON's
        backbone = EfficientNetLite0Backbone(engine="torch")
    cache = Path(tempfile.mkdtemp(prefix="bench-photos-onnx-"))  # a fresh export: timed below, not a stale file

    result: dict = {"cpu": cpu_model(), "batch": args.batch, "torch": torch.__version__, "rounds": args.rounds,
                    "data": f"CIFAR-10 {'JPEG files (pixels carry JPEG artifacts)' if 'jpg' in source.name else 'official'}",
                    "throughput": {}, "feature_cosine_to_fp32": {}, "probe": {"train": len(train), "test": len(test),
                                                                           "accuracy": {}}}
    calibration = train.images[::max(1, len(train) // args.calibration)]  # every class; labels unused
    for size in sizes:
        run, engines = runners(backbone.net, size, cache, calibration)
        for variant, eng in engines.items():  # export (fp32) and quantize, timed once each
            t0 = time.perf_counter()
            eng.path
            result.setdefault("prepare_s", {}).setdefault(str(size), {})[variant] = round(time.perf_counter() - t0, 1)
        x = to_network_input(test.images[:args.batch], size)
        for t in threads:
            torch.set_num_threads(t)
            rates = {k: round(v, 1) for k, v in interleaved_rates(run, x, args.rounds, args.seconds).items()}
            result["throughput"].setdefault(str(size), {})[str(t)] = rates
            say(f"{size}px {t} thread(s): " + ", ".join(f"{k} {v}" for k, v in rates.items()) + " images/s")
        torch.set_num_threads(max(threads))
        n = min(args.cosine_images, len(test))
        feats = {"fp32": (features(engines["fp32"], train.images), features(engines["fp32"], test.images))}
        probed = ["int8_static"] + (["int8_dynamic"] if args.probe_int8_dynamic else [])
        for variant in ("int8_dynamic", "int8_static"):
            if variant in probed:
                feats[variant] = (features(engines[variant], train.images), features(engines[variant], test.images))
            q, f = features(engines[variant], test.images[:n]) if variant not in probed else feats[variant][1][:n], feats["fp32"][1][:n]
            cos = (f * q).sum(1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(q, axis=1))
            result["feature_cosine_to_fp32"].setdefault(variant, {})[str(size)] = {
                "mean": round(float(cos.mean()), 4), "min": round(float(cos.min()), 4), "images": n}
        for variant, (tr, te) in feats.items():
            result["probe"]["accuracy"].setdefault(variant, {})[str(size)] = round(probe(tr, train.labels, te, test.labels), 4)
        say(f"{size}px: probe accuracy {[(v, a[str(size)]) for v, a in result['probe']['accuracy'].items()]}; "
            f"cosine to fp32 {[(v, c[str(size)]['mean']) for v, c in result['feature_cosine_to_fp32'].items()]}")

    top = result["throughput"][str(sizes[0])][str(threads[0])]
    result["engine_vs_torch"] = round(top["onnxruntime"] / top["torch_eager"], 2)
    result["engine_vs_torch_channels_last"] = round(top["onnxruntime"] / top["torch_channels_last"], 2)
    result["int8_dynamic_vs_fp32"] = round(top["onnxruntime_int8_dynamic"] / top["onnxruntime"], 2)
    result["int8_static_vs_fp32"] = round(top["onnxruntime_int8_static"] / top["onnxruntime"], 2)
    result["ratios_at"] = {"size": sizes[0], "threads": threads[0]}
    parts(result, source, args, say)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
