"""Queue lookup by tags, answered from the DAG Manager on its budget (500 ms, 1 retry).

Used by ``GET /queues/by_tag``, the legacy ``GET /queues/watch`` stream, and the
``queue_map`` of a ``POST /strategies`` ack (the queues matching each TagQueryNode).

``/queues/watch`` follows the event relay (the queue sets ``/ws`` relays) through a
:class:`RelayedQueueSets` feed, so a QueueUpdated from the ControlBus or from
``/callbacks/dag-event`` shows on both at once; the periodic DAG Manager lookup stays as
its reconcile, and its answers enter the relay (see ``qmtl.gateway.events.feed``). Without
a feed (a Gateway built without its events component) the watch polls alone.
Identical lookups in flight at the same time share one DAG Manager call (single flight).
The routes always ask the DAG Manager; only the ``queue_map`` of an ack may reuse an answer
up to ``ack_ttl`` (1 s) old — dropped as soon as a diff through this Gateway creates queues —
since the diff that follows the ack, and its ``queue_map`` frame, give the definitive map.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Protocol

from qmtl.common.errors import BadGateway, BadRequest, ServiceUnavailable
from qmtl.contracts.constants import DEFAULT_MATCH_MODE
from qmtl.gateway.backends import Backend, BackendUnavailable

log = logging.getLogger(__name__)

Key = tuple[tuple[str, ...], int, str]


def parse_tags(tags: str | Sequence[str]) -> tuple[str, ...]:
    items = tags.split(",") if isinstance(tags, str) else list(tags)
    out: list[str] = []
    for t in items:
        t = t.strip()
        if t and t not in out:
            out.append(t)
    if not out:
        raise BadRequest("tags must name at least one non-blank tag", ext={"errors": [{"parameter": "tags", "message": "no tags"}]})
    return tuple(out)


def effective_match_mode(match_mode: str | None, match: str | None) -> str:
    """``match_mode`` wins over the deprecated ``match``; default ``any``."""
    return match_mode or match or DEFAULT_MATCH_MODE


def unavailable(exc: BackendUnavailable) -> ServiceUnavailable:
    return ServiceUnavailable(f"the DAG Manager cannot answer: {exc.reason}", retry_after=max(1, round(exc.retry_after or 1)))


class Following(Protocol):
    async def wait(self, timeout: float | None) -> list[dict]: ...  # sets applied since the last call, in order

    def close(self) -> None: ...


class RelayedQueueSets(Protocol):
    """What the watch stream needs from the event relay (``qmtl.gateway.events.feed.QueueFeed``)."""

    def key(self, tags: Iterable[str], interval: Any, match_mode: Any) -> Key: ...

    def now(self) -> float: ...

    def follow(self, key: Key) -> Following: ...

    def current(self, key: Key) -> dict | None: ...

    def offer(self, key: Key, queues: Iterable[str], *, etag: str | None, asked_at: float) -> str: ...


class QueueLookup:
    def __init__(self, backend: Backend, *, ack_ttl: float = 1.0, feed: RelayedQueueSets | None = None) -> None:
        self.backend = backend
        self.feed = feed  # the event relay's queue sets (None in a build without the events part)
        self._inflight: dict[Key, asyncio.Future] = {}
        self.calls = 0
        # answers reused for the queue_map of acks only (never for /queues/by_tag): at most
        # ``ack_ttl`` s old, dropped whenever a diff here creates queues
        self.ack_ttl = ack_ttl
        self._ack_cache: dict[Key, tuple[float, list[str]]] = {}

    async def by_tag(self, tags: Sequence[str], interval: int, match_mode: str = DEFAULT_MATCH_MODE) -> dict:
        """``{"queues": [...], "etag"?: ...}`` from the DAG Manager.

        Raises :class:`BackendUnavailable` when it cannot answer on its budget,
        :class:`BadRequest` when it refuses the query, :class:`BadGateway` on a malformed answer.
        """
        key: Key = (tuple(sorted(set(tags))), int(interval), match_mode)
        fut = self._inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.ensure_future(self._fetch(key))
        self._inflight[key] = fut
        fut.add_done_callback(lambda _f: self._inflight.pop(key, None) if self._inflight.get(key) is _f else None)
        return await asyncio.shield(fut)

    async def _fetch(self, key: Key) -> dict:
        tags, interval, match_mode = key
        self.calls += 1
        resp = await self.backend.request(
            "GET", "/queues/by_tag", params={"tags": ",".join(tags), "interval": interval, "match_mode": match_mode}
        )
        if resp.status_code >= 400:
            detail = _problem_detail(resp)
            if resp.status_code in (400, 422):
                raise BadRequest(f"the DAG Manager refused the query: {detail}")
            raise BadGateway(f"the DAG Manager answered HTTP {resp.status_code}: {detail}")
        try:
            body = resp.json()
            queues = body["queues"]
            if not isinstance(queues, list) or not all(isinstance(q, str) for q in queues):
                raise ValueError("queues is not a list of strings")
        except (ValueError, KeyError, TypeError) as exc:
            raise BadGateway(f"the DAG Manager's queue list is malformed: {exc}") from exc
        out: dict[str, Any] = {"queues": queues}
        if isinstance(body.get("etag"), str):
            out["etag"] = body["etag"]
        return out

    async def matching(self, tags: Sequence[str], interval: int, match_mode: str) -> list[str]:
        """The queue names for an ack's ``queue_map`` (briefly cached, see ``ack_ttl``)."""
        key: Key = (tuple(sorted(set(tags))), int(interval), match_mode)
        now = time.monotonic()
        hit = self._ack_cache.get(key)
        if hit is not None and hit[0] > now:
            return list(hit[1])
        queues = list((await self.by_tag(tags, interval, match_mode))["queues"])
        if len(self._ack_cache) > 10_000:
            self._ack_cache.clear()
        self._ack_cache[key] = (now + self.ack_ttl, queues)
        return list(queues)

    def queues_changed(self) -> None:
        """A diff created queues: cached answers may be missing them."""
        self._ack_cache.clear()

    async def open_watch(self, tags: Sequence[str], interval: int, match_mode: str, *,
                         poll_interval: float) -> AsyncIterator[bytes]:
        """The NDJSON lines of ``/queues/watch``: the current list first, then one line each
        time the set changes. Raises (before any line) what :meth:`by_tag` raises, so the
        route can still answer with a status code.

        With a feed, the lines follow the event relay: a change shows as soon as the relay
        applies it, and the DAG Manager is asked every ``poll_interval`` seconds as the
        reconcile (its answer enters the relay; an event newer than the question stays).
        Without one, changes are found by that poll alone."""
        feed = self.feed
        follower = None
        if feed is not None:
            key = feed.key(tags, interval, match_mode)
            follower = feed.follow(key)  # before the first lookup: no change can slip between
        try:
            asked = feed.now() if feed is not None else 0.0
            first = await self.by_tag(tags, interval, match_mode)
        except BaseException:
            if follower is not None:
                follower.close()
            raise
        if feed is None or follower is None:
            return self._poll_lines(tags, interval, match_mode, poll_interval, first)
        return self._relay_lines(feed, key, follower, tags, interval, match_mode, poll_interval, first, asked)

    async def _relay_lines(self, feed: RelayedQueueSets, key: Key, follower: Following, tags: Sequence[str], interval: int,
                           match_mode: str, poll_interval: float, first: dict, asked: float) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        try:
            feed.offer(key, first["queues"], etag=first.get("etag"), asked_at=asked)
            await follower.wait(0)  # the first line is the current set: changes before it are in it
            current = feed.current(key) or first
            yield _line(current)
            last = sorted(current["queues"])
            next_poll = loop.time() + poll_interval
            while True:
                changes = await follower.wait(max(0.0, next_poll - loop.time()))
                if not changes:  # the reconcile is due
                    next_poll = loop.time() + poll_interval
                    asked = feed.now()
                    try:
                        answer = await self.by_tag(tags, interval, match_mode)
                    except (BackendUnavailable, BadGateway, BadRequest) as exc:
                        log.info("queues/watch: DAG Manager did not answer (%s); following the relay", exc)
                        continue
                    feed.offer(key, answer["queues"], etag=answer.get("etag"), asked_at=asked)
                    continue  # what it changed arrives through the follower, in order
                for now in changes:  # every set the relay applied, as /ws relayed it
                    if sorted(now["queues"]) != last:
                        last = sorted(now["queues"])
                        yield _line(now)
        finally:
            follower.close()

    async def _poll_lines(self, tags: Sequence[str], interval: int, match_mode: str, poll_interval: float,
                          current: dict) -> AsyncIterator[bytes]:
        yield _line(current)
        last = sorted(current["queues"])
        while True:
            await asyncio.sleep(poll_interval)
            try:
                now = await self.by_tag(tags, interval, match_mode)
            except (BackendUnavailable, BadGateway) as exc:
                log.info("queues/watch: DAG Manager did not answer (%s); keeping the last list", exc)
                continue
            if sorted(now["queues"]) != last:
                last = sorted(now["queues"])
                yield _line(now)


def _line(body: dict) -> bytes:
    return (json.dumps(body, separators=(",", ":")) + "\n").encode()


def _problem_detail(resp: Any) -> str:
    try:
        body = resp.json()
        return str(body.get("detail") or body.get("title") or body)
    except ValueError:
        return resp.text[:200]
