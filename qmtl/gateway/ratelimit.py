"""Rate limits at the Gateway: token buckets per caller and class, 429 problem+json.

Which operations: those whose responses in ``specs/openapi.yaml`` list 429 (the shared
``TooManyRequests`` response). Their class is the operation's ``x-qmtl-rate-class``, else
``read`` for GET and ``write`` otherwise; each class has its budget in
``gateway.rate_limit`` (``rate`` tokens per second, ``burst`` tokens).

Who: the verified subject — ``scope["qmtl.identity"]`` when an authentication middleware put
it there, else the Gateway's :class:`~qmtl.gateway.auth.Authenticator` (which caches verified
tokens, so this is a dictionary lookup for a token seen before). A caller without a valid
token (anonymous, development mode, or a token that does not verify) is counted by its client
address. A flood from one caller therefore spends its own budget and gets 429s at the
Gateway's door; it never reaches WorldService, so it cannot open the WorldService breaker for
everyone else.

Where the buckets live: in Redis when the Gateway's key-value store is Redis (one Lua script
per call, atomic, on the Redis server's clock), so every replica draws from the same budget;
in the process for the embedded in-memory store. When Redis cannot answer, the process's own
buckets stand in (a Redis outage neither opens the gates nor closes them) and the failures
are counted.

``mode: auto`` (the default) enforces the limits in JWT mode and not in development mode, where every
anonymous caller shares one address and the embedded benchmarks send thousands of requests
per second.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import typing as t

from prometheus_client import CollectorRegistry, Counter

from qmtl.common.cache import LRU
from qmtl.common.errors import ServiceError
from qmtl.contracts.limits import OperationTable, send_problem
from qmtl.contracts.security import IDENTITY_KEY as IDENTITY_SCOPE_KEY  # where the auth middleware leaves the caller

if t.TYPE_CHECKING:
    from qmtl.common.config import GatewayConfig
    from qmtl.gateway.auth import Authenticates

log = logging.getLogger(__name__)

RATE_CLASS_EXTENSION = "x-qmtl-rate-class"

# KEYS[1] bucket; ARGV rate (tokens/s), burst. Returns {allowed 0|1, seconds to wait (string)}.
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
local elapsed = now - ts
if elapsed < 0 then elapsed = 0 end
tokens = math.min(burst, tokens + elapsed * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(wait)}
"""


