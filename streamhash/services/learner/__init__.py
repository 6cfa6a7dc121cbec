"""The learner process (``streamhash learner``, ``streamhash-learner``): it owns the model, learns, and
publishes; it never writes a shard. Its state, its round and its publications are
:class:`~streamhash.services.learner.app.Learner`; this module is the process around it (signals, the stop
deadline, priority, exit codes).

Where it learns from: by default the shards' changelog topic (:class:`~streamhash.kafka.changelog_feed.ChangelogFeed`),
every partition of it, into a state store of its own under ``learn.state_path`` (items, labels, codes with their
provenance, each item's stored input for Omega and the reservoir): it needs no store root, runs on any machine and
learns from every partition of every machine; a restart reads the changelog's tail from the offsets stored there.
It re-encodes its copy's inferred codes as the workers do after a re-encode announcement, so DIHN trains against
the codes the index serves. With a store root (``--store``, ``store.path`` set) it follows the shards' files
instead (:class:`~streamhash.index.feed.ShardFeed`, read-only, as the query server does), which ties it to the
machine holding every shard (the filesystem, and LMDB's reader table in the host's PID namespace). Not a consumer
group on the images topic either way: DIHN must train against the exact codes the index serves (old codes
frozen; after a re-encode, the re-encoded ones), and only the shards, and their changelog, hold those.

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
from kafka.errors import KafkaError

from streamhash import metrics as m
from streamhash.config import Settings
from streamhash.errors import EXIT_CONFIG, EXIT_OK, EXIT_TEMPFAIL, EXIT_USAGE, BrokerError, ConfigError, SchemaMismatchError
from streamhash.index.store.root import LegacyLayoutError
from streamhash.services.learner.app import Learner, StopRequested, model_key, resume

__all__ = ["Learner", "StopRequested", "install_stop_handlers", "lower_priority", "model_key", "resume", "run"]

log = logging.getLogger("streamhash.learner")


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
