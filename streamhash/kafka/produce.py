"""Producing images: sources (a folder, image arrays) and a rate-limited sender. It knows no dataset: the CLI
loads a named one from :mod:`streamhash.data` and sends its arrays.

A source yields :class:`Outgoing` messages; :func:`send` puts them on the topic with the contract's
key and headers, at an optional rate, with a progress bar. :func:`check` runs each message through the
workers' own parser (:func:`streamhash.records.parse_message`) first, so what a worker would dead-letter
is named before it is sent; :func:`converted` fits an image to the network on the producer's side.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from kafka import KafkaProducer
from tqdm import tqdm

from streamhash.config import KafkaSettings
from streamhash.errors import RecordRejected
from streamhash.imaging import Conversion
from streamhash.kafka.partitioner import HomePartitioner
from streamhash.records import ImageSpec, encode_npy, encode_png, message_headers, parse_message

log = logging.getLogger(__name__)

PACE_S = 0.005  # send() sleeps only when this far ahead of its rate
_SUFFIX_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".npy": "application/x-npy"}


@dataclass(frozen=True)
class Outgoing:
    key: str
    value: bytes
    content_type: str
    labels: tuple[int, ...] | int | None
    label_names: tuple[str, ...] | str | None = None  # each label's class name, sent as the label-names header


def make_producer(kafka: KafkaSettings, **overrides) -> KafkaProducer:
    # Batching settings measured in docs/KAFKA.md: 20-37k messages/s of 3 KB on two cores.
    kw = dict(acks="all", linger_ms=10, batch_size=262_144, max_request_size=16 << 20, retries=5)
    if kafka.partitioner != "murmur2":  # kafka-python's default is murmur2: keys go where the workers want them
        kw["partitioner"] = HomePartitioner(kafka.partitioner)
    kw.update(overrides)
    return KafkaProducer(**kafka.client_kwargs(), **kw)


def from_arrays(images: np.ndarray, labels: Iterable | None, *, prefix: str, fmt: str = "png", start: int = 0,
                order: Iterable[int] | None = None, classes: Sequence[str] | None = None) -> Iterator[Outgoing]:
    """Encode an image array as PNG or .npy messages keyed ``{prefix}{start + index}``, in ``order`` (indexes into
    the arrays; default: as they are), so an image keeps its id however the stream is shuffled. ``classes``:
    label -> class name, sent with each message (the index keeps the map; the search page shows names)."""
    labels = list(labels) if labels is not None else [None] * len(images)
    enc, ctype = (encode_png, "image/png") if fmt == "png" else (encode_npy, "application/x-npy")
    for i in range(len(images)) if order is None else (int(i) for i in order):
        lab = labels[i]
        lab = None if lab is None else int(lab) if np.isscalar(lab) else tuple(int(v) for v in lab)
        names = None if lab is None or classes is None else (
            classes[lab] if isinstance(lab, int) else tuple(classes[v] for v in lab))
        yield Outgoing(f"{prefix}{start + i}", enc(images[i]), ctype, lab, names)


def from_folder(folder: Path) -> Iterator[Outgoing]:
    """Every PNG/JPEG/.npy file under ``folder``; a parent folder named by an integer is the label.

    Ids are paths relative to ``folder``, so re-sending a folder overwrites instead of duplicating.
    """
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in _SUFFIX_TYPES and p.is_file()):
        parent = path.parent.name
        label = int(parent) if parent.isdigit() and path.parent != folder else None
        yield Outgoing(str(path.relative_to(folder)), path.read_bytes(), _SUFFIX_TYPES[path.suffix.lower()], label)


def send(producer: KafkaProducer, topic: str, messages: Iterable[Outgoing], *, limit: int | None = None,
         rate: float | None = None, progress: bool = True, total: int | None = None) -> int:
    """Send up to ``limit`` messages at up to ``rate`` per second; flush and return the count sent."""
    start = time.monotonic()
    sent = 0
    errors: list[Exception] = []
    bar = tqdm(total=limit or total, unit="img", disable=not progress, mininterval=0.5)
    for msg in messages:
        if limit is not None and sent >= limit:
            break
        if rate:
            ahead = start + sent / rate - time.monotonic()
            if ahead > PACE_S:  # a sleep per message cost ~0.1 core at 1,000/s; a few ms early is still the rate
                time.sleep(ahead)
        fut = producer.send(topic, key=msg.key.encode(), value=msg.value, headers=message_headers(msg.labels, msg.content_type, msg.label_names))
        fut.add_errback(errors.append)
        sent += 1
        bar.update()
    producer.flush()
    bar.close()
    if errors:
        raise RuntimeError(f"{len(errors)} of {sent} messages failed to send; first error: {errors[0]!r}")
    return sent


def check(msg: Outgoing, spec: ImageSpec) -> RecordRejected | None:
    """What a worker with this spec would do with ``msg``: None (indexed) or the rejection it would dead-letter."""
    try:
        parse_message(msg.key.encode(), msg.value, message_headers(msg.labels, msg.content_type, msg.label_names), spec)
    except RecordRejected as exc:
        return exc
    return None


def converted(msg: Outgoing, spec: ImageSpec, *, mode: str | None, resize: str) -> Outgoing:
    """``msg`` as a PNG of the network's own shape, made by the workers' conversion rules (``mode``, ``resize``):
    a photo of any size and colour fits the default 28x28 gray contract. RecordRejected if it cannot be read."""
    spec_for = dataclasses.replace(spec, conversion=Conversion(mode=mode, resize=resize))
    rec = parse_message(msg.key.encode(), msg.value, message_headers(msg.labels, msg.content_type, msg.label_names),
                        spec_for)
    return Outgoing(msg.key, encode_png(rec.image), "image/png", msg.labels, msg.label_names)


def hint(error: RecordRejected, spec: ImageSpec) -> str | None:
    """What to do about a refusal that a conversion would fix (another size or colour mode), else None."""
    if error.stage != "shape" or "not an image" in error.message or "dtype" in error.message:
        return None
    mode = "gray" if spec.channels == 1 else "rgb"
    return (f"to send it anyway, convert it here with --resize fill --mode {mode} (the network takes "
            f"{spec.width}x{spec.height} {'gray' if spec.channels == 1 else 'RGB'}), or run every worker, learner and "
            f"query server with STREAMHASH_IMAGE__RESIZE=fill STREAMHASH_IMAGE__MODE={mode}")
