"""The query server under load from an external generator, while a worker ingests into the served shards.

    .venv/bin/python benchmarks/bench_serve.py --items 1000000 --json     # needs `wrk` (apt install wrk)

Writes ``--items`` random codes straight into the 4 shards of a fresh store root (ranking does not care how
they got there), starts the embedded broker and a real ``streamhash worker`` that ingests PNG images into
those shards at ``--ingest-rate`` images/s (0: none) for the whole run, and a real ``streamhash serve``
over the root for each server configuration (``batch``: the micro-batcher, the default; ``nobatch``:
``STREAMHASH_SERVER__BATCH_ENABLED=false``; ``batch-wN``: ``--workers N``). Load comes from ``wrk``
(``--latency``, a Lua script cycling through pre-made ``POST /search`` bodies by code, k=10) at 1, 8 and 64
connections (``--connections``) for ``--duration`` seconds each, after a warm-up; every response must be a
200. ``kernel_ms_batch1`` is the same merged search over the same shards in this process (the library's
:class:`~streamhash.index.sharded.ShardedIndex`, one query at a time), measured in the same run, and
``overhead_ratio`` = the server's p50 at 1 connection / that kernel time. wrk, the server, the worker and
the broker share the machine's cores: on a small machine their own cost is in the figures; ``other_cores_N``
is how many cores anything else kept busy during the run at N connections (a shared machine).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamhash.index.store import ItemWrite, Store  # noqa: E402
from streamhash.index.store.root import ShardKey, StoreRoot  # noqa: E402
from streamhash.kafka.broker import EmbeddedBroker, free_port  # noqa: E402
from streamhash.services.processes import scrape, spawn, stop, wait_for, wait_http  # noqa: E402

PARTITIONS = 4
TOPIC = "bench.serve.images"
WRK_SCRIPT = """
local bodies = {}
for line in io.lines(os.getenv("STREAMHASH_BENCH_BODIES")) do bodies[#bodies + 1] = line end
local i = math.random(#bodies)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i % #bodies + 1
  return wrk.format(nil, "/search", nil, bodies[i])
end
"""


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


def wrk(port: int, connections: int, seconds: float, bodies: Path, work: Path, pids: dict[str, int] | None = None) -> dict:
    """One wrk run: requests/s and the p50/p99 latency it reports; raises if any response was not a 200.
    ``cores``: the cores each of ``pids`` (and wrk itself) kept busy during the run."""
    script = work / "search.lua"
    script.write_text(WRK_SCRIPT)
    cmd = ["wrk", f"-t{args_threads(connections)}", f"-c{connections}", f"-d{int(seconds)}s", "--latency",
           "--timeout", "10s", "-s", str(script), f"http://127.0.0.1:{port}"]
    pids = pids or {}
    busy0, mine0, t0 = machine_busy_seconds(), cpu_seconds(os.getpid()), time.monotonic()
    each0, wrk0, own0 = {k: cpu_seconds(p) for k, p in pids.items()}, _children_cpu_seconds(), _own_cpu_seconds()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "STREAMHASH_BENCH_BODIES": str(bodies)},
                         timeout=seconds + 60)
    elapsed = time.monotonic() - t0
    # cores busy with anything but this benchmark's processes (wrk, server, worker, broker) during the run
    other = ((machine_busy_seconds() - busy0) - (cpu_seconds(os.getpid()) - mine0)) / elapsed
    # and how the benchmark's own share split: on 2 cores, what the server got beside the worker, broker and wrk
    cores = {k: round((cpu_seconds(p) - each0[k]) / elapsed, 2) for k, p in pids.items()}
    cores["wrk"] = round((_children_cpu_seconds() - wrk0) / elapsed, 2)  # reaped children: wrk, just waited for
    cores["bench"] = round((_own_cpu_seconds() - own0) / elapsed, 2)  # this process: the producer feeding the worker
    text = out.stdout
    if out.returncode != 0 or "Non-2xx" in text or "Socket errors" in text:
        raise RuntimeError(f"wrk failed or saw errors:\n{text}\n{out.stderr}")
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+[a-z]+)$", text, re.M))
    return {"rps": round(float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))),
            "p50_ms": _ms(lat["50"]), "p99_ms": _ms(lat["99"]),
            "requests": int(re.search(r"(\d+) requests in", text).group(1)), "other_cores": round(max(other, 0.0), 2),
            "cores": cores}


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def args_threads(connections: int) -> int:
    """wrk's threads: one per connection up to WRK_THREADS (set from --wrk-threads): on a small machine every
    load-generator thread is a core taken from the server."""
    return max(1, min(connections, WRK_THREADS[0]))


WRK_THREADS = [1]


def _ms(value: str) -> float:
    number, unit = re.match(r"([\d.]+)([a-z]+)", value).groups()
    return round(float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit], 3)


def kernel_ms(root: Path, codes: np.ndarray, n: int = 300) -> float:
    """The server's ranking for one query by code, in this process: the merged top-10 over every shard."""
    from streamhash.index.sharded import ShardedIndex

    index = ShardedIndex(root)
    try:
        view = index.view()
        qs = codes[np.random.default_rng(7).choice(len(codes), n)]
        for q in qs[:20]:
            view.search([q[None]] * len(view), 10)
        t = time.perf_counter()
        for q in qs:
            view.search([q[None]] * len(view), 10)
        return round((time.perf_counter() - t) / n * 1e3, 4)
    finally:
        index.close()


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


def cpu_model() -> str:
    """The CPU's model name: these shared machines are not all alike, and a run's figures belong to its CPU."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines())
    except (OSError, ValueError):
        return platform.processor() or platform.machine()
    fields = {k.strip(): v.strip() for k, v in fields.items()}  # a VM may hide all but the vendor's name
    return f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


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
    """Wait until the server has finished its start-up work (index build, tables): under 15% of a core for 1 s
    per server process (following a worker's ingest alone keeps each at ~8%)."""
    t0 = time.monotonic()
    last = cpu_seconds(pid)
    while time.monotonic() - t0 < timeout:
        time.sleep(1.0)
        now = cpu_seconds(pid)
        if now - last < 0.15 * (1 + len(tree_rss_mib(pid)[1])):
            break
        last = now
    return time.monotonic() - t0


def run_config(name: str, env: dict, root: Path, work: Path, args, bodies: Path, serve_args: list[str],
               pids: dict[str, int]) -> dict:
    port = free_port()
    log = work / f"serve-{name}.log"
    proc = spawn(["serve", *serve_args], env={"STREAMHASH_STORE__PATH": str(root), "STREAMHASH_SERVER__PORT": str(port),
                                             "STREAMHASH_LOG_LEVEL": "WARNING", **env}, log_path=log)
    out: dict = {}
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 300, proc, log)
        wait_for(lambda: json.loads(_get(port, "/healthz"))["index_size"] >= args.items, 300, "the index to load")
        print(f"{name:>10} server idle after {wait_idle(proc.pid):.1f} s", file=sys.stderr)
        wrk(port, 1, 2, bodies, work)  # warm-up
        for c in args.connections:
            r = wrk(port, c, args.duration, bodies, work, {"server": proc.pid, **pids})
            out[f"rps_{c}"], out[f"p50_ms_{c}"], out[f"p99_ms_{c}"] = r["rps"], r["p50_ms"], r["p99_ms"]
            out[f"other_cores_{c}"], out[f"cores_{c}"] = r["other_cores"], r["cores"]
            print(f"{name:>10} {c:>2} connection(s): {r['rps']:>6} requests/s  p50 {r['p50_ms']:.3f} ms  "
                  f"p99 {r['p99_ms']:.3f} ms  ({r['requests']} requests; other work on {r['other_cores']} cores; "
                  f"cores {r['cores']})", file=sys.stderr)
        out["index_size_after"] = json.loads(_get(port, "/healthz"))["index_size"]
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
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--shards", type=int, default=PARTITIONS, help="partitions of the topic, shards of the root")
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of load per connection count")
    ap.add_argument("--ingest-rate", type=float, default=1000.0, help="images/s a worker ingests meanwhile (0: none)")
    ap.add_argument("--workers", type=int, default=0, help="also run the batched server with this many processes")
    ap.add_argument("--no-reference", action="store_true", help="skip the unbatched server")
    ap.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (at most one per connection)")
    ap.add_argument("--server-env", nargs="+", default=[], metavar="KEY=VALUE",
                    help="settings for every server run, e.g. STREAMHASH_SERVER__BATCH_IN_LOOP=false")
    ap.add_argument("--json", action="store_true", help="end with one JSON line")
    ap.add_argument("--workdir", type=Path, help="kept afterwards (default: a temporary directory, removed)")
    args = ap.parse_args()
    WRK_THREADS[0] = args.wrk_threads
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt install wrk)", file=sys.stderr)
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    root = work / "index"
    try:
        shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        codes = build_store(root, args.items, args.bits, partitions=args.shards, topic=TOPIC)
        print(f"{args.items} items x {args.bits} bits in {args.shards} shards written in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
        bodies = work / "bodies.jsonl"
        rng = np.random.default_rng(1)
        bodies.write_text("".join(json.dumps({"code_hex": c.tobytes().hex(), "k": 10}) + "\n"
                                  for c in rng.integers(0, 256, (5000, args.bits // 8), dtype=np.uint8)))
        result: dict = {"items": args.items, "bits": args.bits, "shards": args.shards, "k": 10, "cpu": cpu_model(),
                        "cores": os.cpu_count(),
                        "duration_s": args.duration, "ingest_rate": args.ingest_rate, "wrk_threads": args.wrk_threads,
                        "kernel_ms_batch1": kernel_ms(root, codes)}
        common = dict(kv.split("=", 1) for kv in args.server_env)
        result["server_env"] = common
        configs = [("batch", common, [])]
        if not args.no_reference:
            configs.append(("nobatch", {**common, "STREAMHASH_SERVER__BATCH_ENABLED": "false"}, []))
        if args.workers > 1:
            configs.append((f"batch-w{args.workers}", common, ["--workers", str(args.workers)]))
        result["images_ingested_meanwhile"] = 0
        for name, env, serve_args in configs:
            # A fresh broker for each configuration: the embedded broker's (Tansu's memory storage) cost per
            # fetch grows with the record batches its log holds (0.06 -> 0.24 of a core over 3 minutes of
            # this ingest), so a later configuration would otherwise face a costlier ingest than the first.
            # The worker finds the new log behind its shards' offsets and consumes it from its start.
            with EmbeddedBroker(home=work / f"broker-{name}") as broker, \
                    ingesting(broker, root, work, args.ingest_rate, args.shards, prefix=f"live-{name}-") as ingest:
                pids = {"broker": broker.proc.pid, **({"worker": ingest.worker_pid} if ingest.worker_pid else {})}
                result[name] = run_config(name, env, root, work, args, bodies, serve_args, pids)
                print(f"{name:>10} resident memory (MiB): {result[name]['rss_mib']}", file=sys.stderr)
                result["images_ingested_meanwhile"] += ingest()
        result.update({k: v for k, v in result["batch"].items() if k.startswith(("rps_", "p50_", "p99_"))})
        result["overhead_ratio"] = round(result["p50_ms_1"] / result["kernel_ms_batch1"], 2) if "p50_ms_1" in result else None
        if "nobatch" in result:
            for c in args.connections:
                result[f"batch_vs_nobatch_rps_{c}"] = round(result["batch"][f"rps_{c}"] / result["nobatch"][f"rps_{c}"], 2)
        if args.json:
            print(json.dumps(result))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


@contextmanager
def ingesting(broker, root: Path, work: Path, rate: float, partitions: int, prefix: str = "live-"):
    """A worker over ``root`` ingesting synthetic PNG images (ids ``{prefix}{n}``) at ``rate``/s until the block ends; yields a
    function returning how many it indexed so far (its ``worker_pid``: the worker's pid, None without one)."""
    from streamhash.config import KafkaSettings
    from streamhash.kafka.produce import Outgoing, from_arrays, make_producer, send
    from streamhash.kafka.topics import ensure_topics
    from tests.conftest import synthetic_images

    if not rate:
        none = lambda: 0  # noqa: E731
        none.worker_pid = None
        yield none
        return
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic=TOPIC, group_id="bench-serve",
                          topic_partitions=partitions)
    ensure_topics(kafka)
    mport = free_port()
    env = {"STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers, "STREAMHASH_KAFKA__TOPIC": TOPIC,
           "STREAMHASH_KAFKA__GROUP_ID": "bench-serve", "STREAMHASH_STORE__PATH": str(root),
           "STREAMHASH_WORKER__METRICS_PORT": str(mport), "STREAMHASH_LOG_LEVEL": "WARNING"}
    worker = spawn(["worker"], env=env, log_path=work / "worker.log")
    url = f"http://127.0.0.1:{mport}/metrics"
    stop_feed = threading.Event()
    images, labels = synthetic_images(20_000, seed=3)

    # The producer stands for clients on other machines: its PNGs are encoded once, and it batches what it
    # sends for up to 50 ms (kafka-python's cost is per request: at 1,000 images/s and linger 10 ms it took
    # ~0.25 of a core here, at 50 ms ~0.1). Every image still gets an id of its own.
    pngs = [m.value for m in from_arrays(images, labels, prefix="")]

    def feed():
        producer = make_producer(kafka, linger_ms=50)
        start = 0
        while not stop_feed.is_set():
            batch = (Outgoing(f"{prefix}{start + i}", png, "image/png", int(labels[i])) for i, png in enumerate(pngs))
            send(producer, TOPIC, (m for m in batch if not stop_feed.is_set()), rate=rate, progress=False)
            start += len(pngs)
        producer.close()

    feeder = threading.Thread(target=feed, daemon=True)
    try:
        wait_http(url, 120, worker, work / "worker.log")
        wait_for(lambda: scrape(url).get("streamhash_assigned_partitions", 0) > 0, 60, "assignment")
        feeder.start()

        def indexed() -> int:
            return int(scrape(url).get("streamhash_items_indexed_total", 0))

        indexed.worker_pid = worker.pid
        yield indexed
    finally:
        stop_feed.set()
        feeder.join(timeout=30)
        stop(worker)


if __name__ == "__main__":
    raise SystemExit(main())
