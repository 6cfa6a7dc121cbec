"""The router (``streamhash serve --shards URL,URL,…`` or ``--discover``): one search over query servers on other
machines.

With ``--discover`` it needs no list: it follows the serving topic (:mod:`streamhash.kafka.directory`), where
each query server advertises the partitions it serves, and sends each search to the servers the map routes the
images topic's partitions to, each asked for its own partitions only (the request's ``partitions``), so every
partition is ranked exactly once even where two servers hold it (a copy restoring, one not fenced yet). Hits
merge by **distance, then partition, then the server's own order**: the order of one index over the union.
The answer is ``partial`` when a partition has no live advert, its only copy is restoring (marked
``restoring`` in ``shards``), or its server did not answer; each such partition is named in ``shards``. The
per-remote request metric is labelled by the server's URL in this mode (one value per query server).
The rest of this docstring is about ``--shards``, whose behaviour is unchanged.

It holds no store. Each ``POST /search`` is sent, with the same body, to every URL at once; each remote
has ``shard_timeout_s`` to answer. The hits of those that answered are merged in the order one index
over the union would give: **distance, then the URL's position in ``--shards``, then the remote's own
order** (distance, shard, insertion), which is the global (distance, shard, insertion) order when the
URLs are listed in shard order. The answer lists the shards of every remote that answered (each with
``url``, generation and model version) and ``{"url", "answered": false, "error"}`` for each that did not;
``partial`` is true when any did not (or a remote's own answer was partial): a missing remote is never
silent. When no remote answered 200: a 4xx is passed on if every remote gave one (a bad request, an item
nobody holds), else 503 with the same ``shards`` list (a remote that did not answer may have held the item).

A search by ``item_id`` goes to every remote; the one holding the item answers and the others say 404.
Those are then asked again with the item's code (``code_hex`` of the holder's answer), so they rank
against the same query the holder used. During a rolling re-encode that spans machines, a remote serving
another generation than the item's holder ranks against that code too (it cannot encode an image it
does not hold); a local search (one server over every shard) encodes the item's image for such shards.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

import httpx
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streamhash import __version__
from streamhash import metrics as m
from streamhash.config import Settings
from streamhash.errors import BadQueryError
from streamhash.index.rerank import merge_key, merged_fields
from streamhash.services.auth import require_api_key
from streamhash.services import api_docs
from streamhash.services.discovery import Discovery, bodies, partition_of, unserved
from streamhash.services.discovery import health as discovery_health
from streamhash.services.discovery import merge as discovery_merge
from streamhash.services.http_api import (
    CountResponses, FastJSONResponse, SearchResponse, bounded_request, check_item_id, max_body_bytes, parse_search,
    uvicorn_options,
)

log = logging.getLogger("streamhash.router")


class Answer:
    """One remote's answer: a status and JSON body, or the reason there was none (``error``)."""

    def __init__(self, url: str, status: int = 0, body: dict | None = None, error: str | None = None):
        self.url, self.status, self.body, self.error = url, status, body or {}, error

    @property
    def ok(self) -> bool:
        return self.status == 200

    def missing(self) -> dict:
        return {"url": self.url, "answered": False, "error": self.error or f"HTTP {self.status}"}


