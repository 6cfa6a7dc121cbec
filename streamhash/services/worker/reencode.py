"""The worker's re-encoder: each shard it owns into the generation the learner announced, one at a time.

The learner announces a re-encode on ``streamhash.models`` (a model whose generation is above a
shard's). The worker that owns the shard builds that generation beside the live one with
:class:`~streamhash.index.store.GenerationBuilder` (learned codes and codes the new network inferred
already are copied; only stale inferred ones are decoded and encoded), swaps it in one transaction
and drops the old one, while ingestion goes on. A shard assigned later with an older generation is
queued when it is opened. The learner never writes a shard.

Ownership: a shard is closed (its partition revoked) only between builds (:meth:`Reencoder.holding`),
so a build never runs on a closed environment and the next owner waits at most one build.

Ingestion first: a build takes each of its steps (items copied, encoded or written) when the poll
thread is idle (:meth:`Reencoder.pause`), or after waiting ``YIELD_MAX_S`` for it. Its steps hold the
GIL most of the time (JSON records, PNG decoding): run back to back beside a batch, they slowed it
(250 learned codes applied in 22-55 ms beside a re-encode in ``bench_ingest --learn``, about 1.5x their
time alone in-process), and freshness p99 beside the learner stayed at 0.12-0.16 s once the LMDB writer
no longer made ingest wait. Its LMDB transactions
never stand in front of an ingest commit either (``Environment.write(background=True)``).

A step is 64 images encoded, on one torch thread. Timed in ``bench_ingest --learn`` (the learner taking
~0.8 of the 2 cores), 256-image steps on the worker's two torch threads took 110-140 ms each, and a probe
image polled meanwhile waited for the poll thread's share of the cores: during the re-encode p99 0.15-0.18
s; with 64 on one thread, steps took 2-40 ms and p99 was 0.11 s. A re-encode of ~2,000 images takes ~60
steps (encode, write) instead of ~16: under a steady stream (a step per ``YIELD_MAX_S``) ~5 s longer.
(Running the thread at a lower priority was tried and was worse, p99 0.18 s: a preempted step holds the
GIL the poll thread waits for.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from streamhash import metrics as m
from streamhash.index.reencode import shard_builder

log = logging.getLogger("streamhash.worker")

# The longest a build step waits for the poll thread to be idle: under a steady stream it never is, and
# the re-encode still goes on at one step (~10-20 ms of work) per this interval at least.
YIELD_MAX_S = 0.1


class Reencoder(threading.Thread):
    """What it needs and nothing more: the open shards (``shards.get(key)``), the announced model
    (``target()``), the networks by version (``nets.get``), the image spec, the poll thread's ``idle`` event,
    and ``on_done(key)`` after a swap."""

    def __init__(self, shards, target, nets, spec, idle: threading.Event, on_done, *, chunk: int = 64):
        super().__init__(name="reencoder", daemon=True)
        self.shards, self.target, self.nets, self.spec = shards, target, nets, spec
        self.idle, self.on_done, self.chunk = idle, on_done, chunk
        self._queue: deque = deque()
        self._wake = threading.Condition()
        self._building = threading.Lock()  # held for a whole build: closing a shard takes it too
        self._stop = False

    def submit(self, key) -> None:
        with self._wake:
            if key not in self._queue:
                self._queue.append(key)
            self._wake.notify()

    def holding(self):
        """A context in which no build runs (for closing a shard)."""
        return self._building

    def pause(self) -> None:
        """Before each build step: wait (at most YIELD_MAX_S) until the poll thread has no batch in hand."""
        self.idle.wait(YIELD_MAX_S)

    def pending(self) -> int:
        return len(self._queue)

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()

    def run(self) -> None:
        import torch

        torch.set_num_threads(1)  # background work: one core at most, the other stays the ingest thread's
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._queue or self._stop)
                if self._stop:
                    return
                key = self._queue.popleft()
            with self._building:
                try:
                    self.build(key)
                except Exception:  # a failed build drops what it wrote; the shard stays live at its generation
                    log.exception("re-encoding shard %s failed; it keeps serving its generation. Retrying in 5 s", key)
                    threading.Timer(5.0, self.submit, (key,)).start()

    def build(self, key) -> None:
        store, target = self.shards.get(key), self.target()
        if store is None or target is None:
            return  # revoked meanwhile: the next owner re-encodes it when it opens it
        if int(store.read_meta()["generation"]) >= target.generation:
            return
        net = self.nets.get(target.version)
        store.put_model(target.raw, version=target.version)  # beside the current one: the swap makes it current
        spec = self.spec
        t0 = time.perf_counter()
        builder = shard_builder(store, net, spec, chunk=self.chunk, pause=self.pause)  # as `streamhash eval` does
        gen = builder.build(target.version, target.generation)
        builder.drop_replaced()
        m.REENCODE_SECONDS.observe(time.perf_counter() - t0)
        m.REENCODED_IMAGES.inc(builder.images_reencoded)
        m.SHARD_REENCODES.inc()
        self.on_done(key)
        log.info("shard %s: generation %d with model %d in %.1fs (%d images re-encoded, %d codes kept)", key, gen,
                 target.version, time.perf_counter() - t0, builder.images_reencoded, builder.codes_copied)
