"""Fault injection on real processes: exactly-once accounting after each fault.

    python benchmarks/bench_faults.py [--quick] [--faults broker_restart,kill9,...] [--json]

The embedded broker (Tansu), a worker (``python -m streamhash worker``) and a query server
(``python -m streamhash serve``) run as separate processes. Every fault produces items with unique
ids and known labels, injects the fault, lets the system settle, and then :func:`account` compares
what was produced with what the store holds (read in a fresh process) and what the dead-letter
topic holds:

- ``indexed``: produced valid ids present in the store;
- ``dead_lettered``: DISTINCT (source.topic, source.partition, source.offset) in the DLQ that we
  produced (``dead_lettered_raw``: DLQ records, duplicates included);
- ``lost``: produced messages neither in the store (by id) nor in the DLQ (by source offset);
- ``duplicated``: ingest writes beyond one per id (the store's seq counter minus the distinct ids
  minus the learner's code updates, which also take a seq) plus DLQ records for an offset already
  dead-lettered.

Faults (``--faults``, comma-separated; default all):

1. ``broker_restart``: the broker restarts on the same port (memory storage: the log starts again at 0);
   the messages produced after it must all be indexed.
2. ``kill9``: SIGKILL at random points, learning on with frequent rounds, a restart after each.
3. ``map_growth``: a 2 MiB initial LMDB map growing by 64 KiB steps (``MAP_GROWTH_FACTOR=1``) with
   learning on: hundreds of growths while the ingest path and the learner both write.
4. ``disk_full``: the store on a small tmpfs: the worker must exit 75 after retries, nothing lost;
   the store is then copied to a bigger place and a restart must index the rest exactly once.
5. ``poison``: decompression bombs, overflowing labels, truncated images, non-UTF-8 keys, empty
   and 20 MB values, unknown content types mixed into valid messages: all in the DLQ, the worker never exits.
6. ``second_worker``: a second worker joins the group on the same store root mid-stream (it takes
   some partitions and their shards) and leaves with SIGTERM (the first takes them back): nothing lost
   or written twice across both rebalances, the second exits 0 having indexed some.

Each fault reports ``ok`` plus its own details; the last line (``--json``) is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamhash.config import KafkaSettings  # noqa: E402
from streamhash.errors import EXIT_TEMPFAIL  # noqa: E402
from streamhash.kafka.broker import EmbeddedBroker, free_port  # noqa: E402
from streamhash.kafka.produce import from_arrays, make_producer  # noqa: E402
from streamhash.kafka.topics import ensure_topics  # noqa: E402
from streamhash.records import encode_png, message_headers  # noqa: E402
from streamhash.services.processes import scrape, spawn, stop, total, wait_for, wait_http  # noqa: E402
from tests.conftest import synthetic_images  # noqa: E402

SPAWNED: list[subprocess.Popen] = []  # every process started here: stopped after each fault, whatever happened


# ------------------------------------------------------------------------------------------ produce
@dataclass
class Ledger:
    """Every message produced: valid ones by id, all of them by (topic, partition, offset)."""

    valid: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # id -> where it landed
    poison: list[tuple[str, int, int]] = field(default_factory=list)
    poison_keys: dict[tuple[str, int, int], str] = field(default_factory=dict)  # where -> key, for reports
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0  # handed to the producer so far (the dicts above fill in once each send is acknowledged)


def produce(kafka: KafkaSettings, ledger: Ledger, messages, *, rate: float | None = None, valid: bool = True,
            producer=None) -> int:
    """Send ``(key, value, headers)`` messages (at up to ``rate``/s), record where each landed."""
    own = producer is None
    producer = producer or make_producer(kafka, max_request_size=32 << 20)
    futures, start = [], time.monotonic()
    for i, (key, value, headers) in enumerate(messages):
        if rate:
            ahead = start + i / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        futures.append((key, producer.send(kafka.topic, key=key, value=value, headers=headers)))
        ledger.sent += 1
    producer.flush()
    for key, fut in futures:
        md = fut.get(timeout=60)
        with ledger.lock:
            if valid:
                ledger.valid[key.decode()] = (md.topic, md.partition, md.offset)
            else:
                ledger.poison.append((md.topic, md.partition, md.offset))
                ledger.poison_keys[(md.topic, md.partition, md.offset)] = repr(key)[:40]
    if own:
        producer.close()
    return len(futures)


def valid_messages(n: int, prefix: str, seed: int = 0, start: int = 0):
    """Synthetic class-structured images (tests/conftest.py), unique ids, labels 0-9."""
    images, labels = synthetic_images(n, seed=seed)
    for out in from_arrays(images, labels, prefix=prefix, fmt="png", start=start):
        yield out.key.encode(), out.value, message_headers(out.labels, out.content_type)


# ------------------------------------------------------------------------------------------ read back
def read_store(path: Path) -> dict:
    """Ids, seq writes and learner code updates of every shard under a store root, read in a fresh process."""
    code = textwrap.dedent("""
        import json, sys
        from streamhash.index.store import Store
        from streamhash.index.store.root import StoreRoot
        root = StoreRoot(sys.argv[1], create=False)
        out = {"ids": [], "recoded": 0, "changes": 0, "next_seq": 1, "offsets": {}, "generations": {}, "model_versions": {}}
        for key in root.shards():
            s = Store(root.shard_path(key), readonly=True)
            def read(txn):
                ids, recoded = [], 0
                for k, v in txn.cursor(db=s.db["items"]):
                    ids.append(k.decode())
                    recoded += bool(json.loads(v).get("recoded"))
                return ids, recoded, txn.stat(s.db["changes"])["entries"]
            ids, recoded, changes = s._read(read)
            meta = s.read_meta()
            out["ids"] += ids
            out["recoded"] += recoded
            out["changes"] += changes
            out["next_seq"] += meta["next_seq"] - 1  # seq writes of all shards, as one counter
            out["generations"][str(key)] = meta["generation"]
            out["model_versions"][str(key)] = meta["model_version"]
            out["offsets"].update({f"{t}:{p}": o for (t, p), o in s.offsets().items()})
            s.close()
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return {"error": proc.stderr[-1500:], "ids": [], "recoded": 0, "changes": 0, "next_seq": 1, "offsets": {}}
    return json.loads(proc.stdout)


