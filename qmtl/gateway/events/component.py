"""The Gateway's ``events`` component: descriptors and tokens, the ControlBus consumer,
the state store, the fan-out hub and the WebSocket routes — one relay path for every
source (ControlBus, ``/callbacks/dag-event``, and local frames from ingest).

API used by the rest of the Gateway:

* ``ws_routes()`` — ``/ws/evt`` and ``/ws`` (Starlette ``WebSocketRoute``\\ s);
* ``await relay_local(type, data, *, key, world_id=None)`` — a frame that does not come
  from the ControlBus (ingest ``progress``/``queue_map``, callback ``sentinel_weight`` and
  ``queue_update``, or a versioned envelope as ``activation_updated``/``policy_updated``);
* ``state_hash(topic, ...)`` / ``await resolved_state_hash(...)`` — the probes;
* ``await describe(identity, body)`` — the ``POST /events/subscribe`` descriptor;
* ``on_world_change(listener)`` — ``listener(WorldChange)`` is called for every
  PolicyUpdated / ActivationUpdated applied (from the bus, a rebuild, a seed or a callback),
  whatever its outcome (a duplicate of a state seeded from WorldService still means the
  world changed recently); the worlds proxy drops its cached entries of the world.
* ``queue_feed`` — the relay's queue sets per key for ``GET /queues/watch`` (:mod:`.feed`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from starlette.routing import WebSocketRoute

from qmtl.bus.base import TOPIC_ACTIVATION, TOPIC_POLICY, TOPIC_QUEUES, ControlBus
from qmtl.common import tracing
from qmtl.common.cache import SingleFlight
from qmtl.common.errors import BadRequest, ServiceError, ServiceUnavailable, Unprocessable
from qmtl.common.labels import BoundedLabel
from qmtl.contracts.constants import DEFAULT_MATCH_MODE, StreamTopic, upstream_path
from qmtl.contracts.events import event_validators, schema_validator
from qmtl.gateway.backends import Backend
from qmtl.store import Database

from . import state as st
from .consumer import ControlBusConsumer
from .feed import QueueFeed
from .hub import (
    KIND_ACTIVATION,
    KIND_INGEST,
    KIND_POLICY,
    KIND_QUEUES,
    KIND_SENTINEL,
    Hub,
    Subscriber,
)
from .memory import MemoryTrimmer
from .metrics import WS_ROUTES, EventMetrics
from .tokens import TOPIC_ALIASES, InvalidToken, Tokens, normalise_topics
from .ws import CLOSE_POLICY, CLOSE_TRY_AGAIN, ConnectionCaps, StreamEndpoint, StreamRefused

if TYPE_CHECKING:
    from qmtl.common.config import Config
    from qmtl.gateway.auth import Authenticator

log = logging.getLogger(__name__)

_TOPIC_OF_TYPE = {"activation_updated": TOPIC_ACTIVATION, "policy_updated": TOPIC_POLICY}
_LOCAL_TYPES = ("progress", "queue_map")


@dataclass(frozen=True)
class WorldChange:
    """One PolicyUpdated / ActivationUpdated applied by this Gateway."""

    topic: str  # control.policy | control.activation
    world_id: str
    outcome: str  # applied | duplicate | stale (qmtl.gateway.events.state)
    source: str  # controlbus | rebuild | worldservice | local | callback
    policy_version: int | None = None


WorldChangeListener = Callable[[WorldChange], None]


def generated_instance_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname() or "host")[:40]
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def ws_base(public_url: str) -> str:
    if public_url.startswith("https://"):
        return "wss://" + public_url[len("https://"):]
    if public_url.startswith("http://"):
        return "ws://" + public_url[len("http://"):]
    return public_url


class EventsComponent:
    close_grace = 2.0  # seconds to get a close frame (4008/1001) out to a client

    def __init__(self, config: Config, *, bus: ControlBus, db: Database, registry: CollectorRegistry, auth: Authenticator,
                 worldservice: Backend, dagmanager: Backend, tracer_provider: Any = None,
                 wall: Callable[[], float] = time.time) -> None:
        cfg = config.gateway.events
        self.cfg = cfg
        self.replicated = config.controlbus.kind == "kafka"  # replicas in separate processes share the bus
        self.auth = auth
        self.worldservice, self.dagmanager = worldservice, dagmanager
        self.instance_id = cfg.instance_id or generated_instance_id()
        self.consumer_id = f"gateway-{self.instance_id}"
        self.public_url = config.gateway_public_url()
        self.metrics = EventMetrics.create(registry)
        self.sentinel_label = BoundedLabel(config.gateway.metric_label_cap)  # sentinel ids come from callers
        self.tokens = Tokens(
            signing_keys=list(cfg.signing_keys), data_dir=config.data_dir, token_ttl=cfg.token_ttl,
            algorithm=cfg.algorithm, issuer=self.public_url, store=self._key_store(db),
        )
        self.state = st.StateStore(max_skew=config.gateway.callbacks.max_clock_skew)
        self.queue_feed = QueueFeed(self.state, self._reconcile_queues, wall)
        self.hub = Hub(
            self.metrics, source=f"qmtl.gateway/{self.instance_id}", queue_size=cfg.client_queue_size,
            replay_size=cfg.replay_buffer, heartbeat_interval=cfg.heartbeat_interval, trimmer=MemoryTrimmer(),
        )
        self.consumer = ControlBusConsumer(
            bus, self._apply_from_bus, consumer_id=self.consumer_id, epoch=self.hub.epoch, metrics=self.metrics,
            tracer_provider=tracer_provider,
        )
        auth_cfg = config.gateway.auth
        self.caps = ConnectionCaps(cfg.max_connections, cfg.max_connections_per_subject,
                                   exempt_subject=auth_cfg.dev_subject if auth_cfg.mode == "dev" else None)
        self._frame_schema = schema_validator("ws_frame.schema.json")
        self.metrics.state_hash_mismatch.set_function(self.state.mismatched_worlds)
        self._resolving: SingleFlight[tuple] = SingleFlight()
        self._seeded_worlds: set[str] = set()
        self._seeding: SingleFlight[str] = SingleFlight()
        self._world_listeners: list[WorldChangeListener] = []
        self._handled_children: dict[tuple[str, str, str], Any] = {}

    def on_world_change(self, listener: WorldChangeListener) -> Callable[[], None]:
        """Call ``listener`` for every world event applied; returns the unsubscribe function."""
        self._world_listeners.append(listener)
        return lambda: self._world_listeners.remove(listener) if listener in self._world_listeners else None

    def _world_changed(self, topic: str, event: Mapping[str, Any], outcome: str, source: str) -> None:
        change = WorldChange(topic, event["world_id"], outcome, source, event.get("policy_version"))
        for listener in tuple(self._world_listeners):
            try:
                listener(change)
            except Exception:  # one listener failing must not stop the relay
                log.exception("world-change listener %r failed for %s", listener, change)

    def _key_store(self, db: Database) -> Any:
        """``gateway.events.key_store``: ``database`` (default unless ``signing_keys`` lists
        files), ``files`` or ``generated``; see :mod:`.tokens`."""
        kind = self.cfg.key_store
        if kind == "auto":
            kind = "files" if self.cfg.signing_keys else "database"
        if kind == "files" and not self.cfg.signing_keys:
            raise ValueError("gateway.events.key_store is 'files' but gateway.events.signing_keys lists none")
        if kind != "database":
            return None
        from .keystore import DatabaseKeyStore

        return DatabaseKeyStore(db, algorithm=self.cfg.algorithm, token_ttl=self.cfg.token_ttl, owner=self.consumer_id,
                                refresh=self.cfg.key_refresh)

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        await self.tokens.start()
        log.info("event stream: consumer %s, signing key %s (%s) from %s", self.consumer_id, self.tokens.ring.signer.kid,
                 self.tokens.algorithm, self.tokens.source)
        if not self.tokens.shared:
            # On the Kafka bus (separate processes, maybe replicas) this is loud: a sibling
            # replica's /ws/evt tokens are refused here (and ours there). Embedded (one
            # process, in-process bus) it is how things are meant to be: said at INFO.
            log.log(logging.WARNING if self.replicated else logging.INFO,
                    "event-stream signing keys are NOT shared with other Gateway replicas: %s", self.tokens.sharing_note())
        await self.hub.start()
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.hub.stop()
        await self.tokens.stop()

    def ws_routes(self) -> list[WebSocketRoute]:
        return [
            WebSocketRoute(route, StreamEndpoint(self, route, legacy=route != "/ws/evt")) for route in WS_ROUTES
        ]

    @property
    def ready(self) -> bool:
        return self.consumer.ready.is_set()

    async def wait_ready(self, timeout: float | None = None) -> bool:
        if self.ready:
            return True
        try:
            await asyncio.wait_for(self.consumer.ready.wait(), self.cfg.ready_timeout if timeout is None else timeout)
            return True
        except TimeoutError:
            return False

    # -- the relay path ------------------------------------------------------------------
    def _apply_from_bus(self, topic: str, event: dict, relay: bool) -> str:
        return self.apply_event(topic, event, relay=relay, source="controlbus" if relay else "rebuild")[0]

    def apply_event(self, topic: str, event: Mapping[str, Any], *, relay: bool = True, source: str = "controlbus") -> tuple[str, int]:
        """Apply one (already validated) versioned envelope; relay it when it changed the
        state. Returns ``(outcome, subscribers reached)``. Never awaits."""
        t0 = time.perf_counter()
        delivered = 0
        if topic == TOPIC_ACTIVATION:
            outcome, h = self.state.apply_activation(event, with_hash=relay)
            if outcome == st.APPLIED and relay:
                w = event["world_id"]
                delivered = self.hub.publish(
                    "activation_updated", event, (KIND_ACTIVATION, w, None, None), subject=w, extensions={"statehash": h, **tracing.frame_extensions()}
                )
        elif topic == TOPIC_POLICY:
            outcome, h = self.state.apply_policy(event)
            if outcome == st.APPLIED and relay:
                w = event["world_id"]
                delivered = self.hub.publish("policy_updated", event, (KIND_POLICY, w, None, None), subject=w,
                                             extensions={"statehash": h, **tracing.frame_extensions()})
        elif topic == TOPIC_QUEUES:
            key = st.normalise_queue_key(event["tags"], event["interval"], event.get("match_mode"))
            outcome, delivered = self._apply_queues(key, event["queues"], etag=event.get("etag"), ts=event.get("ts"), relay=relay)
        else:
            raise ValueError(f"no relay rule for topic {topic!r}")
        if topic != TOPIC_QUEUES and self._world_listeners:
            self._world_changed(topic, event, outcome, source)
        self._handled(topic, outcome, source).inc()
        if relay:
            self.metrics.relay_seconds.observe(time.perf_counter() - t0)
        return outcome, delivered

    def _handled(self, topic: str, outcome: str, source: str) -> Any:
        """controlbus_events' child for these labels (each from a small fixed set), looked up once."""
        key = (topic, outcome, source)
        child = self._handled_children.get(key)
        if child is None:
            child = self._handled_children[key] = self.metrics.controlbus_events.labels(topic, outcome, source)
        return child

    def _apply_queues(self, key: tuple, queues: Iterable[str], *, etag: str | None, ts: Any, relay: bool) -> tuple[str, int]:
        outcome, h = self.state.apply_queues(key, queues, etag=etag, ts=ts)
        delivered = 0
        if outcome == st.APPLIED:
            self.queue_feed.applied(key)
        if outcome == st.APPLIED and relay:
            tags, interval, mode = key
            entry = self.state.queues[key]
            data: dict[str, Any] = {"tags": list(tags), "interval": interval, "queues": list(entry.queues), "match_mode": mode}
            if entry.etag:
                data["etag"] = entry.etag
            delivered = self.hub.publish(
                "queue_update", data, (KIND_QUEUES, None, key, None), subject=f"{st.bus_key_of(key)}/{mode}",
                extensions={"statehash": h, **tracing.frame_extensions()}
            )
        return outcome, delivered

    def apply_queue_update(self, data: Mapping[str, Any], *, source: str = "callback") -> tuple[str, int]:
        """The legacy ``queue_update`` body ``{tags, interval, queues, match_mode?, etag?, ts?}``."""
        key = st.normalise_queue_key(data["tags"], data["interval"], data.get("match_mode"))
        outcome, delivered = self._apply_queues(key, data["queues"], etag=data.get("etag"), ts=data.get("ts"), relay=True)
        self._handled(TOPIC_QUEUES, outcome, source).inc()
        return outcome, delivered

    def _reconcile_queues(self, key: tuple, queues: Iterable[str], *, etag: str | None, ts: Any) -> str:
        """A DAG Manager answer offered by a ``/queues/watch`` reconcile (see :mod:`.feed`)."""
        outcome, _delivered = self._apply_queues(key, queues, etag=etag, ts=ts, relay=True)
        self._handled(TOPIC_QUEUES, outcome, "reconcile").inc()
        return outcome

    def apply_sentinel_weight(self, data: Mapping[str, Any], *, source: str = "callback") -> tuple[str, int]:
        """``{sentinel_id | version, weight, ts?}`` → gauge, ``sentinel_weight`` frame, skew."""
        sid = data.get("sentinel_id") or data.get("version")
        if not isinstance(sid, str) or not sid:
            raise ValueError("sentinel_weight needs sentinel_id (or version)")
        weight = float(data["weight"])
        if not 0.0 <= weight <= 1.0:
            raise ValueError("sentinel weight must be within 0..1")
        outcome = self.state.apply_sentinel(sid, weight, data.get("ts"))
        delivered = 0
        if outcome == st.APPLIED:
            label = self.sentinel_label(sid)
            self.metrics.sentinel_ratio.labels(label).set(weight)
            frame: dict[str, Any] = {"sentinel_id": sid, "weight": weight}
            for extra in ("version", "ts"):
                if isinstance(data.get(extra), str):
                    frame[extra] = data[extra]
            delivered = self.hub.publish("sentinel_weight", frame, (KIND_SENTINEL, None, None, None), subject=sid,
                                         extensions=tracing.frame_extensions() or None)
            changed_at = st.parse_ts(data.get("ts"))
            if changed_at is not None:
                self.metrics.sentinel_skew_seconds.observe(max(0.0, time.time() - changed_at))
        self._handled("sentinel", outcome, source).inc()
        return outcome, delivered

    async def relay_local(self, type: str, data: Mapping[str, Any], *, key: str, world_id: str | None = None) -> int:
        """Relay a frame that does not come from the ControlBus; returns how many
        subscribers it reached (0 for a duplicate or stale state event). Raises
        ValueError when ``data`` does not fit the frame type."""
        if type in _TOPIC_OF_TYPE:
            topic = _TOPIC_OF_TYPE[type]
            event_validators().validate(topic, data)
            return self.apply_event(topic, data, source="local")[1]
        if type == "queue_update":
            self._check_frame(type, {"match_mode": DEFAULT_MATCH_MODE, **data})
            return self.apply_queue_update(data, source="local")[1]
        if type == "sentinel_weight":
            return self.apply_sentinel_weight(data, source="local")[1]
        if type not in _LOCAL_TYPES:
            raise ValueError(f"cannot relay frames of type {type!r}")
        self._check_frame(type, data)
        strategy_id = data.get("strategy_id") if isinstance(data.get("strategy_id"), str) else None
        return self.hub.publish(type, dict(data), (KIND_INGEST, world_id, None, strategy_id or key), subject=key)

    def _check_frame(self, type_: str, data: Mapping[str, Any]) -> None:
        probe = {
            "specversion": "1.0", "id": "x", "source": "qmtl.gateway", "type": type_, "time": "2026-01-01T00:00:00Z",
            "datacontenttype": "application/json", "data": dict(data),
        }
        if not self._frame_schema.is_valid(probe):
            errors = self._frame_schema.errors(probe)
            first = errors[0] if errors else {"message": "invalid", "pointer": "/data"}
            raise ValueError(f"invalid {type_} frame: {first.get('message')} at {first.get('pointer')}")

    # -- state hashes (probes) ---------------------------------------------------------
    def state_hash(self, topic: str, *, world_id: str | None = None, tags: Any = None, interval: Any = None,
                   match_mode: str | None = None) -> str | None:
        """The hash the stream sends for this state now (None: queue key not held)."""
        if topic == StreamTopic.ACTIVATION:
            return self.state.activation_hash(world_id or "")
        if topic == StreamTopic.POLICY:
            return self.state.policy_hash(world_id or "")
        if TOPIC_ALIASES.get(topic, topic) == StreamTopic.QUEUES:
            return self.state.queue_hash(st.normalise_queue_key(tags, interval, match_mode))
        raise ValueError(f"unknown topic {topic!r}")

    async def resolved_state_hash(self, topic: str, **kw: Any) -> str:
        if not await self.wait_ready():
            raise ServiceUnavailable("the Gateway is still rebuilding its event state", retry_after=2)
        if TOPIC_ALIASES.get(topic, topic) == StreamTopic.QUEUES:
            key = st.normalise_queue_key(kw.get("tags") or (), kw.get("interval"), kw.get("match_mode"))
            await self.resolve_queue_keys([key])
            h = self.state.queue_hash(key)
            assert h is not None
            return h
        h = self.state_hash(topic, **kw)
        assert h is not None
        return h

    async def resolve_queue_keys(self, keys: Iterable[tuple]) -> None:
        """Fetch from the DAG Manager the queue set of every key not held yet (which also
        makes the DAG Manager watch it, so its changes are published). Raises
        ServiceUnavailable when the DAG Manager cannot answer."""
        for key in keys:
            if self.state.queue_hash(key) is not None:
                continue
            await self._resolving.do(key, functools.partial(self._fetch_queue_set, key))

    async def _fetch_queue_set(self, key: tuple) -> None:
        from qmtl.gateway.backends import BackendUnavailable
        from qmtl.gateway.ingest.queues import _problem_detail

        tags, interval, mode = key
        try:
            resp = await self.dagmanager.request(
                "GET", "/queues/by_tag", params={"tags": ",".join(tags), "interval": interval, "match_mode": mode}
            )
        except BackendUnavailable as exc:
            raise ServiceUnavailable(f"the queue set of {list(tags)}/{interval}/{mode} is unknown here and {exc}", retry_after=2) from exc
        if resp.status_code in (400, 422):  # the query itself is refused: the caller's 400, not an outage
            raise BadRequest(f"the DAG Manager refused the queue key {list(tags)}/{interval}/{mode}: {_problem_detail(resp)}",
                             ext={"errors": [{"parameter": "tags", "message": _problem_detail(resp)}]})
        if resp.status_code != 200:
            raise ServiceUnavailable(f"the DAG Manager answered HTTP {resp.status_code} for the queue set of {list(tags)}/{interval}/{mode}", retry_after=2)
        body = resp.json()
        if self.state.queue_hash(key) is None:  # an event may have landed meanwhile
            self._apply_queues(key, body.get("queues") or [], etag=body.get("etag"), ts=None, relay=True)
            self.metrics.controlbus_events.labels(TOPIC_QUEUES, st.APPLIED, "dagmanager").inc()

    async def resolve_world(self, world_id: str) -> None:
        """Seed a world's activation and policy state from WorldService, once per process.

        The ControlBus alone cannot always rebuild a world: the in-process bus keeps
        nothing across a restart, and ``control.activation`` is compacted by ``world_id``,
        so a replay after compaction holds only each world's latest entry. Before the first
        snapshot of a world, the Gateway therefore reads the world's whole activation set
        and its policy versions from WorldService (its source of truth) and applies them as
        events: entries it already holds (same etag) are no-ops, older ones never overwrite
        newer ones, and anything new is relayed to the world's subscribers too.
        When WorldService cannot answer, the state held from the bus is served (unknown
        activation reads as inactive, so orders stay gated off) and seeding is tried again
        on the next subscription to the world."""
        if world_id in self._seeded_worlds:
            return
        await self._seeding.do(world_id, lambda: self._seed_world(world_id))

    async def _seed_world(self, world_id: str) -> None:
        from qmtl.gateway.auth import Identity
        from qmtl.gateway.backends import BackendUnavailable

        # The Gateway reads as itself; WorldService trusts it by the service token.
        headers = Identity("qmtl-gateway", {"sub": "qmtl-gateway", "world_roles": {world_id: ["reader"]}}).forward_headers()
        try:
            acts = await self.worldservice.request("GET", upstream_path("list_activations", world_id=world_id), headers=headers)
            pols = await self.worldservice.request("GET", upstream_path("list_policies", world_id=world_id), headers=headers)
        except BackendUnavailable as exc:
            # Serve what is held (unknown activation reads as inactive: orders gated off)
            # and try again on the next subscription to this world.
            log.warning("world %s not seeded from WorldService (%s); serving the state held from the bus", world_id, exc)
            self.metrics.controlbus_events.labels(TOPIC_ACTIVATION, "seed_failed", "worldservice").inc()
            return
        if acts.status_code == 404 or pols.status_code == 404:
            self._seeded_worlds.add(world_id)  # no such world: nothing to hold
            return
        if acts.status_code != 200 or pols.status_code != 200:
            log.warning("world %s not seeded: WorldService answered HTTP %s/%s", world_id, acts.status_code, pols.status_code)
            return
        activation_set = acts.json()
        if activation_set.get("frozen"):
            # An apply is in flight: WorldService shows every entry gated off. Those reads are
            # not changes (no events follow for entries the apply leaves alone), so they must
            # not enter the state; serve what is held and seed on a later subscription.
            log.info("world %s is frozen by an apply in flight; seeding deferred", world_id)
            return
        validate = event_validators()
        for entry in activation_set.get("activations") or []:
            event = {"type": "ActivationUpdated", "version": 1}
            event.update({k: entry[k] for k in ("world_id", "strategy_id", "side", "active", "weight", "etag", "ts", "run_id")
                          if entry.get(k) is not None})
            validate(TOPIC_ACTIVATION, event)
            self.apply_event(TOPIC_ACTIVATION, event, source="worldservice")
        for summary in pols.json().get("policies") or []:
            event = {"type": "PolicyUpdated", "version": 1, "world_id": world_id, "policy_version": summary["version"],
                     "checksum": summary["checksum"], "status": summary["status"], "ts": summary["created_at"]}
            validate(TOPIC_POLICY, event)
            self.apply_event(TOPIC_POLICY, event, source="worldservice")
        self._seeded_worlds.add(world_id)

    # -- descriptors ---------------------------------------------------------------------
    async def describe(self, identity: Any, body: Mapping[str, Any]) -> dict:
        try:
            topics = normalise_topics(body.get("topics") or [])
        except ValueError as exc:
            raise Unprocessable(str(exc), ext={"errors": [{"pointer": "/topics", "message": str(exc)}]}) from None
        world_id = body.get("world_id") or None
        strategy_id = body.get("strategy_id") or None
        needs_world = [t for t in topics if t in (StreamTopic.ACTIVATION, StreamTopic.POLICY)]
        if needs_world and not world_id:
            msg = f"topic(s) {', '.join(needs_world)} are per world: world_id is required"
            raise Unprocessable(msg, ext={"errors": [{"pointer": "/world_id", "message": msg}]})
        if world_id:
            identity.require(world_id, "reader")
        keys = []
        for i, k in enumerate(body.get("queue_keys") or []):
            try:
                keys.append(st.normalise_queue_key(k.get("tags") or [], k.get("interval"), k.get("match_mode")))
            except ValueError as exc:
                raise Unprocessable(str(exc), ext={"errors": [{"pointer": f"/queue_keys/{i}", "message": str(exc)}]}) from None
        if keys and StreamTopic.QUEUES not in topics:
            msg = "queue_keys need the 'queues' topic"
            raise Unprocessable(msg, ext={"errors": [{"pointer": "/queue_keys", "message": msg}]})
        token, exp = self.tokens.issue(subject=identity.subject, topics=topics, world_id=world_id, strategy_id=strategy_id, queue_keys=keys)
        base = ws_base(self.public_url)
        return {
            "stream_url": base + "/ws/evt",
            "token": token,
            "topics": topics,
            "expires_at": self.tokens.expires_at(exp),
            "fallback_url": self.cfg.fallback_url or base + "/ws",
        }

    # -- subscriptions -------------------------------------------------------------------
    async def open_subscription(self, scope: Mapping[str, Any], *, route: str, legacy: bool) -> tuple[Subscriber, str | None]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
        token = _bearer(headers) or query.get("token")
        last_event_id = query.get("last_event_id") or headers.get("last-event-id")
        if legacy:
            return await self._open_legacy(route, token), last_event_id
        if not token:
            raise StreamRefused(CLOSE_POLICY, "a token is required (Authorization: Bearer or ?token=)", "missing_token")
        try:
            grant = await self.tokens.verify_fresh(token)
        except InvalidToken as exc:
            raise StreamRefused(CLOSE_POLICY, f"invalid token: {exc.reason}", exc.reason.replace(" ", "_")) from None
        if query.get("world_id") and query["world_id"] != grant.world_id:
            raise StreamRefused(CLOSE_POLICY, "world_id is outside the token's scope", "scope")
        topics = set(grant.topics)
        if query.get("topics"):
            try:
                asked = set(normalise_topics(t for t in query["topics"].split(",") if t))
            except ValueError:
                raise StreamRefused(CLOSE_POLICY, "unknown topic in ?topics=", "scope") from None
            if not asked <= topics:
                raise StreamRefused(CLOSE_POLICY, "a topic is outside the token's scope", "scope")
            topics = asked
        keys = set(grant.queue_keys)
        if query.get("tags") or query.get("interval"):
            if StreamTopic.QUEUES not in topics:
                raise StreamRefused(CLOSE_POLICY, "queue keys need the 'queues' topic in the token", "scope")
            try:
                keys.add(st.normalise_queue_key(query.get("tags", ""), query.get("interval"), query.get("match_mode") or query.get("match")))
            except ValueError as exc:
                raise StreamRefused(CLOSE_POLICY, f"bad queue key: {exc}", "bad_queue_key") from None
        if grant.world_id is None:
            topics -= {StreamTopic.ACTIVATION, StreamTopic.POLICY}
        if not await self.wait_ready():
            raise StreamRefused(CLOSE_TRY_AGAIN, "the Gateway is rebuilding its event state; retry shortly", "not_ready")
        if grant.world_id is not None and topics & {StreamTopic.ACTIVATION, StreamTopic.POLICY}:
            await self.resolve_world(grant.world_id)
        if StreamTopic.QUEUES in topics and keys:
            try:
                await self.resolve_queue_keys(keys)
            except BadRequest as exc:
                raise StreamRefused(CLOSE_POLICY, f"bad queue key: {exc.detail}"[:120], "bad_queue_key") from exc
            except ServiceError as exc:
                raise StreamRefused(CLOSE_TRY_AGAIN, "queue set unavailable (DAG Manager); retry shortly", "backend_unavailable") from exc
        sub = Subscriber(
            route, topics=topics, world_id=grant.world_id, strategy_id=grant.strategy_id,
            queue_keys=keys if keys else None, world_visible=_nowhere, snapshots=True,
            queue_size=self.cfg.client_queue_size, subject=grant.subject,
        )
        sub.expires_at = _exp(grant.claims)
        return sub, last_event_id

    async def _open_legacy(self, route: str, token: str | None) -> Subscriber:
        auth = self.auth
        size = self.cfg.client_queue_size
        all_topics = tuple(StreamTopic)
        if token:
            try:
                grant = await self.tokens.verify_fresh(token)
            except InvalidToken as exc:
                reason = exc.reason
            else:  # a descriptor token on the legacy route: its world and topics
                world = grant.world_id
                sub = Subscriber(
                    route, topics=grant.topics, world_id=None, strategy_id=grant.strategy_id,
                    queue_keys=grant.queue_keys or None, world_visible=(lambda w: w == world), queue_size=size, subject=grant.subject,
                )
                sub.expires_at = _exp(grant.claims)
                return sub
            if auth.verifies_tokens:
                try:
                    identity = await auth.authenticate({"authorization": f"Bearer {token}"})
                except ServiceError as exc:
                    raise StreamRefused(CLOSE_POLICY, f"invalid token: {exc.detail}"[:120], "invalid_token") from None
                sub = Subscriber(route, topics=all_topics, world_visible=_reader_of(identity), queue_size=size, subject=identity.subject)
                sub.expires_at = _exp(identity.claims)
                return sub
            raise StreamRefused(CLOSE_POLICY, f"invalid token: {reason}", reason.replace(" ", "_"))
        if auth.mode != "dev":
            raise StreamRefused(CLOSE_POLICY, "a bearer token is required", "missing_token")
        identity = await auth.authenticate({})
        return Subscriber(route, topics=all_topics, world_visible=_reader_of(identity), queue_size=size, subject=identity.subject)

    async def refresh(self, sub: Subscriber, token: str) -> float:
        """A fresh token sent on an open stream (``{"type": "refresh", "token": ...}``): the
        same subject and at least the stream's scope (world, topics) → the stream lives until
        the new token's ``exp``. Raises ValueError (reason) otherwise."""
        try:
            grant = self.tokens.verify(token)
        except InvalidToken as exc:
            if sub.route == "/ws" and self.auth.verifies_tokens:
                identity = await self.auth.authenticate({"authorization": f"Bearer {token}"})  # a caller's JWT
                if identity.subject != sub.subject:
                    raise ValueError("the token names another subject") from None
                return self._extend(sub, _exp(identity.claims))
            raise ValueError(exc.reason) from None
        if grant.subject != sub.subject:
            raise ValueError("the token names another subject")
        if sub.snapshots and grant.world_id != sub.world_id:
            raise ValueError("the token is for another world")
        if not set(sub.topics) <= set(grant.topics) and sub.snapshots:
            raise ValueError("the token does not cover the stream's topics")
        return self._extend(sub, _exp(grant.claims))

    @staticmethod
    def _extend(sub: Subscriber, exp: float | None) -> float:
        if exp is None:
            raise ValueError("the token has no exp")
        sub.expires_at = max(sub.expires_at or 0.0, exp)
        return sub.expires_at

    # -- snapshots -----------------------------------------------------------------------
    def snapshot_frames(self, sub: Subscriber, head: int) -> list[str]:
        """One ``snapshot`` frame per subscribed topic, in the subscriber's scope."""
        out = []
        epoch = self.hub.epoch
        for topic in tuple(StreamTopic):
            if topic not in sub.topics:
                continue
            data: dict[str, Any] = {"topic": topic}
            if topic in (StreamTopic.ACTIVATION, StreamTopic.POLICY):
                w = sub.world_id
                if w is None:
                    continue
                data["world_id"] = w
                if topic == StreamTopic.ACTIVATION:
                    data["state_hash"], data["items"] = self.state.activation_hash(w), self.state.activation_items(w)
                else:
                    data["state_hash"], data["items"] = self.state.policy_hash(w), self.state.policy_items(w)
                subject = w
            else:
                items, combined = self.state.queue_items(sub.queue_keys)
                data["state_hash"], data["items"] = combined, items
                subject = None
            out.append(self.hub.frame(
                "snapshot", data, id_=f"{epoch}.{head}.snapshot-{topic}", subject=subject,
                extensions={"seq": head, "statehash": data["state_hash"]},
            ))
        return out


def _exp(claims: Mapping[str, Any] | None) -> float | None:
    exp = (claims or {}).get("exp")
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


def _nowhere(_world_id: str) -> bool:
    return False


def _reader_of(identity: Any):
    cache: dict[str, bool] = {}

    def visible(world_id: str) -> bool:
        ok = cache.get(world_id)
        if ok is None:
            ok = cache[world_id] = bool(identity.has_role(world_id, "reader"))
        return ok

    return visible


def _bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
