"""The durable side of strategy ingest: PostgreSQL or SQLite through :class:`qmtl.store.Database`.

Two tables:

* ``gw_strategies`` – one row per accepted submission, written **before** the 202: the id,
  the content hash (unique: the duplicate check), the DAG as stored (sentinel included),
  meta, run type, world, sentinel id, who submitted it and when.
* ``gw_strategy_events`` – the FSM mirror, append-only: one row per transition
  (``queued``, ``processing``, ``diffed``, ``completed``, ``failed``) with a JSON detail
  (the queue map on ``diffed``, the error on ``failed``, the reason of a re-queue).

Writes go through one writer task that commits whatever is pending in one transaction
("group commit"): when idle a write is committed at once; when busy the writer lingers a
few milliseconds (``linger``) so that the writes arriving meanwhile share the commit. Every caller awaits its own commit, so nothing is acknowledged
before it is durable. On a SQLite file the commit's statements run together on the
:class:`~qmtl.store.sql.SqliteWriter`'s thread (one hand-off per commit); on PostgreSQL
through the async engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from qmtl.contracts.constants import StrategyState
from qmtl.gateway.ingest.redisq import TERMINAL
from qmtl.store import Database
from qmtl.store.sql import SqliteWriter

log = logging.getLogger(__name__)


metadata = sa.MetaData()

_BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

strategies = sa.Table(
    "gw_strategies",
    metadata,
    sa.Column("strategy_id", sa.String(200), primary_key=True),
    sa.Column("content_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("dag", sa.Text, nullable=False),
    sa.Column("meta", sa.Text, nullable=True),
    sa.Column("run_type", sa.String(32), nullable=False),
    sa.Column("world_id", sa.String(64), nullable=True),
    sa.Column("sentinel_id", sa.String(256), nullable=True),
    sa.Column("submitted_by", sa.String(256), nullable=True),
    sa.Column("correlation_id", sa.String(128), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

strategy_events = sa.Table(
    "gw_strategy_events",
    metadata,
    sa.Column("id", _BigInt, primary_key=True, autoincrement=True),
    sa.Column("strategy_id", sa.String(200), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Index("ix_gw_strategy_events_sid", "strategy_id", "id"),
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(dt: datetime) -> str:
    if dt.tzinfo is None:  # SQLite hands back naive datetimes; they were written as UTC
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class StrategyRecord:
    """One accepted submission. The DAG (sentinel included) is kept as its JSON text: records
    of unfinished strategies are cached in memory, and a burst leaves thousands of them —
    one string each is cheap, a tree of dicts per DAG makes every full GC pass slower."""

    strategy_id: str
    content_hash: str
    dag_json: str
    meta: Any
    run_type: str
    world_id: str | None
    sentinel_id: str | None
    submitted_by: str | None = None
    correlation_id: str | None = None
    created_at: datetime = field(default_factory=utcnow)

    @property
    def dag(self) -> dict:
        return json.loads(self.dag_json)

    def row(self) -> dict:
        return {
            "strategy_id": self.strategy_id,
            "content_hash": self.content_hash,
            "dag": self.dag_json,
            "meta": json.dumps(self.meta, separators=(",", ":")),
            "run_type": self.run_type,
            "world_id": self.world_id,
            "sentinel_id": self.sentinel_id,
            "submitted_by": self.submitted_by,
            "correlation_id": self.correlation_id,
            "created_at": self.created_at,
        }

    @classmethod
    def from_row(cls, row: Any) -> StrategyRecord:
        m = row._mapping
        return cls(
            strategy_id=m["strategy_id"], content_hash=m["content_hash"], dag_json=m["dag"],
            meta=json.loads(m["meta"]) if m["meta"] is not None else None, run_type=m["run_type"],
            world_id=m["world_id"], sentinel_id=m["sentinel_id"], submitted_by=m["submitted_by"],
            correlation_id=m["correlation_id"], created_at=m["created_at"],
        )


@dataclass
class MirroredState:
    """What the mirror says about one strategy: its latest state and the last diff result."""

    strategy_id: str
    status: str
    updated_at: datetime
    detail: dict
    diff: dict | None  # detail of the latest ``diffed`` event


def _queued_events(accepts: list[StrategyRecord], owners: dict[str, str]) -> list[dict]:
    """The ``queued`` event of each accepted record that owns its content hash (a duplicate
    inserted nothing and gets none)."""
    return [{"strategy_id": rec.strategy_id, "status": StrategyState.QUEUED, "at": rec.created_at, "detail": '{"reason":"accepted"}'}
            for rec in accepts if owners.get(rec.content_hash) == rec.strategy_id]


class _SqliteSql:
    """:meth:`IngestStore._write` for the SQLite driver's connection on the writer thread: the
    same statements, built from the tables (columns in table order; the event id is SQLite's
    rowid), run with ``executemany`` on parameter tuples bound the way SQLAlchemy binds these
    column types on SQLite (e.g. a ``DateTime`` as its text form). SQLAlchemy's execution path
    (pool checkout, compiled-cache lookup, result set-up, reset on return) was most of the
    writer thread's CPU per small commit."""

    def __init__(self, dialect: sa.Dialect) -> None:
        quote = dialect.identifier_preparer.quote

        def insert(table: sa.Table, columns: list[sa.Column], tail: str = "") -> str:
            names = ", ".join(quote(c.name) for c in columns)
            return f"INSERT INTO {quote(table.name)} ({names}) VALUES ({', '.join('?' * len(columns))}){tail}"

        def binders(columns: list[sa.Column]) -> list[tuple[str, Any]]:
            return [(c.name, c.type.dialect_impl(dialect).bind_processor(dialect)) for c in columns]

        s_cols = list(strategies.columns)
        e_cols = [c for c in strategy_events.columns if c is not strategy_events.c.id]
        self.insert_strategy = insert(strategies, s_cols, " ON CONFLICT DO NOTHING")
        self.insert_event = insert(strategy_events, e_cols)
        self.owners_of = (f"SELECT {quote(strategies.c.content_hash.name)}, {quote(strategies.c.strategy_id.name)} "
                          f"FROM {quote(strategies.name)} WHERE {quote(strategies.c.content_hash.name)} = ?")
        self._s = binders(s_cols)
        self._e = binders(e_cols)

    def _values(self, binders: list[tuple[str, Any]], row: dict) -> tuple:
        return tuple(row[name] if proc is None else proc(row[name]) for name, proc in binders)

    def write(self, conn: sqlite3.Connection, accepts: list[StrategyRecord], events: list[dict]) -> dict[str, str]:
        owners: dict[str, str] = {}
        if accepts:
            rows = [rec.row() for rec in accepts]
            cur = conn.executemany(self.insert_strategy, [self._values(self._s, r) for r in rows])
            if cur.rowcount == len(rows):
                owners = {r["content_hash"]: r["strategy_id"] for r in rows}  # all new (the common case)
            else:  # a duplicate: which ids own the hashes
                for chash in {r["content_hash"] for r in rows}:
                    found = conn.execute(self.owners_of, (chash,)).fetchone()
                    if found is not None:
                        owners[found[0]] = found[1]
            events = [*events, *_queued_events(accepts, owners)]
        if events:
            conn.executemany(self.insert_event, [self._values(self._e, e) for e in events])
        return owners


