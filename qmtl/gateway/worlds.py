"""The worlds proxy: WorldService's API under the same paths, with the Gateway's rules (SPEC §4).

Every worlds route goes through :meth:`WorldsProxy.forward` (or the two cached reads),
which, in this order:

1. authenticates the caller (``ctx.auth``; 401 problem when auth is configured and the
   token is missing or invalid);
2. applies the **live guard** to calls that can move a world to live (see
   :data:`LIVE_GUARD` and :meth:`WorldsProxy.live_guard`): without ``X-Allow-Live: true``
   (or ``gateway.allow_live`` / ``--allow-live``) the answer is 403 and WorldService is
   not called;
3. calls WorldService on its budget (``ctx.worldservice``: timeout, retries for
   idempotent calls only, circuit breaker), forwarding the verified identity
   (``X-QMTL-Subject``/``X-QMTL-Claims``, trusted by WorldService only with the
   Gateway's service token, which the backend adds), the correlation id, the query,
   the body and ``If-None-Match``;
4. maps the answer faithfully (status, body, ``ETag``/``Location``/``Retry-After``/...),
   and turns "WorldService cannot answer" into 503 problem+json with ``Retry-After`` —
   except for the two reads that have a safe answer:

* ``GET /worlds/{id}/decide`` — cached per (world, as_of) for the envelope's ``ttl``
  (``gateway.decide_default_ttl`` when absent; ``0s`` = not cached). When there is no
  fresh entry and WorldService cannot answer (unreachable, timing out, 5xx, breaker
  open, or an answer that is not a DecisionEnvelope) the Gateway answers a **safe
  decision**: ``effective_mode: backtest`` with a reason saying why. A stale entry is
  never served, so a stale ``live`` can never be.
* ``GET /worlds/{id}/activation`` — cached by etag and revalidated upstream on every
  request with ``If-None-Match`` (WorldService answers 304 when unchanged). When
  WorldService cannot answer the result is ``active: false, weight: 0``; a cached
  ``active: true`` is never served without WorldService confirming it.

Both answer an ``ETag`` and honour the client's ``If-None-Match`` with 304, and mark
what they are with ``X-QMTL-Cache``: ``hit`` (fresh cache entry), ``miss`` (fetched
from WorldService), ``revalidated`` (WorldService confirmed the cached entry with 304),
``safe-default`` (WorldService could not answer; the body is the safe default and its
``reason`` says why). Caches are bounded LRUs owned by this component (one per Gateway
instance); concurrent identical upstream reads are coalesced.

**Caches follow the bus.** Every replica consumes every PolicyUpdated / ActivationUpdated;
the events component calls :meth:`WorldsProxy.world_changed` for each one (a typed
listener wired by the app factory), which drops the world's decide and activation entries
and bumps the world's generation, so an upstream read that started before the event cannot
refill the cache with the superseded answer. Once a replica has consumed the event it
never answers the superseded policy version from its cache, whichever replica the change
went through (the staleness window is the bus latency: ``bench/bench_replicas.py``).

Envelopes from WorldService are validated against the Gateway's own schemas before they
are cached (an invalid one is "WorldService failing": safe default). That is what lets
:class:`DecideFastPath` answer decide cache hits in front of the contract stack (the
request was validated by it when the entry was filled) at close to the speed of a bare
HTTP route (``bench/bench_decide.py``).

Metrics (``ctx.registry``): ``gateway_world_decide_latency_ms`` (histogram),
``world_decide_requests_total{result}``, ``world_decide_cache_hit_ratio``,
``world_activation_requests_total{result}``, ``world_activation_cache_hit_ratio`` (hit or
revalidated over all answers, since start), ``world_live_guard_refusals_total{operation}``,
``world_cache_entries{cache}``; the backend adds ``gateway_proxy_errors_total{backend,status}``
and ``gateway_circuit_breaker_state{backend}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import Counter, Gauge, Histogram

from qmtl.common import correlation
from qmtl.common.cache import LRU, SingleFlight
from qmtl.common.durations import parse_duration
from qmtl.common.errors import BadGateway, Forbidden, ServiceError, ServiceUnavailable
from qmtl.common.http import if_none_match, quote_etag
from qmtl.contracts.constants import Mode, Operation, WorldState, operation, upstream_path
from qmtl.contracts.loader import SpecError
from qmtl.gateway.backends import BackendUnavailable

log = logging.getLogger(__name__)

CACHE_HEADER = "X-QMTL-Cache"
HIT, MISS, REVALIDATED, SAFE = "hit", "miss", "revalidated", "safe-default"
ALLOW_LIVE_HEADER = "X-Allow-Live"

# Response headers of WorldService that the Gateway passes on to its caller.
PASS_HEADERS = {name.lower(): name for name in (
    "ETag", "Location", "Retry-After", "Cache-Control", "Link", "Last-Modified", "Deprecation", "Sunset",
    "X-QMTL-Gated", "Idempotent-Replayed",
)}

def parse_ttl(value: Any, default: float) -> float:
    """Seconds of an envelope ``ttl`` (``"300s"``, ``"500ms"``, ``"5m"``, a number, or bare
    seconds ``"45"``); ``default`` when absent; ValueError when unreadable."""
    if value is None or value == "":
        return float(default)
    return parse_duration(value, bare_seconds=True)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":"), default=str).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------- results


@dataclass
class Reply:
    """What a worlds handler answers: status, raw body, content type and headers."""

    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, data: Any, headers: Mapping[str, str] | None = None) -> Reply:
        return cls(status, json.dumps(data, separators=(",", ":")).encode(), "application/json", dict(headers or {}))

    def data(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Incoming:
    """The parts of a caller's request the proxy needs (header names lower-case)."""

    headers: Mapping[str, str]
    query: str = ""  # the raw query string, forwarded as is
    identity: Any = None  # verified by the security middleware (scope["qmtl.identity"]), if it ran

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


