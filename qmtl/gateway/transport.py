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
        head = [request.method.encode("ascii"), b" ", url.raw_path, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        message = b"".join(head) + body
        async with self._slots:
            conn = self._take(origin)
            if conn is None:
                conn = await self._connect(request, origin)
            try:
                async with asyncio.timeout(_timeout(request, "read")):
                    status, headers, content, keep = await self._exchange(conn, message, request)
            except TimeoutError as exc:
                conn.close()
                raise httpx.ReadTimeout(f"no answer within the read timeout from {url.host}:{origin[1]}", request=request) from exc
            except BaseException:
                conn.close()
                raise
            if keep:
                self._give_back(origin, conn)
            else:
                conn.close()
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(content), extensions={"http_version": b"HTTP/1.1"})

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
    async def _connect(request: httpx.Request, origin: tuple[str, int]) -> _Connection:
        try:
            async with asyncio.timeout(_timeout(request, "connect")):
                reader, writer = await asyncio.open_connection(*origin)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {origin[0]}:{origin[1]} timed out", request=request) from exc
        except OSError as exc:
            raise httpx.ConnectError(f"{exc} ({origin[0]}:{origin[1]})", request=request) from exc
        return _Connection(reader, writer)

    @staticmethod
    async def _exchange(conn: _Connection, message: bytes, request: httpx.Request) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        answer = _Answer()
        parser = answer.parser
        head_only = request.method == "HEAD"
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
