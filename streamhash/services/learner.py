"""The learner process (``streamhash learner``, ``streamhash-learner``): it owns the model, learns, and
publishes; it never writes a shard.

Where it learns from: the shards, read-only (:class:`~streamhash.learn.shards.ShardFeed` follows each
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
again. A failed publication stops the process (exit 75): the shards are the truth, and a restarted
learner learns again whatever they do not show as learned.

While a shard is below the learner's generation (its worker has not re-encoded it yet) no round runs:
its inferred codes are about to change under DIHN. When it swaps, the feed reads its new codes.

Rounds are due after ``round_every`` labeled items or once the oldest has waited ``round_max_age_s``;
SIGUSR1 asks for one now. ``streamhash_learn_lag_seconds`` times each item from the learner reading it
to its code published. A stream with no label at all cannot teach anything: the learner says so (a
warning, and ``streamhash_learning_blocked{reason="no_labels"}`` at 1). A restart resumes from the
latest model on ``streamhash.models`` (none: the seeded initial network, version 1, generation 1).

The process yields the cores to ingestion: ``learn.nice`` added to its niceness and ``learn.torch_threads``
(1) torch threads. Run exactly one per models topic: it numbers the versions. Exit codes: 0 stopped
(SIGTERM, SIGINT), 2 no broker configured, 75 the broker failed (restart with back-off), 78 the root, a
shard or the models topic does not fit this model's settings (the message says what to do).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch
from kafka.errors import KafkaError

from streamhash import metrics as m
from streamhash.config import Settings
from streamhash.errors import EXIT_CONFIG, EXIT_OK, EXIT_TEMPFAIL, EXIT_USAGE, BrokerError, ConfigError, SchemaMismatchError
from streamhash.index.store.root import LAYOUT_FILE, LegacyLayoutError, StoreRoot
from streamhash.kafka.modelbus import CodeUpdate, ModelAnnouncement, ModelPublisher, ModelReader, latest
from streamhash.learn.online import OnlineHasher, RoundReport
from streamhash.learn.shards import ShardFeed
from streamhash.model.hashnet import HashNet, resolve_device
from streamhash.model.state import initial_net
from streamhash.records import ImageSpec

log = logging.getLogger("streamhash.learner")


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
        self.publisher = publisher or ModelPublisher(settings.kafka)
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
            self.feed = ShardFeed(root, self.settings.kafka.topic, self.hasher, ImageSpec.from_settings(self.settings))
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
        if behind or not (due or self.round_requested.is_set()):
            return False
        self.round_requested.clear()
        if self.hasher.n_pending == 0:
            log.info("learning round requested but no new labeled items: the model stays at version %d", self.version)
            return False
        self.one_round()
        return True

    def one_round(self) -> None:
        t0 = time.perf_counter()
        try:
            report = self.hasher.learn_round(self.feed.fetch_images)
        except Exception:  # a failed round must not fail again on the same items, here or after a restart
            self.quarantine()
            return
        m.LEARNING_ROUNDS.inc()
        m.LEARNING_ROUND_SECONDS.observe(time.perf_counter() - t0)
        self.report(report)
        version, generation = self.version + 1, self.generation + int(report.reencode)
        self.publisher.publish_model(ModelAnnouncement(version, generation, report.reencode, self.hasher.net.to_bytes()))
        self.version, self.generation = version, generation
        m.LEARNER_MODEL_VERSION.set(version)
        m.LEARNER_GENERATION.set(generation)
        # only now: every code names a version the broker already holds
        codes = dict(zip(report.round.ids, report.round.codes))
        updates = [(p, CodeUpdate(i, seq, "learned", version, codes[i].tobytes()))
                   for i, p, seq in self.feed.take_pending(list(report.round.ids))]
        self.publisher.publish_codes(updates)
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
        self.publisher.publish_codes(marks)  # so that a restart does not learn from them again
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
        except KafkaError as exc:
            log.error("stopping: could not publish on the broker: %r. Nothing is lost: the shards do not show the "
                      "unpublished codes as learned, so the restarted learner learns them again", exc)
            return EXIT_TEMPFAIL
        return EXIT_OK

    def close(self) -> None:
        if self.feed is not None:
            self.feed.close()
        self.publisher.close()


def resume(settings: Settings) -> tuple[HashNet, int, int]:
    """(network, version, generation) of the latest published model; none yet: version 1, generation 1,
    the seeded network every process builds the same way from the model settings."""
    reader = ModelReader(settings.kafka)
    try:
        last = latest(reader.read_to_end())
    finally:
        reader.close()
    mc = settings.model
    if last is None:
        return initial_net(mc), 1, 1
    net = HashNet.from_bytes(last.raw)
    if net.cfg.bits != mc.bits:
        raise ConfigError(f"the latest model on {settings.kafka.models_topic} (version {last.version}) has "
                          f"{net.cfg.bits}-bit codes, model.bits is {mc.bits}: use the models topic of this index")
    return net, last.version, last.generation


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


def run(settings: Settings) -> int:
    """The learner process; returns its exit code."""
    from streamhash.kafka.topics import ensure_topics
    from streamhash.memory import pin_malloc_mmap_threshold
    from streamhash.services.worker import install_signal_handlers

    # Signals first: a SIGTERM or SIGUSR1 while the model loads must not kill the process.
    stopping, asked = threading.Event(), threading.Event()
    install_signal_handlers(stopping.set)
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
        return learner.run()
    except (LegacyLayoutError, SchemaMismatchError) as exc:  # the root, or a shard, is not one this model can learn from
        log.error("%s", exc)
        return EXIT_CONFIG
    finally:
        learner.close()
