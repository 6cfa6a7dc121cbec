"""Freshness of the query server's follower: polling only vs the commit notification (inotify).

    python benchmarks/bench_freshness.py [--commits 60] [--rate 20]

In one process, a writer thread commits single items into a real LMDB store in a temporary directory
(``Store.write_batch``, as the worker does) at ``--rate`` commits/s with random phase, while a
:class:`~streamhash.index.live.LiveIndex` follows it. Freshness of an item = from ``write_batch``
returning to the follower's refresh that applied it having returned (the item is then searchable).
Followers: polling every 50 ms, polling every 1 s, and notified (fallback poll 1 s). Loads: idle;
a Python thread burning CPU in the follower's process (holds the GIL like in-process work would);
and one CPU-burning process per core (a learner saturating the machine). Prints one JSON line;
``ratio_p99_notify_vs_poll50`` < 1 is the notification being fresher than the 50 ms poll.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamhash.index.live import LiveIndex  # noqa: E402
from streamhash.index.store import ItemWrite, Store  # noqa: E402

BITS = 32


class TimedLive(LiveIndex):
    """Records when each seq became visible (the refresh that applied it returned)."""

    def __init__(self, *a, **kw):
        self.seen: list[tuple[int, float]] = []
        super().__init__(*a, **kw)

    def refresh(self) -> int:
        n = super().refresh()
        if n:
            self.seen.append((self.current.last_seq, time.perf_counter()))
        return n


def _burn(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def _burn_process(stop) -> None:  # module level: picklable for the spawn start method
    _burn(stop)


def measure(store: Store, live_kw: dict, commits: int, rate: float, rng: random.Random) -> dict:
    live = TimedLive(store, **live_kw).start()
    time.sleep(0.2)
    committed: list[tuple[int, float]] = []
    for i in range(commits):
        time.sleep(rng.uniform(0.5, 1.5) / rate)  # random phase against any poll interval
        code = np.frombuffer(rng.randbytes(BITS // 8), np.uint8)
        seqs = store.write_batch([ItemWrite(f"f{time.monotonic_ns()}-{i}", code.tobytes(), b"x", "image/png", (0,))])
        committed.append((seqs[-1], time.perf_counter()))
    deadline = time.perf_counter() + 5 * max(live_kw.get("refresh_interval_s", 0.05), 1.0)
    while (not live.seen or live.seen[-1][0] < committed[-1][0]) and time.perf_counter() < deadline:
        time.sleep(0.01)
    notifying = live.notifying
    live.stop()
    seen_seq = np.array([s for s, _ in live.seen], np.int64)
    seen_t = np.array([t for _, t in live.seen])
    lat = []
    for seq, t in committed:
        j = int(np.searchsorted(seen_seq, seq))  # the first refresh whose last seq covers this one
        if j < len(seen_seq):
            lat.append(seen_t[j] - t)
    lat = np.array(lat)
    return {"notifying": notifying, "n": int(len(lat)), "missed": commits - int(len(lat)),
            "p50_s": round(float(np.percentile(lat, 50)), 4), "p99_s": round(float(np.percentile(lat, 99)), 4),
            "max_s": round(float(lat.max()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commits", type=int, default=60)
    ap.add_argument("--rate", type=float, default=20.0)
    args = ap.parse_args()
    followers = {
        "poll_50ms": {"refresh_interval_s": 0.05, "notify": False},
        "poll_1s": {"refresh_interval_s": 1.0, "notify": False},
        "notify": {"refresh_interval_s": 0.05, "notify": True, "fallback_interval_s": 1.0},
    }
    rng = random.Random(0)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "db", bits=BITS)
        store.write_batch([ItemWrite("seed", bytes(BITS // 8), b"x", "image/png", (0,))])
        for load in ("idle", "busy_thread", "busy_processes"):
            stop_t, procs, thread = threading.Event(), [], None
            if load == "busy_thread":
                thread = threading.Thread(target=_burn, args=(stop_t,), daemon=True)
                thread.start()
            elif load == "busy_processes":
                ctx = mp.get_context("spawn")
                stop_p = ctx.Event()
                procs = [ctx.Process(target=_burn_process, args=(stop_p,), daemon=True) for _ in range(os.cpu_count() or 1)]
                for p in procs:
                    p.start()
                time.sleep(1.0)  # spawned interpreters up and burning
            try:
                for name, kw in followers.items():
                    results[f"{load}/{name}"] = measure(store, kw, args.commits, args.rate, rng)
            finally:
                stop_t.set()
                if thread:
                    thread.join()
                if procs:
                    stop_p.set()
                    for p in procs:
                        p.join(5)
        store.close()

    def ratio(load: str, stat: str) -> float:
        return round(results[f"{load}/notify"][stat] / results[f"{load}/poll_50ms"][stat], 3)

    out = {
        "bench": "freshness", "commits": args.commits, "rate_per_s": args.rate, "cpus": os.cpu_count(),
        "results": results,
        "ratio_p50_notify_vs_poll50": {load: ratio(load, "p50_s") for load in ("idle", "busy_thread", "busy_processes")},
        "ratio_p99_notify_vs_poll50": {load: ratio(load, "p99_s") for load in ("idle", "busy_thread", "busy_processes")},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
