"""A Gateway app on a test's :class:`~qmtl.common.clock.ManualClock`: the worlds proxy's
cache expiry and the backends' circuit breakers read the clock, so a test advances it instead
of sleeping through a ttl or a breaker's cool-off."""

from __future__ import annotations

from typing import Any

from qmtl.common.clock import ManualClock


def clocked_gateway(config: Any, clock: ManualClock, **kwargs: Any) -> Any:
    from qmtl.gateway.app import create_app

    return create_app(config, clock=clock, **kwargs)
