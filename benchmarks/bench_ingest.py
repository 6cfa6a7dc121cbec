"""Ingest throughput, bare encode throughput, freshness and query latency, on the embedded broker.

    python benchmarks/bench_ingest.py [--n 20000] [--format png] [--query-items 100000] [--json]

1. Bare encode: the worker's network encoding Fashion-MNIST in-process (1 torch thread, the
   worker's batch size), and decode+encode (PNG decode through the record parser, then encode).
2. Ingest: ``--n`` images are produced to a fresh topic first; then one worker process starts and
   the rate is n / (last batch committed - partitions assigned): topic to committed LMDB index.
3. Freshness: with the worker and the query server running, single images are sent at 20/s and
   each is timed from send to visible through ``GET /items/{id}``, split into send -> broker ack -> the
   worker's commit -> visible in the query server (the slowest three probes are listed). ``--learn``: with the learner process
   training on the images just ingested meanwhile (its rounds and CPU during the probes are reported);
   the probes go on past the first 100 until its round's re-encode is done on every shard (at most
   2,400 probes), and those sent while the shards re-encoded are summed up apart
   (``freshness_during_reencode``, the window read from the worker's log). All probes are saved in
   ``probes.json`` in the work directory.
4. Query latency: ``--query-items`` random codes are written straight into the 4 shards of a second
   store root (the ranking does not care how they got there); a worker ingests into those shards at
   ``--ingest-rate`` images/s while the query server answers ``POST /search`` with k=10 by code
   and by PNG image; client-side wall time per request, after 20 warm-up requests.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamhash.config import KafkaSettings  # noqa: E402
from streamhash.data.fashion_mnist import load_all  # noqa: E402
from benchmarks.bench_serve import build_store, cpu_seconds  # noqa: E402
from streamhash.kafka.broker import EmbeddedBroker, free_port  # noqa: E402
from streamhash.kafka.produce import from_arrays, make_producer, send  # noqa: E402
from streamhash.kafka.topics import ensure_topics  # noqa: E402
from streamhash.model.hashnet import HashNet, HashNetConfig  # noqa: E402
from streamhash.records import ImageSpec, encode_png, parse_message  # noqa: E402
from streamhash.services.demo import probe_freshness  # noqa: E402
from streamhash.services.processes import scrape, spawn, stop, wait_for, wait_http  # noqa: E402

# --learn: 2 minutes of probes at most. The learner runs niced: on a busy machine its round took more
# than the 30 s once allowed (0.24 of a core), and no re-encode came.
MAX_PROBES = 2400


def bare_encode(images: np.ndarray, values: list[bytes], batch: int) -> dict:
    torch.set_num_threads(1)
    net = HashNet(HashNetConfig(bits=32))
    net.encode(images[:batch], batch)
    t = time.perf_counter()
    net.encode(images, batch)
    enc = len(images) / (time.perf_counter() - t)
    spec = ImageSpec()
    t = time.perf_counter()
    decoded = np.stack([parse_message(b"k", v, [("labels", b"1")], spec).image for v in values])
    net.encode(decoded, batch)
    dec_enc = len(values) / (time.perf_counter() - t)
    return {"bare_encode_images_per_s": round(enc), "decode_encode_images_per_s": round(dec_enc)}


def query_latency_while_ingesting(bootstrap: str, work: Path, stream, stream_y, values, args) -> dict:
    """HTTP search latency over ``--query-items`` codes while a worker ingests into the same store."""
    qstore = work / "query-index"
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic="bench.query.images", dlq_topic="bench.query.dlq", group_id="bench-q")
    # the random codes in the topic's 4 shards, beside which the worker's images are ingested
    codes = build_store(qstore, args.query_items, 32, partitions=kafka.topic_partitions, topic=kafka.topic, prefix="q-")
    ensure_topics(kafka)
    metrics_port, http_port = free_port(), free_port()
    env = {"STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "STREAMHASH_KAFKA__TOPIC": kafka.topic,
           "STREAMHASH_KAFKA__DLQ_TOPIC": kafka.dlq_topic, "STREAMHASH_KAFKA__GROUP_ID": kafka.group_id,
           "STREAMHASH_STORE__PATH": str(qstore), "STREAMHASH_SERVER__PORT": str(http_port),
           "STREAMHASH_WORKER__METRICS_PORT": str(metrics_port), "STREAMHASH_LEARN__ENABLED": "false"}
    server = spawn(["serve"], env=env, log_path=work / "serve-q.log")
    worker = spawn(["worker"], env=env, log_path=work / "worker-q.log")
    base, out = f"http://127.0.0.1:{http_port}", {"query_items": args.query_items, "ingest_rate_during_queries": args.ingest_rate}
    producer = make_producer(kafka)
    feeder = threading.Thread(target=send, args=(producer, kafka.topic, from_arrays(stream, stream_y, prefix="live-")),
                              kwargs={"rate": args.ingest_rate, "progress": False}, daemon=True)
    try:
        wait_http(f"{base}/healthz", 300, server, work / "serve-q.log")
        wait_http(f"http://127.0.0.1:{metrics_port}/metrics", 120, worker, work / "worker-q.log")
        wait_for(lambda: scrape(f"http://127.0.0.1:{metrics_port}/metrics").get("streamhash_assigned_partitions", 0) > 0,
                 60, "assignment")
        feeder.start()
        with httpx.Client(timeout=10) as c:
            for kind in ("code", "image"):
                lat = []
                i = 0
                while i < args.queries or (kind == "image" and feeder.is_alive()):  # query for as long as ingestion runs
                    i += 1
                    body = {"code_hex": codes[i % len(codes)].tobytes().hex(), "k": 10} if kind == "code" else \
                        {"image_base64": base64.b64encode(values[i % len(values)]).decode(), "k": 10}
                    t = time.perf_counter()
                    r = c.post(f"{base}/search", json=body)
                    lat.append(time.perf_counter() - t)
                    r.raise_for_status()
                out[f"query_{kind}_p50_ms"], out[f"query_{kind}_p99_ms"] = percentiles(lat[20:], 1000)
        out["items_ingested_during_queries"] = httpx.get(f"{base}/healthz").json()["index_size"] - args.query_items
        feeder.join()
    finally:
        stop(server)
        stop(worker)
        producer.close(timeout=5)
    return out


def freshness_summary(rows: list[dict]) -> dict:
    """p50/p99 from send to visible, the p99 of each stage, and the slowest three probes split by stage."""
    out = dict(zip(("freshness_p50_s", "freshness_p99_s"), percentiles([r["visible"] for r in rows])))
    out["freshness_probes"] = len(rows)
    out["freshness_stage_p99_s"] = {
        "send_to_ack": percentiles([r["acked"] for r in rows])[1],
        "ack_to_commit": percentiles([r["committed"] - r["acked"] for r in rows])[1],
        "commit_to_visible": percentiles([r["visible"] - r["committed"] for r in rows])[1]}
    slow = sorted(rows, key=lambda r: -r["visible"])[:3]
    out["freshness_slowest"] = [{"at": time.strftime("%H:%M:%S", time.localtime(r["at"])) + f".{int(r['at'] % 1 * 1000):03d}",
                                 **{k: round(r[k], 4) for k in ("acked", "committed", "visible")}} for r in slow]
    return out


def reencode_window(worker_log: Path) -> tuple[float, float] | None:
    """(first re-encode announced, last shard swapped), epoch seconds, from the worker's log lines."""
    start = end = None
    for line in worker_log.read_text().splitlines():
        if "a re-encode) published by the learner" in line or ": generation " in line and " with model " in line:
            at = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
            start, end = (at if start is None else start), at
    return None if start is None or end == start else (start, end)


