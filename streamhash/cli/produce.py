"""``streamhash produce``: images from a folder, a .npy batch or a dataset, each checked against the image
contract (what a worker would dead-letter, said here), then sent to the images topic."""

from __future__ import annotations

import argparse
import sys

from streamhash.cli.common import CommandFailed, check_broker, read_file, settings_with_logging
from streamhash.errors import EXIT_DATAERR, EXIT_NOINPUT, EXIT_UNAVAILABLE, EXIT_USAGE, RecordRejected


def produce_arguments(pr: argparse.ArgumentParser) -> None:
    pr.add_argument("source", nargs="?", help="a folder of PNG/JPEG/.npy files or a .npy batch (n,H,W[,C])")
    pr.add_argument("--dataset", choices=["fashion-mnist", "cifar10", "folder"], help="a dataset, sent with its class "
                    "names (the search page shows them): fashion-mnist, cifar10 (the official python release or a "
                    "train|test/<class>/ tree of image files, found as `streamhash eval` finds it), or folder: your own "
                    "photos, one folder per class (--path)")
    pr.add_argument("--path", help="--dataset folder: the class-folder tree (a folder or a .tar.gz); cifar10: where it is")
    pr.add_argument("--split", choices=["train", "test", "all"], help="of a dataset split into train|test (default all)")
    pr.add_argument("--per-class", type=int, help="send only the first N images of each class (of each split)")
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


def produce(args) -> int:
    from streamhash.services.spec import image_spec

    settings = settings_with_logging(args)
    if not args.check:
        check_broker(settings)
    messages, total = _messages(args, settings)
    gate = _Gate(args, image_spec(settings), settings.produce.limit)
    if args.check:
        n = sum(1 for _ in gate.accepted(messages))
        print(f"checked: {n} would be indexed, " + (gate.refusals() + " would be dead-lettered" if gate.refused
                                                     else "none refused"))
    else:
        n = _send(settings, gate.accepted(messages), total)
        print(f"sent {n} images to {settings.kafka.topic}" + (f"; {gate.refusals()}, not sent: a worker would "
                                                               "dead-letter them" if gate.refused else ""))
    for h in sorted(gate.hints):
        print(f"hint: {h}", file=sys.stderr)
    return EXIT_DATAERR if gate.refused else 0


def _messages(args, settings):
    """The messages of the source the command names, and how many there are when that is known (else None)."""
    import itertools
    from pathlib import Path

    import numpy as np

    from streamhash.data import fashion_mnist
    from streamhash.kafka.produce import from_arrays, from_folder

    ps = settings.produce
    if args.dataset in ("cifar10", "folder"):
        from streamhash.cli.photos import photo_messages

        return photo_messages(args, settings)
    if args.dataset:  # fashion-mnist
        images, labels = fashion_mnist.load_all(settings.data.fashion_mnist_dir)
        order = None if ps.shuffle_seed is None else np.random.default_rng(ps.shuffle_seed).permutation(len(images))
        return from_arrays(images, labels, prefix=fashion_mnist.ID_PREFIX, fmt=ps.format, order=order,
                           classes=fashion_mnist.CLASSES), len(images)
    if args.source and args.source.endswith(".npy"):
        images, labels = _load_npy(args.source, "images"), _load_npy(args.labels, "labels") if args.labels else None
        if labels is not None and len(labels) != len(images):
            raise CommandFailed(f"{args.labels} holds {len(labels)} labels for {len(images)} images", EXIT_USAGE)
        if ps.shuffle_seed is not None:
            order = np.random.default_rng(ps.shuffle_seed).permutation(len(images))
            images, labels = images[order], (labels[order] if labels is not None else None)
        prefix = args.id_prefix or Path(args.source).stem + "-"
        return from_arrays(images, labels, prefix=prefix, fmt=ps.format), len(images)
    if args.source:
        folder = Path(args.source)
        if not folder.is_dir():
            raise CommandFailed(f"no such folder: {folder}" if not folder.exists() else
                                f"{folder} is neither a folder nor a .npy batch", EXIT_NOINPUT)
        if any(p.is_dir() and not p.name.isdigit() and not p.name.startswith(".") for p in folder.iterdir()):
            print(f"hint: {folder} has folders named by class: only a number names a label here; --dataset folder "
                  f"--path {folder} sends each photo labelled by its folder, with the class name", file=sys.stderr)
        messages = _readable(from_folder(folder))
        first = next(messages, None)
        if first is None:
            raise CommandFailed(f"no PNG, JPEG or .npy files under {folder}", EXIT_NOINPUT)
        return itertools.chain([first], messages), None
    raise CommandFailed("give a folder, a .npy file, or --dataset fashion-mnist|cifar10|folder", EXIT_USAGE)


class _Gate:
    """The messages a worker would index, each refusal said as it is met and counted by stage, with the hints
    on what to change; with --limit, up to that many accepted."""

    def __init__(self, args, spec, limit: int | None):
        self.args, self.spec, self.limit = args, spec, limit
        self.refused: dict[str, int] = {}
        self.hints: set[str] = set()
        self.checked = 0

    def accepted(self, messages):
        from tqdm import tqdm

        from streamhash.kafka.produce import check, converted, hint

        args, spec = self.args, self.spec
        for msg in messages:
            if self.limit is not None and self.checked >= self.limit:
                return
            try:
                if args.resize or args.mode:
                    msg = converted(msg, spec, mode=args.mode or ("gray" if spec.channels == 1 else "rgb"),
                                    resize=args.resize or "exact")
                err = None if args.no_check else check(msg, spec)
            except RecordRejected as exc:
                err = exc
            if err is not None:
                self.refused[err.stage] = self.refused.get(err.stage, 0) + 1
                tqdm.write(f"refused {msg.key}: {err.stage}: {err.message}", file=sys.stderr)
                if (h := hint(err, spec)) is not None:
                    self.hints.add(h)
                continue
            self.checked += 1
            yield msg

    def refusals(self) -> str:
        return f"{sum(self.refused.values())} refused ({', '.join(f'{k} {v}' for k, v in sorted(self.refused.items()))})"


def _send(settings, messages, total: int | None) -> int:
    from streamhash.kafka.produce import make_producer, send

    ps = settings.produce
    try:
        producer = make_producer(settings.kafka)
    except Exception as exc:  # noqa: BLE001 -- kafka-python raises KafkaTimeoutError, NoBrokersAvailable, ...
        raise CommandFailed(f"cannot connect to the broker at {settings.kafka.bootstrap_servers}: {exc}",
                            EXIT_UNAVAILABLE) from None
    try:
        return send(producer, settings.kafka.topic, messages, progress=not ps.quiet, total=ps.limit or total)
    except RuntimeError as exc:
        raise CommandFailed(f"sending to {settings.kafka.topic} failed: {exc}", EXIT_UNAVAILABLE) from None
    finally:
        producer.close()


def _load_npy(path: str, what: str):
    import numpy as np

    read_file(path, what)  # missing or unreadable: said as such, not as numpy's error
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
