"""The DAG Manager's ``GET /ready`` checks (see :mod:`qmtl.common.readiness`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmtl.common.readiness import Check, bus_checks, evaluate

if TYPE_CHECKING:
    from .service import DagManagerService


async def readiness(service: DagManagerService) -> tuple[bool, dict]:
    async def database() -> tuple[bool, str]:
        ok, body = await service.health()
        return ok, f"answers ({body.get('queues', 0)} queues)" if ok else "does not answer"

    return await evaluate("dagmanager", [Check("database", database), *bus_checks(service.bus, "dagmanager")])
