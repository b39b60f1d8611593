"""Key-value access: Redis (production) or an in-memory substitute (embedded).

Both are used through the ``redis.asyncio`` API. ``memory://`` selects fakeredis, an
in-process implementation of the same commands (SET NX PX, lists, hashes, Lua-free
pipelines), so the code path is the same in both deployments.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis


def make_kv(url: str = "memory://", **kwargs: Any) -> aioredis.Redis:
    if url.startswith("memory://"):
        import fakeredis

        return fakeredis.FakeAsyncRedis(decode_responses=True, **kwargs)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return aioredis.Redis.from_url(url, decode_responses=True, **kwargs)
    raise ValueError(f"unsupported key-value URL {url!r}: use redis://host:port/db or memory://")


async def kv_ping(kv: aioredis.Redis) -> bool:
    try:
        return bool(await kv.ping())
    except Exception:
        return False
