"""``streamhash`` command line: broker, produce, worker, learner, serve, query, dlq, demo, eval.

Every flag maps to a settings field (``dest="section.field"``), so each one can also be set by
environment variable (``STREAMHASH_SECTION__FIELD``); flags win over the environment.

A command that cannot do what was asked says why in one line on stderr and exits with a code of its
kind (``streamhash.errors``): 1 no hit, 2 usage, 3 dataset missing, 65 input refused by the contract,
66 file missing or unreadable, 69 server or broker unreachable, 70 server error, 78 configuration.
"""

from __future__ import annotations

import argparse
import signal
import sys

from streamhash.config import Settings, load_settings, setup_logging
from streamhash.errors import (
    EXIT_CONFIG, EXIT_DATAERR, EXIT_DATASET_MISSING, EXIT_NOINPUT, EXIT_NOT_FOUND, EXIT_SOFTWARE, EXIT_UNAVAILABLE,
    EXIT_USAGE, BrokerError, ConfigError, DatasetMissingError, RecordRejected,
)
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
    from streamhash.kafka.broker import serve

    settings = settings_from_args(args)
    setup_logging(settings.log_level)
    return serve(settings.data.home, args.port)


class CommandFailed(Exception):
    """A command that cannot do what was asked: one line for stderr and the exit code of its kind."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise CommandFailed(f"no such {what} file: {path}", EXIT_NOINPUT) from None
    except IsADirectoryError:
        raise CommandFailed(f"{path} is a folder, not an {what} file", EXIT_NOINPUT) from None
    except OSError as exc:
        raise CommandFailed(f"cannot read {what} file {path}: {exc.strerror or exc}", EXIT_NOINPUT) from None


def _check_broker(settings: Settings, timeout_s: float = 5.0) -> None:
    """Fail in seconds, in words, when no bootstrap server accepts a connection (kafka-python spends its whole
    request timeout, 30 s, before it says ``Unable to bootstrap``)."""
    import socket

    servers = settings.kafka.bootstrap_servers
    if not servers:
        raise CommandFailed("no broker: set STREAMHASH_KAFKA__BOOTSTRAP_SERVERS or --bootstrap-servers", EXIT_USAGE)
    reasons = []
    for server in servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=timeout_s).close()
            return
        except ValueError:
            raise CommandFailed(f"bad bootstrap server {server!r}: expected host:port", EXIT_USAGE) from None
        except OSError as exc:
            reasons.append(f"{server.strip()}: {exc.strerror or exc}")
    raise CommandFailed(f"cannot reach the broker ({'; '.join(reasons)}): start one (`streamhash broker`) or set "
                        "STREAMHASH_KAFKA__BOOTSTRAP_SERVERS", EXIT_UNAVAILABLE)


def _produce(args) -> int:
    import itertools
    from pathlib import Path

    import numpy as np
    from tqdm import tqdm

    from streamhash.data.fashion_mnist import N_IMAGES
    from streamhash.kafka.produce import check, converted, from_arrays, from_dataset, from_folder, hint, make_producer, send
    from streamhash.services.spec import image_spec

    settings = settings_from_args(args)
    setup_logging(settings.log_level)
    if not args.check:
        _check_broker(settings)
    total, ps = None, settings.produce
    if args.dataset:
        messages = from_dataset(args.dataset, shuffle_seed=ps.shuffle_seed, folder=settings.data.fashion_mnist_dir, fmt=ps.format)
        total = N_IMAGES
    elif args.source and args.source.endswith(".npy"):
        images, labels = _load_npy(args.source, "images"), _load_npy(args.labels, "labels") if args.labels else None
        if labels is not None and len(labels) != len(images):
            raise CommandFailed(f"{args.labels} holds {len(labels)} labels for {len(images)} images", EXIT_USAGE)
        if ps.shuffle_seed is not None:
            order = np.random.default_rng(ps.shuffle_seed).permutation(len(images))
            images, labels = images[order], (labels[order] if labels is not None else None)
        messages, total = from_arrays(images, labels, prefix=args.id_prefix or Path(args.source).stem + "-", fmt=ps.format), len(images)
    elif args.source:
        folder = Path(args.source)
        if not folder.is_dir():
            raise CommandFailed(f"no such folder: {folder}" if not folder.exists() else
                                f"{folder} is neither a folder nor a .npy batch", EXIT_NOINPUT)
        messages = _readable(from_folder(folder))
        first = next(messages, None)
        if first is None:
            raise CommandFailed(f"no PNG, JPEG or .npy files under {folder}", EXIT_NOINPUT)
        messages = itertools.chain([first], messages)
    else:
        raise CommandFailed("give a folder, a .npy file, or --dataset fashion-mnist", EXIT_USAGE)

    spec = image_spec(settings)
    refused: dict[str, int] = {}
    hints: set[str] = set()
    checked = [0]

    def accepted():
        """The messages a worker would index, each refusal said as it is met: with --limit, up to that many."""
        for msg in messages:
            if ps.limit is not None and checked[0] >= ps.limit:
                return
            try:
                if args.resize or args.mode:
                    msg = converted(msg, spec, mode=args.mode or ("gray" if spec.channels == 1 else "rgb"),
                                    resize=args.resize or "exact")
                err = None if args.no_check else check(msg, spec)
            except RecordRejected as exc:
                err = exc
            if err is not None:
                refused[err.stage] = refused.get(err.stage, 0) + 1
                tqdm.write(f"refused {msg.key}: {err.stage}: {err.message}", file=sys.stderr)
                if (h := hint(err, spec)) is not None:
                    hints.add(h)
                continue
            checked[0] += 1
            yield msg

    def refusals() -> str:
        return f"{sum(refused.values())} refused ({', '.join(f'{k} {v}' for k, v in sorted(refused.items()))})"

    if args.check:
        n = sum(1 for _ in accepted())
        print(f"checked: {n} would be indexed, " + (refusals() + " would be dead-lettered" if refused else "none refused"))
    else:
        try:
            producer = make_producer(settings.kafka)
        except Exception as exc:  # noqa: BLE001 -- kafka-python raises KafkaTimeoutError, NoBrokersAvailable, ...
            raise CommandFailed(f"cannot connect to the broker at {settings.kafka.bootstrap_servers}: {exc}",
                                EXIT_UNAVAILABLE) from None
        try:
            n = send(producer, settings.kafka.topic, accepted(), progress=not ps.quiet, total=ps.limit or total)
        except RuntimeError as exc:
            raise CommandFailed(f"sending to {settings.kafka.topic} failed: {exc}", EXIT_UNAVAILABLE) from None
        finally:
            producer.close()
        print(f"sent {n} images to {settings.kafka.topic}" + (f"; {refusals()}, not sent: a worker would dead-letter "
                                                               "them" if refused else ""))
    for h in sorted(hints):
        print(f"hint: {h}", file=sys.stderr)
    return EXIT_DATAERR if refused else 0


def _load_npy(path: str, what: str):
    import numpy as np

    _read_file(path, what)  # missing or unreadable: said as such, not as numpy's error
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise CommandFailed(f"{path} is not a .npy array of {what}: {exc}", EXIT_DATAERR) from None


def _readable(messages):
    """A folder's messages, a file that cannot be read said in words (``from_folder`` reads each file)."""
    try:
        yield from messages
    except OSError as exc:
        raise CommandFailed(f"cannot read {exc.filename}: {exc.strerror or exc}", EXIT_NOINPUT) from None


