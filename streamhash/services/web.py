"""The query server's pages for people: the search page, stored images, a random item, the live status.

``GET /`` is a plain HTML page (``static/``, no build step, no external URL) that searches through
``POST /search`` and polls ``GET /status``. ``GET /items/{id}/image`` serves a stored image, or a
PNG thumbnail with ``?size=N``; ``GET /random`` names a random item of the live generation.

``/status`` is derived from this process's own view of the index, sampled every second
(:class:`LiveStatus`): the ingest rate from the index size (summed over the shards) over time, learning
rounds from model versions (each round publishes the next version, a number shared by every shard),
re-encodes from generation changes (of the newest shard), counted from the first shard the server saw:
a shard's creation (generation 1, version 1) is neither. It says when the model is still untrained (version
1: no learning round yet, hits are close to noise) and what the first round waits for. The worker's metrics
are its own: the query server never reads them. Items are looked up in every shard: an id lives in exactly one.
"""

from __future__ import annotations

import io
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image

from streamhash.config import LearnSettings
from streamhash.index.live import Generation, Resolved
from streamhash.data.class_names import name_labels
from streamhash.index.label_names import IndexNames
from streamhash.index.sharded import ShardedIndex, View
from streamhash.services.http_api import check_item_id

STATIC = Path(__file__).parent / "static"
STATUS_EXAMPLE = {
    "index_size": 10050, "generation": 1, "model_version": 1, "ingest_rate": 0.0, "rate_window_s": 10.0,
    "window_s": 300.0, "learning_rounds": 0, "reencodes": 0, "learning_rounds_total": 0, "reencodes_total": 0,
    "uptime_s": 312.5, "last_reencode": None, "history": [[-300.0, 0], [0.0, 10050]],
    "model": {"trained": False, "round_every": 2000, "note": "the model is untrained (version 1, no learning round yet): ..."},
    "label_names": {"0": "T-shirt/top", "1": "Trouser"},
}
MAX_THUMB_PX = 512  # a thumbnail is made per request: bound the work one GET can ask for
WINDOW_S = 300.0  # "the last minutes" of the live panel
RATE_WINDOW_S = 10.0  # ingest rate: the index's growth over this span, steadier than one sample
SAMPLE_EVERY_S = 1.0


def totals(view: View) -> tuple[int, int, int]:
    """(items in every shard, generation, model version of the newest shard)."""
    newest = view.newest
    return view.index_size, newest.g.generation if newest else 0, newest.model_version if newest else 0


