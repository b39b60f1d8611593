"""The Gateway's event stream (SPEC §5): descriptors and tokens, the ControlBus consumer,
per-key state with snapshots and state hashes, and the WebSocket fan-out.

Modules: :mod:`.component` (the component the Gateway builds, and its API),
:mod:`.consumer` (ControlBus consumer: identity, commits, state rebuild, lag metrics),
:mod:`.state` (per-key state, idempotence and order, state hashes), :mod:`.hub`
(serialise-once fan-out, bounded per-client buffers, replay ring, heartbeats),
:mod:`.ws` (the ``/ws/evt`` and ``/ws`` ASGI routes), :mod:`.memory` (memory back to
the OS after a burst of closes), :mod:`.tokens` (signing keys, JWKS, descriptor tokens),
:mod:`.metrics`.
"""

from __future__ import annotations

from .component import EventsComponent

__all__ = ["EventsComponent"]
