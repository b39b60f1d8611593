"""Queue lookup routes (SPEC §3), answered from the DAG Manager on its budget (500 ms, 1 retry)."""

from connexion import request
from starlette.responses import StreamingResponse

from qmtl.common.errors import ServiceError
from qmtl.gateway.backends import BackendUnavailable
from qmtl.gateway.ingest.queues import effective_match_mode, parse_tags, unavailable

# RFC 9745: deprecated since 2026-11-26 (when the event stream replaced it); RFC 8288: its successor
DEPRECATION_HEADERS = {
    "Deprecation": "@1795651200",
    "Link": '</events/subscribe>; rel="successor-version"',
}


async def queues_by_tag(ctx, tags, interval, match_mode=None, match=None):
    await ctx.auth.authenticate(request.headers)
    try:
        return await ctx.ingest.queues.by_tag(parse_tags(tags), interval, effective_match_mode(match_mode, match))
    except BackendUnavailable as exc:
        raise unavailable(exc) from exc


async def watch_queues(ctx, tags, interval, match_mode=None, match=None):
    """NDJSON stream; every answer the handler gives, errors included, carries the deprecation headers."""
    try:
        await ctx.auth.authenticate(request.headers)
        tag_list, mode = parse_tags(tags), effective_match_mode(match_mode, match)
        lookup = ctx.ingest.queues
        try:
            first = await lookup.by_tag(tag_list, interval, mode)  # before streaming: a 503 is still a status code
        except BackendUnavailable as exc:
            raise unavailable(exc) from exc
    except ServiceError as exc:
        exc.headers.update(DEPRECATION_HEADERS)
        raise
    stream = lookup.watch(tag_list, interval, mode, poll_interval=ctx.ingest.watch_poll_interval, first=first)
    return StreamingResponse(stream, status_code=200, media_type="application/x-ndjson",
                             headers={**DEPRECATION_HEADERS, "Cache-Control": "no-store"})
