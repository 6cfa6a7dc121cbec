"""``streamhash demo --dataset cifar10``: the demo's processes and steps on CIFAR-10 photos.

The same broker, worker, learner and query server as the Fashion-MNIST demo, run with the photo settings: the
frozen ImageNet EfficientNet-Lite0 at the eval's input size (:data:`streamhash.eval.cifar.MODEL`, 128x128) but
split at :data:`DEMO_CUT` ``head`` — the 1x1 head convolution learns with the hash head from the last block's
output, stored once per photo. The eval's ``stage7`` scores higher (0.8586 against 0.8453 mAP@all at full scale)
but its round costs about twice as much, and the demo's learning budget is two minutes (``STREAMHASH_MODEL__CUT`` /
``__INPUT_SIZE`` choose another), CIFAR-10's 32x32 RGB photos upsampled inside the network, and ``STREAMHASH_IMAGE__RESIZE=fill`` so the
search page takes a photo of any size. The stream is the Fashion-MNIST demo's protocol on CIFAR-10's train photos
(a seeded shuffle, a quarter unlabeled, :data:`LATE_CLASS` "truck" last), each labeled photo naming its class
(the ``label-names`` header: the page says "cat"); the queries are CIFAR-10 test photos, never indexed. The
malformed messages are those a photo contract still refuses (:data:`PHOTO_MALFORMED`: another size or colour is
converted here, not refused). The summary is the same, precision@10 before and after learning included.

Measured on 2 shared cores, 2,000 photos (:data:`LIMIT`), 2026-12-06, one run each: ``head`` at 128 (load ~11):
120 s in all, ingest 98 photos/s, the round on 1,548 photos 57 s, precision@10 0.271 -> 0.672; ``pooled`` at 224
(load ~12): 138 s, 37 photos/s, round 25 s, 0.269 -> 0.706; ``stage7`` at 224: its first round (764 photos)
had not ended when the demo's 120 s learning budget ran out.
"""

from __future__ import annotations

import math
import shutil
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from streamhash.config import Settings
from streamhash.kafka.broker import EmbeddedBroker
from streamhash.kafka.topics import ensure_topics
from streamhash.records import encode_png
from streamhash.services.demo import (LEARN_BUDGET_S, Progress, Stack, freshness, searches, serve, stream,
                                      start_processes)
from streamhash.services.demo.measure import scrape
from streamhash.services.demo.stream import LATE_CLASS, MALFORMED, Stream, stream_order
from streamhash.services.demo.summary import summarize, triggers_in
from streamhash.services.processes import stop

LIMIT = 2_000  # photos streamed by default (--limit): the whole demo in about 2 minutes on 2 busy cores
QUERIES = 100  # held-out query photos by default (--queries): each runs the frozen part in the query server
DEMO_CUT = "head"  # the cut the demo learns at unless STREAMHASH_MODEL__CUT says otherwise (module docstring: why)
PREFIX = "cifar10-demo-"  # not `produce`'s cifar10-<split>-<class>-<NNNN>: the demo draws a subset of its own


def _png_declaring(width: int, height: int) -> bytes:
    """A 65-byte PNG whose header claims ``width`` x ``height`` (a decompression bomb on the wire)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# The Fashion-MNIST demo's malformed messages but the two of another shape (a photo contract resizes and converts
# those), plus what a photo contract refuses: a declared size past the pixel limit (refused before decoding)
# and class names that do not match the labels.
PHOTO_MALFORMED = [m for m in MALFORMED if m[3] != "shape"] + [
    (b"bad-bomb", _png_declaring(30000, 30000), [("labels", b"3")], "decode"),
    (b"bad-names", encode_png(np.zeros((32, 32, 3), np.uint8)), [("labels", b"3,5"), ("label-names", b"cat")], "headers"),
]


def photo_env(settings: Settings) -> dict[str, str]:
    """The photo settings every process of the demo runs with: the eval's network (:data:`MODEL`) cut at
    :data:`DEMO_CUT`, but a cut or input size the user set."""
    from streamhash.eval.cifar import MODEL

    return {"STREAMHASH_MODEL__BACKBONE": MODEL["backbone"], "STREAMHASH_MODEL__CUT": settings.model.cut or DEMO_CUT,
            "STREAMHASH_MODEL__INPUT_SIZE": str(settings.model.input_size or MODEL["input_size"]),
            "STREAMHASH_MODEL__IMAGE_SIZE": str(MODEL["image_size"]), "STREAMHASH_MODEL__CHANNELS": str(MODEL["channels"]),
            "STREAMHASH_IMAGE__MODE": "rgb", "STREAMHASH_IMAGE__RESIZE": "fill"}


def load_photo_stream(settings: Settings, source: Path, limit: int, queries: int,
                      probes: int) -> tuple[Stream, tuple[str, ...]]:
    """The demo's :class:`Stream` over CIFAR-10 at ``source`` and its class names. Only the first photos of each
    class are decoded: enough for the stream and the probes (half as many again), and for the queries."""
    from streamhash.data import cifar10

    per_class = min(5000, math.ceil(1.5 * (limit + probes) / 10))
    train = cifar10.load_split("train", source, per_class=per_class)
    test = cifar10.load_split("test", source, per_class=min(1000, math.ceil(1.5 * queries / 10)))
    if limit > len(train) or queries > len(test):
        raise ValueError(f"the demo streams at most {len(train)} CIFAR-10 photos and queries at most {len(test)}")
    order, unlabeled = stream_order(train.labels, settings.model.seed, limit)
    q_idx = np.random.default_rng(settings.model.seed + 1).choice(len(test), size=queries, replace=False)
    return Stream(limit, train.images, train.labels, test.images, test.labels, order, unlabeled, q_idx), train.classes


def stream_photos(settings: Settings, stack: Stack, data: Stream, classes, progress: Progress, quiet: bool):
    """The Fashion-MNIST demo's bulk load, of PNG photos naming their class and :data:`PHOTO_MALFORMED`."""
    return stream(settings, stack, data, progress, quiet, malformed=PHOTO_MALFORMED, prefix=PREFIX, classes=classes,
                  noun="CIFAR-10 photos", per_second=2, note="; the worker runs the frozen backbone once per photo")


