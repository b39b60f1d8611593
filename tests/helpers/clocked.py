"""A Gateway app on a test's :class:`~qmtl.common.clock.ManualClock`: the worlds proxy's
cache expiry and the WorldService backend's circuit breakers read the clock, so a test
advances it instead of sleeping through a ttl or a breaker's cool-off.

When the Gateway factory takes ``clock=`` (issue 13: ``create_app(config, ..., clock=...)``)
it is simply passed on. Until then the factory builds components from its context, so the
context class carries the clock (read by ``qmtl.gateway.worlds.build``) and the backends
are constructed with ``monotonic=`` while ``create_app`` runs; nothing is changed on an
object after it is built.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import pytest

from qmtl.common.clock import ManualClock


def clocked_gateway(config: Any, clock: ManualClock, **kwargs: Any) -> Any:
    from qmtl.gateway import app as gateway_app

    if "clock" in inspect.signature(gateway_app.create_app).parameters:
        return gateway_app.create_app(config, clock=clock, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gateway_app.GatewayContext, "clock", clock, raising=False)
        patch.setattr(gateway_app, "Backend", functools.partial(gateway_app.Backend, monotonic=clock.monotonic))
        return gateway_app.create_app(config, **kwargs)
