"""The query server's HTTP contract: request and response models, the body limit, response counting.

A ``/search`` body larger than :func:`max_body_bytes` is refused with 413 before it is read into
memory (``Content-Length`` first, then while streaming a chunked body); every ``/search`` response
is counted in ``streamhash_queries_total`` by status, 5xx included.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streamhash import metrics as m
from streamhash.config import Settings
from streamhash.errors import BadQueryError
from streamhash.records import MAX_KEY_BYTES

_BODY_SLACK_BYTES = 64 * 1024  # JSON fields, multipart boundaries and part headers around the image


def check_item_id(item_id: str) -> None:
    """400 for an id the contract cannot hold (LMDB refuses empty keys and keys past 511 bytes with an error)."""
    if not 0 < len(item_id.encode()) <= MAX_KEY_BYTES:
        raise BadQueryError(f"an item id is 1 to {MAX_KEY_BYTES} bytes of UTF-8, got {len(item_id.encode())} bytes")


def max_body_bytes(settings: Settings) -> int:
    """The largest ``/search`` body: the largest image the contract accepts, base64-encoded, plus room for the rest."""
    return settings.store.max_value_bytes * 4 // 3 + _BODY_SLACK_BYTES


class FastJSONResponse(JSONResponse):
    """JSON by orjson: the server's default response class (a /search answer of 10 hits renders in ~2 µs
    instead of ~15 µs for ``json.dumps``); numpy scalars and arrays serialize as numbers."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)


class PayloadTooLarge(HTTPException):
    def __init__(self, detail: str):
        super().__init__(413, detail)


class SearchRequest(BaseModel):
    # strict: `"k": true` is not k=1, `"k": 2.0` or `"k": "2"` not k=2; each is a 400 naming the field
    model_config = ConfigDict(strict=True)

    image_base64: str | None = Field(None, description="PNG/JPEG/.npy bytes, base64-encoded")
    code_hex: str | None = Field(None, description="a packed code as hex, bits/4 digits")
    item_id: str | None = Field(None, description="a stored item: search by its code in the live generation; it comes first")
    k: int = Field(10, ge=1, description="number of neighbours")
    radius: int | None = Field(None, ge=0, description="only neighbours at Hamming distance < radius (strict)")
    partitions: list[int] | None = Field(None, description="only the shards of these partitions of the images topic "
                                         "(a discovering router's request: each partition asked of one server)")


class Hit(BaseModel):
    id: str
    distance: int
    labels: list[int] | None
    label_names: list[str] | None = Field(None, description="each label's class name, where the server has one (the "
                                                            "label-names header, or STREAMHASH_DATA__CLASS_NAMES)")
    shard: str | None = Field(None, description="the shard holding the item, topic/partition")
    similarity: float | None = Field(None, description="cosine of the item's stored feature to the query's (a "
                                                       "re-ranked search; null: the item has none)")


class ShardAnswer(BaseModel):
    """One shard a search used, or one that did not answer (then ``answered`` is false and ``error`` says why)."""

    shard: str | None = Field(None, description="topic/partition; absent for a remote that did not answer")
    url: str | None = Field(None, description="the query server holding the shard (a router's answers)")
    generation: int | None = None
    model_version: int | None = Field(None, description="the model whose network encoded the query for this shard")
    index_size: int | None = None
    answered: bool
    error: str | None = None
    restoring: bool | None = Field(None, description="the shard is still restoring: its items are not all there yet")


class SearchResponse(BaseModel):
    results: list[Hit] = Field(description="by distance, then (re-ranked) similarity, then shard (topic, partition), "
                                           "then insertion into the shard")
    model_version: int = Field(description="of the newest shard used (highest generation, then model version)")
    generation: int = Field(description="of the newest shard used")
    index_size: int = Field(description="items in every shard used")
    code_hex: str = Field(description="the query code for the newest shard")
    took_ms: float
    shards: list[ShardAnswer] = Field(description="every shard the search used, with its generation and model version")
    partial: bool = Field(description="true when a shard did not answer: the results leave its items out")
    reranked: bool = Field(False, description="hits of one distance ordered by the labels of the most similar (their "
                                              "class first), then the similarity of their stored features "
                                              "(server.rerank_candidates Hamming candidates)")
    rerank_note: str | None = Field(None, description="why the hits keep Hamming order (a search by code_hex, no "
                                                      "stored features, re-ranking off)")