def _http(method: str, url: str, base: str, **kw):
    """One request to the query server at ``base``; unreachable or timed out: CommandFailed, in words."""
    import httpx

    try:
        return httpx.request(method, url, timeout=30, **kw)
    except httpx.ConnectError as exc:
        raise CommandFailed(f"cannot reach the query server at {base} ({_reason(exc)}): start it with "
                            "`streamhash serve`, or give --url", EXIT_UNAVAILABLE) from None
    except httpx.TimeoutException:
        raise CommandFailed(f"the query server at {base} did not answer within 30 s", EXIT_UNAVAILABLE) from None
    except httpx.UnsupportedProtocol:
        raise CommandFailed(f"bad --url {base!r}: expected http://host:port", EXIT_USAGE) from None
    except httpx.HTTPError as exc:
        raise CommandFailed(f"the query server at {base} broke off: {type(exc).__name__}: {exc}", EXIT_UNAVAILABLE) from None


def _reason(exc: Exception) -> str:
    text = str(exc)
    return "connection refused" if "refused" in text.lower() else text or type(exc).__name__


def _detail(r) -> str:
    try:
        detail = r.json().get("detail")
    except ValueError:
        detail = None
    detail = detail if isinstance(detail, str) else (str(detail) if detail is not None else r.text[:300])
    return " ".join(detail.split())  # one line


