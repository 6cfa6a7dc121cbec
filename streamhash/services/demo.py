"""``streamhash demo``: the whole system on the embedded broker, with Fashion-MNIST.

Starts Tansu (unless ``STREAMHASH_KAFKA__BOOTSTRAP_SERVERS`` names a cluster), a worker, the learner
(``streamhash learner``, unless ``STREAMHASH_LEARN__ENABLED=false``) and the query server as separate
processes, streams ``--limit`` images plus a handful of malformed messages as fast as the producer goes
(the ingest rate, with the learner training beside the worker), then measures freshness with single
probe images sent 20 per second (send -> visible in the query server), queries with held-out images,
lets the learner finish learning the stream (within :data:`LEARN_BUDGET_S`: a busy machine gets a summary
that says how far it got, not a wait of minutes) and queries again, and prints a summary (``--json``: the
same as one JSON object on the last line). While it waits it prints a line at least every
:data:`PROGRESS_EVERY_S` seconds saying what for (items indexed, rounds done, codes learned).

Protocol: the stream is the first ``--limit`` images of a seeded shuffle of the 60,000 training
images, a quarter of them sent unlabeled (indexed with inferred codes, never learned from) and every image of
:data:`LATE_CLASS` held back to the end of the stream (a class arriving late: what the MI re-encode test is for);
queries are ``--queries`` images drawn from the 10,000 test images, which are never
indexed; precision@10 counts returned items whose true class (the dataset's label, also for an item sent
unlabeled) equals the query's. It is measured twice: once
the stream is indexed (with the model the shards had then) and once every labeled item of the stream
is learned (each code published by the learner, every shard at the learner's last model version).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from streamhash.config import Settings, setup_logging
from streamhash.data.fashion_mnist import CLASSES, load_split
from streamhash.errors import EXIT_DATASET_MISSING, EXIT_UNAVAILABLE, DatasetMissingError
from streamhash.kafka.broker import EmbeddedBroker, free_port
from streamhash.kafka.produce import from_arrays, make_producer, send
from streamhash.kafka.topics import ensure_topics
from streamhash.records import encode_npy, encode_png, message_headers
from streamhash.services import processes
from streamhash.services.processes import ScrapeFailed, spawn, stop, total, wait_for, wait_http

# One metrics scrape of a learner in a round on a loaded machine once took over 5 s and ended the demo with
# a traceback: each scrape is asked again until this deadline, then the demo stops with one line.
SCRAPE_DEADLINE_S = 60.0


def scrape(url: str) -> dict[str, float]:
    return processes.scrape(url, deadline_s=SCRAPE_DEADLINE_S)

# (key, value, headers, stage the worker must report): one per rejection reason of the contract.
MALFORMED = [
    (b"bad-bytes", b"this is not an image", [("content-type", b"image/png")], "decode"),
    (b"bad-empty", b"", [("content-type", b"image/png")], "value"),
    (None, encode_png(np.zeros((28, 28), np.uint8)), [("labels", b"1")], "key"),
    (b"k" * 300, encode_png(np.zeros((28, 28), np.uint8)), [], "key"),
    (b"bad-shape", encode_png(np.zeros((30, 30), np.uint8)), [("labels", b"1")], "shape"),
    (b"bad-channels", encode_npy(np.zeros((28, 28, 3), np.uint8)), [("labels", b"1")], "shape"),
    (b"bad-labels", encode_png(np.zeros((28, 28), np.uint8)), [("labels", b"1,-2")], "headers"),
    (b"bad-ctype", encode_png(np.zeros((28, 28), np.uint8)), [("content-type", b"image/gif")], "headers"),
]


UNLABELED_SHARE = 0.25  # of the stream, sent without a labels header
LATE_CLASS = 9  # Ankle boot: every one of its images comes after all the others
LEARN_BUDGET_S = 120.0  # the longest the demo waits for learning: `make demo` ends in ~3 min even on a busy machine
PROGRESS_EVERY_S = 3.0  # a progress line at least this often while waiting (with the checks' own time, < 5 s)


class Progress:
    """Lines saying what the demo waits for: :meth:`say` sets the current text (printed at once when forced, else
    when :data:`PROGRESS_EVERY_S` passed since the last line); a ticker thread repeats it while nothing else is
    said, so a wait inside a call that says nothing (a process starting) still shows."""

    def __init__(self, quiet: bool):
        self.quiet, self.t0, self.last, self.text = quiet, time.monotonic(), float("-inf"), ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def say(self, text: str, force: bool = False) -> None:
        with self._lock:
            self.text = text
            if not self.quiet and (force or time.monotonic() - self.last >= PROGRESS_EVERY_S):
                self._print()

    def _print(self) -> None:
        self.last = time.monotonic()
        print(f"[{self.last - self.t0:4.0f} s] {self.text}", flush=True)

    def start(self) -> Progress:
        if not self.quiet:
            self._thread = threading.Thread(target=self._tick, name="demo-progress", daemon=True)
            self._thread.start()
        return self

    def _tick(self) -> None:
        while not self._stop.wait(0.25):
            with self._lock:
                if self.text and time.monotonic() - self.last >= PROGRESS_EVERY_S:
                    self._print()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


def stream_order(labels: np.ndarray, seed: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` of a seeded shuffle of the training images, :data:`LATE_CLASS` moved to the end, and
    which of them are sent unlabeled (a seeded :data:`UNLABELED_SHARE`)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))[:limit]
    order = np.concatenate([order[labels[order] != LATE_CLASS], order[labels[order] == LATE_CLASS]])
    return order, rng.random(len(order)) < UNLABELED_SHARE


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None


def probe_freshness(producer, topic: str, server: str, images: np.ndarray, labels: np.ndarray, *,
                    interval: float = 0.05, timeout: float = 10.0, first: int = 0) -> list[dict]:
    """Send probe images one at a time; each row times one from send (seconds): ``acked`` (the broker's
    acknowledgement), ``committed`` (the worker's LMDB commit: ``GET /items`` finds it in the store) and
    ``visible`` (in the query server's index), with ``at`` (when it was sent, wall clock). A probe not
    visible within ``timeout`` has no row. Ids are ``probe-{first}``, ``probe-{first + 1}``...: a later
    call passes on ``first`` so that it never re-sends an id already visible."""
    rows = []
    with httpx.Client(timeout=5) as client:
        for i, (img, lab) in enumerate(zip(images, labels), start=first):
            item_id = f"probe-{i}"
            sent = time.time()
            producer.send(topic, key=item_id.encode(), value=encode_png(img), headers=message_headers(int(lab), "image/png"))
            producer.flush()
            row = {"at": sent, "acked": time.time() - sent}
            while time.time() - sent < timeout:
                r = client.get(f"{server}/items/{item_id}")
                if r.status_code == 200:
                    row.setdefault("committed", time.time() - sent)
                    if r.json()["visible"]:
                        row["visible"] = time.time() - sent
                        rows.append(row)
                        break
                time.sleep(0.002)
            time.sleep(interval)
    return rows


def measure_freshness(producer, topic: str, server: str, images: np.ndarray, labels: np.ndarray, **kw) -> list[float]:
    """Seconds from send to visible in the query server, per probe (:func:`probe_freshness`)."""
    return [row["visible"] for row in probe_freshness(producer, topic, server, images, labels, **kw)]


def precision_at_10(server: str, images: np.ndarray, labels: np.ndarray,
                    truth: dict[str, int] | None = None) -> tuple[float, list[float]]:
    """Mean precision@10 of HTTP searches with these images, and each search's latency (seconds). ``truth``: each
    stored id's true class (an item sent unlabeled has one too); without it, a hit's own labels."""
    hits, latencies = [], []
    with httpx.Client(timeout=30) as client:
        for img, lab in zip(images, labels):
            body = {"image_base64": base64.b64encode(encode_png(img)).decode(), "k": 10}
            t = time.perf_counter()
            r = client.post(f"{server}/search", json=body)
            latencies.append(time.perf_counter() - t)
            r.raise_for_status()
            results = r.json()["results"]
            if truth is None:
                hits.append(np.mean([h["labels"] == [int(lab)] for h in results]))
            else:
                hits.append(np.mean([truth.get(h["id"]) == int(lab) for h in results]))
    return float(np.mean(hits)), latencies


def wait_for_learning(learner, learner_url: str, server: str, expected_codes: int, timeout: float,
                      progress: Progress | None = None, round_every: int = 2000) -> dict:
    """Until the learner has published a code for each of ``expected_codes`` items and every shard serves
    its last model, or ``timeout`` (the demo's learning budget) has passed: returns ``complete``, ``codes``
    (learned codes published), ``rounds`` and ``version``. SIGUSR1 now and then: the last partial round need
    not wait for ``round_max_age_s``."""
    asked = [0.0]
    state = {"complete": False, "codes": 0, "rounds": 0, "version": 1}
    say = progress.say if progress is not None else (lambda *_a, **_k: None)

    def learned() -> bool:
        if learner.poll() is not None:
            raise RuntimeError(f"the learner exited with {learner.returncode} (see learner.log in the demo's workdir)")
        s = scrape(learner_url)
        version = int(s.get("streamhash_learner_published_model_version", 1))
        state.update(codes=int(s.get("streamhash_learned_codes_published_total", 0)), version=version,
                     rounds=int(s.get("streamhash_learning_rounds_total", 0)))
        if state["codes"] < expected_codes:
            if time.monotonic() - asked[0] > 10:
                learner.send_signal(signal.SIGUSR1)
                asked[0] = time.monotonic()
            say(f"learning: {state['rounds']} round(s) done (model v{version}), {state['codes']} of {expected_codes} "
                f"labeled items learned; waiting for the learner's next round (due every {round_every} labeled "
                f"items, or asked for now) [budget {timeout:.0f} s]")
            return False
        shards = httpx.get(f"{server}/healthz").json().get("shards") or [{"model_version": 0}]
        behind = sum(sh["model_version"] < version for sh in shards)
        if behind:
            say(f"learning: every labeled item learned (model v{version}); waiting for {behind} shard(s) to serve it")
            return False
        state["complete"] = True
        return True

    try:
        wait_for(learned, timeout, "the learner to learn every labeled item of the stream", interval=0.5)
    except TimeoutError:
        say(f"learning budget of {timeout:.0f} s spent: summarizing what was learned so far", force=True)
    return state


def run_demo(settings: Settings, *, limit: int, queries: int, workdir: Path, keep_running: bool, quiet: bool,
             probes: int = 50) -> dict:
    progress = Progress(quiet).start()
    train_x, train_y = load_split("train", settings.data.fashion_mnist_dir)
    test_x, test_y = load_split("test", settings.data.fashion_mnist_dir)
    order, unlabeled = stream_order(train_y, settings.model.seed, limit)
    stream_labels = [None if u else int(y) for u, y in zip(unlabeled, train_y[order])]
    n_labeled = int((~unlabeled).sum())
    q_idx = np.random.default_rng(settings.model.seed + 1).choice(len(test_x), size=queries, replace=False)

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    broker = None
    if not settings.kafka.bootstrap_servers:
        broker = EmbeddedBroker(home=workdir).start()
        settings.kafka.bootstrap_servers = broker.bootstrap_servers
    ensure_topics(settings.kafka)
    worker_metrics, learner_metrics, http_port = free_port(), free_port(), free_port()
    server = f"http://127.0.0.1:{http_port}"
    env = {"STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
           "STREAMHASH_STORE__PATH": str(workdir / "index"), "STREAMHASH_WORKER__METRICS_PORT": str(worker_metrics),
           "STREAMHASH_SERVER__PORT": str(http_port), "STREAMHASH_MODEL__BITS": str(settings.model.bits),
           "STREAMHASH_LEARN__METRICS_PORT": str(learner_metrics), "STREAMHASH_DATA__CLASS_NAMES": "fashion-mnist",
           # not niced (unless asked): the demo waits for its rounds, and niced at 10 beside other work on 2 cores a
           # 9 s round took over 140 s; ingestion here is a few seconds and shares the cores for those only
           "STREAMHASH_LEARN__NICE": os.environ.get("STREAMHASH_LEARN__NICE", "0")}
    learner_url = f"http://127.0.0.1:{learner_metrics}/metrics"
    procs = []
    try:
        progress.say("starting the worker, the learner and the query server (each loads torch: a few seconds)", force=True)
        worker = spawn(["worker"], env=env, log_path=workdir / "worker.log")
        procs.append(worker)
        wait_http(f"http://127.0.0.1:{worker_metrics}/metrics", 120, worker, workdir / "worker.log")
        learner = None
        if settings.learn.enabled:  # its own process (niced outside the demo: ingestion keeps the cores)
            learner = spawn(["learner"], env=env, log_path=workdir / "learner.log")
            procs.append(learner)
            wait_http(learner_url, 120, learner, workdir / "learner.log")
        srv = spawn(["serve"], env=env, log_path=workdir / "serve.log")
        procs.append(srv)
        wait_http(f"{server}/healthz", 120, srv, workdir / "serve.log")

        worker_url = f"http://127.0.0.1:{worker_metrics}/metrics"
        wait_for(lambda: scrape(worker_url).get("streamhash_assigned_partitions", 0) > 0, 60, "the worker to join its group")

        # Phase 1, bulk load: as fast as the producer goes; the rate is first send -> last commit.
        progress.say(f"streaming {limit} images ({n_labeled} labeled) and {len(MALFORMED)} malformed messages", force=True)
        producer = make_producer(settings.kafka)
        t0 = time.time()
        messages = from_arrays(train_x[order], stream_labels, prefix="fmnist-train-")
        truth = {f"fmnist-train-{i}": int(y) for i, y in enumerate(train_y[order])}  # sent unlabeled or not
        produced = send(producer, settings.kafka.topic, messages, progress=not quiet, total=limit)
        for key, value, headers, _ in MALFORMED:
            producer.send(settings.kafka.topic, key=key, value=value, headers=headers)
        producer.flush()
        counts = {}

        def all_in() -> bool:
            s = scrape(worker_url)
            counts["indexed"] = s.get("streamhash_items_indexed_total", 0)
            counts["dead"] = total(s, "streamhash_messages_dead_lettered_total")
            progress.say(f"indexing: {counts['indexed']:.0f} of {produced} images indexed, {counts['dead']:.0f} of "
                         f"{len(MALFORMED)} malformed messages dead-lettered")
            return counts["indexed"] >= produced and counts["dead"] >= len(MALFORMED)

        wait_for(all_in, 120 + limit / 500, "every message to be indexed or dead-lettered")
        t_indexed = time.time()
        indexed, dead = counts["indexed"], counts["dead"]
        wait_for(lambda: httpx.get(f"{server}/healthz").json()["index_size"] >= produced, 30, "the query index to catch up")

        # Phase 2, freshness: single probe images (not in the stream) sent 20 per second.
        spare = np.random.default_rng(settings.model.seed + 2).permutation(np.setdiff1d(np.arange(len(train_x)), order))[:probes]
        progress.say(f"freshness: {probes} single probe images, 20 a second, each timed from send to searchable", force=True)
        delays = measure_freshness(producer, settings.kafka.topic, server, train_x[spare], train_y[spare])
        producer.close()
        truth.update({f"probe-{i}": int(y) for i, y in enumerate(train_y[spare])})

        progress.say(f"precision@10: {queries} searches by held-out test images", force=True)
        p10_indexed, latencies = precision_at_10(server, test_x[q_idx], test_y[q_idx], truth)
        version_indexed = httpx.get(f"{server}/healthz").json()["model_version"]
        p10, latencies_learned = p10_indexed, []
        learning = {"complete": False, "codes": 0, "rounds": 0, "version": 1}
        if learner is not None:
            # every labeled item of the stream gets a learned code (the hold-out too: only its images are not
            # trained on); the probes are labeled items too
            learning = wait_for_learning(learner, learner_url, server, n_labeled + len(spare),
                                         min(LEARN_BUDGET_S, 300 + limit / 20), progress, settings.learn.round_every)
            progress.say(f"precision@10 again, with model v{learning['version']}", force=True)
            p10, latencies_learned = precision_at_10(server, test_x[q_idx], test_y[q_idx], truth)
        health = httpx.get(f"{server}/healthz").json()
        lm = scrape(learner_url) if learner is not None else {}
        summary = {
            "produced": produced, "labeled": n_labeled, "unlabeled": produced - n_labeled, "late_class": LATE_CLASS,
            "malformed_sent": len(MALFORMED), "indexed": int(indexed), "dead_lettered": int(dead),
            "index_size": health["index_size"], "bits": settings.model.bits,
            "ingest_images_per_s": round(produced / (t_indexed - t0), 1),
            "freshness_p50_s": round(float(np.percentile(delays, 50)), 3) if delays else None,
            "freshness_p99_s": round(float(np.percentile(delays, 99)), 3) if delays else None,
            "freshness_probes": len(delays), "freshness_probes_sent": probes,
            "query_p50_ms": percentile_ms(latencies, 50), "query_p99_ms": percentile_ms(latencies, 99),
            "query_learned_p50_ms": percentile_ms(latencies_learned, 50),
            "query_learned_p99_ms": percentile_ms(latencies_learned, 99),
            "queries": len(latencies), "precision_at_10": round(p10, 4),
            "precision_at_10_indexed": round(p10_indexed, 4), "model_version_indexed": version_indexed,
            "model_version": health["model_version"], "generation": health["generation"],
            "learning_rounds": int(lm.get("streamhash_learning_rounds_total", 0)),
            "reencodes": int(lm.get("streamhash_reencode_triggers_total", 0)),
            "reencode_triggers": int(lm.get("streamhash_reencode_triggers_total", 0)),
            "learning_complete": learning["complete"], "learned_codes": learning["codes"],
            "learned_codes_expected": n_labeled + len(spare), "learn_budget_s": LEARN_BUDGET_S,
            "learner_cpu_s": round(lm.get("process_cpu_seconds_total", 0.0), 1),
            "running": keep_running,
            "index_mi": round(lm.get("streamhash_index_mi", 0.0), 4),
            "candidate_mi": round(lm.get("streamhash_candidate_mi", 0.0), 4),
        }
        if keep_running:  # once the demo ends, its processes end: their URLs are only worth printing while they run
            summary.update({
                "metrics_urls": [worker_url, *([learner_url] if learner is not None else []), f"{server}/metrics"],
                "search_url": f"{server}/search", "docs_url": f"{server}/docs", "page_url": f"{server}/",
                "bootstrap_servers": settings.kafka.bootstrap_servers})
        progress.stop()
        if keep_running:
            print_summary(summary)
            print(f"\nsearch page: {summary['page_url']}   (broker, worker, learner, query server keep running; Ctrl-C stops them all)",
                  flush=True)
            _serve_until_interrupted(procs)
        return summary
    finally:
        progress.stop()
        for p in reversed(procs):
            stop(p)
        if broker is not None:
            broker.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _serve_until_interrupted(procs) -> None:
    """Ctrl-C or SIGTERM ends the wait; the caller stops every process it started (they run in their
    own sessions, so a terminal's Ctrl-C reaches only us). A process that dies ends it too."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        dead = [p.args[-1] for p in procs if p.poll() is not None]
        print(f"stopping: {', '.join(dead)} exited", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _latency(s: dict) -> str:
    first = f"p50 {s['query_p50_ms']} ms, p99 {s['query_p99_ms']} ms"
    if s.get("query_learned_p50_ms") is None:
        return first
    return f"{first} beside the learner; p50 {s['query_learned_p50_ms']} ms, p99 {s['query_learned_p99_ms']} ms once learned"


def _learning(s: dict) -> str:
    rounds, v0, v = s["learning_rounds"], s["model_version_indexed"], s["model_version"]
    done = (f"every labeled item learned ({s['learned_codes']} codes)" if s["learning_complete"] else
            f"{s['learned_codes']} of {s['learned_codes_expected']} labeled items learned when the demo's "
            f"{s['learn_budget_s']:.0f} s learning budget ran out (a busy machine; --serve lets it finish)")
    return (f"{rounds} DIHN round(s) in the learner process, each publishing the next model version (v{v0} -> v{v}); "
            f"{done}")


def print_summary(s: dict) -> None:
    """Every number with the phrase that says what it counts."""
    late = CLASSES[s["late_class"]] if s.get("late_class") is not None else None
    stream = (f"{s['produced']} Fashion-MNIST images ({s['labeled']} labeled, {s['unlabeled']} sent unlabeled; "
              f"class {s['late_class']} \"{late}\" streamed last) + {s['malformed_sent']} malformed messages, "
              f"{s['bits']}-bit codes") if "labeled" in s else f"{s['produced']} Fashion-MNIST images"
    probes = s["index_size"] - s["indexed"]
    print(f"""
streamhash demo: {stream}
  indexed            {s['indexed']}  every streamed image; the query index holds {s['index_size']}: {s['indexed']} images + {probes} freshness probes
  dead-lettered      {s['dead_lettered']}  the {s['malformed_sent']} malformed messages, one per way to break the contract (`streamhash dlq` lists them, with why)
  ingest rate        {s['ingest_images_per_s']} images/s  from the first send to the last item committed, the learner training beside
  freshness          p50 {s['freshness_p50_s']} s, p99 {s['freshness_p99_s']} s  from send to searchable, over {s['freshness_probes']} of {s['freshness_probes_sent']} single probe images
  query latency      {_latency(s)}
                     ({s['queries']} searches by PNG image each, k=10, timed at an httpx client)
  precision@10       {s['precision_at_10_indexed']} with model v{s['model_version_indexed']}{' (untrained)' if s['model_version_indexed'] <= 1 else ''} -> {s['precision_at_10']} with model v{s['model_version']}
                     (share of the 10 hits of a held-out test image's own class; random ranking gives ~0.1)
  learning           {_learning(s)}
  re-encodes         {s['reencode_triggers']}  MI-triggered re-encodes of the stale inferred codes (generation {s['generation']}); the last round's MI test: live codes {s['index_mi']}, candidate codes {s['candidate_mi']}""")
    if s.get("running"):
        print(f"""  metrics            {'  '.join(s['metrics_urls'])}
  search             POST {s['search_url']}   (API docs: {s['docs_url']})""")
    else:
        print("  processes          stopped with the demo: run `streamhash demo --serve` to keep them (search page, /docs, /metrics)")


def run(settings: Settings) -> int:
    """``streamhash demo``: returns the process exit code."""
    d = settings.demo
    quiet = d.quiet or d.json_summary
    setup_logging("WARNING" if quiet else settings.log_level)
    # A closed terminal (SIGHUP) or a kill (SIGTERM) stops every process the demo started, as Ctrl-C does; a
    # kill -9 or a crash leaves that to the kernel (processes.spawn: they die with this process).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        summary = run_demo(settings, limit=d.limit, queries=d.queries, workdir=d.workdir, keep_running=d.keep_running,
                           quiet=quiet, probes=d.probes)
    except DatasetMissingError as exc:
        print(exc, file=sys.stderr)
        return EXIT_DATASET_MISSING
    except ScrapeFailed as exc:
        print(f"streamhash demo: stopped, a process stopped answering: {exc}. Its log is in {d.workdir}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        print("streamhash demo: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    if not d.keep_running:
        print_summary(summary)
    if d.json_summary:
        print(json.dumps(summary))
    return 0
