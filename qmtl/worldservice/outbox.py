"""WorldService's transactional outbox: :class:`qmtl.store.outbox.Outbox` on ``ws_outbox``,
keyed by world (see that module for order, retries and several processes).

Per-world order holds because every write transaction on a world first updates the
world's row (a row lock in PostgreSQL, the database write lock in SQLite), so outbox
rows of one world get increasing ``seq`` in commit order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qmtl.bus.base import ControlBus
from qmtl.contracts.events import event_validators
from qmtl.store import outbox as shared
from qmtl.store.sql import Database
from qmtl.worldservice import store
from qmtl.worldservice.metrics import WorldServiceMetrics


class Outbox(shared.Outbox):
    def __init__(self, db: Database, bus: ControlBus, metrics: WorldServiceMetrics, *, poll_interval: float = 1.0) -> None:
        super().__init__(
            db,
            bus,
            store.outbox,
            validate=event_validators().validate,
            metrics=shared.OutboxMetrics(
                published=lambda topic: metrics.events_published.labels(topic).inc(),
                failed=metrics.publish_failures.inc,
                dropped=metrics.events_dropped.inc,
                pending=metrics.outbox_pending,
                oldest_age=metrics.outbox_oldest_age,
            ),
            poll_interval=poll_interval,
            name="worldservice-outbox",
        )

    async def add(self, conn: Any, topic: str, world_id: str, event: Mapping[str, Any], **extra: Any) -> None:  # type: ignore[override]
        """Queue ``event`` for ``world_id`` (its key) in the caller's transaction."""
        await super().add(conn, topic, world_id, event, world_id=world_id, **extra)