def _query(args) -> int:
    import base64
    import json

    body: dict = {"k": args.k}
    if args.radius is not None:
        body["radius"] = args.radius
    if args.code:
        body["code_hex"] = args.code
    else:
        body["image_base64"] = base64.b64encode(_read_file(args.image, "image")).decode()
    base = args.url.rstrip("/")
    r = _http("POST", f"{base}/search", base, json=body)
    if 400 <= r.status_code < 500:
        what = f"image {args.image}" if not args.code else f"code {args.code}"
        raise CommandFailed(f"the server refused the {what} ({r.status_code}): {_detail(r)}", EXIT_DATAERR)
    if r.status_code != 200:
        raise CommandFailed(f"the query server failed ({r.status_code}): {_detail(r)} (its log says why)", EXIT_SOFTWARE)
    res = r.json()
    if args.json:
        print(json.dumps(res))
    else:
        print(f"model v{res['model_version']} generation {res['generation']}, {res.get('index_size', '?')} items  "
              f"({res['took_ms']:.2f} ms)")
        if res["model_version"] <= 1:
            print(f"note: {_untrained_note(base)}")
        for hit in res["results"]:
            names = hit.get("label_names")
            named = f"  ({', '.join(names)})" if names else ""
            print(f"  {hit['distance']:3d}  {hit['id']}  labels={hit['labels']}{named}")
    if not res["results"]:
        if args.radius is not None:
            raise CommandFailed(f"no item within radius {args.radius}", EXIT_NOT_FOUND)
        raise CommandFailed("no item: the index is empty", EXIT_NOT_FOUND)
    return 0


def _untrained_note(base: str) -> str:
    """The server's own words on what an untrained model waits for (its /status), or ours without it."""
    try:
        import httpx

        note = httpx.get(f"{base}/status", timeout=5).json()["model"]["note"]
        if note:
            return note
    except Exception:  # noqa: BLE001 -- an older server or a router has no such field: say it ourselves
        pass
    return ("the model is untrained (version 1, no learning round yet): hits are close to noise until the learner's "
            "first round, which waits for labeled items (STREAMHASH_LEARN__ROUND_EVERY of them)")


def _delete(args) -> int:
    """Tombstones (a null value for each id) on the images topic: each worker removes the item from its shard."""
    from streamhash.kafka.produce import make_producer

    settings = settings_from_args(args)
    setup_logging(settings.log_level)
    bad = [i for i in args.ids if not 1 <= len(i.encode()) <= 256]
    if bad:
        raise CommandFailed(f"an item id is 1..256 bytes of UTF-8, got {bad[0]!r}", EXIT_USAGE)
    _check_broker(settings)
    producer = make_producer(settings.kafka)
    try:
        for fut in [producer.send(settings.kafka.topic, key=i.encode(), value=None) for i in args.ids]:
            fut.get(timeout=settings.kafka.request_timeout_ms / 1000)
    except Exception as exc:  # noqa: BLE001 -- kafka-python raises KafkaTimeoutError, NoBrokersAvailable, ...
        raise CommandFailed(f"sending tombstones to {settings.kafka.topic} failed: {exc}", EXIT_UNAVAILABLE) from None
    finally:
        producer.close()
    print(f"sent {len(args.ids)} tombstone(s) to {settings.kafka.topic}: each item leaves its shard, the live index "
          f"and every search once its worker commits them")
    return 0


