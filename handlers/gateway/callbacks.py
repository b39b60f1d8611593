"""Compatibility callback from the DAG Manager (SPEC §5): legacy bodies and versioned
envelopes, validated by the spec (``dag_event.schema.json``), fed into the same relay path
as ControlBus events.

Who may call it: in development auth mode anyone (the embedded default); otherwise a
caller with a valid bearer JWT, or one presenting the Gateway's service token
(``X-QMTL-Service-Token``), which is how services on the control plane authenticate.
"""

from __future__ import annotations

import hmac

from connexion import request

from qmtl.bus.base import TOPIC_ACTIVATION, TOPIC_POLICY, TOPIC_QUEUES
from qmtl.common import tracing
from qmtl.common.errors import Unprocessable

_ENVELOPE_TOPICS = {"ActivationUpdated": TOPIC_ACTIVATION, "PolicyUpdated": TOPIC_POLICY, "QueueUpdated": TOPIC_QUEUES}


async def _authorise(ctx) -> None:
    token = ctx.config.gateway.service_token
    presented = request.headers.get("x-qmtl-service-token")
    if token and presented and hmac.compare_digest(token.encode(), presented.encode()):
        return
    await ctx.auth.authenticate(request.headers)


async def dag_event(ctx, body):
    await _authorise(ctx)
    with tracing.continued(request.headers):  # the frames it causes carry the caller's traceparent
        return _relay(ctx.events, body)


def _relay(events, body):
    try:
        if "event" in body:
            if body["event"] == "queue_update":
                outcome, _ = events.apply_queue_update(body["data"], source="callback")
            else:
                outcome, _ = events.apply_sentinel_weight(body["data"], source="callback")
        else:
            outcome, _ = events.apply_event(_ENVELOPE_TOPICS[body["type"]], body, source="callback")
    except (ValueError, KeyError) as exc:
        raise Unprocessable(f"cannot relay this event: {exc}") from None
    return {"accepted": True, "duplicate": outcome != "applied"}, 202
