"""Request bounds every service enforces before anything parses a body.

:class:`RequestLimits` is an ASGI middleware the app builder puts in front of the whole
HTTP stack (fast paths and Connexion alike), so a bound holds whichever path answers:

* **Body size** per operation, from the spec: ``x-qmtl-max-body-bytes`` on the operation,
  else the service's ``limits.max_body_bytes``. A ``Content-Length`` above it is refused
  with 413 before a byte of the body is read; a body without one (chunked) is counted as
  it streams and refused as soon as it passes the bound. The connection is closed after a
  413, so the rest of the body is never read.
* **Body read timeout**: the whole body must arrive within ``limits.body_timeout`` seconds,
  or the request gets 408 and its connection is closed (a client that trickles a body, or
  announces one and stalls, holds nothing longer than that).
* **JSON nesting depth**: a JSON body nested deeper than ``limits.max_json_depth`` is
  refused with 400 naming the limit, before any parser recurses into it (Python's parser
  otherwise dies with ``RecursionError`` around depth 1,000).

Every refusal is problem+json (RFC 9457) with the correlation id. A valid body is handed
on, replayed, to the app unchanged.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import typing as t

from starlette.types import ASGIApp, Receive, Scope, Send

from qmtl.common import correlation
from qmtl.common.logs import RouteTemplates

MAX_BODY_EXTENSION = "x-qmtl-max-body-bytes"
DEPTH_SCOPE_KEY = "qmtl.max_json_depth"
DEFAULT_MAX_DEPTH = 64


def too_deep_problem(limit: int) -> dict:
    """The 400 problem of a body nested deeper than ``limit`` (status, title, detail, ext)."""
    return {"status": 400, "title": "Bad Request",
            "detail": f"Request body nests arrays/objects deeper than {limit} levels (limits.max_json_depth)",
            "ext": {"limit": "max_json_depth", "max_depth": limit}}
_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")

# Bound of a value quoted in a problem's detail or errors (see :func:`short_repr`).
QUOTE_LIMIT = 80
DETAIL_LIMIT = 1000


class OperationTable:
    """``(method, path)`` → ``(route template, operation)`` of a spec (paths to templates by
    :class:`qmtl.common.logs.RouteTemplates`, literal routes first)."""

    def __init__(self, doc: dict, routes: RouteTemplates | None = None) -> None:
        paths = doc.get("paths") or {}
        self.routes = routes or RouteTemplates(paths)
        self.ops = {(method.upper(), route): item[method] for route, item in paths.items()
                    for method in _METHODS if isinstance(item.get(method), dict)}

    def find(self, method: str, path: str) -> tuple[str, dict] | None:
        route = self.routes(path)
        op = self.ops.get((method, route))
        return None if op is None else (route, op)

    def operations(self) -> t.Iterator[tuple[str, str, dict]]:
        for (method, route), op in self.ops.items():
            yield method, route, op


# -- JSON nesting depth ---------------------------------------------------------------------

_ESCAPE = re.compile(rb"\\.", re.S)
_NOT_BRACKET_OR_QUOTE = bytes(b for b in range(256) if b not in b'[]{}"')
_LEAF_PAIR = re.compile(rb"\[\]|\{\}")
_STEP = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


def json_depth_exceeds(raw: bytes, limit: int) -> bool:
    """True when the JSON text ``raw`` nests arrays/objects deeper than ``limit``.

    Runs at C speed on ordinary bodies: a body with at most ``limit`` opening brackets
    cannot be deeper; otherwise escapes are dropped, then everything but brackets and
    quotes, then what lies between quotes (brackets inside strings do not count); the
    innermost ``[]``/``{}`` pairs are stripped once per level — after ``limit`` rounds a
    well-formed document of depth ≤ ``limit`` is gone. What remains (a deeper or a
    malformed text) gets one exact count."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    text = _ESCAPE.sub(b"", raw) if b"\\" in raw else raw
    brackets = b"".join(text.translate(None, _NOT_BRACKET_OR_QUOTE).split(b'"')[::2])
    stripped = 0
    while stripped < limit:
        if not brackets:
            return False
        reduced = _LEAF_PAIR.sub(b"", brackets)
        if len(reduced) == len(brackets):
            break  # malformed: no pair left to strip; count exactly
        brackets = reduced
        stripped += 1
    if not brackets:
        return False
    depth = stripped + max(itertools.accumulate(b - 1 for b in brackets.translate(_STEP)))
    return depth > limit