def _dlq(args) -> int:
    import json

    from streamhash.kafka.dlq_reader import DeadLetterReader, NoDeadLetterTopic, replay, summarize

    settings = settings_from_args(args)
    setup_logging(settings.log_level)
    _check_broker(settings)
    kafka = settings.kafka
    try:
        reader = DeadLetterReader(kafka)
    except NoDeadLetterTopic as exc:
        raise CommandFailed(str(exc), EXIT_NOT_FOUND) from None
    try:
        letters = [d for d in reader.read_to_end() if args.stage is None or d.stage == args.stage]
        if args.replay:
            from streamhash.kafka.produce import make_producer

            producer = make_producer(kafka)
            try:
                n = replay(producer, kafka.topic, letters)
            finally:
                producer.close()
            skipped = len(letters) - n
            print(f"replayed {n} dead letters to {kafka.topic}" + (f" ({skipped} skipped: their value was dropped "
                                                                   "for size)" if skipped else ""))
            return 0
        summary = summarize(letters)
        shown = letters[-args.last:] if args.last else []
        if args.json:
            print(json.dumps({"topic": kafka.dlq_topic, **summary, "letters": [d.as_dict() for d in shown]}), flush=True)
        else:
            print(f"{kafka.dlq_topic}: {summary['total']} dead letters (one per refused message)")
            if letters:
                print("  by stage:  " + ", ".join(f"{k} {v}" for k, v in summary["by_stage"].items()))
                print("  by class:  " + ", ".join(f"{k} {v}" for k, v in summary["by_class"].items()))
                print(f"last {len(shown)}:")
            for d in shown:
                print(_letter_line(d))
        if args.follow:
            for d in reader.follow():
                if args.stage is None or d.stage == args.stage:
                    print(json.dumps(d.as_dict()) if args.json else _letter_line(d), flush=True)
    finally:
        reader.close()
    return 0


def _letter_line(d) -> str:
    topic, part, off = d.source
    key = "(no key)" if d.key is None else d.as_dict()["key"]
    key = key if len(key) <= 60 else key[:57] + "..."
    return f"  {key}  {d.stage}  {d.error_class}: {' '.join(d.reason.split())}  [{topic} partition {part} offset {off}]"


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
    pr.add_argument("--check", action="store_true", help="only check each message against the image contract (what a "
                    "worker would dead-letter, and why); send nothing")
    pr.add_argument("--no-check", action="store_true", help="send without checking (every message still reaches the "
                    "workers' check)")
    pr.add_argument("--resize", choices=["fit", "fill", "stretch"], help="convert each image to the network's size "
                    "here, before sending, as a PNG (fill: centre crop; fit: letterbox)")
    pr.add_argument("--mode", choices=["gray", "rgb"], help="convert each image to this colour mode here, before sending")
    pr.set_defaults(func=_produce)

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
    dl.set_defaults(func=_dlq)

    de = sub.add_parser("delete", help="remove items: a tombstone (null value) per id on the images topic; each "
                        "worker removes the item from its shard, the live index and every search")
    de.add_argument("ids", nargs="+", metavar="ID", help="item ids (the message keys they were sent with)")
    de.add_argument("--bootstrap-servers", dest="kafka.bootstrap_servers")
    de.add_argument("--topic", dest="kafka.topic", help="the images topic")
    de.set_defaults(func=_delete)

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
