"""Memory per item of the query server's live index and of the worker's learner bookkeeping.

Each measurement runs in a fresh subprocess and reports the growth of its anonymous resident memory
(``RssAnon`` in ``/proc/self/status``: heap and numpy arrays, not the file-backed LMDB map) from just
before the items arrive to just after, divided by the number of items, minus the packed code
(``bits / 8`` bytes) that any index must hold. Sides:

* ``live``: a :class:`~streamhash.index.live.LiveIndex` over a real LMDB store, following writes the
  way the query server does (the parent process writes the items in batches of 1000 while the child
  refreshes), then searching once so lazily built lookup structures exist;
* ``learner``: an :class:`~streamhash.learn.online.OnlineHasher` observing the items in ingest-sized
  batches (256) with ids like ``img-0123456`` and one label each, asked ``ready()`` after each batch
  as the learner asks every 0.5 s (which folds the observed items into the learner);
* ``dicts``: the reference measured in the same run: the per-item Python containers the live index
  used to hold (seq -> id, seq -> labels and id -> seq dicts over the same ids and label tuples).
  ``ratio_to_dicts`` is each side's bytes per item over this one's.

    python benchmarks/bench_memory.py                       # 200k and 1M items, 32 and 64 bits
    python benchmarks/bench_memory.py --n 100000 --bits 32  # quicker

RSS also holds what the allocator keeps: glibc raises its mmap threshold after large frees, so
arrays replaced by bigger ones (the learner's id map folds) then stay in the heap when freed. The
worker and the query server pin it at start-up (:func:`streamhash.memory.pin_malloc_mmap_threshold`),
and so do the children here; ``--allocator-default`` leaves glibc's dynamic threshold, to show
the difference. The last line printed is one JSON object.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

LABELS = 21  # label values 0..20, one per item
WRITE_BATCH = 1000
OBSERVE_BATCH = 256


def rss_anon() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def item_id(i: int) -> str:
    return f"img-{i:07d}"


def settle() -> int:
    gc.collect()
    return rss_anon()


# ---------------------------------------------------------------- children (one measurement each)
def child_live(n: int, bits: int, path: str) -> dict:
    from streamhash.index.live import LiveIndex
    from streamhash.index.store import Store

    store = Store(path, readonly=True)
    live = LiveIndex(store)
    before = settle()
    print("ready", flush=True)  # the parent starts writing now
    t0 = time.perf_counter()
    while live.current.index.ntotal < n:
        if not live.refresh():
            time.sleep(0.01)
    took = time.perf_counter() - t0
    q = np.zeros((1, bits // 8), np.uint8)
    live.current.index.search(q, 10)
    live.current.index.reconstruct_batch(np.arange(1, 11))
    return {"bytes": settle() - before, "seconds": took}


def child_learner(n: int, bits: int, path: str) -> dict:
    import torch

    from streamhash.config import LearnSettings
    from streamhash.learn.online import OnlineHasher
    from streamhash.model.hashnet import HashNet, HashNetConfig

    torch.set_num_threads(1)
    hasher = OnlineHasher(HashNet(HashNetConfig(bits=bits)), LearnSettings())
    rng = np.random.default_rng(0)
    # first-use costs (lazy imports, allocator pools) are not per item: one warm-up batch before measuring
    hasher.observe([f"warm-{i}" for i in range(OBSERVE_BATCH)], np.zeros((OBSERVE_BATCH, bits // 8), np.uint8),
                   [{0}] * OBSERVE_BATCH)
    hasher.ready()
    before = settle()
    t0 = time.perf_counter()
    for start in range(0, n, OBSERVE_BATCH):
        m = min(OBSERVE_BATCH, n - start)
        ids = [item_id(i) for i in range(start, start + m)]
        codes = rng.integers(0, 256, (m, bits // 8), dtype=np.uint8)
        labels = [{int(x)} for x in rng.integers(0, LABELS, m)]
        hasher.observe(ids, codes, labels)
        hasher.ready()  # the learner asks every 0.5 s; it folds the buffer into the learner
    took = time.perf_counter() - t0
    assert hasher.learner.n_items == n + OBSERVE_BATCH
    return {"bytes": settle() - before, "seconds": took}


def child_dicts(n: int, bits: int, path: str) -> dict:
    rng = np.random.default_rng(0)
    before = settle()
    t0 = time.perf_counter()
    ids, labels, seq_of = {}, {}, {}
    for start in range(0, n, WRITE_BATCH):
        m = min(WRITE_BATCH, n - start)
        for i, lab in zip(range(start, start + m), rng.integers(0, LABELS, m).tolist()):
            s, item = i + 1, item_id(i)
            ids[s], labels[s], seq_of[item] = item, (lab,), s
    took = time.perf_counter() - t0
    return {"bytes": settle() - before, "seconds": took}


CHILDREN = {"live": child_live, "learner": child_learner, "dicts": child_dicts}


# ---------------------------------------------------------------- parent
def write_items(path: str, n: int, bits: int) -> float:
    from streamhash.index.store import ItemWrite, Store

    store = Store(path, readonly=False, bits=bits)
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    for start in range(0, n, WRITE_BATCH):
        m = min(WRITE_BATCH, n - start)
        codes = rng.integers(0, 256, (m, bits // 8), dtype=np.uint8)
        labs = rng.integers(0, LABELS, m).tolist()
        store.write_batch([ItemWrite(item_id(i), codes[j].tobytes(), b"x", "image/png", (labs[j],))
                           for j, i in enumerate(range(start, start + m))])
    store.close()
    return time.perf_counter() - t0


def measure(side: str, n: int, bits: int, tmp: str, pin: bool) -> dict:
    path = os.path.join(tmp, f"store-{side}-{n}-{bits}")
    if side == "live":
        from streamhash.index.store import Store

        Store(path, bits=bits).close()  # empty, so the child can open it read-only and follow
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--n", str(n), "--bits", str(bits),
           "--path", path] + ([] if pin else ["--allocator-default"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    if side == "live":
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"child failed before following: {line!r}")
        write_items(path, n, bits)
    out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{side} child exited with {proc.returncode}")
    res = json.loads(out.strip().splitlines()[-1])
    per_item = res["bytes"] / n
    return {"side": side, "n": n, "bits": bits, "rss_anon_mb": round(res["bytes"] / 2**20, 1),
            "bytes_per_item": round(per_item, 1), "code_bytes": bits // 8,
            "bytes_per_item_beyond_code": round(per_item - bits // 8, 1), "seconds": round(res["seconds"], 2)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[200_000, 1_000_000])
    ap.add_argument("--bits", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--sides", nargs="+", default=["dicts", "live", "learner"], choices=sorted(CHILDREN))
    ap.add_argument("--allocator-default", action="store_true", help="do not pin glibc's mmap threshold as the "
                    "worker and query server do (freed large arrays may then stay resident)")
    ap.add_argument("--child", choices=sorted(CHILDREN))
    ap.add_argument("--path")
    args = ap.parse_args(argv)
    if args.child:
        if not args.allocator_default:
            from streamhash.memory import pin_malloc_mmap_threshold

            pin_malloc_mmap_threshold()
        print(json.dumps(CHILDREN[args.child](args.n[0], args.bits[0], args.path)), flush=True)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for n in args.n:
            for bits in args.bits:
                ref = None
                for side in args.sides:
                    row = measure(side, n, bits, tmp, not args.allocator_default)
                    if side == "dicts":
                        ref = row["bytes_per_item"]
                    elif ref:
                        row["ratio_to_dicts"] = round(row["bytes_per_item"] / ref, 3)
                    rows.append(row)
                    print(f"{side:8s} n={n:>8d} bits={bits:2d}: {row['bytes_per_item']:7.1f} B/item "
                          f"({row['bytes_per_item_beyond_code']:7.1f} beyond the {bits // 8} B code), "
                          f"{row['rss_anon_mb']:7.1f} MB, {row['seconds']:.1f}s", file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "memory", "method": "RssAnon growth in a fresh subprocess per measurement",
                      "malloc_mmap_threshold": "glibc default" if args.allocator_default else "pinned at 128 KiB", "results": rows}))


if __name__ == "__main__":
    main()