def read_dlq(kafka: KafkaSettings) -> list[dict]:
    """Every record of the DLQ topic: source.* and error.* headers."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(kafka.dlq_topic, **kafka.client_kwargs(), auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=6000, fetch_max_bytes=96 << 20,
                             max_partition_fetch_bytes=48 << 20)
    out = []
    try:
        for r in consumer:
            h = {k: v for k, v in (r.headers or [])}
            out.append({"topic": h.get("source.topic", b"").decode(errors="replace"),
                        "partition": int(h.get("source.partition", b"-1")), "offset": int(h.get("source.offset", b"-1")),
                        "stage": h.get("error.stage", b"").decode(errors="replace"),
                        "message": h.get("error.message", b"").decode(errors="replace")[:160]})
    finally:
        consumer.close()
    return out


# ------------------------------------------------------------------------------------------ accounting
def account(ledger: Ledger, store: dict, dlq: list[dict]) -> dict:
    """Exactly-once accounting of one run: the one function every fault (and the soak) reports with."""
    ids = set(store["ids"])
    in_dlq = [(d["topic"], d["partition"], d["offset"]) for d in dlq]
    dlq_set = set(in_dlq)
    valid_ids = set(ledger.valid)
    indexed = valid_ids & ids
    lost_valid = sorted(i for i, where in ledger.valid.items() if i not in ids and where not in dlq_set)
    lost_poison = [p for p in ledger.poison if p not in dlq_set]
    produced_offsets = set(ledger.valid.values()) | set(ledger.poison)
    seq_writes = int(store["next_seq"]) - 1
    # each learner code update (put_codes) also takes a seq; an item is updated at most once per round it is new in
    dup_writes = seq_writes - len(ids) - int(store.get("recoded", 0))
    dlq_dups = len([x for x in in_dlq if x in produced_offsets]) - len(dlq_set & produced_offsets)
    return {
        "produced": len(ledger.valid) + len(ledger.poison), "produced_valid": len(ledger.valid),
        "produced_poison": len(ledger.poison), "indexed": len(indexed),
        "dead_lettered": len(dlq_set & produced_offsets), "dead_lettered_raw": len(in_dlq),
        "valid_dead_lettered": len(set(ledger.valid.values()) & dlq_set),
        "lost": len(lost_valid) + len(lost_poison), "lost_sample": (lost_valid[:5] + [list(p) for p in lost_poison[:5]]),
        "duplicated": max(dup_writes, 0) + dlq_dups, "duplicated_writes": dup_writes, "dlq_duplicates": dlq_dups,
        "store_seq_writes": seq_writes, "store_recoded": int(store.get("recoded", 0)),
        "unexpected_ids": len(ids - valid_ids), "store_error": store.get("error"),
        "offsets_sum": sum(store.get("offsets", {}).values()),
    }


# ------------------------------------------------------------------------------------------ processes
class Rig:
    """One fault's topic, group, store, worker(s) and query server; logs under ``work``."""

    def __init__(self, broker: EmbeddedBroker, work: Path, name: str, *, learn: bool = False, env: dict | None = None):
        tag = uuid.uuid4().hex[:6]
        self.broker, self.work, self.name = broker, work / name, name
        self.work.mkdir(parents=True, exist_ok=True)
        self.kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic=f"{name}-{tag}",
                                   dlq_topic=f"{name}-{tag}.dlq", group_id=f"{name}-{tag}")
        ensure_topics(self.kafka)
        self.store = self.work / "index"
        self.env = {
            "STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers, "STREAMHASH_KAFKA__TOPIC": self.kafka.topic,
            "STREAMHASH_KAFKA__DLQ_TOPIC": self.kafka.dlq_topic, "STREAMHASH_KAFKA__GROUP_ID": self.kafka.group_id,
            "STREAMHASH_STORE__PATH": str(self.store), "STREAMHASH_WORKER__METRICS_PORT": str(free_port()),
            "STREAMHASH_SERVER__PORT": str(free_port()), "STREAMHASH_LEARN__METRICS_PORT": str(free_port()),
            "STREAMHASH_LEARN__ROUND_EVERY": "300", "STREAMHASH_LEARN__OMEGA": "500", "STREAMHASH_LEARN__EPOCHS": "1",
            "STREAMHASH_LOG_LEVEL": "INFO", **(env or {}),
        }
        self.ledger = Ledger()
        self.worker: subprocess.Popen | None = None
        self.server: subprocess.Popen | None = None
        self.learn = learn  # a learner process beside the worker (started with the query server)
        self.learner: subprocess.Popen | None = None
        self.starts = 0
        self.exits: list[int] = []  # exit codes of worker runs that ended on their own

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.env['STREAMHASH_WORKER__METRICS_PORT']}/metrics"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.env['STREAMHASH_SERVER__PORT']}"

    def log(self, what: str) -> Path:
        return self.work / f"{what}.log"

    def start_worker(self, *, wait: bool = True, timeout: float = 120) -> subprocess.Popen:
        self.starts += 1
        self.worker = spawn(["worker"], env=self.env, log_path=self.log("worker"))
        SPAWNED.append(self.worker)
        if wait:
            wait_http(self.metrics_url, timeout, self.worker, self.log("worker"))
            def assigned():
                if self.worker.poll() is not None:
                    raise RuntimeError(f"worker exited with {self.worker.returncode} before partition assignment: "
                                       f"{log_excerpt(self.log('worker'), 3)}")
                return self.metric("streamhash_assigned_partitions") > 0

            wait_for(assigned, timeout, "partition assignment", 0.2)
        return self.worker

    def start_server(self, timeout: float = 120) -> None:
        wait_for(lambda: (self.store / "streamhash-root.json").exists(), 60, "the store root to exist", 0.2)
        self.server = spawn(["serve"], env=self.env, log_path=self.log("serve"))
        SPAWNED.append(self.server)
        wait_http(f"{self.base}/healthz", timeout, self.server, self.log("serve"))
        if self.learn and self.learner is None:
            self.learner = spawn(["learner"], env=self.env, log_path=self.log("learner"))
            SPAWNED.append(self.learner)
            wait_http(self.learner_url, timeout, self.learner, self.log("learner"))

    @property
    def learner_url(self) -> str:
        return f"http://127.0.0.1:{self.env['STREAMHASH_LEARN__METRICS_PORT']}/metrics"

    def learner_metric(self, name: str, default: float = 0.0) -> float:
        try:
            return total(scrape(self.learner_url), name)
        except (httpx.HTTPError, OSError):
            return default

    def metric(self, name: str, default: float = 0.0) -> float:
        try:
            return total(scrape(self.metrics_url), name)
        except (httpx.HTTPError, OSError):
            return default

    def kill9(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait()

    def settle(self, want: int, timeout: float, quiet_s: float = 20.0) -> dict:
        """Wait until the worker holds ``want`` items with no lag, or shows no progress (lag 0, or
        stuck) for ``quiet_s``, or exits, or ``timeout``. Says which."""
        deadline, last, last_change = time.monotonic() + timeout, None, time.monotonic()
        while time.monotonic() < deadline:
            if self.worker.poll() is not None:
                return {"settled": "worker_exited", "exit_code": self.worker.returncode}
            try:
                s = scrape(self.metrics_url)
            except (httpx.HTTPError, OSError):
                time.sleep(0.5)
                continue
            items = s.get('streamhash_index_items{process="worker"}', 0)
            lag = s.get("streamhash_consumer_lag_messages", 0)
            state = (items, lag, total(s, "streamhash_messages_consumed_total"))
            if items >= want and lag == 0:
                return {"settled": "complete", "seconds_left": round(deadline - time.monotonic())}
            if state != last:
                last, last_change = state, time.monotonic()
            elif time.monotonic() - last_change > quiet_s:
                return {"settled": "no_progress" if lag else "short", "worker_items": items, "lag": lag}
            time.sleep(0.5)
        return {"settled": "timeout", "worker_items": last[0] if last else None, "lag": last[1] if last else None}

    def health(self, want: int) -> dict:
        """Worker alive with metrics, query server answering /search with the full index."""
        out = {"worker_alive": self.worker is not None and self.worker.poll() is None}
        try:
            s = scrape(self.metrics_url)
            out["worker_metrics"] = True
            out["replayed"] = s.get("streamhash_messages_replayed_total", 0)
        except (httpx.HTTPError, OSError):
            out["worker_metrics"] = False
        if self.server is None or self.server.poll() is not None:
            out.update(server_alive=False, serving=False)
            return out
        out["server_alive"] = True
        try:
            wait_for(lambda: httpx.get(f"{self.base}/healthz", timeout=5).json()["index_size"] >= want, 30,
                     "the query index to load", 0.5)
        except (TimeoutError, httpx.HTTPError):
            pass
        try:
            size = httpx.get(f"{self.base}/healthz", timeout=5).json()["index_size"]
            r = httpx.post(f"{self.base}/search", json={"code_hex": "00" * 4, "k": 5}, timeout=10)
            out.update(healthz_index_size=size, search_status=r.status_code, serving=r.status_code == 200 and size == want)
        except httpx.HTTPError as exc:
            out.update(serving=False, server_error=repr(exc))
        return out

    def finish(self, extra: dict, *, want_exit: int = 0) -> dict:
        """Health check, SIGTERM everything, read store and DLQ, account."""
        health = self.health(len(self.ledger.valid))
        code = stop(self.worker, 30) if self.worker is not None else None
        if self.server is not None:
            stop(self.server)
        learner_code = stop(self.learner, 30) if self.learner is not None else None
        acc = account(self.ledger, read_store(self.store), read_dlq(self.kafka))
        out = {**acc, **health, "worker_exit_on_sigterm": code, "learner_exit_on_sigterm": learner_code,
               "worker_starts": self.starts,
               "unplanned_worker_exits": self.exits, **extra}
        out["ok"] = bool(acc["lost"] == 0 and acc["duplicated"] == 0 and acc["indexed"] == acc["produced_valid"]
                         and acc["dead_lettered"] == acc["produced_poison"] and not acc["store_error"]
                         and health.get("worker_alive") and health.get("serving") and code == want_exit
                         and learner_code in (None, 0)
                         and out.get("ok", True))
        if not out["ok"]:
            out["worker_log_tail"] = log_excerpt(self.log("worker"))
        return out


def log_excerpt(path: Path, n: int = 12) -> list[str]:
    """The last warning/error lines (tracebacks included) of a log."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    keep = [ln for ln in lines if any(w in ln for w in ("ERROR", "WARNING", "Error", "Traceback", "exit", "lock", "refus", "resum", "reset"))]
    return [ln[:300] for ln in (keep or lines)[-n:]]


# ------------------------------------------------------------------------------------------ faults
def fault_broker_restart(broker, work, q) -> dict:
    n1, n2 = (300, 300) if q else (2000, 2000)
    rig = Rig(broker, work, "broker_restart")
    rig.start_worker()
    rig.start_server()
    produce(rig.kafka, rig.ledger, valid_messages(n1, "br-a-", seed=1))
    first = rig.settle(n1, 120)
    broker.stop()
    t = time.monotonic()
    broker.start()
    restart_s = time.monotonic() - t
    ensure_topics(rig.kafka)
    produce(rig.kafka, rig.ledger, valid_messages(n2, "br-b-", seed=2))
    after = rig.settle(n1 + n2, 180, quiet_s=45)
    # the DLQ was in the old (lost) log too; no poison is produced here, so it stays empty
    return rig.finish({"before_restart": first, "after_restart": after, "broker_restart_s": round(restart_s, 2)})


def fault_kill9(broker, work, q) -> dict:
    kills, rate = (5, 60.0) if q else (20, 60.0)
    rig = Rig(broker, work, "kill9", learn=True, env={"STREAMHASH_KAFKA__MAX_POLL_RECORDS": "100"})
    rng, done = random.Random(0), threading.Event()

    def stream():  # produce for as long as the kills go on, so every kill lands in a live stream
        for msg in valid_messages(100_000, "k9-", seed=3):
            if done.is_set():
                return
            yield msg

    producer = threading.Thread(target=produce, args=(rig.kafka, rig.ledger, stream()), kwargs={"rate": rate}, daemon=True)
    producer.start()
    rig.start_worker()
    rig.start_server()
    points = []
    for i in range(kills):
        time.sleep(rng.uniform(0.2, 6.0))
        if rig.worker.poll() is not None:
            rig.exits.append(rig.worker.returncode)
        points.append({"items": rig.metric('streamhash_index_items{process="worker"}'),
                       "rounds": rig.learner_metric("streamhash_learning_rounds_total")})
        rig.kill9()
        if i < kills - 1:
            try:  # one restart in five is killed again before it is even assigned partitions
                rig.start_worker(wait=rng.random() < 0.8)
            except (TimeoutError, RuntimeError) as exc:
                points[-1]["restart_error"] = str(exc)[:300]
    done.set()
    producer.join()
    rig.start_worker()
    settled = rig.settle(len(rig.ledger.valid), 300, quiet_s=30)
    return rig.finish({"kills": kills, "killed_at": points, "settled": settled,
                       "learning_rounds": rig.learner_metric("streamhash_learning_rounds_total"),
                       "reencodes": rig.learner_metric("streamhash_reencode_triggers_total")})


def fault_map_growth(broker, work, q) -> dict:
    n = 2500 if q else 8000
    rig = Rig(broker, work, "map_growth", learn=True, env={"STREAMHASH_STORE__INITIAL_MAP_SIZE_BYTES": str(2 << 20),
                                                           "STREAMHASH_STORE__MAP_GROWTH_FACTOR": "1.0",
                                                           "STREAMHASH_KAFKA__MAX_POLL_RECORDS": "200"})
    rig.start_worker()
    rig.start_server()
    produce(rig.kafka, rig.ledger, valid_messages(n, "mg-", seed=4), rate=400)
    settled = rig.settle(n, 300, quiet_s=60)
    log = rig.log("worker").read_text(errors="replace")
    extra = {"settled": settled, "map_grows": log.count("growing LMDB map"),
             "learning_rounds": rig.learner_metric("streamhash_learning_rounds_total"),
             "reencodes": rig.learner_metric("streamhash_reencode_triggers_total")}
    if settled["settled"] == "no_progress":  # a deadlock: SIGTERM may not even stop it
        extra["ok"] = False
    return rig.finish(extra)


def fault_disk_full(broker, work, q) -> dict:
    size_mb, n = (6, 8000) if q else (20, 24000)
    mnt = work / "disk_full" / "tmpfs"
    mnt.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        return {"skipped": f"cannot mount tmpfs: {r.stderr.strip() or r.returncode}", "ok": None}
    try:
        rig = Rig(broker, work, "disk_full", env={"STREAMHASH_WORKER__WRITE_ATTEMPTS": "3",
                                                  "STREAMHASH_KAFKA__MAX_POLL_RECORDS": "200"})
        rig.store = mnt / "index"
        rig.env["STREAMHASH_STORE__PATH"] = str(rig.store)
        produce(rig.kafka, rig.ledger, valid_messages(n, "df-", seed=5))
        rig.start_worker()
        rig.start_server()
        try:
            code = rig.worker.wait(timeout=300)
        except subprocess.TimeoutExpired:
            code = None
        log = rig.log("worker").read_text(errors="replace")
        partial = read_store(rig.store)
        first = {"exit_code": code, "retries_logged": log.count("store full; retrying"),
                 "nothing_lost_logged": "Nothing was lost" in log, "indexed_before_restart": len(partial["ids"]),
                 "tmpfs_mb": size_mb, "partial_store_error": partial.get("error")}
        if code is None:
            rig.kill9()
        stop(rig.server)
        rig.server = None
        bigger = rig.work / "index-moved"  # the "bigger disk": copy the store off the full tmpfs
        shutil.copytree(rig.store, bigger)
        rig.store = bigger
        rig.env["STREAMHASH_STORE__PATH"] = str(bigger)
        rig.start_worker()
        rig.start_server()
        settled = rig.settle(n, 300)
        out = rig.finish({"first_run": first, "settled": settled})
        out["ok"] = bool(out["ok"] and code == EXIT_TEMPFAIL and 0 < first["indexed_before_restart"] < n)
        return out
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = 30000, full: bool = False) -> bytes:
    """A gray PNG whose IHDR says side x side. ``full``: the IDAT really inflates to side*(side+1) bytes
    (about 900 MB from under 1 MB); otherwise just a few rows."""
    comp = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    rows = side if full else 4
    parts, chunk = [], row * 64
    for _ in range(rows // 64):
        parts.append(comp.compress(chunk))
    parts.append(comp.compress(row * (rows % 64)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"".join(parts)) + png_chunk(b"IEND", b"")


def jpeg_declaring(side: int = 60000) -> bytes:
    """A real 28x28 JPEG with its SOF0 height and width patched to ``side``."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def poison_messages() -> list[tuple[bytes | None, bytes, list]]:
    good = encode_png(np.full((28, 28), 7, np.uint8))
    png, npy = [("content-type", b"image/png"), ("labels", b"1")], [("labels", b"1")]
    return [
        (b"p-bomb-png-tiny", png_bomb(30000), png),
        (b"p-bomb-png-full", png_bomb(30000, full=True), png),
        (b"p-bomb-png-sniffed", png_bomb(30000), npy),
        (b"p-bomb-jpeg", jpeg_declaring(60000), [("content-type", b"image/jpeg"), ("labels", b"2")]),
        (b"p-labels-overflow", good, [("content-type", b"image/png"), ("labels", b"99999999999999999999")]),
        (b"p-truncated-png", good[: len(good) // 2], png),
        (b"p-truncated-png-header", good[:20], png),
        (b"\xff\xfe\xfd-not-utf8", good, png),
        (b"p-empty", b"", png),
        (b"p-20mb", b"\x89PNG\r\n\x1a\n" + os.urandom(20 << 20), png),
        (b"p-unknown-ctype", good, [("content-type", b"image/webp"), ("labels", b"1")]),
        (b"p-labels-non-utf8", good, [("content-type", b"image/png"), ("labels", b"\xff\xfe")]),
    ]


def fault_poison(broker, work, q) -> dict:
    n = 400 if q else 2000
    rig = Rig(broker, work, "poison", learn=True)
    rig.start_worker()
    rig.start_server()
    poison = poison_messages()
    produce(rig.kafka, rig.ledger, valid_messages(n // 2, "po-", seed=6))
    produce(rig.kafka, rig.ledger, poison, valid=False)
    produce(rig.kafka, rig.ledger, valid_messages(n - n // 2, "po-", seed=7, start=n // 2))
    settled = rig.settle(n, 240, quiet_s=30)
    if rig.worker.poll() is not None:
        rig.exits.append(rig.worker.returncode)
    dlq = {(d["topic"], d["partition"], d["offset"]): f'{d["stage"]}: {d["message"][:90]}' for d in read_dlq(rig.kafka)}
    fate = {key: dlq.get(where, "NOT IN DLQ") for where, key in rig.ledger.poison_keys.items()}
    out = rig.finish({"settled": settled, "poison_kinds": len(poison), "poison_fate": fate})
    out["ok"] = bool(out["ok"] and not rig.exits and rig.starts == 1)
    out["worker_restarts"] = rig.starts - 1 + len(rig.exits)
    return out


def fault_second_worker(broker, work, q) -> dict:
    """A second worker joins the group on the same store root mid-stream, then leaves (SIGTERM): two
    rebalances, shards handed over both ways (its lock waits while the first finishes a batch)."""
    n = 400 if q else 2000
    rig = Rig(broker, work, "second_worker")
    rig.start_worker()
    rig.start_server()
    produce(rig.kafka, rig.ledger, valid_messages(n, "sw-a-", seed=8))
    rig.settle(n, 120)
    env2 = {**rig.env, "STREAMHASH_WORKER__METRICS_PORT": str(free_port())}
    second = spawn(["worker"], env=env2, log_path=rig.log("worker2"))
    SPAWNED.append(second)
    url2 = f"http://127.0.0.1:{env2['STREAMHASH_WORKER__METRICS_PORT']}/metrics"
    wait_http(url2, 120, second, rig.log("worker2"))
    wait_for(lambda: scrape(url2).get("streamhash_assigned_partitions", 0) > 0, 60, "the second worker's partitions")
    produce(rig.kafka, rig.ledger, valid_messages(n, "sw-b-", seed=9, start=n), rate=200)
    second_items = total(scrape(url2), "streamhash_items_indexed_total")
    code2 = stop(second, 30)
    produce(rig.kafka, rig.ledger, valid_messages(n, "sw-c-", seed=10, start=2 * n))
    settled = rig.settle(3 * n, 180)
    out = rig.finish({"second_exit_code": code2, "second_indexed": second_items, "settled": settled,
                      "second_log_tail": log_excerpt(rig.log("worker2"), 4)})
    out["ok"] = bool(out["ok"] and code2 == 0 and second_items > 0)
    return out


FAULTS = {"broker_restart": fault_broker_restart, "kill9": fault_kill9, "map_growth": fault_map_growth,
          "disk_full": fault_disk_full, "poison": fault_poison, "second_worker": fault_second_worker}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small N, fewer kills")
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, from {','.join(FAULTS)}")
    ap.add_argument("--json", action="store_true", help="only the JSON line on stdout")
    ap.add_argument("--workdir", type=Path, default=None, help="logs and stores (default: a temp dir, kept)")
    args = ap.parse_args()
    chosen = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = set(chosen) - set(FAULTS)
    if unknown:
        ap.error(f"unknown faults {sorted(unknown)}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="streamhash-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    broker = EmbeddedBroker(home=work / "broker").start()
    try:
        for name in chosen:
            t = time.monotonic()
            if not args.json:
                print(f"== {name}", file=sys.stderr, flush=True)
            try:
                res = FAULTS[name](broker, work, args.quick)
            except Exception as exc:  # a harness failure is a result too; go on with the next fault
                import traceback

                res = {"ok": False, "harness_error": repr(exc), "traceback": traceback.format_exc()[-1500:]}
                if broker.proc is None or broker.proc.poll() is not None:
                    broker.stop()
                    broker.start()
            finally:
                while SPAWNED:
                    stop(SPAWNED.pop(), 10)
            res["seconds"] = round(time.monotonic() - t, 1)
            results[name] = res
            if not args.json:
                print(json.dumps({name: res}), file=sys.stderr, flush=True)
    finally:
        while SPAWNED:
            stop(SPAWNED.pop(), 10)
        broker.stop()
    summary = {"bench": "faults", "quick": args.quick, "workdir": str(work),
               "failed": [k for k, v in results.items() if v.get("ok") is False],
               "skipped": [k for k, v in results.items() if v.get("ok") is None], "faults": results}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
