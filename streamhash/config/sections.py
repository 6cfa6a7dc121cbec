"""The sections of :class:`streamhash.config.Settings` other than Kafka and security (:mod:`.kafka`): the store,
the model and its images, the worker, the learner, the query server, and the produce, demo and data commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import NoDecode


class StoreSettings(BaseModel):
    # The store root: one shard (LMDB environment) per (topic, partition) under it (streamhash.index.store.root)
    path: Path = Path("var/index")
    # How long a worker newly assigned a partition waits for the previous owner to close its shard
    # (finish the batch in hand); past it the partition is paused and tried again on every poll.
    shard_lock_wait_s: float = Field(10.0, ge=0)
    # A shard is a cache of Kafka (streamhash.kafka.changelog): a worker assigned a partition whose shard is missing
    # or behind replays the changelog into it first, this many records per LMDB transaction.
    restore_batch_records: int = Field(20_000, ge=1)
    # A shard whose partition was revoked and not assigned back to a worker on this root within fence_after_s is
    # fenced (never served: the partition lives elsewhere now); fenced for drop_after_s more, it is deleted. A
    # partition assigned back to it restores the records it missed and is served again.
    fence_after_s: float = Field(60.0, ge=0)
    drop_after_s: float = Field(86_400.0, ge=0)
    initial_map_size_bytes: int = 64 * 1024 * 1024
    # Ceiling for on-demand growth; a write past it (or past the disk) is StoreFullError.
    max_map_size_bytes: int = 1 << 40
    # Each growth multiplies the map by this (at least +64 KiB); below 2 suits a disk with little headroom.
    map_growth_factor: float = Field(2.0, ge=1.0)
    max_value_bytes: int = 10 * 1024 * 1024
    # Width x height an image (or .npy) may declare; checked from the header before any pixel is decoded,
    # so a few-byte PNG claiming 30000x30000 is refused without allocating it. Must cover model.image_size².
    max_image_pixels: int = Field(4096 * 4096, ge=1)


class ModelSettings(BaseModel):
    bits: int = 32
    # a name registered with streamhash.model.hashnet.register_backbone: checked when the network is built (a process's
    # start), where the registry is, not here (it sits beside the networks and loads torch)
    backbone: str = "small_cnn"
    # where a frozen backbone is split (issue 23): "" its default (efficientnet_lite0: "pooled", the head alone
    # learns); another names a cut of streamhash.model.cuts, whose later stages learn with the head
    cut: str = ""
    # a frozen backbone's input side (0: its own, 224 for efficientnet_lite0): CIFAR-10's 32x32 photos learn as well
    # at 128 for a third of the work and bytes (benchmarks/journal/2026-12-06-cifar10-cut.md)
    input_size: int = Field(0, ge=0)
    image_size: int = 28
    channels: int = 1
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "auto"
    seed: int = 0
    torch_threads: int = 1

    @field_validator("bits")
    @classmethod
    def _bits_multiple_of_8(cls, v: int) -> int:
        if v <= 0 or v % 8:
            raise ValueError("bits must be a positive multiple of 8")
        return v


class ImageSettings(BaseModel):
    """How a message's image becomes the network's input (``streamhash.imaging``): one rule set in the
    worker, the learner's re-encode and the query server. The stored blob stays the bytes as received.
    The defaults keep the strict contract of the 28x28 gray network: there an image of another size or
    colour is a producer's mistake, and the dead-letter topic shows it. Photos: ``resize=fill``."""

    # Colour mode images are converted to. "gray": ITU-R 601-2 luma (PIL's convert("L")), repeated into 3
    # channels for a 3-channel network; "rgb": gray repeated, needs model.channels=3. None: no conversion,
    # an image must already have model.channels (a palette counts as either), else stage "shape".
    mode: Literal["gray", "rgb"] | None = None
    # exact: any other size is refused (stage "shape"); fill: the largest centred region of the network's
    # aspect ratio, resampled (centre crop, nothing padded); fit: the whole image inside, centred on
    # `background` (letterbox); stretch: resampled to the size, aspect ratio lost.
    resize: Literal["exact", "fit", "fill", "stretch"] = "exact"
    # PIL's resampling filter; PIL widens it when shrinking, so even bilinear averages every source pixel.
    resample: Literal["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"] = "bilinear"
    # Composited behind transparent pixels (RGBA, LA, palette transparency) and around a "fit" image.
    background: Literal["black", "white"] = "black"


