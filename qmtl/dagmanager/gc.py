"""Garbage collection of queues: a queue no strategy of its namespace has referenced for
longer than its TTL is deleted with its topic and tag rows, and nodes left with nothing
leave the graph. The periodic pass runs once per interval across every replica on the
database (the ``gc`` lease, ``dm_leases``); a topic a concurrent diff re-used while GC
was deleting it is created again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from qmtl.common import logs
from qmtl.store.sql import Database

from . import store
from .errors import database_errors
from .metrics import DagManagerMetrics
from .strategies import referenced
from .tagindex import QueueChange, QueueNotifier, iso
from .topics import QueueTopics
from .transactions import Transactions

log = logging.getLogger(__name__)


class GarbageCollector:
    def __init__(self, db: Database, txn: Transactions, sql: store.SqlHelpers, *, topics: QueueTopics,
                 notifier: QueueNotifier, metrics: DagManagerMetrics, clock: Callable[[], float], instance_id: str) -> None:
        self.db = db
        self.txn = txn
        self.sql = sql
        self.topics = topics
        self.notifier = notifier
        self.metrics = metrics
        self.clock = clock
        self.instance_id = instance_id  # names this process in leases

    async def run(self) -> dict[str, Any]:
        """Collect queues no strategy has referenced for longer than their TTL."""
        q, qt, n, sn, sen_n = store.queues, store.queue_tags, store.nodes, store.strategy_nodes, store.sentinel_nodes
        now = self.clock()
        since = sa.func.coalesce(q.c.released_at, q.c.created_at)
        try:
            with database_errors():
                async with self.txn.write(exclusive=True) as conn:
                    rows = (await conn.execute(
                        sa.select(q.c.qid, q.c.topic, n.c.node_id, q.c.nid, q.c.sim, q.c.tags, q.c.interval, since.label("since"))
                        .select_from(q.join(n, n.c.nid == q.c.nid))
                        .where(since + q.c.ttl_seconds < now, ~referenced())
                        .order_by(q.c.topic)
                    )).all()
                    qids = [r.qid for r in rows]
                    for clause in self.sql.id_batches(qt.c.qid, qids):
                        await conn.execute(sa.delete(qt).where(clause))
                    for clause in self.sql.id_batches(q.c.qid, qids):
                        await conn.execute(sa.delete(q).where(clause))
                    # nodes left with no queue, no strategy and no sentinel edge leave the graph
                    orphan = sa.and_(
                        ~sa.select(sa.literal(1)).where(q.c.nid == n.c.nid).exists(),
                        ~sa.select(sa.literal(1)).where(sn.c.nid == n.c.nid).exists(),
                        ~sa.select(sa.literal(1)).where(sen_n.c.nid == n.c.nid).exists(),
                    )
                    for clause in self.sql.id_batches(n.c.nid, sorted({r.nid for r in rows})):
                        await conn.execute(sa.delete(n).where(clause, orphan))
        except Exception:
            self.metrics.gc_runs.labels("error").inc()
            raise
        self.metrics.gc_runs.labels("ok").inc()
        self.metrics.queues_collected.inc(len(rows))
        for r in rows:
            try:
                await self.topics.admin.delete(r.topic)
            except Exception as exc:
                log.warning("deleting topic %s failed: %s", r.topic, exc)
        if rows:
            await self._recreate_reused_topics([r.topic for r in rows])
        self.notifier.queues_changed(
            [QueueChange(r.topic, tuple(store.loads(r.tags)), int(r.interval)) for r in rows if not r.sim]
        )
        if rows:
            log.info("GC collected %d queue(s)", len(rows))
        return {
            "collected": [{"topic": r.topic, "node_id": r.node_id, "unreferenced_since": iso(r.since)} for r in rows],
            "ran_at": iso(now),
        }

    async def _recreate_reused_topics(self, topics: list[str]) -> None:
        """A diff (of this or another replica) may have given a collected queue's name to a
        new queue between GC's commit and its topic deletion: create those topics again."""
        q = store.queues
        async with self.db.connect() as conn:
            reused = [r[0] for r in (await conn.execute(sa.select(q.c.topic).where(q.c.topic.in_(topics)))).all()]
        if reused:
            log.info("re-creating %d topic(s) a diff re-used while GC deleted them", len(reused))
            await self.topics.create(sorted(reused))

    async def claim_lease(self, name: str, seconds: float) -> bool:
        """Take the named lease for ``seconds`` unless another process holds it."""
        ls = store.leases
        now = self.clock()
        values = {"name": name, "owner": self.instance_id, "until": now + seconds}
        async with self.db.begin() as conn:
            inserted = await self.sql.insert_ignore_returning(conn, ls, [values], [ls.c.name])
            if inserted:
                return True
            res = await conn.execute(
                sa.update(ls)
                .where(ls.c.name == name, sa.or_(ls.c.until <= now, ls.c.owner == self.instance_id))
                .values(owner=self.instance_id, until=now + seconds)
            )
            return bool(res.rowcount == 1)

    async def loop(self, interval: float) -> None:
        """Run GC every ``interval`` seconds until cancelled, once per interval across every
        replica on the database (the ``gc`` lease); a failed pass is logged."""
        logs.label_task("dagmanager-gc")
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self.claim_lease("gc", interval * 0.9):
                    self.metrics.gc_skipped.inc()
                    continue
                await self.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("GC pass failed: %s", exc)


__all__ = ["GarbageCollector"]
