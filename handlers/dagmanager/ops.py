"""GET /health, GET /metrics, POST /gc."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from connexion import request
from connexion.lifecycle import ConnexionResponse

from qmtl.common.metrics import exposition
from qmtl.contracts.app import problem_response

if TYPE_CHECKING:
    from qmtl.dagmanager.service import DagManagerService


async def health(ctx: DagManagerService) -> Any:
    ok, body = await ctx.health()
    if ok:
        return body
    return problem_response(503, "Service Unavailable", "the DAG Manager's database does not answer", ext=body,
                            headers={"Retry-After": "2"})


async def metrics(ctx: DagManagerService) -> ConnexionResponse:
    body, content_type = exposition(ctx.metrics.registry, request.headers.get("accept"))
    return ConnexionResponse(status_code=200, body=body, content_type=content_type)


async def run_gc(ctx: DagManagerService) -> dict[str, Any]:
    return await ctx.gc.run()


async def ready(ctx: DagManagerService) -> Any:
    from qmtl.common.readiness import ready_response
    from qmtl.dagmanager.readiness import readiness

    return ready_response(*await readiness(ctx))
