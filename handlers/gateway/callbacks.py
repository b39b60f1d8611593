"""Compatibility callback from the DAG Manager (SPEC §5): legacy bodies (keyed by ``event``
or CloudEvents 1.0), and versioned envelopes, validated by the spec
(``dag_event.schema.json``), fed into the same relay path as ControlBus events.

Service-to-service only: the spec's ``serviceToken`` scheme (the service token, or a
trusted source network) is checked by the security middleware before the body is read;
a caller's JWT never gets here. Logic: :mod:`qmtl.gateway.events.callbacks`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from connexion import request

from qmtl.common import tracing
from qmtl.gateway.events.callbacks import relay_callback

if TYPE_CHECKING:
    from qmtl.gateway.service import Gateway


async def dag_event(ctx: Gateway, body):
    with tracing.continued(request.headers):  # the frames it causes carry the caller's traceparent
        outcome = relay_callback(ctx.events, body, max_skew=ctx.config.gateway.callbacks.max_clock_skew)
    return {"accepted": True, "duplicate": outcome != "applied"}, 202
