"""A typed async client of the Gateway's HTTP API (``specs/openapi.yaml``).

One :class:`GatewayClient` per Gateway (it pools connections; use it as an async context
manager or call :meth:`GatewayClient.aclose`). Every call:

* carries a correlation id (``X-Correlation-ID``): the ``correlation_id=`` you pass, else
  the one of the surrounding request (:mod:`qmtl.common.correlation`), else a new one — the
  same id on every retry, so logs and audit records tie the attempts together;
* has a per-attempt timeout (``timeout``) and, when it is safe, retries with jittered
  exponential backoff (:class:`qmtl.common.resilience.RetryPolicy` delays, or the server's
  ``Retry-After`` when longer): idempotent calls on 503 and on any connection error;
  non-idempotent calls only when the request provably never left (connection refused,
  connect timeout) — except ``submit_strategy``, which the Gateway de-duplicates by DAG
  content, so it is also retried on 503;
* turns an error answer (``application/problem+json``) into a :class:`ProblemError`
  subclass carrying status, title, detail, errors, correlation id, body and headers
  (:mod:`qmtl.sdk.errors`), and no answer at all into :class:`TransportError`.

Results are the decoded JSON typed with :mod:`qmtl.sdk.types`. With
``validate_responses=True`` (a debug aid) 2xx bodies are checked against their schemas.
:meth:`GatewayClient.request` is the low-level call that also returns status and headers
(``ETag``, ``X-QMTL-Cache`` …).
"""

from __future__ import annotations

import asyncio
import inspect
import json as jsonlib
import logging
import random
import time
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, Self, cast

import httpx

from qmtl.common import correlation, tracing
from qmtl.common.resilience import RetryPolicy

from .dag import Dag
from .errors import (
    ResponseValidationError,
    TransportError,
    parse_retry_after,
    problem_from_response,
)
from .types import (
    ActivationEnvelope,
    ActivationSet,
    ApplyResult,
    AuditPage,
    AuditRecord,
    DecisionEnvelope,
    DecisionState,
    EvaluationResult,
    GatewayStatus,
    Policy,
    PolicyList,
    QueueKeySpec,
    QueueList,
    StateHash,
    StrategyAck,
    StrategyStatus,
    StreamDescriptor,
    World,
    WorldList,
)

__all__ = ["DEFAULT_URL", "ApiResponse", "GatewayClient"]

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
ALLOW_LIVE_HEADER = "X-Allow-Live"
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)

TokenSource = str | Callable[[], str | Awaitable[str]] | None


@dataclass
class ApiResponse:
    """One answer: status, headers, decoded body (JSON, text or None) and correlation id."""

    status: int
    headers: httpx.Headers
    body: Any
    correlation_id: str | None
    attempts: int = 1
    elapsed: float = 0.0

    @property
    def etag(self) -> str | None:
        etag: str | None = self.headers.get("etag")
        return etag

    @property
    def cache(self) -> str | None:
        """``X-QMTL-Cache``: hit, miss, revalidated or safe-default (decide, activation)."""
        cache: str | None = self.headers.get("x-qmtl-cache")
        return cache


@dataclass
class _Stats:
    requests: int = 0
    retries: int = 0
    by_status: dict[int, int] = field(default_factory=dict)


