"""``POST /callbacks/dag-event``: what a DAG Manager (or another control-plane service) may
put into the relay, in each of the forms it has been sent in (``dag_event.schema.json``):

* legacy, keyed by ``event``: ``{event: queue_update|sentinel_weight, data}``;
* CloudEvents 1.0 structured JSON, keyed by ``type``: ``{specversion, id, source, type:
  queue_update|sentinel_weight, time, datacontenttype, data}`` — the same ``data``; the
  CloudEvent's ``time`` stands for ``data.ts`` when ``data`` has none;
* the versioned ControlBus envelopes (ActivationUpdated, PolicyUpdated, QueueUpdated).

Who may call is settled before this runs (the ``serviceToken`` scheme of the spec, see
:func:`qmtl.gateway.auth.spec_security`). Here: plausibility — an event time more than
``gateway.callbacks.max_clock_skew`` seconds ahead of the Gateway's clock is refused (422
naming the field), so a future ``ts`` never enters the state — and the relay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from qmtl.bus.base import TOPIC_ACTIVATION, TOPIC_POLICY, TOPIC_QUEUES
from qmtl.common.cloudevents import is_cloudevent
from qmtl.common.errors import Unprocessable

from . import state as st

ENVELOPE_TOPICS = {"ActivationUpdated": TOPIC_ACTIVATION, "PolicyUpdated": TOPIC_POLICY, "QueueUpdated": TOPIC_QUEUES}


def _check_time(value: Any, pointer: str, *, now: float, skew: float) -> None:
    moment = st.parse_ts(value)
    if moment is not None and moment > now + skew:
        msg = f"more than {skew:g} s in the future"
        raise Unprocessable(f"event time {pointer} is {value}, {msg} of this Gateway's clock",
                            ext={"errors": [{"pointer": pointer, "message": msg}]})


def relay_callback(events: Any, body: Mapping[str, Any], *, max_skew: float, clock: Callable[[], float] = time.time) -> str:
    """Check and relay one callback body; returns the outcome (applied, duplicate, stale)."""
    now = clock()
    try:
        if is_cloudevent(body):
            kind, data = body["type"], dict(body["data"])
            _check_time(body.get("time"), "/time", now=now, skew=max_skew)
            _check_time(data.get("ts"), "/data/ts", now=now, skew=max_skew)
            if "ts" not in data and isinstance(body.get("time"), str):
                data["ts"] = body["time"]
        elif "event" in body:
            kind, data = body["event"], body["data"]
            _check_time(data.get("ts"), "/data/ts", now=now, skew=max_skew)
        else:
            _check_time(body.get("ts"), "/ts", now=now, skew=max_skew)
            return events.apply_event(ENVELOPE_TOPICS[body["type"]], body, source="callback")[0]
        if kind == "queue_update":
            return events.apply_queue_update(data, source="callback")[0]
        return events.apply_sentinel_weight(data, source="callback")[0]
    except (ValueError, KeyError) as exc:
        raise Unprocessable(f"cannot relay this event: {exc}") from None
