"""The Gateway's lean HTTP/1.1 transport (qmtl/gateway/transport.py) against a scripted
server speaking raw HTTP: keep-alive reuse, chunked bodies, closed connections, and httpx's
exception types for every failure."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
import pytest

from qmtl.gateway.transport import LeanTransport

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length) if length else b""


class Server:
    """Answers each connection with ``script``; counts connections and requests."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []

    async def __aenter__(self) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.script(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def keep_alive(answer: bytes, server_box: list[Server]) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            server_box[0].requests.append(await read_request(reader))
            writer.write(answer)
            await writer.drain()

    return script


OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nETag: "e1"\r\nContent-Length: 11\r\n\r\n{"ok":true}'


async def test_keep_alive_connections_are_reused_and_requests_arrive_whole():
    box: list[Server] = []
    server = Server(keep_alive(OK, box))
    box.append(server)
    async with server as url, httpx.AsyncClient(base_url=url, transport=LeanTransport()) as client:
        for i in range(3):
            r = await client.post("/worlds", json={"n": i}, params={"q": "a b"}, headers={"X-QMTL-Subject": "alice"})
            assert r.status_code == 200 and r.json() == {"ok": True} and r.headers["etag"] == '"e1"'
        assert server.connections == 1 and len(server.requests) == 3
        head, body = server.requests[-1]
        assert head.startswith(b"POST /worlds?q=a+b HTTP/1.1\r\n") and b"x-qmtl-subject: alice" in head.lower()
        assert body == b'{"n":2}'
        # concurrent calls open more connections, which are kept for the next ones
        await asyncio.gather(*(client.get("/x") for _ in range(5)))
        before = server.connections
        await asyncio.gather(*(client.get("/x") for _ in range(5)))
        assert server.connections == before


async def test_chunked_bodies_304_and_connection_close():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            if b"/chunked" in head:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            elif b"/304" in head:
                writer.write(b'HTTP/1.1 304 Not Modified\r\nETag: "e1"\r\n\r\n')
            else:
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 2\r\nContent-Length: 4\r\n\r\ndown")
                await writer.drain()
                return
            await writer.drain()

    server = Server(script)
    async with server as url, httpx.AsyncClient(base_url=url, transport=LeanTransport()) as client:
        assert (await client.get("/chunked")).content == b"hello world"
        r = await client.get("/304")
        assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == '"e1"'
        r = await client.get("/close")
        assert r.status_code == 503 and r.text == "down" and r.headers["retry-after"] == "2"
        assert server.connections == 1  # one connection kept alive for all three
        assert (await client.get("/chunked")).content == b"hello world"
        assert server.connections == 2  # the 503 asked to close its connection


async def test_a_connection_the_server_closed_while_idle_is_not_reused():
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()  # then close: the client holds it idle

    server = Server(once)
    async with server as url, httpx.AsyncClient(base_url=url, transport=LeanTransport()) as client:
        assert (await client.get("/a")).status_code == 200
        await asyncio.sleep(0.05)  # I/O: the server's FIN reaches the client
        assert (await client.get("/b")).status_code == 200
        assert server.connections == 2


async def test_failures_are_httpx_exceptions():
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async with Server(silent) as url, httpx.AsyncClient(base_url=url, transport=LeanTransport(), timeout=0.2) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/")
    async with Server(hang_up) as url, httpx.AsyncClient(base_url=url, transport=LeanTransport()) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/")
    async with Server(garbage) as url, httpx.AsyncClient(base_url=url, transport=LeanTransport()) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/")
    server = Server(silent)
    async with server as url:
        pass
    async with httpx.AsyncClient(base_url=url, transport=LeanTransport()) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("/")


REDIRECT = (b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nSet-Cookie: s=1; Path=/\r\nContent-Type: application/json\r\n"
            b"Content-Length: 11\r\n\r\n{\"ok\":true}")


async def test_a_backend_sends_through_the_lean_transport_as_its_client_would():
    """Backend.request skips httpx's client layers (auth, redirects, cookie jar) and calls
    the lean transport itself: the request still carries the base URL, params, JSON body,
    the backend's default headers and the correlation id; a redirect is answered, not
    followed (httpx's default); a Set-Cookie is not kept; the per-call timeout applies."""
    from qmtl.common import correlation
    from qmtl.gateway.backends import Backend, BackendUnavailable

    box: list[Server] = []
    server = Server(keep_alive(REDIRECT, box))
    box.append(server)
    async with server as url:
        backend = Backend("worldservice", url + "/base", timeout=1.0, retries=0, default_headers={"X-Service-Token": "t"})
        token = correlation.correlation_id.set("c0ffee00c0ffee00c0ffee00c0ffee00")
        try:
            r = await backend.request("POST", "/worlds", params={"q": "a b"}, json={"n": 1})
        finally:
            correlation.correlation_id.reset(token)
        assert r.status_code == 302 and r.json() == {"ok": True} and r.request.url.path == "/base/worlds"
        assert len(server.requests) == 1 and not backend.client.cookies
        head, body = server.requests[0]
        assert head.startswith(b"POST /base/worlds?q=a+b HTTP/1.1\r\n") and body == b'{"n":1}'
        assert b"x-service-token: t" in head.lower() and b"x-correlation-id: c0ffee00c0ffee00c0ffee00c0ffee00" in head.lower()
        await backend.close()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async with Server(silent) as url:
        backend = Backend("worldservice", url, timeout=0.2, retries=0)
        with pytest.raises(BackendUnavailable, match="no answer within 200 ms"):  # the budget cut it
            await backend.request("GET", "/slow")
        await backend.close()


def _parts(message: bytes) -> tuple[bytes, list[bytes], bytes]:
    head, _, body = message.partition(b"\r\n\r\n")
    line, *headers = head.split(b"\r\n")
    return line, sorted(h.lower() for h in headers), body


PLAIN_CALLS = [
    ("GET", "/worlds/w1/decide", None, None, {"X-QMTL-Subject": "alice", "X-Correlation-ID": "c0ffee"}),
    ("GET", "/worlds/a%20b/activation", None, None, {}),
    ("POST", "/worlds", {"world_id": "w✓", "n": [1, 2.5, None], "ok": True}, None, {"X-Service-Token": "t"}),
    ("POST", "/diff/batch", None, b'{"diffs":[]}', {"Content-Type": "application/json"}),
    ("POST", "/strategies/s1/release", None, None, {}),
    ("PUT", "/worlds/w1/policies/3", {"a": "b"}, None, {"accept": "application/json"}),
    ("DELETE", "/worlds/w1", None, None, {"If-Match": '"e1"'}),
    ("HEAD", "/health", None, None, {}),
]


@pytest.mark.parametrize(("method", "path", "body", "content", "headers"), PLAIN_CALLS)
async def test_direct_requests_write_what_the_client_would(method, path, body, content, headers):
    """DirectRequests (the backends' plain calls) builds the bytes the lean transport writes
    for ``client.build_request`` of the same call: request line, headers (as a set) and body."""
    from qmtl.gateway.transport import DirectRequests, http_message

    for base in ("http://127.0.0.1:8001", "http://worldservice:8001/base/"):
        client = httpx.AsyncClient(base_url=base, transport=LeanTransport(), timeout=httpx.Timeout(1.0), trust_env=False)
        direct = DirectRequests(client).message(method, path, json=body, content=content, headers=headers)
        request = client.build_request(method, path, json=body, content=content, headers=headers)
        expected = http_message(method.encode(), request.url.raw_path, request.headers.raw, await request.aread())
        assert direct is not None
        assert _parts(direct) == _parts(expected)
        await client.aclose()


@pytest.mark.parametrize(("path", "headers"), [
    ("/worlds/a b", {}), ("/worlds?x=1", {}), ("/worlds/w#f", {}), ("/worlds/%zz", {}), ("worlds", {}),
    ("/worlds/ü", {}), ("/worlds", {"X-QMTL-Subject": "ünï"}),
])
def test_direct_requests_leave_anything_else_to_the_client(path, headers):
    from qmtl.gateway.transport import DirectRequests

    client = httpx.AsyncClient(base_url="http://127.0.0.1:8001", transport=LeanTransport(), trust_env=False)
    assert DirectRequests(client).message("GET", path, headers=headers) is None


async def test_a_header_that_would_split_the_request_is_never_sent():
    """A header value with CR/LF (a forwarded claim, say) cannot add a header or a request:
    the call fails as a transport error and nothing reaches the backend."""
    from qmtl.gateway.backends import Backend, BackendUnavailable

    box: list[Server] = []
    server = Server(keep_alive(OK, box))
    box.append(server)
    async with server as url:
        backend = Backend("worldservice", url, timeout=1.0, retries=0)
        for path in ("/worlds/w1/decide", "/worlds/w 1/decide"):  # the plain path and the client's
            with pytest.raises(BackendUnavailable, match="CR, LF or NUL"):
                await backend.request("GET", path, headers={"X-QMTL-Subject": "alice\r\nX-QMTL-Roles: admin"})
        assert server.requests == []
        r = await backend.request("GET", "/worlds/w1/decide", headers={"X-QMTL-Subject": "alice"})
        assert (r.status_code, r.json(), r.headers["etag"]) == (200, {"ok": True}, '"e1"')
        head, _ = server.requests[0]
        assert head.startswith(b"GET /worlds/w1/decide HTTP/1.1\r\n") and b"x-qmtl-subject: alice\r\n" in head.lower()
        await backend.close()
