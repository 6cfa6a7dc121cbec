"""Scale-out on one machine: workers per group, the learner beside them, queries over shards and a router.

    python benchmarks/bench_scaleout.py [--n 20000] [--query-items 1000000] [--queries 2000] [--json]

Every phase runs the product's processes (``streamhash worker``, ``streamhash learner``, ``streamhash serve``,
``streamhash serve --shards``) on the embedded broker, on a 4-partition topic:

1. **ingest, 1 and 2 workers**: ``--n`` PNG images are produced to a fresh topic, then the workers start in
   one group over one store root; rate = n / (last commit of any worker - first assignment of any worker),
   rebalances included. ``exactly_once``: every id in one shard once, one seq per message.
2. **ingest with the learner**: one worker and one learner (nice 10, one torch thread, its defaults);
   5,000 labeled images first, until the learner has finished a round; then ``--learner-n`` more (enough
   for rounds to finish inside the window), timed from their first send to the last commit, while the
   learner trains (``round_every`` 1,000: rounds back to back). ``learner_rounds`` (rounds finished inside
   the window) and ``learner_cpu_cores_in_window`` (its CPU seconds from /proc / window) show that it
   did train meanwhile. The baseline runs the same steps without the learner, in the same run.
3. **queries over shards**: ``--query-items`` random codes written straight into 4 shards (ranking does not
   care how they got there); one ``streamhash serve`` over the root answers ``POST /search`` by code, k=10,
   client wall time. Then the shards split over two roots, one server each, and a router in front:
   ``router_overhead_ms`` = p50 over queries of (router latency - the slower of the two servers asked
   directly with the same query, right after).
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

from streamhash.config import KafkaSettings  # noqa: E402
from streamhash.data.fashion_mnist import load_all  # noqa: E402
from streamhash.kafka.broker import EmbeddedBroker, free_port  # noqa: E402
from streamhash.kafka.produce import from_arrays, make_producer, send  # noqa: E402
from streamhash.kafka.topics import ensure_topics  # noqa: E402
from benchmarks.bench_serve import build_store, cpu_seconds  # noqa: E402
from streamhash.services.processes import scrape, spawn, stop, total, wait_for, wait_http  # noqa: E402
from tests.support import read_store  # noqa: E402

PARTITIONS = 4


def worker_env(kafka: KafkaSettings, root: Path, **extra) -> dict:
    env = {"STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "STREAMHASH_KAFKA__TOPIC": kafka.topic,
           "STREAMHASH_KAFKA__DLQ_TOPIC": kafka.dlq_topic, "STREAMHASH_KAFKA__GROUP_ID": kafka.group_id,
           "STREAMHASH_STORE__PATH": str(root), "STREAMHASH_WORKER__METRICS_PORT": str(free_port())}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def fresh_topic(bootstrap: str, name: str) -> KafkaSettings:
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic=f"{name}.images", dlq_topic=f"{name}.dlq",
                          group_id=f"{name}-workers", topic_partitions=PARTITIONS)
    ensure_topics(kafka)
    return kafka


def timed_ingest(kafka: KafkaSettings, root: Path, work: Path, workers: int, n: int) -> tuple[float, list]:
    """Start ``workers`` workers on a topic holding ``n`` images; returns (images/s from the first assignment
    to the last commit, the processes)."""
    procs, urls = [], []
    for i in range(workers):
        env = worker_env(kafka, root)
        procs.append(spawn(["worker"], env=env, log_path=work / f"{kafka.topic}-worker{i}.log"))
        urls.append(f"http://127.0.0.1:{env['STREAMHASH_WORKER__METRICS_PORT']}/metrics")
    for p, u in zip(procs, urls):
        wait_http(u, 120, p, work / "worker.log")
    t0 = wait_for(lambda: next((time.time() for u in urls if scrape(u).get("streamhash_assigned_partitions", 0) > 0),
                               None), 120, "assignment")
    wait_for(lambda: sum(total(scrape(u), "streamhash_items_indexed_total") for u in urls) >= n, 900, "ingest")
    last = max(scrape(u).get("streamhash_last_commit_timestamp_seconds", 0) for u in urls)
    return n / (last - t0), list(zip(procs, urls))


def ingest_phase(bootstrap: str, work: Path, images, labels, values_fmt: str, workers: int) -> dict:
    kafka = fresh_topic(bootstrap, f"w{workers}")
    producer = make_producer(kafka)
    send(producer, kafka.topic, from_arrays(images, labels, prefix="s-", fmt=values_fmt), progress=False)
    producer.close()
    root = work / f"root-w{workers}"
    rate, procs = timed_ingest(kafka, root, work, workers, len(images))
    for p, _ in procs:
        stop(p)
    content = read_store(root)
    ids = content["ids"]
    once = (len(ids) == len(set(ids)) == len(images)
            and sum(sh["next_seq"] - 1 for sh in content["shards"].values()) == len(images))
    return {"images_per_s": round(rate), "exactly_once": once, "shards": len(content["shards"])}


def learner_phase(bootstrap: str, work: Path, images, labels, fmt: str, n: int, with_learner: bool) -> dict:
    """One worker; 5,000 labeled images first (and the learner's first round over them), then ``n`` more,
    timed from their first send to the last commit. Without the learner: the same steps, the baseline."""
    name = "learn" if with_learner else "nolearn"
    kafka = fresh_topic(bootstrap, name)
    producer = make_producer(kafka)
    warm = 5000
    send(producer, kafka.topic, from_arrays(images[:warm], labels[:warm], prefix="l-", fmt=fmt), progress=False)
    env = worker_env(kafka, work / f"root-{name}", STREAMHASH_LEARN__ROUND_EVERY=1000, STREAMHASH_LEARN__METRICS_PORT=free_port())
    worker = spawn(["worker"], env=env, log_path=work / f"worker-{name}.log")
    wurl = f"http://127.0.0.1:{env['STREAMHASH_WORKER__METRICS_PORT']}/metrics"
    lurl = f"http://127.0.0.1:{env['STREAMHASH_LEARN__METRICS_PORT']}/metrics"
    learner = spawn(["learner"], env=env, log_path=work / "learner.log") if with_learner else None
    try:
        wait_http(wurl, 120, worker, work / f"worker-{name}.log")
        wait_for(lambda: scrape(wurl).get("streamhash_items_indexed_total", 0) >= warm, 300, "the first 5,000")
        if learner is not None:
            wait_http(lurl, 120, learner, work / "learner.log")
            wait_for(lambda: scrape(lurl).get("streamhash_learning_rounds_total", 0) >= 1, 600, "the learner's first round")
            before = scrape(lurl)
            cpu0 = cpu_seconds(learner.pid)
        t0 = time.time()
        send(producer, kafka.topic, from_arrays(images[warm:warm + n], labels[warm:warm + n], prefix="l-", fmt=fmt,
                                                start=warm), progress=False)
        wait_for(lambda: scrape(wurl).get("streamhash_items_indexed_total", 0) >= warm + n, 900, "the timed images")
        window = scrape(wurl)["streamhash_last_commit_timestamp_seconds"] - t0
        out = {"rate": n / window, "window_s": window}
        if learner is not None:
            out["cpu_s"] = cpu_seconds(learner.pid) - cpu0
            after = scrape(lurl)
            out["rounds"] = after["streamhash_learning_rounds_total"] - before["streamhash_learning_rounds_total"]
        return out
    finally:
        for p in (learner, worker):
            if p is not None:
                stop(p)
        producer.close()


def query_phase(work: Path, items: int, queries: int) -> dict:
    root = work / "root-query"
    codes = build_store(root, items, 32, partitions=PARTITIONS, prefix="q-")
    halves = [work / "root-a", work / "root-b"]  # the same shards, two per root: one server per root
    for half, parts in zip(halves, ([0, 1], [2, 3])):
        for p in parts:
            src = root / "shards" / "bench.images" / str(p)
            dst = half / "shards" / "bench.images" / str(p)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst)
        shutil.copy(root / "streamhash-root.json", half / "streamhash-root.json")
    servers, bases = [], []
    for name, r in (("all", root), ("a", halves[0]), ("b", halves[1])):
        port = free_port()
        env = {"STREAMHASH_STORE__PATH": str(r), "STREAMHASH_SERVER__PORT": str(port)}
        servers.append(spawn(["serve"], env=env, log_path=work / f"serve-{name}.log"))
        bases.append(f"http://127.0.0.1:{port}")
    rport = free_port()
    servers.append(spawn(["serve", "--shards", f"{bases[1]},{bases[2]}"],
                         env={"STREAMHASH_SERVER__PORT": str(rport)}, log_path=work / "router.log"))
    router = f"http://127.0.0.1:{rport}"
    out = {"query_items": items}
    try:
        for p, b in zip(servers, bases + [router]):
            wait_http(f"{b}/healthz", 600, p, work / "serve.log")
        wait_for(lambda: httpx.get(f"{bases[0]}/healthz").json()["index_size"] >= items, 600, "the index to load")
        with httpx.Client(timeout=10) as c:
            def search(base, i):
                t = time.perf_counter()
                r = c.post(f"{base}/search", json={"code_hex": codes[i % len(codes)].tobytes().hex(), "k": 10})
                r.raise_for_status()
                return time.perf_counter() - t, r.json()

            lat = [search(bases[0], i)[0] for i in range(queries + 50)][50:]
            out["query_p50_ms"], out["query_p99_ms"] = pct(lat)
            routed, overhead = [], []
            for i in range(queries + 50):
                t_router, res = search(router, i)
                assert not res.get("partial"), res
                slowest = max(search(bases[1], i)[0], search(bases[2], i)[0])
                routed.append(t_router)
                overhead.append(t_router - slowest)
            out["router_query_p50_ms"], out["router_query_p99_ms"] = pct(routed[50:])
            out["router_overhead_ms"] = round(float(np.percentile(overhead[50:], 50)) * 1000, 3)
    finally:
        for p in servers:
            stop(p)
    return out


def pct(xs) -> tuple[float, float]:
    return round(float(np.percentile(xs, 50)) * 1000, 3), round(float(np.percentile(xs, 99)) * 1000, 3)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--format", choices=["png", "npy"], default="png")
    ap.add_argument("--learner-n", type=int, default=60_000, help="images timed beside the learner (after 5,000 first): "
                    "long enough for rounds (~10 s each) to finish inside the window")
    ap.add_argument("--query-items", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: ingest,learner,query")
    ap.add_argument("--workdir", default="var/bench-scaleout")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out: dict = {"partitions": PARTITIONS, "n": args.n, "format": args.format}
    if not {"ingest", "learner"} <= skip:
        images, labels = load_all()
        order = np.random.default_rng(0).permutation(len(images))
        images, labels = images[order], labels[order]
        with EmbeddedBroker(home=work) as broker:
            if "ingest" not in skip:
                one = ingest_phase(broker.bootstrap_servers, work, images[:args.n], labels[:args.n], args.format, 1)
                two = ingest_phase(broker.bootstrap_servers, work, images[:args.n], labels[:args.n], args.format, 2)
                out.update({"workers": 2, "ingest_images_per_s_1_worker": one["images_per_s"],
                            "ingest_images_per_s_2_workers": two["images_per_s"],
                            "ingest_2_vs_1": round(two["images_per_s"] / one["images_per_s"], 3),
                            "exactly_once": one["exactly_once"] and two["exactly_once"], "shards": two["shards"]})
            if "learner" not in skip:
                base = learner_phase(broker.bootstrap_servers, work, images, labels, args.format, args.learner_n, False)
                got = learner_phase(broker.bootstrap_servers, work, images, labels, args.format, args.learner_n, True)
                out.update({"ingest_without_learner_images_per_s": round(base["rate"]),
                            "ingest_with_learner_images_per_s": round(got["rate"]),
                            "with_vs_without_learner": round(got["rate"] / base["rate"], 3),
                            "learner_window_s": round(got["window_s"], 1),
                            # rounds finished inside the window (the one running at its end is not counted),
                            # and the learner's CPU seconds in it per second: it trained meanwhile
                            "learner_rounds": int(got["rounds"]),
                            "learner_cpu_cores_in_window": round(got["cpu_s"] / got["window_s"], 3)})
    if "query" not in skip:
        out.update(query_phase(work, args.query_items, args.queries))
    for k, v in out.items():
        print(f"{k:34s} {v}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
