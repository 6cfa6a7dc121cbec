"""The query server (``streamhash serve``).

Serves every shard under the store root (``STREAMHASH_STORE__PATH``), each opened read-only and kept in
step by its own :class:`~streamhash.index.live.LiveIndex` inside a :class:`~streamhash.index.sharded.ShardedIndex`
(shards that appear later are picked up while serving), and answers Hamming-ranking queries over HTTP with
exact results merged across shards: by distance, then shard (topic, partition), then insertion into the shard,
exactly as one index over the union of the shards. Each shard is ranked against a query encoded by the model
of the generation it serves (:mod:`streamhash.services.query_codes`), and every response names the
generation and model version of each shard it used (``shards``), with ``partial: true`` when one could not
be ranked. ``streamhash serve --shards URL,URL`` (or ``--discover``) runs a router over other query servers
instead (:mod:`streamhash.services.router`). A search naming ``partitions`` (a discovering router's) ranks only
the shards of those partitions of the images topic, and says ``partial`` for one it does not hold. With
``server.advertise_url`` set, the server advertises the partitions it serves on Kafka
(:mod:`streamhash.services.advertise`).

Endpoints: ``POST /search`` (JSON: ``image_base64``, ``code_hex`` or ``item_id``; or multipart: ``image``
file; ``k``, optional ``radius``), ``GET /items/{id}``, ``GET /healthz``, ``GET /metrics``, ``/docs`` (assets
served locally: it works offline); the search page and its routes (``/``, ``/items/{id}/image``,
``/random``, ``/status``) are in :mod:`streamhash.services.web`.

Anything a client sends is answered with 200 or a 4xx naming the problem: a ``/search`` body larger
than :func:`max_body_bytes` is refused with 413 before it is read into memory, and a query image
goes through the same checks as an ingested one (:func:`streamhash.records.decode_image`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import asynccontextmanager, contextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from streamhash import __version__
from streamhash import metrics as m
from streamhash.codes import from_hex, to_hex
from streamhash.config import Settings
from streamhash.errors import BadQueryError
from streamhash.index.rerank import Rerank
from streamhash.index.sharded import ShardedIndex, View
from streamhash.index.store.root import LAYOUT_FILE, StoreRoot
from streamhash.memory import freeze_startup_objects, pin_malloc_mmap_threshold
from streamhash.services import bounds
from streamhash.services.advertise import OwnStores, advertising
from streamhash.services.batching import MicroBatcher
from streamhash.services.http_api import (
    CountResponses, FastJSONResponse, SearchRequest, SearchResponse, bounded_request, check_item_id, max_body_bytes,
    parse_search, uvicorn_options,
)
from streamhash.services.auth import require_api_key
from streamhash.services.lean import Answer, LeanSearch, answer_ahead
from streamhash.services.query_codes import QueryEncoder, ShardQueries, for_item
from streamhash.data.class_names import load_class_names, name_labels
from streamhash.index.label_names import IndexNames
from streamhash.services import api_docs
from streamhash.services.spec import image_spec
from streamhash.services.web import LiveStatus, install

log = logging.getLogger("streamhash.query")
DECODE_IN_BATCH_BYTES = 64 * 1024  # a query image's file up to this size: a 64 KiB PNG decoded in ~0.6 ms here


def sharded_index(settings: Settings, root: StoreRoot | None = None) -> ShardedIndex:
    s = settings.server
    return ShardedIndex(root or StoreRoot(settings.store.path, create=False), backend=s.backend, threads=s.search_threads,
                        refresh_interval_s=s.refresh_interval_s, notify=s.notify, fallback_interval_s=s.notify_fallback_interval_s,
                        min_gap_s=s.refresh_min_gap_s)


def create_app(settings: Settings, index: ShardedIndex | None = None) -> FastAPI:
    index = index or sharded_index(settings)
    encoder = QueryEncoder(image_spec(settings), index)
    status = LiveStatus(index)
    batcher, encodes = _batchers(settings, encoder)
    app = _assemble(index, status, batcher, encodes)
    class_names = IndexNames(index, load_class_names(settings.data.class_names))  # the setting wins, the shards fill in
    install(app, index, status, settings.learn, class_names)  # before /items/{item_id:path}, which would take /items/x/image
    app.exception_handler(BadQueryError)(lambda _req, exc: FastJSONResponse(status_code=400, content={"detail": str(exc)}))
    answer = _answerer(settings, index, encoder, batcher, encodes, class_names)
    body_limit = max_body_bytes(settings)
    answer_ahead(app, LeanSearch(answer, body_limit))  # a JSON search never enters FastAPI's layers
    require_api_key(app, settings.security)  # outside everything, the lean path included
    _search_route(app, answer, body_limit)
    _item_route(app, index, class_names)
    _status_routes(app, index, settings.model.bits)
    return app


def _batchers(settings: Settings, encoder: QueryEncoder) -> tuple[MicroBatcher | None, MicroBatcher | None]:
    """The rank and encode batchers, or none (``batch_enabled=false``: each search alone in the thread pool).

    Top-k searches waiting at the same moment over the same shard generations share one kernel call per shard
    (:meth:`View.rank`: each takes its first k of the batch's largest k), on the event loop's thread unless
    batch_in_loop=false. Query images waiting at the same moment over the same view share one encode call per
    model version."""
    s = settings.server
    if not s.batch_enabled:
        return None, None
    options = dict(max_batch=s.batch_max, window_s=s.batch_window_s, max_inflight=s.batch_inflight)
    ranks = MicroBatcher(lambda _key, items: items[0][0].rank([c for _, c, _ in items], [k for _, _, k in items]),
                         in_loop=s.batch_in_loop, **options)
    encodes = MicroBatcher(lambda _key, items: encoder.for_uploads([upload for _, upload in items], items[0][0]), **options)
    return ranks, encodes


def _assemble(index: ShardedIndex, status: LiveStatus, *batchers: MicroBatcher | None) -> FastAPI:
    """The app, its lifespan (the index's followers, the status sampler, the batchers) and its /search counter."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        index.start()  # the followers, the root's rescan and the sampler run exactly as long as the server
        status.start()
        freeze_startup_objects()  # full collections walking start-up's objects stalled every request behind them
        yield
        for b in batchers:
            if b is not None:
                await b.aclose()
        status.stop()
        index.stop()

    # /docs and /redoc load their scripts from this process (fastapi-offline's copy), not from a CDN;
    # no validator badge either: Swagger UI would send the spec's URL to an outside validator
    app = FastAPIOffline(title="streamhash query", version=__version__, lifespan=lifespan,
                         description="Hamming ranking over the live streamhash index, merged across its shards.",
                         swagger_ui_parameters={"validatorUrl": None}, default_response_class=FastJSONResponse)
    app.state.index, (app.state.batcher, app.state.encodes) = index, batchers
    app.add_middleware(CountResponses, path="/search")
    return app


def _answerer(settings: Settings, index: ShardedIndex, encoder: QueryEncoder, batcher: MicroBatcher | None,
              encodes: MicroBatcher | None, class_names) -> Answer:
    """The one search: parsed request in, response fields out; both the lean JSON path and FastAPI's route
    (multipart) call it, and it ranks through :meth:`View.rank`, batched or not."""
    search_seconds = m.QUERY_SECONDS.labels(endpoint="/search")

    async def answer(req: SearchRequest, image: bytes | None, t0: float) -> dict:
        if req.k > settings.server.max_k:
            raise BadQueryError(f"k={req.k} exceeds the limit of {settings.server.max_k}")
        view, absent = _view(index, req, settings.kafka.topic)  # one generation per shard for the whole query
        queries = await _queries(req, image, view, index, encoder, encodes, settings.model.bits)
        queries.check_some()
        rerank = Rerank.plan(queries.feature, req.k, settings.server.rerank_candidates,
                             "a search by code_hex has no feature to re-rank by" if req.code_hex is not None else None)
        if batcher is not None and req.radius is None:
            hits = await batcher.submit(view.key, (view, queries.codes, rerank.candidates))
        else:
            hits = (await run_in_threadpool(view.rank, [queries.codes], [rerank.candidates], req.radius))[0]
        hits, reranked = (await run_in_threadpool(rerank.apply, hits, view, req.k) if rerank.query is not None
                          else rerank.apply(hits, view, req.k))
        if req.item_id is not None and (req.radius is None or req.radius > 0):
            hits = view.query_first(hits, req.item_id, req.k)
        if named := class_names.current(view):
            for hit in hits:
                hit["label_names"] = name_labels(hit["labels"], named)
        took = time.perf_counter() - t0
        search_seconds.observe(took)
        # a SearchResponse's fields, rendered by orjson without a pydantic round trip (the schema is response_model's)
        return {**_summary(view, queries, absent), **reranked, "results": hits, "took_ms": took * 1000}

    return answer


def _view(index: ShardedIndex, req: SearchRequest, topic: str) -> tuple[View, list[str]]:
    """The view a search ranks (every shard, or the shards of ``req.partitions`` of ``topic``) and the names of
    the requested shards this server does not hold."""
    if req.partitions is None:
        return index.view(), []
    wanted = set(req.partitions)
    shards = [s for s in index.shards if s.key.topic == topic and s.key.partition in wanted]
    if req.item_id is not None and not any(s.store.get_item(req.item_id) for s in shards):
        raise HTTPException(404, f"no item {req.item_id!r} in partitions {sorted(wanted)}")
    held = {s.key.partition for s in shards}
    return View(shards), [f"{topic}/{p}" for p in sorted(wanted - held)]


async def _queries(req: SearchRequest, image: bytes | None, view: View, index: ShardedIndex, encoder: QueryEncoder,
                   encodes: MicroBatcher | None, bits: int) -> ShardQueries:
    """The query code for each shard of ``view``: the code given, the item's, or the image's under each model."""
    if req.code_hex is not None:
        try:
            return ShardQueries.same(view, from_hex(req.code_hex, index.bits or bits))
        except ValueError as exc:
            raise BadQueryError(str(exc)) from None
    if req.item_id is not None:
        return (await run_in_threadpool(for_item, index, view, encoder, req.item_id))[0]
    # Decoding and encoding are CPU work that grows with the upload and the batch: off the event loop, so a
    # large image does not stall /healthz. A small upload is decoded in its encode batch: a hand-off of its own
    # cost more than its decode (8 image searches at a time: 1.0 -> 0.5 ms a request). A large one is decoded
    # first, in the thread pool, beside the others rather than after them in one batch.
    if encodes is None:
        return await run_in_threadpool(encoder.for_upload, image, view)
    upload = image if len(image) <= DECODE_IN_BATCH_BYTES else await run_in_threadpool(encoder.decode, image)
    return await encodes.submit(view.key, (view, upload))


def _search_route(app: FastAPI, answer: Answer, body_limit: int) -> None:
    """FastAPI's ``POST /search``: what the lean path does not take (multipart), and the contract in /docs."""

    @app.post("/search", response_model=SearchResponse, openapi_extra={
        "requestBody": {"content": {
            "application/json": {"schema": SearchRequest.model_json_schema()},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "image": {"type": "string", "format": "binary"}, "k": {"type": "integer"}, "radius": {"type": "integer"}}}},
        }, "required": True}}, **api_docs.SEARCH)
    async def search(request: Request) -> SearchResponse:
        t0 = time.perf_counter()
        req, image = await parse_search(await bounded_request(request, body_limit))
        return FastJSONResponse(await answer(req, image, t0))


