"""``streamhash`` command line: broker, produce, worker, learner, serve, query, demo, eval.

Every flag maps to a settings field (``dest="section.field"``), so each one can also be set by
environment variable (``STREAMHASH_SECTION__FIELD``); flags win over the environment.
"""

from __future__ import annotations

import argparse
import signal
import sys

from streamhash.config import Settings, load_settings, setup_logging
from streamhash.errors import EXIT_USAGE
from streamhash.index.backends import backend_names


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Dotted ``dest`` names (``kafka.topic``) become nested overrides on top of the environment."""
    overrides: dict = {}
    for dest, value in vars(args).items():
        if "." not in dest or value is None:
            continue
        section, field = dest.split(".", 1)
        overrides.setdefault(section, {})[field] = value
    return load_settings(overrides)


def _broker(args) -> int:
    import threading

    from streamhash.kafka.broker import EmbeddedBroker

    settings = settings_from_args(args)
    setup_logging(settings.log_level)
    broker = EmbeddedBroker(home=settings.data.home, port=args.port).start()
    print(f"Kafka-protocol broker (Tansu, memory storage) listening on {broker.bootstrap_servers}")
    print(f"  export STREAMHASH_KAFKA__BOOTSTRAP_SERVERS={broker.bootstrap_servers}")
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(1.0):
        if broker.proc.poll() is not None:
            print(f"broker exited with code {broker.proc.returncode}", file=sys.stderr)
            return 1
    broker.stop()
    return 0


def _produce(args) -> int:
    from pathlib import Path

    import numpy as np

    from streamhash.data.fashion_mnist import N_IMAGES
    from streamhash.errors import EXIT_DATASET_MISSING, DatasetMissingError
    from streamhash.kafka.produce import (
        from_arrays,
        from_dataset,
        from_folder,
        make_producer,
        send,
    )

    settings = settings_from_args(args)
    setup_logging(settings.log_level)
    if not settings.kafka.bootstrap_servers:
        print("no broker: set STREAMHASH_KAFKA__BOOTSTRAP_SERVERS or --bootstrap-servers", file=sys.stderr)
        return EXIT_USAGE
    total, ps = None, settings.produce
    try:
        if args.dataset:
            messages = from_dataset(args.dataset, shuffle_seed=ps.shuffle_seed, folder=settings.data.fashion_mnist_dir, fmt=ps.format)
            total = N_IMAGES
        elif args.source and args.source.endswith(".npy"):
            images = np.load(args.source, allow_pickle=False)
            labels = np.load(args.labels, allow_pickle=False) if args.labels else None
            if ps.shuffle_seed is not None:
                order = np.random.default_rng(ps.shuffle_seed).permutation(len(images))
                images, labels = images[order], (labels[order] if labels is not None else None)
            messages, total = from_arrays(images, labels, prefix=args.id_prefix or Path(args.source).stem + "-", fmt=ps.format), len(images)
        elif args.source:
            messages = from_folder(Path(args.source))
        else:
            print("give a folder, a .npy file, or --dataset fashion-mnist", file=sys.stderr)
            return EXIT_USAGE
        producer = make_producer(settings.kafka)
        n = send(producer, settings.kafka.topic, messages, limit=ps.limit, rate=ps.rate, progress=not ps.quiet, total=total)
    except DatasetMissingError as exc:
        print(exc, file=sys.stderr)
        return EXIT_DATASET_MISSING
    producer.close()
    print(f"sent {n} images to {settings.kafka.topic}")
    return 0


def _query(args) -> int:
    import base64
    import json

    import httpx

    body: dict = {"k": args.k}
    if args.radius is not None:
        body["radius"] = args.radius
    if args.code:
        body["code_hex"] = args.code
    else:
        with open(args.image, "rb") as fh:
            body["image_base64"] = base64.b64encode(fh.read()).decode()
    r = httpx.post(f"{args.url.rstrip('/')}/search", json=body, timeout=30)
    if r.status_code != 200:
        print(f"error {r.status_code}: {r.text}", file=sys.stderr)
        return 1
    res = r.json()
    print(f"model v{res['model_version']} generation {res['generation']}  ({res['took_ms']:.2f} ms)")
    for hit in res["results"]:
        print(f"  {hit['distance']:3d}  {hit['id']}  labels={hit['labels']}")
    if args.json:
        print(json.dumps(res))
    return 0


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
    p.add_argument("--store", dest="store.path", help="the store root the workers write (read-only here)")
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


def demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", dest="demo.limit", type=int, help="images to stream (default 10000)")
    p.add_argument("--queries", dest="demo.queries", type=int, help="held-out query images (default 200)")
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

    return worker.run(_settings_with_logging(args), max_idle_s=args.max_idle_s)


def _learner(args) -> int:
    from streamhash.services import learner

    return learner.run(_settings_with_logging(args))


def _serve(args) -> int:
    settings = _settings_with_logging(args)
    if settings.server.shards:  # a router holds no store and never encodes: it does not load torch
        from streamhash.services import router

        return router.run(settings)
    from streamhash.services import query

    return query.run(settings)


def _demo(args) -> int:
    from streamhash.services import demo

    return demo.run(settings_from_args(args))  # the demo sets its own log level (quiet for --json)


def _settings_with_logging(args) -> Settings:
    settings = settings_from_args(args)
    setup_logging(settings.log_level)
    return settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamhash", description="Online deep hashing over a Kafka stream.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("broker", help="run the embedded Kafka-protocol broker (Tansu) on loopback")
    b.add_argument("--port", type=int, default=9092)
    b.set_defaults(func=_broker)

    pr = sub.add_parser("produce", help="send images to the topic")
    pr.add_argument("source", nargs="?", help="a folder of PNG/JPEG/.npy files or a .npy batch (n,H,W[,C])")
    pr.add_argument("--dataset", choices=["fashion-mnist"])
    pr.add_argument("--labels", help=".npy of labels for a .npy batch")
    pr.add_argument("--id-prefix")
    pr.add_argument("--limit", dest="produce.limit", type=int)
    pr.add_argument("--rate", dest="produce.rate", type=float, help="messages per second (default: as fast as possible)")
    pr.add_argument("--shuffle-seed", dest="produce.shuffle_seed", type=int)
    pr.add_argument("--format", dest="produce.format", choices=["png", "npy"], help="encoding for array sources (default png)")
    pr.add_argument("--quiet", dest="produce.quiet", action="store_const", const=True)
    pr.add_argument("--bootstrap-servers", dest="kafka.bootstrap_servers")
    pr.add_argument("--topic", dest="kafka.topic")
    pr.set_defaults(func=_produce)

    w = sub.add_parser("worker", help="run an ingest worker (same as streamhash-worker)")
    worker_arguments(w)
    w.set_defaults(func=_worker)

    lr = sub.add_parser("learner", help="run the learner: DIHN rounds over the shards, models and codes published "
                        "(same as streamhash-learner)")
    learner_arguments(lr)
    lr.set_defaults(func=_learner)

    s = sub.add_parser("serve", help="run the query server over a store root (HTTP search + /metrics), or a router (--shards)")
    serve_arguments(s)
    s.set_defaults(func=_serve)

    q = sub.add_parser("query", help="search the live index with an image or a hex code")
    q.add_argument("image", nargs="?")
    q.add_argument("--code", help="hex code instead of an image")
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--radius", type=int)
    q.add_argument("--url", default="http://127.0.0.1:8080")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_query)

    d = sub.add_parser("demo", help="the whole system on the embedded broker with Fashion-MNIST")
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
        print("give an image path or --code", file=sys.stderr)
        return EXIT_USAGE
    return int(args.func(args) or 0)
