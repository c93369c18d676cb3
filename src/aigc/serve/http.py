"""The HTTP edge: what a request may weigh and how long its client may take, and whom to believe about its address.

- ``RequestLimits`` (ASGI middleware): a body over ``max_body_mb`` is refused with 413 before it is read (or as soon as
  a chunked one passes it; file uploads are held to ``file_max_mb`` by their route); headers over ``max_header_kb`` in all with 431; a body that stops arriving for ``client_timeout_s``
  with 408.
- ``GuardedH11Protocol`` (uvicorn's HTTP/1.1 protocol): a connection that has not finished sending a request head
  within ``client_timeout_s`` (slowloris, or a socket opened and left) is answered 408 and closed. uvicorn itself
  waits for ever.
- ``X-Forwarded-For`` is believed only from ``trusted_proxies`` (uvicorn's ProxyHeadersMiddleware, right to left);
  uvicorn's own default (trust 127.0.0.1) is turned off, so nobody on the host can pick their address either.
"""
from __future__ import annotations

import functools
import json

import anyio
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.h11_impl import H11Protocol

from aigc.serve import errors
from aigc.settings import Settings


def _error(status: int, message: str, code: str) -> tuple[dict, dict]:
    """The ASGI messages of an error answered before (or outside) the app: OpenAI's shape (``errors.body``)."""
    body = json.dumps(errors.body(message, "invalid_request_error", code)).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]}
    return start, {"type": "http.response.body", "body": body}


class BodyTimeout(StarletteHTTPException):
    """Raised from ``receive``: FastAPI's body parsing lets an HTTPException through (and our handler words it)."""
    code = "request_timeout"


class BodyTooLarge(StarletteHTTPException):
    code = "body_too_large"


class RequestLimits:
    def __init__(self, app, settings: Settings):
        self.app = app
        self.max_body = settings.max_body_mb * 2**20
        self.max_headers = settings.max_header_kb * 1024
        self.timeout = settings.client_timeout_s

    async def refuse(self, send, status: int, message: str, code: str) -> None:
        start, body = _error(status, message, code)
        await send(start)
        await send(body)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size, length = 0, None
        for k, v in scope["headers"]:
            size += len(k) + len(v) + 4
            if k == b"content-length":
                length = int(v) if v.isdigit() else -1
        if size > self.max_headers:
            return await self.refuse(send, 431, f"the request's headers are larger than {self.max_headers // 1024} KB",
                                     "headers_too_large")
        # An upload to /v1/files is held to file_max_mb by its route, which counts the file as it streams to disk.
        limit = None if scope["path"] == "/v1/files" and scope["method"] == "POST" else self.max_body
        if limit is not None and length is not None and length > limit:
            return await self.refuse(send, 413, f"the request body is larger than {limit // 2**20} MB", "body_too_large")
        received, done, started = 0, False, False

        async def limited_receive():
            nonlocal received, done
            if done:  # the body is in: from here on receive only waits for a disconnect, as long as the response lasts
                return await receive()
            try:
                with anyio.fail_after(self.timeout):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(408, f"the request body did not arrive within {self.timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if limit is not None and received > limit:
                    raise BodyTooLarge(413, f"the request body is larger than {limit // 2**20} MB")
                done = not message.get("more_body", False)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (BodyTimeout, BodyTooLarge) as exc:  # read outside a route (no handler saw it)
            if started:
                raise
            await self.refuse(send, exc.status_code, exc.detail, exc.code)


def add_edge(app, settings: Settings) -> None:
    """The limits, and the trusted proxies' address rewriting when there are any, as middleware of ``app``."""
    app.add_middleware(RequestLimits, settings=settings)
    proxies = [p.strip() for p in settings.trusted_proxies.split(",") if p.strip()]
    if proxies:
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=proxies)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:  # closed unless configured: a page of another site may not call the API from a browser
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"],
                           allow_headers=["authorization", "content-type", "x-request-id", "openai-organization"],
                           expose_headers=["x-request-id"])


@functools.cache
def _env_timeout() -> float:
    return Settings().client_timeout_s


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request head (``AIGC_CLIENT_TIMEOUT_S``, or the config's
    ``client_timeout_s`` where one was set on it)."""

    def __init__(self, config, *args, **kw):
        super().__init__(config, *args, **kw)
        self.head_timeout = getattr(config, "client_timeout_s", None) or _env_timeout()
        self._head_timer = None

    def _waiting_for_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self._waiting_for_head():
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_too_slow)
        super().data_received(data)
        if self._head_timer is not None and not self._waiting_for_head():
            self._head_timer.cancel()  # the head is in: the body has its own deadline (RequestLimits)
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._waiting_for_head():
            return
        start, body = _error(408, f"the request head did not arrive within {self.head_timeout:g} s", "request_timeout")
        head = b"HTTP/1.1 408 Request Timeout\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in start["headers"])
        self.transport.write(head + b"\r\n" + body["body"])
        self.transport.close()

    def connection_lost(self, exc) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


def uvicorn_options(settings: Settings) -> dict:
    """What every server of the fleet passes to uvicorn (the CLI's one process and its workers, and the tests')."""
    return {"http": GuardedH11Protocol, "proxy_headers": False,  # the app applies trusted_proxies itself
            "h11_max_incomplete_event_size": max(64 * 1024, 4 * settings.max_header_kb * 1024)}
