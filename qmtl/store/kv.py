"""Key-value access: Redis (production) or an in-memory substitute (embedded).

Both are used through the ``redis.asyncio`` API. ``memory://`` selects fakeredis, an
in-process implementation of the same commands (SET NX PX, lists, hashes, Lua-free
pipelines), so the code path is the same in both deployments.

In-process, a command need not be written as RESP bytes and parsed back: the embedded
client uses a fakeredis connection (:class:`DirectFakeConnection`, fakeredis' public
``FakeAsyncRedisConnection`` given as ``connection_class``) that hands each command's
encoded arguments to the fakeredis socket as they are — the same arguments, the same
command implementations, the same replies; what is left out is redis-py packing them
into the protocol and fakeredis parsing them out again (about a third of a command's CPU).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis


def make_kv(url: str = "memory://", **kwargs: Any) -> aioredis.Redis:
    if url.startswith("memory://"):
        import fakeredis

        kwargs.setdefault("connection_class", DirectFakeConnection)
        return fakeredis.FakeAsyncRedis(decode_responses=True, **kwargs)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return aioredis.Redis.from_url(url, decode_responses=True, **kwargs)
    raise ValueError(f"unsupported key-value URL {url!r}: use redis://host:port/db or memory://")


async def kv_ping(kv: aioredis.Redis) -> bool:
    try:
        return bool(await kv.ping())
    except Exception:
        return False


# -- the embedded connection -------------------------------------------------------------------

from fakeredis import FakeAsyncRedisConnection  # noqa: E402 - after the public API above
from fakeredis._msgs import CONNECTION_ERROR_MSG  # noqa: E402
from fakeredis.aioredis import FakeWriter  # noqa: E402


class _Command(tuple):
    """One command's encoded arguments (``bytes`` each), the unit the direct writer hands on."""

    __slots__ = ()

    def resp(self) -> bytes:
        """The same command as RESP bytes (for a socket that is not taking commands directly)."""
        parts = [b"*%d\r\n" % len(self)]
        for arg in self:
            parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
        return b"".join(parts)


class _DirectWriter(FakeWriter):
    """Hands each command to the fakeredis socket's command processor as its argument list.

    While the socket is paused (a blocking command such as BLMOVE waits on it) the commands
    behind it go through the socket's parser as RESP bytes, which buffers them until the
    blocking command answers — exactly as they would have gone before — so the order of
    commands and replies is fakeredis' own either way. A fakeredis without the processor
    entry point gets RESP bytes throughout.
    """

    def writelines(self, data: Iterable[Any]) -> None:
        sock = self._socket
        if sock is None:
            return
        direct = getattr(sock, "_process_command", None)
        for cmd in data:
            if not isinstance(cmd, _Command):
                sock.sendall(cmd)
            elif direct is None or getattr(sock, "_paused", True):
                sock.sendall(cmd.resp())
            else:
                if not sock._server.connected or sock._killed:  # what sendall checks first
                    raise sock._connection_error_class(CONNECTION_ERROR_MSG)
                direct(list(cmd))


class DirectFakeConnection(FakeAsyncRedisConnection):
    """A fakeredis connection whose commands skip the RESP round trip (see the module doc)."""

    async def _connect(self) -> None:
        await super()._connect()
        if self._sock is not None:
            self._writer = _DirectWriter(self._sock)

    def pack_command(self, *args: Any) -> list[Any]:
        # the command name may hold literal arguments ("CONFIG GET"): split like redis-py does
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        encode = self.encoder.encode
        return [_Command(a if type(a) is bytes else bytes(a) for a in map(encode, args))]

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[Any]:
        return [self.pack_command(*cmd)[0] for cmd in commands]
