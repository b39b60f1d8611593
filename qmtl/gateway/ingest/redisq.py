"""The Redis side of strategy ingest: the FSM state, the FIFO, and per-strategy locks.

Keys (all under the Gateway's ``kv_prefix``):

``fsm:{id}``      hash: ``status``, ``updated_at``, ``sentinel_id``, ``world_id``,
                  ``run_type``, ``queue_map``/``tag_queries`` (JSON, once diffed), ``error``.
                  Terminal states expire after ``terminal_ttl`` seconds; the database
                  mirror answers (and re-caches) after that.
``fifo``          list of strategy ids: LPUSH in, popped from the right (FIFO).
``processing``    list: the reliable-queue pattern — BLMOVE moves an id from ``fifo`` to
                  here atomically and the worker removes it only once it is done, so a
                  crash mid-processing leaves the id where the janitor finds it.
``lock:{id}``     ``SET NX PX 60000``: at most one worker per strategy. Released with a
                  compare-and-delete (WATCH/MULTI; no Lua, so the in-memory substitute works).
``epoch``         set once per Redis dataset; when it is gone, Redis lost its data and the
                  FSM is rebuilt from the database mirror.
``rebuild``       short lock so that one Gateway replica rebuilds at a time.

Round trips and commands are what a strategy costs here (each command is parsed and run by
Redis, or by the in-memory substitute in this process): consecutive states of one strategy are
one ``HSET`` (the hash ends the same), new submissions acknowledged together share one round
trip and one ``LPUSH`` (:meth:`RedisIngest.enqueue_new`), and a worker asks for more ids only
as many as the FIFO holds.

Every function raises ``redis.exceptions.RedisError`` (or ``OSError``) when Redis is down;
callers decide what that means.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import ResponseError, WatchError

from qmtl.contracts.constants import STRATEGY_STATES, StrategyState

LOCK_TTL_MS = 60_000
TERMINAL_TTL_S = 24 * 3600
STATES = STRATEGY_STATES  # the ingest FSM: strategy_status.schema.json's status enum
TERMINAL = (StrategyState.COMPLETED, StrategyState.FAILED)


_UNLOCK_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RedisIngest:
    def __init__(self, kv: Any, prefix: str, *, terminal_ttl: int = TERMINAL_TTL_S) -> None:
        self.kv = kv
        self.prefix = prefix
        self.terminal_ttl = terminal_ttl
        self.fifo = prefix + "fifo"
        self.processing = prefix + "processing"  # a Redis list name, not the FSM state
        self.epoch_key = prefix + "epoch"
        self.rebuild_key = prefix + "rebuild"
        self._unlock_script = kv.register_script(_UNLOCK_LUA)
        self._scripting: bool | None = None  # unknown until the first unlock
        # submissions waiting for the next shared enqueue round trip: (id, FSM fields, caller's future)
        self._enqueues: list[tuple[str, dict[str, str], bool, asyncio.Future[None]]] = []
        self._enqueue_task: asyncio.Task[None] | None = None

    def fsm_key(self, sid: str) -> str:
        return f"{self.prefix}fsm:{sid}"

    def lock_key(self, sid: str) -> str:
        return f"{self.prefix}lock:{sid}"

    # -- FSM --------------------------------------------------------------------------------
    @staticmethod
    def _fields(status: str, extra: Mapping[str, Any] | None, updated_at: str | None) -> dict[str, str]:
        fields = {"status": status, "updated_at": updated_at or now_iso()}
        for k, v in (extra or {}).items():
            if v is None:
                continue
            fields[k] = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
        return fields

    @classmethod
    def _merged(cls, states: list[tuple[str, Mapping[str, Any] | None]], updated_at: str | None) -> dict[str, str]:
        """Consecutive states as the one ``HSET`` that leaves the hash as they would in turn
        (later fields win; the status is the last one)."""
        stamp = updated_at or now_iso()
        fields: dict[str, str] = {}
        for status, extra in states:
            fields.update(cls._fields(status, extra, stamp))
        return fields

    async def set_state(self, sid: str, status: str, extra: Mapping[str, Any] | None = None, *, updated_at: str | None = None,
                        persist: bool = False) -> None:
        await self.set_states(sid, [(status, extra)], updated_at=updated_at, persist=persist)

    async def set_states(self, sid: str, states: list[tuple[str, Mapping[str, Any] | None]], *, updated_at: str | None = None,
                         persist: bool = False) -> None:
        """Consecutive states, in order, in one round trip (the mirror is the durable copy)."""
        key = self.fsm_key(sid)
        async with self.kv.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=self._merged(states, updated_at))
            if states[-1][0] in TERMINAL:
                pipe.expire(key, self.terminal_ttl)
            elif persist:
                pipe.persist(key)  # only a restore can bring a finished (expiring) hash back to life
            await pipe.execute()

    async def set_states_many(self, items: list[tuple[str, list[tuple[str, Mapping[str, Any] | None]]]]) -> None:
        """:meth:`set_states` for several strategies, in one round trip."""
        if not items:
            return
        async with self.kv.pipeline(transaction=False) as pipe:
            stamp = now_iso()
            for sid, states in items:
                key = self.fsm_key(sid)
                pipe.hset(key, mapping=self._merged(states, stamp))
                if states[-1][0] in TERMINAL:
                    pipe.expire(key, self.terminal_ttl)
            await pipe.execute()

    async def enqueue_new(self, sid: str, extra: Mapping[str, Any], *, push: bool = True) -> None:
        """State ``queued`` and the id on the FIFO (no MULTI needed: if the push is lost the
        database mirror still has the strategy and the sweep re-enqueues it). ``push=False``
        sets the state only (the id waits in the Gateway's fallback queue).

        Submissions acknowledged together (one mirror commit resolves them all at once) share
        one round trip: every call made before the event loop's next turn joins it, with one
        ``HSET`` each and one ``LPUSH`` of all their ids in call order (FIFO order kept). Each
        caller returns when that round trip is done and gets its error if it failed."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueues.append((sid, self._fields(StrategyState.QUEUED, extra, None), push, fut))
        if self._enqueue_task is None or self._enqueue_task.done():
            self._enqueue_task = asyncio.create_task(self._enqueue_pending(), name="ingest-enqueue")
        await asyncio.shield(fut)  # a cancelled caller does not cancel the others' round trip

    async def _enqueue_pending(self) -> None:
        while self._enqueues:
            batch, self._enqueues = self._enqueues, []
            try:
                async with self.kv.pipeline(transaction=False) as pipe:
                    for sid, fields, _, _ in batch:
                        pipe.hset(self.fsm_key(sid), mapping=fields)
                    pushed = [sid for sid, _, push, _ in batch if push]
                    if pushed:
                        pipe.lpush(self.fifo, *pushed)
                    await pipe.execute()
            except BaseException as exc:
                for _, _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError(f"enqueue interrupted: {exc!r}"))
                if not isinstance(exc, Exception):
                    for _, _, _, fut in self._enqueues:
                        if not fut.done():
                            fut.set_exception(RuntimeError(f"enqueue interrupted: {exc!r}"))
                    self._enqueues = []
                    raise
                continue
            for _, _, _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    async def get_state(self, sid: str) -> dict[str, Any] | None:
        raw = await self.kv.hgetall(self.fsm_key(sid))
        if not raw:
            return None
        out: dict[str, Any] = dict(raw)
        for k in ("queue_map", "tag_queries"):
            if k in out:
                try:
                    out[k] = json.loads(out[k])
                except ValueError:
                    out.pop(k)
        return out

    async def get_status(self, sid: str) -> str | None:
        return await self.kv.hget(self.fsm_key(sid), "status")

    # -- FIFO -------------------------------------------------------------------------------
    async def push(self, *sids: str) -> None:
        if sids:
            await self.kv.lpush(self.fifo, *sids)

    async def push_front(self, *sids: str) -> None:
        """Back to the head of the line (popped next)."""
        if sids:
            await self.kv.rpush(self.fifo, *sids)

    async def pop(self, timeout: float) -> str | None:
        """Move the oldest id from ``fifo`` to ``processing`` (blocking up to ``timeout``)."""
        return await self.kv.blmove(self.fifo, self.processing, timeout, "RIGHT", "LEFT")

    async def pop_more(self, n: int) -> list[str]:
        """Up to ``n`` more ids from ``fifo`` to ``processing`` without blocking, in one round
        trip (a worker that got one id takes whatever else is waiting: one batch)."""
        if n <= 0:
            return []
        n = min(n, int(await self.kv.llen(self.fifo)))  # no LMOVE that can only come back empty
        if n <= 0:
            return []
        async with self.kv.pipeline(transaction=False) as pipe:
            for _ in range(n):
                pipe.lmove(self.fifo, self.processing, "RIGHT", "LEFT")
            got = await pipe.execute()
        return [sid for sid in got if sid is not None]

    async def done(self, sid: str) -> None:
        await self.kv.lrem(self.processing, 1, sid)

    async def done_many(self, sids: list[str]) -> None:
        if not sids:
            return
        async with self.kv.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.lrem(self.processing, 1, sid)
            await pipe.execute()

    async def requeue_from_processing(self, sid: str) -> bool:
        """Janitor: move an orphaned id from ``processing`` back to ``fifo``."""
        async with self.kv.pipeline(transaction=True) as pipe:
            pipe.lrem(self.processing, 1, sid)
            pipe.lpush(self.fifo, sid)
            removed, _ = await pipe.execute()
        if not removed:  # it was finished meanwhile: undo the push
            await self.kv.lrem(self.fifo, 1, sid)
        return bool(removed)

    async def queued_ids(self) -> set[str]:
        async with self.kv.pipeline(transaction=False) as pipe:
            pipe.lrange(self.fifo, 0, -1)
            pipe.lrange(self.processing, 0, -1)
            fifo, processing = await pipe.execute()
        return set(fifo) | set(processing)

    async def processing_ids(self) -> list[str]:
        return list(await self.kv.lrange(self.processing, 0, -1))

    async def depth(self) -> tuple[int, int]:
        async with self.kv.pipeline(transaction=False) as pipe:
            pipe.llen(self.fifo)
            pipe.llen(self.processing)
            fifo, processing = await pipe.execute()
        return int(fifo), int(processing)

    # -- locks ------------------------------------------------------------------------------
    async def lock_and_status(self, sid: str, ttl_ms: int = LOCK_TTL_MS) -> tuple[str | None, str | None]:
        """Take ``lock:{id}`` (None when another worker holds it) and read the FSM status, in one round trip."""
        token = uuid.uuid4().hex
        async with self.kv.pipeline(transaction=False) as pipe:
            pipe.set(self.lock_key(sid), token, nx=True, px=ttl_ms)
            pipe.hget(self.fsm_key(sid), "status")
            ok, status = await pipe.execute()
        return (token if ok else None), status

    async def lock_and_status_many(self, sids: list[str], ttl_ms: int = LOCK_TTL_MS) -> list[tuple[str | None, str | None]]:
        """:meth:`lock_and_status` for several ids, in one round trip."""
        tokens = [uuid.uuid4().hex for _ in sids]
        async with self.kv.pipeline(transaction=False) as pipe:
            for sid, token in zip(sids, tokens):
                pipe.set(self.lock_key(sid), token, nx=True, px=ttl_ms)
                pipe.hget(self.fsm_key(sid), "status")
            res = await pipe.execute()
        return [((token if res[2 * i] else None), res[2 * i + 1]) for i, token in enumerate(tokens)]

    async def lock(self, sid: str, ttl_ms: int = LOCK_TTL_MS) -> str | None:
        token = uuid.uuid4().hex
        ok = await self.kv.set(self.lock_key(sid), token, nx=True, px=ttl_ms)
        return token if ok else None

    async def locked(self, sid: str) -> bool:
        return bool(await self.kv.exists(self.lock_key(sid)))

    async def unlock(self, sid: str, token: str) -> bool:
        """Delete the lock only if it is still ours (compare-and-delete): one Lua call on
        Redis; WATCH/MULTI where scripting is not available (the in-memory substitute)."""
        key = self.lock_key(sid)
        if self._scripting is not False:
            try:
                released = bool(await self._unlock_script(keys=[key], args=[token]))
                self._scripting = True
                return released
            except ResponseError as exc:
                if self._scripting or "unknown command" not in str(exc).lower():
                    raise
                self._scripting = False
        async with self.kv.pipeline(transaction=True) as pipe:
            for _ in range(3):
                try:
                    await pipe.watch(key)
                    if await pipe.get(key) != token:
                        await pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.delete(key)
                    await pipe.execute()
                    return True
                except WatchError:
                    continue
        return False

    async def unlock_many(self, held: Mapping[str, str]) -> None:
        """:meth:`unlock` for several locks: one round trip of Lua calls on Redis; without
        scripting one WATCH/MULTI over all of them (per lock when that transaction loses a race)."""
        if not held:
            return
        if self._scripting is None:  # learn whether scripting works on the first lock
            first = next(iter(held))
            await self.unlock(first, held[first])
            held = {sid: t for sid, t in held.items() if sid != first}
            if not held:
                return
        if self._scripting:
            async with self.kv.pipeline(transaction=False) as pipe:
                for sid, token in held.items():
                    pipe.eval(_UNLOCK_LUA, 1, self.lock_key(sid), token)
                await pipe.execute()
            return
        keys = {self.lock_key(sid): token for sid, token in held.items()}
        async with self.kv.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(*keys)
                current = await pipe.mget(*keys)
                pipe.multi()
                mine = [k for k, v in zip(keys, current) if v == keys[k]]
                if mine:
                    pipe.delete(*mine)
                await pipe.execute()
                return
            except WatchError:
                pass
        for sid, token in held.items():
            await self.unlock(sid, token)

    # -- data-loss detection ----------------------------------------------------------------
    async def epoch(self) -> str | None:
        return await self.kv.get(self.epoch_key)

    async def mark_epoch(self) -> str:
        value = uuid.uuid4().hex
        await self.kv.set(self.epoch_key, value)
        return value

    async def claim_rebuild(self, ttl_ms: int = 30_000) -> str | None:
        token = uuid.uuid4().hex
        ok = await self.kv.set(self.rebuild_key, token, nx=True, px=ttl_ms)
        return token if ok else None

    async def release_rebuild(self, token: str) -> None:
        if await self.kv.get(self.rebuild_key) == token:
            await self.kv.delete(self.rebuild_key)