class WorkerSettings(BaseModel):
    poll_timeout_ms: int = 200
    encode_batch: int = 512
    # A batch whose write fails (full disk, broker error) is retried with backoff 0.5 s, 1 s, 2 s, ...;
    # then the worker stops with exit code 75, nothing committed past what was written.
    write_attempts: int = 6
    retry_backoff_s: float = 0.5
    retry_backoff_max_s: float = 30.0
    metrics_port: int = 9101
    metrics_host: str = "127.0.0.1"


class LearnSettings(BaseModel):
    enabled: bool = True  # the demo starts a learner process; `streamhash learner` ignores it
    # The learner process (`streamhash learner`) yields the cores to ingestion: a niceness added at start
    # and one torch thread (model.torch_threads is the workers' setting).
    nice: int = Field(10, ge=0, le=19)
    torch_threads: int = Field(1, ge=1)
    metrics_port: int = 9103
    # Without a store root (no store.path set) the learner reads the shards' changelog topic instead, on any
    # machine, into its own state store here (an LMDB environment; a restart reads only the changelog's tail).
    state_path: Path = Path("var/learner")
    # How often the learner reads the shards' change logs for new items
    follow_interval_s: float = Field(0.5, gt=0)
    # Publishing on a broker that does not answer: one attempt waits publish_timeout_s for the acknowledgement;
    # a failed attempt (a timeout, or a producer the broker fenced or forgot after a restart or a log reset)
    # closes the producer, makes a new one and tries again after a back-off, for publish_retry_s in all, then
    # the learner exits 75. A stop request ends any of these waits; the process exits within stop_grace_s.
    publish_timeout_s: float = Field(10.0, gt=0)
    publish_retry_s: float = Field(120.0, ge=0)
    stop_grace_s: float = Field(7.0, gt=0)
    round_every: int = 2000  # new labeled items between DIHN rounds
    # A round also runs once the oldest labeled item not learned yet has waited this long, so a slow
    # (or class-ordered) stream does not sit on inferred codes for hours; 0: round_every alone decides.
    round_max_age_s: float = Field(60.0, ge=0)
    round_min_items: int = Field(1, ge=1)  # labeled items an age-triggered round needs at least
    # A round: `iters` alternations of `epochs` network epochs on Omega (`omega` sampled labeled items, half new),
    # then a DCC update of B_new. Eight alternations on 750 cost what three on 2,000 did once the history is past
    # 2,000 labels, and learn more: +0.07 to +0.10 mAP on the partial-labels and domain-shift streams, CIFAR-10
    # unchanged (benchmarks/journal/2026-12-07-learning-round-budget.md)
    omega: int = Field(750, ge=1)
    epochs: int = 3
    iters: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    # Each round starts Adam afresh: its moment estimates from the last round's loss (another Omega, other frozen
    # codes, new classes) scaled the first steps wrongly (benchmarks/journal/2026-12-07-learning-fresh-optimizer.md)
    fresh_optimizer: bool = True
    # When a round's DCC step also re-learns the frozen *learned* codes of every labeled item (a code rewrite
    # published with the round's codes, no image read beyond Omega): "new-labels" in a round that brings a label
    # no learned code had (the old codes were placed without it), "always", or "never" (plain DIHN)
    relearn: Literal["never", "new-labels", "always"] = "new-labels"
    # A round that brings a label no learned code had (a class, a domain) starts the hash head afresh, the backbone
    # kept: a head fitted to the old vocabulary held even a retrain 0.035 mAP below one from scratch (domain-shift).
    # That round trains `iters` alternations at least and `restart_factor` x `iters` at most, ending when the
    # hold-out's mAP stops rising (benchmarks/journal/2026-12-07-head-restart.md)
    restart_head: bool = True
    restart_factor: int = Field(3, ge=1)
    batch_size: int = Field(64, ge=1)
    new_fraction: float = Field(0.5, ge=0, le=1)  # share of Omega drawn from the round's new items
    gamma: float = 200.0
    mu: float = 50.0
    # The re-encode test (streamhash.learn.online): fire iff the MI gain of the selective re-encode
    # exceeds mi_threshold + mi_sigmas * (its bootstrap standard deviation over mi_bootstrap resamples).
    # mi_threshold is a margin on top of the noise bound; a negative one lowers it (-10: always fire).
    mi_threshold: float = 0.0
    mi_sigmas: float = Field(2.0, ge=0)
    mi_bootstrap: int = Field(200, ge=0)
    reservoir_size: int = 1000
    # Stratify the reservoir by provenance: half its slots for the labeled items standing for inferred codes
    # (the hold-out), each stratum weighed back to its share of the index in the MI comparison. Unstratified, the
    # hold-out is a tenth of the sample and the test missed a class shift that cost 0.11 mAP (partial-labels,
    # seed 1); stratified it fired there and nowhere it had not (benchmarks/journal/2026-12-07-learning-round-budget.md)
    reservoir_strata: bool = True
    # Labeled items held out of the network's training (chosen by a hash of the id, so the same ones after a
    # restart): never in Omega, their codes learned like the others'; the re-encode test compares the inferred
    # code each would hold unlabeled (its shadow) with the current network's, to see stale codes.
    holdout_fraction: float = Field(0.1, ge=0, lt=1)
    # Labels become columns of a multi-hot matrix (omega x (max label + 1)) in every round, so a message
    # labelled 10**20 would make every later round fail. 9999 leaves room for a few thousand classes.
    max_label: int = Field(9999, ge=0)
    max_labels_per_item: int = Field(64, ge=1)


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8080
    refresh_interval_s: float = 0.05  # how often the follower polls the store when no notification wakes it
    # Wake the follower on each store commit (inotify on the store directory, Linux, local filesystems);
    # polling every notify_fallback_interval_s stays as the safety net. False: poll every refresh_interval_s.
    notify: bool = True
    notify_fallback_interval_s: float = Field(1.0, gt=0)
    # At most one follower refresh per shard this often: a worker commits every few ms under ingest, and each
    # refresh takes the GIL and the index's write lock from the searches; it adds up to this much to freshness.
    refresh_min_gap_s: float = Field(0.005, ge=0.0)
    store_wait_s: float = 60.0  # at start-up, how long to wait for a worker to create the store
    max_k: int = 10_000
    # Two-stage search (streamhash.index.rerank): this many Hamming candidates (at least k) are ordered by
    # distance, then by the cosine of their stored features, where the query has one; 0: Hamming order alone.
    rerank_candidates: int = Field(1000, ge=0)
    # a Hamming backend registered in streamhash.index.backends: checked where the index is made (the backends
    # are the index's to know; a plugin may register one after the settings load)
    backend: str = "auto"
    search_threads: int = 1
    # Concurrent top-k /search requests share one kernel call: the batcher takes every request queued
    # when it is free (at most batch_max); batch_window_s > 0 also waits that long for more (a lone
    # client then pays it; at 0 it pays nothing). batch_enabled=false: each search ranked on its own.
    batch_enabled: bool = True
    batch_max: int = Field(256, ge=1)
    batch_window_s: float = Field(0.0, ge=0.0)
    batch_inflight: int = Field(2, ge=1)  # batches ranked at the same time (the kernel scales ~linearly per query)
    # Rank a batch on the event loop's thread: no hand-off to a thread and back (on 2 cores, wrk at 1M: p50 at 1
    # connection 0.53 -> 0.43 ms, p99 at 8 connections 6.7 -> 3.6 ms); no request is read while it runs.
    batch_in_loop: bool = True
    # uvicorn worker processes over the same read-only store; each holds its own LiveIndex in memory
    workers: int = Field(1, ge=1)
    # A router (`streamhash serve --shards URL,URL`): no store, each /search sent to these query servers at once
    # and merged; one that has not answered within shard_timeout_s is left out and the response says so.
    shards: Annotated[list[str], NoDecode] = Field(default_factory=list)  # NoDecode: the env holds URL,URL, not JSON
    shard_timeout_s: float = Field(1.0, gt=0)
    # Partitions found through Kafka (streamhash.kafka.directory, issue 25): a query server with advertise_url set
    # says on the serving topic which partitions it serves at that URL (the one the router reaches it at), again
    # when they change and every advertise_interval_s, and withdraws on a clean stop; a router with discover=true
    # (`serve --discover`) routes each partition to one advertised server, ignoring adverts older than
    # advertise_ttl_s (a server that died without withdrawing). Clocks of servers and routers must agree to well
    # within the TTL (NTP).
    discover: bool = False
    advertise_url: str | None = None
    advertise_interval_s: float = Field(3.0, gt=0)
    advertise_ttl_s: float = Field(15.0, gt=0)
    # Bounds on clients (streamhash.services.bounds; uvicorn has no header-read timeout of its own): a connection
    # must send a request's headers within header_timeout_s of its first byte (or of connecting), at most
    # max_header_bytes of them, else it is closed; past max_connections open connections the one idle longest
    # (waiting for its headers, or kept alive between requests) is closed for the new one, or, when every one
    # is mid-request, the new one is refused with 503. Idle keep-alive connections close after keep_alive_s.
    header_timeout_s: float = Field(10.0, gt=0)
    max_header_bytes: int = Field(64 * 1024, ge=1024)
    max_connections: int = Field(1000, ge=1)
    keep_alive_s: float = Field(5.0, gt=0)
    # HTTPS: both files (PEM) or neither; a router's shards are then https:// URLs checked against shard_cafile
    # (None: the system's CAs).
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    shard_cafile: Path | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> "ServerSettings":
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("server.ssl_certfile and server.ssl_keyfile go together")
        return self

    @field_validator("shards", mode="before")
    @classmethod
    def _split_urls(cls, v):
        if isinstance(v, str):
            v = json.loads(v) if v.lstrip().startswith("[") else v.split(",")
        return [u.strip().rstrip("/") for u in v if u.strip()]


