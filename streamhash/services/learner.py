"""The learner process (``streamhash learner``, ``streamhash-learner``): it owns the model, learns, and
publishes; it never writes a shard.

Where it learns from: the shards, read-only (:class:`~streamhash.index.feed.ShardFeed` follows each
shard's change log as the query server does, and reads Omega's and the reservoir's images from the
blobs of the shard that holds each id). Not a consumer group of its own on the images topic: DIHN
must train against the exact codes the index serves (old codes frozen; after a re-encode, the codes
each worker re-encoded), and only the shards hold those; a second copy of the image stream would also
hold every image twice. The limit: the learner needs the store root's filesystem (and, for LMDB's
reader table, the host's PID namespace), like a query server, so it runs where the shards are.

One round, in order:

1. ``learn_round``: train the network on Omega, learn the codes of the new labeled items by DCC; old
   codes stay frozen. Then the MIHash test on the reservoir (labeled items of every shard, a hold-out
   never trained on among them, standing for inferred codes): queries encoded by the new network against the index's codes as
   they are vs after the selective re-encode; it fires when the gain beats its bootstrap noise bound
   (``streamhash_mi_gain_sigma``); its cost, the stale inferred codes, is ``streamhash_reencode_cost_items``;
2. publish the model on ``streamhash.models`` (:mod:`streamhash.kafka.modelbus`): version = last
   published + 1, generation = the current one, or the next when the test fired (a re-encode
   announcement: every worker re-encodes its own shards into it, learned codes copied);
3. only once the broker acknowledged the model, publish the learned codes, each to the codes partition
   of its item's shard with the seq the learner read it at (a worker skips a code for an item written
   again since), so no shard ever holds a code of a version that was never published.

A round that fails quarantines its pending labeled items (they stay indexed with their inferred codes)
and publishes a quarantine mark for each, so neither this learner nor a restarted one fails on them
again. A publication the broker does not acknowledge within ``learn.publish_timeout_s``, or refuses
because it fenced or forgot the producer (a broker restarted, a log reset, a topic re-created:
``UnknownProducerIdError``, a bumped epoch), is retried on a new producer after a back-off, the topics
created again where they are gone, for ``learn.publish_retry_s`` in all; only then the process stops
(exit 75): the shards are the truth, and a restarted learner learns again whatever they do not show
as learned. A model published again is the same message under the same key; a code, the same code.

Stopping: SIGTERM, SIGINT or SIGHUP abandon a round in progress (the network asks between training
batches) and any wait on the broker; nothing of an unfinished round is published (a model without its
codes can be: the restarted learner learns those items again; codes are never sent before their model
is acknowledged), and the process exits 0. Whatever it is doing, it is gone ``learn.stop_grace_s``
after the signal; a second signal exits at once.

While a shard is below the learner's generation (its worker has not re-encoded it yet) no round runs:
its inferred codes are about to change under DIHN. When it swaps, the feed reads its new codes.

Rounds are due after ``round_every`` labeled items or once the oldest has waited ``round_max_age_s``;
SIGUSR1 asks for one now. ``streamhash_learn_lag_seconds`` times each item from the learner reading it
to its code published. A stream with no label at all cannot teach anything: the learner says so (a
warning, and ``streamhash_learning_blocked{reason="no_labels"}`` at 1). A restart resumes from the
latest model on ``streamhash.models`` (none: the seeded initial network, version 1, generation 1).

The process yields the cores to ingestion: ``learn.nice`` added to its niceness and ``learn.torch_threads``
(1) torch threads. Run exactly one per models topic: it numbers the versions. Exit codes: 0 stopped
(SIGTERM, SIGINT, SIGHUP), 2 no broker configured, 75 the broker failed (restart with back-off), 78 the root, a
shard or the models topic does not fit this model's settings (the message says what to do).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch
from kafka.errors import KafkaError, KafkaTimeoutError

from streamhash import metrics as m
from streamhash.config import Settings
from streamhash.errors import EXIT_CONFIG, EXIT_OK, EXIT_TEMPFAIL, EXIT_USAGE, BrokerError, ConfigError, SchemaMismatchError
from streamhash.index.feed import ShardFeed
from streamhash.index.store.root import LAYOUT_FILE, LegacyLayoutError, StoreRoot
from streamhash.kafka.modelbus import CodeUpdate, ModelAnnouncement, ModelPublisher, ModelReader, latest
from streamhash.learn.dihn import RoundAbandoned
from streamhash.learn.online import OnlineHasher, RoundReport
from streamhash.model.hashnet import HashNet, resolve_device
from streamhash.model.state import checked_model, initial_net
from streamhash.services.spec import image_spec

log = logging.getLogger("streamhash.learner")


class StopRequested(Exception):
    """A stop was requested while the learner waited on the broker: the wait is abandoned."""


class Learner:
    """The learner's state and one step of its loop; :func:`run` is the process around it."""

    def __init__(self, settings: Settings, *, publisher: ModelPublisher | None = None,
                 stopping: threading.Event | None = None, round_requested: threading.Event | None = None):
        self.settings = settings
        # the process's signal handlers set these (they are installed before the model loads)
        self.stopping, self.round_requested = stopping or threading.Event(), round_requested or threading.Event()
        net, self.version, self.generation = resume(settings)
        device = resolve_device(settings.model.device)
        self.hasher = OnlineHasher(net.to(device), settings.learn, seed=settings.model.seed, device=str(device))
        self.publisher = publisher or ModelPublisher(settings.kafka, key=model_key(settings))
        self.feed: ShardFeed | None = None
        self.blocked: dict[str, bool] = {}
        for reason in ("no_labels", "reencode"):
            self.set_blocked(reason, False, quiet=True)
        m.LEARNER_MODEL_VERSION.set(self.version)
        m.LEARNER_GENERATION.set(self.generation)
        log.info("learner at model version %d, generation %d", self.version, self.generation)

    def open_root(self) -> bool:
        """The store root, once a worker created it; False while it does not exist yet."""
        if self.feed is None:
            root = StoreRoot(self.settings.store.path, create=False)  # refuses a single-environment store at once
            if not (root.path / LAYOUT_FILE).exists():
                return False
            self.feed = ShardFeed(root, self.settings.kafka.topic, self.hasher, image_spec(self.settings))
        return True

    def step(self) -> bool:
        """Read the shards, then run a round if one is due (or asked for); True when a round ran."""
        if not self.open_root():
            return False
        self.feed.poll()
        self.check_no_labels()
        behind = self.feed.behind(self.generation)
        # expected after each re-encode announcement, hence info: the workers are re-encoding
        self.set_blocked("reencode", bool(behind), level=logging.INFO, detail=(
            f"shards {[str(k) for k in behind]} are below generation {self.generation}: no round until their "
            f"workers have re-encoded them"))
        due = self.hasher.ready()  # also while blocked: it folds what was read into the learner's compact bookkeeping
        if behind or not (due or self.round_requested.is_set()) or self.stopping.is_set():
            return False
        self.round_requested.clear()
        if self.hasher.n_pending == 0:
            log.info("learning round requested but no new labeled items: the model stays at version %d", self.version)
            return False
        self.one_round()
        return True

    def one_round(self) -> None:
        t0 = time.perf_counter()
        log.info("learning round: %d labeled items pending, model version %d", self.hasher.n_pending, self.version)
        try:
            report = self.hasher.learn_round(self.feed.fetch_images, should_stop=self.stopping.is_set)
        except RoundAbandoned:
            log.info("stop requested: learning round abandoned after %.1fs; a restarted learner learns its items again",
                     time.perf_counter() - t0)
            return
        except Exception:  # a failed round must not fail again on the same items, here or after a restart
            self.quarantine()
            return
        if self.stopping.is_set():  # finished as the stop came: not published, learned again after the restart
            log.info("stop requested: the round just learned is not published; a restarted learner learns its items again")
            return
        m.LEARNING_ROUNDS.inc()
        m.LEARNING_ROUND_SECONDS.observe(time.perf_counter() - t0)
        self.report(report)
        version, generation = self.version + 1, self.generation + int(report.reencode)
        model = ModelAnnouncement(version, generation, report.reencode, self.hasher.net.to_bytes())
        self.publish(f"model version {version}", lambda p: p.publish_model(model))
        self.version, self.generation = version, generation
        m.LEARNER_MODEL_VERSION.set(version)
        m.LEARNER_GENERATION.set(generation)
        # only now: every code names a version the broker already holds
        codes = dict(zip(report.round.ids, report.round.codes))
        updates = [(p, CodeUpdate(i, seq, "learned", version, codes[i].tobytes()))
                   for i, p, seq in self.feed.take_pending(list(report.round.ids))]
        self.publish(f"{len(updates)} codes learned with version {version}", lambda p: p.publish_codes(updates))
        m.LEARNER_CODES_PUBLISHED.inc(len(updates))
        for lag in (self.hasher.clock() - report.arrivals).tolist():
            m.LEARN_LAG_SECONDS.observe(max(lag, 0.0))
        log.info("published model version %d (generation %d%s) and %d learned codes", version, generation,
                 ", a re-encode" if report.reencode else "", len(updates))

    def report(self, report: RoundReport) -> None:
        m.INDEX_MI.set(report.mi_live)
        m.CANDIDATE_MI.set(report.mi_candidate)
        m.MI_GAIN_SIGMA.set(report.sigma)
        m.REENCODE_COST_ITEMS.set(report.cost)
        if report.decision.drift:
            m.DRIFT_DETECTIONS.inc()
        if report.reencode:
            m.REENCODE_TRIGGERS.inc()
        log.info("round %d: %d codes learned (%d changed), MI live %.4f candidate %.4f gain %+.4f (bound %.4f, "
                 "sigma %.4f, %d reservoir codes would change) -> %s (cost: ~%d stale inferred codes)",
                 report.round.round, len(report.round.ids), report.round.changed, report.mi_live,
                 report.mi_candidate, report.gain, report.decision.bound, report.sigma,
                 report.mi.changed if report.mi else 0, "re-encode" if report.reencode else "keep codes", report.cost)

    def quarantine(self) -> None:
        m.LEARNING_ROUND_FAILURES.inc()
        ids = self.hasher.quarantine_pending()
        log.exception("learning round failed; %d pending labeled items quarantined (kept indexed with their "
                      "inferred codes, not learned from), e.g. %s", len(ids), ids[:5])
        marks = [(p, CodeUpdate(i, seq, "quarantine", self.version)) for i, p, seq in self.feed.take_pending(ids)]
        self.publish(f"{len(marks)} quarantine marks", lambda p: p.publish_codes(marks))  # so that a restart does not learn from them again
        m.LEARNING_QUARANTINED.inc(len(ids))

    def check_no_labels(self) -> None:
        """Warn once when the stream has shown no label for a round's worth of items or time: a gauge
        rather than the log alone, so an alert can see it (and see it clear when labels arrive)."""
        self.set_blocked("no_labels", self.hasher.cannot_learn(), detail=(
            f"no labeled item among the {self.hasher.items_seen} indexed: the learner cannot learn, and the "
            f"workers serve model version {self.version} until labeled messages arrive"))

    def set_blocked(self, reason: str, blocked: bool, *, detail: str = "", level: int = logging.WARNING,
                    quiet: bool = False) -> None:
        """``streamhash_learning_blocked{reason}``, logged when it changes."""
        if self.blocked.get(reason) == blocked:
            return
        self.blocked[reason] = blocked
        m.LEARNING_BLOCKED.labels(reason=reason).set(int(blocked))
        if quiet:
            return
        if blocked:
            log.log(level, "%s", detail)
        else:
            log.info("learning unblocked (%s)", reason)

    def publish(self, what: str, call) -> None:
        """``call(publisher)``, retried on a new producer until it is acknowledged, for ``publish_retry_s``
        in all; then its KafkaError is raised. A stop request ends the wait (:class:`StopRequested`).

        The producer is made again rather than retried: an idempotent producer whose id the broker no
        longer knows (a restarted broker, a log reset) or whose epoch it fenced fails every later send."""
        s = self.settings.learn
        deadline, backoff, attempt = time.monotonic() + s.publish_retry_s, 0.5, 1
        while True:
            try:
                if self.publisher is None:
                    self.publisher = self.renew_publisher()
                self.bounded(lambda: call(self.publisher), s.publish_timeout_s, f"publishing {what}")
                if attempt > 1:
                    log.info("published %s at attempt %d", what, attempt)
                return
            except (KafkaError, BrokerError) as exc:
                if time.monotonic() + backoff > deadline:
                    raise exc if isinstance(exc, KafkaError) else KafkaTimeoutError(str(exc)) from exc
                log.warning("publishing %s failed (%r): closing the producer, retrying on a new one in %.1fs "
                            "(attempt %d)", what, exc, backoff, attempt + 1)
                self.drop_publisher()
            if self.stopping.wait(backoff):
                raise StopRequested(what)
            backoff, attempt = min(backoff * 2, 10.0), attempt + 1

    def renew_publisher(self) -> ModelPublisher:
        """A new producer, the topics created first where they are gone (a log reset loses them)."""
        from streamhash.kafka.topics import ensure_topics

        t = self.settings.learn.publish_timeout_s
        self.bounded(lambda: ensure_topics(self.settings.kafka), t, "creating the topics again")
        return self.bounded(lambda: ModelPublisher(self.settings.kafka, key=model_key(self.settings)), t,
                            "making a new producer")

    def drop_publisher(self) -> None:
        """Close the producer without waiting for it (it may be blocked on a broker that is gone)."""
        old, self.publisher = self.publisher, None
        if old is not None:
            threading.Thread(target=_close_quietly, args=(old,), name="close-producer", daemon=True).start()

    def bounded(self, fn, timeout_s: float, what: str):
        """``fn()`` on a thread of its own, waited for at most ``timeout_s`` (KafkaTimeoutError) and only
        until a stop request (StopRequested): kafka-python's own waits (a flush, a new client's bootstrap)
        may be minutes long and cannot be interrupted. A call left behind finishes or fails on its own."""
        box: dict = {}
        done = threading.Event()

        def target():
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=target, name="learner-broker-call", daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not done.wait(0.05):
            if self.stopping.is_set():
                raise StopRequested(what)
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(f"{what}: no answer from the broker within {timeout_s:g}s")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def request_round(self) -> None:
        self.round_requested.set()

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> int:
        """Follow and learn until stopped; a failed publication ends it (exit 75, a restart resumes)."""
        interval = self.settings.learn.follow_interval_s
        waited = False
        try:
            while not self.stopping.is_set():
                if self.step():
                    continue
                if self.feed is None and not waited:
                    log.info("waiting for a worker to create the store root %s", self.settings.store.path)
                    waited = True
                self.stopping.wait(interval)
        except StopRequested as exc:
            log.info("stop requested while %s: not waiting for the broker. A restarted learner learns again "
                     "whatever the shards do not show as learned", exc)
        except KafkaError as exc:
            log.error("stopping: could not publish on the broker for %.0fs: %r. Nothing is lost: the shards do not "
                      "show the unpublished codes as learned, so the restarted learner learns them again",
                      self.settings.learn.publish_retry_s, exc)
            return EXIT_TEMPFAIL
        log.info("stopped")
        return EXIT_OK

    def close(self) -> None:
        if self.feed is not None:
            self.feed.close()
        if self.publisher is not None:  # every publication was acknowledged or abandoned: a short wait at most
            closing = threading.Thread(target=_close_quietly, args=(self.publisher,), name="close-producer", daemon=True)
            closing.start()
            closing.join(2.0)
            self.publisher = None


