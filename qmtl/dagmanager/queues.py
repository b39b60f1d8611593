"""The queue catalogue: queues by tag (a tag query, registered as a watch), the queue
list, and one node with its queues, strategies and sentinels (``GET /nodes/{id}``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import sqlalchemy as sa

from qmtl.common.errors import BadRequest, NotFound
from qmtl.contracts.constants import DEFAULT_MATCH_MODE
from qmtl.store.sql import Database

from . import store
from .errors import database_errors
from .metrics import DagManagerMetrics
from .tagindex import QueueNotifier, TagKey, etag_of, iso, match, register_watches
from .transactions import Transactions


class QueueCatalogue:
    def __init__(self, db: Database, txn: Transactions, sql: store.SqlHelpers, *, notifier: QueueNotifier,
                 metrics: DagManagerMetrics, clock: Callable[[], float]) -> None:
        self.db = db
        self.txn = txn
        self.sql = sql
        self.notifier = notifier
        self.metrics = metrics
        self.clock = clock

    async def by_tag(self, tags: Iterable[str], interval: int, match_mode: str = DEFAULT_MATCH_MODE) -> dict:
        key = TagKey.of(tags, interval, match_mode)
        if not key.tags:
            raise BadRequest("tags must name at least one non-blank tag",
                             ext={"errors": [{"parameter": "tags", "message": "no non-blank tag"}]})
        with database_errors():
            async with self.db.connect() as conn:
                queues = await match(conn, key)
            if key.watch_key not in self.notifier.known_watches:
                async with self.txn.write() as conn:
                    new = await register_watches(conn, self.sql, {key: queues}, self.clock())
                self.notifier.known_watches.add(key.watch_key)
                self.metrics.tag_watches.set(len(self.notifier.known_watches))
                # a queue change that raced this registration is still announced
                self.notifier.recheck(new)
        return {
            "queues": queues,
            "etag": etag_of(key, queues),
            "tags": list(key.tags),
            "interval": key.interval,
            "match_mode": key.match_mode,
        }

    def _queue_select(self) -> Any:
        q, n = store.queues, store.nodes
        return sa.select(q, n.c.node_id).select_from(q.join(n, n.c.nid == q.c.nid))

    async def list_queues(self, *, limit: int = 100, offset: int = 0, tag: str | None = None) -> dict:
        q, qt = store.queues, store.queue_tags
        where = []
        if tag:
            where.append(q.c.qid.in_(sa.select(qt.c.qid).where(qt.c.tag == tag)))
        with database_errors():
            async with self.db.connect() as conn:
                total = (await conn.execute(sa.select(sa.func.count()).select_from(q).where(*where))).scalar_one()
                rows = (await conn.execute(
                    self._queue_select().where(*where).order_by(q.c.topic).limit(limit).offset(offset)
                )).all()
                refs = await self._reference_counts(conn, rows)
        out = [_queue_body(r, refs.get((r.nid, bool(r.sim)), 0)) for r in rows]
        return {"queues": out, "total": int(total), "limit": limit, "offset": offset}

    async def _reference_counts(self, conn: Any, rows: Sequence[Any]) -> dict[tuple[int, bool], int]:
        if not rows:
            return {}
        sn, s = store.strategy_nodes, store.strategies
        stmt = (
            sa.select(sn.c.nid, s.c.sim, sa.func.count())
            .select_from(sn.join(s, s.c.sid == sn.c.sid))
            .group_by(sn.c.nid, s.c.sim)
        )
        out: dict[tuple[int, bool], int] = {}
        for nid, sim, count in await self.sql.select_in(conn, stmt, sn.c.nid, sorted({r.nid for r in rows})):
            out[(nid, bool(sim))] = int(count)
        return out

    async def get_node(self, node_id: str) -> dict:
        n, q, sn, s = store.nodes, store.queues, store.strategy_nodes, store.strategies
        sen, sen_n = store.sentinels, store.sentinel_nodes
        with database_errors():
            async with self.db.connect() as conn:
                row = (await conn.execute(sa.select(n).where(n.c.node_id == node_id))).first()
                if row is None:
                    raise NotFound(f"node {node_id!r} is not in the graph")
                qrows = (await conn.execute(self._queue_select().where(q.c.nid == row.nid).order_by(q.c.topic))).all()
                refs = await self._reference_counts(conn, qrows)
                strategies = [r[0] for r in (await conn.execute(
                    sa.select(s.c.strategy_id).select_from(sn.join(s, s.c.sid == sn.c.sid))
                    .where(sn.c.nid == row.nid).order_by(s.c.strategy_id).limit(100))).all()]
                sentinels = [r[0] for r in (await conn.execute(
                    sa.select(sen.c.sentinel_id).select_from(sen_n.join(sen, sen.c.snid == sen_n.c.snid))
                    .where(sen_n.c.nid == row.nid).order_by(sen.c.sentinel_id).limit(100))).all()]
        body: dict[str, Any] = {
            "node_id": row.node_id,
            "node_type": row.node_type,
            "code_hash": row.code_hash,
            "config_hash": row.config_hash,
            "schema_hash": row.schema_hash,
            "tags": store.loads(row.tags),
            "created_at": iso(row.created_at),
            "queues": [_queue_body(r, refs.get((r.nid, bool(r.sim)), 0)) for r in qrows],
            "strategies": strategies,
            "sentinels": sentinels,
        }
        if row.interval is not None:
            body["interval"] = row.interval
        if row.period is not None:
            body["period"] = row.period
        return body


def _queue_body(r: Any, references: int) -> dict:
    """A Queue body from a row of :meth:`QueueCatalogue._queue_select`."""
    body = {
        "topic": r.topic,
        "node_id": r.node_id,
        "node_type": r.node_type,
        "tags": store.loads(r.tags),
        "interval": int(r.interval),
        "sim": bool(r.sim),
        "created_at": iso(r.created_at),
        "ttl_seconds": int(r.ttl_seconds),
        "references": references,
    }
    if r.released_at is not None:
        body["released_at"] = iso(r.released_at)
    return body


__all__ = ["QueueCatalogue"]
