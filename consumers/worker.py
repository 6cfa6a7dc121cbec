"""``streamhash-worker``: the Kafka consumer process that ingests images. Wiring lives in
:mod:`streamhash.services.worker`; this is its console entry point (same as ``streamhash worker``)."""

from __future__ import annotations

import argparse
import signal


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a "learn now" request, never a kill, while starting up
    from streamhash.cli import document_env, settings_from_args, worker_arguments
    from streamhash.config import setup_logging
    from streamhash.services import worker

    p = argparse.ArgumentParser(prog="streamhash-worker", description="Consume images from Kafka into the LMDB hash index.")
    worker_arguments(p)
    document_env(p)
    args = p.parse_args(argv)
    settings = settings_from_args(args)
    setup_logging(settings.log_level)
    return worker.run(settings, max_idle_s=args.max_idle_s)


if __name__ == "__main__":
    raise SystemExit(main())