# --------------------------------------------------------------------------- caches


class WorldLRU(LRU):
    """An :class:`LRU` whose keys are tuples starting with a world id, with an index by world,
    so that dropping one world's entries (on each consumed ControlBus event) costs the size
    of that world's entries, not of the whole cache."""

    def __init__(self, max_entries: int) -> None:
        super().__init__(max_entries)
        self._by_world: dict[str, set] = {}

    def put(self, key: Any, value: Any) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        self._by_world.setdefault(key[0], set()).add(key)
        while len(self._data) > self.max_entries:
            old, _ = self._data.popitem(last=False)
            self._unindex(old)

    def pop(self, key: Any) -> Any:
        value = self._data.pop(key, None)
        if value is not None:
            self._unindex(key)
        return value

    def _unindex(self, key: Any) -> None:
        keys = self._by_world.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_world[key[0]]

    def drop_world(self, world_id: str) -> int:
        """Forget every entry of ``world_id``; returns how many there were."""
        keys = self._by_world.pop(world_id, None) or ()
        for key in keys:
            self._data.pop(key, None)
        return len(keys)


@dataclass
class DecisionEntry:
    envelope: dict
    body: bytes
    etag: str  # client-facing entity tag (quoted)
    upstream_etag: str  # what to send WorldService in If-None-Match (quoted)
    ttl: float
    fetched_at: float
    expires_at: float


@dataclass
class ActivationEntry:
    envelope: dict
    body: bytes
    etag: str  # quoted
    upstream_etag: str  # quoted
    headers: dict[str, str] = field(default_factory=dict)  # WorldService's headers worth passing on (X-QMTL-Gated)


# --------------------------------------------------------------------------- metrics


