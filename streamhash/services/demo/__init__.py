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

This module starts the processes and runs the steps (:func:`run_demo`); what it sends is
:mod:`~streamhash.services.demo.stream`, what it measures over HTTP :mod:`~streamhash.services.demo.measure`,
and the summary's numbers and words :mod:`~streamhash.services.demo.summary`.

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

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from streamhash.config import Settings, setup_logging
from streamhash.errors import EXIT_DATASET_MISSING, EXIT_UNAVAILABLE, DatasetMissingError
from streamhash.kafka.broker import EmbeddedBroker, free_port
from streamhash.kafka.produce import from_arrays, make_producer, send
from streamhash.kafka.topics import ensure_topics
from streamhash.services.demo.measure import (SCRAPE_DEADLINE_S, measure_freshness, percentile_ms, precision_at_10,
                                              probe_freshness, scrape)
from streamhash.services.demo.stream import LATE_CLASS, MALFORMED, UNLABELED_SHARE, Stream, stream_order
from streamhash.services.demo.summary import Ingest, Searches, print_summary, summarize, triggers_in
from streamhash.services.processes import ScrapeFailed, spawn, stop, total, wait_for, wait_http

__all__ = ["LATE_CLASS", "LEARN_BUDGET_S", "MALFORMED", "PROGRESS_EVERY_S", "SCRAPE_DEADLINE_S", "UNLABELED_SHARE",
           "Progress", "measure_freshness", "percentile_ms", "precision_at_10", "print_summary", "probe_freshness",
           "run", "run_demo", "scrape", "stream_order", "wait_for_learning"]

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
        say(f"learning: every labeled item learned ({state['codes']} codes, {state['rounds']} round(s), model v{version}), "
            f"served by every shard", force=True)
        return True

    try:
        wait_for(learned, timeout, "the learner to learn every labeled item of the stream", interval=0.5)
    except TimeoutError:
        say(f"learning budget of {timeout:.0f} s spent: summarizing what was learned so far", force=True)
    return state


@dataclass
class Stack:
    """The processes the demo started (stopped in reverse order at its end) and where each answers."""
    env: dict[str, str]
    server: str
    worker_url: str
    learner_url: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    learner: subprocess.Popen | None = None

    @classmethod
    def on_free_ports(cls, settings: Settings, workdir: Path) -> Stack:
        worker_metrics, learner_metrics, http_port = free_port(), free_port(), free_port()
        env = {"STREAMHASH_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
               "STREAMHASH_STORE__PATH": str(workdir / "index"), "STREAMHASH_WORKER__METRICS_PORT": str(worker_metrics),
               "STREAMHASH_SERVER__PORT": str(http_port), "STREAMHASH_MODEL__BITS": str(settings.model.bits),
               "STREAMHASH_LEARN__METRICS_PORT": str(learner_metrics), "STREAMHASH_DATA__CLASS_NAMES": "fashion-mnist",
               # not niced (unless asked): the demo waits for its rounds, and niced at 10 beside other work on 2 cores a
               # 9 s round took over 140 s; ingestion here is a few seconds and shares the cores for those only
               "STREAMHASH_LEARN__NICE": os.environ.get("STREAMHASH_LEARN__NICE", "0")}
        return cls(env, f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{worker_metrics}/metrics",
                   f"http://127.0.0.1:{learner_metrics}/metrics")

    def health(self) -> dict:
        return httpx.get(f"{self.server}/healthz").json()


def start_processes(settings: Settings, stack: Stack, workdir: Path, progress: Progress) -> None:
    """The worker, the learner (if enabled) and the query server, each waited for, then the worker's group join."""
    progress.say("starting the worker, the learner and the query server (each loads torch: a few seconds)", force=True)
    worker = spawn(["worker"], env=stack.env, log_path=workdir / "worker.log")
    stack.procs.append(worker)
    wait_http(stack.worker_url, 120, worker, workdir / "worker.log")
    if settings.learn.enabled:  # its own process (niced outside the demo: ingestion keeps the cores)
        stack.learner = spawn(["learner"], env=stack.env, log_path=workdir / "learner.log")
        stack.procs.append(stack.learner)
        wait_http(stack.learner_url, 120, stack.learner, workdir / "learner.log")
    srv = spawn(["serve"], env=stack.env, log_path=workdir / "serve.log")
    stack.procs.append(srv)
    wait_http(f"{stack.server}/healthz", 120, srv, workdir / "serve.log")
    wait_for(lambda: scrape(stack.worker_url).get("streamhash_assigned_partitions", 0) > 0, 60, "the worker to join its group")


