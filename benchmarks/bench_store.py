"""The store's write path alone: items per second through ``Store.write_batch`` and LMDB bytes per item.

No broker, no network, no decoding: ``--n`` items with random codes, a ``--blob-bytes`` image blob and ids
like ``img-0000000`` are written into a fresh store in batches of ``--batch`` (one transaction each, as the
worker commits a batch), then every sub-database's pages are counted (branch + leaf + overflow pages ×
page size ÷ items) beside ``data.mdb``'s size. Whatever sub-databases the store holds are listed, so the
same script measures a store of another schema when ``PYTHONPATH`` points at another checkout:

    python benchmarks/bench_store.py --n 200000 --bits 64 --json   # one JSON object (a table without --json)
    PYTHONPATH=/path/to/other/checkout python benchmarks/bench_store.py --n 200000 --bits 64 --json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from streamhash.index.store import ItemWrite, Store


def bytes_per_item(store: Store, n: int) -> dict[str, float]:
    """Pages of each named sub-database (the main database lists them) per item."""
    env, out = store.env, {}
    with env.begin() as txn:
        names = [k for k, _ in txn.cursor()]
        for name in names:
            s = txn.stat(env.open_db(name, txn=txn, create=False))
            out[name.decode()] = round((s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]) * s["psize"] / n, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--blob-bytes", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (args.n, args.bits // 8), dtype=np.uint8)
    blob = bytes(args.blob_bytes)
    batches = [[ItemWrite(f"img-{i:07d}", codes[i].tobytes(), blob, "image/png", (i % 10,))
                for i in range(s, min(s + args.batch, args.n))] for s in range(0, args.n, args.batch)]
    with tempfile.TemporaryDirectory(prefix="bench_store_") as tmp:
        store = Store(tmp, bits=args.bits)
        t0 = time.perf_counter()
        for k, batch in enumerate(batches):
            store.write_batch(batch, {("bench", 0): k})
        elapsed = time.perf_counter() - t0
        out = {"n": args.n, "bits": args.bits, "batch": args.batch, "blob_bytes": args.blob_bytes,
               "schema": store.read_meta()["schema_version"], "items_per_s": round(args.n / elapsed),
               "bytes_per_item": bytes_per_item(store, args.n)}
        out["pages_per_item_total"] = round(sum(out["bytes_per_item"].values()), 1)
        out["data_mdb_per_item"] = round((Path(tmp) / "data.mdb").stat().st_size / args.n, 1)
        store.close()
    print(json.dumps(out) if args.json else "\n".join(f"{k:22s} {v}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
