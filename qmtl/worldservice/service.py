"""WorldService: worlds, policies, decisions, activation, 2-phase apply, audit (SPEC §6).

Usable without HTTP: build a :class:`WorldService` with a :class:`~qmtl.store.Database`
and a ControlBus, ``await start()``, and call its methods with an
:class:`~qmtl.worldservice.rbac.Identity` (``service.auth.identify(headers)`` or
``Identity.development(...)``). Every method checks the caller's role on the world,
raises :mod:`qmtl.common.errors` for errors, and returns JSON-ready dicts shaped by the
schemas in ``specs/schemas/``.

Every write runs in one transaction that starts by updating the world's row (which
serialises writes per world and bumps its revision), writes its audit record and its
events (to the outbox) in the same transaction, and answers after the commit; the
outbox's background publisher sends the events (the write never waits for the ControlBus).
Several processes may serve one PostgreSQL database (see :mod:`qmtl.worldservice.apply`
for apply leases and :mod:`qmtl.store.outbox` for publishing order).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import logging
import math
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from qmtl.bus.base import TOPIC_ACTIVATION, TOPIC_POLICY, ControlBus
from qmtl.common import correlation, http
from qmtl.common.config import Config, ConfigError, WorldServiceConfig
from qmtl.common.errors import (
    BadRequest,
    Conflict,
    NotFound,
    PreconditionFailed,
    ServiceError,
    ServiceUnavailable,
    Unprocessable,
)
from qmtl.common.statehash import policy_state_hash
from qmtl.contracts.constants import PolicyStatus, StreamTopic, WorldState
from qmtl.store.sql import Database
from qmtl.worldservice import policy as pol
from qmtl.worldservice import store, views
from qmtl.worldservice.apply import ApplyHook, ApplyOperations
from qmtl.worldservice.metrics import WorldServiceMetrics
from qmtl.worldservice.outbox import Outbox
from qmtl.worldservice.rbac import OPERATOR, OWNER, READER, Authenticator, Identity
from qmtl.worldservice.store import utc

logger = logging.getLogger(__name__)



def _ttl_seconds(ttl: str) -> int:
    try:
        return int(pol.parse_duration(ttl))
    except ValueError as exc:
        raise ConfigError(f"worldservice.decision_ttl: {exc}") from None


def _encode_cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise BadRequest(f"invalid cursor {cursor!r}: pass the next_cursor of a previous page",
                         ext={"errors": [{"parameter": "cursor", "message": "invalid cursor"}]}) from None


def _ts_param(value: str | datetime, name: str) -> datetime:
    try:
        return views.parse_ts(value)
    except ValueError as exc:
        raise BadRequest(f"query parameter {name!r}: {exc}", ext={"errors": [{"parameter": name, "message": str(exc)}]}) from None


def _ts_body(value: str | datetime, pointer: str) -> datetime:
    try:
        return views.parse_ts(value)
    except ValueError as exc:
        raise Unprocessable(f"{exc} at {pointer}", ext={"errors": [{"pointer": pointer, "message": str(exc)}]}) from None


class WorldService(ApplyOperations):
    def __init__(
        self,
        config: Config | WorldServiceConfig,
        *,
        db: Database,
        bus: ControlBus,
        metrics: WorldServiceMetrics | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        cfg = config.worldservice if isinstance(config, Config) else config
        self.cfg = cfg
        self.db = db
        self.bus = bus
        self.metrics = metrics or WorldServiceMetrics()
        self.clock = clock or views.now_utc
        self.auth = Authenticator(mode=cfg.rbac, service_token=cfg.service_token, dev_subject=cfg.dev_subject)
        self.decision_ttl = cfg.decision_ttl
        self.decision_ttl_seconds = _ttl_seconds(cfg.decision_ttl)
        self.drain_seconds = float(cfg.apply_drain_seconds)
        self.apply_hook: ApplyHook | None = None
        self.outbox = Outbox(db, bus, self.metrics, poll_interval=float(cfg.outbox_poll_seconds))
        self.lease_seconds = float(cfg.apply_lease_seconds)
        self.instance_id = uuid.uuid4().hex[:12]  # names this process in apply leases
        self._recovery_task: asyncio.Task | None = None
        # Per-world write locks, dropped when no request holds one (ids come from requests).
        self._world_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}
        self._policy_cache: dict[tuple[str, int], pol.Policy] = {}
        # decide reads the world and its hysteresis state in one statement (one round trip)
        w, d = store.worlds, store.decisions
        self._world_and_decision = (
            sa.select(w, *[c.label("d_" + c.name) for c in d.c])
            .select_from(w.outerjoin(d, d.c.world_id == w.c.world_id))
            .where(w.c.world_id == sa.bindparam("world_id"), w.c.state != WorldState.DELETED)
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create tables, roll back applies whose lease expired (their process died), and
        start the outbox publisher (it publishes what was committed and not published)
        and the periodic recovery of expired applies."""
        await self.db.create_all(store.metadata)
        added = await self.db.add_missing_columns(store.worlds)
        if added:
            logger.info("ws_worlds: added column(s) %s", ", ".join(added))
        # SQLite is the embedded, one-process setup: what is in flight at start is this
        # process's predecessor's, rolled back at once; on PostgreSQL other replicas may be
        # running theirs, so only expired leases are.
        await self._recover_orphaned_applies(all_of_them=self.db.is_sqlite)
        await self.outbox.start()
        self._recovery_task = asyncio.create_task(self._recovery_loop(), name="worldservice-apply-recovery")
        if self.cfg.rbac == "dev":
            logger.warning(
                "WorldService RBAC is in DEVELOPMENT mode: callers without a forwarded identity act as %r "
                "with every role on every world (set worldservice.rbac: enforce in production)",
                self.cfg.dev_subject,
            )

    async def stop(self) -> None:
        task, self._recovery_task = self._recovery_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.outbox.stop()

    # ------------------------------------------------------------------ plumbing

    def now(self) -> datetime:
        return utc(self.clock())  # type: ignore[return-value]

    def _lock(self, world_id: str) -> asyncio.Lock:
        lock = self._world_locks.get(world_id)
        if lock is None:
            lock = self._world_locks[world_id] = asyncio.Lock()
        return lock

    @contextlib.asynccontextmanager
    async def _write(self, world_id: str) -> AsyncIterator[tuple[Any, dict]]:
        """A write transaction on a live world: ``(conn, world row)``. After the commit the
        outbox publisher is woken; the write does not wait for the ControlBus."""
        async with self._lock(world_id), self.db.begin() as conn:
            world = await self._lock_world(conn, world_id)
            yield conn, world
        self.outbox.notify()

    async def _lock_world(self, conn: Any, world_id: str) -> dict:
        w = store.worlds
        row = (
            await conn.execute(
                w.update()
                .where(w.c.world_id == world_id, w.c.state != WorldState.DELETED)
                .values(rev=w.c.rev + 1)
                .returning(*w.c)
            )
        ).mappings().first()
        if row is None:
            raise NotFound(f"world {world_id!r} not found")
        return dict(row)

    async def _world(self, conn: Any, world_id: str, *, include_deleted: bool = False) -> dict:
        w = store.worlds
        q = sa.select(w).where(w.c.world_id == world_id)
        if not include_deleted:
            q = q.where(w.c.state != WorldState.DELETED)
        row = (await conn.execute(q)).mappings().first()
        if row is None:
            raise NotFound(f"world {world_id!r} not found")
        return dict(row)

    async def _entries(self, conn: Any, world_id: str) -> list[dict]:
        a = store.activations
        rows = (await conn.execute(sa.select(a).where(a.c.world_id == world_id))).mappings().all()
        return [views.entry_from_row(r) for r in rows]

    async def _audit(self, conn: Any, world_id: str, actor: Identity, event: str, request: Mapping, result: Mapping) -> None:
        await conn.execute(
            store.audit.insert().values(
                world_id=world_id,
                actor=actor.subject,
                event=event,
                request=dict(request),
                result=dict(result),
                created_at=self.now(),
                correlation_id=correlation.get(),
            )
        )

    async def _emit_activation(self, conn: Any, world_id: str, before: Mapping, after: Mapping, run_id: str | None = None) -> int:
        events = views.activation_events(before, after, run_id=run_id)
        for event in events:
            await self.outbox.add(conn, TOPIC_ACTIVATION, world_id, event)
        return len(events)

    def _world_out(self, row: Mapping[str, Any]) -> dict:
        return {
            "world_id": row["world_id"],
            "name": row["name"],
            "description": row["description"] or "",
            "owner": row["owner"],
            "labels": dict(row["labels"] or {}),
            "state": row["state"],
            "default_policy_version": int(row["default_policy_version"] or 0),
            "allow_live": bool(row["allow_live"]),
            "circuit_breaker": bool(row["circuit_breaker"]),
            "apply_run_id": row["apply_run_id"],
            "created_at": views.iso(row["created_at"]),
            "updated_at": views.iso(row["updated_at"]),
        }

    # ------------------------------------------------------------------ worlds

    async def create_world(self, actor: Identity, body: Mapping[str, Any]) -> dict:
        world_id = body["world_id"]
        actor.require(world_id, OWNER, "creating a world")
        views.require_storable_text(body)
        now = self.now()
        values = {
            "world_id": world_id,
            "name": body["name"],
            "description": body.get("description", ""),
            "owner": body.get("owner") or actor.subject,
            "labels": dict(body.get("labels") or {}),
            "state": WorldState.ACTIVE,
            "default_policy_version": 0,
            "allow_live": bool(body.get("allow_live", False)),
            "circuit_breaker": bool(body.get("circuit_breaker", False)),
            "rev": 0,
            "gate_epoch": 0,
            "gate_changed_at": None,
            "apply_run_id": None,
            "apply_started_at": None,
            "created_at": now,
            "updated_at": now,
        }
        async with self._lock(world_id):
            try:
                async with self.db.begin() as conn:
                    existing = (
                        await conn.execute(sa.select(store.worlds.c.state).where(store.worlds.c.world_id == world_id))
                    ).scalar_one_or_none()
                    if existing is not None:
                        raise self._exists(world_id, existing)
                    await conn.execute(store.worlds.insert().values(**values))
                    out = self._world_out(values)
                    await self._audit(conn, world_id, actor, "world.created", body, out)
            except IntegrityError:
                raise self._exists(world_id, WorldState.ACTIVE) from None
        return out

    @staticmethod
    def _exists(world_id: str, state: str) -> Conflict:
        if state == WorldState.DELETED:
            return Conflict(f"world id {world_id!r} belonged to a deleted world and cannot be reused")
        return Conflict(f"world {world_id!r} already exists")

    async def list_worlds(self, actor: Identity, *, limit: int = 100, cursor: str | None = None) -> dict:
        w = store.worlds
        q = sa.select(w).where(w.c.state != WorldState.DELETED).order_by(w.c.world_id).limit(limit + 1)
        if cursor:
            q = q.where(w.c.world_id > _decode_cursor(cursor))
        if not actor.has("*", READER):
            readable = [wid for wid in actor.world_roles if wid != "*" and actor.has(wid, READER)]
            q = q.where(w.c.world_id.in_(readable))
        async with self.db.connect() as conn:
            rows = (await conn.execute(q)).mappings().all()
        page = rows[:limit]
        next_cursor = _encode_cursor(page[-1]["world_id"]) if len(rows) > limit else None
        return {"worlds": [self._world_out(r) for r in page], "next_cursor": next_cursor}

    async def get_world(self, actor: Identity, world_id: str) -> dict:
        actor.require(world_id, READER, "reading a world")
        async with self.db.connect() as conn:
            return self._world_out(await self._world(conn, world_id))

    async def update_world(self, actor: Identity, world_id: str, body: Mapping[str, Any]) -> dict:
        actor.require(world_id, OWNER, "updating a world")
        views.require_storable_text(body)
        async with self._write(world_id) as (conn, world):
            changes = {k: v for k, v in body.items() if world.get(k) != v}
            if "labels" in changes:
                changes["labels"] = dict(changes["labels"])
            now = self.now()
            entries = await self._entries(conn, world_id)
            before = views.view(world, entries, include_freeze=False)
            new = dict(world, **changes, updated_at=now)
            if views.gate_of(new, include_freeze=False) != views.gate_of(world, include_freeze=False):
                new["gate_epoch"] = int(world["gate_epoch"] or 0) + 1
                new["gate_changed_at"] = now
            values = {k: new[k] for k in (*changes, "updated_at", "gate_epoch", "gate_changed_at")}
            await conn.execute(store.worlds.update().where(store.worlds.c.world_id == world_id).values(**values))
            emitted = await self._emit_activation(conn, world_id, before, views.view(new, entries, include_freeze=False))
            out = self._world_out(new)
            await self._audit(conn, world_id, actor, "world.updated", body, {"changed": sorted(changes), "activation_events": emitted})
        return out

    async def delete_world(self, actor: Identity, world_id: str) -> None:
        actor.require(world_id, OWNER, "deleting a world")
        async with self._write(world_id) as (conn, world):
            if world["apply_run_id"]:
                raise Conflict(f"apply {world['apply_run_id']!r} is in flight on world {world_id!r}; delete it afterwards", headers={"Retry-After": "1"})
            now = self.now()
            entries = await self._entries(conn, world_id)
            before = views.view(world, entries, include_freeze=False)
            new = dict(world, state=WorldState.DELETED, updated_at=now, gate_epoch=int(world["gate_epoch"] or 0) + 1, gate_changed_at=now)
            await conn.execute(
                store.worlds.update()
                .where(store.worlds.c.world_id == world_id)
                .values(state=WorldState.DELETED, updated_at=now, gate_epoch=new["gate_epoch"], gate_changed_at=now)
            )
            emitted = await self._emit_activation(conn, world_id, before, views.view(new, entries, include_freeze=False))
            await self._audit(conn, world_id, actor, "world.deleted", {}, {"state": WorldState.DELETED, "activation_events": emitted})

    # ------------------------------------------------------------------ policies

    async def _policy(self, conn: Any, world_id: str, version: int) -> pol.Policy | None:
        if not version:
            return None
        key = (world_id, int(version))
        cached = self._policy_cache.get(key)
        if cached is None:
            p = store.policies
            text = (
                await conn.execute(sa.select(p.c.yaml).where(p.c.world_id == world_id, p.c.version == version))
            ).scalar_one_or_none()
            if text is None:
                return None
            cached = pol.Policy.from_document(pol.parse_policy(text), version=int(version))
            self._policy_cache[key] = cached
        return cached

    @staticmethod
    def _policy_summary(row: Mapping[str, Any]) -> dict:
        return {
            "world_id": row["world_id"],
            "version": int(row["version"]),
            "checksum": row["checksum"],
            "status": row["status"],
            "created_by": row["created_by"],
            "created_at": views.iso(row["created_at"]),
        }

    async def create_policy(self, actor: Identity, world_id: str, body: Mapping[str, Any]) -> dict:
        actor.require(world_id, OWNER, "adding a policy version")
        views.require_storable_text(body)
        text: str = body["yaml"]
        set_default = bool(body.get("set_default", False))
        digest = pol.checksum(text)
        try:
            document = pol.parse_policy(text)
        except pol.PolicyError as exc:
            self.metrics.policy_rejected.inc()
            async with self._write(world_id) as (conn, world):
                await self._audit(
                    conn, world_id, actor, "policy.rejected",
                    {"checksum": digest, "set_default": set_default},
                    {"error": str(exc), "errors": exc.errors, "default_policy_version": int(world["default_policy_version"] or 0)},
                )
            errors = []
            for e in exc.errors:
                item = {"pointer": "/yaml", "message": e["message"]}
                if "pointer" in e:
                    item["document_pointer"] = e["pointer"]
                for k in ("line", "column"):
                    if e.get(k) is not None:
                        item[k] = e[k]
                errors.append(item)
            raise Unprocessable(f"{exc}; the world's default policy is unchanged", ext={"errors": errors}) from None
        async with self._write(world_id) as (conn, world):
            p = store.policies
            now = self.now()
            current = (await conn.execute(sa.select(sa.func.max(p.c.version)).where(p.c.world_id == world_id))).scalar_one_or_none()
            version = int(current or 0) + 1
            row = {
                "world_id": world_id,
                "version": version,
                "yaml": text,
                "checksum": digest,
                "status": PolicyStatus.ACTIVE if set_default else PolicyStatus.DRAFT,
                "created_by": actor.subject,
                "created_at": now,
            }
            await conn.execute(p.insert().values(**row))
            if set_default:
                await self._switch_default(conn, world, version, now)
            else:
                await self.outbox.add(conn, TOPIC_POLICY, world_id, views.policy_event(world_id, version, digest, PolicyStatus.DRAFT, now))
            out = dict(self._policy_summary(row), yaml=text, document=document)
            await self._audit(
                conn, world_id, actor, "policy.created",
                {"checksum": digest, "set_default": set_default},
                {"version": version, "status": row["status"]},
            )
        self._policy_cache[(world_id, version)] = pol.Policy.from_document(document, version=version)
        return out

    async def _switch_default(self, conn: Any, world: Mapping[str, Any], version: int, now: datetime) -> None:
        """Make ``version`` the default (ACTIVE), the previous default DEPRECATED; events in that order."""
        p = store.policies
        world_id = world["world_id"]
        old = int(world["default_policy_version"] or 0)
        if old and old != version:
            await conn.execute(p.update().where(p.c.world_id == world_id, p.c.version == old).values(status=PolicyStatus.DEPRECATED))
            old_sum = (await conn.execute(sa.select(p.c.checksum).where(p.c.world_id == world_id, p.c.version == old))).scalar_one()
            await self.outbox.add(conn, TOPIC_POLICY, world_id, views.policy_event(world_id, old, old_sum, PolicyStatus.DEPRECATED, now))
        await conn.execute(p.update().where(p.c.world_id == world_id, p.c.version == version).values(status=PolicyStatus.ACTIVE))
        new_sum = (await conn.execute(sa.select(p.c.checksum).where(p.c.world_id == world_id, p.c.version == version))).scalar_one()
        await conn.execute(
            store.worlds.update().where(store.worlds.c.world_id == world_id).values(default_policy_version=version, updated_at=now)
        )
        await self.outbox.add(conn, TOPIC_POLICY, world_id, views.policy_event(world_id, version, new_sum, PolicyStatus.ACTIVE, now))

    async def list_policies(self, actor: Identity, world_id: str) -> dict:
        actor.require(world_id, READER, "listing policies")
        async with self.db.connect() as conn:
            world = await self._world(conn, world_id)
            p = store.policies
            rows = (await conn.execute(sa.select(p).where(p.c.world_id == world_id).order_by(p.c.version))).mappings().all()
        return {
            "world_id": world_id,
            "default_version": int(world["default_policy_version"] or 0),
            "policies": [self._policy_summary(r) for r in rows],
        }

    async def get_policy(self, actor: Identity, world_id: str, version: int) -> dict:
        actor.require(world_id, READER, "reading a policy")
        async with self.db.connect() as conn:
            await self._world(conn, world_id)
            p = store.policies
            row = (await conn.execute(sa.select(p).where(p.c.world_id == world_id, p.c.version == version))).mappings().first()
        if row is None:
            raise NotFound(f"world {world_id!r} has no policy version {version}")
        return dict(self._policy_summary(row), yaml=row["yaml"], document=pol.parse_policy(row["yaml"]))

    async def set_default_policy(self, actor: Identity, world_id: str, version: int) -> dict:
        actor.require(world_id, OWNER, "setting the default policy")
        async with self._write(world_id) as (conn, world):
            p = store.policies
            exists = (
                await conn.execute(sa.select(p.c.version).where(p.c.world_id == world_id, p.c.version == version))
            ).scalar_one_or_none()
            if exists is None:
                raise NotFound(f"world {world_id!r} has no policy version {version}")
            previous = int(world["default_policy_version"] or 0)
            now = self.now()
            if previous != version:
                await self._switch_default(conn, world, version, now)
                world = dict(world, default_policy_version=version, updated_at=now)
            await self._audit(
                conn, world_id, actor, "policy.default_set",
                {"version": version}, {"previous": previous, "default_policy_version": version, "changed": previous != version},
            )
            out = self._world_out(world)
        return out

    async def policy_state_hash(self, actor: Identity, world_id: str) -> dict:
        actor.require(world_id, READER, "reading the policy state")
        async with self.db.connect() as conn:
            world = await self._world(conn, world_id)
            version = int(world["default_policy_version"] or 0)
            checksum = status = None
            if version:
                p = store.policies
                row = (
                    await conn.execute(sa.select(p.c.checksum, p.c.status).where(p.c.world_id == world_id, p.c.version == version))
                ).first()
                checksum, status = row.checksum, row.status
        return {"world_id": world_id, "topic": StreamTopic.POLICY, "state_hash": policy_state_hash(world_id, version, checksum, status)}

    # ------------------------------------------------------------------ observations and decisions

    @staticmethod
    def _hysteresis(row: Mapping[str, Any] | None) -> pol.HysteresisState | None:
        if row is None:
            return None
        return pol.HysteresisState(
            mode=row["mode"], since=utc(row["mode_since"]), passes=int(row["passes"]), fails=int(row["fails"]), mode_reason=row["mode_reason"]  # type: ignore[arg-type]
        )

    @staticmethod
    def _decision_state_out(row: Mapping[str, Any]) -> dict:
        return {
            "world_id": row["world_id"],
            "policy_version": int(row["policy_version"]),
            "mode": row["mode"],
            "mode_since": views.iso(row["mode_since"]),
            "consecutive_passes": int(row["passes"]),
            "consecutive_fails": int(row["fails"]),
            "passed": bool(row["passed"]),
            "score": float(row["score"]),
            "reasons": list(row["reasons"]),
            "observation": {"data_end": views.iso(row["data_end"]), "samples": int(row["samples"]), "metrics": dict(row["metrics"])},
            "recorded_at": views.iso(row["recorded_at"]),
        }

    async def record_observation(self, actor: Identity, world_id: str, body: Mapping[str, Any]) -> dict:
        """Judge the world's latest data under its default policy and advance its hysteresis."""
        actor.require(world_id, OPERATOR, "recording an observation")
        views.require_storable_text(body)
        async with self._write(world_id) as (conn, world):
            version = int(world["default_policy_version"] or 0)
            policy = await self._policy(conn, world_id, version)
            if policy is None:
                raise Conflict(f"world {world_id!r} has no default policy to judge observations with")
            now = self.now()
            data_end = _ts_body(body["data_end"], "/data_end")
            samples = int(body["samples"])
            metrics = {k: float(v) for k, v in body["metrics"].items()}
            d = store.decisions
            row = (await conn.execute(sa.select(d).where(d.c.world_id == world_id))).mappings().first()
            state = self._hysteresis(row) or pol.initial_state(now)
            reasons: list[str] = []
            if row is not None and int(row["policy_version"]) != version:
                state = pol.HysteresisState(state.mode, state.since, 0, 0, state.mode_reason)
                reasons.append(f"policy changed from v{row['policy_version']} to v{version}: counters reset")
            judgement = pol.judge(policy, metrics=metrics, samples=samples, data_end=data_end, now=now)
            new_state, step = pol.step_hysteresis(policy, state, judgement.passed, now, allow_live=bool(world["allow_live"]))
            reasons = list(judgement.reasons) + reasons + [step]
            values = {
                "world_id": world_id,
                "policy_version": version,
                "mode": new_state.mode,
                "mode_since": new_state.since,
                "mode_reason": new_state.mode_reason,
                "passes": new_state.passes,
                "fails": new_state.fails,
                "passed": judgement.passed,
                "score": judgement.score if judgement.score is not None and math.isfinite(judgement.score) else 0.0,
                "reasons": reasons,
                "data_end": data_end,
                "samples": samples,
                "metrics": metrics,
                "recorded_at": now,
            }
            if row is None:
                await conn.execute(d.insert().values(**values))
            else:
                await conn.execute(d.update().where(d.c.world_id == world_id).values(**values))
            await self._record_strategy_observations(conn, world_id, body.get("strategies") or [], now)
            out = self._decision_state_out(values)
            await self._audit(
                conn, world_id, actor, "observation.recorded", dict(body),
                {"passed": judgement.passed, "mode": new_state.mode, "previous_mode": state.mode, "reasons": reasons},
            )
        return out

    async def _record_strategy_observations(self, conn: Any, world_id: str, strategies: list[Mapping[str, Any]], now: datetime) -> None:
        """Keep each strategy's latest data (what an evaluate without ``strategies`` judges)."""
        _unique_strategy_ids(strategies, "/strategies")
        so = store.strategy_observations
        for i, s in enumerate(strategies):
            values = {
                "metrics": {k: float(v) for k, v in s["metrics"].items()},
                "samples": s.get("samples"),
                "data_end": _ts_body(s["data_end"], f"/strategies/{i}/data_end") if s.get("data_end") else None,
                "sides": list(s["sides"]) if s.get("sides") else None,
                "recorded_at": now,
            }
            where = (so.c.world_id == world_id) & (so.c.strategy_id == s["strategy_id"])
            res = await conn.execute(so.update().where(where).values(**values))
            if not res.rowcount:
                await conn.execute(so.insert().values(world_id=world_id, strategy_id=s["strategy_id"], **values))

    async def get_decision_state(self, actor: Identity, world_id: str) -> dict:
        actor.require(world_id, READER, "reading the decision state")
        async with self.db.connect() as conn:
            await self._world(conn, world_id)
            d = store.decisions
            row = (await conn.execute(sa.select(d).where(d.c.world_id == world_id))).mappings().first()
        if row is None:
            raise NotFound(f"world {world_id!r} has no observation recorded")
        return self._decision_state_out(row)

    async def decide(self, actor: Identity, world_id: str, as_of: str | datetime | None = None) -> dict:
        """The DecisionEnvelope at ``as_of`` (default now). A pure read."""
        actor.require(world_id, READER, "reading a decision")
        started = time.perf_counter()
        when = _ts_param(as_of, "as_of") if as_of is not None else self.now()
        async with self.db.connect() as conn:
            joined = (await conn.execute(self._world_and_decision, {"world_id": world_id})).mappings().first()
            if joined is None:
                raise NotFound(f"world {world_id!r} not found")
            world = {c.name: joined[c.name] for c in store.worlds.c}
            row = {c.name: joined["d_" + c.name] for c in store.decisions.c} if joined["d_world_id"] is not None else None
            version = int(world["default_policy_version"] or 0)
            policy = await self._policy(conn, world_id, version)  # cached per (world, version) after the first read
        mode, reason = pol.decide(
            policy,
            self._hysteresis(row),
            data_end=utc(row["data_end"]) if row is not None else None,
            as_of=when,
            allow_live=bool(world["allow_live"]),
            suspended=world["state"] == WorldState.SUSPENDED,
            circuit_breaker=bool(world["circuit_breaker"]),
        )
        envelope = {
            "world_id": world_id,
            "policy_version": version,
            "effective_mode": mode,
            "reason": reason,
            "as_of": views.iso(when),
            "ttl": self.decision_ttl,
            "etag": views.decision_etag(world_id, version, mode, reason),
        }
        self.metrics.decide_latency_ms.observe((time.perf_counter() - started) * 1000)
        return envelope

    # ------------------------------------------------------------------ activation

    async def get_activation(self, actor: Identity, world_id: str, strategy_id: str, side: str) -> dict:
        """The entry as readers see it; an entry the world never had reads inactive (weight 0)."""
        return (await self.get_activation_gated(actor, world_id, strategy_id, side))[0]

    async def get_activation_gated(self, actor: Identity, world_id: str, strategy_id: str, side: str) -> tuple[dict, str | None]:
        """``(envelope, gate)``: gate says why the world reads inactive (apply, suspended, circuit_breaker) or None."""
        actor.require(world_id, READER, "reading activation")
        async with self.db.connect() as conn:
            world = await self._world(conn, world_id)
            a = store.activations
            row = (
                await conn.execute(
                    sa.select(a).where(a.c.world_id == world_id, a.c.strategy_id == strategy_id, a.c.side == side)
                )
            ).mappings().first()
        gate = views.gate_of(world, include_freeze=True)
        if row is None:
            return views.absent_envelope(world, strategy_id, side), gate
        return views.envelope(world, views.entry_from_row(row), gate), gate

    async def get_activations(self, actor: Identity, world_id: str) -> dict:
        actor.require(world_id, READER, "reading activation")
        async with self.db.connect() as conn:
            world = await self._world(conn, world_id)
            entries = await self._entries(conn, world_id)
        v = views.view(world, entries, include_freeze=True)
        return {
            "world_id": world_id,
            "state_hash": views.state_hash(v),
            "frozen": bool(world["apply_run_id"]),
            "activations": [v[k] for k in sorted(v)],
        }

    async def activation_state_hash(self, actor: Identity, world_id: str) -> dict:
        full = await self.get_activations(actor, world_id)
        return {"world_id": world_id, "topic": StreamTopic.ACTIVATION, "state_hash": full["state_hash"]}

    async def override_activation(self, actor: Identity, world_id: str, body: Mapping[str, Any], *, if_match: str | None = None) -> dict:
        """Operator override of one entry; ``if_match`` (an etag or ``*``) makes it conditional (412)."""
        actor.require(world_id, OPERATOR, "overriding activation")
        views.require_storable_text(body)
        sid, side, active = body["strategy_id"], body["side"], bool(body["active"])
        weight = float(body.get("weight", 1.0)) if active else 0.0
        async with self._write(world_id) as (conn, world):
            if world["apply_run_id"]:
                raise Conflict(
                    f"apply {world['apply_run_id']!r} is in flight on world {world_id!r}; retry after it completes",
                    headers={"Retry-After": "1"},
                )
            entries = await self._entries(conn, world_id)
            current = next((e for e in entries if e["strategy_id"] == sid and e["side"] == side), None)
            if if_match is not None:
                seen = views.envelope(world, current, views.gate_of(world, include_freeze=True)) if current else views.absent_envelope(world, sid, side)
                if not http.if_match(if_match, seen["etag"]):
                    raise PreconditionFailed(
                        f"the activation of {sid}/{side} changed (etag {seen['etag']}); read it again",
                        ext={"etag": seen["etag"]},
                    )
            before = views.view(world, entries, include_freeze=False)
            changed = current is None or current["active"] != active or not math.isclose(current["weight"], weight, abs_tol=1e-12)
            if changed:
                now = self.now()
                entry = {
                    "strategy_id": sid, "side": side, "active": active, "weight": weight,
                    "etag": views.entry_etag(world_id, sid, side, active, weight, world["rev"]),
                    "run_id": None, "ts": now,
                }
                await self._put_entry(conn, world_id, entry, exists=current is not None)
                entries = [e for e in entries if (e["strategy_id"], e["side"]) != (sid, side)] + [entry]
                current = entry
            after = views.view(world, entries, include_freeze=False)
            emitted = await self._emit_activation(conn, world_id, before, after)
            out = views.envelope(world, current, views.gate_of(world, include_freeze=True))
            await self._audit(
                conn, world_id, actor, "activation.override", dict(body),
                {"changed": changed, "active": out["active"], "weight": out["weight"], "etag": out["etag"], "activation_events": emitted},
            )
        return out

    async def _put_entry(self, conn: Any, world_id: str, entry: Mapping[str, Any], *, exists: bool) -> None:
        a = store.activations
        values = {k: entry[k] for k in ("active", "weight", "etag", "run_id", "ts")}
        if exists:
            await conn.execute(
                a.update()
                .where(a.c.world_id == world_id, a.c.strategy_id == entry["strategy_id"], a.c.side == entry["side"])
                .values(**values)
            )
        else:
            await conn.execute(a.insert().values(world_id=world_id, strategy_id=entry["strategy_id"], side=entry["side"], **values))

    # ------------------------------------------------------------------ evaluate

    async def evaluate(self, actor: Identity, world_id: str, body: Mapping[str, Any]) -> dict:
        """A plan under the default policy and the current activation; changes nothing (audited).

        Without ``strategies`` in the body (the documented Aug-2025 form ``{"as_of": ...}``),
        the strategies judged are those known from observations: each one's latest metrics
        recorded with ``PUT /worlds/{id}/observations`` (``strategies``)."""
        actor.require(world_id, READER, "evaluating a world")
        views.require_storable_text(body)
        supplied = body.get("strategies")
        if supplied is not None:
            _unique_strategy_ids(supplied, "/strategies")
        when = _ts_body(body["as_of"], "/as_of") if body.get("as_of") else self.now()
        async with self.db.connect() as conn:
            world = await self._world(conn, world_id)
            version = int(world["default_policy_version"] or 0)
            policy = await self._policy(conn, world_id, version)
            if policy is None:
                raise Conflict(f"world {world_id!r} has no default policy to evaluate with")
            entries = await self._entries(conn, world_id)
            if supplied is None:
                so = store.strategy_observations
                rows = (await conn.execute(
                    sa.select(so).where(so.c.world_id == world_id).order_by(so.c.strategy_id))).mappings().all()
        current = {(e["strategy_id"], e["side"]): (e["active"], e["weight"]) for e in entries}
        if supplied is not None:
            source = "from the request"
            inputs = [
                pol.StrategyInput(
                    strategy_id=s["strategy_id"],
                    metrics={k: float(v) for k, v in s["metrics"].items()},
                    samples=s.get("samples"),
                    data_end=_ts_body(s["data_end"], f"/strategies/{i}/data_end") if s.get("data_end") else None,
                    sides=tuple(s.get("sides") or pol.SIDES),
                )
                for i, s in enumerate(supplied)
            ]
        else:
            source = "known from observations"
            inputs = [
                pol.StrategyInput(
                    strategy_id=r["strategy_id"],
                    metrics={k: float(v) for k, v in (r["metrics"] or {}).items()},
                    samples=int(r["samples"]) if r["samples"] is not None else None,
                    data_end=utc(r["data_end"]),
                    sides=tuple(r["sides"] or pol.SIDES),
                )
                for r in rows
            ]
        plan = pol.make_plan(policy, inputs, current, when)
        rejected = len(inputs) - len(plan.topk)
        notes = (
            f"policy v{version} at {views.iso(when)}: {len(inputs)} strateg{'y' if len(inputs) == 1 else 'ies'} judged "
            f"({source}); {len(plan.topk)} selected, {rejected} rejected, {len(plan.kept)} kept (active, not judged)"
        )
        if supplied is None and not inputs:
            notes += "; no strategy observations are recorded for this world (PUT /worlds/{id}/observations with strategies)"
        out = {
            "world_id": world_id,
            "policy_version": version,
            "as_of": views.iso(when),
            "activate": plan.activate,
            "deactivate": plan.deactivate,
            "reasons": plan.reasons,
            "scores": {k: v for k, v in plan.scores.items() if math.isfinite(v)},
            "topk": plan.topk,
            "promote": plan.promote,
            "demote": plan.demote,
            "notes": notes,
        }
        async with self.db.begin() as conn:
            await self._audit(
                conn, world_id, actor, "plan.evaluated",
                {"strategies": len(inputs), "source": "request" if supplied is not None else "observations", "as_of": out["as_of"]},
                {"policy_version": version, "activate": plan.activate, "deactivate": plan.deactivate, "reasons": plan.reasons,
                 "topk": plan.topk},
            )
        return out

    # ------------------------------------------------------------------ audit

    async def audit_page(self, actor: Identity, world_id: str, *, limit: int = 50, cursor: str | None = None) -> dict:
        actor.require(world_id, READER, "reading the audit log")
        before_id: int | None = None
        if cursor:
            raw = _decode_cursor(cursor)
            if not raw.isdigit():
                raise BadRequest(f"invalid cursor {cursor!r}", ext={"errors": [{"parameter": "cursor", "message": "invalid cursor"}]})
            before_id = int(raw)
        async with self.db.connect() as conn:
            await self._world(conn, world_id, include_deleted=True)
            a = store.audit
            q = sa.select(a).where(a.c.world_id == world_id).order_by(a.c.id.desc()).limit(limit + 1)
            if before_id is not None:
                q = q.where(a.c.id < before_id)
            rows = (await conn.execute(q)).mappings().all()
        page = rows[:limit]
        return {
            "world_id": world_id,
            "records": [
                {
                    "id": _encode_cursor(str(r["id"])),
                    "world_id": r["world_id"],
                    "actor": r["actor"],
                    "event": r["event"],
                    "request": dict(r["request"] or {}),
                    "result": dict(r["result"] or {}),
                    "created_at": views.iso(r["created_at"]),
                    "correlation_id": r["correlation_id"],
                }
                for r in page
            ],
            "next_cursor": _encode_cursor(str(page[-1]["id"])) if len(rows) > limit else None,
        }

    # ------------------------------------------------------------------ health

    async def health(self) -> dict:
        if not await self.db.ping():
            raise ServiceUnavailable("the WorldService database is unreachable", retry_after=2)
        outbox = await self.outbox.stats()
        return {
            "status": "ok",
            "service": "worldservice",
            "rbac": self.cfg.rbac,
            "database": "ok",
            "outbox_pending": outbox["pending"],
            "outbox_oldest_age_seconds": outbox["oldest_age_seconds"],
        }


def _unique_strategy_ids(strategies: list[Mapping[str, Any]], pointer: str) -> None:
    """422 naming every strategy id that appears more than once."""
    ids = [s["strategy_id"] for s in strategies]
    dupes = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
    if dupes:
        raise Unprocessable(
            f"strategy ids must be unique; repeated: {', '.join(dupes)}",
            ext={"errors": [{"pointer": f"{pointer}/{ids.index(d)}/strategy_id", "message": f"{d!r} is repeated"} for d in dupes]},
        )


__all__ = ["ApplyHook", "ServiceError", "WorldService"]
