"""What the Gateway answers when WorldService cannot, for the two reads that have a safe
answer: a ``backtest`` decision (never a stale ``live``) and an inactive activation
(``active: false, weight: 0``), each with a ``reason`` saying why and a stable ETag."""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime
from typing import Any

from qmtl.common import correlation
from qmtl.common.http import quote_etag
from qmtl.contracts.constants import Mode
from qmtl.gateway.worlds.cache import DecisionEntry
from qmtl.gateway.worlds.replies import CACHE_HEADER, SAFE, Reply

log = logging.getLogger(__name__)


def iso(wall: float) -> str:
    """A wall-clock reading as the envelopes' RFC 3339 UTC timestamp (microseconds, ``Z``)."""
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":"), default=str).encode()).hexdigest()[:24]


def safe_decision(world_id: str, as_of: str | None, why: str, stale: DecisionEntry | None, *, now: float, wall: float) -> Reply:
    """The safe decision; ``stale`` is the expired cache entry, if any (named in the reason,
    never served); ``now`` is the proxy's monotonic reading, ``wall`` its wall-clock reading."""
    if stale is not None:
        ago = now - stale.expires_at
        why += (f"; the cached decision ({stale.envelope.get('effective_mode')}, policy v{stale.envelope.get('policy_version')}) "
                f"expired {max(0.0, ago):.1f} s ago and is not served stale")
    else:
        why += "; no cached decision"
    policy_version = stale.envelope.get("policy_version", 0) if stale is not None else 0
    mode = Mode["BACKTEST"].value
    body = {
        "world_id": world_id,
        "policy_version": policy_version if isinstance(policy_version, int) and policy_version >= 0 else 0,
        "effective_mode": mode,
        "reason": f"safe default ({mode}): {why}",
        "as_of": as_of or iso(wall),
        "ttl": "0s",
        # stable while the Gateway keeps answering the safe default, whatever the cause
        "etag": "safe-" + _digest("safe-decision", world_id, as_of or ""),
    }
    log.warning("worlds decide %s: safe decision: %s", world_id, why, extra={"correlation_id": correlation.get()})
    return Reply.json(200, body, {"ETag": quote_etag(str(body["etag"])), CACHE_HEADER: SAFE, "Cache-Control": "no-store"})


def safe_activation(world_id: str, strategy_id: str, side: str, why: str, *, wall: float) -> Reply:
    etag = "safe-" + _digest("safe-activation", world_id, strategy_id, side)
    body = {
        "world_id": world_id,
        "strategy_id": strategy_id,
        "side": side,
        "active": False,
        "weight": 0.0,
        "etag": etag,
        "ts": iso(wall),
        "reason": f"safe default (inactive, orders gated off): {why}",
    }
    log.warning("worlds activation %s/%s/%s: safe default: %s", world_id, strategy_id, side, why,
                extra={"correlation_id": correlation.get()})
    return Reply.json(200, body, {"ETag": quote_etag(etag), CACHE_HEADER: SAFE, "Cache-Control": "no-store"})