class WorldsMetrics:
    def __init__(self, registry: Any) -> None:
        self.decide_latency = Histogram(
            "gateway_world_decide_latency_ms", "GET /worlds/{id}/decide latency at the Gateway (ms), cache hits included "
            "(WorldService's world_decide_latency_ms is the time it takes to compute one)", registry=registry,
            buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000, 2000),
        )
        self.decide_requests = Counter("world_decide_requests", "Decide answers by cache result", ["result"], registry=registry)
        self.decide_hit_ratio = Gauge("world_decide_cache_hit_ratio", "Share of decide answers served from the Gateway cache (hit or revalidated)",
                                      registry=registry)
        self.activation_requests = Counter("world_activation_requests", "Activation answers by cache result", ["result"], registry=registry)
        self.activation_hit_ratio = Gauge(
            "world_activation_cache_hit_ratio", "Share of activation answers served from the Gateway cache after WorldService revalidated it (304)",
            registry=registry)
        self.live_guard_refusals = Counter("world_live_guard_refusals", "Calls refused by the live guard", ["operation"], registry=registry)
        self.cache_entries = Gauge("world_cache_entries", "Entries held by the worlds caches", ["cache"], registry=registry)
        self.invalidations = Counter("world_cache_invalidations", "Worlds cache entries dropped because the world changed "
                                     "(a write through this Gateway or a consumed ControlBus event)", registry=registry)
        self._decide = [0, 0]  # hits, total
        self._activation = [0, 0]
        self._decide_by = {r: self.decide_requests.labels(r) for r in (HIT, MISS, REVALIDATED, SAFE)}

    def decide(self, result: str, started: float) -> None:
        self.decide_latency.observe((time.perf_counter() - started) * 1000)
        self._decide_by[result].inc()
        self._decide[1] += 1
        if result in (HIT, REVALIDATED):
            self._decide[0] += 1
        self.decide_hit_ratio.set(self._decide[0] / self._decide[1])

    def activation(self, result: str) -> None:
        self.activation_requests.labels(result).inc()
        self._activation[1] += 1
        if result in (HIT, REVALIDATED):
            self._activation[0] += 1
        self.activation_hit_ratio.set(self._activation[0] / self._activation[1])


# --------------------------------------------------------------------------- the proxy


@dataclass(frozen=True)
class Route:
    """One proxied WorldService operation."""

    method: str
    idempotent: bool
    live_guard: str = "never"  # see WorldsProxy.live_guard
    changes_decisions: bool = False  # a success forgets this Gateway's cached decisions of the world