def run_photo_demo(settings: Settings, *, limit: int, queries: int, workdir: Path, keep_running: bool, quiet: bool,
                   probes: int = 50) -> dict:
    """:func:`streamhash.services.demo.run_demo` on CIFAR-10 photos: the summary, with ``dataset``, ``backbone``
    and ``cut`` added."""
    from streamhash.data import cifar10

    progress = Progress(quiet).start()
    # where CIFAR-10 is, before anything starts (else DatasetMissingError says where to get it); its photos are
    # read and decoded while the processes start (the JPEG tarball: the archive read once per split, ~15 s on 2
    # busy cores, beside their ~50 s)
    source = cifar10.find_source(settings.data.cifar10_dir, settings.data.home)
    loading = ThreadPoolExecutor(1, thread_name_prefix="demo-photos").submit(load_photo_stream, settings, source, limit,
                                                                              queries, probes)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    broker = None
    if not settings.kafka.bootstrap_servers:
        broker = EmbeddedBroker(home=workdir).start()
        settings.kafka.bootstrap_servers = broker.bootstrap_servers
    ensure_topics(settings.kafka)
    stack = Stack.on_free_ports(settings, workdir)
    stack.env.pop("STREAMHASH_DATA__CLASS_NAMES", None)  # Fashion-MNIST's: the photos name their classes themselves
    stack.env.update(photo_env(settings))
    try:
        start_processes(settings, stack, workdir, progress)
        progress.say("reading the CIFAR-10 photos", force=not loading.done())
        data, classes = loading.result()
        ingest, producer = stream_photos(settings, stack, data, classes, progress, quiet)
        delays, spare = freshness(settings, stack, data, producer, ingest, probes, progress)
        expected_codes = data.n_labeled + len(spare)
        searched = searches(settings, stack, data, ingest.truth, expected_codes, progress)
        lm = scrape(stack.learner_url) if stack.learner is not None else {}
        summary = summarize(ingest, delays, searched, stack.health(), lm, labeled=data.n_labeled, late_class=LATE_CLASS,
                            malformed=len(PHOTO_MALFORMED), bits=settings.model.bits, probes=probes,
                            learned_expected=expected_codes, learn_budget_s=LEARN_BUDGET_S, keep_running=keep_running,
                            triggers=triggers_in(workdir / "learner.log"),
                            reencoded_images=scrape(stack.worker_url).get("streamhash_reencoded_images_total", 0.0))
        net = {"backbone": stack.env["STREAMHASH_MODEL__BACKBONE"], "cut": stack.env["STREAMHASH_MODEL__CUT"],
               "input_size": int(stack.env["STREAMHASH_MODEL__INPUT_SIZE"])}
        # the title line names the network: the user set none of it, and its cut and size decide the numbers below
        title = f"CIFAR-10 photos through {net['backbone']} at {net['input_size']}, cut at {net['cut']}"
        summary.update(dataset="cifar10", dataset_title=title, late_class_name=classes[LATE_CLASS], **net)
        progress.stop()
        if keep_running:
            serve(settings, stack, summary)
        return summary
    finally:
        progress.stop()
        for p in reversed(stack.procs):
            stop(p)
        if broker is not None:
            broker.stop()
