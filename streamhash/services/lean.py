"""``POST /search`` with a JSON body, answered ahead of FastAPI.

Profiled in-process (RESULTS, "Serving"), FastAPI's and Starlette's layers (middleware stack, routing,
dependency solving, the request and response objects) cost more per search by code than the ranking at
100k items. A JSON search never enters them: :func:`answer_ahead` hands it to :class:`LeanSearch`, a plain ASGI
handler; everything else, multipart searches included, goes through FastAPI, where the ``/search`` route
stays registered so that ``/docs`` describes the whole contract. The contract is the same either way: the
same parsing and validation (:func:`~streamhash.services.http_api.parse_json_search`), 413 before an
oversized body is read, 4xx as ``{"detail": ...}``, and every response counted in
``streamhash_queries_total`` by status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from fastapi import FastAPI, HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from streamhash import metrics as m
from streamhash.errors import BadQueryError
from streamhash.services.http_api import SearchRequest, parse_json_search, read_body

log = logging.getLogger("streamhash.query")

# (request, its query image's bytes or None, when it arrived: perf_counter) -> the response's JSON fields
Answer = Callable[[SearchRequest, "bytes | None", float], Awaitable[dict]]

_JSON = [(b"content-type", b"application/json")]
_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]


class LeanSearch:
    path = "/search"

    def __init__(self, answer: Answer, body_limit: int):
        self.answer, self.body_limit = answer, body_limit
        self._counted: dict[int, object] = {}  # status -> its counter: labels() costs a lookup per call

    def takes(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            return False
        for name, value in scope["headers"]:
            if name == b"content-type":
                return not value.startswith(b"multipart/form-data")
        return True  # no content type: read as JSON, as FastAPI's route did

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        length = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value.decode("latin-1")
        headers = _JSON
        try:
            req, image = parse_json_search(await read_body(receive, length, self.body_limit))
            status, body = 200, orjson.dumps(await self.answer(req, image, t0), option=orjson.OPT_SERIALIZE_NUMPY)
        except BadQueryError as exc:
            status, body = 400, orjson.dumps({"detail": str(exc)})
        except HTTPException as exc:
            status, body = exc.status_code, orjson.dumps({"detail": exc.detail})
            headers = _JSON + [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (exc.headers or {}).items()]
        except ClientDisconnect:
            return  # nobody to answer
        except Exception:  # noqa: BLE001 - a 500 like Starlette's, logged with its cause
            log.exception("/search failed")
            status, body, headers = 500, b"Internal Server Error", _TEXT
        self._count(status)
        await send({"type": "http.response.start", "status": status,
                    "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _count(self, status: int) -> None:
        counter = self._counted.get(status)
        if counter is None:
            counter = self._counted[status] = m.QUERIES.labels(endpoint=self.path, status=str(status))
        counter.inc()


def answer_ahead(app: FastAPI, lean: LeanSearch) -> None:
    """Requests ``lean`` takes are answered before ``app``'s middleware stack; the rest go through it."""
    build = app.build_middleware_stack  # Starlette builds the stack on the first request

    def build_with_lean_first() -> ASGIApp:
        stack = build()

        async def ahead(scope: Scope, receive: Receive, send: Send) -> None:
            if lean.takes(scope):
                await lean(scope, receive, send)
            else:
                await stack(scope, receive, send)

        return ahead

    app.build_middleware_stack = build_with_lean_first