def _item_route(app: FastAPI, index: ShardedIndex, class_names: IndexNames) -> None:
    @app.get("/items/{item_id:path}", **api_docs.ITEM)
    def get_item(item_id: str):
        check_item_id(item_id)
        found = index.find_item(item_id)
        if found is None:
            raise HTTPException(404, f"no item {item_id!r}")
        shard, rec = found
        named = class_names.current()
        return {"id": item_id, "labels": rec["labels"], "label_names": name_labels(rec["labels"], named) if named else None,
                "ts": rec["ts"], "seq": rec["seq"], "generation": rec["generation"],
                "shard": shard.name, "content_type": rec["ctype"], "code_hex": rec["code"].hex() if rec["code"] else None,
                "visible": shard.visible(rec)}


def _status_routes(app: FastAPI, index: ShardedIndex, bits: int) -> None:
    @app.get("/healthz", **api_docs.HEALTHZ)
    def healthz():
        view = index.view()
        newest = view.newest
        return {"status": "ok", "index_size": view.index_size, "generation": newest.g.generation if newest else 0,
                "model_version": newest.model_version if newest else 0, "bits": index.bits or bits,
                "shards": [{**v.describe(), "last_seq": v.g.last_seq} for v in view.shards]}

    @app.get("/metrics", **api_docs.METRICS)
    def metrics():
        return Response(generate_latest(m.QUERY_REGISTRY), media_type=CONTENT_TYPE_LATEST)


