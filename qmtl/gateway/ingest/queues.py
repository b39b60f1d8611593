"""Queue lookup by tags, answered from the DAG Manager on its budget (500 ms, 1 retry).

Used by ``GET /queues/by_tag``, the legacy ``GET /queues/watch`` stream, and the
``queue_map`` of a ``POST /strategies`` ack (the queues matching each TagQueryNode).
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
from collections.abc import AsyncIterator, Sequence
from typing import Any

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


class QueueLookup:
    def __init__(self, backend: Backend, *, ack_ttl: float = 1.0) -> None:
        self.backend = backend
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

    async def watch(self, tags: Sequence[str], interval: int, match_mode: str, *, poll_interval: float,
                    first: dict | None = None) -> AsyncIterator[bytes]:
        """NDJSON lines: the current list first, then one line each time the set changes.

        Changes are found by asking the DAG Manager every ``poll_interval`` seconds (each ask
        on its budget; a failed ask keeps the last list and tries again next time).
        """
        current = first if first is not None else await self.by_tag(tags, interval, match_mode)
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
