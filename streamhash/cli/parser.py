"""The ``streamhash`` parser and ``main``: each command's flags, the process commands (broker, worker, learner,
serve, demo) and the one-line failure with its exit code."""

from __future__ import annotations

import argparse
import signal
import sys

from streamhash.cli.commands import delete, dlq, query
from streamhash.cli.common import CommandFailed, settings_from_args, settings_with_logging
from streamhash.cli.produce import produce, produce_arguments
from streamhash.config import setup_logging
from streamhash.errors import (
    EXIT_CONFIG, EXIT_DATASET_MISSING, EXIT_UNAVAILABLE, EXIT_USAGE, BrokerError, ConfigError, DatasetMissingError,
)
from streamhash.index.backends import backend_names


def _broker(args) -> int:
    from streamhash.kafka.broker import serve

    settings = settings_from_args(args)
    setup_logging(settings.log_level)
    return serve(settings.data.home, args.port)


def worker_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers", dest="kafka.bootstrap_servers", help="Kafka bootstrap servers (env STREAMHASH_KAFKA__BOOTSTRAP_SERVERS)")
    p.add_argument("--topic", dest="kafka.topic")
    p.add_argument("--group-id", dest="kafka.group_id")
    p.add_argument("--store", dest="store.path", help="store root: one LMDB shard per (topic, partition) under it, "
                   "shared by every worker of the group (env STREAMHASH_STORE__PATH)")
    p.add_argument("--bits", dest="model.bits", type=int)
    p.add_argument("--device", dest="model.device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--metrics-port", dest="worker.metrics_port", type=int)
    p.add_argument("--max-idle-s", type=float, default=None, help="exit after this long with nothing to consume")


def learner_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers", dest="kafka.bootstrap_servers", help="Kafka bootstrap servers")
    p.add_argument("--topic", dest="kafka.topic", help="the images topic whose shards it learns from")
    p.add_argument("--store", dest="store.path", help="follow this store root's shard files (read-only, on the "
                   "workers' machine) instead of the changelog topic, which needs no root (env STREAMHASH_STORE__PATH)")
    p.add_argument("--state", dest="learn.state_path", help="the learner's own state store when it reads the changelog "
                   "(default var/learner; env STREAMHASH_LEARN__STATE_PATH)")
    p.add_argument("--bits", dest="model.bits", type=int)
    p.add_argument("--device", dest="model.device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--metrics-port", dest="learn.metrics_port", type=int)
    p.add_argument("--nice", dest="learn.nice", type=int, help="niceness added at start (default 10): ingestion keeps the cores")
    p.add_argument("--torch-threads", dest="learn.torch_threads", type=int, help="default 1")


def serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", dest="store.path", help="store root to serve, every shard under it (read-only)")
    p.add_argument("--host", dest="server.host")
    p.add_argument("--port", dest="server.port", type=int)
    p.add_argument("--backend", dest="server.backend", choices=backend_names())
    p.add_argument("--workers", dest="server.workers", type=int,
                   help="server processes over the same read-only store, each with its own in-memory index (default 1)")
    p.add_argument("--shards", dest="server.shards", metavar="URL,URL,...",
                   help="run a router instead: no store, each search sent to these query servers and merged (in this "
                        "order for ties)")
    p.add_argument("--shard-timeout-s", dest="server.shard_timeout_s", type=float,
                   help="a router's wait for each query server; one past it is left out and named (default 1.0)")
    p.add_argument("--discover", dest="server.discover", action="store_const", const=True,
                   help="run a router that finds the query servers on Kafka: each partition of --topic routed to one "
                        "server that advertises it (no --shards, no --store)")
    p.add_argument("--advertise-url", dest="server.advertise_url", metavar="URL",
                   help="a query server's URL as a router reaches it: the partitions it serves are advertised there on "
                        "Kafka (<topic>.serving) for --discover routers")
    p.add_argument("--bootstrap-servers", dest="kafka.bootstrap_servers",
                   help="Kafka, for --advertise-url and --discover")
    p.add_argument("--topic", dest="kafka.topic", help="the images topic whose partitions are advertised and routed")


def demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", dest="demo.dataset", choices=("fashion-mnist", "cifar10"),
                   help="fashion-mnist (default), or cifar10: photos, through the frozen EfficientNet-Lite0")
    p.add_argument("--limit", dest="demo.limit", type=int, help="images to stream (default 10000; cifar10: 2000)")
    p.add_argument("--queries", dest="demo.queries", type=int, help="held-out query images (default 200; cifar10: 100)")
    p.add_argument("--probes", dest="demo.probes", type=int, help="freshness probes (default 50)")
    p.add_argument("--bits", dest="model.bits", type=int)
    p.add_argument("--workdir", dest="demo.workdir", help="wiped at start: broker log, index, process logs (default var/demo)")
    p.add_argument("--serve", "--keep-running", dest="demo.keep_running", action="store_const", const=True,
                   help="after the summary, keep broker, worker, learner and query server running (the search page "
                        "is at the printed URL) until Ctrl-C, then stop them all")
    p.add_argument("--json", dest="demo.json_summary", action="store_const", const=True,
                   help="end with the summary as one JSON object")
    p.add_argument("--quiet", dest="demo.quiet", action="store_const", const=True)


# The services are imported when their command runs: `streamhash query` must not load torch.
def _worker(args) -> int:
    from streamhash.services import worker

    return worker.run(settings_with_logging(args), max_idle_s=args.max_idle_s)


def _learner(args) -> int:
    from streamhash.lifetime import exit_on_stop_signals

    exit_on_stop_signals()  # a stop while torch loads; learner.run installs its own handlers
    from streamhash.services import learner

    return learner.run(settings_with_logging(args))


def _serve(args) -> int:
    settings = settings_with_logging(args)
    if settings.server.shards or settings.server.discover:  # a router holds no store, never encodes: no torch
        from streamhash.services import router

        return router.run(settings)
    from streamhash.services import query

    return query.run(settings)


def _demo(args) -> int:
    from streamhash.services import demo

    return demo.run(settings_from_args(args))  # the demo sets its own log level (quiet for --json)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamhash", description="Online deep hashing over a Kafka stream.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("broker", help="run the embedded Kafka-protocol broker (Tansu) on loopback")
    b.add_argument("--port", type=int, default=9092)
    b.set_defaults(func=_broker)

    pr = sub.add_parser("produce", help="send images to the topic")
    produce_arguments(pr)
    pr.set_defaults(func=produce)

    dl = sub.add_parser("dlq", help="read the dead-letter topic: counts by stage and error class, the last "
                        "refused messages and why; --replay sends them back to the images topic")
    dl.add_argument("--last", type=int, default=20, help="show the last N dead letters (default 20; 0: counts only)")
    dl.add_argument("--stage", help="only dead letters of this stage (key, value, headers, decode, shape, encode, process)")
    dl.add_argument("--json", action="store_true", help="one JSON object: total, by_stage, by_class, letters")
    dl.add_argument("--follow", action="store_true", help="then print each new dead letter as it comes, until Ctrl-C")
    dl.add_argument("--replay", action="store_true", help="send the dead letters (each with its original key, value and "
                    "headers) back to the images topic, after fixing what refused them")
    dl.add_argument("--bootstrap-servers", dest="kafka.bootstrap_servers")
    dl.add_argument("--topic", dest="kafka.topic", help="the images topic (replays go there)")
    dl.add_argument("--dlq-topic", dest="kafka.dlq_topic")
    dl.set_defaults(func=dlq)

    de = sub.add_parser("delete", help="remove items: a tombstone (null value) per id on the images topic; each "
                        "worker removes the item from its shard, the live index and every search")
    de.add_argument("ids", nargs="+", metavar="ID", help="item ids (the message keys they were sent with)")
    de.add_argument("--bootstrap-servers", dest="kafka.bootstrap_servers")
    de.add_argument("--topic", dest="kafka.topic", help="the images topic")
    de.set_defaults(func=delete)

    w = sub.add_parser("worker", help="run an ingest worker (same as streamhash-worker)")
    worker_arguments(w)
    w.set_defaults(func=_worker)

    lr = sub.add_parser("learner", help="run the learner: DIHN rounds over the shards, models and codes published "
                        "(same as streamhash-learner)")
    learner_arguments(lr)
    lr.set_defaults(func=_learner)

    s = sub.add_parser("serve", help="run the query server over a store root (HTTP search + /metrics), or a router (--shards, "
                       "or --discover: the query servers found on Kafka)")
    serve_arguments(s)
    s.set_defaults(func=_serve)

    q = sub.add_parser("query", help="search the live index with an image or a hex code")
    q.add_argument("image", nargs="?")
    q.add_argument("--code", help="hex code instead of an image")
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--radius", type=int)
    q.add_argument("--url", default="http://127.0.0.1:8080")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=query)

    d = sub.add_parser("demo", help="the whole system on the embedded broker with Fashion-MNIST (--dataset cifar10: photos)")
    demo_arguments(d)
    d.set_defaults(func=_demo)

    from streamhash.eval import cli as eval_cli

    e = sub.add_parser("eval", help="the learner against its baselines on streams of Fashion-MNIST (and digits): "
                                    "class-incremental, online, partial-labels, domain-shift, cold-start")
    eval_cli.add_arguments(e)
    e.set_defaults(func=eval_cli.run)
    return p


