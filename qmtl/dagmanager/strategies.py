"""Strategy references: which nodes each strategy (and its version sentinel) holds — what
keeps queues alive — written by a diff and dropped by ``DELETE /strategies/{id}``; a
queue no strategy of its namespace references any more starts its GC clock."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa

from qmtl.common.errors import Conflict, NotFound

from . import store
from .errors import database_errors
from .metrics import DagManagerMetrics
from .plan import Plan
from .transactions import Transactions

# A new strategy (``s``), its edges, its sentinel (only with a new strategy) and the
# sentinel's edges; unnest keeps the (sorted) order of the node list, so rows are
# written in nid order as everywhere else.
_INSERT_NEW_SQL = (
    "WITH s AS (INSERT INTO dm_strategies (strategy_id, sentinel_id, run_type, sim, version, created_at, updated_at) "
    "VALUES ($1::text, $2::text, $3::text, $4::bool, $5::text, $6::float8, $6::float8) ON CONFLICT DO NOTHING RETURNING sid), "
    "e AS (INSERT INTO dm_strategy_nodes (sid, nid) SELECT s.sid, u.nid FROM s, unnest($7::int4[]) AS u(nid)), "
    "sen AS (INSERT INTO dm_sentinels (sentinel_id, strategy_id, version, created_at) "
    "SELECT $2::text, $1::text, $5::text, $6::float8 FROM s ON CONFLICT DO NOTHING RETURNING snid), "
    "se AS (INSERT INTO dm_sentinel_nodes (snid, nid) SELECT sen.snid, u.nid FROM sen, unnest($7::int4[]) AS u(nid)) "
    "SELECT (SELECT sid FROM s), (SELECT snid FROM sen)"
)


def referenced() -> Any:
    """EXISTS: some strategy in the queue's namespace references the queue's node."""
    q, sn, s = store.queues, store.strategy_nodes, store.strategies
    return (
        sa.select(sa.literal(1))
        .select_from(sn.join(s, s.c.sid == sn.c.sid))
        .where(sn.c.nid == q.c.nid, s.c.sim == q.c.sim)
        .exists()
    )


class StrategyReferences:
    def __init__(self, txn: Transactions, sql: store.SqlHelpers, *, metrics: DagManagerMetrics,
                 clock: Callable[[], float]) -> None:
        self.txn = txn
        self.sql = sql
        self.metrics = metrics
        self.clock = clock

    async def record(self, conn: Any, plan: Plan, new_nids: set[int], now: float) -> None:
        """In the diff's transaction: the strategy's node references and its sentinel's
        edges (a new strategy: one INSERT of each — on PostgreSQL all four in one
        statement; a strategy diffed again: only the difference is written, and nodes it
        dropped are released)."""
        sid: int | None = None
        if not self.sql.is_sqlite:
            sid, snid = await self._insert_new(conn, plan, sorted(new_nids), now)
            if sid is not None and snid is not None:
                return
        if sid is None:
            await self._record_strategy(conn, plan, new_nids, now)
        await self._record_sentinel(conn, plan, new_nids, now)

    async def record_new(self, conn: Any, plans: Sequence[Plan], nids: Sequence[set[int]], now: float) -> bool:
        """In a batch's transaction: new strategies (``plans``, distinct strategy and
        sentinel ids), their sentinels and the node references of both, one statement
        each. False when a strategy or sentinel existed (nothing is to be kept then: the
        caller rolls back), rows in strategy-id order otherwise."""
        order = sorted(range(len(plans)), key=lambda j: plans[j].strategy_id)
        batch = [plans[j] for j in order]
        inserted = await self.sql.insert_ignore(conn, store.strategies, {
            "strategy_id": [p.strategy_id for p in batch], "sentinel_id": [p.sentinel_id for p in batch],
            "run_type": [p.run_type for p in batch], "sim": batch[0].sim, "version": [p.version for p in batch],
            "created_at": now, "updated_at": now,
        }, conflict=("strategy_id",), returning=("sid", "strategy_id"))
        if not inserted or len(inserted[0]) < len(batch):
            return False
        sids = dict(zip(inserted[1], inserted[0]))
        inserted = await self.sql.insert_ignore(conn, store.sentinels, {
            "sentinel_id": [p.sentinel_id for p in batch], "strategy_id": [p.strategy_id for p in batch],
            "version": [p.version for p in batch], "created_at": now,
        }, conflict=("sentinel_id",), returning=("snid", "sentinel_id"))
        if not inserted or len(inserted[0]) < len(batch):
            return False
        snids = dict(zip(inserted[1], inserted[0]))
        heads: list[int] = []
        sentinel_heads: list[int] = []
        tails: list[int] = []
        for j in order:
            plan, refs = plans[j], sorted(nids[j])
            heads.extend([sids[plan.strategy_id]] * len(refs))
            sentinel_heads.extend([snids[plan.sentinel_id]] * len(refs))
            tails.extend(refs)
        # rows of strategies and sentinels this transaction created: no other can hold them
        await self.sql.insert_new(conn, store.strategy_nodes, {"sid": heads, "nid": tails})
        await self.sql.insert_new(conn, store.sentinel_nodes, {"snid": sentinel_heads, "nid": tails})
        return True

    async def _insert_new(self, conn: Any, plan: Plan, nids: list[int], now: float) -> tuple[int | None, int | None]:
        """PostgreSQL: a new strategy, its sentinel and the edges of both, in one statement.
        Returns (sid, snid); None where the row existed (nothing of it, nor of the
        sentinel when the strategy existed, was written)."""
        row = (await conn.exec_driver_sql(_INSERT_NEW_SQL, (
            plan.strategy_id, plan.sentinel_id, plan.run_type, plan.sim, plan.version, now, nids,
        ))).one()
        return row[0], row[1]

    async def _record_strategy(self, conn: Any, plan: Plan, new_nids: set[int], now: float) -> None:
        s, sn = store.strategies, store.strategy_nodes
        strategy_id = plan.strategy_id
        # A new strategy is the common case: try the INSERT first; an existing one is
        # then locked (FOR UPDATE) so that two diffs of one strategy apply one by one.
        prev = None
        sid: int | None = None
        for _attempt in range(3):  # (a concurrent release may delete the row in between)
            sid = (await conn.execute(
                self.sql.insert(s).values(
                    strategy_id=strategy_id, sentinel_id=plan.sentinel_id, run_type=plan.run_type, sim=plan.sim,
                    version=plan.version, created_at=now, updated_at=now,
                ).on_conflict_do_nothing().returning(s.c.sid)
            )).scalar()
            if sid is not None:
                break
            prev = (await conn.execute(
                sa.select(s.c.sid, s.c.sim).where(s.c.strategy_id == strategy_id).with_for_update()
            )).first()
            if prev is not None:
                break
        if prev is not None:
            sid = prev.sid
            await conn.execute(
                sa.update(s).where(s.c.sid == sid).values(
                    sentinel_id=plan.sentinel_id, run_type=plan.run_type, sim=plan.sim, version=plan.version, updated_at=now
                )
            )
        assert sid is not None
        if prev is None:
            added = new_nids
        else:
            old = {r[0] for r in (await conn.execute(sa.select(sn.c.nid).where(sn.c.sid == sid))).all()}
            if bool(prev.sim) != plan.sim:
                removed, added = old, new_nids
                if old:
                    await conn.execute(sa.delete(sn).where(sn.c.sid == sid))
            else:
                removed, added = old - new_nids, new_nids - old
                for clause in self.sql.id_batches(sn.c.nid, sorted(removed)):
                    await conn.execute(sa.delete(sn).where(sn.c.sid == sid, clause))
            if removed:
                await self.release_nodes(conn, sorted(removed), bool(prev.sim), now)
        await self.sql.insert_edges(conn, sn, sid, sorted(added), fresh=prev is None)

    async def _record_sentinel(self, conn: Any, plan: Plan, new_nids: set[int], now: float) -> None:
        sen, sen_n = store.sentinels, store.sentinel_nodes
        strategy_id = plan.strategy_id
        row = None
        snid: int | None = (await conn.execute(
            self.sql.insert(sen).values(
                sentinel_id=plan.sentinel_id, strategy_id=strategy_id, version=plan.version, created_at=now
            ).on_conflict_do_nothing().returning(sen.c.snid)
        )).scalar()
        if snid is None:
            row = (await conn.execute(
                sa.select(sen.c.snid, sen.c.strategy_id, sen.c.version).where(sen.c.sentinel_id == plan.sentinel_id)
            )).first()
        if row is not None:
            if row.strategy_id != strategy_id:
                raise Conflict(
                    f"sentinel {plan.sentinel_id!r} belongs to strategy {row.strategy_id!r}, not {strategy_id!r}",
                    ext={"errors": [{"pointer": "/dag/nodes", "message": f"VersionSentinel {plan.sentinel_id!r} is another strategy's"}]},
                )
            snid = row.snid
            if row.version != plan.version:
                await conn.execute(sa.update(sen).where(sen.c.snid == snid).values(version=plan.version))
            old_edges = {r[0] for r in (await conn.execute(sa.select(sen_n.c.nid).where(sen_n.c.snid == snid))).all()}
            edges_add = new_nids - old_edges
            for clause in self.sql.id_batches(sen_n.c.nid, sorted(old_edges - new_nids)):
                await conn.execute(sa.delete(sen_n).where(sen_n.c.snid == snid, clause))
        else:
            edges_add = new_nids
        assert snid is not None
        await self.sql.insert_edges(conn, sen_n, snid, sorted(edges_add), fresh=row is None)

    async def release_nodes(self, conn: Any, nids: Sequence[int], sim: bool, now: float) -> list[str]:
        """Start the GC clock of the queues of ``nids`` that no strategy references any
        more; return their topics."""
        q = store.queues
        topics: list[str] = []
        for clause in self.sql.id_batches(q.c.nid, list(nids)):
            res = await conn.execute(
                sa.update(q).where(q.c.sim == sim, clause, ~referenced()).values(released_at=now).returning(q.c.topic)
            )
            topics.extend(r[0] for r in res.all())
        return sorted(topics)

    async def release(self, strategy_id: str) -> dict[str, Any]:
        """``DELETE /strategies/{id}``: drop the strategy, its references, its sentinels
        and their edges; release the queues nothing references any more."""
        s, sn = store.strategies, store.strategy_nodes
        sen, sen_n = store.sentinels, store.sentinel_nodes
        now = self.clock()
        with database_errors():
            async with self.txn.write() as conn:
                prev = (await conn.execute(
                    sa.select(s.c.sid, s.c.sim).where(s.c.strategy_id == strategy_id).with_for_update())).first()
                if prev is None:
                    raise NotFound(f"strategy {strategy_id!r} is not known")
                nids = sorted(r[0] for r in (await conn.execute(sa.select(sn.c.nid).where(sn.c.sid == prev.sid))).all())
                await conn.execute(sa.delete(sn).where(sn.c.sid == prev.sid))
                topics = await self.release_nodes(conn, nids, bool(prev.sim), now)
                sentinel_rows = (await conn.execute(
                    sa.select(sen.c.snid, sen.c.sentinel_id).where(sen.c.strategy_id == strategy_id))).all()
                for clause in self.sql.id_batches(sen_n.c.snid, [r.snid for r in sentinel_rows]):
                    await conn.execute(sa.delete(sen_n).where(clause))
                await conn.execute(sa.delete(sen).where(sen.c.strategy_id == strategy_id))
                await conn.execute(sa.delete(s).where(s.c.sid == prev.sid))
        sentinel_ids = sorted(r.sentinel_id for r in sentinel_rows)
        for sentinel_id in sentinel_ids:
            if self.metrics.sentinel_label.release(sentinel_id):
                with contextlib.suppress(KeyError):
                    self.metrics.sentinel_weight.remove(sentinel_id)
        return {"strategy_id": strategy_id, "released_nodes": len(nids), "released_queues": topics,
                "sentinels": sentinel_ids}


__all__ = ["StrategyReferences", "referenced"]