class WorldsProxy:
    def __init__(self, ctx: Any) -> None:
        g = ctx.config.gateway
        self.ctx = ctx
        self.backend = ctx.worldservice
        self.allow_live = bool(g.allow_live)
        self.default_ttl = float(g.decide_default_ttl)
        self.decisions = WorldLRU(g.worlds_cache_size)
        self.activations = WorldLRU(g.worlds_cache_size)
        # Per world, bumped on every invalidation: an upstream read that started before the
        # bump does not fill the cache after it (it may carry the superseded version).
        self._generation: dict[str, int] = {}
        self._flight = SingleFlight()
        self.metrics = WorldsMetrics(ctx.registry)
        self.public_url = ctx.config.gateway_public_url()
        # Upstream envelopes are validated against the Gateway's own contract before they
        # are cached, so a cache hit can be served without re-validation (see DecideFastPath).
        self._decision_schema = _schema_check(_response_schema("decide"))
        self.decide_key_param = operation("gateway", "decide").query_params[0]  # part of the cache key
        self._activation_schema = _schema_check(_response_schema("get_activation"))

    async def start(self) -> None:
        if self.allow_live:
            log.warning("worlds proxy: live guard OFF (--allow-live): calls that can switch a world to live need no %s header", ALLOW_LIVE_HEADER)

    async def stop(self) -> None:
        return None

    # -- building blocks ---------------------------------------------------------------
    async def identity(self, req: Incoming) -> Any:
        if req.identity is not None:
            return req.identity
        return await self.ctx.auth.authenticate(req.headers)

    def consent(self, req: Incoming) -> bool:
        if self.allow_live:
            return True
        return (req.header(ALLOW_LIVE_HEADER) or "").strip().lower() == "true"

    def refuse_live(self, operation: str, why: str) -> None:
        self.metrics.live_guard_refusals.labels(operation).inc()
        log.warning("live guard refused %s: %s", operation, why, extra={"correlation_id": correlation.get()})
        raise Forbidden(
            f"{why}: this call can switch the world to live and needs the caller's explicit consent "
            f"({ALLOW_LIVE_HEADER}: true), unless the Gateway runs with --allow-live. WorldService was not called.",
            title="Live Guard", ext={"live_guard": True, "required_header": ALLOW_LIVE_HEADER},
        )

    async def live_guard(self, operation: str, rule: str, world_id: str | None, body: Any, req: Incoming, identity: Any) -> None:
        """Raise 403 when this call can move a world to live and the caller did not consent.

        Rules (each operation names its own in ``x-qmtl-proxy`` of specs/openapi.yaml):

        * ``always`` — apply: it changes which strategies trade.
        * ``activates`` — activation override with ``active: true``.
        * ``create_world`` — a new world with ``allow_live: true``.
        * ``update_world`` — setting ``allow_live: true``; or, on a world that allows live,
          lifting a gate (``state: ACTIVE``, ``circuit_breaker: false``), which can bring a
          ``live`` decision back.
        * ``create_policy`` — ``set_default: true`` on a world that allows live.
        * ``if_world_allows_live`` — set-default and observations: they can promote the
          decision of a world that allows live.
        * ``never`` — everything else.

        "Allows live" is read from WorldService (``GET /worlds/{id}``) only when the caller
        did not consent and the body alone does not decide.
        """
        if rule == "never" or self.consent(req):
            return
        b = body if isinstance(body, Mapping) else {}
        if rule == "always":
            self.refuse_live(operation, f"{operation} changes which strategies trade in world {world_id!r}")
        elif rule == "activates":
            if b.get("active") is True:
                self.refuse_live(operation, f"switching strategy {b.get('strategy_id')!r} ({b.get('side')}) on in world {world_id!r}")
        elif rule == "create_world":
            if b.get("allow_live") is True:
                self.refuse_live(operation, f"creating world {world_id!r} with allow_live: true")
        elif rule == "update_world":
            if b.get("allow_live") is True:
                self.refuse_live(operation, f"setting allow_live: true on world {world_id!r}")
            lifts = b.get("state") == WorldState.ACTIVE or b.get("circuit_breaker") is False
            if lifts and b.get("allow_live") is not False and await self._world_allows_live(world_id, identity):
                self.refuse_live(operation, f"lifting the gate of world {world_id!r}, which allows live")
        elif rule == "create_policy":
            if b.get("set_default") is True and await self._world_allows_live(world_id, identity):
                self.refuse_live(operation, f"a new default policy for world {world_id!r}, which allows live")
        elif rule == "if_world_allows_live":
            if await self._world_allows_live(world_id, identity):
                self.refuse_live(operation, f"{operation} can promote world {world_id!r}, which allows live")
        else:  # pragma: no cover - a programming error in the route table
            raise AssertionError(f"unknown live-guard rule {rule!r}")

    async def _world_allows_live(self, world_id: str | None, identity: Any) -> bool:
        """Whether the world may reach live (its ``allow_live``); unknown worlds cannot."""
        try:
            resp = await self.backend.request("GET", upstream_path("get_world", world_id=world_id), headers=identity.forward_headers())
        except BackendUnavailable as exc:
            raise self._unavailable(exc) from exc
        if resp.status_code != 200:
            return False  # the call itself will get WorldService's answer (404, 403, ...)
        try:
            return bool(resp.json().get("allow_live"))
        except ValueError:
            return False

    def _unavailable(self, exc: BackendUnavailable) -> ServiceError:
        retry = max(1, math.ceil(exc.retry_after or 1))
        return ServiceUnavailable(f"WorldService is unavailable ({exc.reason}); retry with backoff", retry_after=retry,
                                  ext={"backend": "worldservice"})

    def _map_failure(self, exc: BackendUnavailable) -> Reply:
        """WorldService answered 5xx/429 (after the retries its budget allows): its 503, 504 and
        429 are passed on as they are (e.g. an apply rolled back: retry the same run_id), with
        ``Retry-After``; any other 5xx is WorldService failing — 502 with its detail (the
        Gateway itself never answers 500 for a backend's failure)."""
        resp = exc.response
        if resp.status_code in (429, 503, 504):
            reply = self._map(resp)
            reply.headers.setdefault("Retry-After", str(max(1, math.ceil(exc.retry_after or 1))))
            return reply
        try:
            detail = resp.json().get("detail") or resp.text[:300]
        except ValueError:
            detail = resp.text[:300]
        raise BadGateway(f"WorldService failed (HTTP {resp.status_code}): {detail}",
                         ext={"backend": "worldservice", "backend_status": resp.status_code})

    def _map(self, resp: Any) -> Reply:
        """A WorldService answer → the Gateway's answer, faithfully (status, body, relevant headers)."""
        status = resp.status_code
        if status == 401:
            # The caller passed the Gateway's authentication; WorldService refusing the
            # forwarded identity means the Gateway's service credential is wrong.
            log.error("WorldService refused the Gateway's forwarded identity (service_token mismatch?): %s", resp.text[:200])
            raise BadGateway("WorldService refused the Gateway's service credential; the Gateway and WorldService "
                             "must share gateway.service_token / worldservice.service_token", ext={"backend": "worldservice"})
        headers: dict[str, str] = {}
        for name, canonical in PASS_HEADERS.items():
            value = resp.headers.get(name)
            if value is not None:
                headers[canonical] = value
        loc = headers.get("Location")
        if loc:
            parts = urlsplit(loc)
            if parts.scheme and parts.netloc and loc.startswith(self.backend.base_url):
                headers["Location"] = self.public_url + loc[len(self.backend.base_url):]
        ctype = resp.headers.get("content-type")
        if status in (204, 304):
            return Reply(status, b"", None, headers)
        return Reply(status, resp.content, ctype.split(";")[0].strip() if ctype else None, headers)

    # -- generic pass-through ----------------------------------------------------------
    async def forward(self, operation: str, route: Route, path: str, req: Incoming, *, world_id: str | None = None,
                      body: Any = None) -> Reply:
        identity = await self.identity(req)
        await self.live_guard(operation, route.live_guard, world_id, body, req, identity)
        headers = identity.forward_headers()
        inm = req.header("if-none-match")
        if inm and route.method == "GET":
            headers["If-None-Match"] = inm
        if_match = req.header("if-match")
        if if_match and route.method != "GET":
            headers["If-Match"] = if_match
        url = path + ("?" + req.query if req.query else "")
        try:
            resp = await self.backend.request(route.method, url, json=body, headers=headers, idempotent=route.idempotent)
        except BackendUnavailable as exc:
            log.warning("worlds %s: WorldService unavailable: %s", operation, exc.reason, extra={"correlation_id": correlation.get()})
            if exc.response is not None:
                return self._map_failure(exc)
            raise self._unavailable(exc) from exc
        log.info("worlds %s %s -> %d (subject %s)", route.method, path, resp.status_code, identity.subject,
                 extra={"correlation_id": correlation.get()})
        if world_id and route.changes_decisions and resp.status_code < 300:
            self.invalidate(world_id)
        return self._map(resp)

    def invalidate(self, world_id: str, *, activations: bool = False) -> None:
        """Forget the cached decisions (and, with ``activations``, activation entries) of a
        world: after a write through this Gateway changed them, and on every PolicyUpdated /
        ActivationUpdated this replica consumes for the world (:meth:`world_changed`), so no
        replica serves a superseded decision once the event has reached it."""
        self._generation[world_id] = self._generation.get(world_id, 0) + 1
        dropped = self.decisions.drop_world(world_id)
        if activations:
            dropped += self.activations.drop_world(world_id)
        if dropped:
            self.metrics.invalidations.inc(dropped)
            self.metrics.cache_entries.labels("decide").set(len(self.decisions))
            self.metrics.cache_entries.labels("activation").set(len(self.activations))

    def world_changed(self, change: Any) -> None:
        """The events component's world-change listener (wired by the app factory):
        ``change.world_id`` had a PolicyUpdated or ActivationUpdated consumed."""
        self.invalidate(change.world_id, activations=True)

    # -- decide ------------------------------------------------------------------------
    async def decide(self, world_id: str, req: Incoming, as_of: str | None = None) -> Reply:
        started = time.perf_counter()
        identity = await self.identity(req)
        identity.require(world_id, "reader")  # cache hits must not skip WorldService's RBAC
        key = (world_id, as_of or "")
        entry: DecisionEntry | None = self.decisions.get(key)
        now = time.monotonic()
        if entry is not None and now < entry.expires_at:
            result = HIT
        else:
            try:
                gen = self._generation.get(world_id, 0)
                entry, result = await self._flight.do(("decide", key, identity.subject, gen),
                                                      lambda: self._fetch_decision(world_id, as_of, key, identity, gen))
            except _Passthrough as p:
                self.metrics.decide_requests.labels("error").inc()
                return p.reply
            except _Unanswered as u:
                reply = self._safe_decision(world_id, as_of, u.reason, self.decisions.get(key))
                self.metrics.decide(SAFE, started)
                return self._conditional(reply, req)
        reply = self._decision_reply(entry, result, now)
        self.metrics.decide(result, started)
        return self._conditional(reply, req)

    async def _fetch_decision(self, world_id: str, as_of: str | None, key: tuple, identity: Any, gen: int) -> tuple[DecisionEntry, str]:
        stale = self.decisions.get(key)
        headers = identity.forward_headers()
        if stale is not None:
            headers["If-None-Match"] = stale.upstream_etag
        params = {self.decide_key_param: as_of} if as_of else None
        path = upstream_path("decide", world_id=world_id)
        try:
            resp = await self.backend.request("GET", path, params=params, headers=headers)
        except BackendUnavailable as exc:
            raise _Unanswered(f"WorldService unavailable ({exc.reason})") from exc
        fetched = time.monotonic()
        current = self._generation.get(world_id, 0) == gen  # no bus event for the world meanwhile
        if resp.status_code == 304 and stale is not None:
            if current:
                stale.fetched_at, stale.expires_at = fetched, fetched + stale.ttl
                self.decisions.put(key, stale)
            return stale, REVALIDATED
        if resp.status_code != 200:
            if resp.status_code == 404:
                self.decisions.pop(key)
            if resp.status_code == 304:
                raise _Unanswered("WorldService answered 304 to a request without If-None-Match")
            raise _Passthrough(self._map(resp))
        body = resp.content
        try:
            envelope = resp.json()
            if isinstance(envelope, dict) and envelope.get("ttl") in (None, ""):
                # no ttl: the Gateway's default applies, and the envelope says so
                envelope["ttl"] = f"{self.default_ttl:g}s"
                body = json.dumps(envelope, separators=(",", ":")).encode()
            self._decision_schema(envelope)
            ttl = parse_ttl(envelope["ttl"], self.default_ttl)
        except ValueError as exc:
            log.error("WorldService answered an invalid decision for %s: %s", world_id, exc, extra={"correlation_id": correlation.get()})
            raise _Unanswered(f"WorldService answered an invalid decision ({exc})") from exc
        etag = quote_etag(envelope["etag"])
        entry = DecisionEntry(envelope, body, etag, resp.headers.get("etag") or etag, ttl, fetched, fetched + ttl)
        if ttl > 0 and current:
            self.decisions.put(key, entry)
        elif ttl <= 0:
            self.decisions.pop(key)
        self.metrics.cache_entries.labels("decide").set(len(self.decisions))
        return entry, MISS

    def _decision_reply(self, entry: DecisionEntry, result: str, now: float) -> Reply:
        headers = {"ETag": entry.etag, CACHE_HEADER: result}
        if entry.ttl > 0:
            # + 1e-6: (fetched + ttl) - fetched is not always ttl in floating point (299.99999999994)
            remaining = max(0, int(entry.expires_at - max(now, entry.fetched_at) + 1e-6))
            headers["Cache-Control"] = f"private, max-age={remaining}"
            headers["Age"] = str(max(0, int(now - entry.fetched_at))) if result == HIT else "0"
        else:
            headers["Cache-Control"] = "no-store"
        return Reply(200, entry.body, "application/json", headers)

    def _safe_decision(self, world_id: str, as_of: str | None, why: str, stale: DecisionEntry | None) -> Reply:
        if stale is not None:
            ago = time.monotonic() - stale.expires_at
            why += (f"; the cached decision ({stale.envelope.get('effective_mode')}, policy v{stale.envelope.get('policy_version')}) "
                    f"expired {max(0.0, ago):.1f} s ago and is not served stale")
        else:
            why += "; no cached decision"
        policy_version = stale.envelope.get("policy_version", 0) if stale is not None else 0
        body = {
            "world_id": world_id,
            "policy_version": policy_version if isinstance(policy_version, int) and policy_version >= 0 else 0,
            "effective_mode": Mode.BACKTEST.value,
            "reason": f"safe default ({Mode.BACKTEST.value}): {why}",
            "as_of": as_of or _now_iso(),
            "ttl": "0s",
            # stable while the Gateway keeps answering the safe default, whatever the cause
            "etag": "safe-" + _digest("safe-decision", world_id, as_of or ""),
        }
        log.warning("worlds decide %s: safe decision: %s", world_id, why, extra={"correlation_id": correlation.get()})
        return Reply.json(200, body, {"ETag": quote_etag(body["etag"]), CACHE_HEADER: SAFE, "Cache-Control": "no-store"})

    def fast_decide(self, world_id: str, query: bytes, raw_headers: Any) -> Awaitable[Reply | None] | None:
        """The cache-hit path of :meth:`decide` for :class:`DecideFastPath`, or None to decline.

        Serves only a fresh entry that the full path stored (so the path and query were
        validated by the contract stack, and the body validated against the envelope
        schema), to a caller who authenticates and has ``reader`` on the world; anything
        else — including every error — is declined and takes the full path. The query may
        carry only the operation's one query parameter, which is part of the cache key.
        """
        if not world_id or "/" in world_id:
            return None
        as_of = ""
        if query:
            pairs = _parse_query(query)
            if len(pairs) != 1 or pairs[0][0] != self.decide_key_param or not pairs[0][1]:
                return None
            as_of = pairs[0][1]
        entry: DecisionEntry | None = self.decisions.get((world_id, as_of))
        if entry is None or time.monotonic() >= entry.expires_at:
            return None
        return self._fast_decide(world_id, entry, raw_headers)

    async def _fast_decide(self, world_id: str, entry: DecisionEntry, raw_headers: Any) -> Reply | None:
        started = time.perf_counter()
        req = Incoming({k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers})
        try:
            identity = await self.ctx.auth.authenticate(req.headers)
        except Exception:
            return None  # the full path answers the problem (401, 503 ...)
        if not identity.has_role(world_id, "reader"):
            return None
        now = time.monotonic()
        if now >= entry.expires_at:
            return None
        reply = self._conditional(self._decision_reply(entry, HIT, now), req)
        self.metrics.decide(HIT, started)
        return reply

    @staticmethod
    def _conditional(reply: Reply, req: Incoming) -> Reply:
        etag = reply.headers.get("ETag")
        if reply.status == 200 and etag and if_none_match(req.header("if-none-match"), etag):
            return Reply(304, b"", None, dict(reply.headers))
        return reply

    # -- activation --------------------------------------------------------------------
    async def activation(self, world_id: str, req: Incoming, strategy_id: str, side: str) -> Reply:
        identity = await self.identity(req)
        identity.require(world_id, "reader")
        key = (world_id, strategy_id, side)
        try:
            gen = self._generation.get(world_id, 0)
            entry, result = await self._flight.do(("activation", key, identity.subject, gen),
                                                  lambda: self._fetch_activation(world_id, strategy_id, side, key, identity, gen))
        except _Passthrough as p:
            self.metrics.activation_requests.labels("error").inc()
            return p.reply
        except _Unanswered as u:
            self.metrics.activation(SAFE)
            return self._conditional(self._safe_activation(world_id, strategy_id, side, u.reason), req)
        self.metrics.activation(result)
        headers = {"ETag": entry.etag, CACHE_HEADER: result, "Cache-Control": "no-cache", **entry.headers}
        return self._conditional(Reply(200, entry.body, "application/json", headers), req)

    async def _fetch_activation(self, world_id: str, strategy_id: str, side: str, key: tuple, identity: Any,
                                gen: int) -> tuple[ActivationEntry, str]:
        cached: ActivationEntry | None = self.activations.get(key)
        headers = identity.forward_headers()
        if cached is not None:
            headers["If-None-Match"] = cached.upstream_etag
        try:
            resp = await self.backend.request("GET", upstream_path("get_activation", world_id=world_id),
                                              params={"strategy_id": strategy_id, "side": side}, headers=headers)
        except BackendUnavailable as exc:
            raise _Unanswered(f"WorldService unavailable ({exc.reason})") from exc
        if resp.status_code == 304:
            if cached is None:
                raise _Unanswered("WorldService answered 304 to a request without If-None-Match")
            return cached, REVALIDATED
        if resp.status_code != 200:
            self.activations.pop(key)
            raise _Passthrough(self._map(resp))
        try:
            envelope = resp.json()
            self._activation_schema(envelope)
        except ValueError as exc:
            log.error("WorldService answered an invalid activation for %s: %s", world_id, exc, extra={"correlation_id": correlation.get()})
            self.activations.pop(key)
            raise _Unanswered(f"WorldService answered an invalid activation ({exc})") from exc
        etag = quote_etag(envelope["etag"])
        gated = resp.headers.get("x-qmtl-gated")
        entry = ActivationEntry(envelope, resp.content, etag, resp.headers.get("etag") or etag, {"X-QMTL-Gated": gated} if gated else {})
        if self._generation.get(world_id, 0) == gen:
            self.activations.put(key, entry)
        self.metrics.cache_entries.labels("activation").set(len(self.activations))
        return entry, MISS

    def _safe_activation(self, world_id: str, strategy_id: str, side: str, why: str) -> Reply:
        body = {
            "world_id": world_id,
            "strategy_id": strategy_id,
            "side": side,
            "active": False,
            "weight": 0.0,
            "etag": "safe-" + _digest("safe-activation", world_id, strategy_id, side),
            "ts": _now_iso(),
            "reason": f"safe default (inactive, orders gated off): {why}",
        }
        log.warning("worlds activation %s/%s/%s: safe default: %s", world_id, strategy_id, side, why,
                    extra={"correlation_id": correlation.get()})
        return Reply.json(200, body, {"ETag": quote_etag(body["etag"]), CACHE_HEADER: SAFE, "Cache-Control": "no-store"})


