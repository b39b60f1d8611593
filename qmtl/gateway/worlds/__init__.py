"""The Gateway's worlds proxy (SPEC §4), one module per concept:

* ``proxy.py``         – :class:`WorldsProxy`: forward, decide, activation, cache invalidation
* ``cache.py``         – :class:`WorldLRU`, :class:`DecisionEntry`, :class:`ActivationEntry`, :func:`parse_ttl`
* ``live_guard.py``    – :class:`LiveGuard`: the rules for calls that can move a world to live
* ``safe_defaults.py`` – the safe decision and the inactive activation when WorldService cannot answer
* ``fastpath.py``      – :class:`DecideFastPath`: decide cache hits in front of the contract stack
* ``replies.py``       – :class:`Reply`, :class:`Incoming`, :class:`Route`, ``X-QMTL-Cache`` values, schema checks
* ``metrics.py``       – :class:`WorldsMetrics`: the proxy's Prometheus metrics
"""

from __future__ import annotations

from qmtl.gateway.worlds.cache import ActivationEntry, DecisionEntry, WorldLRU, parse_ttl
from qmtl.gateway.worlds.fastpath import DecideFastPath
from qmtl.gateway.worlds.live_guard import ALLOW_LIVE_HEADER, LiveGuard
from qmtl.gateway.worlds.metrics import WorldsMetrics
from qmtl.gateway.worlds.proxy import PASS_HEADERS, WorldsProxy
from qmtl.gateway.worlds.replies import CACHE_HEADER, HIT, MISS, REVALIDATED, SAFE, Incoming, Reply, Route

__all__ = [
    "ALLOW_LIVE_HEADER", "CACHE_HEADER", "HIT", "MISS", "PASS_HEADERS", "REVALIDATED", "SAFE", "ActivationEntry", "DecideFastPath",
    "DecisionEntry", "Incoming", "LiveGuard", "Reply", "Route", "WorldLRU", "WorldsMetrics", "WorldsProxy", "parse_ttl",
]
