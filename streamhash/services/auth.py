"""The API key (``STREAMHASH_SECURITY__API_KEY``) of the query server and the router.

With a key set, every request must carry ``Authorization: Bearer <key>`` (or, for the search page, whose
``<img>`` thumbnails cannot send a header, the cookie ``streamhash_api_key``; the page asks for the key once and
sets it), else 401 with ``{"detail": ...}`` and ``WWW-Authenticate: Bearer``. Paths in
``security.api_key_exempt`` need none: exact paths, or a prefix ending in ``*`` (``/ui/*``). The check is the
outermost layer of the app, ahead of the lean ``/search`` path too; keys are compared in constant time.
"""

from __future__ import annotations

import hmac
from http.cookies import CookieError, SimpleCookie
from urllib.parse import unquote

import orjson
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from streamhash import metrics as m
from streamhash.config import SecuritySettings

COOKIE = "streamhash_api_key"


class ApiKeyGuard:
    def __init__(self, app: ASGIApp, key: str, exempt: list[str]):
        self.app, self.key = app, key.encode()
        self.exact = {p for p in exempt if not p.endswith("*")}
        self.prefixes = tuple(p[:-1] for p in exempt if p.endswith("*"))

    def _exempt(self, path: str) -> bool:
        return path in self.exact or (bool(self.prefixes) and path.startswith(self.prefixes))

    def _presented(self, scope: Scope) -> bytes | None:
        cookie = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return token.strip() if scheme.lower() == b"bearer" else b""
            if name == b"cookie":
                cookie = value
        if cookie is not None:
            try:
                morsel = SimpleCookie(cookie.decode("latin-1")).get(COOKIE)
            except CookieError:
                return b""
            if morsel is not None:
                return unquote(morsel.value).encode()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._exempt(scope["path"]):
            await self.app(scope, receive, send)
            return
        presented = self._presented(scope)
        if presented is not None and hmac.compare_digest(presented, self.key):
            await self.app(scope, receive, send)
            return
        detail = ("no API key: send the header Authorization: Bearer <key>" if presented is None
                  else "wrong API key")
        body = orjson.dumps({"detail": detail})
        if scope["path"] == "/search":
            m.QUERIES.labels(endpoint="/search", status="401").inc()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"www-authenticate", b'Bearer realm="streamhash"'),
            (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def require_api_key(app: FastAPI, security: SecuritySettings) -> None:
    """With ``security.api_key`` set, every request to ``app`` passes :class:`ApiKeyGuard` first (outside every
    other layer built so far: call it after ``answer_ahead``); without one, nothing changes."""
    if security.api_key is None:
        return
    build = app.build_middleware_stack
    key = security.api_key.get_secret_value()

    def build_guarded() -> ASGIApp:
        return ApiKeyGuard(build(), key, security.api_key_exempt)

    app.build_middleware_stack = build_guarded
