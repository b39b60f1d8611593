"""Resource bounds, attacked as an attacker sends it, against the production-configured
stack (``qmtl gw`` in JWT mode with an ES256 key, ``qmtl worldservice`` on ``rbac: enforce``,
``qmtl dagmanager``, Redis) — each a separate OS process (tests/helpers/secstack.py).

The Gateway runs with small bounds so each attack takes seconds: headers within 1.5 s,
bodies within 1.5 s, 40 connections + 8 for health probes. Covered:

* slowloris: 200 raw connections that stall mid-headers or after announcing a 1 MB body;
  ``/health`` answers throughout, the Gateway's file descriptors and memory stay bounded,
  every slow connection is cut, nothing is logged per connection;
* a 20 MB body → 413 problem+json before the body is sent (never read);
* a 10 MB invalid body under the 16 MiB operation → 422 whose response is small;
* JSON nested 100,000 deep → 400 naming the limit on all three services;
* WebSocket streams per subject (close 4029) and in total (close 1013), counted.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
import websockets

from tests.helpers.secstack import SecureStack
from tests.helpers.wsproc import metric

SLOW = 200
MAX_CONNECTIONS = 40
HEADROOM = 8


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = SecureStack(tmp_path_factory.mktemp("limits"), extra={"gateway": {
        "QMTL__GATEWAY__LIMITS__HEADER_TIMEOUT": "1.5",
        "QMTL__GATEWAY__LIMITS__BODY_TIMEOUT": "1.5",
        "QMTL__GATEWAY__LIMITS__MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "QMTL__GATEWAY__LIMITS__HEALTH_HEADROOM": str(HEADROOM),
        "QMTL__GATEWAY__EVENTS__MAX_CONNECTIONS": "5",
        "QMTL__GATEWAY__EVENTS__MAX_CONNECTIONS_PER_SUBJECT": "3",
    }})
    try:
        s.start()
        yield s
    finally:
        s.stop()


def _connect(port: int) -> socket.socket | None:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return None


def _problem(data: bytes, status: int) -> tuple[bytes, dict]:
    """The head and the problem body of a raw HTTP answer with ``status``, closing the connection."""
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status), data[:300]
    assert b"application/problem+json" in head.lower() and b"connection: close" in head.lower()
    problem = json.loads(body)
    assert problem["status"] == status
    return head, problem


def _read_answer(s: socket.socket, data: bytes = b"") -> bytes:
    """Read until a whole (small) JSON answer is in or the server closes."""
    s.settimeout(10)
    while b"\r\n\r\n" not in data or b"}" not in data.partition(b"\r\n\r\n")[2]:
        more = s.recv(65536)
        if not more:
            break
        data += more
    return data


def _closed_by_peer(sock: socket.socket) -> tuple[bool, bytes]:
    """(True, what the server sent before closing) once the server has closed the connection."""
    sock.setblocking(False)
    got = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True, got
            got += chunk
    except BlockingIOError:
        return False, got
    except OSError:  # reset
        return True, got


def test_slowloris_is_cut_while_health_answers_with_bounded_fds_and_memory(stack):
    gw = stack.gateway
    port = int(gw.url.rsplit(":", 1)[1])
    fds_before, rss_before = gw.fd_count(), gw.rss_kb()
    log_lines_before = len(gw.log_text().splitlines())
    socks: list[socket.socket] = []
    for i in range(SLOW):
        s = _connect(port)
        if s is None:
            continue
        try:
            if i % 2:  # headers that never end
                s.sendall(b"POST /worlds HTTP/1.1\r\nHost: gw\r\nX-Slow: 1\r\n")
            else:  # complete headers announcing 1 MB, one byte, then nothing
                s.sendall(b"POST /worlds HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{")
        except OSError:
            pass  # already cut (over the cap): that is the bound at work
        socks.append(s)

    # while they are held: /health answers, fds and memory stay bounded
    fd_peak = 0
    with httpx.Client(base_url=gw.url, timeout=5) as c:
        for _ in range(10):
            r = c.get("/health", headers={"Connection": "close"})
            assert r.status_code == 200 and r.json()["status"] == "ok"
            fd_peak = max(fd_peak, gw.fd_count())
            time.sleep(0.1)
    assert fd_peak <= fds_before + MAX_CONNECTIONS + HEADROOM + 5, (fds_before, fd_peak)
    assert gw.rss_kb() - rss_before < 50_000  # KB

    # every slow connection is cut: the ones still held get their timeout (408), the rest were evicted
    deadline = time.monotonic() + 20
    pending = list(socks)
    answers: list[bytes] = []
    while pending and time.monotonic() < deadline:
        still = []
        for s in pending:
            closed, got = _closed_by_peer(s)
            if closed:
                answers.append(got)
                s.close()
            else:
                still.append(s)
        pending = still
        time.sleep(0.1)
    for s in pending:
        s.close()
    assert not pending, f"{len(pending)} slow connections were never cut"
    timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408")]
    assert timed_out, "no slow connection got its 408"
    _problem(timed_out[0], 408)

    metrics = httpx.get(gw.url + "/metrics").text
    header_cut = metric(metrics, "gateway_http_connections_refused_total", reason="header_timeout")
    evicted = metric(metrics, "gateway_http_connections_refused_total", reason="evicted") + metric(
        metrics, "gateway_http_connections_refused_total", reason="over_cap")
    # each connection whose headers never ended was cut by the header timeout, evicted, or refused
    # over the cap — which of the three depends on timing; together they account for all of them
    assert header_cut >= 1 and header_cut + evicted >= SLOW // 2 - 2, (header_cut, evicted)
    # no log flood: a handful of summary lines, not one per connection (the access log writes one
    # line per request that reached the app — /health and the body timeouts — by design; it is off
    # with access_log: false)
    new_lines = [line for line in gw.log_text().splitlines()[log_lines_before:] if " qmtl.access " not in line]
    assert len(new_lines) < 10, new_lines
    assert httpx.get(gw.url + "/health").status_code == 200
    assert gw.fd_count() <= fds_before + 5


def test_a_body_that_trickles_is_cut_with_408(stack):
    gw = stack.gateway
    s = socket.create_connection(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])), timeout=10)
    try:  # 1 MB announced, one byte every 0.3 s: the body read timeout (1.5 s) ends it
        s.sendall(b"POST /worlds HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")
        data = b""
        s.setblocking(False)
        deadline = time.monotonic() + 20
        sent = 0
        while time.monotonic() < deadline:
            try:
                s.send(b" ")
                sent += 1
            except OSError:
                break
            time.sleep(0.3)
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    _head, problem = _problem(data, 408)
    assert problem["limit"] == "body_timeout" and "limits.body_timeout" in problem["detail"]
    assert sent < 1000  # cut long before the announced body could arrive


def test_a_20mb_body_is_refused_with_413_before_it_is_read(stack):
    gw = stack.gateway
    s = socket.create_connection(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])), timeout=10)
    try:  # anonymous, as an outsider would send it: 20 MB announced, 64 KB sent, the rest never
        s.sendall(b"POST /worlds HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 20971520\r\n\r\n")
        s.sendall(b"[" * 65536)
        data = _read_answer(s)
    finally:
        s.close()
    _head, problem = _problem(data, 413)
    assert problem["max_bytes"] == 1048576 and "20971520" in problem["detail"]


def test_a_chunked_body_is_counted_as_it_streams_and_refused_past_the_limit(stack):
    gw = stack.gateway
    s = socket.create_connection(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])), timeout=10)
    data = b""
    sent = 0
    try:  # no Content-Length: 64 KB chunks until the Gateway answers
        s.sendall(b"POST /worlds HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b" " * 65536
        s.setblocking(False)
        while sent < 32 * 1024 * 1024:  # far more than the limit plus what socket buffers absorb
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            except (BlockingIOError, OSError):
                break
            try:
                data += s.recv(65536)
                if b"\r\n\r\n" in data:
                    break
            except BlockingIOError:
                pass
        data = _read_answer(s, data)
    finally:
        s.close()
    _head, problem = _problem(data, 413)
    assert problem["max_bytes"] == 1048576 and "streamed body" in problem["detail"]
    assert sent < 32 * 1024 * 1024  # the answer came (and the connection closed) while the body was still streaming


def test_a_10mb_invalid_body_gets_a_small_422(stack):
    token = stack.token(world_roles={"*": ["owner"]})
    huge = "x" * (10 * 1024 * 1024)
    body = json.dumps({"dag_json": huge, "meta": huge[:1000], "run_type": huge[:2_000_000], "node_ids_crc32": 0})
    r = httpx.post(stack.gateway.url + "/strategies", content=body, timeout=60,
                   headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    assert r.status_code == 422, r.text[:500]
    assert r.headers["content-type"].startswith("application/problem+json")
    assert len(r.content) < 4096, len(r.content)  # the 2 MB value is not echoed
    problem = r.json()
    assert any(e["pointer"] in ("/run_type", "/meta") for e in problem["errors"])
    assert "more characters" in json.dumps(problem)  # what was quoted says it was cut


@pytest.mark.parametrize("service", ["gateway", "worldservice", "dagmanager"])
def test_json_nested_100000_deep_is_a_400_naming_the_limit(stack, service):
    url, path, headers = {
        "gateway": (stack.gateway.url, "/worlds", {"Authorization": f"Bearer {stack.token(world_roles={'*': ['owner']})}"}),
        "worldservice": (stack.worldservice.url, "/worlds", stack.service_headers()),
        "dagmanager": (stack.dagmanager.url, "/diff", stack.service_headers()),
    }[service]
    deep = b"[" * 100_000 + b"]" * 100_000
    r = httpx.post(url + path, content=deep, headers={**headers, "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text[:300]
    problem = r.json()
    assert r.headers["content-type"].startswith("application/problem+json")
    assert problem["limit"] == "max_json_depth" and problem["max_depth"] == 64 and "64" in problem["detail"]
    # and a body just within the limit is judged on its merits (not a depth error)
    ok_depth = json.dumps({"world_id": "x", "name": "n", "tags": [[[[1]]]]}).encode()
    r = httpx.post(url + path, content=ok_depth, headers={**headers, "Content-Type": "application/json"}, timeout=30)
    assert r.status_code != 500 and "max_json_depth" not in r.text


async def _open_ws(url: str, token: str) -> tuple[websockets.ClientConnection, int | None]:
    """Connect /ws with a bearer JWT; return the socket and its close code if it was refused."""
    ws = await websockets.connect(url.replace("http://", "ws://") + "/ws", additional_headers={"Authorization": f"Bearer {token}"})
    try:
        await asyncio.wait_for(ws.recv(), 0.5)
    except TimeoutError:
        return ws, None  # open and quiet: accepted
    except websockets.ConnectionClosed as closed:
        return ws, closed.rcvd.code if closed.rcvd else None
    return ws, None


async def test_websocket_streams_are_capped_per_subject_and_in_total(stack):
    url = stack.gateway.url
    alice, bob, carol = (stack.token(f"ws-{n}", world_roles={"*": ["reader"]}) for n in ("alice", "bob", "carol"))
    held = []
    try:
        for _ in range(3):
            ws, code = await _open_ws(url, alice)
            assert code is None
            held.append(ws)
        ws, code = await _open_ws(url, alice)  # alice's 4th: per-subject cap
        assert code == 4029
        for _ in range(2):
            ws, code = await _open_ws(url, bob)
            assert code is None
            held.append(ws)
        ws, code = await _open_ws(url, carol)  # 6th stream: total cap
        assert code == 1013
        await held[0].close()  # alice closes one: she may open one again
        await asyncio.sleep(0.3)
        ws, code = await _open_ws(url, alice)
        assert code is None
        held.append(ws)
        metrics = httpx.get(url + "/metrics").text  # noqa: ASYNC210 - one read of a server in another process
        assert metric(metrics, "ws_rejected_total", route="/ws", reason="subject_cap") == 1
        assert metric(metrics, "ws_rejected_total", route="/ws", reason="total_cap") == 1
    finally:
        for ws in held:
            await ws.close()