class GatewayClient:
    """Async client of one Gateway.

    :param base_url: the Gateway (``http://127.0.0.1:8000`` is what ``qmtl up`` serves).
    :param token: a bearer JWT, or a callable (sync or async) returning one, called for every
        attempt (a retry gets a fresh token).
    :param timeout: seconds per attempt (connect, read, write).
    :param retries: how many times a retryable failure is retried.
    :param allow_live: send ``X-Allow-Live: true`` on every live-guarded call (the caller's
        explicit consent to calls that can switch a world to live); per call with ``allow_live=``.
    :param validate_responses: check 2xx bodies against their schemas (debug aid).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        token: TokenSource = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff_base: float = 0.2,
        backoff_max: float = 5.0,
        retry_after_max: float = 30.0,
        allow_live: bool = False,
        validate_responses: bool = False,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.allow_live = bool(allow_live)
        self.validate_responses = bool(validate_responses)
        self.retry_after_max = float(retry_after_max)
        self._policy = RetryPolicy(timeout=max(self.timeout, 0.001), retries=self.retries, backoff_base=backoff_base,
                                   backoff_max=backoff_max, rng=rng)
        default_headers = {"Accept": "application/json, application/problem+json", "User-Agent": "qmtl-sdk/1"}
        default_headers.update(headers or {})
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=httpx.Timeout(self.timeout), headers=default_headers,
                                       transport=transport)
        self.stats = _Stats()

    # -- lifecycle -----------------------------------------------------------------------
    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def http(self) -> httpx.AsyncClient:
        """The underlying ``httpx.AsyncClient`` (shared connection pool)."""
        return self._http

    # -- the one request path ------------------------------------------------------------
    async def _auth_headers(self) -> dict[str, str]:
        source = self.token
        token = source() if callable(source) else source
        if inspect.isawaitable(token):
            token = await token
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool,
        retry_503: bool | None = None,
        correlation_id: str | None = None,
        ok: Iterable[int] = (200, 201, 202, 204),
        schema: str | None = None,
        timeout: float | None = None,
    ) -> ApiResponse:
        """Send one call with the retry rules above; raise for a status not in ``ok``.

        ``retry_503`` defaults to ``idempotent``. ``schema`` names the file in
        ``specs/schemas/`` that a 2xx body must match when ``validate_responses`` is on.
        """
        cid = correlation_id or correlation.get() or correlation.new_correlation_id()
        query = {k: v for k, v in (params or {}).items() if v is not None}
        retry_503 = idempotent if retry_503 is None else retry_503
        delays = self._policy.delays()
        attempts = 0
        started = time.monotonic()
        ok_set = set(ok)
        while True:
            attempts += 1
            self.stats.requests += 1
            # The token per attempt: a retry after a wait (Retry-After, up to retry_after_max)
            # must not go out with a token that expired meanwhile.
            send_headers = {correlation.HEADER: cid, **(await self._auth_headers()), **(headers or {})}
            tracing.inject(send_headers)  # the caller's span, when there is one, continues at the Gateway
            try:
                resp = await self._http.request(
                    method, path, params=query, json=json, headers=send_headers,
                    timeout=httpx.Timeout(timeout) if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                )
            except httpx.TransportError as exc:
                retryable = idempotent or isinstance(exc, _NOT_SENT)
                delay = next(delays, None) if retryable else None
                if delay is None:
                    raise TransportError(
                        f"{method} {self.base_url}{path}: no answer after {attempts} attempt(s): {type(exc).__name__}: {exc}",
                        method=method, url=self.base_url + path, correlation_id=cid, attempts=attempts,
                    ) from exc
                log.debug("%s %s: %s; retry %d in %.2fs", method, path, type(exc).__name__, attempts, delay)
                self.stats.retries += 1
                await asyncio.sleep(delay)
                continue
            self.stats.by_status[resp.status_code] = self.stats.by_status.get(resp.status_code, 0) + 1
            body = _decode(resp)
            rcid = resp.headers.get(correlation.HEADER) or cid
            if resp.status_code in ok_set:
                if self.validate_responses and schema and 200 <= resp.status_code < 300:
                    _validate(schema, body, method, path)
                return ApiResponse(resp.status_code, resp.headers, body, rcid, attempts, time.monotonic() - started)
            error = problem_from_response(resp.status_code, resp.headers, body, method=method,
                                          url=self.base_url + path, correlation_id=rcid)
            if resp.status_code == 503 and retry_503:
                delay = next(delays, None)
                if delay is not None:
                    hinted = parse_retry_after(resp.headers.get("retry-after"))
                    if hinted is not None:
                        delay = max(delay, min(hinted, self.retry_after_max))
                    log.debug("%s %s: 503; retry %d in %.2fs", method, path, attempts, delay)
                    self.stats.retries += 1
                    await asyncio.sleep(delay)
                    continue
            raise error

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        # The body is JSON, checked against ``schema`` when one is named: the typed wrappers below
        # cast it to the TypedDict generated from that same schema (qmtl/sdk/types.py).
        return (await self.request(method, path, **kw)).body

    def _live(self, allow_live: bool | None) -> dict[str, str]:
        consent = self.allow_live if allow_live is None else allow_live
        return {ALLOW_LIVE_HEADER: "true"} if consent else {}

    # -- strategies ----------------------------------------------------------------------
    async def submit_strategy(
        self,
        dag: Dag | Mapping[str, Any],
        *,
        run_type: str = "dry-run",
        world_id: str | None = None,
        meta: Mapping[str, Any] | None = None,
        correlation_id: str | None = None,
    ) -> StrategyAck:
        """``POST /strategies``. ``dag`` is a :class:`Dag` (ids, CRC and encoding done here),
        a DAG as a dict (``{"nodes": [...]}``, ids already set), or a prepared submission body. A DAG already submitted raises :class:`Conflict`
        whose ``strategy_id`` is the first submission's. The ack's ``queue_map`` is also
        applied to the DAG's TagQueryNodes."""
        if isinstance(dag, Dag):
            body = dag.submission(run_type=run_type, world_id=world_id, meta=meta)
        elif "nodes" in dag and "dag_json" not in dag:
            body = _submission_of_dag_dict(dag, run_type=run_type, world_id=world_id, meta=meta)
        else:
            body = dict(dag)
        ack: StrategyAck = await self._call(
            "POST", "/strategies", json=body, idempotent=False, retry_503=True, ok=(202,),
            schema="strategy_ack.schema.json", correlation_id=correlation_id,
        )
        if isinstance(dag, Dag):
            for node in dag.tag_query_nodes():
                queues = (ack.get("queue_map") or {}).get(node.node_id)
                if queues:
                    node.update_queues(queues)
        return ack

    async def strategy_status(self, strategy_id: str, **kw: Any) -> StrategyStatus:
        """``GET /strategies/{id}/status``."""
        return cast(StrategyStatus, await self._call("GET", f"/strategies/{strategy_id}/status", idempotent=True,
                                schema="strategy_status.schema.json", **kw))

    async def wait_for_status(
        self,
        strategy_id: str,
        until: Sequence[str] = ("completed", "failed"),
        *,
        timeout: float = 30.0,
        interval: float = 0.2,
    ) -> StrategyStatus:
        """Poll the status until it is one of ``until``; TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            status = await self.strategy_status(strategy_id)
            if status["status"] in until:
                return status
            if time.monotonic() >= deadline:
                raise TimeoutError(f"strategy {strategy_id} is still {status['status']!r} after {timeout}s")
            await asyncio.sleep(interval)

    # -- queues ----------------------------------------------------------------------------
    async def queues_by_tag(self, tags: Iterable[str], interval: int, match_mode: str = "any", **kw: Any) -> QueueList:
        """``GET /queues/by_tag``: queues carrying any (or all) of ``tags`` at ``interval``."""
        params: dict[str, str | int] = {"tags": _tags_param(tags), "interval": int(interval), "match_mode": match_mode}
        return cast(QueueList, await self._call("GET", "/queues/by_tag", params=params, idempotent=True, schema="queue_list.schema.json", **kw))

    async def watch_queues(self, tags: Iterable[str], interval: int, match_mode: str = "any", *,
                           correlation_id: str | None = None) -> AsyncIterator[QueueList]:
        """(Legacy) ``GET /queues/watch``: the current queue list, then one per change,
        until the server ends the stream. Prefer :class:`qmtl.sdk.EventStream`."""
        cid = correlation_id or correlation.get() or correlation.new_correlation_id()
        headers = {correlation.HEADER: cid, "Accept": "application/x-ndjson, application/problem+json", **(await self._auth_headers())}
        params: dict[str, str | int] = {"tags": _tags_param(tags), "interval": int(interval), "match_mode": match_mode}
        timeout = httpx.Timeout(self.timeout, read=None)
        try:
            async with self._http.stream("GET", "/queues/watch", params=params, headers=headers, timeout=timeout) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise problem_from_response(resp.status_code, resp.headers, _decode(resp), method="GET",
                                                url=self.base_url + "/queues/watch", correlation_id=cid)
                async for line in resp.aiter_lines():
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        doc = jsonlib.loads(line)
                    except ValueError:
                        log.warning("watch_queues: skipping a line that is not JSON: %r", line[:200])
                        continue
                    if isinstance(doc, dict) and isinstance(doc.get("queues"), list):
                        yield cast(QueueList, doc)  # the shape the server sends (queue_list.schema.json)
        except httpx.TransportError as exc:
            raise TransportError(f"GET {self.base_url}/queues/watch: {type(exc).__name__}: {exc}", method="GET",
                                 url=self.base_url + "/queues/watch", correlation_id=cid) from exc

    async def queues_state_hash(self, tags: Iterable[str], interval: int, match_mode: str = "any", **kw: Any) -> StateHash:
        params: dict[str, str | int] = {"tags": _tags_param(tags), "interval": int(interval), "match_mode": match_mode}
        return cast(StateHash, await self._call("GET", "/queues/state_hash", params=params, idempotent=True, schema="state_hash.schema.json", **kw))

    # -- events ------------------------------------------------------------------------------
    async def subscribe(
        self,
        topics: Iterable[str],
        *,
        world_id: str | None = None,
        strategy_id: str | None = None,
        queue_keys: Iterable[QueueKeySpec | Mapping[str, Any]] | None = None,
        **kw: Any,
    ) -> StreamDescriptor:
        """``POST /events/subscribe``: where to connect and a short-lived token.
        See :class:`qmtl.sdk.EventStream`, which uses it, refreshes it and reconnects."""
        body: dict[str, Any] = {"topics": list(dict.fromkeys(topics))}
        if world_id is not None:
            body["world_id"] = world_id
        if strategy_id is not None:
            body["strategy_id"] = strategy_id
        if queue_keys:
            body["queue_keys"] = [_queue_key_body(k) for k in queue_keys]
        # Issuing a descriptor changes nothing on the server: safe to retry.
        return cast(StreamDescriptor, await self._call("POST", "/events/subscribe", json=body, idempotent=True,
                                schema="stream_descriptor.schema.json", **kw))

    async def jwks(self, **kw: Any) -> dict[str, Any]:
        return cast(dict[str, Any], await self._call("GET", "/events/jwks", idempotent=True, schema="jwks.schema.json", **kw))

    # -- worlds ------------------------------------------------------------------------------
    async def list_worlds(self, *, limit: int | None = None, cursor: str | None = None, **kw: Any) -> WorldList:
        return cast(WorldList, await self._call("GET", "/worlds", params={"limit": limit, "cursor": cursor}, idempotent=True,
                                schema="world_list.schema.json", **kw))

    async def iter_worlds(self, *, page_size: int = 100) -> AsyncIterator[World]:
        """Every world the caller may read, page by page."""
        cursor: str | None = None
        while True:
            page = await self.list_worlds(limit=page_size, cursor=cursor)
            for world in page["worlds"]:
                yield world
            cursor = page.get("next_cursor")
            if not cursor:
                return

    async def create_world(
        self,
        world_id: str,
        name: str | None = None,
        *,
        description: str | None = None,
        owner: str | None = None,
        labels: Mapping[str, str] | None = None,
        allow_live: bool | None = None,
        circuit_breaker: bool | None = None,
        consent_live: bool | None = None,
        **kw: Any,
    ) -> World:
        """``POST /worlds``. ``allow_live=True`` lets the world ever decide ``live`` and is
        live-guarded: pass ``consent_live=True`` (or construct the client with
        ``allow_live=True``) to send the consent header."""
        body = _drop_none({
            "world_id": world_id, "name": name or world_id, "description": description, "owner": owner,
            "labels": dict(labels) if labels is not None else None, "allow_live": allow_live,
            "circuit_breaker": circuit_breaker,
        })
        return cast(World, await self._call("POST", "/worlds", json=body, headers=self._live(consent_live), idempotent=False,
                                ok=(201,), schema="world.schema.json", **kw))

    async def get_world(self, world_id: str, **kw: Any) -> World:
        return cast(World, await self._call("GET", f"/worlds/{world_id}", idempotent=True, schema="world.schema.json", **kw))

    async def update_world(self, world_id: str, *, consent_live: bool | None = None, correlation_id: str | None = None,
                           **changes: Any) -> World:
        """``PUT /worlds/{id}`` with the members to change (name, description, owner,
        labels, state, allow_live, circuit_breaker). Live-guarded when it can enable live."""
        return cast(World, await self._call("PUT", f"/worlds/{world_id}", json=changes, headers=self._live(consent_live),
                                idempotent=True, schema="world.schema.json", correlation_id=correlation_id))

    async def delete_world(self, world_id: str, **kw: Any) -> None:
        await self._call("DELETE", f"/worlds/{world_id}", idempotent=True, ok=(200, 204), **kw)

    async def list_policies(self, world_id: str, **kw: Any) -> PolicyList:
        return cast(PolicyList, await self._call("GET", f"/worlds/{world_id}/policies", idempotent=True, schema="policy_list.schema.json", **kw))

    async def create_policy(self, world_id: str, yaml: str, *, set_default: bool = False, consent_live: bool | None = None,
                            **kw: Any) -> Policy:
        """``POST /worlds/{id}/policies``: a new version from YAML text (``set_default`` makes it the default)."""
        return cast(Policy, await self._call("POST", f"/worlds/{world_id}/policies", json={"yaml": yaml, "set_default": bool(set_default)},
                                headers=self._live(consent_live), idempotent=False, ok=(201,), schema="policy.schema.json", **kw))

    async def get_policy(self, world_id: str, version: int, **kw: Any) -> Policy:
        return cast(Policy, await self._call("GET", f"/worlds/{world_id}/policies/{int(version)}", idempotent=True,
                                schema="policy.schema.json", **kw))

    async def set_default_policy(self, world_id: str, version: int, *, consent_live: bool | None = None, **kw: Any) -> World:
        return cast(World, await self._call("POST", f"/worlds/{world_id}/set-default", params={"v": int(version)},
                                headers=self._live(consent_live), idempotent=True, schema="world.schema.json", **kw))

    async def policy_state_hash(self, world_id: str, **kw: Any) -> StateHash:
        return cast(StateHash, await self._call("GET", f"/worlds/{world_id}/policy/state_hash", idempotent=True, schema="state_hash.schema.json", **kw))

    async def record_observation(self, world_id: str, *, data_end: str, samples: int, metrics: Mapping[str, float],
                                 consent_live: bool | None = None, **kw: Any) -> DecisionState:
        """``PUT /worlds/{id}/observations`` (advances the hysteresis: never retried once sent)."""
        body = {"data_end": data_end, "samples": int(samples), "metrics": dict(metrics)}
        return cast(DecisionState, await self._call("PUT", f"/worlds/{world_id}/observations", json=body, headers=self._live(consent_live),
                                idempotent=False, schema="decision_state.schema.json", **kw))

    async def get_observation(self, world_id: str, **kw: Any) -> DecisionState:
        return cast(DecisionState, await self._call("GET", f"/worlds/{world_id}/observations", idempotent=True, schema="decision_state.schema.json", **kw))

    async def decide(self, world_id: str, *, as_of: str | None = None, **kw: Any) -> DecisionEnvelope:
        """``GET /worlds/{id}/decide``: the world's effective mode (``backtest`` as the safe
        default when WorldService cannot answer — see ``reason``)."""
        return cast(DecisionEnvelope, await self._call("GET", f"/worlds/{world_id}/decide", params={"as_of": as_of}, idempotent=True,
                                schema="decision_envelope.schema.json", **kw))

    async def get_activation(self, world_id: str, strategy_id: str, side: str, **kw: Any) -> ActivationEnvelope:
        """``GET /worlds/{id}/activation``: unknown or unavailable reads ``active: false, weight: 0``."""
        return cast(ActivationEnvelope, await self._call("GET", f"/worlds/{world_id}/activation", params={"strategy_id": strategy_id, "side": side},
                                idempotent=True, schema="activation_envelope.schema.json", **kw))

    async def override_activation(
        self,
        world_id: str,
        strategy_id: str,
        side: str,
        active: bool,
        *,
        weight: float | None = None,
        reason: str | None = None,
        if_match: str | None = None,
        consent_live: bool | None = None,
        **kw: Any,
    ) -> ActivationEnvelope:
        """``PUT /worlds/{id}/activation`` (operator). Activating is live-guarded."""
        body = _drop_none({"strategy_id": strategy_id, "side": side, "active": bool(active), "weight": weight, "reason": reason})
        headers = self._live(consent_live)
        if if_match is not None:
            headers["If-Match"] = if_match
        return cast(ActivationEnvelope, await self._call("PUT", f"/worlds/{world_id}/activation", json=body, headers=headers, idempotent=True,
                                schema="activation_envelope.schema.json", **kw))

    async def list_activations(self, world_id: str, **kw: Any) -> ActivationSet:
        """``GET /worlds/{id}/activations``: the whole set and its ``state_hash``."""
        return cast(ActivationSet, await self._call("GET", f"/worlds/{world_id}/activations", idempotent=True, schema="activation_set.schema.json", **kw))

    async def activation_state_hash(self, world_id: str, **kw: Any) -> StateHash:
        return cast(StateHash, await self._call("GET", f"/worlds/{world_id}/activation/state_hash", idempotent=True,
                                schema="state_hash.schema.json", **kw))

    async def evaluate(self, world_id: str, strategies: Sequence[Mapping[str, Any]], *, as_of: str | None = None,
                       **kw: Any) -> EvaluationResult:
        """``POST /worlds/{id}/evaluate``: a plan, changing nothing (so it is retried)."""
        body = _drop_none({"strategies": [dict(s) for s in strategies], "as_of": as_of})
        return cast(EvaluationResult, await self._call("POST", f"/worlds/{world_id}/evaluate", json=body, idempotent=True,
                                schema="evaluation_result.schema.json", **kw))

    async def apply(self, world_id: str, plan: Mapping[str, Any], *, run_id: str | None = None,
                    consent_live: bool | None = None, **kw: Any) -> ApplyResult:
        """``POST /worlds/{id}/apply`` — 2-phase, idempotent by ``run_id`` (generated when not
        given, and the same on every retry). Always live-guarded: without consent
        (``consent_live=True`` or a client made with ``allow_live=True``) it raises
        :class:`LiveGuardRefused`. Another apply in flight raises :class:`Conflict`."""
        run_id = run_id or f"run-{uuid.uuid4().hex[:20]}"
        body = {"run_id": run_id, "plan": {k: list(v) for k, v in plan.items() if k in ("activate", "deactivate")}}
        return cast(ApplyResult, await self._call("POST", f"/worlds/{world_id}/apply", json=body, headers=self._live(consent_live),
                                idempotent=True, schema="apply_result.schema.json", **kw))

    async def get_audit(self, world_id: str, *, limit: int | None = None, cursor: str | None = None, **kw: Any) -> AuditPage:
        return cast(AuditPage, await self._call("GET", f"/worlds/{world_id}/audit", params={"limit": limit, "cursor": cursor},
                                idempotent=True, schema="audit_page.schema.json", **kw))

    async def iter_audit(self, world_id: str, *, page_size: int = 100) -> AsyncIterator[AuditRecord]:
        """The world's audit records, newest first, page by page."""
        cursor: str | None = None
        while True:
            page = await self.get_audit(world_id, limit=page_size, cursor=cursor)
            for record in page["records"]:
                yield record
            cursor = page.get("next_cursor")
            if not cursor:
                return

    # -- operations ----------------------------------------------------------------------------
    async def status(self, **kw: Any) -> GatewayStatus:
        return cast(GatewayStatus, await self._call("GET", "/status", idempotent=True, schema="gateway_status.schema.json", **kw))

    async def health(self, **kw: Any) -> dict[str, Any]:
        return cast(dict[str, Any], await self._call("GET", "/health", idempotent=True, **kw))


