"""The query server under concurrent load: /search by code, 1 and 8 clients, batched vs unbatched.

    .venv/bin/python benchmarks/bench_serve.py --items 100000 --requests 500

Writes ``--items`` random codes straight into a fresh LMDB store (``Store.write_batch``; no broker, no
worker), starts a real ``streamhash serve`` process over it for each server configuration
(``batch``: the micro-batcher, the default; ``nobatch``: ``STREAMHASH_SERVER__BATCH_ENABLED=false``,
each search ranked alone in the thread pool as before the batcher; ``batch-wN``: ``--workers N``
processes, with ``--workers``), then runs 1 and 8 client processes (``--concurrency``), each sending
``--requests`` searches (k=10) one after another over a keep-alive connection. Prints requests/s
(all clients together) and p50/p99 latency as seen by the clients per configuration and concurrency,
the server's resident memory, and ends with one JSON line.
Clients and server share the machine's cores: on a small machine the clients' own cost is in the figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamhash.index.store import ItemWrite, Store  # noqa: E402
from streamhash.index.store.root import ShardKey, StoreRoot  # noqa: E402
from streamhash.kafka.broker import free_port  # noqa: E402
from streamhash.services.processes import spawn, stop, wait_http  # noqa: E402

WARMUP = 20


def build_store(root: Path, n: int, bits: int, *, partitions: int = 1, topic: str = "bench.images",
                prefix: str = "b-") -> np.ndarray:
    """A store root holding ``n`` random codes (ids ``{prefix}{i}``, labels i % 10) spread over ``partitions``
    shards, written straight into LMDB (ranking does not care how they got there), each shard with the
    seeded initial network as model version 1; returns the codes."""
    from streamhash.config import ModelSettings
    from streamhash.model.state import initial_net

    store_root = StoreRoot(root)
    net = initial_net(ModelSettings(bits=bits)).to_bytes()
    codes = np.random.default_rng(0).integers(0, 256, (n, bits // 8), dtype=np.uint8)
    per = -(-n // partitions)
    for p in range(partitions):
        store = Store(store_root.shard_path(ShardKey(topic, p)), bits=bits, shard=p)
        store.put_model(net, make_current=True, version=1)
        end = min((p + 1) * per, n)
        for start in range(p * per, end, 50_000):
            store.write_batch([ItemWrite(f"{prefix}{i}", codes[i].tobytes(), b"", "image/png", (i % 10,))
                               for i in range(start, min(start + 50_000, end))])
        store.close()
    return codes


def client(args: tuple[int, int, int, int, float]) -> list[float]:
    """One client: ``n`` searches after a warm-up, one at a time; the latencies in seconds."""
    port, n, nbytes, seed, start_at = args
    rng = np.random.default_rng(seed)
    bodies = [json.dumps({"code_hex": rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes().hex(), "k": 10}).encode()
              for _ in range(n + WARMUP)]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"content-type": "application/json"}
    lat = []
    for i, body in enumerate(bodies):
        if i == WARMUP:
            while time.time() < start_at:  # every client starts measuring together
                time.sleep(0.001)
        t = time.perf_counter()
        conn.request("POST", "/search", body, headers)
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"/search answered {r.status}: {data[:200]!r}")
        if i >= WARMUP:
            lat.append(time.perf_counter() - t)
    conn.close()
    return lat


def tree_rss_mib(pid: int) -> tuple[float, list[float]]:
    """Resident memory (MiB) of ``pid`` and of each of its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))

    def rss(p: int) -> float:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            if b"multiprocessing" in cmd and b"resource_tracker" in cmd:
                continue
            out.append(round(rss(p), 1))
        except OSError:
            continue
        todo.extend(children.get(p, []))
    return round(rss(pid), 1), out


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its descendants so far."""
    total, todo = 0.0, [pid]
    ticks = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in os.listdir(f"/proc/{p}/task"):
                todo.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
        except (OSError, ValueError):
            continue
    return total


def wait_idle(pid: int, timeout: float = 300.0) -> float:
    """Wait until the server has finished its start-up work (index build, tables): under 5% CPU for 1 s."""
    t0 = time.monotonic()
    last = cpu_seconds(pid)
    while time.monotonic() - t0 < timeout:
        time.sleep(1.0)
        now = cpu_seconds(pid)
        if now - last < 0.05:
            break
        last = now
    return time.monotonic() - t0


def run_config(name: str, env: dict, store: Path, work: Path, args, nbytes: int, serve_args: list[str]) -> dict:
    port = free_port()
    log = work / f"serve-{name}.log"
    proc = spawn(["serve", *serve_args], env={"STREAMHASH_STORE__PATH": str(store), "STREAMHASH_SERVER__PORT": str(port),
                                             "STREAMHASH_LOG_LEVEL": "WARNING", **env}, log_path=log)
    out: dict = {}
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 300, proc, log)
        size = json.loads(_get(port, "/healthz"))["index_size"]
        assert size == args.items, f"index has {size} items, expected {args.items}"
        print(f"{name:>10} server idle after {wait_idle(proc.pid):.1f} s", file=sys.stderr)
        with mp.get_context("spawn").Pool(max(args.concurrency)) as pool:
            # every client process started (interpreter, imports) before anything is measured
            pool.map(time.sleep, [0.5] * max(args.concurrency), chunksize=1)
            wait_idle(proc.pid)
            for c in args.concurrency:
                start_at = time.time() + 1.0
                lats = pool.map(client, [(port, args.requests, nbytes, 1000 * c + i, start_at) for i in range(c)])
                flat = np.concatenate(lats)
                # throughput over the measured part: total requests / the slowest client's measured time
                span = max(sum(x) for x in lats)
                out[f"c{c}"] = {"requests_per_s": round(len(flat) / span), "p50_ms": round(float(np.percentile(flat, 50)) * 1e3, 3),
                                "p99_ms": round(float(np.percentile(flat, 99)) * 1e3, 3), "requests": int(len(flat))}
        main_rss, child_rss = tree_rss_mib(proc.pid)
        out["rss_mib"] = {"server": main_rss, "workers": child_rss}
    finally:
        stop(proc)
    return out


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    data = conn.getresponse().read()
    conn.close()
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--requests", type=int, default=500, help="measured searches per client")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--workers", type=int, default=0, help="also run the batched server with this many worker processes")
    ap.add_argument("--no-reference", action="store_true", help="skip the unbatched server")
    ap.add_argument("--workdir", type=Path, help="kept afterwards (default: a temporary directory, removed)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "index"
    try:
        if store.exists():
            shutil.rmtree(store)
        t = time.perf_counter()
        build_store(store, args.items, args.bits)
        print(f"store of {args.items} items x {args.bits} bits written in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        configs = [("batch", {}, [])]
        if not args.no_reference:
            configs.append(("nobatch", {"STREAMHASH_SERVER__BATCH_ENABLED": "false"}, []))
        if args.workers > 1:
            configs.append((f"batch-w{args.workers}", {}, ["--workers", str(args.workers)]))
        result: dict = {"items": args.items, "bits": args.bits, "requests_per_client": args.requests, "k": 10,
                        "cores": os.cpu_count()}
        for name, env, serve_args in configs:
            result[name] = run_config(name, env, store, work, args, args.bits // 8, serve_args)
            for c in args.concurrency:
                r = result[name][f"c{c}"]
                print(f"{name:>10} {c} client(s): {r['requests_per_s']:>6} requests/s  p50 {r['p50_ms']:.2f} ms  "
                      f"p99 {r['p99_ms']:.2f} ms", file=sys.stderr)
            print(f"{name:>10} resident memory (MiB): {result[name]['rss_mib']}", file=sys.stderr)
        if "nobatch" in result:
            for c in args.concurrency:
                result[f"batch_vs_nobatch_c{c}"] = round(result["batch"][f"c{c}"]["requests_per_s"]
                                                         / result["nobatch"][f"c{c}"]["requests_per_s"], 2)
        print(json.dumps(result))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