class MemoryBuckets:
    """Token buckets in this process (bounded LRU)."""

    def __init__(self, max_buckets: int, clock: t.Callable[[], float] = time.monotonic) -> None:
        self.max_buckets = max_buckets
        self.clock = clock
        self.buckets: LRU[str, list[float]] = LRU(max_buckets)

    async def take(self, key: str, rate: float, burst: float) -> tuple[bool, float]:
        return self.take_now(key, rate, burst)

    def take_now(self, key: str, rate: float, burst: float) -> tuple[bool, float]:
        now = self.clock()
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = [float(burst), now]
            self.buckets.put(key, bucket)
        else:
            bucket[0] = min(float(burst), bucket[0] + max(0.0, now - bucket[1]) * rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return True, 0.0
        return False, (1.0 - bucket[0]) / rate


class RedisBuckets:
    """Token buckets in Redis, shared by every Gateway using the same Redis and prefix."""

    def __init__(self, kv: t.Any, prefix: str, fallback: MemoryBuckets, errors: Counter) -> None:
        self.script = kv.register_script(TOKEN_BUCKET_LUA)
        self.prefix = prefix
        self.fallback = fallback
        self.errors = errors
        self._last_log = 0.0

    async def take(self, key: str, rate: float, burst: float) -> tuple[bool, float]:
        try:
            allowed, wait = await self.script(keys=[self.prefix + key], args=[rate, burst])
            return bool(int(allowed)), float(wait)
        except Exception as exc:  # Redis away: this process's buckets stand in
            self.errors.inc()
            now = time.monotonic()
            if now - self._last_log >= 10.0:
                self._last_log = now
                log.warning("rate limit: Redis does not answer (%s); limiting with this process's buckets meanwhile", exc)
            return self.fallback.take_now(key, rate, burst)


def _is_real_redis(kv: t.Any) -> bool:
    return not type(kv).__module__.startswith("fakeredis") and hasattr(kv, "register_script")


class RateLimiter:
    """ASGI middleware in front of the Gateway's HTTP stack (fast paths included)."""

    def __init__(self, app: t.Any, settings: GatewayConfig, doc: dict, *, registry: CollectorRegistry, kv: t.Any,
                 kv_prefix: str, auth: Authenticates | None) -> None:
        self.app = app
        self.auth = auth  # None in a build without the auth part: every caller counts by address
        cfg = settings.rate_limit
        self.enabled = cfg.mode == "enforce" or (cfg.mode == "auto" and settings.auth.mode == "jwt")
        self.budgets = {name: (float(getattr(cfg, name).rate), float(getattr(cfg, name).burst)) for name in ("read", "write")}
        self.table = OperationTable(doc)
        self.classes: dict[tuple[str, str], str] = {}
        for method, route, op in self.table.operations():
            if "429" not in (op.get("responses") or {}):
                continue
            cls = op.get(RATE_CLASS_EXTENSION) or ("read" if method in ("GET", "HEAD") else "write")
            if cls not in self.budgets:
                raise ValueError(f"{method} {route}: {RATE_CLASS_EXTENSION} {cls!r} has no budget in gateway.rate_limit")
            self.classes[(method, route)] = cls
        self.limited = Counter("gateway_rate_limited", "Requests refused with 429 by the rate limit, by class and caller kind "
                               "(subject or address)", ["rate_class", "caller"], registry=registry)
        self.backend_errors = Counter("gateway_rate_limit_store_errors", "Rate-limit checks Redis could not answer "
                                      "(this process's buckets stood in)", registry=registry)
        for cls in self.budgets:
            for caller in ("subject", "address"):
                self.limited.labels(cls, caller)
        memory = MemoryBuckets(cfg.max_buckets)
        if _is_real_redis(kv):
            self.buckets: t.Any = RedisBuckets(kv, f"{kv_prefix}rl:", memory, self.backend_errors)
            self.store = "redis"
        else:
            self.buckets = memory
            self.store = "memory"
        if self.enabled:
            log.info("rate limit on (%s): read %g/s burst %g, write %g/s burst %g per subject (per address when anonymous)",
                     self.store, *self.budgets["read"], *self.budgets["write"])
        elif settings.auth.mode == "jwt":  # a production Gateway without limits: say so loudly
            log.warning("rate limit disabled (gateway.rate_limit.mode=%s) although callers are authenticated", cfg.mode)
        else:  # development mode, announced on its own
            log.info("rate limit disabled (gateway.rate_limit.mode=%s, development auth mode)", cfg.mode)

    def rate_class(self, method: str, path: str) -> str | None:
        found = self.table.find("GET" if method == "HEAD" else method, path)
        if found is None:
            return None
        return self.classes.get(("GET" if method == "HEAD" else method, found[0]))

    async def caller(self, scope: t.Any) -> tuple[str, str]:
        """``("subject", name)`` for a verified caller, else ``("address", client ip)``."""
        identity = scope.get(IDENTITY_SCOPE_KEY)
        if identity is None:
            auth = None
            for name, value in scope.get("headers", ()):
                if name == b"authorization":
                    auth = value.decode("latin-1")
                    break
            if auth and self.auth is not None:
                try:
                    identity = await self.auth.authenticate({"authorization": auth})
                except ServiceError:
                    identity = None  # the handler answers 401; meanwhile it is counted by address
        if identity is not None and not getattr(identity, "anonymous_dev", False):
            return "subject", identity.subject
        client = scope.get("client")
        return "address", (client[0] if client else "unknown")

    async def __call__(self, scope: t.Any, receive: t.Any, send: t.Any) -> None:
        if not self.enabled or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cls = self.rate_class(scope["method"], scope["path"])
        if cls is None:
            await self.app(scope, receive, send)
            return
        kind, who = await self.caller(scope)
        rate, burst = self.budgets[cls]
        key = f"{cls}:{kind[0]}:{who if len(who) <= 100 else hashlib.sha256(who.encode()).hexdigest()}"
        allowed, wait = await self.buckets.take(key, rate, burst)
        if allowed:
            await self.app(scope, receive, send)
            return
        self.limited.labels(cls, kind).inc()
        retry_after = max(1, math.ceil(wait))
        shown = who if len(who) <= 64 else who[:64] + "…"
        await send_problem(
            send, 429, "Too Many Requests",
            f"{shown} spent its {cls} budget ({rate:g} per second, bursts of {burst:g}); retry in {retry_after} s",
            ext={"limit": "rate_limit", "rate_class": cls, "retry_after": retry_after},
            headers={"Retry-After": str(retry_after)})
