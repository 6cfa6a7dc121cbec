"""Soak: a long stream with learning on, sampled over time, then exactly-once accounting.

    python benchmarks/bench_soak.py [--items 200000] [--rate 0] [--interval 10] [--workdir DIR]

The embedded broker, one worker (learning on) and one query server run as processes; ``--items``
synthetic class-structured images (tests/conftest.py ``synthetic_images``, unique ids, labels 0-9)
are produced in the background (``--rate`` per second, 0 = as fast as the producer goes). Every
``--interval`` seconds (and for ``--tail-s`` after the last item is indexed) one JSON line reports the ingest rate since the last sample, the items
indexed, lag, learning rounds, re-encodes, worker and query-server RSS (anonymous and file-backed, from /proc) and the
size of the LMDB ``data.mdb``. When everything is indexed (or ``--timeout`` passes) the processes
stop and the final line carries :func:`bench_faults.account` (produced, indexed, lost, duplicated)
plus the peaks.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_faults import SPAWNED, Rig, produce, valid_messages  # noqa: E402

from streamhash.kafka.broker import EmbeddedBroker  # noqa: E402
from streamhash.services.processes import scrape, stop, total  # noqa: E402


def rss_mb(pid: int, kind: str) -> float | None:
    """``RssAnon`` (heap, arrays, torch) or ``RssFile`` (mapped files, mostly LMDB pages the process
    touched, which the kernel can drop) from /proc, in MiB. VmRSS is their sum plus shared memory."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(kind + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def chunks(n: int, size: int = 5000):
    """Messages in chunks, so 200,000 images are never all in memory (seeds 1000, 2000, ...: new images, the same class templates)."""
    for start in range(0, n, size):
        yield from valid_messages(min(size, n - start), "soak-", seed=1000 * (1 + start // size), start=start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--rate", type=float, default=0, help="messages/s to produce; 0 = as fast as possible")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--timeout", type=float, default=6 * 3600, help="give up waiting for the index after this many seconds")
    ap.add_argument("--round-every", type=int, default=2000, help="STREAMHASH_LEARN__ROUND_EVERY")
    ap.add_argument("--tail-s", type=float, default=30.0, help="keep sampling this long after everything is indexed (learning catches up)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="streamhash-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBroker(home=work / "broker").start()
    try:
        rig = Rig(broker, work, "soak", learn=True, env={"STREAMHASH_LEARN__ROUND_EVERY": str(args.round_every),
                                                         "STREAMHASH_LEARN__OMEGA": "2000", "STREAMHASH_LEARN__EPOCHS": "3"})
        rig.start_worker()
        rig.start_server()
        producer = threading.Thread(target=produce, args=(rig.kafka, rig.ledger, chunks(args.items)),
                                    kwargs={"rate": args.rate or None}, daemon=True)
        t0 = time.monotonic()
        producer.start()
        peaks = {"worker_rss_anon_mb": 0.0, "worker_rss_file_mb": 0.0, "server_rss_anon_mb": 0.0,
                 "server_rss_file_mb": 0.0, "learner_rss_anon_mb": 0.0, "learner_rss_file_mb": 0.0, "data_mdb_mb": 0.0}
        last_items, last_t, samples, rates = 0.0, t0, 0, []
        status, complete_at = "timeout", None
        while time.monotonic() - t0 < args.timeout:
            time.sleep(args.interval)
            if rig.worker.poll() is not None:
                status = f"worker exited with {rig.worker.returncode}"
                break
            try:
                s = scrape(rig.metrics_url)
            except Exception:  # a slow scrape under load is a sample lost, not a failure
                continue
            try:
                lm = scrape(rig.learner_url)
            except Exception:
                lm = {}
            now = time.monotonic()
            items = s.get('streamhash_index_items{process="worker"}', 0)
            shards = list(rig.store.glob("shards/*/*/data.mdb"))
            sample = {
                "t_s": round(now - t0, 1), "produced": rig.ledger.sent, "indexed": int(items),
                "ingest_per_s": round((items - last_items) / (now - last_t), 1),
                "lag": int(s.get("streamhash_consumer_lag_messages", 0)),
                "rounds": int(lm.get("streamhash_learning_rounds_total", 0)),
                "round_failures": int(lm.get("streamhash_learning_round_failures_total", 0)),
                "reencodes": int(lm.get("streamhash_reencode_triggers_total", 0)),
                "dead_lettered": int(total(s, "streamhash_messages_dead_lettered_total")),
                **{f"{name}_rss_{kind.lower()[3:]}_mb": rss_mb(proc.pid, kind)
                   for name, proc in (("worker", rig.worker), ("server", rig.server), ("learner", rig.learner))
                   for kind in ("RssAnon", "RssFile")},
                "data_mdb_mb": round(sum(p.stat().st_size for p in shards) / 2**20, 1),  # every shard
            }
            for k in peaks:
                peaks[k] = max(peaks[k], sample[k] or 0)
            rates.append(sample["ingest_per_s"])
            last_items, last_t, samples = items, now, samples + 1
            print(json.dumps({"soak_sample": sample}), flush=True)
            if complete_at is None and not producer.is_alive() and items >= args.items and sample["lag"] == 0:
                status, complete_at = "complete", now
            if complete_at is not None and now - complete_at >= args.tail_s:
                break
        elapsed = (complete_at or time.monotonic()) - t0
        producer.join(timeout=60)
        result = rig.finish({"status": status, "elapsed_s": round(elapsed, 1), "samples": samples,
                             "mean_ingest_per_s": round(args.items / elapsed, 1) if status == "complete" else None,
                             **{f"peak_{k}": v for k, v in peaks.items()}})
        result.pop("worker_log_tail", None) if result.get("ok") else None
        print(json.dumps({"bench": "soak", "items": args.items, "workdir": str(work), **result}), flush=True)
    finally:
        while SPAWNED:
            stop(SPAWNED.pop(), 15)
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
