"""The order gate: may this strategy side trade in this world right now?

:meth:`ActivationGate.is_active` answers **False unless it knows, from a fresh source,
that the side is active** — unknown, stale and unavailable all mean "orders gated off"
(SPEC §4: unknown or unavailable activation → ``active: false, weight: 0``). Its sources:

* an :class:`~qmtl.sdk.EventStream` following the world's ``activation`` topic: trusted
  while it is live, or within ``max_age`` seconds of its last contact / HTTP reconcile;
* ActivationEnvelopes fetched with :meth:`ActivationGate.refresh` (``GET
  /worlds/{id}/activation``), trusted for ``max_age`` seconds; the Gateway's safe default
  (etag ``safe-…``, WorldService unreachable) is inactive.

:meth:`ActivationGate.check` is the async variant that refreshes over HTTP first when
what it holds is stale or missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from .client import GatewayClient
from .errors import QmtlError
from .stream import EventStream
from .types import ActivationEnvelope

__all__ = ["ActivationGate"]


class ActivationGate:
    def __init__(
        self,
        client: GatewayClient | None = None,
        *,
        stream: EventStream | None = None,
        max_age: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if client is None:
            if stream is None:
                raise ValueError("an ActivationGate needs a GatewayClient, an EventStream, or both")
            client = stream.client
        self.client = client
        self.stream = stream
        self.max_age = float(max_age)
        self._clock = clock
        self._fetched: dict[tuple[str, str, str], tuple[float, Mapping[str, Any]]] = {}

    # -- answers -----------------------------------------------------------------------------
    def _stream_entry(self, world_id: str, strategy_id: str, side: str) -> tuple[bool, Mapping[str, Any] | None]:
        """(the stream is a fresh source for this world, its entry or None)."""
        s = self.stream
        if s is None or s.world_id != world_id or "activation" not in s.topics or not s.fresh(self.max_age):
            return False, None
        return True, s.state.activation_entry(world_id, strategy_id, side)

    def _fetched_entry(self, world_id: str, strategy_id: str, side: str) -> Mapping[str, Any] | None:
        held = self._fetched.get((world_id, strategy_id, side))
        if held is None or self._clock() - held[0] > self.max_age:
            return None
        return held[1]

    def entry(self, world_id: str, strategy_id: str, side: str) -> Mapping[str, Any] | None:
        """The freshest trusted entry, or None when there is none."""
        fresh, entry = self._stream_entry(world_id, strategy_id, side)
        if fresh:
            # a live stream that does not hold the side: the world never activated it
            return entry
        return self._fetched_entry(world_id, strategy_id, side)

    def is_active(self, world_id: str, strategy_id: str, side: str) -> bool:
        """True only when a fresh source says the side is active (orders may flow)."""
        e = self.entry(world_id, strategy_id, side)
        if e is None or str(e.get("etag", "")).startswith("safe-"):
            return False
        return bool(e.get("active"))

    def weight(self, world_id: str, strategy_id: str, side: str) -> float:
        """The side's weight when active, else 0."""
        if not self.is_active(world_id, strategy_id, side):
            return 0.0
        e = self.entry(world_id, strategy_id, side) or {}
        return float(e.get("weight") or 0.0)

    # -- refreshing over HTTP --------------------------------------------------------------------
    def observe(self, envelope: Mapping[str, Any]) -> None:
        """Record an ActivationEnvelope obtained elsewhere (now counts as its fetch time)."""
        key = (str(envelope["world_id"]), str(envelope["strategy_id"]), str(envelope["side"]))
        self._fetched[key] = (self._clock(), dict(envelope))

    async def refresh(self, world_id: str, strategy_id: str, side: str) -> ActivationEnvelope | None:
        """Fetch the side's activation from the Gateway; None (and the old entry dropped)
        when it cannot be had."""
        try:
            env = await self.client.get_activation(world_id, strategy_id, side)
        except QmtlError:
            self._fetched.pop((world_id, strategy_id, side), None)
            return None
        self.observe(env)
        return env

    async def check(self, world_id: str, strategy_id: str, side: str) -> bool:
        """:meth:`is_active`, refreshing over HTTP first when nothing fresh is held."""
        if self.entry(world_id, strategy_id, side) is None:
            fresh, _ = self._stream_entry(world_id, strategy_id, side)
            if not fresh:
                await self.refresh(world_id, strategy_id, side)
        return self.is_active(world_id, strategy_id, side)
