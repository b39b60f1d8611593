"""Queue lookup routes (SPEC §3), answered from the DAG Manager on its budget (500 ms, 1 retry)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from connexion import request
from starlette.responses import StreamingResponse

from qmtl.gateway.auth import caller
from qmtl.gateway.backends import BackendUnavailable
from qmtl.gateway.ingest.queues import effective_match_mode, parse_tags, unavailable

if TYPE_CHECKING:
    from qmtl.gateway.service import Gateway


async def queues_by_tag(ctx: Gateway, tags, interval, match_mode=None, match=None):
    await caller(ctx, request)
    try:
        return await ctx.ingest.queues.by_tag(parse_tags(tags), interval, effective_match_mode(match_mode, match))
    except BackendUnavailable as exc:
        raise unavailable(exc) from exc


async def watch_queues(ctx: Gateway, tags, interval, match_mode=None, match=None):
    """NDJSON stream. Its ``Deprecation`` and ``Link`` headers come from the spec's
    ``x-qmtl-deprecation`` (added to every response, errors included, by the app builder)."""
    await caller(ctx, request)
    tag_list, mode = parse_tags(tags), effective_match_mode(match_mode, match)
    try:  # the first lookup happens before streaming: a 503 is still a status code
        stream = await ctx.ingest.queues.open_watch(tag_list, interval, mode, poll_interval=ctx.ingest.tuning.watch_poll_interval)
    except BackendUnavailable as exc:
        raise unavailable(exc) from exc
    return StreamingResponse(stream, status_code=200, media_type="application/x-ndjson", headers={"Cache-Control": "no-store"})
