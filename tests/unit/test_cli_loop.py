"""`qmtl up` / `qmtl gw` run their uvicorn servers on uvloop with the httptools parser."""

from __future__ import annotations

import asyncio

from qmtl import cli


def test_services_run_on_uvloop():
    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert cli._run_loop(loop_module()).startswith("uvloop")


def test_http_parser_is_httptools():
    assert cli._http_impl() == "httptools"
