"""qmtl.common.logs: JSON lines, and background work named in its log lines instead of ``-``."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from qmtl.common import correlation, logs


def _capture(fmt: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(correlation.CorrelationIdFilter())
    handler.addFilter(logs.TraceContextFilter())
    handler.setFormatter(logs.JsonFormatter() if fmt == "json" else logs._TextFormatter(logs.TEXT_FORMAT))
    logger = logging.getLogger(f"test.logs.{fmt}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


async def test_a_background_task_names_its_work_and_a_batch_names_what_it_handles():
    logger, stream = _capture("json")

    async def worker():
        logs.label_task("ingest-worker-0")
        logger.info("idle")
        with logs.working_on_batch("strategy", ["s1", "s2", "s3"]):
            logger.info("processing", extra={"fields": {"n": 3}})
        logger.info("idle again")

    await asyncio.create_task(worker())
    logger.info("outside")  # the task's label stays with the task
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["correlation_id"] for r in lines] == ["ingest-worker-0", "strategy:s1+2", "ingest-worker-0", "-"]
    assert lines[1]["n"] == 3 and lines[1]["level"] == "INFO" and lines[1]["logger"] == "test.logs.json"


async def test_a_request_keeps_its_own_id_in_work_done_for_it():
    logger, stream = _capture("text")
    token = correlation.correlation_id.set("req-1")
    try:
        logs.label_task("ignored")  # a task spawned by a request keeps the request's id
        with logs.working_on("strategy:x"):
            logger.info("inside")
    finally:
        correlation.correlation_id.reset(token)
    assert "[req-1] inside" in stream.getvalue()


def test_setup_logging_refuses_an_unknown_format():
    try:
        logs.setup_logging("INFO", "xml")
    except ValueError as exc:
        assert "xml" in str(exc)
    else:
        raise AssertionError("an unknown format was accepted")
