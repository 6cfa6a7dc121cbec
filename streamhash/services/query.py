"""The query server (``streamhash serve``).

Opens the LMDB store read-only, keeps a :class:`~streamhash.index.live.LiveIndex` in step with it,
and answers Hamming-ranking queries over HTTP. The query image is encoded with the model version
that produced the generation being searched, and both numbers are in every response.

Endpoints: ``POST /search`` (JSON: ``image_base64``, ``code_hex`` or ``item_id``; or multipart: ``image``
file; ``k``, optional ``radius``), ``GET /items/{id}``, ``GET /healthz``, ``GET /metrics``, ``/docs`` (assets
served locally: it works offline); the search page and its routes (``/``, ``/items/{id}/image``,
``/random``, ``/status``) are in :mod:`streamhash.services.web`.

Anything a client sends is answered with 200 or a 4xx naming the problem: a ``/search`` body larger
than :func:`max_body_bytes` is refused with 413 before it is read into memory, and a query image
goes through the same checks as an ingested one (:func:`streamhash.records.decode_image`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from streamhash import __version__
from streamhash import metrics as m
from streamhash.codes import from_hex, to_hex
from streamhash.config import Settings
from streamhash.errors import BadQueryError, RecordRejected
from streamhash.index.live import Generation, LiveIndex
from streamhash.index.radius import RadiusIndex
from streamhash.index.store import Store
from streamhash.memory import pin_malloc_mmap_threshold
from streamhash.model.hashnet import HashNet
from streamhash.records import ImageSpec, content_type_of, decode_image
from streamhash.services.batching import MicroBatcher
from streamhash.services.http_api import (
    CountResponses, FastJSONResponse, Hit, PayloadTooLarge, SearchRequest, SearchResponse, bounded_request, check_item_id,
    max_body_bytes, parse_search,
)
from streamhash.services.web import LiveStatus, install

log = logging.getLogger("streamhash.query")

class QueryEncoder:
    """Encodes query images with exactly the model version a generation was built with."""

    def __init__(self, store: Store, spec: ImageSpec):
        self.store, self.spec = store, spec
        self._nets: dict[int, HashNet] = {}
        self._lock = threading.Lock()

    def net(self, version: int) -> HashNet:
        with self._lock:
            if version not in self._nets:
                _, raw = self.store.get_model(version)
                if raw is None:
                    raise BadQueryError(f"model version {version} is not in the store yet; encode by code_hex or retry")
                self._nets = {version: HashNet.from_bytes(raw)}  # keep only the newest: old generations are gone
            return self._nets[version]

    def encode(self, raw: bytes, version: int) -> np.ndarray:
        if len(raw) > self.spec.max_value_bytes:
            raise PayloadTooLarge(f"query image of {len(raw)} bytes exceeds the {self.spec.max_value_bytes}-byte limit")
        try:
            image = decode_image(raw, content_type_of(raw, None), self.spec)
        except RecordRejected as exc:
            raise BadQueryError(f"query image rejected: {exc.message}") from None
        return self.net(version).encode(image[None])[0]


def create_app(settings: Settings, store: Store | None = None, live: LiveIndex | None = None) -> FastAPI:
    store = store or Store(settings.store.path, readonly=True)
    live = live or LiveIndex(store, backend=settings.server.backend, threads=settings.server.search_threads,
                             refresh_interval_s=settings.server.refresh_interval_s, notify=settings.server.notify,
                             fallback_interval_s=settings.server.notify_fallback_interval_s)
    encoder = QueryEncoder(store, ImageSpec.from_settings(settings))
    body_limit = max_body_bytes(settings)
    status = LiveStatus(live)
    # Top-k searches waiting at the same moment share one kernel call (each takes its first k of the
    # batch's largest k); off (batch_enabled=false) each search is ranked alone in the thread pool.
    batcher = MicroBatcher(lambda g, items: _rank_batch(store, g, items), max_batch=settings.server.batch_max,
                           window_s=settings.server.batch_window_s,
                           max_inflight=settings.server.batch_inflight) if settings.server.batch_enabled else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        live.start()  # the follower and the sampler threads run exactly as long as the server
        status.start()
        yield
        if batcher is not None:
            await batcher.aclose()
        status.stop()
        live.stop()

    # /docs and /redoc load their scripts from this process (fastapi-offline's copy), not from a CDN;
    # no validator badge either: Swagger UI would send the spec's URL to an outside validator
    app = FastAPIOffline(title="streamhash query", version=__version__, lifespan=lifespan,
                         description="Hamming ranking over the live streamhash index.",
                         swagger_ui_parameters={"validatorUrl": None}, default_response_class=FastJSONResponse)
    app.state.live, app.state.store, app.state.batcher = live, store, batcher
    app.add_middleware(CountResponses, path="/search")
    install(app, store, live, status)  # before /items/{item_id:path}, which would take /items/x/image

    @app.exception_handler(BadQueryError)
    def _bad_query(_request: Request, exc: BadQueryError):
        return FastJSONResponse(status_code=400, content={"detail": str(exc)})

    @app.post("/search", response_model=SearchResponse, openapi_extra={
        "requestBody": {"content": {
            "application/json": {"schema": SearchRequest.model_json_schema()},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "image": {"type": "string", "format": "binary"}, "k": {"type": "integer"}, "radius": {"type": "integer"}}}},
        }, "required": True}})
    async def search(request: Request) -> SearchResponse:
        t0 = time.perf_counter()
        req, image = await parse_search(await bounded_request(request, body_limit))
        if req.k > settings.server.max_k:
            raise BadQueryError(f"k={req.k} exceeds the limit of {settings.server.max_k}")
        g: Generation = live.current  # one generation for the whole query
        model_version = g.model_version  # read once: a learning round updates it in place
        if req.code_hex is not None:
            try:
                q = from_hex(req.code_hex, store.bits)
            except ValueError as exc:
                raise BadQueryError(str(exc)) from None
        elif req.item_id is not None:
            q = await run_in_threadpool(_stored_code, store, g, req.item_id)
        else:
            # Encoding and ranking are CPU work: off the event loop, so slow queries don't stall /healthz.
            q = await run_in_threadpool(encoder.encode, image, model_version)
        if batcher is not None and req.radius is None:
            hits = await batcher.submit(g, (q, req.k))  # the kernel runs in the batcher's thread: no other hop
        else:
            hits = (await run_in_threadpool(_rank, store, g, q[None], [req.k], req.radius))[0]
        if req.item_id is not None and (req.radius is None or req.radius > 0):
            hits = _query_first(store, hits, req.item_id, req.k)
        took = time.perf_counter() - t0
        m.QUERY_SECONDS.labels(endpoint="/search").observe(took)
        # a SearchResponse's fields, rendered by orjson without a pydantic round trip (the schema is response_model's)
        return FastJSONResponse({"results": hits, "model_version": model_version, "generation": g.generation,
                                 "index_size": g.index.ntotal, "code_hex": to_hex(q), "took_ms": took * 1000})

    @app.get("/items/{item_id:path}")
    def get_item(item_id: str):
        check_item_id(item_id)
        rec = store.get_item(item_id)
        if rec is None:
            raise HTTPException(404, f"no item {item_id!r}")
        return {"id": item_id, "labels": rec["labels"], "ts": rec["ts"], "seq": rec["seq"], "generation": rec["generation"],
                "shard": rec["shard"], "content_type": rec["ctype"], "code_hex": rec["code"].hex() if rec["code"] else None,
                "visible": rec["seq"] in live.current.index}

    @app.get("/healthz")
    def healthz():
        g = live.current
        return {"status": "ok", "index_size": g.index.ntotal, "generation": g.generation,
                "model_version": g.model_version, "bits": store.bits, "last_seq": g.last_seq}

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(m.QUERY_REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app


def _rank_batch(store: Store, g: Generation, items: list[tuple[np.ndarray, int]]) -> list[list[dict]]:
    """The batcher's call: top-k of every (query, k) in ``items`` over generation ``g``."""
    return _rank(store, g, np.stack([q for q, _ in items]), [k for _, k in items], None)


