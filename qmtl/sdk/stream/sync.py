"""Sync: frames into the local copy, and the copy against the sources of truth.

* the stream position: the Gateway process (``epoch``) and ``seq`` of the last applied frame,
  ``last_event_id`` to resume from, and whether the next connection must ask for a snapshot;
* snapshots (replace a topic, emit what changed while away), change frames (ordered,
  de-duplicated by ``seq`` and by ``etag``), ``statehash`` checks;
* verification over HTTP (``GET /worlds/{id}/activations``, ``/worlds/{id}/policies``,
  ``/queues/by_tag``): after a snapshot, after a fallback connection, on a hash mismatch; the
  newer entry wins; :meth:`Sync.reconcile` does every topic at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from qmtl.sdk.client import GatewayClient
from qmtl.sdk.errors import NotImplementedByGateway, QmtlError
from qmtl.sdk.state import QueueKey, StreamState, normalise_queue_key, queue_snapshot_hash
from qmtl.sdk.types import SIDE_VALUES, TOPIC_VALUES

from .events import StreamEvent, StreamStats
from .health import StreamHealth
from .subscription import Subscription

__all__ = ["Sync", "position"]

log = logging.getLogger("qmtl.sdk.stream")

Emit = Callable[[StreamEvent], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]


class Sync:
    def __init__(
        self,
        client: GatewayClient,
        subscription: Subscription,
        *,
        emit: Emit,
        stats: StreamStats,
        health: StreamHealth,
        resync: Callable[[], Awaitable[None]],
        verify_with_source: bool,
        include_heartbeats: bool,
        monotonic: Callable[[], float],
        sleep: Sleep,
    ) -> None:
        self.client = client
        self.sub = subscription
        self.state = StreamState()
        self._emit = emit
        self.stats = stats
        self.health = health
        self._resync = resync  # a hash disagrees and nothing is verified over HTTP: reconnect for a snapshot
        self.verify_with_source = verify_with_source
        self.include_heartbeats = include_heartbeats
        self._monotonic = monotonic
        self._sleep = sleep
        # the position in the stream
        self.epoch: str | None = None
        self.last_seq = -1
        self.last_event_id: str | None = None
        self.resnapshot = False  # the next connection asks for a snapshot instead of resuming
        self.pending_snapshots: set[str] = set()
        # checks against the source of truth
        self.verify_tasks: dict[tuple[str, str | None], asyncio.Task[None]] = {}
        self._last_verify: dict[tuple[str, str | None], float] = {}

    def resume_from(self) -> str | None:
        """The frame id to resume after (None: the next connection starts with a snapshot)."""
        return None if self.resnapshot else self.last_event_id

    def connected(self, route: str, *, resuming: bool) -> None:
        """A connection is open: expect a snapshot of every topic unless it resumes (the
        fallback route sends none)."""
        self.resnapshot = False
        self.pending_snapshots = set(self.sub.topics) if route == "stream" and not resuming else set()

    # -- frames ----------------------------------------------------------------------------------------
    async def on_text(self, text: str | bytes, route: str) -> None:
        try:
            frame = json.loads(text)
        except ValueError:
            log.warning("event stream: a frame that is not JSON was skipped")
            return
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            return
        self.health.heard()
        self.stats.frames += 1
        ftype = frame["type"]
        fid = frame.get("id") if isinstance(frame.get("id"), str) else None
        epoch, seq = position(fid, frame.get("seq"))
        data = frame.get("data")
        if ftype == "heartbeat":
            if epoch is not None and epoch == self.epoch and seq is not None and seq >= self.last_seq:
                self.last_seq = seq
                self.last_event_id = fid
            if self.include_heartbeats:
                await self._emit(StreamEvent("heartbeat", data, "stream", fid, seq, frame=frame))
            return
        if ftype == "snapshot":
            await self._on_snapshot(frame, data, fid, epoch, seq)
            return
        # a change frame
        if epoch is not None and seq is not None:
            if epoch == self.epoch:
                if seq <= self.last_seq:
                    self.stats.duplicates += 1
                    return
            else:
                if self.epoch is not None and self.verify_with_source:
                    # another Gateway process without a snapshot (the legacy route): what
                    # happened in between is confirmed over HTTP
                    self.schedule_verify_all()
                self.epoch = epoch
            self.last_seq = seq
            self.last_event_id = fid
        await self._on_change(ftype, data, frame, fid, seq)

    async def _on_snapshot(self, frame: dict[str, Any], data: Any, fid: str | None, epoch: str | None, seq: int | None) -> None:
        if not isinstance(data, dict) or data.get("topic") not in TOPIC_VALUES:
            return
        topic = data["topic"]
        if epoch is not None:
            self.epoch = epoch
        if seq is not None:
            self.last_seq = seq
        if fid:
            self.last_event_id = fid
        self.stats.snapshots += 1
        had_state = self.health.synced.is_set()
        items = data.get("items") or []
        changes: list[StreamEvent] = []
        world_id = data.get("world_id") or self.sub.world_id
        if topic == "activation" and world_id:
            changed = self.state.replace_activation(world_id, [i for i in items if isinstance(i, dict)])
            local = self.state.activation_hash(world_id)
            changes = [StreamEvent("activation_updated", e, "snapshot", fid, seq, world_id) for e in changed]
        elif topic == "policy" and world_id:
            changed = self.state.replace_policies(world_id, [i for i in items if isinstance(i, dict)])
            local = self.state.policy_hash(world_id)
            changes = [StreamEvent("policy_updated", e, "snapshot", fid, seq, world_id) for e in changed]
        else:
            keys = []
            for item in items:
                if not isinstance(item, dict):
                    continue
                try:
                    key = normalise_queue_key(item["tags"], item["interval"], item.get("match_mode"))
                except (KeyError, ValueError, TypeError):
                    continue
                keys.append(key)
                if self.state.apply_queues(key, item.get("queues") or [], item.get("etag")):
                    changes.append(StreamEvent("queue_update", queue_data(key, item.get("queues") or [], item.get("etag")),
                                               "snapshot", fid, seq))
            local = queue_snapshot_hash(h for h in (self.state.queue_hash(k) for k in keys) if h is not None)
        if data.get("state_hash") and data["state_hash"] != local:
            self.stats.hash_mismatches += 1
            log.warning("event stream: %s snapshot hash %s does not match its items (%s)", topic, data["state_hash"], local)
        await self._emit(StreamEvent("snapshot", data, "stream", fid, seq, world_id if topic != "queues" else None, frame))
        if had_state:
            for ev in changes:
                await self._emit(ev)
        self.pending_snapshots.discard(topic)
        if not self.pending_snapshots:
            self.health.mark_synced()
        if self.verify_with_source:
            self.schedule_verify(topic, world_id if topic != "queues" else None, min_interval=0.0)

    async def _on_change(self, ftype: str, data: Any, frame: dict[str, Any], fid: str | None, seq: int | None) -> None:
        if not isinstance(data, dict):
            return
        statehash = frame.get("statehash") if isinstance(frame.get("statehash"), str) else None
        if ftype == "activation_updated":
            world_id = str(data.get("world_id") or "")
            if not self.state.apply_activation(data):
                self.stats.duplicates += 1
                return
            await self._check_hash("activation", world_id, statehash, self.state.activation_hash(world_id))
            await self._emit(StreamEvent(ftype, data, "stream", fid, seq, world_id, frame))
        elif ftype == "policy_updated":
            world_id = str(data.get("world_id") or "")
            if not self.state.apply_policy(data):
                self.stats.duplicates += 1
                return
            await self._check_hash("policy", world_id, statehash, self.state.policy_hash(world_id))
            await self._emit(StreamEvent(ftype, data, "stream", fid, seq, world_id, frame))
        elif ftype == "queue_update":
            try:
                key = normalise_queue_key(data["tags"], data["interval"], data.get("match_mode"))
            except (KeyError, ValueError, TypeError):
                return
            if not self.state.apply_queues(key, data.get("queues") or [], data.get("etag")):
                self.stats.duplicates += 1
                return
            await self._check_hash("queues", None, statehash, self.state.queue_hash(key))
            await self._emit(StreamEvent(ftype, data, "stream", fid, seq, None, frame))
        elif ftype == "sentinel_weight":
            sid = data.get("sentinel_id")
            if isinstance(sid, str) and isinstance(data.get("weight"), (int, float)):
                self.state.apply_sentinel(sid, data["weight"])
            await self._emit(StreamEvent(ftype, data, "stream", fid, seq, None, frame))
        else:  # progress, queue_map and whatever else the Gateway adds
            await self._emit(StreamEvent(ftype, data, "stream", fid, seq, None, frame))

    async def _check_hash(self, topic: str, world_id: str | None, theirs: str | None, ours: str | None) -> None:
        if theirs is None or theirs == ours:
            return
        self.stats.hash_mismatches += 1
        log.info("event stream: %s state hash differs from the Gateway's (%s vs %s); checking the source",
                 topic, (ours or "")[:12], theirs[:12])
        if self.verify_with_source:
            self.schedule_verify(topic, world_id, min_interval=1.0)
        else:
            self.resnapshot = True
            await self._resync()

    # -- the source of truth over HTTP ----------------------------------------------------------------------
    def schedule_verify_all(self) -> None:
        for topic in self.sub.topics:
            self.schedule_verify(topic, self.sub.world_of(topic), min_interval=0.0)

    def schedule_verify(self, topic: str, world_id: str | None, *, min_interval: float) -> None:
        key = (topic, world_id)
        running = self.verify_tasks.get(key)
        if running is not None and not running.done():
            return
        delay = self._last_verify.get(key, -1e9) + min_interval - self._monotonic()
        self.verify_tasks[key] = asyncio.create_task(self._verify_later(max(0.0, delay), topic, world_id),
                                                     name=f"qmtl-verify-{topic}")

    async def _verify_later(self, delay: float, topic: str, world_id: str | None) -> None:
        if delay > 0:  # checked moments ago: once more after the interval, not never
            await self._sleep(delay)
        await self._verify(topic, world_id, "snapshot")

    async def _verify(self, topic: str, world_id: str | None, source: str) -> bool:
        """Compare with the source of truth over HTTP and take its entries where newer."""
        self._last_verify[(topic, world_id)] = self._monotonic()
        try:
            changes = await self._sync_topic(topic, world_id)
        except QmtlError as exc:
            log.info("event stream: cannot reach the source of truth for %s (%s)", topic, exc)
            return False
        self.stats.verifications += 1
        if changes:
            self.stats.corrections += 1
            log.info("event stream: %d %s entr%s corrected from the source of truth", len(changes), topic,
                     "y" if len(changes) == 1 else "ies")
        for ev in changes:
            await self._emit(StreamEvent(ev[0], ev[1], "reconcile" if source == "reconcile" else "snapshot",
                                         world_id=world_id))
        return True

    async def _sync_topic(self, topic: str, world_id: str | None) -> list[tuple[str, dict[str, Any]]]:
        c = self.client
        if topic == "activation" and world_id:
            try:
                entries = (await c.list_activations(world_id)).get("activations") or []
            except NotImplementedByGateway:
                # a Gateway without the whole-set route: every side known here (and this
                # stream's strategy) one by one
                sides = set(self.state.activation.get(world_id) or {})
                if self.sub.strategy_id:
                    sides |= {(self.sub.strategy_id, side) for side in SIDE_VALUES}
                held = self.state.activation.get(world_id) or {}
                entries = [await c.get_activation(world_id, sid, side) for sid, side in sorted(sides)]
                # a safe default says nothing; an inactive side not held here may never have
                # existed (the answer is the same): for the gate, absent is inactive anyway
                entries = [e for e in entries if not str(e.get("etag", "")).startswith("safe-")
                           and (e.get("active") or (e["strategy_id"], e["side"]) in held)]
            changed = self.state.merge_activation(world_id, entries)
            return [("activation_updated", e) for e in changed]
        if topic == "policy" and world_id:
            body = await c.list_policies(world_id)
            items = [{
                "type": "PolicyUpdated", "version": 1, "world_id": world_id, "policy_version": int(p["version"]),
                "checksum": p.get("checksum"), "status": p.get("status"), "ts": p.get("created_at"),
            } for p in body.get("policies") or []]
            truth = _policy_hash_of(world_id, items)
            if truth == self.state.policy_hash(world_id):
                return []
            return [("policy_updated", e) for e in self.state.replace_policies(world_id, items)]
        if topic == "queues":
            keys = list(self.sub.queue_keys) or list(self.state.queues)
            out = []
            for key in keys:
                qbody = await c.queues_by_tag(list(key[0]), key[1], key[2])
                if self.state.apply_queues(key, qbody.get("queues") or [], qbody.get("etag")):
                    out.append(("queue_update", queue_data(key, qbody.get("queues") or [], qbody.get("etag"))))
            return out
        return []

    async def reconcile(self) -> bool:
        """Bring the copy up to date over HTTP now (every topic); True when all answered."""
        ok = True
        for topic in self.sub.topics:
            ok = await self._verify(topic, self.sub.world_of(topic), "reconcile") and ok
        if ok:
            self.stats.reconciles += 1
            self.health.mark_synced()
        return ok

    async def stop(self) -> None:
        tasks = list(self.verify_tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.verify_tasks.clear()


# -- helpers ---------------------------------------------------------------------------------------------
def position(fid: str | None, seq: Any) -> tuple[str | None, int | None]:
    """``<epoch>.<seq>[.<suffix>]`` → (epoch, seq)."""
    if not fid:
        return None, seq if isinstance(seq, int) else None
    parts = fid.split(".")
    if len(parts) >= 2 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None, seq if isinstance(seq, int) else None


def queue_data(key: QueueKey, queues: Iterable[str], etag: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {"tags": list(key[0]), "interval": key[1], "match_mode": key[2], "queues": sorted(set(queues))}
    if etag:
        data["etag"] = etag
    return data


def _policy_hash_of(world_id: str, items: list[dict[str, Any]]) -> str:
    tmp = StreamState()
    tmp.replace_policies(world_id, items)
    return tmp.policy_hash(world_id)
