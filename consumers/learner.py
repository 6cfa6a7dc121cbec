"""``streamhash-learner``: the learner process (DIHN rounds over the shards, model versions and learned
codes published on Kafka). Wiring lives in :mod:`streamhash.services.learner`; this is its console entry
point (same as ``streamhash learner``)."""

from __future__ import annotations

import argparse
import signal


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a "learn now" request, never a kill, while starting up
    from streamhash.lifetime import exit_on_stop_signals

    exit_on_stop_signals()  # a stop while torch loads; learner.run installs its own handlers
    from streamhash.cli import document_env, learner_arguments, settings_from_args
    from streamhash.config import setup_logging
    from streamhash.services import learner

    p = argparse.ArgumentParser(prog="streamhash-learner", description="Learn from the shards; publish models and learned codes.")
    learner_arguments(p)
    document_env(p)
    settings = settings_from_args(p.parse_args(argv))
    setup_logging(settings.log_level)
    return learner.run(settings)


if __name__ == "__main__":
    raise SystemExit(main())
