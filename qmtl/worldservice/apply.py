"""The 2-phase apply of a plan to a world's activation set (SPEC §6): :class:`Applies`,
over the repository (transactions, entries, activation events) and the audit log.

freeze (the world is flagged frozen: activation reads answer inactive, orders are gated
off; the activation set is snapshotted into the run's record) → drain
(``apply_drain_seconds``) → switch (the plan's entries written in one transaction) →
unfreeze, then one ActivationUpdated per changed entry, published after the commit.

* Idempotent by ``run_id``: runs are stored (``ws_apply_runs``) with their plan checksum
  and result, so a repeat — also after a restart — returns the stored result.
* Single flight per world, across every WorldService process on the database: the
  world row holds the run_id in flight and its **lease** (``apply_owner``, a token of
  this attempt, and ``apply_lease_until``), renewed every third of
  ``apply_lease_seconds`` while the apply runs. Another run_id meanwhile is 409 (with
  Retry-After); the same run_id in this process waits for it, in another process it is
  409 until it completes (then the stored result is returned).
* Any failure before unfreeze (an exception, a cancellation, a fault injected through
  :attr:`apply_hook`) restores the snapshot and unfreezes; the run is marked rolled back
  and may be applied again. A run whose lease expired (its process died or stalled) is
  rolled back the same way by any process: by the next apply on the world, or by the
  periodic recovery every process runs (and at start). Each phase checks that the lease
  still carries its own token (fencing), so an attempt that lost its lease changes
  nothing more. The switch is one transaction, so an apply is never left half-done.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from qmtl.common import correlation
from qmtl.common.errors import Conflict, NotFound, ServiceUnavailable, Unprocessable
from qmtl.contracts.constants import WorldState
from qmtl.worldservice import policy as pol
from qmtl.worldservice import store, views
from qmtl.worldservice.audit import AuditLog
from qmtl.worldservice.metrics import WorldServiceMetrics
from qmtl.worldservice.rbac import OPERATOR, Identity
from qmtl.worldservice.repository import Conn, Repository

logger = logging.getLogger(__name__)

#: Called between apply phases with (phase, world_id, run_id); phases are "frozen",
#: "drained" and "switched". Raising from it fails the apply (which is rolled back);
#: awaiting in it holds the apply in flight. For tests and fault injection.
ApplyHook = Callable[[str, str, str], Awaitable[None] | None]


class Applies:
    """Applies of plans (see the module docstring); also the periodic recovery of applies
    whose lease expired (:meth:`start` / :meth:`stop`)."""

    def __init__(
        self,
        repo: Repository,
        audit: AuditLog,
        metrics: WorldServiceMetrics,
        *,
        drain_seconds: float,
        lease_seconds: float,
        hook: ApplyHook | None = None,
    ) -> None:
        self.repo = repo
        self.audit = audit
        self.metrics = metrics
        self.drain_seconds = drain_seconds
        self.lease_seconds = lease_seconds
        #: Called between phases (tests, fault injection); may be replaced while serving.
        self.hook = hook
        self.instance_id = uuid.uuid4().hex[:12]  # names this process in apply leases
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}
        self._recovery_task: asyncio.Task | None = None

    async def start(self) -> None:
        """Roll back applies whose lease expired, then start their periodic recovery.

        SQLite is the embedded, one-process setup: what is in flight at start is this
        process's predecessor's, rolled back at once; on PostgreSQL other replicas may be
        running theirs, so only expired leases are."""
        await self._recover_orphaned_applies(all_of_them=self.repo.db.is_sqlite)
        self._recovery_task = asyncio.create_task(self._recovery_loop(), name="worldservice-apply-recovery")

    async def stop(self) -> None:
        task, self._recovery_task = self._recovery_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @staticmethod
    def _normalise_plan(plan: Mapping[str, Any]) -> tuple[dict[tuple[str, str], float], set[tuple[str, str]], str]:
        """``(activate {key: weight}, deactivate {key}, checksum)``; 422 on contradictions."""
        errors: list[dict] = []
        activate: dict[tuple[str, str], float] = {}
        for sid, side, weight in pol.expand_plan_entries(plan.get("activate") or []):
            key = (sid, side)
            if key in activate and not math.isclose(activate[key], weight, abs_tol=1e-12):
                errors.append({"pointer": "/plan/activate", "message": f"{sid}/{side} is listed twice with different weights"})
            activate[key] = weight
        deactivate = {(sid, side) for sid, side, _w in pol.expand_plan_entries(plan.get("deactivate") or [])}
        for sid, side in sorted(deactivate & activate.keys()):
            errors.append({"pointer": "/plan", "message": f"{sid}/{side} is in both activate and deactivate"})
        if errors:
            raise Unprocessable(f"invalid plan: {errors[0]['message']}", ext={"errors": errors})
        canonical = {
            "activate": sorted([sid, side, w] for (sid, side), w in activate.items()),
            "deactivate": sorted([sid, side] for sid, side in deactivate),
        }
        return activate, deactivate, views.digest(canonical, 64)

    async def apply(self, actor: Identity, world_id: str, body: Mapping[str, Any]) -> tuple[dict, bool]:
        """Apply a plan in two phases; ``(result, replayed)``.

        freeze (the world reads inactive) → drain (``apply_drain_seconds``) → switch (the
        new activation set in one transaction) → unfreeze, then one ActivationUpdated per
        changed entry. Idempotent by ``run_id``: a repeat returns the stored result
        (``replayed``); the same run_id while it is in flight waits for it; another
        run_id while one is in flight is 409. A failure before unfreeze restores the
        snapshot taken at freeze and unfreezes (503, or 409 for a conflict); a rolled
        back run_id may be applied again.
        """
        actor.require(world_id, OPERATOR, "applying a plan")
        views.require_storable_text(body)
        run_id: str = body["run_id"]
        activate, deactivate, plan_sum = self._normalise_plan(body["plan"])
        key = (world_id, run_id)
        pending = self._inflight.get(key)
        if pending is not None:
            result = await asyncio.shield(pending)
            self.metrics.apply_total.labels("replayed").inc()
            return result, True
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception was never retrieved"
        self._inflight[key] = future
        try:
            result, replayed = await self._apply(actor, world_id, run_id, body["plan"], activate, deactivate, plan_sum)
        except BaseException as exc:
            future.set_exception(exc if isinstance(exc, Exception) else ServiceUnavailable(f"apply {run_id!r} was interrupted"))
            raise
        else:
            future.set_result(result)
        finally:
            self._inflight.pop(key, None)
        self.metrics.apply_total.labels("replayed" if replayed else "succeeded").inc()
        return result, replayed

    async def _apply(
        self,
        actor: Identity,
        world_id: str,
        run_id: str,
        raw_plan: Mapping[str, Any],
        activate: dict[tuple[str, str], float],
        deactivate: set[tuple[str, str]],
        plan_sum: str,
    ) -> tuple[dict, bool]:
        r = store.apply_runs
        request = {"run_id": run_id, "plan": dict(raw_plan)}
        token = f"{self.instance_id}-{uuid.uuid4().hex[:12]}"  # this attempt's lease
        # -- freeze
        async with self.repo.write(world_id) as (conn, world):
            run = (await conn.execute(sa.select(r).where(r.c.world_id == world_id, r.c.run_id == run_id))).mappings().first()
            if run is not None and run["status"] == "succeeded":
                if run["plan_checksum"] != plan_sum:
                    self.metrics.apply_total.labels("conflict").inc()
                    raise Conflict(f"run_id {run_id!r} was already applied to world {world_id!r} with a different plan")
                await self.audit.record(conn, world_id, actor, "apply.replayed", request, {"ok": True, "run_id": run_id})
                return dict(run["result"]), True
            if world["apply_run_id"]:
                other = world["apply_run_id"]
                if self._lease_live(world):
                    self.metrics.apply_total.labels("conflict").inc()
                    if other == run_id:  # run by another process (this one waits above)
                        raise Conflict(
                            f"apply {other!r} is in flight on world {world_id!r} (in another WorldService process); "
                            "repeat the request for its result once it completes",
                            ext={"run_id_in_flight": other},
                            headers={"Retry-After": "1"},
                        )
                    raise Conflict(
                        f"apply {other!r} is in flight on world {world_id!r}; only one apply per world at a time",
                        ext={"run_id_in_flight": other},
                        headers={"Retry-After": "1"},
                    )
                world = await self._recover(conn, world, other)
            if world["state"] != WorldState.ACTIVE:
                raise Conflict(f"world {world_id!r} is {world['state']}; apply needs an ACTIVE world")
            now = self.repo.now()
            entries = await self.repo.entries(conn, world_id)
            snapshot = [views.entry_to_json(e) for e in entries]
            before = views.view(world, entries, include_freeze=False)
            run_values = {
                "status": "in_flight",
                "plan_checksum": plan_sum,
                "plan": dict(raw_plan),
                "snapshot": snapshot,
                "result": None,
                "error": None,
                "actor": actor.subject,
                "correlation_id": correlation.get(),
                "started_at": now,
                "finished_at": None,
            }
            if run is None:
                await conn.execute(r.insert().values(world_id=world_id, run_id=run_id, **run_values))
            else:  # a rolled-back run_id applied again
                await conn.execute(r.update().where(r.c.world_id == world_id, r.c.run_id == run_id).values(**run_values))
            await conn.execute(
                store.worlds.update()
                .where(store.worlds.c.world_id == world_id)
                .values(apply_run_id=run_id, apply_started_at=now, apply_owner=token, apply_lease_until=self._lease_end())
            )
        phase = "frozen"
        renewer = asyncio.create_task(self._renew_lease(world_id, run_id, token), name=f"apply-lease-{world_id}")
        try:
            await self._hook("frozen", world_id, run_id)
            phase = "drain"
            if self.drain_seconds > 0:
                await asyncio.sleep(self.drain_seconds)
            await self._hook("drained", world_id, run_id)
            # -- switch
            phase = "switch"
            async with self.repo.write(world_id) as (conn, world):
                self._check_still_mine(world, run_id, token)
                now = self.repo.now()
                current = {(e["strategy_id"], e["side"]): e for e in await self.repo.entries(conn, world_id)}
                unchanged = 0
                targets = [(k, True, w) for k, w in activate.items()] + [(k, False, 0.0) for k in deactivate]
                for (sid, side), on, weight in sorted(targets):
                    cur = current.get((sid, side))
                    if cur is not None and cur["active"] == on and math.isclose(cur["weight"], weight, abs_tol=1e-12):
                        unchanged += 1
                        continue
                    if cur is None and not on:
                        unchanged += 1  # never active: nothing to switch off
                        continue
                    entry = {
                        "strategy_id": sid, "side": side, "active": on, "weight": weight,
                        "etag": views.entry_etag(world_id, sid, side, on, weight, world["rev"]),
                        "run_id": run_id, "ts": now,
                    }
                    await self.repo.put_entry(conn, world_id, entry, exists=cur is not None)
            await self._hook("switched", world_id, run_id)
            # -- unfreeze
            phase = "unfreeze"
            async with self.repo.write(world_id) as (conn, world):
                self._check_still_mine(world, run_id, token)
                now = self.repo.now()
                await conn.execute(store.worlds.update().where(store.worlds.c.world_id == world_id).values(**_UNFROZEN))
                world = dict(world, **_UNFROZEN)
                entries = await self.repo.entries(conn, world_id)
                after = views.view(world, entries, include_freeze=False)
                await self.repo.emit_activation(conn, world_id, before, after, run_id=run_id)
                stored = views.view(dict(world, state=WorldState.ACTIVE, circuit_breaker=False, gate_epoch=0), entries, include_freeze=False)
                changed = sorted(k for k, e in after.items() if (before.get(k) or {}).get("etag") != e["etag"])
                activated = [self._result_entry(world, stored[k], after[k]) for k in changed if stored[k]["active"]]
                deactivated = [self._result_entry(world, stored[k], after[k]) for k in changed if not stored[k]["active"]]
                result = {
                    "ok": True,
                    "run_id": run_id,
                    "world_id": world_id,
                    "activated": activated,
                    "deactivated": deactivated,
                    "unchanged": unchanged,
                    "state_hash": views.state_hash(after),
                    "applied_at": views.iso(now),
                }
                await conn.execute(
                    r.update()
                    .where(r.c.world_id == world_id, r.c.run_id == run_id)
                    .values(status="succeeded", result=result, finished_at=now)
                )
                await self.audit.record(
                    conn, world_id, actor, "apply.succeeded", request,
                    {"ok": True, "activated": len(activated), "deactivated": len(deactivated),
                     "unchanged": unchanged, "state_hash": result["state_hash"]},
                )
            return result, False
        except BaseException as exc:
            await asyncio.shield(self._rollback(actor, world_id, run_id, token, request, phase, exc))
            self.metrics.apply_total.labels("rolled_back").inc()
            if isinstance(exc, (Conflict, ServiceUnavailable)):
                raise
            if isinstance(exc, Exception):
                raise ServiceUnavailable(
                    f"apply {run_id!r} failed during {phase} and was rolled back to the previous activation; "
                    f"the world is unfrozen; retry with the same run_id ({type(exc).__name__}: {exc})",
                    ext={"run_id": run_id, "phase": phase},
                ) from exc
            raise
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    @staticmethod
    def _result_entry(world: Mapping[str, Any], stored: dict, seen: dict) -> dict:
        # What the apply stored (weights as applied), with the etag readers will see.
        return dict(stored, etag=seen["etag"], ts=seen["ts"])

    @staticmethod
    def _check_still_mine(world: Mapping[str, Any], run_id: str, token: str) -> None:
        if world["apply_run_id"] != run_id or world["apply_owner"] != token:
            raise Conflict(
                f"apply {run_id!r} lost its freeze on world {world['world_id']!r} (its lease expired and it was rolled back; "
                f"now {world['apply_run_id']!r} is in flight)"
            )

    # -- leases

    @staticmethod
    def _wall_clock() -> datetime:
        # Leases compare wall-clock times of several processes (keep their clocks in sync);
        # never the service's injectable clock.
        return datetime.now(UTC)

    def _lease_end(self) -> datetime:
        return self._wall_clock() + timedelta(seconds=self.lease_seconds)

    def _lease_live(self, world: Mapping[str, Any]) -> bool:
        until = store.utc(world["apply_lease_until"])
        return until is not None and until > self._wall_clock()

    async def _renew_lease(self, world_id: str, run_id: str, token: str) -> None:
        """Extend this attempt's lease every third of its length while the apply runs."""
        w = store.worlds
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                async with self.repo.db.begin() as conn:
                    res = await conn.execute(
                        w.update().where(w.c.world_id == world_id, w.c.apply_owner == token).values(apply_lease_until=self._lease_end())
                    )
                if res.rowcount == 0:
                    logger.warning("apply %r on world %r lost its lease", run_id, world_id)
                    return
            except Exception as exc:  # the database is away: try again; the lease may expire meanwhile
                logger.warning("renewing the lease of apply %r on world %r failed: %r", run_id, world_id, exc)

    async def _recover(self, conn: Conn, world: dict, run_id: str) -> dict:
        """In the caller's transaction: roll back ``run_id``, whose lease expired."""
        world_id = world["world_id"]
        logger.warning(
            "rolling back apply %r on world %r: its lease (%s) expired; its process died or stalled",
            run_id, world_id, world["apply_owner"] or "none",
        )
        world = await self._restore(conn, world, run_id, "interrupted: its WorldService process stopped renewing its lease")
        await self.audit.record_as(
            conn, world_id, "worldservice", "apply.rolled_back", {"run_id": run_id},
            {"ok": False, "error": "interrupted: the lease of the process running it expired", "by": self.instance_id},
            correlation_id=None,
        )
        self.metrics.apply_total.labels("rolled_back").inc()
        return world

    async def _hook(self, phase: str, world_id: str, run_id: str) -> None:
        hook = self.hook
        if hook is None:
            return
        result = hook(phase, world_id, run_id)
        if inspect.isawaitable(result):
            await result

    async def _rollback(
        self, actor: Identity, world_id: str, run_id: str, token: str, request: Mapping, phase: str, exc: BaseException
    ) -> None:
        """Restore the snapshot taken at freeze and unfreeze (if the freeze is still ours)."""
        error = f"failed during {phase}: {type(exc).__name__}: {exc}"
        try:
            async with self.repo.write(world_id) as (conn, world):
                if world["apply_run_id"] != run_id or world["apply_owner"] != token:
                    return
                await self._restore(conn, world, run_id, error)
                await self.audit.record(conn, world_id, actor, "apply.rolled_back", request, {"ok": False, "phase": phase, "error": error})
        except NotFound:
            return
        except Exception:
            logger.exception("rollback of apply %r on world %r failed; it is retried by the next apply or at restart", run_id, world_id)

    async def _restore(self, conn: Conn, world: dict, run_id: str, error: str) -> dict:
        """In the caller's transaction: put back run ``run_id``'s snapshot, unfreeze, mark it rolled back."""
        world_id = world["world_id"]
        r = store.apply_runs
        run = (await conn.execute(sa.select(r).where(r.c.world_id == world_id, r.c.run_id == run_id))).mappings().first()
        a = store.activations
        if run is not None:
            await conn.execute(a.delete().where(a.c.world_id == world_id))
            snapshot = [views.entry_from_json(e) for e in run["snapshot"]]
            if snapshot:
                await conn.execute(a.insert(), [dict(e, world_id=world_id) for e in snapshot])
            await conn.execute(
                r.update().where(r.c.world_id == world_id, r.c.run_id == run_id).values(status="rolled_back", error=error, finished_at=self.repo.now())
            )
        await conn.execute(store.worlds.update().where(store.worlds.c.world_id == world_id).values(**_UNFROZEN))
        return dict(world, **_UNFROZEN)

    async def _recover_orphaned_applies(self, *, all_of_them: bool = False) -> None:
        """Roll back every apply whose lease expired (its process died or stalled); with
        ``all_of_them``, every apply in flight (at the start of the only process there can
        be: SQLite, embedded)."""
        w = store.worlds
        async with self.repo.db.connect() as conn:
            frozen = (
                await conn.execute(
                    sa.select(w.c.world_id, w.c.apply_run_id, w.c.apply_lease_until).where(w.c.apply_run_id.is_not(None))
                )
            ).mappings().all()
        for row in frozen:
            if self._lease_live(row) and not all_of_them:
                continue
            world_id, run_id = row["world_id"], row["apply_run_id"]
            with contextlib.suppress(NotFound):
                async with self.repo.write(world_id) as (conn, world):
                    if world["apply_run_id"] == run_id and (all_of_them or not self._lease_live(world)):
                        await self._recover(conn, world, run_id)

    async def _recovery_loop(self) -> None:
        interval = max(0.2, min(5.0, self.lease_seconds / 3))
        while True:
            await asyncio.sleep(interval)
            try:
                await self._recover_orphaned_applies()
            except Exception as exc:  # the database is away: next round
                logger.warning("recovery of expired applies failed (will retry): %r", exc)


_UNFROZEN = {"apply_run_id": None, "apply_started_at": None, "apply_owner": None, "apply_lease_until": None}