def _rank(store: Store, g: Generation, q: np.ndarray, k: int | list[int], radius: int | None):
    """The hits of query code ``q`` over generation ``g`` as a list of :class:`Hit`; or, for a matrix of
    codes ``q`` and a list ``k`` (one k per row), each row's hits as ``Hit`` dicts (what the server
    renders), all from one kernel call.

    Top-k: one search at the largest k; the kernel's order (distance, then index order) does not depend
    on k, so each row's first k are exactly its own top-k search. Radius: hits at distance < radius,
    the first k of each row's.
    """
    if np.ndim(q) == 1:
        return [Hit(**h) for h in _rank(store, g, np.asarray(q)[None], [int(k)], radius)[0]]
    Q, ks = q, k
    if radius is None:
        D, I = g.index.search(Q, max(ks))
        rows = [[(d, i) for d, i in zip(D[r, :k].tolist(), I[r, :k].tolist()) if i >= 0] for r, k in enumerate(ks)]
    else:
        index = RadiusIndex.over_store(g.index, store, g.generation)
        lims, D, I = index.range_search(Q, radius)
        lims = lims.tolist()
        rows = [list(zip(D[lims[r]:lims[r + 1]][:k].tolist(), I[lims[r]:lims[r + 1]][:k].tolist()))
                for r, k in enumerate(ks)]
    resolved = iter(g.resolve([s for pairs in rows for _, s in pairs]))  # one LMDB read for every hit of the batch
    out = []
    for pairs in rows:
        hits = []
        for d, _ in pairs:
            got = next(resolved)
            if got is not None:  # removed between search and lookup: skip
                item_id, labels = got
                hits.append({"id": item_id, "distance": d, "labels": list(labels) if labels is not None else None})
        out.append(hits)
    return out


