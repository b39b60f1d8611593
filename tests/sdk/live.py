"""A live ``qmtl up`` for the SDK tests, and a TCP proxy to cut the event stream.

* :class:`QmtlUp` runs ``qmtl up`` as a subprocess on free ports and a data directory;
  ``kill()`` is a real crash (SIGKILL), ``start()`` again restarts on the same ports and data.
* :class:`TcpProxy` forwards a local port to a target port in its own thread (so it
  outlives each test's event loop). ``cut()`` drops every open connection (the network
  failing mid-stream); ``close()``/``open()`` stop and resume accepting (a route that
  stays down).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from tests.helpers.server import free_port

ROOT = Path(__file__).resolve().parents[2]
QMTL = str(Path(sys.executable).with_name("qmtl"))


class QmtlUp:
    def __init__(self, data_dir: Path, *, env: Mapping[str, str] | None = None, args: list[str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.ports = (free_port(), free_port(), free_port())
        self.url = f"http://127.0.0.1:{self.ports[0]}"
        self.worldservice_url = f"http://127.0.0.1:{self.ports[1]}"
        self.dagmanager_url = f"http://127.0.0.1:{self.ports[2]}"
        self.extra_env = dict(env or {})
        self.args = list(args or [])
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-qmtl-up.log"
        self.starts = 0

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QMTL")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 90.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [QMTL, "up", "--data-dir", str(self.data_dir), "--gateway-port", str(self.ports[0]),
               "--worldservice-port", str(self.ports[1]), "--dagmanager-port", str(self.ports[2]), *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self._env(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + timeout
        pending = [self.url, self.worldservice_url, self.dagmanager_url]
        while pending and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qmtl up exited with {self.proc.returncode} during startup:\n{self.log_tail()}")
            for url in list(pending):
                try:
                    if httpx.get(url + "/health", timeout=0.5).status_code == 200:
                        pending.remove(url)
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        if pending:
            self.kill()
            raise RuntimeError(f"qmtl up did not answer within {timeout}s on {pending}:\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """A crash: SIGKILL, nothing flushed, nothing closed cleanly."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


class TcpProxy:
    """127.0.0.1:<port> → 127.0.0.1:<target_port>, in a thread with its own event loop.

    Several target ports make it a load balancer: each connection goes to the next target
    in turn, and to the one after when a target refuses (a replica that is down)."""

    def __init__(self, target_port: int | list[int], *, port: int | None = None) -> None:
        self.targets = list(target_port) if isinstance(target_port, (list, tuple)) else [target_port]
        self.target_port = self.targets[0]
        self._next = 0
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"tcp-proxy-{self.port}", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.accepted = 0
        self._thread.start()
        self.open()

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- control (from any thread) ---------------------------------------------------------
    def open(self) -> None:
        """Accept connections again (on the same port)."""
        self._call(self._open())

    def close(self) -> None:
        """Stop accepting and drop every open connection (connections are refused)."""
        self._call(self._close())

    def cut(self) -> None:
        """Drop every open connection; keep accepting new ones."""
        self._call(self._cut())

    @property
    def connections(self) -> int:
        return len(self._conns) // 2

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # -- in the proxy's loop -----------------------------------------------------------------
    async def _open(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)

    async def _close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self._cut()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    async def _cut(self) -> None:
        for w in list(self._conns):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._conns.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        start, self._next = self._next, (self._next + 1) % len(self.targets)
        for i in range(len(self.targets)):
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.targets[(start + i) % len(self.targets)])
                break
            except OSError:
                continue
        else:
            writer.transport.abort()
            return
        self._conns.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._conns.discard(writer)
        self._conns.discard(up_writer)


async def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` (sync or async) until truthy; AssertionError after ``timeout`` s."""
    import inspect

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