class Remotes:
    """The remotes, asked concurrently, each within the timeout, counted in the router metric by position."""

    def __init__(self, urls: list[str], timeout_s: float, api_key: str | None = None, cafile: Path | None = None):
        self.urls, self.timeout_s = urls, timeout_s
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.cafile = cafile
        self.client: httpx.AsyncClient | None = None

    async def open(self) -> None:
        # no pool wait: a remote that does not answer in time is cut off by ask()'s own deadline
        verify = ssl.create_default_context(cafile=str(self.cafile)) if self.cafile else True
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), limits=httpx.Limits(max_connections=None),
                                        headers=self.headers, verify=verify)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def ask(self, i: int | str, method: str, path: str, **kw) -> Answer:
        """Remote ``i`` of ``--shards``, or the discovered server at URL ``i``."""
        url = self.urls[i] if isinstance(i, int) else i
        # a discovered server is counted under one label: its URL would make a series per pod a deployment ever had
        label = str(i) if isinstance(i, int) else "discovered"
        try:
            # one deadline for the whole exchange (httpx's timeouts are per phase: connect, each read, ...)
            r = await asyncio.wait_for(self.client.request(method, url + path, **kw), self.timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            m.ROUTER_SHARD_REQUESTS.labels(shard=label, result="timeout").inc()
            return Answer(url, error="timeout")
        except httpx.HTTPError as exc:
            m.ROUTER_SHARD_REQUESTS.labels(shard=label, result="error").inc()
            return Answer(url, error=f"{type(exc).__name__}: {exc}"[:200])
        try:
            body = r.json()
        except ValueError:
            body = {"detail": r.text[:200]}
        # a remote's 4xx is an answer (the request's fault, or an item it does not hold); 5xx is a failure
        m.ROUTER_SHARD_REQUESTS.labels(shard=label, result="error" if r.status_code >= 500 else "ok").inc()
        return Answer(url, r.status_code, body if isinstance(body, dict) else {"detail": body})

    async def ask_all(self, method: str, path: str, only: list | None = None, **kw) -> list[Answer]:
        which = range(len(self.urls)) if only is None else only
        return list(await asyncio.gather(*(self.ask(i, method, path, **kw) for i in which)))

    async def ask_each(self, method: str, path: str, bodies: dict[str, dict]) -> list[Answer]:
        """Each discovered server at once, with its own JSON body."""
        return list(await asyncio.gather(*(self.ask(url, method, path, json=b) for url, b in bodies.items())))


def merge(answers: list[Answer], k: int, item_id: str | None = None) -> dict:
    """The fields of a /search response from the remotes' answers, in ``--shards`` order (see the module)."""
    ok = [a for a in answers if a.ok]
    hits = [h for a in ok for h in a.body["results"]]  # URL order, each remote's own order
    hits.sort(key=merge_key)  # stable: ties (distance, re-ranked similarity) keep URL then remote order
    if item_id is not None:  # the query item first, as a local search puts it
        hits = [h for h in hits if h["id"] == item_id] + [h for h in hits if h["id"] != item_id]
    shards = []
    for a in answers:
        shards += [{**s, "url": a.url} for s in a.body["shards"]] if a.ok else [a.missing()]
    newest = max(ok, key=lambda a: (a.body["generation"], a.body["model_version"]))
    return {"results": hits[:k], "model_version": newest.body["model_version"], "generation": newest.body["generation"],
            "index_size": sum(a.body["index_size"] for a in ok), "code_hex": newest.body["code_hex"], "shards": shards,
            "partial": len(ok) < len(answers) or any(a.body.get("partial") for a in ok),
            **merged_fields([a.body for a in ok])}


def create_app(settings: Settings, discovery: Discovery | None = None) -> FastAPI:
    """The router's app: over ``server.shards``, or over what ``discovery`` finds (``--discover``)."""
    sec = settings.security
    upstream = sec.upstream_api_key or sec.api_key  # the key the query servers behind expect: by default our own
    remotes = Remotes(settings.server.shards, settings.server.shard_timeout_s,
                      upstream.get_secret_value() if upstream else None, settings.server.shard_cafile)
    body_limit = max_body_bytes(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await remotes.open()
        yield
        await remotes.close()

    app = FastAPI(title="streamhash router", version=__version__, lifespan=lifespan, default_response_class=FastJSONResponse,
                  description="One search over several streamhash query servers, merged.")
    app.state.remotes = remotes
    app.add_middleware(CountResponses, path="/search")

    @app.exception_handler(BadQueryError)
    def _bad_query(_request: Request, exc: BadQueryError):
        return FastJSONResponse(status_code=400, content={"detail": str(exc)})

    @app.post("/search", response_model=SearchResponse, **api_docs.for_router(api_docs.SEARCH))
    async def search(request: Request):
        t0 = time.perf_counter()
        request = await bounded_request(request, body_limit)
        body = await request.body()  # first: the form parser then reads these bytes, not the spent stream
        req, image = await parse_search(request)  # refuse a bad request here, not once per remote
        if req.k > settings.server.max_k:
            raise BadQueryError(f"k={req.k} exceeds the limit of {settings.server.max_k}")
        if discovery is not None:
            return await _search_discovered(remotes, discovery, req, image, t0)
        headers = {"content-type": request.headers.get("content-type", "application/json")}
        answers = await remotes.ask_all("POST", "/search", content=body, headers=headers)
        if req.item_id is not None:
            answers = await _item_elsewhere(remotes, answers, req)
        if not any(a.ok for a in answers):
            return _none_answered(answers, [a.missing() for a in answers])
        return _answered(merge(answers, req.k, req.item_id), t0)

    @app.get("/items/{item_id:path}", **api_docs.for_router(api_docs.ITEM))
    async def get_item(item_id: str):
        check_item_id(item_id)
        routes = discovery.routes() if discovery is not None else None
        only = list(routes.servers) if routes is not None else None
        answers = await remotes.ask_all("GET", f"/items/{quote(item_id, safe='')}", only=only)
        # discovered: the copy in a partition routed to its server first (another may be a stale copy)
        found = next((a for a in answers if a.ok and (routes is None or _routed_to(a, routes))), None) or \
            next((a for a in answers if a.ok), None)
        if found is not None:
            return {**found.body, "url": found.url}
        if all(a.status == 404 for a in answers) and not (routes is not None and routes.missing):
            raise HTTPException(404, f"no item {item_id!r}")
        return FastJSONResponse(status_code=503, content={"detail": f"item {item_id!r} not found in the remotes that answered",
                                                          "shards": [a.missing() for a in answers if a.status != 404]})

    @app.get("/healthz", **api_docs.for_router(api_docs.HEALTHZ))
    async def healthz():
        if discovery is not None:
            routes = discovery.routes()
            status, body = discovery_health(await remotes.ask_all("GET", "/healthz", only=list(routes.servers)), routes,
                                            discovery.topic)
            return FastJSONResponse(status_code=status, content=body)
        answers = await remotes.ask_all("GET", "/healthz")
        ok = [a for a in answers if a.ok]
        shards = []
        for a in answers:
            shards += [{**s, "url": a.url, "answered": True} for s in a.body.get("shards", [])] if a.ok else [a.missing()]
        status = "ok" if len(ok) == len(answers) else "partial" if ok else "unavailable"
        return FastJSONResponse(status_code=200 if ok else 503, content={
            "status": status, "index_size": sum(a.body.get("index_size", 0) for a in ok), "shards": shards,
            "partial": len(ok) < len(answers)})

    @app.get("/metrics", **api_docs.for_router(api_docs.METRICS))
    def metrics():
        return Response(generate_latest(m.QUERY_REGISTRY), media_type=CONTENT_TYPE_LATEST)

    require_api_key(app, settings.security)
    return app


def _none_answered(answers: list[Answer], shards: list[dict], maybe_elsewhere: bool = False) -> FastJSONResponse:
    """No remote answered 200. If every one refused the request (a bad request, an item nobody holds), the 4xx is
    passed on; if one did not answer (or a partition has no server), it might have held the item: 503."""
    if answers and all(400 <= a.status < 500 for a in answers) and not (maybe_elsewhere and answers[0].status == 404):
        return FastJSONResponse(status_code=answers[0].status, content=answers[0].body)
    return FastJSONResponse(status_code=503, content={"detail": "no query server answered", "shards": shards,
                                                      "partial": True})


def _answered(out: dict, t0: float) -> FastJSONResponse:
    m.QUERY_SHARDS.set(sum(1 for s in out["shards"] if s["answered"]))
    took = time.perf_counter() - t0
    m.QUERY_SECONDS.labels(endpoint="/search").observe(took)
    return FastJSONResponse({**out, "took_ms": took * 1000})


def _routed_to(a: Answer, routes) -> bool:
    shard = a.body.get("shard")
    return isinstance(shard, str) and "/" in shard and partition_of(shard) in routes.servers.get(a.url, ())


async def _search_discovered(remotes: Remotes, discovery: Discovery, req, image: bytes | None, t0: float):
    """A search over the discovered servers, each asked for the partitions routed to it (the module's docstring)."""
    routes = discovery.routes(req.partitions)
    each = bodies(req, image, routes)
    answers = await remotes.ask_each("POST", "/search", each)
    if req.item_id is not None:
        holder = next((a for a in answers if a.ok), None)
        others = [a.url for a in answers if a.status == 404]
        if holder is not None and others:  # they rank against the holder's query code, as with --shards
            code = {"code_hex": holder.body["code_hex"], "k": req.k, **({"radius": req.radius} if req.radius is not None else {})}
            again = dict(zip(others, await remotes.ask_each("POST", "/search", {u: {**code, "partitions": each[u]["partitions"]}
                                                                               for u in others})))
            answers = [again.get(a.url, a) for a in answers]
    if not any(a.ok for a in answers):
        return _none_answered(answers, unserved(discovery.topic, routes) + [a.missing() for a in answers],
                              maybe_elsewhere=bool(routes.missing))
    return _answered(discovery_merge(answers, routes, discovery.topic, req.k, req.item_id), t0)


async def _item_elsewhere(remotes: Remotes, answers: list[Answer], req) -> list[Answer]:
    """A search by item: the remotes that do not hold it (404) rank against the holder's query code."""
    holder = next((a for a in answers if a.ok), None)
    others = [i for i, a in enumerate(answers) if a.status == 404]
    if holder is None or not others:
        return answers
    body = {"code_hex": holder.body["code_hex"], "k": req.k, **({"radius": req.radius} if req.radius is not None else {})}
    again = await remotes.ask_all("POST", "/search", only=others, json=body)
    answers = list(answers)
    for i, a in zip(others, again):
        answers[i] = a
    return answers


def run(settings: Settings) -> int:
    """The router process: serve HTTP until stopped; returns its exit code."""
    import uvicorn

    settings.log_startup("streamhash serve (router)")
    if settings.server.shards:
        log.info("routing to %d query servers: %s", len(settings.server.shards), ", ".join(settings.server.shards))
        uvicorn.run(create_app(settings), **uvicorn_options(settings))
        return 0
    discovery = Discovery(settings)  # before serving: the map is read to its end first
    routes = discovery.routes()
    log.info("discovering the query servers of %s on %s: %d serve %d of %d partitions now", settings.kafka.topic,
             settings.kafka.serving_topic, len(routes.servers), len(discovery.partitions) - len(routes.missing),
             len(discovery.partitions))
    try:
        uvicorn.run(create_app(settings, discovery), **uvicorn_options(settings))
    finally:
        discovery.close()
    return 0
