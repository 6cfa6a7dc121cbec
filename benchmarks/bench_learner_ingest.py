"""Ingest rate with the learner process training beside the worker, against the same run without it.

    python benchmarks/bench_learner_ingest.py [--n 60000] [--json]

For each case (no learner, then the learner as `streamhash learner` with its defaults: niceness +10,
one torch thread), ``--n`` labeled Fashion-MNIST PNGs are produced to a fresh topic first; then the
worker (and the learner) start and the rate is n / (last batch committed - partitions assigned). The
learner's CPU seconds during that window (from /proc), and when its first round started (seconds
after the assignment, against ``ingest_seconds``), show that it was training meanwhile.
Both cases run back to back on the same machine and embedded broker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamhash.config import KafkaSettings  # noqa: E402
from streamhash.data.fashion_mnist import load_split  # noqa: E402
from streamhash.kafka.broker import EmbeddedBroker, free_port  # noqa: E402
from streamhash.kafka.produce import from_arrays, make_producer, send  # noqa: E402
from streamhash.kafka.topics import ensure_topics  # noqa: E402
from streamhash.services.processes import scrape, spawn, stop, wait_for, wait_http  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its waited-for children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def one_case(broker, work: Path, images, labels, *, learner: bool) -> dict:
    name = "with-learner" if learner else "no-learner"
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic=f"{name}.images", dlq_topic=f"{name}.images.dlq",
                          group_id=f"{name}-workers")
    ensure_topics(kafka)
    producer = make_producer(kafka)
    send(producer, kafka.topic, from_arrays(images, labels, prefix=f"{name}-"), progress=False)
    producer.close()
    worker_port, learner_port = free_port(), free_port()
    env = {"STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers, "STREAMHASH_KAFKA__TOPIC": kafka.topic,
           "STREAMHASH_KAFKA__DLQ_TOPIC": kafka.dlq_topic, "STREAMHASH_KAFKA__GROUP_ID": kafka.group_id,
           "STREAMHASH_STORE__PATH": str(work / name), "STREAMHASH_WORKER__METRICS_PORT": str(worker_port),
           "STREAMHASH_LEARN__METRICS_PORT": str(learner_port)}
    procs = []
    try:
        if learner:  # first, so it is loaded and waiting for the root when the worker starts
            lp = spawn(["learner"], env=env, log_path=work / f"{name}-learner.log")
            procs.append(lp)
            wait_http(f"http://127.0.0.1:{learner_port}/metrics", 120, lp, work / f"{name}-learner.log")
        worker = spawn(["worker"], env=env, log_path=work / f"{name}-worker.log")
        procs.append(worker)
        url = f"http://127.0.0.1:{worker_port}/metrics"
        wait_http(url, 120, worker, work / f"{name}-worker.log")
        wait_for(lambda: scrape(url).get("streamhash_assigned_partitions", 0) > 0, 60, "assignment")
        t0, cpu0 = time.time(), cpu_seconds(procs[0].pid) if learner else 0.0
        wait_for(lambda: scrape(url).get("streamhash_items_indexed_total", 0) >= len(images), 900, "ingest", interval=0.2)
        cpu1 = cpu_seconds(procs[0].pid) if learner else 0.0
        window = scrape(url)["streamhash_last_commit_timestamp_seconds"] - t0
        out = {"ingest_images_per_s": round(len(images) / window), "ingest_seconds": round(window, 2)}
        if learner:
            out["learner_cpu_share_during_ingest"] = round((cpu1 - cpu0) / window, 3)  # of one core
            # when its first round started (its end, less its duration): inside the ingest window or not
            lurl = f"http://127.0.0.1:{learner_port}/metrics"
            lm = wait_for(lambda: (s := scrape(lurl)).get("streamhash_learning_rounds_total", 0) >= 1 and s, 600,
                          "the first round", interval=0.1)
            started = time.time() - lm["streamhash_learning_round_duration_seconds_sum"] - t0
            out["first_round_started_s"] = round(started, 1)
            out["first_round_seconds"] = round(lm["streamhash_learning_round_duration_seconds_sum"], 1)
        return out
    finally:
        for p in reversed(procs):
            stop(p)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60_000)
    ap.add_argument("--workdir", default="var/bench-learner-ingest")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    images, labels = load_split("train")
    order = np.random.default_rng(0).permutation(len(images))[: args.n]
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = {"n": args.n, "load_average_at_start": os.getloadavg()[0]}
    with EmbeddedBroker(home=work) as broker:
        for learner in (False, True):
            out["with_learner" if learner else "no_learner"] = one_case(broker, work, images[order], labels[order],
                                                                          learner=learner)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