def _stored_code(store: Store, g: Generation, item_id: str) -> np.ndarray:
    """The item's code in generation ``g``: the one being searched, so the item is at distance 0 from itself."""
    check_item_id(item_id)
    rec = store.get_item(item_id)
    if rec is None:
        raise HTTPException(404, f"no item {item_id!r}")
    try:
        return g.index.reconstruct(rec["seq"])
    except KeyError:  # written after g's last refresh: the store's code is right if it is of g
        if rec["generation"] == g.generation and rec["code"]:
            return np.frombuffer(rec["code"], np.uint8)
    raise HTTPException(409, f"item {item_id!r} is not in generation {g.generation} yet; retry")


def _query_first(store: Store, hits: list[dict], item_id: str, k: int) -> list[dict]:
    """The query item first: ties at distance 0 come back in index order, and k of them may leave it out."""
    own = [h for h in hits if h["id"] == item_id]
    if not own:
        labels = store.labels_of([item_id])[0]
        own = [{"id": item_id, "distance": 0, "labels": list(labels) if labels is not None else None}]
    return (own + [h for h in hits if h["id"] != item_id])[:k]


SETTINGS_ENV = "STREAMHASH_SERVE_SETTINGS_JSON"  # run() hands its settings (CLI flags applied) to its workers


def _open_store(settings: Settings) -> Store | None:
    from streamhash.errors import StoreError

    deadline = time.monotonic() + settings.server.store_wait_s
    while True:  # the worker may not have created the store yet
        try:
            return Store(settings.store.path, readonly=True)
        except StoreError as exc:
            if time.monotonic() > deadline:
                log.error("%s", exc)
                return None
            time.sleep(0.5)


def _prepare_process(settings: Settings) -> None:
    pin_malloc_mmap_threshold()
    import torch

    torch.set_num_threads(settings.model.torch_threads)  # two OpenMP pools on 2 cores: 0.5 ms encode became 40 ms


def app_from_env() -> FastAPI:
    """The app factory of each ``--workers`` process: settings from ``run()`` (or the environment), and a
    store handle and LiveIndex of its own (each worker holds its own copy of the in-memory index)."""
    raw = os.environ.get(SETTINGS_ENV)
    settings = Settings.model_validate_json(raw) if raw else Settings()
    _prepare_process(settings)
    store = _open_store(settings)
    if store is None:
        raise SystemExit(f"no store at {settings.store.path}")
    return create_app(settings, store)


def run(settings: Settings) -> int:
    """The query server process: serve HTTP until stopped; returns its exit code."""
    import uvicorn

    from streamhash.errors import EXIT_USAGE

    settings.log_startup("streamhash serve")
    opts = dict(host=settings.server.host, port=settings.server.port, log_level="warning", access_log=False,
                loop="auto", http="auto")  # uvloop and httptools when installed (uvicorn[standard])
    if settings.server.workers > 1:
        # each worker process imports the factory and builds its own app, store handle and LiveIndex
        _prepare_process(settings)
        store = _open_store(settings)  # wait for the store here, once, before starting the workers
        if store is None:
            return EXIT_USAGE
        store.close()
        os.environ[SETTINGS_ENV] = settings.model_dump_json(exclude={"kafka"})  # the query server never uses Kafka
        uvicorn.run("streamhash.services.query:app_from_env", factory=True, workers=settings.server.workers, **opts)
        return 0
    _prepare_process(settings)
    store = _open_store(settings)
    if store is None:
        return EXIT_USAGE
    uvicorn.run(create_app(settings, store), **opts)
    return 0