def _close_quietly(publisher: ModelPublisher) -> None:
    try:
        publisher.close()
    except Exception as exc:  # a producer of a broker that is gone: nothing left to flush
        log.debug("closing a producer: %r", exc)


def resume(settings: Settings) -> tuple[HashNet, int, int]:
    """(network, version, generation) of the latest published model; none yet: version 1, generation 1,
    the seeded network every process builds the same way from the model settings."""
    mc = settings.model
    # A record that is not a usable model of these settings is skipped with a warning: the learner starts from
    # the newest one that is (a forged or foreign record on the topic must not keep it from starting).
    reader = ModelReader(settings.kafka, key=model_key(settings), check=lambda a: checked_model(a, mc),
                         on_reject=_skip_model)
    try:
        last = latest(reader.read_to_end())
    finally:
        reader.close()
    if last is None:
        return initial_net(mc), 1, 1
    return last.net, last.version, last.generation


def model_key(settings: Settings) -> bytes | None:
    """The models and codes topics' HMAC key, if one is set (``security.model_key``)."""
    key = settings.security.model_key
    return key.get_secret_value().encode() if key else None


def _skip_model(record, exc) -> None:
    m.INTERNAL_REJECTED.labels(topic="models").inc()
    log.warning("skipping a record of %s: %s", record.topic, exc)


