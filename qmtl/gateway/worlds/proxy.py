"""The worlds proxy: WorldService's API under the same paths, with the Gateway's rules (SPEC §4).

Every worlds route goes through :meth:`WorldsProxy.forward` (or the two cached reads),
which, in this order:

1. authenticates the caller (the :class:`~qmtl.gateway.auth.Authenticator`; 401 problem
   when auth is configured and the token is missing or invalid);
2. applies the **live guard** (:mod:`qmtl.gateway.worlds.live_guard`) to calls that can
   move a world to live: without ``X-Allow-Live: true`` (or ``gateway.allow_live`` /
   ``--allow-live``) the answer is 403 and WorldService is not called;
3. calls WorldService on its budget (the :class:`~qmtl.gateway.backends.Backend`: timeout,
   retries for idempotent calls only, circuit breaker), forwarding the verified identity
   (``X-QMTL-Subject``/``X-QMTL-Claims``, trusted by WorldService only with the
   Gateway's service token, which the backend adds), the correlation id, the query,
   the body and ``If-None-Match``;
4. maps the answer faithfully (status, body, ``ETag``/``Location``/``Retry-After``/...),
   and turns "WorldService cannot answer" into 503 problem+json with ``Retry-After`` —
   except for the two reads that have a safe answer (:mod:`qmtl.gateway.worlds.safe_defaults`):

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
instance); concurrent identical upstream reads are coalesced. Every expiry is read from
the injected ``monotonic`` clock, every timestamp of a safe default from ``wall``.

**Caches follow the bus.** Every replica consumes every PolicyUpdated / ActivationUpdated;
the events component calls :meth:`WorldsProxy.world_changed` for each one (a typed
listener wired by the app factory), which drops the world's decide and activation entries
and bumps the world's generation, so an upstream read that started before the event cannot
refill the cache with the superseded answer. Once a replica has consumed the event it
never answers the superseded policy version from its cache, whichever replica the change
went through (the staleness window is the bus latency: ``bench/bench_replicas.py``).

Envelopes from WorldService are validated against the Gateway's own schemas before they
are cached (an invalid one is "WorldService failing": safe default). That is what lets
:class:`~qmtl.gateway.worlds.fastpath.DecideFastPath` answer decide cache hits in front of
the contract stack (the request was validated by it when the entry was filled) at close
to the speed of a bare HTTP route (``bench/bench_decide.py``).

Metrics (:mod:`qmtl.gateway.worlds.metrics`): ``gateway_world_decide_latency_ms`` (histogram),
``world_decide_requests_total{result}``, ``world_decide_cache_hit_ratio``,
``world_activation_requests_total{result}``, ``world_activation_cache_hit_ratio`` (hit or
revalidated over all answers, since start), ``world_live_guard_refusals_total{operation}``,
``world_cache_entries{cache}``; the backend adds ``gateway_proxy_errors_total{backend,status}``
and ``gateway_circuit_breaker_state{backend}``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from prometheus_client import CollectorRegistry

from qmtl.common import correlation
from qmtl.common.cache import SingleFlight
from qmtl.common.errors import BadGateway
from qmtl.common.http import quote_etag
from qmtl.contracts.constants import operation
from qmtl.gateway.backends import BackendUnavailable
from qmtl.gateway.worlds.cache import ActivationEntry, DecisionEntry, WorldLRU, parse_ttl
from qmtl.gateway.worlds.live_guard import ALLOW_LIVE_HEADER, LiveGuard
from qmtl.gateway.worlds.metrics import WorldsMetrics
from qmtl.gateway.worlds.replies import (
    CACHE_HEADER,
    HIT,
    MISS,
    REVALIDATED,
    SAFE,
    Incoming,
    Passthrough,
    Reply,
    Route,
    Unanswered,
    conditional,
    response_schema,
    schema_check,
    unavailable,
    upstream_template,
)
from qmtl.gateway.worlds.safe_defaults import safe_activation, safe_decision

if TYPE_CHECKING:
    from qmtl.common.config import GatewayConfig
    from qmtl.gateway.auth import Authenticator, Identity
    from qmtl.gateway.backends import Backend

log = logging.getLogger(__name__)

# Response headers of WorldService that the Gateway passes on to its caller.
PASS_HEADERS = {name.lower(): name for name in (
    "ETag", "Location", "Retry-After", "Cache-Control", "Link", "Last-Modified", "Deprecation", "Sunset",
    "X-QMTL-Gated", "Idempotent-Replayed",
)}


class WorldsProxy:
    def __init__(self, settings: GatewayConfig, backend: Backend, *, registry: CollectorRegistry, authenticator: Authenticator,
                 monotonic: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.authenticator = authenticator
        self.monotonic = monotonic  # cache expiry and ages
        self.wall = wall  # timestamps of safe defaults
        self.allow_live = bool(settings.allow_live)
        self.default_ttl = float(settings.decide_default_ttl)
        self.decisions = WorldLRU(settings.worlds_cache_size)
        self.activations = WorldLRU(settings.worlds_cache_size)
        # Per world, bumped on every invalidation: an upstream read that started before the
        # bump does not fill the cache after it (it may carry the superseded version).
        self._generation: dict[str, int] = {}
        self._flight: SingleFlight[tuple[Any, ...]] = SingleFlight()  # keyed by (read, cache key, subject, generation)
        self.metrics = WorldsMetrics(registry)
        self.guard = LiveGuard(backend, allow_live=self.allow_live, refusals=self.metrics.live_guard_refusals)
        self.public_url = settings.public_base_url()
        # Upstream envelopes are validated against the Gateway's own contract before they
        # are cached, so a cache hit can be served without re-validation (see DecideFastPath).
        self._decision_schema = schema_check(response_schema("decide"))
        self.decide_key_param = operation("gateway", "decide").query_params[0]  # part of the cache key
        self._activation_schema = schema_check(response_schema("get_activation"))
        self._decide_path, self._activation_path = upstream_template("decide"), upstream_template("get_activation")

    async def start(self) -> None:
        if self.allow_live:
            log.warning("worlds proxy: live guard OFF (--allow-live): calls that can switch a world to live need no %s header", ALLOW_LIVE_HEADER)

    async def stop(self) -> None:
        return None

    # -- building blocks ---------------------------------------------------------------
    async def identity(self, req: Incoming) -> Identity:
        if req.identity is not None:
            return req.identity  # set by the security middleware: an Identity
        return await self.authenticator.authenticate(req.headers)

    async def live_guard(self, operation: str, rule: str, world_id: str | None, body: Any, req: Incoming, identity: Identity | None) -> None:
        """Raise 403 when this call can move a world to live and the caller did not consent
        (the rules: :meth:`LiveGuard.check`)."""
        await self.guard.check(operation, rule, world_id, body, req, identity)

    def _map_failure(self, exc: BackendUnavailable) -> Reply:
        """WorldService answered 5xx/429 (after the retries its budget allows): its 503, 504 and
        429 are passed on as they are (e.g. an apply rolled back: retry the same run_id), with
        ``Retry-After``; any other 5xx is WorldService failing — 502 with its detail (the
        Gateway itself never answers 500 for a backend's failure)."""
        resp = exc.response
        assert resp is not None  # only called for an answer
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
        await self.guard.check(operation, route.live_guard, world_id, body, req, identity)
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
            raise unavailable(exc) from exc
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
        started = self.metrics.started()
        identity = await self.identity(req)
        identity.require(world_id, "reader")  # cache hits must not skip WorldService's RBAC
        key = (world_id, as_of or "")
        cached: DecisionEntry | None = self.decisions.get(key)
        now = self.monotonic()
        if cached is not None and now < cached.expires_at:
            entry, result = cached, HIT
        else:
            try:
                gen = self._generation.get(world_id, 0)
                entry, result = await self._flight.do(("decide", key, identity.subject, gen),
                                                      lambda: self._fetch_decision(world_id, as_of, key, identity, gen))
            except Passthrough as p:
                self.metrics.decide_requests.labels("error").inc()
                return p.reply
            except Unanswered as u:
                reply = self._safe_decision(world_id, as_of, u.reason, self.decisions.get(key))
                self.metrics.decide(SAFE, started)
                return conditional(reply, req)
        reply = self._decision_reply(entry, result, now)
        self.metrics.decide(result, started)
        return conditional(reply, req)

    async def _fetch_decision(self, world_id: str, as_of: str | None, key: tuple[str, str], identity: Identity,
                              gen: int) -> tuple[DecisionEntry, str]:
        stale = self.decisions.get(key)
        headers = identity.forward_headers()
        if stale is not None:
            headers["If-None-Match"] = stale.upstream_etag
        params = {self.decide_key_param: as_of} if as_of else None
        path = self._decide_path.format(world_id=world_id)
        try:
            resp = await self.backend.request("GET", path, params=params, headers=headers)
        except BackendUnavailable as exc:
            raise Unanswered(f"WorldService unavailable ({exc.reason})") from exc
        fetched = self.monotonic()
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
                raise Unanswered("WorldService answered 304 to a request without If-None-Match")
            raise Passthrough(self._map(resp))
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
            raise Unanswered(f"WorldService answered an invalid decision ({exc})") from exc
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
        return safe_decision(world_id, as_of, why, stale, now=self.monotonic(), wall=self.wall())

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
            pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
            if len(pairs) != 1 or pairs[0][0] != self.decide_key_param or not pairs[0][1]:
                return None
            as_of = pairs[0][1]
        entry: DecisionEntry | None = self.decisions.get((world_id, as_of))
        if entry is None or self.monotonic() >= entry.expires_at:
            return None
        return self._fast_decide(world_id, entry, raw_headers)

    async def _fast_decide(self, world_id: str, entry: DecisionEntry, raw_headers: Any) -> Reply | None:
        started = self.metrics.started()
        req = Incoming({k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers})
        try:
            identity = await self.authenticator.authenticate(req.headers)
        except Exception:
            return None  # the full path answers the problem (401, 503 ...)
        if not identity.has_role(world_id, "reader"):
            return None
        now = self.monotonic()
        if now >= entry.expires_at:
            return None
        reply = conditional(self._decision_reply(entry, HIT, now), req)
        self.metrics.decide(HIT, started)
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
        except Passthrough as p:
            self.metrics.activation_requests.labels("error").inc()
            return p.reply
        except Unanswered as u:
            self.metrics.activation(SAFE)
            return conditional(safe_activation(world_id, strategy_id, side, u.reason, wall=self.wall()), req)
        self.metrics.activation(result)
        headers = {"ETag": entry.etag, CACHE_HEADER: result, "Cache-Control": "no-cache", **entry.headers}
        return conditional(Reply(200, entry.body, "application/json", headers), req)

    async def _fetch_activation(self, world_id: str, strategy_id: str, side: str, key: tuple[str, str, str], identity: Identity,
                                gen: int) -> tuple[ActivationEntry, str]:
        cached: ActivationEntry | None = self.activations.get(key)
        headers = identity.forward_headers()
        if cached is not None:
            headers["If-None-Match"] = cached.upstream_etag
        try:
            resp = await self.backend.request("GET", self._activation_path.format(world_id=world_id),
                                              params={"strategy_id": strategy_id, "side": side}, headers=headers)
        except BackendUnavailable as exc:
            raise Unanswered(f"WorldService unavailable ({exc.reason})") from exc
        if resp.status_code == 304:
            if cached is None:
                raise Unanswered("WorldService answered 304 to a request without If-None-Match")
            return cached, REVALIDATED
        if resp.status_code != 200:
            self.activations.pop(key)
            raise Passthrough(self._map(resp))
        try:
            envelope = resp.json()
            self._activation_schema(envelope)
        except ValueError as exc:
            log.error("WorldService answered an invalid activation for %s: %s", world_id, exc, extra={"correlation_id": correlation.get()})
            self.activations.pop(key)
            raise Unanswered(f"WorldService answered an invalid activation ({exc})") from exc
        etag = quote_etag(envelope["etag"])
        gated = resp.headers.get("x-qmtl-gated")
        entry = ActivationEntry(envelope, resp.content, etag, resp.headers.get("etag") or etag, {"X-QMTL-Gated": gated} if gated else {})
        if self._generation.get(world_id, 0) == gen:
            self.activations.put(key, entry)
        self.metrics.cache_entries.labels("activation").set(len(self.activations))
        return entry, MISS