def stream(settings: Settings, stack: Stack, data: Stream, progress: Progress, quiet: bool, *, malformed=MALFORMED,
           prefix: str = "fmnist-train-", classes=None, noun: str = "images", per_second: float = 500, note: str = ""):
    """Phase 1, bulk load: as fast as the producer goes; the rate is first send -> last commit. Returns what was
    indexed (:class:`Ingest`) and the producer, open for the probes. ``per_second``: the slowest ingest rate waited for
    (a photo's frozen backbone runs a few dozen a second here)."""
    progress.say(f"streaming {data.limit} {noun} ({data.n_labeled} labeled) and {len(malformed)} malformed messages"
                 + note, force=True)
    producer = make_producer(settings.kafka)
    t0 = time.time()
    messages = from_arrays(data.train_x[data.order], data.labels, prefix=prefix, classes=classes)
    truth = {f"{prefix}{i}": int(y) for i, y in enumerate(data.train_y[data.order])}  # sent unlabeled or not
    produced = send(producer, settings.kafka.topic, messages, progress=not quiet, total=data.limit)
    for key, value, headers, _ in malformed:
        producer.send(settings.kafka.topic, key=key, value=value, headers=headers)
    producer.flush()
    counts = {}

    def all_in() -> bool:
        s = scrape(stack.worker_url)
        counts["indexed"] = s.get("streamhash_items_indexed_total", 0)
        counts["dead"] = total(s, "streamhash_messages_dead_lettered_total")
        progress.say(f"indexing: {counts['indexed']:.0f} of {produced} {noun} indexed, {counts['dead']:.0f} of "
                     f"{len(malformed)} malformed messages dead-lettered")
        return counts["indexed"] >= produced and counts["dead"] >= len(malformed)

    wait_for(all_in, 120 + data.limit / per_second, "every message to be indexed or dead-lettered")
    ingest = Ingest(produced, counts["indexed"], counts["dead"], t0, time.time(), truth)
    wait_for(lambda: stack.health()["index_size"] >= produced, 30 + data.limit / per_second,
             "the query index to catch up")
    return ingest, producer


def freshness(settings: Settings, stack: Stack, data: Stream, producer, ingest: Ingest, probes: int,
              progress: Progress) -> tuple[list[float], np.ndarray]:
    """Phase 2: single probe images (not in the stream) sent 20 per second; their delays and which images."""
    spare = np.random.default_rng(settings.model.seed + 2).permutation(
        np.setdiff1d(np.arange(len(data.train_x)), data.order))[:probes]
    progress.say(f"freshness: {probes} single probe images, 20 a second, each timed from send to searchable", force=True)
    delays = measure_freshness(producer, settings.kafka.topic, stack.server, data.train_x[spare], data.train_y[spare])
    producer.close()
    ingest.truth.update({f"probe-{i}": int(y) for i, y in enumerate(data.train_y[spare])})
    return delays, spare


def searches(settings: Settings, stack: Stack, data: Stream, truth: dict[str, int], expected_codes: int,
             progress: Progress) -> Searches:
    """Precision@10 and latency of the held-out searches, then (with a learner) again once it learned the stream
    or its budget ran out."""
    images, labels = data.test_x[data.q_idx], data.test_y[data.q_idx]
    progress.say(f"precision@10: {len(data.q_idx)} searches by held-out test images", force=True)
    p10_indexed, latencies = precision_at_10(stack.server, images, labels, truth)
    version_indexed = stack.health()["model_version"]
    p10, latencies_learned = p10_indexed, []
    learning = {"complete": False, "codes": 0, "rounds": 0, "version": 1}
    if stack.learner is not None:
        # every labeled item of the stream gets a learned code (the hold-out too: only its images are not
        # trained on); the probes are labeled items too
        learning = wait_for_learning(stack.learner, stack.learner_url, stack.server, expected_codes,
                                     min(LEARN_BUDGET_S, 300 + data.limit / 20), progress, settings.learn.round_every)
        progress.say(f"precision@10 again, with model v{learning['version']}", force=True)
        p10, latencies_learned = precision_at_10(stack.server, images, labels, truth)
    return Searches(p10_indexed, latencies, version_indexed, p10, latencies_learned, learning)


