"""StreamOptions: the event stream's tuning knobs, their defaults and their bounds in one place.

``EventStream(client, ..., options=StreamOptions(reconnect_max=0.5))``. The knobs were
keyword arguments of :class:`~qmtl.sdk.EventStream` before; those keywords are still
accepted (:func:`options_from_keywords` maps them onto an options object, with a
:class:`DeprecationWarning` naming ``options=``).
"""

from __future__ import annotations

import dataclasses
import random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LEGACY_KEYWORDS", "StreamOptions", "options_from_keywords"]


@dataclass(frozen=True)
class StreamOptions:
    """How the stream reconnects, refreshes, falls back and reconciles (seconds unless said).

    :param reconnect_base: first reconnect backoff; it doubles per failed round (jittered:
        a delay is drawn from ``[cap/2, cap]``).
    :param reconnect_max: the backoff's ceiling (also caps a failed token refresh's retry).
    :param fallback_after: failed rounds before ``fallback_url`` is tried after
        ``stream_url`` (at least 1).
    :param refresh_at: the fraction of the token's lifetime at which it is refreshed
        (clamped to ``[0.1, 0.95]``).
    :param reconcile_after: how long the stream must stay down before the copy is
        reconciled over HTTP ...
    :param reconcile_interval: ... and then how often.
    :param open_timeout: the WebSocket opening handshake's timeout.
    :param idle_timeout: nothing heard for this long (the Gateway sends heartbeats) → reconnect;
        a live stream heard from within it is fresh.
    :param refusal_grace: a connection closed within this long after opening was refused.
    :param primary_retry_interval: on the fallback route, go back to ``stream_url`` after this long.
    :param max_buffer: events held for ``async for`` without an ``on_event`` (oldest dropped; at least 1).
    :param rng: the backoff jitter's random source (a seeded ``random.Random`` makes it repeatable).
    """

    reconnect_base: float = 0.1
    reconnect_max: float = 5.0
    fallback_after: int = 2
    refresh_at: float = 0.75
    reconcile_after: float = 3.0
    reconcile_interval: float = 2.0
    open_timeout: float = 5.0
    idle_timeout: float = 45.0
    refusal_grace: float = 0.3
    primary_retry_interval: float = 30.0
    max_buffer: int = 10_000
    rng: random.Random | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Clamped, as EventStream always did: a fallback after at least one failed round, a
        # refresh neither absurdly early nor at the last moment.
        object.__setattr__(self, "fallback_after", max(1, int(self.fallback_after)))
        object.__setattr__(self, "refresh_at", min(max(float(self.refresh_at), 0.1), 0.95))
        object.__setattr__(self, "max_buffer", max(1, int(self.max_buffer)))
        for name in ("reconnect_base", "reconnect_max", "reconcile_after", "reconcile_interval", "open_timeout",
                     "idle_timeout", "refusal_grace", "primary_retry_interval"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"StreamOptions.{name} must be a number of seconds >= 0, not {value!r}")

    def replace(self, **changes: Any) -> StreamOptions:
        """A copy with some knobs changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def random(self) -> random.Random:
        """The jitter's random source: the one given, else a fresh one."""
        return self.rng if self.rng is not None else random.Random()


#: The tuning keywords EventStream took before ``options=`` (each one a StreamOptions field).
LEGACY_KEYWORDS = frozenset(f.name for f in dataclasses.fields(StreamOptions)) - {"refusal_grace"}


def options_from_keywords(options: StreamOptions | None, keywords: Mapping[str, Any], *,
                          stacklevel: int = 3) -> StreamOptions:
    """``options`` with the legacy tuning keywords applied on top (a DeprecationWarning names
    them and ``options=``); an unknown keyword is a TypeError, as it always was."""
    base = options if options is not None else StreamOptions()
    if not keywords:
        return base
    unknown = sorted(set(keywords) - LEGACY_KEYWORDS)
    if unknown:
        raise TypeError(f"EventStream() got an unexpected keyword argument {unknown[0]!r}")
    names = ", ".join(f"{k}=..." for k in sorted(keywords))
    warnings.warn(f"EventStream({names}): the tuning keywords are deprecated; pass options=StreamOptions({names})",
                  DeprecationWarning, stacklevel=stacklevel)
    return base.replace(**keywords)