def _summary(view: View, queries: ShardQueries, absent: list[str] = ()) -> dict:
    """What a /search response says besides its hits: the shards used, each with its generation and model."""
    newest = view.newest
    sizes = [v.g.index.ntotal for v in view.shards]  # once each: the total is the sum of the sizes shown
    shards = [{**v.describe(size), "answered": err is None, **({"error": err} if err else {})}
              for v, size, err in zip(view.shards, sizes, queries.errors)]
    shards += [{"shard": name, "answered": False, "error": "not served here"} for name in absent]
    code = queries.codes[newest.pos] if newest is not None else None
    if code is None:
        code = next((c for c in queries.codes if c is not None), None)
    return {"model_version": newest.model_version if newest else 0, "generation": newest.g.generation if newest else 0,
            "index_size": sum(sizes), "code_hex": to_hex(code) if code is not None else "",
            "shards": shards, "partial": bool(absent) or any(err is not None for err in queries.errors)}


SETTINGS_ENV = "STREAMHASH_SERVE_SETTINGS_JSON"  # run() hands its settings (CLI flags applied) to its workers


def _open_root(settings: Settings) -> StoreRoot | None:
    """The store root, once a worker has created it (within ``store_wait_s``); None (logged) otherwise."""
    from streamhash.errors import StoreError

    path = settings.store.path
    deadline = time.monotonic() + settings.server.store_wait_s
    while True:
        try:
            if (path / LAYOUT_FILE).exists() or (path / "data.mdb").exists():  # a legacy store: refused with what to do
                return StoreRoot(path, create=False)
        except StoreError as exc:
            log.error("%s", exc)
            return None
        if time.monotonic() > deadline:
            log.error("no store root at %s after %.0fs (start a worker first, or check STREAMHASH_STORE__PATH)",
                      path, settings.server.store_wait_s)
            return None
        time.sleep(0.5)


