"""The worker process (``streamhash worker``, ``streamhash-worker``): signals, the ingest loop
(:class:`~streamhash.services.ingest.IngestWorker`), the learner thread, exit codes.

SIGTERM or a first SIGINT drains the batch in hand, commits and leaves the group; a second SIGINT
exits at once (what was not committed is consumed again by the next owner, never lost). SIGUSR1
asks for a learning round now; it is never a kill. Exit codes: 0 stopped, 2 no broker configured,
73 the store is locked by another worker, 75 the disk or the broker failed past the retries.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from streamhash import metrics as m
from streamhash.config import Settings
from streamhash.errors import EXIT_CANTCREAT, EXIT_TEMPFAIL, EXIT_USAGE, StoreFullError, StoreLockedError
from streamhash.memory import pin_malloc_mmap_threshold
from streamhash.services.ingest import IngestWorker

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
    # Signals first: a SIGTERM or SIGUSR1 during start-up (loading torch, opening the store) must not
    # kill the process with the default action.
    stopping = threading.Event()
    learner_box: list = []
    install_signal_handlers(stopping.set)
    signal.signal(signal.SIGUSR1, lambda *_: _request_round(learner_box, settings.learn.enabled))
    if not settings.kafka.bootstrap_servers:
        log.error("no broker configured: set STREAMHASH_KAFKA__BOOTSTRAP_SERVERS or --bootstrap-servers "
                  "(or run `streamhash broker` for an embedded one)")
        return EXIT_USAGE
    settings.log_startup("streamhash-worker")
    try:
        worker = IngestWorker(settings, stopping=stopping)
    except StoreLockedError as exc:
        log.error("%s", exc)
        return EXIT_CANTCREAT
    except StoreFullError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_TEMPFAIL
    m.serve_metrics(settings.worker.metrics_port, settings.worker.metrics_host)
    learner = None
    if settings.learn.enabled:
        from streamhash.services.learner import LearnerThread

        learner = LearnerThread(worker)
        worker.listeners.append(learner)
        learner_box.append(learner)
        learner.start()
    try:
        return worker.run(max_idle_s=max_idle_s)
    finally:
        if learner is not None:
            learner.stop()
            learner.join(timeout=60)


def _request_round(learner_box: list, enabled: bool) -> None:
    """`kill -USR1 <pid>` asks for a learning round now, whatever the count of new items."""
    if learner_box:
        learner_box[0].request_round()
    elif enabled:
        log.info("SIGUSR1: the learner is still starting; ask again in a moment")
    else:
        log.info("SIGUSR1 ignored: learning is disabled (STREAMHASH_LEARN__ENABLED=false / --no-learn)")

