"""The learner's state and one step of its loop (:class:`Learner`): read the shards (through the changelog, or a
store root's files), run a round when one is due, publish its model and then its codes, each publication retried
on a new producer. The process around it (signals, the stop deadline, priority, exit codes) is
:mod:`streamhash.services.learner`.
"""

from __future__ import annotations

import logging
import threading
import time

from kafka.errors import KafkaError, KafkaTimeoutError

from streamhash import metrics as m
from streamhash.config import Settings
from streamhash.errors import EXIT_OK, EXIT_TEMPFAIL, BrokerError
from streamhash.index.feed import ShardFeed
from streamhash.index.store.root import LAYOUT_FILE, StoreRoot
from streamhash.kafka.changelog_feed import ChangelogFeed
from streamhash.kafka.modelbus import CodeUpdate, ModelAnnouncement, ModelPublisher, ModelReader, latest, log_rejected
from streamhash.learn.dihn import RoundAbandoned
from streamhash.learn.online import OnlineHasher, RoundReport
from streamhash.model.hashnet import HashNet, resolve_device
from streamhash.model.state import checked_model, initial_net
from streamhash.services.spec import image_spec, model_key

log = logging.getLogger("streamhash.learner")


class StopRequested(Exception):
    """A stop was requested while the learner waited on the broker: the wait is abandoned."""


class Learner:
    """The learner's state and one step of its loop; :func:`streamhash.services.learner.run` is the
    process around it."""

    def __init__(self, settings: Settings, *, publisher: ModelPublisher | None = None,
                 stopping: threading.Event | None = None, round_requested: threading.Event | None = None):
        self.settings = settings
        # the process's signal handlers set these (they are installed before the model loads)
        self.stopping, self.round_requested = stopping or threading.Event(), round_requested or threading.Event()
        net, self.version, self.generation, self.base = resume_at_base(settings)
        device = resolve_device(settings.model.device)
        self.hasher = OnlineHasher(net.to(device), settings.learn, seed=settings.model.seed, device=str(device))
        self.publisher = publisher or ModelPublisher(settings.kafka, key=model_key(settings))
        self.feed: ShardFeed | ChangelogFeed | None = None
        self.blocked: dict[str, bool] = {}
        for reason in ("no_labels", "reencode"):
            self.set_blocked(reason, False, quiet=True)
        m.LEARNER_MODEL_VERSION.set(self.version)
        m.LEARNER_GENERATION.set(self.generation)
        log.info("learner at model version %d, generation %d", self.version, self.generation)

    @property
    def from_root(self) -> bool:
        """Whether the learner reads a store root's files (``store.path`` set) rather than the changelog."""
        return "path" in self.settings.store.model_fields_set

    def open_root(self) -> bool:
        """The feed: the changelog's, or the store root's once a worker created it (False while it does not exist)."""
        if self.feed is None and not self.from_root:
            self.feed = changelog_feed(self.settings, self.hasher, self.base)
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
        if report.reencode and isinstance(self.feed, ChangelogFeed):  # the workers re-encode with it: so does the feed
            self.feed.rebase(version, HashNet.from_bytes(model.raw), learned=set(report.round.ids))
        m.LEARNER_MODEL_VERSION.set(version)
        m.LEARNER_GENERATION.set(generation)
        # only now: every code names a version the broker already holds
        codes = dict(zip(report.round.ids, report.round.codes))
        updates = code_updates(self.feed, list(report.round.ids), "learned", version, codes)
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
        # the demo's summary reads this line for each trigger (services/demo/summary.py, _ROUND): keep its words
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
        marks = code_updates(self.feed, ids, "quarantine", self.version)
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
                if self.feed is None and not waited:  # a store root only: the changelog feed opens at once
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


def code_updates(feed, ids: list, kind: str, version: int, codes: dict | None = None) -> list[tuple[int, CodeUpdate]]:
    """(codes partition, update) for each id about to be published, pending ones and ones learned in an earlier
    round that this round re-learned: by timestamp from the changelog feed, by shard seq from a store root's (by
    timestamp too for a re-learned one, see :meth:`ShardFeed._held`)."""
    if isinstance(feed, ChangelogFeed):
        return feed.code_updates(ids, kind, version, codes)
    return [(p, CodeUpdate(i, seq, kind, version, codes[i].tobytes() if codes is not None else b"", ts=ts))
            for i, p, seq, ts in feed.take_pending(ids)]


def changelog_feed(settings: Settings, hasher: OnlineHasher, base: tuple[int, HashNet | None]) -> ChangelogFeed:
    """The feed of a learner without a store root: every changelog partition, by hand (no group), into its own state."""
    from kafka import KafkaConsumer

    from streamhash.kafka.changelog_state import LearnerState

    k, s = settings.kafka, settings.store
    state = LearnerState(settings.learn.state_path, k.changelog_topic, initial_map_size=s.initial_map_size_bytes,
                         max_map_size=s.max_map_size_bytes)
    consumer = KafkaConsumer(**k.client_kwargs(), group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                             fetch_max_wait_ms=k.fetch_max_wait_ms, fetch_max_bytes=k.fetch_max_bytes,
                             max_partition_fetch_bytes=k.fetch_max_bytes, client_id="streamhash-learner-changelog")
    log.info("learning from the changelog %s (no store root), state in %s", k.changelog_topic, settings.learn.state_path)
    return ChangelogFeed(consumer, k.changelog_topic, hasher, image_spec(settings), state, secret=model_key(settings),
                         base=base)


def resume(settings: Settings) -> tuple[HashNet, int, int]:
    """(network, version, generation) of the latest published model (:func:`resume_at_base`)."""
    return resume_at_base(settings)[:3]


def resume_at_base(settings: Settings) -> tuple[HashNet, int, int, tuple[int, HashNet | None]]:
    """(network, version, generation) of the latest published model, and (version, network) of the one that opened
    its generation (what the workers re-encoded with; ``(1, None)`` in generation 1); none yet: version 1,
    generation 1, the seeded network every process builds the same way from the model settings."""
    mc = settings.model
    # A record that is not a usable model of these settings is skipped with a warning: the learner starts from
    # the newest one that is (a forged or foreign record on the topic must not keep it from starting).
    reader = ModelReader(settings.kafka, key=model_key(settings), check=lambda a: checked_model(a, mc),
                         on_reject=log_rejected)
    try:
        models = reader.read_to_end()
        last = latest(models)
    finally:
        reader.close()
    if last is None:
        return initial_net(mc), 1, 1, (1, None)
    first = min((a for a in models if a.generation == last.generation), key=lambda a: a.version)
    base = (1, None) if last.generation == 1 else (first.version, HashNet.from_bytes(first.raw))
    return last.net, last.version, last.generation, base


