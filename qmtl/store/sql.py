"""SQL access for PostgreSQL (production) and SQLite (embedded) through one code path.

SQLAlchemy Core, async: ``postgresql+asyncpg://`` or ``sqlite+aiosqlite:///file.db``.
Each service declares its tables on its own ``MetaData`` and calls
:meth:`Database.create_all` at start. A PostgreSQL ``schema`` (namespace) may be
given so that tests and co-hosted services get their own fresh set of tables.

:meth:`Database.sqlite_writer` gives hot write paths on a SQLite file a
:class:`SqliteWriter`: a whole transaction runs on one dedicated thread with a plain
``pysqlite`` connection to the same file (same pragmas), so it costs one thread hand-off
instead of aiosqlite's one per cursor, statement, close and commit (each hand-off also wakes
the event loop through its self-pipe, and SQLAlchemy's async adaptation switches greenlets
per call: ~1.2 ms of CPU per group commit of one row, ~0.2 ms in one hand-off).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import re
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

_CREATE_LOCK = 0x716D746C  # "qmtl": the advisory lock that serialises create_all across processes
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_SQLITE_TIMEOUT = 30  # seconds a statement waits for another connection's write lock
T = TypeVar("T")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any = None) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class SqliteWriter:
    """Transactions on a SQLite file, each run whole on one dedicated thread (see the module
    docstring) with the driver's own connection (``sqlite3``, autocommit mode: the writer
    issues ``BEGIN IMMEDIATE`` / ``COMMIT`` / ``ROLLBACK`` itself; no SQLAlchemy engine, pool
    or reset-on-return on this path). It is a second connection to the file next to the
    async engine's: SQLite serialises the writers (``timeout`` 30 s, as for the async
    engine), and what one commits the other reads at its next statement (WAL).
    ``dialect`` is SQLAlchemy's SQLite dialect, for callers that bind values the way the
    async engine would (``TypeEngine.bind_processor``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.dialect = sqlite_dialect.dialect()
        self._conn: sqlite3.Connection | None = None
        self._jobs: queue.SimpleQueue[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future, asyncio.AbstractEventLoop] | None] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None

    async def transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(conn)`` inside one transaction (committed when it returns, rolled back when it
        raises), on the writer's thread. Driver errors come out as SQLAlchemy's wrappers
        (``sqlalchemy.exc.OperationalError``, ``IntegrityError``, ...), as from the async
        engine. The transaction completes even when the caller is cancelled meanwhile.
        (A plain thread and queue: ``run_in_executor``'s chained concurrent/asyncio futures
        cost more main-thread CPU per commit than the hand-off itself.)"""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="sqlite-writer", daemon=True)
            self._thread.start()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._jobs.put((fn, fut, loop))
        return await fut

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, fut, loop = job
            result, error = None, None
            try:
                result = self._run(fn)
            except BaseException as exc:  # handed to the caller
                error = exc
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, fut, result, error)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            conn = self._conn = sqlite3.connect(self.path, timeout=_SQLITE_TIMEOUT, isolation_level=None, check_same_thread=False)
            _sqlite_pragmas(conn)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:  # as the async engine raises it (sqlalchemy.exc.OperationalError, IntegrityError, ...)
            raise sa.exc.DBAPIError.instance(None, None, exc, sqlite3.Error) from exc
        return result

    def close(self) -> None:
        """Stop the thread after the transactions already handed to it (blocks until then)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


def _settle(fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def normalise_url(url: str) -> str:
    """Accept plain ``postgresql://`` / ``sqlite:///`` URLs and pick the async drivers."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        return "postgresql+asyncpg://" + url[len("postgresql://"):]
    if url.startswith("sqlite:///") and "+aiosqlite" not in url:
        return "sqlite+aiosqlite:///" + url[len("sqlite:///"):]
    return url


def sqlite_url(path: str | Path) -> str:
    return f"sqlite+aiosqlite:///{Path(path)}"


class Database:
    def __init__(self, url: str, *, schema: str | None = None, echo: bool = False) -> None:
        self.url = normalise_url(url)
        self.schema = schema
        self.is_sqlite = self.url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            path = self.url.split(":///", 1)[1] if ":///" in self.url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": _SQLITE_TIMEOUT}
        else:
            if schema is not None:
                if not _SCHEMA_RE.match(schema):
                    raise ValueError(f"invalid PostgreSQL schema name {schema!r}")
                kwargs["connect_args"] = {"server_settings": {"search_path": schema}}
            kwargs["pool_pre_ping"] = True
            kwargs["pool_size"] = 10
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        if self.is_sqlite:
            sa.event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)

    def sqlite_writer(self) -> SqliteWriter | None:
        """A :class:`SqliteWriter` on this database's file; None for PostgreSQL (asyncpg has no
        thread hand-offs to save) and for an in-memory or URI-parameterised SQLite database
        (a second connection would not see the same data)."""
        if not self.is_sqlite or ":///" not in self.url:
            return None
        path = self.url.split(":///", 1)[1]
        if not path or path == ":memory:" or "?" in path or path.startswith("file:"):
            return None
        return SqliteWriter(path)

    async def create_all(self, metadata: sa.MetaData) -> None:
        async with self.engine.begin() as conn:
            if not self.is_sqlite:
                # Replicas starting together would race on CREATE TABLE (PostgreSQL answers a
                # unique violation on pg_type to the loser): one creates at a time.
                await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _CREATE_LOCK})
            if self.schema is not None and not self.is_sqlite:
                await conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
            await conn.run_sync(metadata.create_all)

    async def add_missing_columns(self, table: sa.Table) -> list[str]:
        """Add ``table``'s nullable columns that an older version's database lacks
        (``create_all`` creates missing tables only); returns the names added."""

        def missing(sync_conn: Any) -> list[str]:
            have = {c["name"] for c in sa.inspect(sync_conn).get_columns(table.name)}
            return [c.name for c in table.columns if c.name not in have]

        async with self.engine.begin() as conn:
            names = await conn.run_sync(missing)
            for name in names:
                column = table.c[name]
                if not column.nullable:
                    raise RuntimeError(f"{table.name}.{name} is missing and not nullable: migrate the database")
                ddl = column.type.compile(dialect=conn.dialect)
                await conn.execute(sa.text(f'ALTER TABLE {table.name} ADD COLUMN "{name}" {ddl}'))
        return names

    def begin(self) -> Any:
        """A transaction: ``async with db.begin() as conn: ...``."""
        return self.engine.begin()

    def connect(self) -> Any:
        return self.engine.connect()

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
            return True
        except Exception:
            return False

    async def close(self) -> None:
        await self.engine.dispose()


async def drop_schema(url: str, schema: str) -> None:
    """Drop a PostgreSQL schema and everything in it (tests)."""
    if not _SCHEMA_RE.match(schema):
        raise ValueError(f"invalid PostgreSQL schema name {schema!r}")
    engine = create_async_engine(normalise_url(url))
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        await engine.dispose()


__all__ = ["Database", "AsyncConnection", "normalise_url", "sqlite_url", "drop_schema"]
