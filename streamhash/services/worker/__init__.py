"""The worker process (``streamhash worker``, ``streamhash-worker``): signals, the ingest loop
(:class:`~streamhash.services.worker.app.Worker`), exit codes. Learning is another process
(``streamhash learner``): a worker only applies what it publishes.

Any number of workers run in one consumer group. The worker is three parts and a loop
(:mod:`~streamhash.services.worker.app`): partition assignment and shard ownership (``ownership``), the
model follower (``follower``: the models and codes topics into the shards), the batch pipeline
(``pipeline``: poll → parse → encode → checkpoint), and the re-encoder thread (``reencode``).

SIGTERM or a first SIGINT drains the batch in hand, commits and leaves the group; a second SIGINT
exits at once (what was not committed is consumed again by the next owner, never lost).
Exit codes: 0 stopped, 2 no broker configured, 75 the disk or the broker failed past the retries,
78 the store root or the topics cannot be used as they are (the message says what to do).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from streamhash import metrics as m
from streamhash.config import Settings
from streamhash.errors import EXIT_CONFIG, EXIT_TEMPFAIL, EXIT_USAGE, ConfigError, SchemaMismatchError, StoreFullError
from streamhash.index.store.root import LegacyLayoutError
from streamhash.memory import pin_malloc_mmap_threshold
from streamhash.services.worker.app import Worker

log = logging.getLogger("streamhash.worker")


def install_signal_handlers(stop) -> None:
    """SIGTERM/first SIGINT: drain and stop. Second SIGINT: exit now."""
    state = {"interrupted": False}

    def on_term(signum, frame):
        log.info("signal %d: finishing the batch in hand, committing, then stopping", signum)
        stop()

    def on_int(signum, frame):
        if state["interrupted"]:
            log.warning("second SIGINT: exiting immediately")
            os._exit(130)
        state["interrupted"] = True
        on_term(signum, frame)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_int)


def run(settings: Settings, *, max_idle_s: float | None = None) -> int:
    """The worker process: ingest until stopped (or idle for ``max_idle_s``); returns its exit code."""
    pin_malloc_mmap_threshold()
    # Signals first: a SIGTERM during start-up (loading torch, opening the store) must not kill the
    # process with the default action.
    stopping = threading.Event()
    install_signal_handlers(stopping.set)
    signal.signal(signal.SIGUSR1, lambda *_: log.info("SIGUSR1: learning rounds run in `streamhash learner`; signal it there"))
    if not settings.kafka.bootstrap_servers:
        log.error("no broker configured: set STREAMHASH_KAFKA__BOOTSTRAP_SERVERS or --bootstrap-servers "
                  "(or run `streamhash broker` for an embedded one)")
        return EXIT_USAGE
    settings.log_startup("streamhash-worker")
    try:
        worker = Worker(settings, stopping=stopping)
        m.serve_metrics(settings.worker.metrics_port, settings.worker.metrics_host)
        return worker.run(max_idle_s=max_idle_s)
    except (LegacyLayoutError, SchemaMismatchError, ConfigError) as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    except StoreFullError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_TEMPFAIL