def lower_priority(nice: int) -> None:
    """Add ``nice`` to the process's niceness, and to its autogroup's when the process leads its session.

    With autogroup scheduling (Linux's default where ``/proc/sys/kernel/sched_autogroup_enabled`` is 1) CFS
    shares the CPU between sessions first and applies a niceness only within a session: a learner niced
    +10 in a session of its own (the demo's processes, a supervisor's) still took 0.6 of a core from a
    saturated worker. A session's autogroup is its leader's and its children's alone, so the leader may
    lower it; any other process leaves it as it is (in a shell's session the niceness works within it).
    In a container a cgroup's CPU weight decides instead, and the write changes nothing.
    """
    os.nice(nice)
    if nice and os.getsid(0) == os.getpid():
        try:
            with open("/proc/self/autogroup", "w") as fh:
                fh.write(str(min(19, os.getpriority(os.PRIO_PROCESS, 0))))
        except OSError:  # no autogroups here (another kernel, or scheduling by cgroup)
            pass


def install_stop_handlers(stopping: threading.Event, grace_s: float) -> None:
    """SIGTERM, SIGINT, SIGHUP: set ``stopping`` (the loop, a round and a wait on the broker all see it) and
    exit ``grace_s`` later whatever the process is still doing (loading the model, a call into kafka-python
    that cannot be interrupted): safe, as a kill -9 of the learner is. A second signal exits at once."""
    first: list[int] = []

    def on_signal(signum, frame):
        if first:
            log.warning("signal %d again: exiting now", signum)
            os._exit(128 + signum)
        first.append(signum)
        log.info("signal %d: stopping (a round in progress is abandoned and learned again after a restart)", signum)
        stopping.set()
        threading.Thread(target=_exit_after, args=(grace_s,), name="stop-deadline", daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)