# -- helpers -------------------------------------------------------------------------------------
def _decode(resp: httpx.Response) -> Any:
    if not resp.content:
        return None
    ctype = resp.headers.get("content-type", "")
    if "json" in ctype:
        try:
            return resp.json()
        except ValueError:
            return resp.text
    return resp.text


def _tags_param(tags: Iterable[str]) -> str:
    if isinstance(tags, str):
        return tags
    values = list(tags)
    if not values:
        raise ValueError("at least one tag is needed")
    return ",".join(values)


def _queue_key_body(key: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any]:
    if isinstance(key, Mapping):
        body = {"tags": list(key["tags"]), "interval": int(key["interval"])}
        if key.get("match_mode"):
            body["match_mode"] = key["match_mode"]
        return body
    tags, interval, *rest = key
    body = {"tags": list(tags), "interval": int(interval)}
    if rest and rest[0]:
        body["match_mode"] = rest[0]
    return body


def _submission_of_dag_dict(dag: Mapping[str, Any], *, run_type: str, world_id: str | None,
                            meta: Mapping[str, Any] | None) -> dict[str, Any]:
    import base64

    from qmtl.common.crc import crc32_of_node_ids

    text = jsonlib.dumps(dag, separators=(",", ":"), ensure_ascii=False)
    body: dict[str, Any] = {
        "dag_json": base64.b64encode(text.encode()).decode("ascii"),
        "meta": dict(meta) if meta is not None else None,
        "run_type": run_type,
        "node_ids_crc32": crc32_of_node_ids(str(n.get("node_id", "")) for n in dag.get("nodes") or []),
    }
    if world_id is not None:
        body["world_id"] = world_id
    return body


def _drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _validate(schema_file: str, body: Any, method: str, path: str) -> None:
    from qmtl.contracts.events import schema_validator

    validator = schema_validator(schema_file)
    if not validator.is_valid(body):
        errors = validator.errors(body)
        first = errors[0] if errors else {"message": "invalid", "pointer": ""}
        raise ResponseValidationError(
            f"{method} {path}: the answer does not conform to {schema_file}: {first.get('message')} at {first.get('pointer') or '/'}",
            errors=errors, body=body,
        )

