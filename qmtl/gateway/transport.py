"""A lean HTTP/1.1 transport for httpx, used by the Gateway's backends (:mod:`qmtl.gateway.backends`).

Why: on an uncached decide httpcore's pool was most of the Gateway's client cost (py-spy
under ``bench/bench_ops.py``): it scans every pooled connection twice per request, polling
each idle socket, and goes through anyio for every read and write. This transport keeps,
per origin, a stack of idle keep-alive connections (the most recently used first; one that
the server closed is dropped when taken), writes each request in one call and parses the
answer with httptools (llhttp, the parser uvicorn uses). Failures become httpx's own
exceptions (``ConnectError``, ``ConnectTimeout``, ``ReadError``, ``ReadTimeout``,
``RemoteProtocolError``), so the client's callers see httpx's contract unchanged. Only
plain ``http://`` is served here (the backends' internal URLs); any other scheme goes to
httpx's default transport.
"""

from __future__ import annotations

import asyncio
import json as json_module
import re
from collections.abc import Iterable, Mapping
from typing import Any

import httptools
import httpx


class _Answer:
    """httptools callbacks: collects one response."""

    __slots__ = ("body", "complete", "headers", "headers_done", "keep_alive", "parser")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.keep_alive = False  # read when the headers are complete (llhttp resets it after the message)
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.headers_done = False
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.keep_alive = bool(self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def reusable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class DirectRequests:
    """The bytes ``client.build_request(...)`` would have this transport write, for the simple
    calls a backend makes — a path of plain URL characters with no query, a JSON or bytes body
    or none — built without httpx's ``Request``/``URL`` objects (~7 % of an uncached decide's
    Gateway CPU went to building them: URL parsing and merging, header normalisation). Anything
    else gets None, and the caller builds the request through the client as before. The
    client's base URL, headers (httpx's defaults and its own) and timeout are read once, here:
    the result is the same request line, headers and body (tests/unit/test_gw_transport.py
    compares them with the client's)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        base = client.base_url
        self.origin = (base.host, base.port or 80)
        self.base_path = base.raw_path if base.raw_path.endswith(b"/") else base.raw_path + b"/"
        self.host = base.netloc
        self.defaults = {name.decode("latin-1").lower(): (name, value) for name, value in client.headers.raw}

    def message(self, method: str, path: str, *, json: Any = None, content: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> bytes | None:
        if not _PLAIN_PATH.fullmatch(path) or (json is not None and content is not None):
            return None
        try:
            merged = dict(self.defaults)
            for name, value in (headers or {}).items():
                merged[name.lower()] = (name.encode("ascii"), value.encode("ascii"))
        except UnicodeEncodeError:
            return None  # httpx decides how such a header is sent
        if json is not None:
            content = _json_body(json)
            merged.setdefault("content-length", (b"Content-Length", str(len(content)).encode("ascii")))
            merged.setdefault("content-type", (b"Content-Type", b"application/json"))
        elif content is not None:
            merged.setdefault("content-length", (b"Content-Length", str(len(content)).encode("ascii")))
        lines = [] if "host" in merged else [(b"Host", self.host)]
        if method in ("POST", "PUT", "PATCH") and "content-length" not in merged and "transfer-encoding" not in merged:
            lines.append((b"Content-Length", b"0"))
        lines += merged.values()
        return http_message(method.encode("ascii"), self.base_path + path.lstrip("/").encode("ascii"), lines, content or b"")


# Unreserved and sub-delimiter characters, '/', ':', '@' and valid percent escapes: what httpx
# leaves as it is in a path (no query, no fragment).
_PLAIN_PATH = re.compile(r"/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*")
# What httpx sends for ``json=`` (httpx._content.encode_json).
_json_encoder = json_module.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _json_body(value: Any) -> bytes:
    return _json_encoder.encode(value).encode("utf-8")


def http_message(method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes,
                 request: httpx.Request | None = None) -> bytes:
    """An HTTP/1.1 request's bytes. A header name or value that would end the line early (CR,
    LF or NUL in it: a forwarded claim, say) is refused with httpx's ``LocalProtocolError``
    rather than written."""
    head = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        if _UNSAFE.search(name) or _UNSAFE.search(value):
            raise httpx.LocalProtocolError(f"header {name.decode('latin-1')!r} holds CR, LF or NUL; not sent", request=request)
        head += (name, b": ", value, b"\r\n")
    head.append(b"\r\n")
    return b"".join(head) + body


_UNSAFE = re.compile(rb"[\r\n\0]")


def _timeout(request: httpx.Request, kind: str) -> float | None:
    value = request.extensions.get("timeout", {}).get(kind)
    return float(value) if value is not None else None


class LeanTransport(httpx.AsyncBaseTransport):
    """``httpx.AsyncClient(transport=LeanTransport(...))``: at most ``max_connections`` open
    at once (further requests wait for one), at most ``max_keepalive`` idle ones kept per origin."""

    def __init__(self, *, max_connections: int = 200, max_keepalive: int = 50) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._slots = asyncio.Semaphore(max_connections)
        self._max_keepalive = max_keepalive
        self._other: httpx.AsyncHTTPTransport | None = None  # non-http schemes, created when first needed

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            if self._other is None:
                self._other = httpx.AsyncHTTPTransport()
            return await self._other.handle_async_request(request)
        origin = (url.host, url.port or 80)
        body = await request.aread()
        message = http_message(request.method.encode("ascii"), url.raw_path, request.headers.raw, body, request)
        status, headers, content = await self.exchange(origin, message, head_only=request.method == "HEAD",
                                                       connect_timeout=_timeout(request, "connect"),
                                                       read_timeout=_timeout(request, "read"), request=request)
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(content), extensions={"http_version": b"HTTP/1.1"})

    async def exchange(self, origin: tuple[str, int], message: bytes, *, head_only: bool, connect_timeout: float | None,
                       read_timeout: float | None, request: httpx.Request | None = None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """One request (``message``: its bytes, from :func:`http_message`) on a pooled connection
        to ``origin``; its answer as ``(status, headers, body)``. Failures are httpx's exceptions
        (``request`` is what they carry: None when the caller built no httpx request)."""
        async with self._slots:
            conn = self._take(origin)
            if conn is None:
                conn = await self._connect(request, origin, connect_timeout)
            try:
                async with asyncio.timeout(read_timeout):
                    status, headers, content, keep = await self._exchange(conn, message, request, head_only)
            except TimeoutError as exc:
                conn.close()
                raise httpx.ReadTimeout(f"no answer within the read timeout from {origin[0]}:{origin[1]}", request=request) from exc
            except BaseException:
                conn.close()
                raise
            if keep:
                self._give_back(origin, conn)
            else:
                conn.close()
        return status, headers, content

    def _take(self, origin: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.reusable():
                return conn
            conn.close()  # the server closed it while it was idle
        return None

    def _give_back(self, origin: tuple[str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= self._max_keepalive or not conn.reusable():
            conn.close()
        else:
            idle.append(conn)

    @staticmethod
    async def _connect(request: httpx.Request | None, origin: tuple[str, int], timeout: float | None) -> _Connection:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(*origin)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {origin[0]}:{origin[1]} timed out", request=request) from exc
        except OSError as exc:
            raise httpx.ConnectError(f"{exc} ({origin[0]}:{origin[1]})", request=request) from exc
        return _Connection(reader, writer)

    @staticmethod
    async def _exchange(conn: _Connection, message: bytes, request: httpx.Request | None,
                        head_only: bool) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        answer = _Answer()
        parser = answer.parser
        try:
            conn.writer.write(message)
            await conn.writer.drain()
            while not answer.complete and not (head_only and answer.headers_done):
                data = await conn.reader.read(65536)
                if not data:
                    if answer.headers_done and not any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in answer.headers):
                        return parser.get_status_code(), answer.headers, b"".join(answer.body), False  # a body that ends with the connection
                    raise httpx.RemoteProtocolError("the server closed the connection before the answer was complete", request=request)
                parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise httpx.RemoteProtocolError(f"invalid HTTP answer: {exc}", request=request) from exc
        except OSError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        keep = answer.keep_alive and not head_only
        return parser.get_status_code(), answer.headers, b"".join(answer.body), keep

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        if self._other is not None:
            await self._other.aclose()

    def __repr__(self) -> str:
        return f"LeanTransport(idle={ {k: len(v) for k, v in self._idle.items()} })"