class LiveStatus:
    """Samples (time, index size, generation, model version) of the live index; a deque of the last WINDOW_S.
    ``source``: a ShardedIndex, or any callable returning (index size, generation, model version)."""

    def __init__(self, source, every_s: float = SAMPLE_EVERY_S, window_s: float = WINDOW_S):
        self.read = (lambda: totals(source.view())) if isinstance(source, ShardedIndex) else source
        self.every_s, self.window_s = every_s, window_s
        self._samples: deque[tuple[float, int, int, int]] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # the first sample with a shard: rounds and re-encodes count from it, not from an empty root,
        # or a shard created after start-up (generation 1, version 1) would count as a round and a re-encode
        self._baseline: tuple[float, int, int, int] | None = None
        self._last_reencode: tuple[float, int, int, int] | None = None  # the first sample of the newest generation
        self.first = self.sample()

    def now(self) -> tuple[float, int, int, int]:
        return (time.monotonic(), *self.read())

    def sample(self) -> tuple[float, int, int, int]:
        s = self.now()
        with self._lock:
            self._samples.append(s)
            while self._samples[0][0] < s[0] - self.window_s:
                self._samples.popleft()
            if self._baseline is None and s[2] > 0:
                self._baseline = s
            elif self._baseline is not None and s[2] > (self._last_reencode or self._baseline)[2]:
                self._last_reencode = s  # an MI-triggered re-encode swapped in a generation
        return s

    def start(self) -> LiveStatus:
        self._thread = threading.Thread(target=self._run, name="live-status", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def snapshot(self) -> dict:
        # read, not sampled: how often pages poll must not change what is kept
        t, size, gen, version = now = self.now()
        with self._lock:
            samples = [*self._samples, now]
            base = self._baseline or now
            last = self._last_reencode
        oldest = samples[0]
        oldest_shard = next((s for s in samples if s[2] > 0), now)  # generation 0: no shard existed yet
        recent = next(s for s in samples if s[0] >= t - RATE_WINDOW_S)
        span = t - recent[0]
        step = max(1, len(samples) // 60)  # about 60 points for the sparkline
        return {
            "index_size": size, "generation": gen, "model_version": version,
            "ingest_rate": (size - recent[1]) / span if span > 0 else 0.0, "rate_window_s": RATE_WINDOW_S,
            "window_s": min(self.window_s, t - oldest[0]),
            # versions and generations only grow, one per round / re-encode: differences count them even
            # where a sample fell between two
            "learning_rounds": version - oldest_shard[3], "reencodes": gen - oldest_shard[2],
            "learning_rounds_total": version - base[3], "reencodes_total": gen - base[2],
            "uptime_s": t - self.first[0],
            # the learner's last MI trigger as the index saw it: when its generation went live, with which model
            "last_reencode": None if last is None else {"generation": last[2], "model_version": last[3],
                                                        "ago_s": round(t - last[0], 1)},
            "history": [[round(s[0] - t, 1), s[1]] for s in samples[::-1][::step][::-1]],
        }


def model_state(version: int, learn: LearnSettings) -> dict:
    """Whether the served model has learned anything yet and, if not, what its first round waits for.
    Version 1 is the seeded initial network every shard starts with; each learning round publishes the next."""
    if version == 0:
        return {"trained": False, "note": "no shard yet: no worker has written to the store root"}
    if version > 1:
        return {"trained": True, "note": f"model version {version}: {version - 1} learning round(s) so far"}
    age = (f" or {learn.round_max_age_s:g} s after the oldest unlearned labeled item arrived "
           "(STREAMHASH_LEARN__ROUND_MAX_AGE_S)") if learn.round_max_age_s else ""
    return {"trained": False, "round_every": learn.round_every,
            "note": "the model is untrained (version 1, no learning round yet): an untrained network gives many "
                    "images the same code, so hits are close to noise. The learner's first round waits for labeled "
                    f"items (a `labels` header): {learn.round_every} of them (STREAMHASH_LEARN__ROUND_EVERY){age}; "
                    "unlabeled items are indexed but never learned from."}


def random_item(g: Generation, rng: np.random.Generator) -> Resolved | None:
    """A uniformly random item of this generation, or None when it is empty.

    Seqs are dense up to ``last_seq`` except where an item was overwritten or re-coded: sampled
    seqs are checked against the index in batches. Should that keep missing, the nearest item to a
    random code is still an item (not uniform, but never stuck)."""
    if g.index.ntotal == 0 or g.last_seq < 1:
        return None
    for _ in range(4):
        seqs = rng.integers(1, g.last_seq + 1, 256)
        _, found = g.index.reconstruct_batch(seqs)
        for got in g.resolve(seqs[found][:8]):
            if got is not None:
                return got
    code = rng.integers(0, 256, (1, g.index.code_size), dtype=np.uint8)
    _, ids = g.index.search(code, 1)
    return g.resolve([int(ids[0, 0])])[0] if ids[0, 0] >= 0 else None


def random_sharded(view: View, rng: np.random.Generator) -> tuple[Resolved, int] | None:
    """A uniformly random item of every shard together (a shard drawn in proportion to its size), and the
    generation of its shard; None when every shard is empty."""
    sizes = np.array([v.g.index.ntotal for v in view.shards], np.float64)
    for _ in range(4):  # a shard may empty between reading its size and sampling it
        if sizes.sum() == 0:
            return None
        v = view.shards[int(rng.choice(len(sizes), p=sizes / sizes.sum()))]
        got = random_item(v.g, rng)
        if got is not None:
            return got, v.g.generation
        sizes[v.pos] = 0
    return None


def _stored_image(raw: bytes, ctype: str) -> Image.Image:
    """The stored bytes as they are (not the network's input): the worker checked their declared size."""
    if ctype == "application/x-npy":
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    else:
        img = Image.open(io.BytesIO(raw), formats=["PNG", "JPEG"])
        if img.mode in ("L", "LA", "RGB", "RGBA"):
            return img
        arr = np.asarray(img if img.mode.startswith("I") else img.convert("RGBA"))
    if arr.dtype != np.uint8:  # 16-bit: PIL's own conversion to 8 bits clips instead of scaling
        arr = (arr.astype(np.uint32) >> 8).astype(np.uint8) if arr.max(initial=0) > 255 else arr.astype(np.uint8)
    return Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)


def thumbnail(raw: bytes, ctype: str, size: int) -> bytes:
    """A PNG fitting ``size`` x ``size``: nearest-neighbour when enlarging (28 px digits stay crisp), else Lanczos."""
    img = _stored_image(raw, ctype)
    scale = size / max(img.size)
    new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img = img.resize(new, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def install(app: FastAPI, index: ShardedIndex, status: LiveStatus, learn: LearnSettings | None = None,
            class_names: IndexNames | dict[int, str] | None = None) -> None:
    """Add the page, its assets and the routes it uses. Call before ``GET /items/{item_id:path}`` is
    registered: routes match in order, and that one would take ``/items/x/image`` as the id ``x/image``.
    ``learn``: the learner's settings, to say what an untrained model waits for; ``class_names``: label -> name,
    fixed or as the shards keep it (:class:`~streamhash.index.label_names.IndexNames`)."""
    learn = learn or LearnSettings()
    names = class_names.current if isinstance(class_names, IndexNames) else (lambda fixed=dict(class_names or {}): fixed)
    router = APIRouter()
    rng = np.random.default_rng()
    rng_lock = threading.Lock()  # Generator is not thread-safe; sync routes run on a thread pool

    @router.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @router.get("/items/{item_id:path}/image", summary="A stored image, or a PNG thumbnail of it",
                responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "application/x-npy": {}}},
                           400: {"description": "a bad id or size"}, 404: {"description": "no such item"},
                           422: {"description": "the stored bytes cannot be shown as a thumbnail"}})
    def item_image(item_id: str, size: str | None = None):
        """The stored bytes exactly as the producer sent them, with their content type; with ``?size=N``
        (1 to 512), a PNG thumbnail fitting N x N pixels (``.npy`` items too)."""
        check_item_id(item_id)
        px = None
        if size is not None:
            if not size.isascii() or not size.isdigit() or not 1 <= int(size) <= MAX_THUMB_PX:
                raise HTTPException(400, f"size is a whole number of pixels from 1 to {MAX_THUMB_PX}, got {size[:20]!r}")
            px = int(size)
        got = next((b for b in (s.store.get_blobs([item_id])[0] for s in index.shards) if b is not None), None)
        if got is None:
            raise HTTPException(404, f"no image for item {item_id!r}")
        raw, ctype = got
        if px is None:
            return Response(raw, media_type=ctype)
        try:
            png = thumbnail(raw, ctype, px)
        except Exception as exc:  # noqa: BLE001 -- damaged bytes make decoders raise anything: say so, not 500
            raise HTTPException(422, f"stored image of {item_id!r} cannot be shown: {type(exc).__name__}: {exc}") from None
        return Response(png, media_type="image/png")

    @router.get("/random", summary="A random stored item",
                responses={200: {"content": {"application/json": {"example": {
                    "id": "fmnist-train-42", "labels": [7], "label_names": ["Sneaker"], "generation": 1}}}},
                           404: {"description": "the index is empty"}})
    def random():
        """A uniformly random item of the generations being searched (every shard): its id, labels (with
        class names where the server has them) and its shard's generation; 404 while the index is empty."""
        with rng_lock:
            got = random_sharded(index.view(), rng)
        if got is None:
            raise HTTPException(404, "the index is empty")
        (item_id, labels), generation = got
        return {"id": item_id, "labels": list(labels) if labels is not None else None,
                "label_names": name_labels(labels, named) if (named := names()) else None, "generation": generation}

    @router.get("/status", summary="The live panel: index size, ingest rate, model state, rounds and re-encodes",
                responses={200: {"content": {"application/json": {"example": STATUS_EXAMPLE}}}})
    def live_status():
        """What the search page's live panel shows, from this server's own view of the index (sampled every
        second): items in every shard, ingest rate over the last 10 s, the newest shard's model version and
        generation, learning rounds and re-encodes seen in the last minutes and since start, and ``model``:
        whether the network is trained yet (``trained: false`` at version 1, with a ``note`` on what the first
        learning round waits for). ``label_names`` maps labels to class names where the server has them."""
        snap = status.snapshot()
        label_names = {str(label): name for label, name in sorted(names().items())}
        return {**snap, "model": model_state(snap["model_version"], learn), "label_names": label_names}

    app.include_router(router)
    app.mount("/ui", StaticFiles(directory=STATIC), name="ui")
