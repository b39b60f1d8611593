"""The DAG Manager's graph store: tables and batched SQL helpers (PostgreSQL | SQLite).

Tables (all prefixed ``dm_`` so that the service can share a database):

* ``dm_nodes`` — compute nodes (and TagQueryNodes) by ``node_id``, with the fields
  their id is computed from, interval, period and tags.
* ``dm_queues`` — one queue (Kafka topic) per node and namespace (``sim`` = dry-run):
  unique ``(nid, sim)`` and unique ``topic``. These two constraints are what make
  concurrent diffs of the same node converge on one queue. ``tags``/``interval`` are
  the node's when its queue was created; ``released_at`` is when the last strategy
  reference was dropped (GC clock).
* ``dm_queue_tags`` — the tag index: one row per (tag, interval, namespace, queue);
  tag queries read the live ones.
* ``dm_strategies`` / ``dm_strategy_nodes`` — each strategy's current node references
  (what keeps queues alive) and its namespace.
* ``dm_sentinels`` / ``dm_sentinel_nodes`` — version sentinels, their traffic weight,
  and the sentinel→node edges.

Nodes, queues, strategies and sentinels have an integer surrogate key (``nid``,
``qid``, ``sid``, ``snid``) next to their id: the edge tables and the tag index are made
of integers (and the tag), and a new node costs two random-string index entries (its
id and its topic) instead of one per table it appears in. At 1,000 nodes per diff,
the number of index pages a transaction dirties is what its cost is made of.
* ``dm_tag_watches`` — the (tags, interval, match_mode) keys someone asked about, with
  the etag of the set last announced for each (QueueUpdated is published when it
  changes).
* ``dm_outbox`` — QueueUpdated events committed with the etag change that caused them,
  published on the ControlBus after the commit (:mod:`qmtl.store.outbox`).
* ``dm_leases`` — named leases between replicas (GC: one pass per interval).

Times are epoch seconds (float). Lists are JSON text.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from qmtl.store.outbox import outbox_table
from qmtl.store.sql import Database

metadata = sa.MetaData()

NODE_ID = sa.String(256)
TOPIC = sa.String(249)
# Edge tables hold integer surrogate keys only: at 1,000 edges per diff, rows of two
# integers are ~10x cheaper to write and index than rows of two 64-character ids
# (on SQLite as WITHOUT ROWID tables: ``sqlite_with_rowid=False``).

nodes = sa.Table(
    "dm_nodes",
    metadata,
    sa.Column("nid", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("node_id", NODE_ID, nullable=False, unique=True),
    sa.Column("node_type", sa.String(128), nullable=False),
    sa.Column("code_hash", sa.String(256), nullable=False),
    sa.Column("config_hash", sa.String(256), nullable=False),
    sa.Column("schema_hash", sa.String(256), nullable=False),
    sa.Column("interval", sa.Integer, nullable=True),
    sa.Column("period", sa.Integer, nullable=True),
    sa.Column("tags", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

queues = sa.Table(
    "dm_queues",
    metadata,
    sa.Column("qid", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("topic", TOPIC, nullable=False, unique=True),
    sa.Column("nid", sa.Integer, nullable=False),
    sa.Column("sim", sa.Boolean, nullable=False),
    sa.Column("node_type", sa.String(128), nullable=False),
    sa.Column("tags", sa.Text, nullable=False),
    sa.Column("interval", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("ttl_seconds", sa.Integer, nullable=False),
    sa.Column("released_at", sa.Float, nullable=True),
    sa.Column("creator", sa.String(32), nullable=False),  # token of the diff that created it
    sa.UniqueConstraint("nid", "sim", name="uq_dm_queues_nid_sim"),
)

queue_tags = sa.Table(
    "dm_queue_tags",
    metadata,
    sa.Column("tag", sa.String(128), primary_key=True),
    sa.Column("interval", sa.Integer, primary_key=True),
    sa.Column("sim", sa.Boolean, primary_key=True),
    sa.Column("qid", sa.Integer, primary_key=True),
    sa.Index("ix_dm_queue_tags_qid", "qid"),
    sqlite_with_rowid=False,
)

strategies = sa.Table(
    "dm_strategies",
    metadata,
    sa.Column("sid", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("strategy_id", sa.String(200), nullable=False, unique=True),
    sa.Column("sentinel_id", sa.String(256), nullable=False),
    sa.Column("run_type", sa.String(32), nullable=False),
    sa.Column("sim", sa.Boolean, nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

strategy_nodes = sa.Table(
    "dm_strategy_nodes",
    metadata,
    sa.Column("sid", sa.Integer, primary_key=True),
    sa.Column("nid", sa.Integer, primary_key=True),
    sa.Index("ix_dm_strategy_nodes_nid", "nid"),
    sqlite_with_rowid=False,
)

sentinels = sa.Table(
    "dm_sentinels",
    metadata,
    sa.Column("snid", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sentinel_id", sa.String(256), nullable=False, unique=True),
    sa.Column("strategy_id", sa.String(200), nullable=False, index=True),
    sa.Column("version", sa.String(64), nullable=True, index=True),
    sa.Column("weight", sa.Float, nullable=True),
    sa.Column("weight_updated_at", sa.Float, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

sentinel_nodes = sa.Table(
    "dm_sentinel_nodes",
    metadata,
    sa.Column("snid", sa.Integer, primary_key=True),
    sa.Column("nid", sa.Integer, primary_key=True),
    sa.Index("ix_dm_sentinel_nodes_nid", "nid"),
    sqlite_with_rowid=False,
)

tag_watches = sa.Table(
    "dm_tag_watches",
    metadata,
    sa.Column("watch_key", sa.String(64), primary_key=True),
    sa.Column("tags", sa.Text, nullable=False),
    sa.Column("interval", sa.Integer, nullable=False, index=True),
    sa.Column("match_mode", sa.String(3), nullable=False),
    sa.Column("etag", sa.String(64), nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

outbox = outbox_table(metadata, "dm_outbox")

leases = sa.Table(
    "dm_leases",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("until", sa.Float, nullable=False),  # epoch seconds
)

# SQLite: up to this many rows, a bulk INSERT with RETURNING binds them as one JSON
# parameter (one statement, no read-back); beyond, executemany and the caller's read-back
# are cheaper (10,000 new nodes: ~15 % less CPU).
SQLITE_RETURNING_ROWS = 1000

# ids per IN (...) for SQLAlchemy Core statements on SQLite (its bind limit is 32766);
# PostgreSQL gets one array parameter instead (``= ANY(...)``).
IN_CHUNK = 5000


SQLITE_CACHE_KIB = 32768  # per connection, filled lazily (bounded by the database size)


def tune_sqlite(db: Database) -> None:
    """The graph's indexes outgrow SQLite's default 2 MB page cache quickly; a diff of
    1,000 nodes then reads its index pages back from the OS on every write: every
    connection of ``db`` gets a larger cache."""
    if db.is_sqlite:
        sa.event.listen(db.engine.sync_engine, "connect", _sqlite_cache_pragma)


def _sqlite_cache_pragma(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
    cur.close()


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def loads(text: str | None) -> Any:
    return json.loads(text) if text else []


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _pg_type(column: sa.Column) -> str:
    t = column.type
    if isinstance(t, sa.Boolean):
        return "bool"
    if isinstance(t, sa.Integer):
        return "int4"
    if isinstance(t, sa.Float):
        return "float8"
    return "text"


def _aggregated(sql: str, names: Sequence[str]) -> str:
    """PostgreSQL: the rows of ``sql`` (columns ``names``) as one row of one array per column."""
    return f"WITH r AS ({sql}) SELECT {', '.join(f'array_agg(r.{name})' for name in names)} FROM r"


class SqlHelpers:
    """Statement helpers for one database, dialect-aware.

    The diff's hot statements (bulk INSERTs and SELECTs by a list of ids) are plain
    driver SQL, because SQLAlchemy's per-row parameter processing and the compilation
    of an expanding ``IN`` cost more than the database work itself at 1,000 rows:

    * bulk INSERT (... ON CONFLICT DO NOTHING), rows given column by column — SQLite: one
      prepared statement run by ``executemany``, or with ``RETURNING`` one statement over
      ``json_each`` of the rows as one JSON parameter; PostgreSQL: one statement over
      ``unnest`` of one array per column (a value shared by all rows is one parameter),
      which also returns the rows it inserted (``RETURNING``) when asked to;
    * WHERE column IN (ids) — SQLite: ``IN (SELECT value FROM json_each(?))`` with the
      ids as one JSON parameter; PostgreSQL: ``= ANY($n::text[])``;
    * large results on PostgreSQL as one row of ``array_agg`` per column.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self.is_sqlite = db.is_sqlite
        self._insert = sqlite.insert if db.is_sqlite else postgresql.insert
        self._sql: dict[tuple, str] = {}

    def insert(self, table: sa.Table) -> Any:
        """The dialect's INSERT (with ``on_conflict_do_nothing`` / ``on_conflict_do_update``)."""
        return self._insert(table)

    # -- SQLAlchemy Core helpers (cold paths) ---------------------------------------------
    def id_batches(self, column: sa.Column, values: Sequence[Any]) -> Iterator[Any]:
        """WHERE clauses selecting ``column`` in ``values``, as few as the dialect allows."""
        if not values:
            return
        if self.is_sqlite:
            for chunk in chunks(list(values), IN_CHUNK):
                yield column.in_(chunk)
        else:
            item = sa.Integer if isinstance(column.type, sa.Integer) else sa.String
            yield column == sa.any_(sa.literal(list(values), type_=postgresql.ARRAY(item)))

    async def insert_ignore_returning(self, conn: Any, table: sa.Table, rows: list[dict], returning: Sequence[sa.Column]) -> list[Any]:
        """INSERT ... ON CONFLICT DO NOTHING RETURNING, for a few rows (cold paths)."""
        if not rows:
            return []
        stmt = self.insert(table).values(rows).on_conflict_do_nothing().returning(*returning)
        return list((await conn.execute(stmt)).all())

    async def select_in(self, conn: Any, stmt: Any, column: sa.Column, values: Iterable[str]) -> list[Any]:
        values = list(values)
        out: list[Any] = []
        for clause in self.id_batches(column, values):
            out.extend((await conn.execute(stmt.where(clause))).all())
        return out

    # -- driver SQL (hot paths) -------------------------------------------------------------
    def param(self, n: int) -> str:
        """The n-th (1-based) positional placeholder."""
        return "?" if self.is_sqlite else f"${n}"

    def in_list(self, n: int) -> str:
        """``IN``-like test against the list passed (via :meth:`list_param`) as parameter n."""
        return "IN (SELECT value FROM json_each(?))" if self.is_sqlite else f"= ANY(${n}::text[])"

    def list_param(self, values: Sequence[Any]) -> Any:
        return json.dumps(list(values)) if self.is_sqlite else list(values)

    def in_int_list(self, n: int) -> str:
        return "IN (SELECT value FROM json_each(?))" if self.is_sqlite else f"= ANY(${n}::int4[])"

    async def insert_edges(self, conn: Any, table: sa.Table, head: int, tails: Sequence[int], *, fresh: bool = False) -> None:
        """INSERT of the edges (head, tail) for every tail, in one statement whose only list
        parameter is ``tails`` (no per-row binding). ``ON CONFLICT DO NOTHING`` unless the
        head is ``fresh`` (inserted by this transaction: none of its edges can exist), which
        spares PostgreSQL a speculative insertion per edge."""
        if not tails:
            return
        a, b = (c.name for c in table.primary_key.columns)
        ignore = "" if fresh else " ON CONFLICT DO NOTHING"
        if self.is_sqlite:  # "WHERE true" disambiguates INSERT ... SELECT ... ON CONFLICT
            sql = f"INSERT INTO {table.name} ({a}, {b}) SELECT ?, value FROM json_each(?) WHERE true{ignore}"
        else:
            sql = f"INSERT INTO {table.name} ({a}, {b}) SELECT $1, unnest($2::int4[]){ignore}"
        await conn.exec_driver_sql(sql, (head, self.list_param(sorted(tails))))

    async def select_rows(self, conn: Any, sql: str, params: Sequence[Any], names: Sequence[str]) -> Iterable[tuple]:
        """The rows of ``sql`` (a SELECT of the columns ``names``), as tuples.

        PostgreSQL sends them as one array per column (``array_agg``): one result row
        whatever the count, instead of a driver record and a result row per row — at
        1,000 rows their creation is most of the client's cost, and they keep the garbage
        collector busy. SQLite's result rows are returned as they are."""
        if self.is_sqlite:
            return (await conn.exec_driver_sql(sql, tuple(params))).all()
        row = (await conn.exec_driver_sql(_aggregated(sql, names), tuple(params))).one()
        return zip(*row) if row[0] is not None else ()

    async def insert_ignore(
        self, conn: Any, table: sa.Table, values: Mapping[str, Any], *, conflict: Sequence[str] = (),
        returning: Sequence[str] = (),
    ) -> list[list] | None:
        """Bulk INSERT ... ON CONFLICT [(conflict)] DO NOTHING of rows given column by column:
        ``values`` maps each column to the list of its values (one per row) or to the one
        value all rows share (sent once). Without ``conflict`` every unique index decides
        (PostgreSQL checks each of them before each row); with it only that one does, and a
        conflict on another is an error.

        With ``returning`` (column names), the answer is the rows this statement inserted
        — a row skipped on a conflict is not among them — one list per returned column
        (on PostgreSQL aggregated as in :meth:`select_rows`; on SQLite the rows go in as
        one JSON parameter read through ``json_each``, which spares the read-back
        SELECT an ``executemany`` would need). SQLite answers None for more than
        ``SQLITE_RETURNING_ROWS`` rows: the caller reads back what it needs."""
        return await self._bulk_insert(conn, table, values, ignore=True, conflict=conflict, returning=returning)

    async def insert_new(self, conn: Any, table: sa.Table, values: Mapping[str, Any]) -> None:
        """Bulk INSERT (``values`` as in :meth:`insert_ignore`) without ``ON CONFLICT``: for
        rows no other transaction can hold (their key includes an id this transaction
        created), where PostgreSQL would otherwise pay a speculative insertion per row. A
        conflict is a bug and raises."""
        await self._bulk_insert(conn, table, values, ignore=False, conflict=(), returning=())

    async def _bulk_insert(
        self, conn: Any, table: sa.Table, values: Mapping[str, Any], *, ignore: bool, conflict: Sequence[str],
        returning: Sequence[str],
    ) -> list[list] | None:
        columns = list(values)
        listed = tuple(c for c in columns if isinstance(values[c], list))
        count = len(values[listed[0]]) if listed else 0
        if not count:
            return [[] for _ in returning] if returning else None
        if self.is_sqlite and count > SQLITE_RETURNING_ROWS:
            returning = ()  # many rows: executemany and a read-back cost less than JSON in and out
        key = (table.name, tuple(columns), listed, ignore, tuple(conflict), tuple(returning))
        sql = self._sql.get(key)
        if sql is None:
            cols = ", ".join(columns)
            if self.is_sqlite and returning:  # the rows as one JSON array of arrays (json_each), shared values once
                picks = [f"json_extract(value, '$[{listed.index(c)}]')" if c in listed else "?" for c in columns]
                sql = f"INSERT INTO {table.name} ({cols}) SELECT {', '.join(picks)} FROM json_each(?) WHERE true"
            elif self.is_sqlite:
                sql = f"INSERT INTO {table.name} ({cols}) VALUES ({', '.join('?' for _ in columns)})"
            else:  # one array per listed column, unnested; a shared value is one parameter
                items: list[str] = []
                arrays: list[str] = []
                for i, c in enumerate(columns, 1):
                    if c in listed:
                        items.append(f"u.c{len(arrays)}")
                        arrays.append(f"${i}::{_pg_type(table.c[c])}[]")
                    else:
                        items.append(f"${i}::{_pg_type(table.c[c])}")
                aliases = ", ".join(f"c{j}" for j in range(len(arrays)))
                sql = f"INSERT INTO {table.name} ({cols}) SELECT {', '.join(items)} FROM unnest({', '.join(arrays)}) AS u({aliases})"
            if ignore:
                sql += f" ON CONFLICT ({', '.join(conflict)}) DO NOTHING" if conflict else " ON CONFLICT DO NOTHING"
            if returning:
                sql = f"{sql} RETURNING {', '.join(returning)}"
                if not self.is_sqlite:
                    sql = _aggregated(sql, returning)
            self._sql[key] = sql
        if self.is_sqlite and returning:
            shared = [values[c] for c in columns if c not in listed]
            # not ASCII-escaped: a string that is not valid Unicode fails in the driver, as with any other statement
            rows_json = json.dumps(list(zip(*(values[c] for c in listed))), ensure_ascii=False)
            result = (await conn.exec_driver_sql(sql, (*shared, rows_json))).all()
            return [list(col) for col in zip(*result)] if result else [[] for _ in returning]
        if self.is_sqlite:
            rows = list(zip(*(values[c] if c in listed else itertools.repeat(values[c], count) for c in columns)))
            await conn.exec_driver_sql(sql, rows)
            return None
        params = tuple(values[c] for c in columns)
        if not returning:
            await conn.exec_driver_sql(sql, params)
            return None
        row = (await conn.exec_driver_sql(sql, params)).one()
        return [col if col is not None else [] for col in row]


__all__ = [
    "metadata",
    "nodes",
    "queues",
    "queue_tags",
    "strategies",
    "strategy_nodes",
    "sentinels",
    "sentinel_nodes",
    "tag_watches",
    "SqlHelpers",
    "tune_sqlite",
    "dumps",
    "loads",
    "chunks",
]