def _exit_after(grace_s: float) -> None:
    time.sleep(grace_s)
    log.warning("still running %.0fs after the stop request: exiting now (nothing is published half: codes are "
                "only sent once their model is acknowledged)", grace_s)
    _flush_logs()
    os._exit(EXIT_OK)


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()


def run(settings: Settings) -> int:
    """The learner process; returns its exit code."""
    from streamhash.kafka.topics import ensure_topics
    from streamhash.memory import pin_malloc_mmap_threshold

    # Signals first: a SIGTERM or SIGUSR1 while the model loads must not kill the process.
    stopping, asked = threading.Event(), threading.Event()
    install_stop_handlers(stopping, settings.learn.stop_grace_s)
    signal.signal(signal.SIGUSR1, lambda *_: asked.set())
    lower_priority(settings.learn.nice)  # ingestion keeps the cores: the learner gets what they leave idle
    torch.set_num_threads(settings.learn.torch_threads)
    pin_malloc_mmap_threshold()
    if not settings.kafka.bootstrap_servers:
        log.error("no broker configured: set STREAMHASH_KAFKA__BOOTSTRAP_SERVERS or --bootstrap-servers")
        return EXIT_USAGE
    settings.log_startup("streamhash learner")
    try:
        ensure_topics(settings.kafka)  # the models topic must exist before it is read
        learner = Learner(settings, stopping=stopping, round_requested=asked)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    except (KafkaError, BrokerError) as exc:
        log.error("cannot start: %r", exc)
        return EXIT_TEMPFAIL
    # the learner has no host setting of its own: it listens where the worker beside it does
    m.serve_metrics(settings.learn.metrics_port, settings.worker.metrics_host, m.LEARNER_REGISTRY)
    try:
        code = learner.run()
    except (LegacyLayoutError, SchemaMismatchError) as exc:  # the root, or a shard, is not one this model can learn from
        log.error("%s", exc)
        code = EXIT_CONFIG
    finally:
        learner.close()
    if stopping.is_set():
        # Stopped by a signal, everything closed: skip the interpreter's teardown, which took up to 10 s
        # (torch, the learner's tensors) on a loaded machine, past the stop deadline it cannot fire in.
        _flush_logs()
        os._exit(code)
    return code