class CountResponses:
    """Counts every response on ``path`` in ``streamhash_queries_total`` by status, whoever produced it: the
    handler, an exception handler, routing (405), or Starlette's 500 page after an unhandled exception."""

    def __init__(self, app: ASGIApp, path: str):
        self.app, self.path = app, path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        status: int | None = None

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        except Exception:
            # ServerErrorMiddleware, outside this one, turns it into a 500 unless a response had started
            m.QUERIES.labels(endpoint=self.path, status=str(status or 500)).inc()
            raise
        m.QUERIES.labels(endpoint=self.path, status=str(status)).inc()


async def read_body(receive: Receive, content_length: str | None, limit: int) -> bytes:
    """The request body from ``receive``, refusing (413) one past ``limit`` bytes without holding more than that."""
    if content_length is not None:
        if not content_length.isascii() or not content_length.isdigit():
            raise BadQueryError(f"bad Content-Length header {content_length[:40]!r}")
        if int(content_length) > limit:
            raise PayloadTooLarge(f"request body of {int(content_length)} bytes exceeds the {limit}-byte limit")
    chunks, size = [], 0
    while True:  # chunked bodies declare no length: count as they arrive
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def bounded_request(request: Request, limit: int) -> Request:
    """The request with its body read (:func:`read_body`), for handlers that go on to ``form()`` or ``body()``."""
    body, replayed = await read_body(request.receive, request.headers.get("content-length"), limit), False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:  # after the body, a receive waits for the disconnect as usual
            return await request.receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, replay)  # form() and body() read the bytes already here


async def parse_search(request: Request) -> tuple[SearchRequest, bytes | None]:
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            async with request.form(max_files=1, max_fields=8) as form:  # closes the spooled upload
                upload = form.get("image")
                if upload is None or isinstance(upload, str):
                    raise BadQueryError("multipart search needs an `image` file field")
                fields = {name: _form_int(name, form.get(name)) for name in ("k", "radius") if form.get(name) is not None}
                return SearchRequest.model_validate(fields), await upload.read()  # the image is the query
        except ValueError as exc:  # pydantic.ValidationError is a ValueError
            raise BadQueryError(f"bad search request: {exc}") from None
    return parse_json_search(await request.body())


def _form_int(name: str, value) -> int:
    """A multipart field's text as an int: ASCII digits only (a form has no JSON types to be strict about)."""
    if not isinstance(value, str) or not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise BadQueryError(f"{name} must be a non-negative whole number, got {str(value)[:40]!r}")
    return int(value)


def parse_json_search(body: bytes) -> tuple[SearchRequest, bytes | None]:
    """A JSON /search body as a request and its query image's bytes (None unless ``image_base64``); 400 if bad.
    The one parser of a search: the lean path, FastAPI's route and the router all come here (multipart through
    :func:`parse_search`, which validates the same model)."""
    try:
        req = _checked(SearchRequest.model_validate_json(body))
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise BadQueryError(f"bad search request: {exc}") from None
    if req.image_base64 is None:
        return req, None
    try:
        return req, base64.b64decode(req.image_base64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadQueryError(f"image_base64 is not valid base64: {exc}") from None


def _checked(req: SearchRequest) -> SearchRequest:
    if (req.image_base64 is not None) + (req.code_hex is not None) + (req.item_id is not None) != 1:
        raise BadQueryError("give exactly one of image_base64, code_hex or item_id")
    return req


def uvicorn_options(settings: Settings) -> dict:
    """How every HTTP process of ours runs uvicorn: uvloop and httptools (uvicorn[standard]) with our bounds on
    clients (:mod:`streamhash.services.bounds`: header-read timeout, header size, connection cap), no access
    log, no proxy-header middleware (nothing here reads the client's address; it cost ~3% of a search's CPU,
    parsing forwarding headers on every request), and TLS when ``server.ssl_certfile`` is set."""
    from streamhash.services import bounds

    s = settings.server
    tls = {"ssl_certfile": str(s.ssl_certfile), "ssl_keyfile": str(s.ssl_keyfile)} if s.ssl_certfile else {}
    return dict(host=s.host, port=s.port, log_level="warning", access_log=False, loop="auto",
                http=bounds.configure(s), proxy_headers=False, timeout_keep_alive=s.keep_alive_s, **tls)
