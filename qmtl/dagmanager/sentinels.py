"""Version sentinels: ``GET /sentinels/{id}`` and the traffic weight the Gateway sets
(``POST /callbacks/sentinel-traffic``), stored, exported as a metric and relayed back to
the Gateway's callback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from qmtl.common.errors import Conflict, NotFound
from qmtl.store.sql import Database

from . import store
from .callbacks import GatewayCallback
from .errors import database_errors
from .metrics import DagManagerMetrics
from .tagindex import iso
from .transactions import Transactions


class Sentinels:
    def __init__(self, db: Database, txn: Transactions, *, callback: GatewayCallback, metrics: DagManagerMetrics,
                 clock: Callable[[], float]) -> None:
        self.db = db
        self.txn = txn
        self.callback = callback
        self.metrics = metrics
        self.clock = clock

    async def get(self, sentinel_id: str) -> dict:
        sen, sen_n = store.sentinels, store.sentinel_nodes
        with database_errors():
            async with self.db.connect() as conn:
                row = (await conn.execute(sa.select(sen).where(sen.c.sentinel_id == sentinel_id))).first()
                if row is None:
                    raise NotFound(f"sentinel {sentinel_id!r} is not known")
                count = (await conn.execute(
                    sa.select(sa.func.count()).select_from(sen_n).where(sen_n.c.snid == row.snid))).scalar_one()
        return _sentinel_body(row, int(count))

    async def set_weight(self, *, weight: float, sentinel_id: str | None = None, version: str | None = None) -> dict:
        sen = store.sentinels
        now = self.clock()
        with database_errors():
            async with self.txn.write() as conn:
                if sentinel_id:
                    row = (await conn.execute(sa.select(sen).where(sen.c.sentinel_id == sentinel_id).with_for_update())).first()
                    if row is None:
                        raise NotFound(f"sentinel {sentinel_id!r} is not known")
                else:
                    rows = (await conn.execute(
                        sa.select(sen).where(sen.c.version == version).order_by(sen.c.sentinel_id).limit(11).with_for_update()
                    )).all()
                    if not rows:
                        rows = (await conn.execute(sa.select(sen).where(sen.c.sentinel_id == version).with_for_update())).all()
                    if not rows:
                        raise NotFound(f"no sentinel has version {version!r} (or that id)")
                    if len(rows) > 1:
                        names = [r.sentinel_id for r in rows[:10]]
                        raise Conflict(
                            f"version {version!r} names {len(rows) if len(rows) <= 10 else 'more than 10'} sentinels; "
                            f"give sentinel_id (one of {', '.join(names)})",
                            ext={"sentinels": names},
                        )
                    row = rows[0]
                await conn.execute(sa.update(sen).where(sen.c.sentinel_id == row.sentinel_id)
                                   .values(weight=float(weight), weight_updated_at=now))
        ts = iso(now)
        self.metrics.sentinel_weight.labels(self.metrics.sentinel_label(row.sentinel_id)).set(float(weight))
        relayed = self.callback.send("sentinel_weight", {"sentinel_id": row.sentinel_id, "weight": float(weight), "ts": ts})
        body: dict[str, Any] = {"sentinel_id": row.sentinel_id, "weight": float(weight), "ts": ts, "relayed": relayed}
        if row.version is not None:
            body["version"] = row.version
        if row.weight is not None:
            body["previous_weight"] = float(row.weight)
        return body


def _sentinel_body(row: Any, nodes: int) -> dict:
    body: dict[str, Any] = {
        "sentinel_id": row.sentinel_id,
        "strategy_id": row.strategy_id,
        "created_at": iso(row.created_at),
        "nodes": nodes,
    }
    if row.version is not None:
        body["version"] = row.version
    if row.weight is not None:
        body["weight"] = float(row.weight)
    if row.weight_updated_at is not None:
        body["weight_updated_at"] = iso(row.weight_updated_at)
    return body


__all__ = ["Sentinels"]
