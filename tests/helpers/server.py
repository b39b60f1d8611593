"""Run an ASGI app on a real socket for a test (lifespan included), then stop it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator

import httpx
import uvicorn

from qmtl.cli import quiet_server


class LogFile:
    """``log_text()`` / ``log_tail()`` of a subprocess whose output goes to ``self.log_path``."""

    log_path: object

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")  # type: ignore[attr-defined]
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


def wait_healthy(proc, url: str, timeout: float, what: str, log_tail) -> bool:
    """Poll ``url``/health until 200 (True) or ``timeout`` (False); raise when the
    subprocess ``proc`` exits meanwhile (with ``log_tail()`` in the message)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} during startup:\n{log_tail()}")
        try:
            if httpx.get(url + "/health", timeout=0.5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def serve(app, *, port: int | None = None, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn in this event loop; yields its base URL."""
    port = port or free_port()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", ws="websockets-sansio")
    server = quiet_server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started:
                break
            if task.done():
                task.result()
                raise RuntimeError("server exited during startup")
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("server did not start within 5 s")
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


def wait_all_healthy(urls, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait until every URL answers ``GET /health`` with 200; fail with the output of ``proc``
    (a ``qmtl`` subprocess started with stdout=PIPE) if it exits first."""
    deadline = time.monotonic() + timeout
    pending = set(urls)
    while pending and time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"qmtl exited early with {proc.returncode}:\n{out}")
        for url in list(pending):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    pending.discard(url)
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    assert not pending, f"not answering: {pending}"
