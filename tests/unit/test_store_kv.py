"""The embedded key-value store (``make_kv("memory://")``): fakeredis through a connection that
hands commands over as argument lists instead of RESP bytes. Whatever a command does, the
answer (or the error) is the one the stock fakeredis client gets for the same commands."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from qmtl.store import make_kv
from qmtl.store.kv import DirectFakeConnection


def both() -> tuple[aioredis.Redis, aioredis.Redis]:
    """The embedded client and the stock fakeredis client, each on a server of its own."""
    return (make_kv("memory://", server=fakeredis.FakeServer()),
            fakeredis.FakeAsyncRedis(decode_responses=True, server=fakeredis.FakeServer()))


async def outcome(coro: Any) -> Any:
    try:
        return ("ok", await coro)
    except Exception as exc:  # the error's type and text are part of the answer
        return ("error", type(exc).__name__, str(exc))


async def script(kv: aioredis.Redis) -> list[Any]:
    out = [
        await outcome(kv.set("lock:a", "t1", nx=True, px=60_000)),
        await outcome(kv.set("lock:a", "t2", nx=True, px=60_000)),
        await outcome(kv.hset("fsm:a", mapping={"status": "queued", "n": 3, "f": 1.5, "b": b"\x00\xff", "u": "é"})),
        await outcome(kv.hgetall("fsm:a")),
        await outcome(kv.lpush("fifo", "a", "b", "c")),
        await outcome(kv.lmove("fifo", "processing", "RIGHT", "LEFT")),
        await outcome(kv.lrange("processing", 0, -1)),
        await outcome(kv.lrem("processing", 1, "a")),
        await outcome(kv.hget("lock:a", "x")),  # WRONGTYPE
        await outcome(kv.execute_command("NOSUCHCOMMAND", "x")),
        await outcome(kv.eval("return 1", 0)),  # no Lua in the embedded store: redisq falls back on that error
        await outcome(kv.config_get("maxmemory")),  # a command name with a literal argument in it
        await outcome(kv.expire("fsm:a", 100)),
        await outcome(kv.ttl("fsm:a")),
    ]
    async with kv.pipeline(transaction=False) as pipe:
        pipe.set("k", "v", nx=True).hget("fsm:a", "status").incr("fsm:a").llen("fifo")
        out.append(await outcome(pipe.execute(raise_on_error=False)))
    async with kv.pipeline(transaction=True) as pipe:
        pipe.lrem("fifo", 1, "b").lpush("fifo", "b").mget("k", "lock:a")
        out.append(await outcome(pipe.execute()))
    async with kv.pipeline(transaction=True) as pipe:
        await pipe.watch("lock:a")
        current = await pipe.get("lock:a")
        await kv.set("lock:a", "stolen")  # another client changes the watched key
        pipe.multi()
        pipe.delete("lock:a")
        out.append(current)
        out.append(await outcome(pipe.execute()))
    return [plain(o) for o in out]


def plain(value: Any) -> Any:
    """Errors inside answers (a pipeline's) as their type and text: exceptions compare by identity."""
    if isinstance(value, Exception):
        return (type(value).__name__, str(value))
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


async def test_memory_url_uses_the_direct_connection_and_stays_a_fakeredis_client():
    kv = make_kv("memory://")
    assert kv.connection_pool.connection_class is DirectFakeConnection
    assert type(kv).__module__.startswith("fakeredis")  # what the rate limiter keys its Lua choice on
    await kv.aclose()


async def test_same_answers_and_errors_as_the_stock_fakeredis_client():
    direct, stock = both()
    assert await script(direct) == await script(stock)
    await direct.aclose()
    await stock.aclose()


async def test_commands_sent_while_the_socket_is_paused_wait_in_order():
    """While fakeredis' socket is paused (its way of making a blocking command wait), the
    commands sent meanwhile go through its parser as RESP, which holds them until the socket
    resumes; then they are answered in the order sent, and commands go direct again."""
    kv = make_kv("memory://", server=fakeredis.FakeServer())
    conn = await kv.connection_pool.get_connection()
    try:
        await conn.send_command("RPUSH", "q", "x")
        assert await conn.read_response() == 1
        conn._sock.pause()
        await conn.send_command("LMOVE", "q", "p", "RIGHT", "LEFT")
        await conn.send_command("LLEN", "p")
        assert not await conn.can_read(timeout=0)  # held back while paused
        conn._sock.resume()
        assert await conn.read_response() == "x"
        assert await conn.read_response() == 1
        await conn.send_command("LLEN", "q")
        assert await conn.read_response() == 0
    finally:
        await kv.connection_pool.release(conn)
        await kv.aclose()


async def test_a_disconnected_server_is_a_connection_error():
    server = fakeredis.FakeServer()
    kv = make_kv("memory://", server=server)
    assert await kv.set("a", "1")
    server.connected = False
    with pytest.raises(RedisConnectionError):
        await kv.get("a")
    server.connected = True
    assert await kv.get("a") == "1"
    await kv.aclose()