@dataclass
class _Op:
    kind: str  # "accept" | "event"
    payload: Any
    future: asyncio.Future


class IngestStore:
    def __init__(self, db: Database, *, max_batch: int = 500, linger: float = 0.003, busy_window: float = 0.005) -> None:
        self.db = db
        self.max_batch = max_batch
        self.linger = linger
        self.busy_window = busy_window
        self._queue: asyncio.Queue[_Op] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._sync: SqliteWriter | None = None
        self._sqlite_sql: _SqliteSql | None = None
        self.commits = 0
        self.batched_ops = 0
        from sqlalchemy.dialects import postgresql, sqlite

        self._insert_strategy = (sqlite.insert(strategies).on_conflict_do_nothing() if db.is_sqlite
                                 else postgresql.insert(strategies).on_conflict_do_nothing())
        self._insert_event = strategy_events.insert()
        self._owners = sa.select(strategies.c.content_hash, strategies.c.strategy_id).where(
            strategies.c.content_hash.in_(sa.bindparam("hashes", expanding=True)))

    async def start(self) -> None:
        await self.db.create_all(metadata)
        if self._sync is None:
            self._sync = self.db.sqlite_writer()
        if self._task is None:
            self._task = asyncio.create_task(self._writer(), name="ingest-db-writer")

    async def stop(self) -> None:
        if self._task is not None:
            # let in-flight writes finish (bounded), then stop
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    while not self._queue.empty():  # noqa: ASYNC110 - asyncio.Queue has no 'became empty' event
                        await asyncio.sleep(0.01)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            op = self._queue.get_nowait()
            if not op.future.done():
                op.future.set_exception(RuntimeError("ingest store stopped"))
        if self._sync is not None:
            await asyncio.to_thread(self._sync.close)
            self._sync = None

    # -- writes (group commit) ---------------------------------------------------------------
    async def accept(self, record: StrategyRecord) -> str:
        """Persist a new submission and its ``queued`` event; returns the id that owns the
        content hash: ``record.strategy_id`` when accepted, the first submission's id when
        the same DAG content was already submitted (nothing is written then)."""
        return await self._submit("accept", record)

    async def append(self, strategy_id: str, status: str, detail: dict | None = None, at: datetime | None = None) -> None:
        """Append one FSM transition to the mirror."""
        await self.append_many(strategy_id, [(status, detail)], at=at)

    async def append_many(self, strategy_id: str, transitions: list[tuple[str, dict | None]], at: datetime | None = None) -> None:
        """Append consecutive FSM transitions to the mirror, in order, in one commit."""
        at = at or utcnow()
        rows = [{"strategy_id": strategy_id, "status": status, "at": at, "detail": json.dumps(detail or {}, separators=(",", ":"))}
                for status, detail in transitions]
        await self._submit("event", rows)

    async def append_batch(self, transitions: list[tuple[str, str, dict | None]], at: datetime | None = None) -> None:
        """Append ``(strategy_id, status, detail)`` transitions of several strategies, in
        order, in one commit (one INSERT with a parameter list)."""
        if not transitions:
            return
        at = at or utcnow()
        rows = [{"strategy_id": sid, "status": status, "at": at, "detail": json.dumps(detail or {}, separators=(",", ":"))}
                for sid, status, detail in transitions]
        await self._submit("event", rows)

    async def records(self, strategy_ids: list[str]) -> dict[str, StrategyRecord]:
        """The records of several strategies, in one SELECT (absent ids are left out)."""
        if not strategy_ids:
            return {}
        async with self.db.connect() as conn:
            res = await conn.execute(sa.select(strategies).where(strategies.c.strategy_id.in_(strategy_ids)))
            return {r.strategy_id: StrategyRecord.from_row(r) for r in res}

    async def _submit(self, kind: str, payload: Any) -> Any:
        if self._task is None or self._task.done():
            raise RuntimeError("ingest store is not running")
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Op(kind, payload, fut))
        return await fut

    async def _writer(self) -> None:
        last_end = 0.0
        while True:
            first = await self._queue.get()
            if time.monotonic() - last_end < self.busy_window:
                # busy (the previous commit ended moments ago): more writes are on their way;
                # waiting a little lets them share this commit, which costs far less CPU than
                # one commit each (a commit through aiosqlite is ~1 ms of CPU)
                await asyncio.sleep(self.linger)
            else:
                await asyncio.sleep(0)  # whatever is ready now joins
            batch = [first]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                results = await self._commit(batch)
            except Exception as exc:  # isolate: retry one by one so one bad op fails alone
                if len(batch) == 1:
                    _fail(batch[0], exc)
                    continue
                log.warning("ingest mirror batch of %d failed (%r); retrying one by one", len(batch), exc)
                for op in batch:
                    try:
                        res = await self._commit([op])
                    except Exception as exc1:
                        _fail(op, exc1)
                    else:
                        _resolve(op, res[0])
                continue
            for op, res in zip(batch, results):
                _resolve(op, res)
            last_end = time.monotonic()

    async def _commit(self, batch: list[_Op]) -> list[Any]:
        accepts: list[StrategyRecord] = [op.payload for op in batch if op.kind == "accept"]
        events = [row for op in batch if op.kind == "event" for row in op.payload]
        if self._sync is not None:  # a SQLite file: the whole transaction in one thread hand-off
            sync, sql = self._sync, self._sqlite_sql or self._build_sqlite_sql(self._sync.dialect)
            owners = await sync.transaction(lambda conn: sql.write(conn, accepts, events))
        else:
            async with self.db.begin() as conn:
                owners = await conn.run_sync(self._write, accepts, events)
        self.commits += 1
        self.batched_ops += len(batch)
        out: list[Any] = []
        for op in batch:
            if op.kind == "accept":
                rec = op.payload
                owner = owners.get(rec.content_hash)
                if owner is None:
                    raise RuntimeError(f"strategy {rec.strategy_id} was neither inserted nor found by its content hash")
                out.append(owner)
            else:
                out.append(None)
        return out

    def _build_sqlite_sql(self, dialect: sa.Dialect) -> _SqliteSql:
        self._sqlite_sql = _SqliteSql(dialect)
        return self._sqlite_sql

    def _write(self, conn: sa.Connection, accepts: list[StrategyRecord], events: list[dict]) -> dict[str, str]:
        """One group commit's statements (in the caller's transaction); returns content hash →
        owning strategy id of the accepted records."""
        owners: dict[str, str] = {}
        if accepts:
            rows = [rec.row() for rec in accepts]
            # statements built once and executed with parameter lists: SQLAlchemy compiles
            # each once (a VALUES list per batch size would be compiled again and again)
            res = conn.execute(self._insert_strategy, rows if len(rows) > 1 else rows[0])
            if res.rowcount == len(rows):
                owners = {r["content_hash"]: r["strategy_id"] for r in rows}  # all new (the common case)
            else:  # a duplicate, or a driver that does not count executemany rows: ask
                res = conn.execute(self._owners, {"hashes": list({r["content_hash"] for r in rows})})
                owners = {k: v for k, v in res}  # noqa: C416 - a CursorResult has keys(): dict(res) would read it as a mapping
            events = [*events, *_queued_events(accepts, owners)]
        if events:
            conn.execute(self._insert_event, events if len(events) > 1 else events[0])
        return owners

    # -- reads -------------------------------------------------------------------------------
    async def record(self, strategy_id: str) -> StrategyRecord | None:
        async with self.db.connect() as conn:
            res = await conn.execute(sa.select(strategies).where(strategies.c.strategy_id == strategy_id))
            row = res.first()
        return StrategyRecord.from_row(row) if row is not None else None

    async def owner_of(self, content_hash: str) -> str | None:
        async with self.db.connect() as conn:
            res = await conn.execute(sa.select(strategies.c.strategy_id).where(strategies.c.content_hash == content_hash))
            return res.scalar_one_or_none()

    async def state(self, strategy_id: str) -> MirroredState | None:
        """The mirrored FSM state of one strategy (None when there is no such strategy)."""
        async with self.db.connect() as conn:
            res = await conn.execute(
                sa.select(strategy_events.c.status, strategy_events.c.at, strategy_events.c.detail)
                .where(strategy_events.c.strategy_id == strategy_id)
                .order_by(strategy_events.c.id.desc()).limit(1)
            )
            last = res.first()
            if last is None:
                return None
            res = await conn.execute(
                sa.select(strategy_events.c.detail)
                .where(strategy_events.c.strategy_id == strategy_id, strategy_events.c.status == StrategyState.DIFFED)
                .order_by(strategy_events.c.id.desc()).limit(1)
            )
            diffed = res.scalar_one_or_none()
        return MirroredState(strategy_id, last.status, last.at, _loads(last.detail), _loads(diffed) if diffed else None)

    async def history(self, strategy_id: str) -> list[tuple[str, datetime, dict]]:
        async with self.db.connect() as conn:
            res = await conn.execute(
                sa.select(strategy_events.c.status, strategy_events.c.at, strategy_events.c.detail)
                .where(strategy_events.c.strategy_id == strategy_id).order_by(strategy_events.c.id)
            )
            return [(r.status, r.at, _loads(r.detail)) for r in res]

    async def pending(self) -> list[tuple[str, str]]:
        """``(strategy_id, status)`` of every strategy whose latest state is not terminal."""
        latest = (
            sa.select(strategy_events.c.strategy_id, sa.func.max(strategy_events.c.id).label("last_id"))
            .group_by(strategy_events.c.strategy_id).subquery()
        )
        q = (
            sa.select(strategy_events.c.strategy_id, strategy_events.c.status)
            .join(latest, strategy_events.c.id == latest.c.last_id)
            .where(strategy_events.c.status.not_in(TERMINAL))
            .order_by(strategy_events.c.id)
        )
        async with self.db.connect() as conn:
            res = await conn.execute(q)
            return [(r.strategy_id, r.status) for r in res]

    async def counts(self) -> dict[str, int]:
        """How many strategies are in each latest state."""
        latest = (
            sa.select(sa.func.max(strategy_events.c.id).label("last_id"))
            .group_by(strategy_events.c.strategy_id).subquery()
        )
        q = (
            sa.select(strategy_events.c.status, sa.func.count())
            .join(latest, strategy_events.c.id == latest.c.last_id)
            .group_by(strategy_events.c.status)
        )
        async with self.db.connect() as conn:
            res = await conn.execute(q)
            return {status: int(n) for status, n in res}

    async def ping(self) -> bool:
        return await self.db.ping()


def _loads(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _resolve(op: _Op, result: Any) -> None:
    if not op.future.done():
        op.future.set_result(result)


def _fail(op: _Op, exc: BaseException) -> None:
    if not op.future.done():
        op.future.set_exception(exc)


__all__ = ["IngestStore", "MirroredState", "StrategyRecord", "TERMINAL", "iso", "metadata", "strategies", "strategy_events", "utcnow"]
