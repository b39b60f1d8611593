"""WorldService's ``GET /ready`` checks (see :mod:`qmtl.common.readiness`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmtl.common.readiness import Check, bus_checks, evaluate

if TYPE_CHECKING:
    from qmtl.worldservice.service import WorldService


async def readiness(service: WorldService) -> tuple[bool, dict]:
    async def database() -> tuple[bool, str]:
        ok = await service.db.ping()
        return ok, "answers" if ok else "does not answer"

    async def outbox() -> tuple[bool, str]:
        return True, f"{await service.outbox.pending()} event(s) waiting to be published"

    checks = [Check("database", database), *bus_checks(service.bus, "worldservice"), Check("outbox", outbox, required=False)]
    return await evaluate("worldservice", checks)