def _prepare_process(settings: Settings) -> None:
    pin_malloc_mmap_threshold()
    import torch

    torch.set_num_threads(settings.model.torch_threads)  # two OpenMP pools on 2 cores: 0.5 ms encode became 40 ms


def app_from_env() -> FastAPI:
    """The app factory of each ``--workers`` process: settings from ``run()`` (or the environment), and a
    ShardedIndex of its own (each worker holds its own copy of the in-memory index)."""
    raw = os.environ.get(SETTINGS_ENV)
    settings = Settings.model_validate_json(raw) if raw else Settings()
    bounds.configure(settings.server)  # this process's protocol class: limits as run() set them in its own
    _prepare_process(settings)
    root = _open_root(settings)
    if root is None:
        raise SystemExit(f"no store root at {settings.store.path}")
    return create_app(settings, sharded_index(settings, root))


def _with_secrets(dumped: dict, settings: Settings) -> dict:
    sec = settings.security
    dumped["security"].update({name: getattr(sec, name).get_secret_value() for name in ("model_key", "api_key", "upstream_api_key")
                               if getattr(sec, name, None) is not None})
    return dumped


def run(settings: Settings) -> int:
    """The query server process (or, with ``server.shards``, the router): serve HTTP until stopped; returns
    its exit code."""
    import uvicorn

    from streamhash.errors import EXIT_USAGE

    if settings.server.shards or settings.server.discover:
        from streamhash.services import router

        return router.run(settings)
    settings.log_startup("streamhash serve")
    opts = uvicorn_options(settings)
    _prepare_process(settings)
    root = _open_root(settings)  # wait for the root here, once, before starting any worker process
    if root is None:
        return EXIT_USAGE
    if settings.server.workers > 1:
        # each worker process imports the factory and builds its own app and ShardedIndex
        # the query server never uses Kafka; secrets as themselves (the dump masks them), to the children only
        # of the kafka section only the topic: the children rank partitions of it and never use Kafka
        dumped = _with_secrets(settings.model_dump(mode="json", exclude={"kafka"}), settings)
        os.environ[SETTINGS_ENV] = json.dumps({**dumped, "kafka": {"topic": settings.kafka.topic}})
        stores = OwnStores(root)  # this process holds no index: it reads the shards' meta for the advert itself
        with _advertised(settings, stores):
            uvicorn.run("streamhash.services.query:app_from_env", factory=True, workers=settings.server.workers, **opts)
        stores.close()
        return 0
    index = sharded_index(settings, root)
    app = create_app(settings, index)
    served_now = lambda: [(s.key, s.store) for s in index.shards]  # noqa: E731
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def advertised_lifespan(a):
        # withdrawn in the lifespan's shutdown: after it uvicorn raises the stop signal again, and the process ends
        async with inner(a) as state, _advertised_async(settings, served_now):
            yield state

    app.router.lifespan_context = advertised_lifespan
    uvicorn.run(app, **opts)
    return 0


@contextmanager
def _advertised(settings: Settings, shards):
    """The advert on Kafka (``server.advertise_url``) from before serving to after: withdrawn on a clean stop."""
    loop = advertising(settings, shards)
    try:
        yield
    finally:
        if loop is not None:
            loop.stop()


@asynccontextmanager
async def _advertised_async(settings: Settings, shards):
    loop = advertising(settings, shards)
    try:
        yield
    finally:
        if loop is not None:
            await run_in_threadpool(loop.stop)
