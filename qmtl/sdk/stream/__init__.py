"""The event-stream client: a consistent, live copy of activation, policy and queue state.

:class:`EventStream` does what SPEC §5 and ``specs/asyncapi.yaml`` ask of a client:

1. ``POST /events/subscribe`` → a descriptor (``stream_url``, ``token``, ``expires_at``,
   ``fallback_url``); connect to ``stream_url`` with ``Authorization: Bearer <token>``.
2. Apply the first frame per topic — a full ``snapshot`` — then the change frames in order.
   Duplicates are dropped (a frame whose ``seq`` is not newer than the last applied one of
   the same Gateway process; an entry whose ``etag`` is already held). Every state frame's
   ``statehash`` is checked against the hash of the local copy (:mod:`qmtl.sdk.state`).
3. Refresh the token before ``expires_at`` (at ``refresh_at`` of its lifetime, read from the
   token's own ``iat``/``exp`` so clock skew does not matter); the open stream gets the new
   token (``{"type": "refresh", "token": ...}``, or the Gateway closes it at the old token's
   expiry), and reconnects use the newest.
4. Reconnect with jittered exponential backoff, resuming from the last applied frame
   (``?last_event_id=``): the Gateway replays exactly what was missed, or sends a fresh
   snapshot when it cannot (another process, a restart). ``stream_url`` is always tried
   first; after ``fallback_after`` failed rounds ``fallback_url`` is tried right after it,
   and a stream on the fallback route goes back to ``stream_url`` after
   ``primary_retry_interval`` seconds (resuming, so nothing is lost in the switch).
5. Check against the source of truth over HTTP (``GET /worlds/{id}/activations``,
   ``/worlds/{id}/policies``, ``/queues/by_tag``) after every snapshot, after connecting
   to the fallback route (which sends no snapshot), and when a ``statehash`` disagrees; the
   newer entry wins. While the stream stays down longer than ``reconcile_after`` seconds
   it reconciles over HTTP every ``reconcile_interval`` seconds, so the copy stays current.

Tuning (backoff, fallback, refresh, reconcile, timeouts, buffer) is one :class:`StreamOptions`::

    EventStream(client, world_id="w", options=StreamOptions(reconnect_max=0.5, reconcile_after=1.0))

Consume changes with a callback (``on_event``) or as an async iterator::

    async with EventStream(client, world_id="crypto-mom", topics=["activation"]) as stream:
        async for event in stream:
            print(event.type, event.data)

Each :class:`StreamEvent` says where it came from: ``stream`` (a frame), ``snapshot`` (an
entry that changed while disconnected, found in a fresh snapshot) or ``reconcile`` (found
over HTTP). :attr:`EventStream.state` is the current copy; :meth:`EventStream.fresh`
tells whether it can be trusted right now (see :class:`qmtl.sdk.ActivationGate`).

Modules, one concept each:

* :mod:`~qmtl.sdk.stream.eventstream` — :class:`EventStream`: composes the parts below; lifecycle, ``async for``.
* :mod:`~qmtl.sdk.stream.options` — :class:`StreamOptions`: the tuning knobs, defaults and bounds (and the deprecated keywords).
* :mod:`~qmtl.sdk.stream.subscription` — topics, world, strategy, queue keys (normalised).
* :mod:`~qmtl.sdk.stream.session` — descriptor and token refresh, connect/reconnect/backoff, fallback and primary retry, reconcile while down.
* :mod:`~qmtl.sdk.stream.transport` — the WebSocket connection (open timeout, frames, close codes) behind a narrow ``Transport`` protocol.
* :mod:`~qmtl.sdk.stream.sync` — frames into the copy: position, snapshots, de-duplication, state hashes, checks against the source of truth.
* :mod:`~qmtl.sdk.stream.health` — status, route, last contact, last in sync: :meth:`EventStream.fresh`.
* :mod:`~qmtl.sdk.stream.events` — :class:`StreamEvent`, :class:`StreamStats`, delivery to listeners or the ``async for`` buffer.
"""

from .events import StreamEvent, StreamStats
from .eventstream import EventStream
from .options import StreamOptions

__all__ = ["EventStream", "StreamEvent", "StreamOptions", "StreamStats"]
