"""The WorldService object: the parts of SPEC §6 composed over one repository.

Usable without HTTP: build one with :func:`qmtl.worldservice.app.create_service`,
``await start()``, and call its parts with an :class:`~qmtl.worldservice.rbac.Identity`
(``service.auth.identify(headers)`` or ``Identity.development(...)``), e.g.
``service.worlds.create(...)``, ``service.decisions.decide(...)``,
``service.applies.apply(...)``. Every operation checks the caller's role on the world,
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

import logging

from qmtl.bus.base import ControlBus
from qmtl.common.config import WorldServiceConfig
from qmtl.common.errors import ServiceUnavailable
from qmtl.store.sql import Database
from qmtl.worldservice import store
from qmtl.worldservice.activation import Activation
from qmtl.worldservice.apply import Applies
from qmtl.worldservice.audit import AuditLog
from qmtl.worldservice.decisions import Decisions
from qmtl.worldservice.metrics import WorldServiceMetrics
from qmtl.worldservice.outbox import Outbox
from qmtl.worldservice.plans import Plans
from qmtl.worldservice.policies import Policies
from qmtl.worldservice.rbac import Authenticator
from qmtl.worldservice.worlds import Worlds

logger = logging.getLogger(__name__)


class WorldService:
    """Holds the parts (built by :func:`~qmtl.worldservice.app.create_service`) and runs
    their lifecycle: tables, apply recovery, outbox publisher."""

    def __init__(
        self,
        cfg: WorldServiceConfig,
        *,
        db: Database,
        bus: ControlBus,
        metrics: WorldServiceMetrics,
        auth: Authenticator,
        outbox: Outbox,
        worlds: Worlds,
        policies: Policies,
        decisions: Decisions,
        activation: Activation,
        plans: Plans,
        applies: Applies,
        audit: AuditLog,
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.bus = bus
        self.metrics = metrics
        self.auth = auth
        self.outbox = outbox
        self.worlds = worlds
        self.policies = policies
        self.decisions = decisions
        self.activation = activation
        self.plans = plans
        self.applies = applies
        self.audit = audit

    async def start(self) -> None:
        """Create tables, roll back applies whose lease expired (their process died), and
        start the outbox publisher (it publishes what was committed and not published)
        and the periodic recovery of expired applies."""
        await self.db.create_all(store.metadata)
        added = await self.db.add_missing_columns(store.worlds)
        if added:
            logger.info("ws_worlds: added column(s) %s", ", ".join(added))
        await self.applies.start()
        await self.outbox.start()
        if self.cfg.rbac == "dev":
            logger.warning(
                "WorldService RBAC is in DEVELOPMENT mode: callers without a forwarded identity act as %r "
                "with every role on every world (set worldservice.rbac: enforce in production)",
                self.cfg.dev_subject,
            )

    async def stop(self) -> None:
        await self.applies.stop()
        await self.outbox.stop()

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
