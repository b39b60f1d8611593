"""Logging for every service: text or JSON lines, the correlation and trace ids on each.

* ``setup_logging(level, fmt)`` installs one handler on the root logger. ``fmt`` is
  ``text`` (``ts LEVEL logger [correlation_id] msg``, the default for a terminal) or
  ``json`` (one object per line: ``ts``, ``level``, ``logger``, ``message``,
  ``correlation_id``, ``trace_id``, ``span_id`` and whatever structured fields the call
  passed with ``extra={"fields": {...}}``; exceptions as ``exc``).
* ``working_on(label)`` names the work a background task does (``strategy:<id>``,
  ``world:<id>``) as its correlation id, so its log lines are not ``[-]``.
* :class:`AccessLog` (ASGI) writes one line per HTTP request to the ``qmtl.access``
  logger: method, route template (from the spec), status, duration, correlation id,
  trace id and the caller's subject.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import logging
import re
import time
import typing as t

from qmtl.common import correlation

__all__ = ["FORMATS", "AccessLog", "JsonFormatter", "TraceContextFilter", "label_task", "setup_logging", "working_on",
           "working_on_batch"]

FORMATS = ("text", "json")

#: The verified caller of the request being handled (set by the authentication middleware;
#: the request's scope is copied on its way in, so the access line reads it from here).
caller_subject: contextvars.ContextVar[str | None] = contextvars.ContextVar("caller_subject", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(correlation_id)s] %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "correlation_id", "trace_id", "span_id"}


def _current_trace() -> tuple[str | None, str | None]:
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - opentelemetry-api is a dependency
        return None, None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


class TraceContextFilter(logging.Filter):
    """Sets ``record.trace_id`` / ``record.span_id`` from the current OpenTelemetry span
    (``None`` when tracing is off or no span is active)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            record.trace_id, record.span_id = _current_trace()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring for the keys)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, t.Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "correlation_id": getattr(record, "correlation_id", None),
        }
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            out["trace_id"] = trace_id
            out["span_id"] = getattr(record, "span_id", None)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        for key, value in vars(record).items():
            if key not in _STANDARD and key != "fields" and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class _TextFormatter(logging.Formatter):
    """The text format; structured fields (``extra={"fields": ...}``) follow the message as ``k=v``."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return line


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.addFilter(correlation.CorrelationIdFilter())
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else _TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO; the access log of the service called already says it
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))


@contextlib.contextmanager
def working_on(label: str) -> t.Iterator[None]:
    """Within the block, log lines carry ``label`` as their correlation id — unless a
    request's id is already set (work done for a request keeps the request's id)."""
    if correlation.correlation_id.get() is not None:
        yield
        return
    token = correlation.correlation_id.set(label)
    try:
        yield
    finally:
        correlation.correlation_id.reset(token)


def label_task(label: str) -> None:
    """Name the work of the current background task (a worker, a publisher, a consumer) as its
    log lines' correlation id. A task runs in a copy of the context it was created in, so this
    stays with the task; call it first thing in the task's coroutine."""
    if correlation.correlation_id.get() is None:
        correlation.correlation_id.set(label)


@contextlib.contextmanager
def working_on_batch(kind: str, ids: t.Sequence[str]) -> t.Iterator[None]:
    """Within the block, log lines carry ``<kind>:<first id>`` (``+N`` more) as their
    correlation id: a background task's batch names what it works on."""
    label = f"{kind}:{ids[0]}" + (f"+{len(ids) - 1}" if len(ids) > 1 else "") if ids else kind
    token = correlation.correlation_id.set(label)
    try:
        yield
    finally:
        correlation.correlation_id.reset(token)


class RouteTemplates:
    """Path → the spec's path template (``/worlds/w1/decide`` → ``/worlds/{world_id}/decide``),
    so the access log and its consumers group by route, not by id."""

    def __init__(self, paths: t.Iterable[str]) -> None:
        compiled = []
        for template in paths:
            parts = re.split(r"(\{[^}]+\})", template)
            pattern = "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts)
            # literal routes first: /worlds/{id} must not shadow nothing, but /queues/by_tag beats /queues/{x}
            compiled.append((template.count("{"), re.compile(pattern + "$"), template))
        compiled.sort(key=lambda c: c[0])
        self._exact = {tpl: tpl for n, _p, tpl in compiled if n == 0}
        self._patterns = [(p, tpl) for n, p, tpl in compiled if n > 0]

    def __call__(self, path: str) -> str:
        hit = self._exact.get(path)
        if hit is not None:
            return hit
        for pattern, template in self._patterns:
            if pattern.match(path):
                return template
        return "(unrouted)"


class AccessLog:
    """ASGI middleware: one ``qmtl.access`` line per HTTP request, written when the response
    ends (or the client goes away). WebSocket sessions are logged by their endpoints."""

    logger = logging.getLogger("qmtl.access")

    def __init__(self, app: t.Any, routes: RouteTemplates, *, service: str, enabled: bool = True) -> None:
        self.app = app
        self.routes = routes
        self.service = service
        self.enabled = enabled

    async def __call__(self, scope: t.MutableMapping[str, t.Any], receive: t.Any, send: t.Any) -> None:
        if scope["type"] != "http" or not self.enabled or not self.logger.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0
        subject_token = caller_subject.set(None)

        async def send_status(message: t.MutableMapping[str, t.Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            subject = caller_subject.get()
            caller_subject.reset(subject_token)
            self.logger.info(
                "%s %s %s", scope["method"], scope["path"], status or "-",
                extra={"fields": {
                    "service": self.service,
                    "method": scope["method"],
                    "route": self.routes(scope["path"]),
                    "status": status or None,
                    "duration_ms": round((time.perf_counter() - start) * 1000, 3),
                    "subject": subject,
                }},
            )
