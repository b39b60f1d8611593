"""Readiness (``GET /ready``), separate from liveness (``GET /health``), for every service.

``/health`` says the process is up (a load balancer or orchestrator restarts it when not);
``/ready`` says it should receive traffic now (it is taken out of the pool when not). Each
service lists named checks; a check answers ``(ok, detail)`` (or just ``ok``) and is either
*required* (its failure makes the service not ready) or informative (reported, e.g. the
ControlBus of a WorldService, whose writes do not wait on the bus). Checks run concurrently,
each bounded by ``timeout``; a check that raises or hangs fails with the reason.

The answer: 200 ``{ready: true, service, checks}``; or 503 problem+json with ``reasons`` (one
line per failed required check), the same ``checks`` and ``Retry-After`` — the shape is
``specs/schemas/readiness.schema.json``, referenced by the three specs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

CheckFn = Callable[[], Awaitable["bool | tuple[bool, str]"]]


@dataclass(frozen=True)
class Check:
    name: str
    fn: CheckFn
    required: bool = True


async def _run(check: Check, timeout: float) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            result = await check.fn()
        ok, detail = result if isinstance(result, tuple) else (bool(result), "answers" if result else "does not answer")
    except TimeoutError:
        ok, detail = False, f"no answer within {timeout * 1000:.0f} ms"
    except Exception as exc:  # a check never breaks /ready
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    took = (time.perf_counter() - started) * 1000
    return {"ok": bool(ok), "required": check.required, "detail": f"{detail} ({took:.0f} ms)"}


async def evaluate(service: str, checks: list[Check], *, timeout: float = 3.0) -> tuple[bool, dict[str, Any]]:
    """Run ``checks``; ``(ready, body)``."""
    results = await asyncio.gather(*(_run(c, timeout) for c in checks))
    by_name = {c.name: r for c, r in zip(checks, results)}
    reasons = [f"{name}: {r['detail']}" for name, r in by_name.items() if r["required"] and not r["ok"]]
    body: dict[str, Any] = {"ready": not reasons, "service": service, "checks": by_name}
    if reasons:
        body["reasons"] = reasons
    return not reasons, body


def ready_response(ready: bool, body: dict[str, Any]) -> Any:
    """The ``/ready`` answer of a handler: the body, or 503 problem+json with the reasons."""
    if ready:
        return body
    from qmtl.contracts.app import problem_response

    detail = f"{body['service']} is not ready: " + "; ".join(body.get("reasons") or [])
    return problem_response(503, "Not Ready", detail, ext=body, headers={"Retry-After": "1"})


def bus_checks(bus: Any, service: str) -> list[Check]:
    """The ControlBus checks of a publishing service: *shared* (required: not the in-process
    bus of a process running this service alone) and *reachable* (reported: its writes do
    not wait on the bus)."""
    from qmtl.bus.base import CONTROL_TOPICS, isolation_problem

    kind = "in-process" if bus.in_process else "kafka"

    async def shared() -> tuple[bool, str]:
        problem = isolation_problem(bus, service)
        return (problem is None, problem or f"{kind} ControlBus shared with the other services")

    async def reachable() -> tuple[bool, str]:
        ends = await bus.end_offsets(CONTROL_TOPICS)
        return True, f"{kind} ControlBus answers ({len(ends or {})} partitions)"

    return [Check("controlbus", shared), Check("controlbus_reachable", reachable, required=False)]
