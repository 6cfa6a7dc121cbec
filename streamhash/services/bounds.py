"""Bounds on HTTP clients that uvicorn does not set: a header-read deadline, a header size cap, a connection cap.

uvicorn (0.55, httptools) arms no timer until a first response is complete: a connection that sends nothing,
or trickles its request line and headers a byte at a time, is held for as long as the client likes, and each
one costs a file descriptor and a protocol object (issue 26: 1,100 trickling connections were all held, bounded
only by the open-file limit). Its ``limit_concurrency`` does not help: it counts those idle connections too and
answers 503 to the *next real request* once they fill it.

:class:`BoundedHttpTools` is uvicorn's httptools protocol with three rules (``ServerSettings``):

- a request's headers must be complete within ``header_timeout_s`` of the connection's opening or of the
  request's first byte; else the connection is closed (408 when nothing of a response has started);
- at most ``max_header_bytes`` of request line and headers; else 431 and closed;
- at most ``max_connections`` open: a new connection past it closes the one that has been *idle* longest
  (waiting for its headers, or kept alive between requests), so trickling clients cannot lock out real ones;
  only when every open connection is mid-request is the new one refused (503).

The limits are class attributes set by :func:`configure` in every process that serves (uvicorn's worker
processes unpickle the class by name and call the app factory, which configures it again).
"""

from __future__ import annotations

import asyncio
import logging
import resource

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from streamhash import metrics as m
from streamhash.config import ServerSettings

log = logging.getLogger("streamhash.http")
RESERVED_FILES = 256  # file descriptors kept for everything but client connections: shards, pipes, logs


def _close_reply(status: int, reason: str) -> bytes:
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            f"content-length: {len(reason)}\r\n\r\n{reason}").encode("latin-1")


class BoundedHttpTools(HttpToolsProtocol):
    header_timeout_s: float = ServerSettings.model_fields["header_timeout_s"].default
    max_header_bytes: int = ServerSettings.model_fields["max_header_bytes"].default
    max_connections: int = ServerSettings.model_fields["max_connections"].default
    # Connections not inside a request (reading headers, or kept alive), oldest first: the eviction order.
    # One dict per process: every server of a process shares the cap (there is one per process).
    _idle: dict[BoundedHttpTools, None] = {}

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and not self._evict_idle():
            m.HTTP_CONNECTIONS_CLOSED.labels(reason="connection_cap").inc()
            transport.write(_close_reply(503, "too many connections"))
            transport.close()
            return
        self._await_headers()

    def _evict_idle(self) -> bool:
        oldest = next(iter(self._idle), None)
        if oldest is None:
            return False
        m.HTTP_CONNECTIONS_CLOSED.labels(reason="evicted_idle").inc()
        oldest._forget()
        oldest.transport.close()
        return True

    def _await_headers(self) -> None:
        """From now, the next request's headers have header_timeout_s to arrive."""
        self._forget()
        self._idle[self] = None
        self._header_bytes = 0
        self._deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _forget(self) -> None:
        self._idle.pop(self, None)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        self._idle.pop(self, None)
        if not self.transport.is_closing():
            m.HTTP_CONNECTIONS_CLOSED.labels(reason="header_timeout").inc()
            if self._header_bytes:  # a request was begun: say why it ends; a silent connection just closes
                self.transport.write(_close_reply(408, "request headers not received in time"))
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        reading_headers = self._deadline is not None
        if reading_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        # still reading headers after this chunk: the chunk held no end of headers (a chunk that completes them
        # may carry a large body as well, and counts for nothing)
        if self._deadline is not None and self._header_bytes > self.max_header_bytes and not self.transport.is_closing():
            self._forget()
            m.HTTP_CONNECTIONS_CLOSED.labels(reason="header_size").inc()
            self.transport.write(_close_reply(431, "request headers too large"))
            self.transport.close()

    def on_message_begin(self) -> None:
        if self._deadline is None:  # a kept-alive connection starts its next request: the deadline starts now
            self._await_headers()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._forget()  # inside a request now: neither timed out by this rule nor evicted
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._idle[self] = None  # kept alive, waiting: evictable (uvicorn's keep-alive timer closes it later)

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)


def configure(server: ServerSettings) -> type[BoundedHttpTools]:
    """Set the limits from ``server`` and return the protocol class to give uvicorn as ``http``."""
    BoundedHttpTools.header_timeout_s = server.header_timeout_s
    BoundedHttpTools.max_header_bytes = server.max_header_bytes
    BoundedHttpTools.max_connections = fit_open_files(server.max_connections)
    return BoundedHttpTools


def fit_open_files(max_connections: int) -> int:
    """The connection cap this process can keep: its open-file limit raised to ``max_connections`` plus room for
    the rest (shards, pipes, logs) where the hard limit allows; else the cap lowered to fit, with a warning.
    Past the limit accept() fails, and every new connection, a real client's too, is dropped unanswered."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + RESERVED_FILES
    if soft != resource.RLIM_INFINITY and soft < want:
        raised = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit to %d: %s", raised, exc)
    if soft != resource.RLIM_INFINITY and soft < want:
        fitted = max(1, soft - RESERVED_FILES)
        log.warning("server.max_connections=%d lowered to %d: the open-file limit is %d (ulimit -n; %d kept for "
                    "the rest of the process)", max_connections, fitted, soft, RESERVED_FILES)
        return fitted
    return max_connections