def run_demo(settings: Settings, *, limit: int, queries: int, workdir: Path, keep_running: bool, quiet: bool,
             probes: int = 50) -> dict:
    progress = Progress(quiet).start()
    data = Stream.load(settings, limit, queries)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    broker = None
    if not settings.kafka.bootstrap_servers:
        broker = EmbeddedBroker(home=workdir).start()
        settings.kafka.bootstrap_servers = broker.bootstrap_servers
    ensure_topics(settings.kafka)
    stack = Stack.on_free_ports(settings, workdir)
    try:
        start_processes(settings, stack, workdir, progress)
        ingest, producer = stream(settings, stack, data, progress, quiet)
        delays, spare = freshness(settings, stack, data, producer, ingest, probes, progress)
        expected_codes = data.n_labeled + len(spare)
        searched = searches(settings, stack, data, ingest.truth, expected_codes, progress)
        health = stack.health()
        lm = scrape(stack.learner_url) if stack.learner is not None else {}
        summary = summarize(ingest, delays, searched, health, lm, labeled=data.n_labeled, late_class=LATE_CLASS,
                            malformed=len(MALFORMED), bits=settings.model.bits, probes=probes,
                            learned_expected=expected_codes, learn_budget_s=LEARN_BUDGET_S, keep_running=keep_running,
                            triggers=triggers_in(workdir / "learner.log"),
                            reencoded_images=scrape(stack.worker_url).get("streamhash_reencoded_images_total", 0.0))
        progress.stop()
        if keep_running:
            serve(settings, stack, summary)
        return summary
    finally:
        progress.stop()
        for p in reversed(stack.procs):
            stop(p)
        if broker is not None:
            broker.stop()


def serve(settings: Settings, stack: Stack, summary: dict) -> None:
    """``--serve``: the summary with the processes' URLs, then everything runs until Ctrl-C (or one exits)."""
    # once the demo ends, its processes end: their URLs are only worth printing while they run
    summary.update({
        "metrics_urls": [stack.worker_url, *([stack.learner_url] if stack.learner is not None else []),
                         f"{stack.server}/metrics"],
        "search_url": f"{stack.server}/search", "docs_url": f"{stack.server}/docs", "page_url": f"{stack.server}/",
        "bootstrap_servers": settings.kafka.bootstrap_servers})
    print_summary(summary)
    print(f"\nsearch page: {summary['page_url']}   (broker, worker, learner, query server keep running; Ctrl-C stops them all)",
          flush=True)
    _serve_until_interrupted(stack.procs)


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


def run(settings: Settings) -> int:
    """``streamhash demo``: returns the process exit code."""
    d = settings.demo
    quiet = d.quiet or d.json_summary
    setup_logging("WARNING" if quiet else settings.log_level)
    # A closed terminal (SIGHUP) or a kill (SIGTERM) stops every process the demo started, as Ctrl-C does; a
    # kill -9 or a crash leaves that to the kernel (processes.spawn: they die with this process). SIGINT too,
    # explicitly: started from a background job (`cmd &` in a script) it arrives ignored, and Python then leaves
    # it ignored, so Ctrl-C (or a kill -INT) did nothing and `--serve` ran on.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    runner, limit, queries = run_demo, d.limit or 10_000, d.queries or 200
    if d.dataset == "cifar10":  # photos: demo/photos.py
        from streamhash.services.demo import photos

        runner, limit, queries = photos.run_photo_demo, d.limit or photos.LIMIT, d.queries or photos.QUERIES
    try:
        summary = runner(settings, limit=limit, queries=queries, workdir=d.workdir, keep_running=d.keep_running,
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
