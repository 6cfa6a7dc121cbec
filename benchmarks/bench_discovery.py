"""A discovering router against a router given its list, in the same run (issue 25, item 3).

    python benchmarks/bench_discovery.py [--items 200000] [--queries 1000] [--json]

``--items`` random 32-bit codes in 4 shards, split over two roots (partitions 0-1 and 2-3), one ``streamhash
serve`` each advertising on the embedded broker; in front of them ``streamhash serve --shards A,B`` (the
reference) and ``streamhash serve --discover``. Each query (by code, k=10) goes to both routers one after the
other, alternating which goes first; client wall time. ``discover_vs_shards_p50``: the discovering router's p50
over the listed one's (1.0: routing costs nothing measurable). ``same_answers``: every query's hits were equal.
Then server b stops cleanly: ``withdraw_to_rerouted_s`` is the time from its SIGTERM until the discovering
router's map no longer holds it; b starts again: ``start_to_routed_s`` from its spawn until the map routes its
partitions to it (process start included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_serve import build_store  # noqa: E402
from streamhash.config import KafkaSettings  # noqa: E402
from streamhash.kafka.broker import EmbeddedBroker, free_port  # noqa: E402
from streamhash.kafka.topics import ensure_topics  # noqa: E402
from streamhash.services.processes import spawn, stop, wait_for, wait_http  # noqa: E402

TOPIC = "bench.images"


def split(work: Path, items: int) -> tuple[np.ndarray, list[Path]]:
    root = work / "root-all"
    codes = build_store(root, items, 32, partitions=4, topic=TOPIC, prefix="q-")
    halves = [work / "root-a", work / "root-b"]
    for half, parts in zip(halves, ([0, 1], [2, 3])):
        for p in parts:
            dst = half / "shards" / TOPIC / str(p)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(root / "shards" / TOPIC / str(p), dst)
        shutil.copy(root / "streamhash-root.json", half / "streamhash-root.json")
    return codes, halves


def pct(xs) -> tuple[float, float]:
    return round(float(np.percentile(xs, 50)) * 1000, 3), round(float(np.percentile(xs, 99)) * 1000, 3)


def serve(work: Path, env: dict, name: str, root: Path, port: int):
    proc = spawn(["serve", "--store", str(root), "--port", str(port), "--advertise-url", f"http://127.0.0.1:{port}"],
                 env=env, log_path=work / f"serve-{name}.log")
    return proc


def measure(codes, routers: dict[str, str], queries: int) -> dict:
    lat: dict[str, list[float]] = {name: [] for name in routers}
    same = True
    with httpx.Client(timeout=10) as c:
        for i in range(queries + 50):
            body = {"code_hex": codes[i % len(codes)].tobytes().hex(), "k": 10}
            got = {}
            for name in (list(routers) if i % 2 else list(routers)[::-1]):
                t = time.perf_counter()
                r = c.post(f"{routers[name]}/search", json=body)
                r.raise_for_status()
                lat[name].append(time.perf_counter() - t)
                got[name] = [(h["id"], h["distance"]) for h in r.json()["results"]]
                assert not r.json()["partial"], r.json()
            same = same and len({json.dumps(v) for v in got.values()}) == 1
    out = {"same_answers": same}
    for name, xs in lat.items():
        out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = pct(xs[50:])
    out["discover_vs_shards_p50"] = round(out["discover_p50_ms"] / out["shards_p50_ms"], 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--workdir", default="var/bench-discovery")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    codes, halves = split(work, args.items)
    procs: dict = {}
    with EmbeddedBroker(home=work) as broker:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic=TOPIC, topic_partitions=4)
        ensure_topics(kafka)
        env = {"STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers, "STREAMHASH_KAFKA__TOPIC": TOPIC}
        ports = {name: free_port() for name in ("a", "b", "shards", "discover")}
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        try:
            for name, root in zip("ab", halves):
                procs[name] = serve(work, env, name, root, ports[name])
            procs["shards"] = spawn(["serve", "--shards", f"{urls['a']},{urls['b']}", "--port", str(ports["shards"])],
                                    env={}, log_path=work / "router-shards.log")
            procs["discover"] = spawn(["serve", "--discover", "--port", str(ports["discover"])], env=env,
                                      log_path=work / "router-discover.log")
            logs = {"a": "serve-a.log", "b": "serve-b.log", "shards": "router-shards.log", "discover": "router-discover.log"}
            for name, p in procs.items():
                wait_http(f"{urls[name]}/healthz", 600, p, work / logs[name])
            health = lambda: httpx.get(f"{urls['discover']}/healthz", timeout=10).json()  # noqa: E731
            wait_for(lambda: health()["status"] == "ok", 120, "every partition routed")
            out = {"items": args.items, "queries": args.queries, **measure(codes, {k: urls[k] for k in ("shards", "discover")},
                                                                          args.queries)}
            t0 = time.monotonic()
            stop(procs["b"])
            wait_for(lambda: urls["b"] not in health()["servers"], 60, "b off the map")
            out["withdraw_to_rerouted_s"] = round(time.monotonic() - t0, 3)
            t0 = time.monotonic()
            procs["b"] = serve(work, env, "b", halves[1], ports["b"])
            wait_for(lambda: health()["servers"].get(urls["b"]) == [2, 3], 120, "b on the map again")
            out["start_to_routed_s"] = round(time.monotonic() - t0, 3)
        finally:
            for p in procs.values():
                stop(p)
    for k, v in out.items():
        print(f"{k:26s} {v}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
