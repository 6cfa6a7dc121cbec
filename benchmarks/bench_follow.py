"""What a worker ingesting into the served shards costs the query server, in-process and without HTTP.

    .venv/bin/python benchmarks/bench_follow.py --items 1000000 --json

The query server's own parts over ``--items`` random codes in 4 shards (as ``bench_serve.py`` builds them):
a :class:`~streamhash.index.sharded.ShardedIndex` whose followers run as in the server, and the server's
ranking call (``View.rank``, one search at a time, k=10) in a loop on the main thread, first with nothing
ingesting, then while a real ``streamhash worker`` ingests ``--ingest-rate`` images/s through the embedded
broker (``bench_serve.ingesting``). Per phase: the search's wall time (p50 / p99) split into ranking and
resolving the hits; the CPU the followers took (each thread's own CPU clock) and how often they refreshed
and applied something; the main thread's CPU time per search (the rest of its wall time it waited: for a core,
or for the GIL a follower held).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import PARTITIONS, TOPIC, build_store, ingesting  # noqa: E402

from streamhash.index.live import LiveIndex  # noqa: E402
from streamhash.index.sharded import ShardedIndex  # noqa: E402
from streamhash.kafka.broker import EmbeddedBroker  # noqa: E402


class FollowerClock:
    """Counts refreshes (and those that applied something) and the CPU the follower threads used."""

    def __init__(self):
        self.refreshes = self.applied = 0
        self._orig = LiveIndex.refresh
        clock = self

        def counted(live):
            n = clock._orig(live)
            clock.refreshes += 1
            clock.applied += bool(n)
            return n

        LiveIndex.refresh = counted

    @staticmethod
    def cpu_s() -> float:
        total = 0.0
        for t in threading.enumerate():
            if t.name.startswith("live-index") and t.native_id:
                try:
                    fields = Path(f"/proc/self/task/{t.native_id}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                total += (int(fields[11]) + int(fields[12])) / 100.0
        return total

    def snapshot(self) -> tuple[int, int, float]:
        return self.refreshes, self.applied, self.cpu_s()


def phase(index: ShardedIndex, codes: np.ndarray, seconds: float, clock: FollowerClock) -> dict:
    rng = np.random.default_rng(5)
    walls, ranks, resolves = [], [], []
    r0, a0, c0 = clock.snapshot()
    cpu0, t_end = time.thread_time(), time.monotonic() + seconds
    t0 = time.monotonic()
    while time.monotonic() < t_end:
        view = index.view()
        q = codes[rng.integers(len(codes))]
        t = time.perf_counter()
        D, S, I = view.search([q[None]] * len(view), 10)
        t1 = time.perf_counter()
        view.resolve(S[0], I[0])
        t2 = time.perf_counter()
        ranks.append(t1 - t)
        resolves.append(t2 - t1)
        walls.append(t2 - t)
    elapsed = time.monotonic() - t0
    r1, a1, c1 = clock.snapshot()
    ms = lambda xs, p: round(float(np.percentile(xs, p)) * 1e3, 4)  # noqa: E731
    return {"searches": len(walls), "wall_ms_p50": ms(walls, 50), "wall_ms_p99": ms(walls, 99),
            "rank_ms_p50": ms(ranks, 50), "rank_ms_p99": ms(ranks, 99),
            "resolve_ms_p50": ms(resolves, 50), "resolve_ms_p99": ms(resolves, 99),
            "main_cpu_ms_per_search": round((time.thread_time() - cpu0) / len(walls) * 1e3, 4),
            "refreshes_per_s": round((r1 - r0) / elapsed, 1), "applying_refreshes_per_s": round((a1 - a0) / elapsed, 1),
            "follower_cores": round((c1 - c0) / elapsed, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=15.0, help="per phase")
    ap.add_argument("--ingest-rate", type=float, default=1000.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-follow-"))
    root = work / "index"
    try:
        codes = build_store(root, args.items, args.bits, partitions=PARTITIONS, topic=TOPIC)
        clock = FollowerClock()
        index = ShardedIndex(root).start()
        result = {"items": args.items, "ingest_rate": args.ingest_rate}
        try:
            time.sleep(2)
            result["idle"] = phase(index, codes, args.seconds, clock)
            print("idle", result["idle"], file=sys.stderr)
            with EmbeddedBroker(home=work / "broker") as broker, \
                    ingesting(broker, root, work, args.ingest_rate, PARTITIONS) as indexed:
                time.sleep(5)  # the worker up to speed
                result["ingest"] = phase(index, codes, args.seconds, clock)
                result["ingest"]["indexed"] = indexed()
                print("ingest", result["ingest"], file=sys.stderr)
        finally:
            index.close()
        if args.json:
            print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