def document_env(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Name each settings-backed flag's environment variable in its help (and a readable metavar)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                document_env(sub)
        elif "." in action.dest:
            section, field = action.dest.split(".", 1)
            env = f"STREAMHASH_{section.upper()}__{field.upper()}"
            action.help = f"{action.help + '; ' if action.help else ''}env {env}"
            if action.nargs != 0 and action.metavar is None and not action.choices:
                action.metavar = field.upper()
    return parser


def main(argv: list[str] | None = None) -> int:
    # SIGUSR1 is a request ("learn now") to a running worker, never a kill: ignored until a process
    # installs its handler, so one sent while torch is still importing does not end the process.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    args = document_env(build_parser()).parse_args(argv)
    if args.command == "query" and not (args.image or args.code):
        print("streamhash query: give an image path or --code", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except CommandFailed as exc:
        code, message = exc.code, str(exc)
    except DatasetMissingError as exc:
        code, message = EXIT_DATASET_MISSING, str(exc)
    except ConfigError as exc:
        code, message = EXIT_CONFIG, str(exc)
    except BrokerError as exc:
        code, message = EXIT_UNAVAILABLE, str(exc)
    except KeyboardInterrupt:
        return 130  # 128 + SIGINT, as a shell reports it
    except Exception as exc:  # noqa: BLE001 -- only a broker or server out of reach is put in words; bugs keep their traceback
        if (said := _unreachable(exc)) is None:
            raise
        code, message = EXIT_UNAVAILABLE, said
    print(f"streamhash {args.command}: {message}", file=sys.stderr)
    return code


def _unreachable(exc: Exception) -> str | None:
    """A sentence for a broker or HTTP server that could not be reached (a worker or learner started before its
    broker: kafka-python's KafkaTimeoutError 'Unable to bootstrap' after 30 s), else None."""
    module = type(exc).__module__
    if module.startswith("kafka"):
        return f"the broker could not be reached or answered with an error ({type(exc).__name__}: {exc}); check " \
               "STREAMHASH_KAFKA__BOOTSTRAP_SERVERS and that the broker is up"
    if module.startswith("httpx") and type(exc).__name__ in ("ConnectError", "ConnectTimeout"):
        return f"a server could not be reached ({exc})"
    return None