def reencode_window_summary(rows: list[dict], worker_log: Path) -> dict:
    """The probes sent from the re-encode's announcement to 1 s after the last shard swapped."""
    window = reencode_window(worker_log)
    if window is None:
        return {"probes": 0}
    inside = [r for r in rows if window[0] <= r["at"] <= window[1] + 1.0]
    fmt = "%H:%M:%S"
    out = {"from": time.strftime(fmt, time.localtime(window[0])), "to": time.strftime(fmt, time.localtime(window[1])),
           "probes": len(inside)}
    if inside:
        out["p50_s"], out["p99_s"] = percentiles([r["visible"] for r in inside])
        out["max_s"] = round(max(r["visible"] for r in inside), 4)
    return out


def percentiles(xs: list[float], scale: float = 1.0) -> tuple[float, float]:
    return round(float(np.percentile(xs, 50)) * scale, 3), round(float(np.percentile(xs, 99)) * scale, 3)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--format", choices=["png", "npy"], default="png")
    ap.add_argument("--query-items", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--ingest-rate", type=float, default=1000, help="images/s ingested while queries run")
    ap.add_argument("--workdir", default="var/bench-ingest")
    ap.add_argument("--learn", action="store_true", help="freshness with the learner process training beside ingest")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    images, labels = load_all()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    stream, stream_y = images[order[: args.n]], labels[order[: args.n]]
    values = [encode_png(x) for x in stream[:5000]]
    out = {"n": args.n, "format": args.format, **bare_encode(stream, values, 512)}

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with EmbeddedBroker(home=work) as broker:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        ensure_topics(kafka)
        producer = make_producer(kafka)
        # every tenth item unlabeled: inferred codes for --learn's re-encode (~2,000, the size the 10% labeled
        # hold-out's used to be; an all-labeled index has every code learned and nothing to re-encode)
        shown = [None if i % 10 == 0 else int(y) for i, y in enumerate(stream_y)]
        send(producer, kafka.topic, from_arrays(stream, shown, prefix="b-", fmt=args.format), progress=False)
        metrics_port, http_port = free_port(), free_port()
        env = {"STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers, "STREAMHASH_STORE__PATH": str(work / "index"),
               "STREAMHASH_WORKER__METRICS_PORT": str(metrics_port), "STREAMHASH_SERVER__PORT": str(http_port),
               "STREAMHASH_LEARN__ENABLED": "false"}
        worker = spawn(["worker"], env=env, log_path=work / "worker.log")
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        try:
            wait_http(url, 120, worker, work / "worker.log")
            wait_for(lambda: scrape(url).get("streamhash_assigned_partitions", 0) > 0, 60, "assignment")
            t_assigned = time.time()
            wait_for(lambda: scrape(url).get("streamhash_items_indexed_total", 0) >= args.n, 600, "ingest")
            s = scrape(url)
            rate = args.n / (s["streamhash_last_commit_timestamp_seconds"] - t_assigned)
            out["ingest_images_per_s"] = round(rate)
            out["ingest_vs_bare_encode"] = round(rate / out["bare_encode_images_per_s"], 3)
            out["encode_seconds_share"] = round(s["streamhash_encode_duration_seconds_sum"] / (s["streamhash_last_commit_timestamp_seconds"] - t_assigned), 3)
            out["lmdb_commit_seconds_share"] = round(s["streamhash_lmdb_commit_duration_seconds_sum"] / (s["streamhash_last_commit_timestamp_seconds"] - t_assigned), 3)

            server = spawn(["serve"], env=env, log_path=work / "serve.log")
            base = f"http://127.0.0.1:{http_port}"
            wait_http(f"{base}/healthz", 60, server, work / "serve.log")
            learner = None
            if args.learn:  # the learner process trains on the 20k just indexed while the probes run
                lport = free_port()
                env["STREAMHASH_LEARN__METRICS_PORT"] = str(lport)
                learner = spawn(["learner"], env=env, log_path=work / "learner.log")
                lurl = f"http://127.0.0.1:{lport}/metrics"
                wait_http(lurl, 120, learner, work / "learner.log")
                # it reads the shards, then trains on the 20k pending: past start-up (~3 CPU s) it is in a round
                wait_for(lambda: cpu_seconds(learner.pid) > 6, 120, "the learner to be training")
                before, cpu0 = scrape(lurl), cpu_seconds(learner.pid)
            t_probe, rows, sent, until = time.time(), [], 0, None if args.learn else 100
            reencodes0 = scrape(url).get("streamhash_shard_reencodes_total", 0)
            while sent < (until or MAX_PROBES):
                probe_idx = order[args.n + sent: args.n + sent + 20]
                rows += probe_freshness(producer, kafka.topic, base, images[probe_idx], labels[probe_idx], first=sent)
                sent += len(probe_idx)
                reencoded = scrape(url).get("streamhash_shard_reencodes_total", 0) - reencodes0
                if until is None and reencoded >= kafka.topic_partitions:  # 20 more: the query server swaps after
                    until = max(100, sent + 20)
            (work / "probes.json").write_text(json.dumps(rows))
            out.update(freshness_summary(rows))
            if learner is not None:
                out["reencodes_during_probes"] = int(reencoded)
                out["freshness_during_reencode"] = reencode_window_summary(rows, work / "worker.log")
                after = scrape(lurl)
                out["learner_rounds_during_probes"] = int(after["streamhash_learning_rounds_total"]
                                                          - before["streamhash_learning_rounds_total"])
                out["learner_cpu_cores_during_probes"] = round((cpu_seconds(learner.pid) - cpu0) / (time.time() - t_probe), 3)
                stop(learner)
            stop(server)
        finally:
            stop(worker)
            producer.close()

        out.update(query_latency_while_ingesting(broker.bootstrap_servers, work, stream, stream_y, values, args))

    for k, v in out.items():
        print(f"{k:28s} {v}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