class ProduceSettings(BaseModel):
    limit: int | None = None
    rate: float | None = None  # messages per second; None = as fast as possible
    shuffle_seed: int | None = None
    format: Literal["png", "npy"] = "png"  # encoding for array sources
    quiet: bool = False


class DemoSettings(BaseModel):
    dataset: Literal["fashion-mnist", "cifar10"] = "fashion-mnist"  # cifar10: photos (services/demo/photos.py)
    limit: int | None = None  # None: the dataset's (10,000 Fashion-MNIST images, 2,000 CIFAR-10 photos)
    queries: int | None = None  # None: the dataset's (200 Fashion-MNIST images, 100 CIFAR-10 photos)
    probes: int = 50
    workdir: Path = Path("var/demo")  # wiped at start
    keep_running: bool = False
    json_summary: bool = False
    quiet: bool = False


class DataSettings(BaseModel):
    fashion_mnist_dir: Path | None = None
    # CIFAR-10 (streamhash.data.cifar10): the official cifar-10-python.tar.gz or cifar-10-batches-py/, or a
    # train|test/<class>/ image tree (or its .tar.gz); None: looked for in `home`
    cifar10_dir: Path | None = None
    home: Path = Path("data")
    # label -> class name for people (search hits' label_names, the page): "fashion-mnist", or a JSON
    # file holding a list of names (label = position) or an object {"label": "name"}; None: bare labels
    class_names: str | None = None