def _response_schema(operation_id: str, status: int = 200) -> str:
    """The schema file the Gateway's spec names for ``operation_id``'s ``status`` answer."""
    return operation("gateway", operation_id).response_schemas[str(status)]


def _schema_check(file_name: str) -> Callable[[Any], None]:
    """A fast validator (jsonschema-rs) of one schema file: raises ValueError naming the first violation."""
    import jsonschema_rs

    from qmtl.contracts.loader import load_schema_files

    validator = jsonschema_rs.validator_for(load_schema_files()[file_name])

    def check(instance: Any) -> None:
        for error in validator.iter_errors(instance):
            where = "/" + "/".join(str(p) for p in error.instance_path)
            raise ValueError(f"{error.message} at {where}")

    return check


class _Unanswered(Exception):
    """WorldService could not give a usable answer; the caller gets the safe default."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Passthrough(Exception):
    """WorldService answered something other than the envelope (404, 403, ...): pass it on."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def _parse_query(query: bytes) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    return parse_qsl(query.decode("latin-1"), keep_blank_values=True)


class DecideFastPath:
    """ASGI layer in front of the contract stack (Connexion) that answers cache hits of
    ``GET /worlds/{id}/decide`` directly; every other request passes through untouched.

    Why: a hit is a dictionary lookup, but the full stack (routing, security, parameter
    decoding, request and response validation) costs ~10x the bare HTTP server. The
    fast path keeps every rule of the route — authentication, the ``reader`` role, ETag
    and ``If-None-Match`` → 304, ``X-QMTL-Cache``, metrics, the correlation id (set by
    the outer middleware) — and declines (full path) whenever there is anything else to
    do: no fresh entry, an unexpected query, a failed authentication or missing role.
    """

    OPERATION = "decide"  # the Gateway operation whose cache hits it answers (specs/openapi.yaml)

    def __init__(self, app: Any, proxy: WorldsProxy, op: Operation | None = None) -> None:
        self.app = app
        self.proxy = proxy
        # Route, parameters and statuses come from the operation in the spec; a spec this
        # fast path cannot serve by the same rules stops the Gateway at startup.
        self.op = op or operation("gateway", self.OPERATION)
        if len(self.op.path_params) != 1 or len(self.op.query_params) != 1:
            raise SpecError(f"{self.op.method} {self.op.path}: the decide fast path needs one path parameter (the world) "
                            f"and one query parameter (part of the cache key); the spec has {self.op.path_params} "
                            f"and {self.op.query_params}")
        self.world_param = self.op.path_params[0]
        self.statuses = (self.op.status(200), self.op.status(304))  # what a cache hit answers
        self.served = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == self.op.method:
            params = self.op.match(scope["path"])
            if params is not None:
                pending = self.proxy.fast_decide(params[self.world_param], scope.get("query_string", b""), scope.get("headers", ()))
                if pending is not None:
                    reply = await pending
                    if reply is not None and reply.status in self.statuses:
                        self.served += 1
                        await _send_reply(send, reply)
                        return
        await self.app(scope, receive, send)


async def _send_reply(send: Any, reply: Reply) -> None:
    headers = [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in reply.headers.items()]
    if reply.status not in (204, 304):
        headers.append((b"content-type", (reply.content_type or "application/json").encode("latin-1")))
        headers.append((b"content-length", str(len(reply.body)).encode("latin-1")))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body if reply.status not in (204, 304) else b""})


def build(ctx: Any) -> WorldsProxy:
    return WorldsProxy(ctx)