# -- problem+json without the framework ----------------------------------------------------

def short_repr(value: t.Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters (with what was left out), for quoting a
    caller's value in an error without echoing all of it."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def bound_text(text: str, limit: int = DETAIL_LIMIT) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"… ({len(text) - limit} more characters)"


def problem_body(status: int, title: str, detail: str, ext: t.Mapping[str, t.Any] | None = None) -> bytes:
    body: dict[str, t.Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    body.update(ext or {})
    cid = correlation.get()
    if cid:
        body.setdefault("correlation_id", cid)
    return json.dumps(body, separators=(",", ":")).encode()


async def send_problem(send: Send, status: int, title: str, detail: str, *, ext: t.Mapping[str, t.Any] | None = None,
                       headers: t.Mapping[str, str] | None = None, close: bool = False) -> None:
    payload = problem_body(status, title, detail, ext)
    out = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(payload)).encode())]
    out += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in (headers or {}).items()]
    if close:
        out.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": payload})


# -- the middleware ------------------------------------------------------------------------

class _Disconnected(Exception):
    pass


class RequestLimits:
    def __init__(self, app: ASGIApp, doc: dict, limits: t.Any, routes: RouteTemplates | None = None) -> None:
        self.app = app
        self.limits = limits
        self.table = OperationTable(doc, routes)
        self.max_bytes = {(m, route): int(op.get(MAX_BODY_EXTENSION) or limits.max_body_bytes) for m, route, op in self.table.operations()}

    def limit_for(self, method: str, path: str) -> int:
        found = self.table.find(method, path)
        if found is None:
            return self.limits.max_body_bytes
        return self.max_bytes[(method, found[0])]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length: int | None = None
        chunked = False
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
            elif name == b"transfer-encoding":
                chunked = True
        if not chunked and not length:  # HTTP/1.1: no Content-Length, no Transfer-Encoding → no body
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        if length is not None and length > limit:
            await self._too_large(send, scope, limit, f"Content-Length is {length} bytes")
            return
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                body, too_large = await _read_body(receive, limit)
        except TimeoutError:
            await send_problem(
                send, 408, "Request Timeout",
                f"the request body did not arrive within {self.limits.body_timeout:g} s (limits.body_timeout)",
                ext={"limit": "body_timeout", "seconds": self.limits.body_timeout}, close=True)
            return
        except _Disconnected:
            return  # the client went away: nobody to answer
        if too_large:
            await self._too_large(send, scope, limit, "the streamed body passed it")
            return
        # the depth is checked where the body is parsed (after authentication: an anonymous
        # caller gets its 401 first), with this service's limit
        scope[DEPTH_SCOPE_KEY] = self.limits.max_json_depth
        await self.app(scope, replay_body(body, receive), send)

    @staticmethod
    async def _too_large(send: Send, scope: Scope, limit: int, what: str) -> None:
        await send_problem(
            send, 413, "Content Too Large",
            f"{scope['method']} {scope['path'][:200]} takes at most {limit} bytes of body; {what}",
            ext={"limit": "max_body_bytes", "max_bytes": limit}, close=True)


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _Disconnected()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", True
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), False


def replay_body(body: bytes, receive: Receive, *, disconnected: bool = False) -> Receive:
    """A ``receive`` that hands the already read ``body`` on as one message, then defers to
    ``receive`` (or says the client went away, when it did while the body was read)."""
    sent = False

    async def replay() -> t.MutableMapping[str, t.Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if disconnected:
            return {"type": "http.disconnect"}
        return await receive()

    return replay
