"""The DAG Manager service: diff, tag index, sentinel traffic, GC (SPEC §7).

Everything the HTTP handlers call lives here; handlers only translate. The service
takes its collaborators explicitly (database, ControlBus, topic admin, Gateway
callback, clock) so tests pass real or in-memory ones.

Diff, in one transaction, with a fixed number of statements whatever the DAG size
(bulk driver SQL, see :class:`~qmtl.dagmanager.store.SqlHelpers`):

1. one SELECT of the known nodes among the DAG's, each with its queue in the run's
   namespace (live, or ``_sim`` for dry-run);
2. for unknown nodes one INSERT ``ON CONFLICT DO NOTHING RETURNING`` their keys; for
   nodes without a queue one INSERT of their queues, under their short names,
   ``ON CONFLICT DO NOTHING RETURNING``, and one INSERT of the new queues' tag rows.
   Only rows an INSERT did not return (a concurrent diff's, or all of them on SQLite,
   whose ``executemany`` returns none) are read back: a queue carrying another diff's
   ``creator`` token lost this diff the race for the node (unique ``(nid, sim)``) and
   is reused; a node with no queue lost its name to another node (unique ``topic``),
   or shares its short name with an earlier node of the DAG: it is renamed
   (lengthened: one SELECT of its candidate names) and retried;
3. the strategy's references and its sentinel's edges (a new strategy: one INSERT of
   each; a strategy diffed again: only the difference is written);
4. each TagQueryNode's matching queues (and its watch).

So an all-new DAG costs six bulk statements and a known one three, whatever their size.
Rows no other transaction can hold (the tag rows of this diff's queues, the edges of a
strategy or sentinel it just created) are inserted without ``ON CONFLICT``, which on
PostgreSQL is a speculative insertion per row. Results of 1,000 rows come back as one
array per column, which keeps the client's work (and the garbage collector's) small.

After commit the new topics are created through the topic admin and the tag index
changes are handed to the notifier (QueueUpdated, off the diff's path).

On PostgreSQL, rows are written in node-id order so that concurrent diffs lock them in
the same order, diffs hold a shared advisory lock that GC takes exclusively (a queue is
never collected while a diff is re-using it), and a deadlock or serialisation failure
is retried. On SQLite (one process) diffs and GC are serialised by a lock.

Replicas: every guarantee above is the database's (unique constraints, row and advisory
locks), so several DAG Manager processes may serve one PostgreSQL database: concurrent
diffs of one DAG through different processes converge on one queue per node.
QueueUpdated goes through the transactional outbox (:mod:`qmtl.store.outbox`), so no
diff or GC waits for the ControlBus and each key's events are published in order by one
process at a time. The periodic GC runs once per interval across replicas (a lease row,
``dm_leases``); a topic a concurrent diff re-used while GC was deleting it is created
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from qmtl.bus.base import ControlBus
from qmtl.common import correlation, logs
from qmtl.common.errors import BadRequest, Conflict, NotFound, ServiceError, ServiceUnavailable, Unprocessable
from qmtl.contracts.constants import DEFAULT_MATCH_MODE, RunType, operation
from qmtl.contracts.defaults import defaults_filler
from qmtl.contracts.events import event_validators
from qmtl.store.outbox import Outbox, OutboxMetrics
from qmtl.store.sql import Database

from . import naming, store
from .callbacks import GatewayCallback
from .metrics import DagManagerMetrics
from .tagindex import (
    QueueChange,
    QueueNotifier,
    TagKey,
    etag_of,
    iso,
    match,
    normalise_tags,
    register_watches,
)
from .topics import TopicAdmin

# The diff's request body schema (its `dag` is dag.schema.json): the `default`s it declares are applied.
DIFF_REQUEST_SCHEMA = operation("dagmanager", "diff").request_schema

log = logging.getLogger(__name__)

TAG_QUERY_NODE = "TagQueryNode"
VERSION_SENTINEL = "VersionSentinel"
SIM_RUN_TYPES = frozenset({"dry-run", "dryrun", "dry_run", "paper"})
DEFAULT_RUN_TYPE = RunType.LIVE
TOPIC_CREATE_TIMEOUT = 10.0
_GC_LOCK_KEY = 0x716D746C  # "qmtl": the advisory lock diffs share and GC takes alone
_RETRY_SQLSTATES = {"40P01", "40001"}  # deadlock detected, serialization failure
_MAX_NAME_ROUNDS = 8
ANALYZE_MIN_GROWTH = 500
ANALYZED_TABLES = ("dm_nodes", "dm_queues", "dm_queue_tags", "dm_strategy_nodes", "dm_sentinel_nodes")


@dataclass
class DiffResult:
    strategy_id: str
    sentinel_id: str
    version: str
    sim: bool
    queue_map: dict[str, str]
    new_queues: list[str]
    reused_queues: list[str]
    tag_queries: dict[str, list[str]]
    created: list[tuple[str, tuple[str, ...], int]] = field(default_factory=list)  # (topic, tags, interval) live
    new_watches: list[TagKey] = field(default_factory=list)

    def body(self) -> dict:
        return {
            "strategy_id": self.strategy_id,
            "sentinel_id": self.sentinel_id,
            "version": self.version,
            "sim": self.sim,
            "queue_map": self.queue_map,
            "new_queues": self.new_queues,
            "reused_queues": self.reused_queues,
            "tag_queries": self.tag_queries,
        }


def _sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    for obj in (orig, getattr(orig, "__cause__", None)):
        code = getattr(obj, "pgcode", None) or getattr(obj, "sqlstate", None)
        if code:
            return str(code)
    return None


_UNAVAILABLE_SQLSTATES = {"57P01", "57P02", "57P03", "08000", "08001", "08003", "08004", "08006", "53300"}


def _unencodable(exc: BaseException) -> bool:
    """A string that cannot be UTF-8 encoded (a lone surrogate from a ``\\udc00`` JSON
    escape) reached the driver: SQLite raises UnicodeEncodeError, asyncpg wraps it."""
    seen = 0
    node: BaseException | None = exc
    while node is not None and seen < 6:
        if isinstance(node, UnicodeEncodeError) or "can't encode character" in str(node):
            return True
        node = getattr(node, "orig", None) or node.__cause__ or node.__context__
        seen += 1
    return False


def _bad_strings(value: Any, pointer: str = "", out: list | None = None) -> list[dict]:
    """Pointers to every string (or key) of ``value`` that is not valid Unicode."""
    out = [] if out is None else out
    if len(out) >= 20:
        return out
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            out.append({"pointer": pointer, "message": "not valid Unicode (lone surrogate)"})
    elif isinstance(value, dict):
        for k, v in value.items():
            child = f"{pointer}/{str(k).replace('~', '~0').replace('/', '~1')}"
            if isinstance(k, str) and not _utf8(k):
                out.append({"pointer": child, "message": "member name not valid Unicode (lone surrogate)"})
            _bad_strings(v, child, out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _bad_strings(v, f"{pointer}/{i}", out)
    return out


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


_UNAVAILABLE_SQLSTATES = {"57P01", "57P02", "57P03", "08000", "08001", "08003", "08004", "08006", "53300"}


@contextlib.contextmanager
def database_errors(request: Any = None) -> Any:
    """A database that cannot be reached is a 503 (with Retry-After), not a 500; a string
    the database cannot store is the caller's 422 (with pointers into ``request`` when
    given); any other SQL error is a bug and surfaces as a 500 with its log."""
    try:
        yield
    except (TimeoutError, UnicodeEncodeError, DBAPIError, OperationalError, InterfaceError, OSError, ConnectionError) as exc:
        if _unencodable(exc):
            errors = _bad_strings(request) if request is not None else []
            raise Unprocessable(
                "the request holds a string that is not valid Unicode (a lone surrogate escape such as \\udc00)",
                ext={"errors": errors or [{"pointer": "", "message": "not valid Unicode (lone surrogate)"}]},
            ) from exc
        if isinstance(exc, DBAPIError) and not isinstance(exc, (OperationalError, InterfaceError)) \
                and not exc.connection_invalidated and _sqlstate(exc) not in _UNAVAILABLE_SQLSTATES:
            raise
        if isinstance(exc, UnicodeEncodeError):
            raise
        log.warning("database unavailable: %s", exc)
        raise ServiceUnavailable("the DAG Manager's database is unavailable", retry_after=2) from exc


class DagManagerService:
    def __init__(
        self,
        db: Database,
        bus: ControlBus,
        *,
        topic_admin: TopicAdmin,
        callback: GatewayCallback,
        metrics: DagManagerMetrics,
        queue_ttl_seconds: int = 7 * 24 * 3600,
        partitions: int = 4,
        clock: Callable[[], float] = time.time,
        include_match_mode: bool = False,
        outbox_poll_seconds: float = 1.0,
    ) -> None:
        self.db = db
        self.instance_id = uuid.uuid4().hex[:12]  # names this process in leases
        self.bus = bus
        self.topic_admin = topic_admin
        self.callback = callback
        self.metrics = metrics
        self.queue_ttl_seconds = int(queue_ttl_seconds)
        self.partitions = int(partitions)
        self.topic_config = {"retention.ms": str(self.queue_ttl_seconds * 1000)}
        self.clock = clock
        self.sql = store.SqlHelpers(db)
        self._serial = asyncio.Lock()  # SQLite: one writer at a time (see module docstring)
        if db.is_sqlite:
            # The graph's indexes outgrow SQLite's default 2 MB page cache quickly; a diff
            # of 1,000 nodes then reads its index pages back from the OS on every write.
            sa.event.listen(db.engine.sync_engine, "connect", _sqlite_cache_pragma)
        self.outbox = Outbox(
            db, bus, store.outbox,
            validate=event_validators().validate,
            metrics=OutboxMetrics(
                published=lambda _topic: metrics.queue_updated.inc(),
                failed=metrics.queue_updated_failed.inc,
                dropped=metrics.queue_updated_failed.inc,
                pending=metrics.outbox_pending,
                oldest_age=metrics.outbox_oldest_age,
            ),
            poll_interval=outbox_poll_seconds,
            name="dagmanager-outbox",
        )
        self.notifier = QueueNotifier(db, bus, callback=callback, metrics=metrics, clock=clock,
                                      include_match_mode=include_match_mode, write=self._write, outbox=self.outbox)
        # PostgreSQL plans the diff's lookups from table statistics; right after the graph
        # grew fast they are stale (autovacuum analyzes within a minute or so) and a plan
        # made for a tiny table can scan the whole table per row. Growth therefore
        # triggers an ANALYZE in the background.
        self._grown = 0
        self._analyzed_at_size = 0
        self._analyze_task: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------
    async def create_tables(self) -> None:
        await self.db.create_all(store.metadata)

    async def start(self) -> None:
        await self.create_tables()
        await self.topic_admin.start()
        await self.callback.start()
        await self.notifier.start()
        await self.outbox.start()

    async def stop(self) -> None:
        if self._analyze_task is not None:
            self._analyze_task.cancel()
            with contextlib.suppress(BaseException):
                await self._analyze_task
            self._analyze_task = None
        with contextlib.suppress(Exception):
            await self.notifier.drain(timeout=2.0)
        await self.notifier.close()
        await self.outbox.stop()
        with contextlib.suppress(Exception):
            await self.callback.drain(timeout=2.0)
        await self.callback.close()
        try:
            await self.topic_admin.close()
        except Exception:
            log.exception("closing the topic admin failed")

    async def drain(self) -> None:
        """Wait for background notifications, their publication and callbacks (tests)."""
        await self.notifier.drain()
        await self.outbox.flush()
        await self.callback.drain()

    @contextlib.asynccontextmanager
    async def _write(self, *, exclusive: bool = False) -> Any:
        """A write transaction: serialised on SQLite; on PostgreSQL holding the GC
        advisory lock (shared for diffs, exclusive for GC)."""
        if self.db.is_sqlite:
            async with self._serial, self.db.begin() as conn:
                yield conn
            return
        async with self.db.begin() as conn:
            fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
            await conn.execute(sa.text(f"SELECT {fn}(:k)"), {"k": _GC_LOCK_KEY})
            yield conn

    async def _retrying(self, fn: Callable[[], Any]) -> Any:
        for attempt in range(4):
            try:
                return await fn()
            except DBAPIError as exc:
                if _sqlstate(exc) in _RETRY_SQLSTATES and attempt < 3:
                    log.info("retrying after %s (attempt %d)", _sqlstate(exc), attempt + 1)
                    await asyncio.sleep(0.005 * (attempt + 1))
                    continue
                raise

    # -- diff --------------------------------------------------------------------
    async def diff(
        self,
        strategy_id: str,
        dag: Mapping[str, Any],
        *,
        run_type: str | None = None,
        asset: str | None = None,
        version: str | None = None,
    ) -> DiffResult:
        started = time.perf_counter()
        defaults_filler(DIFF_REQUEST_SCHEMA)({"dag": dag})  # e.g. a TagQueryNode without match_mode is `any`
        plan = _plan(strategy_id, dag, run_type=run_type, asset=asset, version=version)
        try:
            with database_errors({"dag": dag}):
                result = await self._retrying(lambda: self._diff_txn(plan))
        except Exception:
            self.metrics.diffs.labels("error").inc()
            raise
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        self.metrics.diff_duration_ms.observe(elapsed_ms)
        self.metrics.diff_nodes.observe(len(plan.nodes))
        self.metrics.diffs.labels("ok").inc()
        self.metrics.queues_created.inc(len(result.new_queues))
        self.metrics.queues_reused.inc(len(plan.queue_nodes) - len(result.new_queues))
        if result.new_queues:
            self._note_growth(len(result.new_queues))
            await self._create_topics(result.new_queues)
        # the notifier recomputes the watches a queue's (tags, interval) can match: one change
        # per distinct pair (a DAG has few) instead of one per new queue
        changes = {(tags, interval): topic for topic, tags, interval in result.created}
        self.notifier.queues_changed([QueueChange(topic, tags, interval) for (tags, interval), topic in changes.items()])
        self.notifier.recheck(result.new_watches)
        return result

    async def diff_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[dict]:
        """``POST /diff/batch``: each request diffed as :meth:`diff` does it (its own
        transaction), in order; a failing diff answers its status and problem and does not
        stop the others."""
        results: list[dict] = []
        for req in requests:
            try:
                result = await self.diff(req["strategy_id"], req["dag"], run_type=req.get("run_type"),
                                         asset=req.get("asset"), version=req.get("version"))
            except ServiceError as exc:
                problem: dict[str, Any] = {"type": exc.type, "title": exc.title, "status": exc.status, "detail": exc.detail, **exc.ext}
                cid = correlation.get()
                if cid:
                    problem.setdefault("correlation_id", cid)
                results.append({"status": exc.status, "problem": problem})
            else:
                results.append({"status": 200, "body": result.body()})
        return results

    def _note_growth(self, rows: int) -> None:
        if self.db.is_sqlite:
            return
        self._grown += rows
        if self._grown < max(ANALYZE_MIN_GROWTH, self._analyzed_at_size // 5):
            return
        if self._analyze_task is not None and not self._analyze_task.done():
            return
        self._analyzed_at_size += self._grown
        self._grown = 0
        self._analyze_task = asyncio.create_task(self._analyze(), name="dagmanager-analyze")

    async def _analyze(self) -> None:
        try:
            async with self.db.connect() as conn:
                await conn.execute(sa.text(f"ANALYZE {', '.join(ANALYZED_TABLES)}"))
                await conn.commit()
        except Exception as exc:  # statistics are an optimisation; autovacuum will catch up
            log.info("ANALYZE after graph growth failed: %s", exc)

    async def _create_topics(self, topics: list[str]) -> None:
        try:
            await asyncio.wait_for(
                self.topic_admin.create_many(topics, self.partitions, self.topic_config), TOPIC_CREATE_TIMEOUT
            )
        except Exception as exc:  # the queue exists; the broker auto-creates the topic on first produce
            self.metrics.topic_create_failures.inc(len(topics))
            log.warning("creating %d topic(s) failed (%s); relying on broker auto-creation", len(topics), exc)

    async def _diff_txn(self, plan: _Plan) -> DiffResult:
        now = self.clock()
        sim = plan.sim
        async with self._write() as conn:
            # 1. known nodes, with their queue in this namespace (one SELECT)
            nids: dict[str, int] = {}
            assigned: dict[str, str] = {}
            for nid, node_id, topic in await self._known(conn, plan.graph_nodes, sim):
                nids[node_id] = nid
                if topic is not None:
                    assigned[node_id] = topic
            reused = set(assigned.values())

            # 2. new nodes, and queues for the nodes that have none in this namespace
            graph_new = [node_id for node_id in plan.graph_nodes if node_id not in nids]
            if graph_new:
                graph_new.sort()
                inserted = await self.sql.insert_ignore(conn, store.nodes, plan.node_values(graph_new, now),
                                                        conflict=("node_id",), returning=("nid", "node_id"))
                if inserted:
                    nids.update(zip(inserted[1], inserted[0]))
                unseen = [node_id for node_id in graph_new if node_id not in nids]  # a concurrent diff's; SQLite: all
                if unseen:
                    sql = f"SELECT nid, node_id FROM dm_nodes WHERE node_id {self.sql.in_list(1)}"
                    for nid, node_id in (await conn.exec_driver_sql(sql, (self.sql.list_param(unseen),))).all():
                        nids[node_id] = nid
            missing = [node_id for node_id in plan.queue_nodes if node_id not in assigned]
            created: list[tuple[str, tuple[str, ...], int]] = []
            new_topics: list[str] = []
            if missing:
                created_topics, concurrent = await self._create_queues(conn, plan, missing, nids, now)
                assigned.update(concurrent)
                reused.update(concurrent.values())
                assigned.update(created_topics)
                new_topics = sorted(created_topics.values())
                if not sim:
                    for node_id, topic in created_topics.items():
                        n = plan.nodes[node_id]
                        created.append((topic, n.tags, n.queue_interval))

            # 3. strategy references and sentinel edges
            await self._record_strategy(conn, plan, {nids[n] for n in plan.graph_nodes}, now)

            # 4. tag queries
            tag_queries: dict[str, list[str]] = {}
            keys: dict[TagKey, list[str]] = {}
            for node_id, key in plan.tag_queries.items():
                if key not in keys:
                    keys[key] = await match(conn, key)
                tag_queries[node_id] = keys[key]
            new_watches = await register_watches(conn, self.sql, keys, now)

        return DiffResult(
            strategy_id=plan.strategy_id,
            sentinel_id=plan.sentinel_id,
            version=plan.version,
            sim=sim,
            queue_map={node_id: assigned[node_id] for node_id in plan.queue_nodes},
            new_queues=new_topics,
            reused_queues=sorted(reused),
            tag_queries=tag_queries,
            created=created,
            new_watches=new_watches,
        )

    async def _known(self, conn: Any, node_ids: Sequence[str], sim: bool) -> Iterable[tuple]:
        """(nid, node_id, topic or None) of the known nodes among ``node_ids``."""
        sql = (
            "SELECT n.nid, n.node_id, q.topic FROM dm_nodes n "
            f"LEFT JOIN dm_queues q ON q.nid = n.nid AND q.sim = {self.sql.param(1)} "
            f"WHERE n.node_id {self.sql.in_list(2)}"
        )
        return await self.sql.select_rows(conn, sql, (sim, self.sql.list_param(node_ids)), ("nid", "node_id", "topic"))

    async def _queues_of(self, conn: Any, nids: Sequence[int], sim: bool) -> list[Any]:
        """(qid, nid, topic, creator) of the queues of ``nids`` in a namespace: one SELECT."""
        sql = (f"SELECT qid, nid, topic, creator FROM dm_queues WHERE sim = {self.sql.param(1)} "
               f"AND nid {self.sql.in_int_list(2)}")
        return list((await conn.exec_driver_sql(sql, (sim, self.sql.list_param(nids)))).all())

    async def _create_queues(
        self, conn: Any, plan: _Plan, missing: list[str], nids: Mapping[str, int], now: float
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Create queues for ``missing`` nodes. Returns (created by this diff, created by
        a concurrent one).

        Each node tries its short name straight away — one INSERT ``ON CONFLICT DO
        NOTHING RETURNING``, rows in node-id order; a node whose short name an earlier
        node of this batch has waits for the next round. Only the rows not returned are
        read back (SQLite returns none: all of them): a queue carrying another diff's
        ``creator`` token lost this diff the race for the node (unique ``(nid, sim)``) and
        is reused; no queue means the name is taken (unique ``topic``), and the node gets
        the shortest free longer name (:meth:`_assign_names`) in the next round."""
        sim = plan.sim
        token = uuid.uuid4().hex
        created: dict[str, str] = {}
        created_qids: dict[str, int] = {}
        concurrent: dict[str, str] = {}
        node_of = {nids[node_id]: node_id for node_id in missing}
        names: dict[str, str] = {}
        later: list[str] = []
        short: set[str] = set()
        for node_id in sorted(missing):
            name = plan.nodes[node_id].first_name
            if name in short:
                later.append(node_id)
            else:
                short.add(name)
                names[node_id] = name
        for _round in range(_MAX_NAME_ROUNDS):
            batch = [plan.nodes[node_id] for node_id in names]
            values = {
                "topic": list(names.values()), "nid": [nids[n.node_id] for n in batch], "sim": sim,
                "node_type": [n.node_type for n in batch], "tags": [n.tags_json for n in batch],
                "interval": [n.queue_interval for n in batch], "created_at": now, "ttl_seconds": self.queue_ttl_seconds,
                "released_at": None, "creator": token,
            }
            inserted = await self.sql.insert_ignore(conn, store.queues, values, returning=("qid", "nid", "topic"))
            for qid, nid_int, topic in zip(*inserted) if inserted else ():
                node_id = node_of[nid_int]
                created[node_id] = topic
                created_qids[node_id] = qid
            unseen = [nids[node_id] for node_id in names if node_id not in created]
            if unseen:
                for qid, nid_int, topic, creator in await self._queues_of(conn, unseen, sim):
                    node_id = node_of[nid_int]
                    if creator == token:
                        created[node_id] = topic
                        created_qids[node_id] = qid
                    else:
                        concurrent[node_id] = topic
            # a node with no queue now lost its name (to another node, or to an earlier node of this batch)
            pending = sorted(later + [node_id for node_id in names if node_id not in created and node_id not in concurrent])
            if not pending:
                break
            self.metrics.name_clashes.inc(len(pending))
            names = await self._assign_names(conn, plan, pending)
            later = []
        else:
            raise ServiceUnavailable(f"could not assign queue names for {len(pending)} node(s) under contention; retry")
        if concurrent:
            log.debug("%d queue(s) were created by a concurrent diff; reusing them", len(concurrent))
        if created:
            tags: list[str] = []
            intervals: list[int] = []
            qids: list[int] = []
            for node_id, qid in created_qids.items():
                n = plan.nodes[node_id]
                interval = n.queue_interval
                for tag in n.tags:
                    tags.append(tag)
                    intervals.append(interval)
                    qids.append(qid)
            # only this diff's new queues: no other transaction can hold these rows
            await self.sql.insert_new(conn, store.queue_tags, {"tag": tags, "interval": intervals, "sim": sim, "qid": qids})
        return created, concurrent

    async def _assign_names(self, conn: Any, plan: _Plan, node_ids: list[str]) -> dict[str, str]:
        """Shortest free name per node, for nodes whose short name is taken: one SELECT of
        every candidate name of theirs; in the (sorted) order given, each node takes its
        first candidate neither taken nor taken by an earlier node."""
        cands = {nid: plan.nodes[nid].candidates() for nid in node_ids}
        taken = await self._taken(conn, sorted({c for options in cands.values() for c in options}))
        out: dict[str, str] = {}
        used: set[str] = set()
        for nid in node_ids:
            name = next((c for c in cands[nid] if c not in taken and c not in used), "")
            if not name:
                raise ServiceUnavailable(f"no free queue name for node {nid}: every candidate is taken; retry")
            used.add(name)
            out[nid] = name
        return out

    async def _taken(self, conn: Any, names: Sequence[str]) -> set[str]:
        if not names:
            return set()
        sql = f"SELECT topic FROM dm_queues WHERE topic {self.sql.in_list(1)}"
        return {r[0] for r in (await conn.exec_driver_sql(sql, (self.sql.list_param(names),))).all()}

    async def _record_strategy(self, conn: Any, plan: _Plan, new_nids: set[int], now: float) -> None:
        s, sn = store.strategies, store.strategy_nodes
        sen, sen_n = store.sentinels, store.sentinel_nodes
        strategy_id = plan.strategy_id
        # A new strategy is the common case: try the INSERT first; an existing one is
        # then locked (FOR UPDATE) so that two diffs of one strategy apply one by one.
        prev = None
        sid: int | None = None
        for _attempt in range(3):  # (a concurrent release may delete the row in between)
            sid = (await conn.execute(
                self.sql.insert(s).values(
                    strategy_id=strategy_id, sentinel_id=plan.sentinel_id, run_type=plan.run_type, sim=plan.sim,
                    version=plan.version, created_at=now, updated_at=now,
                ).on_conflict_do_nothing().returning(s.c.sid)
            )).scalar()
            if sid is not None:
                break
            prev = (await conn.execute(
                sa.select(s.c.sid, s.c.sim).where(s.c.strategy_id == strategy_id).with_for_update()
            )).first()
            if prev is not None:
                break
        if prev is not None:
            sid = prev.sid
            await conn.execute(
                sa.update(s).where(s.c.sid == sid).values(
                    sentinel_id=plan.sentinel_id, run_type=plan.run_type, sim=plan.sim, version=plan.version, updated_at=now
                )
            )
        assert sid is not None
        if prev is None:
            added = new_nids
        else:
            old = {r[0] for r in (await conn.execute(sa.select(sn.c.nid).where(sn.c.sid == sid))).all()}
            if bool(prev.sim) != plan.sim:
                removed, added = old, new_nids
                if old:
                    await conn.execute(sa.delete(sn).where(sn.c.sid == sid))
            else:
                removed, added = old - new_nids, new_nids - old
                for clause in self.sql.id_batches(sn.c.nid, sorted(removed)):
                    await conn.execute(sa.delete(sn).where(sn.c.sid == sid, clause))
            if removed:
                await self._release(conn, sorted(removed), bool(prev.sim), now)
        await self.sql.insert_edges(conn, sn, sid, sorted(added), fresh=prev is None)

        # the sentinel and its edges
        row = None
        snid: int | None = (await conn.execute(
            self.sql.insert(sen).values(
                sentinel_id=plan.sentinel_id, strategy_id=strategy_id, version=plan.version, created_at=now
            ).on_conflict_do_nothing().returning(sen.c.snid)
        )).scalar()
        if snid is None:
            row = (await conn.execute(
                sa.select(sen.c.snid, sen.c.strategy_id, sen.c.version).where(sen.c.sentinel_id == plan.sentinel_id)
            )).first()
        if row is not None:
            if row.strategy_id != strategy_id:
                raise Conflict(
                    f"sentinel {plan.sentinel_id!r} belongs to strategy {row.strategy_id!r}, not {strategy_id!r}",
                    ext={"errors": [{"pointer": "/dag/nodes", "message": f"VersionSentinel {plan.sentinel_id!r} is another strategy's"}]},
                )
            snid = row.snid
            if row.version != plan.version:
                await conn.execute(sa.update(sen).where(sen.c.snid == snid).values(version=plan.version))
            old_edges = {r[0] for r in (await conn.execute(sa.select(sen_n.c.nid).where(sen_n.c.snid == snid))).all()}
            edges_add = new_nids - old_edges
            for clause in self.sql.id_batches(sen_n.c.nid, sorted(old_edges - new_nids)):
                await conn.execute(sa.delete(sen_n).where(sen_n.c.snid == snid, clause))
        else:
            edges_add = new_nids
        await self.sql.insert_edges(conn, sen_n, snid, sorted(edges_add), fresh=row is None)

    def _referenced(self) -> Any:
        """EXISTS: some strategy in the queue's namespace references the queue's node."""
        q, sn, s = store.queues, store.strategy_nodes, store.strategies
        return (
            sa.select(sa.literal(1))
            .select_from(sn.join(s, s.c.sid == sn.c.sid))
            .where(sn.c.nid == q.c.nid, s.c.sim == q.c.sim)
            .exists()
        )

    async def _release(self, conn: Any, nids: Sequence[int], sim: bool, now: float) -> list[str]:
        """Start the GC clock of the queues of ``nids`` that no strategy references any
        more; return their topics."""
        q = store.queues
        topics: list[str] = []
        for clause in self.sql.id_batches(q.c.nid, list(nids)):
            res = await conn.execute(
                sa.update(q).where(q.c.sim == sim, clause, ~self._referenced()).values(released_at=now).returning(q.c.topic)
            )
            topics.extend(r[0] for r in res.all())
        return sorted(topics)

    # -- tag index -----------------------------------------------------------------
    async def queues_by_tag(self, tags: Iterable[str], interval: int, match_mode: str = DEFAULT_MATCH_MODE) -> dict:
        key = TagKey.of(tags, interval, match_mode)
        if not key.tags:
            raise BadRequest("tags must name at least one non-blank tag",
                             ext={"errors": [{"parameter": "tags", "message": "no non-blank tag"}]})
        with database_errors():
            async with self.db.connect() as conn:
                queues = await match(conn, key)
            if key.watch_key not in self.notifier.known_watches:
                async with self._write() as conn:
                    new = await register_watches(conn, self.sql, {key: queues}, self.clock())
                self.notifier.known_watches.add(key.watch_key)
                self.metrics.tag_watches.set(len(self.notifier.known_watches))
                # a queue change that raced this registration is still announced
                self.notifier.recheck(new)
        return {
            "queues": queues,
            "etag": etag_of(key, queues),
            "tags": list(key.tags),
            "interval": key.interval,
            "match_mode": key.match_mode,
        }

    # -- catalogue -------------------------------------------------------------------
    def _queue_select(self) -> Any:
        q, n = store.queues, store.nodes
        return sa.select(q, n.c.node_id).select_from(q.join(n, n.c.nid == q.c.nid))

    async def list_queues(self, *, limit: int = 100, offset: int = 0, tag: str | None = None) -> dict:
        q, qt = store.queues, store.queue_tags
        where = []
        if tag:
            where.append(q.c.qid.in_(sa.select(qt.c.qid).where(qt.c.tag == tag)))
        with database_errors():
            async with self.db.connect() as conn:
                total = (await conn.execute(sa.select(sa.func.count()).select_from(q).where(*where))).scalar_one()
                rows = (await conn.execute(
                    self._queue_select().where(*where).order_by(q.c.topic).limit(limit).offset(offset)
                )).all()
                refs = await self._reference_counts(conn, rows)
        out = [_queue_body(r, refs.get((r.nid, bool(r.sim)), 0)) for r in rows]
        return {"queues": out, "total": int(total), "limit": limit, "offset": offset}

    async def _reference_counts(self, conn: Any, rows: Sequence[Any]) -> dict[tuple[int, bool], int]:
        if not rows:
            return {}
        sn, s = store.strategy_nodes, store.strategies
        stmt = (
            sa.select(sn.c.nid, s.c.sim, sa.func.count())
            .select_from(sn.join(s, s.c.sid == sn.c.sid))
            .group_by(sn.c.nid, s.c.sim)
        )
        out: dict[tuple[int, bool], int] = {}
        for nid, sim, count in await self.sql.select_in(conn, stmt, sn.c.nid, sorted({r.nid for r in rows})):
            out[(nid, bool(sim))] = int(count)
        return out

    async def get_node(self, node_id: str) -> dict:
        n, q, sn, s = store.nodes, store.queues, store.strategy_nodes, store.strategies
        sen, sen_n = store.sentinels, store.sentinel_nodes
        with database_errors():
            async with self.db.connect() as conn:
                row = (await conn.execute(sa.select(n).where(n.c.node_id == node_id))).first()
                if row is None:
                    raise NotFound(f"node {node_id!r} is not in the graph")
                qrows = (await conn.execute(self._queue_select().where(q.c.nid == row.nid).order_by(q.c.topic))).all()
                refs = await self._reference_counts(conn, qrows)
                strategies = [r[0] for r in (await conn.execute(
                    sa.select(s.c.strategy_id).select_from(sn.join(s, s.c.sid == sn.c.sid))
                    .where(sn.c.nid == row.nid).order_by(s.c.strategy_id).limit(100))).all()]
                sentinels = [r[0] for r in (await conn.execute(
                    sa.select(sen.c.sentinel_id).select_from(sen_n.join(sen, sen.c.snid == sen_n.c.snid))
                    .where(sen_n.c.nid == row.nid).order_by(sen.c.sentinel_id).limit(100))).all()]
        body: dict[str, Any] = {
            "node_id": row.node_id,
            "node_type": row.node_type,
            "code_hash": row.code_hash,
            "config_hash": row.config_hash,
            "schema_hash": row.schema_hash,
            "tags": store.loads(row.tags),
            "created_at": iso(row.created_at),
            "queues": [_queue_body(r, refs.get((r.nid, bool(r.sim)), 0)) for r in qrows],
            "strategies": strategies,
            "sentinels": sentinels,
        }
        if row.interval is not None:
            body["interval"] = row.interval
        if row.period is not None:
            body["period"] = row.period
        return body

    # -- sentinels ----------------------------------------------------------------------
    async def get_sentinel(self, sentinel_id: str) -> dict:
        sen, sen_n = store.sentinels, store.sentinel_nodes
        with database_errors():
            async with self.db.connect() as conn:
                row = (await conn.execute(sa.select(sen).where(sen.c.sentinel_id == sentinel_id))).first()
                if row is None:
                    raise NotFound(f"sentinel {sentinel_id!r} is not known")
                count = (await conn.execute(
                    sa.select(sa.func.count()).select_from(sen_n).where(sen_n.c.snid == row.snid))).scalar_one()
        return _sentinel_body(row, int(count))

    async def set_sentinel_weight(self, *, weight: float, sentinel_id: str | None = None, version: str | None = None) -> dict:
        sen = store.sentinels
        now = self.clock()
        with database_errors():
            async with self._write() as conn:
                if sentinel_id:
                    row = (await conn.execute(sa.select(sen).where(sen.c.sentinel_id == sentinel_id).with_for_update())).first()
                    if row is None:
                        raise NotFound(f"sentinel {sentinel_id!r} is not known")
                else:
                    rows = (await conn.execute(
                        sa.select(sen).where(sen.c.version == version).order_by(sen.c.sentinel_id).limit(11).with_for_update()
                    )).all()
                    if not rows:
                        rows = (await conn.execute(sa.select(sen).where(sen.c.sentinel_id == version).with_for_update())).all()
                    if not rows:
                        raise NotFound(f"no sentinel has version {version!r} (or that id)")
                    if len(rows) > 1:
                        names = [r.sentinel_id for r in rows[:10]]
                        raise Conflict(
                            f"version {version!r} names {len(rows) if len(rows) <= 10 else 'more than 10'} sentinels; "
                            f"give sentinel_id (one of {', '.join(names)})",
                            ext={"sentinels": names},
                        )
                    row = rows[0]
                await conn.execute(sa.update(sen).where(sen.c.sentinel_id == row.sentinel_id)
                                   .values(weight=float(weight), weight_updated_at=now))
        ts = iso(now)
        self.metrics.sentinel_weight.labels(self.metrics.sentinel_label(row.sentinel_id)).set(float(weight))
        relayed = self.callback.send("sentinel_weight", {"sentinel_id": row.sentinel_id, "weight": float(weight), "ts": ts})
        body: dict[str, Any] = {"sentinel_id": row.sentinel_id, "weight": float(weight), "ts": ts, "relayed": relayed}
        if row.version is not None:
            body["version"] = row.version
        if row.weight is not None:
            body["previous_weight"] = float(row.weight)
        return body

    # -- strategies ------------------------------------------------------------------------
    async def release_strategy(self, strategy_id: str) -> dict:
        s, sn = store.strategies, store.strategy_nodes
        sen, sen_n = store.sentinels, store.sentinel_nodes
        now = self.clock()
        with database_errors():
            async with self._write() as conn:
                prev = (await conn.execute(
                    sa.select(s.c.sid, s.c.sim).where(s.c.strategy_id == strategy_id).with_for_update())).first()
                if prev is None:
                    raise NotFound(f"strategy {strategy_id!r} is not known")
                nids = sorted(r[0] for r in (await conn.execute(sa.select(sn.c.nid).where(sn.c.sid == prev.sid))).all())
                await conn.execute(sa.delete(sn).where(sn.c.sid == prev.sid))
                topics = await self._release(conn, nids, bool(prev.sim), now)
                sentinel_rows = (await conn.execute(
                    sa.select(sen.c.snid, sen.c.sentinel_id).where(sen.c.strategy_id == strategy_id))).all()
                for clause in self.sql.id_batches(sen_n.c.snid, [r.snid for r in sentinel_rows]):
                    await conn.execute(sa.delete(sen_n).where(clause))
                await conn.execute(sa.delete(sen).where(sen.c.strategy_id == strategy_id))
                await conn.execute(sa.delete(s).where(s.c.sid == prev.sid))
        sentinel_ids = sorted(r.sentinel_id for r in sentinel_rows)
        for sentinel_id in sentinel_ids:
            if self.metrics.sentinel_label.release(sentinel_id):
                with contextlib.suppress(KeyError):
                    self.metrics.sentinel_weight.remove(sentinel_id)
        return {"strategy_id": strategy_id, "released_nodes": len(nids), "released_queues": topics,
                "sentinels": sentinel_ids}

    # -- GC ------------------------------------------------------------------------------
    async def gc(self) -> dict:
        """Collect queues no strategy has referenced for longer than their TTL."""
        q, qt, n, sn, sen_n = store.queues, store.queue_tags, store.nodes, store.strategy_nodes, store.sentinel_nodes
        now = self.clock()
        since = sa.func.coalesce(q.c.released_at, q.c.created_at)
        try:
            with database_errors():
                async with self._write(exclusive=True) as conn:
                    rows = (await conn.execute(
                        sa.select(q.c.qid, q.c.topic, n.c.node_id, q.c.nid, q.c.sim, q.c.tags, q.c.interval, since.label("since"))
                        .select_from(q.join(n, n.c.nid == q.c.nid))
                        .where(since + q.c.ttl_seconds < now, ~self._referenced())
                        .order_by(q.c.topic)
                    )).all()
                    qids = [r.qid for r in rows]
                    for clause in self.sql.id_batches(qt.c.qid, qids):
                        await conn.execute(sa.delete(qt).where(clause))
                    for clause in self.sql.id_batches(q.c.qid, qids):
                        await conn.execute(sa.delete(q).where(clause))
                    # nodes left with no queue, no strategy and no sentinel edge leave the graph
                    orphan = sa.and_(
                        ~sa.select(sa.literal(1)).where(q.c.nid == n.c.nid).exists(),
                        ~sa.select(sa.literal(1)).where(sn.c.nid == n.c.nid).exists(),
                        ~sa.select(sa.literal(1)).where(sen_n.c.nid == n.c.nid).exists(),
                    )
                    for clause in self.sql.id_batches(n.c.nid, sorted({r.nid for r in rows})):
                        await conn.execute(sa.delete(n).where(clause, orphan))
        except Exception:
            self.metrics.gc_runs.labels("error").inc()
            raise
        self.metrics.gc_runs.labels("ok").inc()
        self.metrics.queues_collected.inc(len(rows))
        for r in rows:
            try:
                await self.topic_admin.delete(r.topic)
            except Exception as exc:
                log.warning("deleting topic %s failed: %s", r.topic, exc)
        if rows:
            await self._recreate_reused_topics([r.topic for r in rows])
        self.notifier.queues_changed(
            [QueueChange(r.topic, tuple(store.loads(r.tags)), int(r.interval)) for r in rows if not r.sim]
        )
        if rows:
            log.info("GC collected %d queue(s)", len(rows))
        return {
            "collected": [{"topic": r.topic, "node_id": r.node_id, "unreferenced_since": iso(r.since)} for r in rows],
            "ran_at": iso(now),
        }

    async def _recreate_reused_topics(self, topics: list[str]) -> None:
        """A diff (of this or another replica) may have given a collected queue's name to a
        new queue between GC's commit and its topic deletion: create those topics again."""
        q = store.queues
        async with self.db.connect() as conn:
            reused = [r[0] for r in (await conn.execute(sa.select(q.c.topic).where(q.c.topic.in_(topics)))).all()]
        if reused:
            log.info("re-creating %d topic(s) a diff re-used while GC deleted them", len(reused))
            await self._create_topics(sorted(reused))

    async def claim_lease(self, name: str, seconds: float) -> bool:
        """Take the named lease for ``seconds`` unless another process holds it (wall clock)."""
        ls = store.leases
        now = time.time()
        values = {"name": name, "owner": self.instance_id, "until": now + seconds}
        async with self.db.begin() as conn:
            inserted = await self.sql.insert_ignore_returning(conn, ls, [values], [ls.c.name])
            if inserted:
                return True
            res = await conn.execute(
                sa.update(ls)
                .where(ls.c.name == name, sa.or_(ls.c.until <= now, ls.c.owner == self.instance_id))
                .values(owner=self.instance_id, until=now + seconds)
            )
            return res.rowcount == 1

    async def gc_loop(self, interval: float) -> None:
        """Run GC every ``interval`` seconds until cancelled, once per interval across every
        replica on the database (the ``gc`` lease); a failed pass is logged."""
        logs.label_task("dagmanager-gc")
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self.claim_lease("gc", interval * 0.9):
                    self.metrics.gc_skipped.inc()
                    continue
                await self.gc()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("GC pass failed: %s", exc)

    # -- ops -----------------------------------------------------------------------------
    async def health(self) -> tuple[bool, dict]:
        try:
            async with self.db.connect() as conn:
                count = (await conn.execute(sa.select(sa.func.count()).select_from(store.queues))).scalar_one()
        except (TimeoutError, SQLAlchemyError, OSError, ConnectionError) as exc:
            log.warning("health: database down: %s", exc)
            return False, {"database": "down", "topic_admin": self.topic_admin.mode}
        outbox = await self.outbox.stats()
        return True, {"status": "ok", "database": "ok", "topic_admin": self.topic_admin.mode, "queues": int(count),
                      "outbox_pending": outbox["pending"], "outbox_oldest_age_seconds": outbox["oldest_age_seconds"]}


SQLITE_CACHE_KIB = 32768  # per connection, filled lazily (bounded by the database size)


def _sqlite_cache_pragma(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
    cur.close()


def _queue_body(r: Any, references: int) -> dict:
    """A Queue body from a row of :meth:`DagManagerService._queue_select`."""
    body = {
        "topic": r.topic,
        "node_id": r.node_id,
        "node_type": r.node_type,
        "tags": store.loads(r.tags),
        "interval": int(r.interval),
        "sim": bool(r.sim),
        "created_at": iso(r.created_at),
        "ttl_seconds": int(r.ttl_seconds),
        "references": references,
    }
    if r.released_at is not None:
        body["released_at"] = iso(r.released_at)
    return body


def _sentinel_body(row: Any, nodes: int) -> dict:
    body: dict[str, Any] = {
        "sentinel_id": row.sentinel_id,
        "strategy_id": row.strategy_id,
        "created_at": iso(row.created_at),
        "nodes": nodes,
    }
    if row.version is not None:
        body["version"] = row.version
    if row.weight is not None:
        body["weight"] = float(row.weight)
    if row.weight_updated_at is not None:
        body["weight_updated_at"] = iso(row.weight_updated_at)
    return body


# -- the plan of a diff: the request checked and indexed, before any SQL ---------------

@functools.lru_cache(maxsize=1024)
def _tags_json(tags: tuple[str, ...]) -> str:
    """The stored form of a node's tags (few distinct sets: cached)."""
    return store.dumps(list(tags))


class _Node:
    """One node of a diffed DAG. What only new nodes need (tags, names, rows) is derived
    on first use: a diff of known nodes reads little more than their ids."""

    __slots__ = ("node_id", "node_type", "raw", "asset", "version", "sim", "_tags", "_tags_json")

    def __init__(self, node_id: str, raw: dict, asset: str, version: str, sim: bool) -> None:
        self.node_id = node_id
        self.node_type: str = raw["node_type"]
        self.raw = raw
        node_asset = raw.get("asset")
        self.asset = node_asset if type(node_asset) is str and node_asset else asset
        self.version = version
        self.sim = sim
        self._tags: tuple[str, ...] | None = None
        self._tags_json: str | None = None

    @property
    def tags(self) -> tuple[str, ...]:
        if self._tags is None:
            self._tags = normalise_tags(self.raw.get("tags") or ())
        return self._tags

    @property
    def tags_json(self) -> str:
        if self._tags_json is None:
            self._tags_json = _tags_json(self.tags)
        return self._tags_json

    @property
    def code_hash(self) -> str:
        return self.raw.get("code_hash") or ""

    def _int(self, key: str) -> int | None:
        value = self.raw.get(key)
        return value if type(value) is int else None

    @property
    def queue_interval(self) -> int:
        return int(self._int("interval") or 0)

    @property
    def first_name(self) -> str:
        return next(naming.candidates(self.asset, self.node_type, self.code_hash, self.version, node_id=self.node_id, sim=self.sim))

    def candidates(self) -> list[str]:
        return list(naming.candidates(self.asset, self.node_type, self.code_hash, self.version, node_id=self.node_id, sim=self.sim))


@dataclass
class _Plan:
    strategy_id: str
    run_type: str
    sim: bool
    asset: str
    version: str
    sentinel_id: str
    nodes: dict[str, _Node]  # node_id → node (queue nodes and tag queries)
    queue_nodes: list[str]  # in DAG order
    graph_nodes: list[str]  # queue nodes + tag queries, DAG order
    tag_queries: dict[str, TagKey]

    def node_values(self, node_ids: Sequence[str], now: float) -> dict[str, Any]:
        """The ``dm_nodes`` rows of ``node_ids``, column by column (see ``SqlHelpers.insert_ignore``)."""
        batch = [self.nodes[node_id] for node_id in node_ids]
        return {
            "node_id": list(node_ids),
            "node_type": [n.node_type for n in batch],
            "code_hash": [n.code_hash for n in batch],
            "config_hash": [n.raw.get("config_hash") or "" for n in batch],
            "schema_hash": [n.raw.get("schema_hash") or "" for n in batch],
            "interval": [n._int("interval") for n in batch],
            "period": [n._int("period") for n in batch],
            "tags": [n.tags_json for n in batch],
            "created_at": now,
        }


def _plan(strategy_id: str, dag: Mapping[str, Any], *, run_type: str | None, asset: str | None, version: str | None) -> _Plan:
    nodes = dag.get("nodes") if isinstance(dag, dict) else None
    if not isinstance(nodes, list) or not nodes:
        raise Unprocessable("the DAG has no nodes", ext={"errors": [{"pointer": "/dag/nodes", "message": "at least one node is required"}]})
    errors: list[dict] = []
    seen: dict[str, int] = {}
    raw: dict[str, dict] = {}
    queue_nodes: list[str] = []
    graph_nodes: list[str] = []
    tag_queries: dict[str, TagKey] = {}
    sentinel: Mapping[str, Any] | None = None
    for i, node in enumerate(nodes):
        if type(node) is not dict or type(node.get("node_id")) is not str or type(node.get("node_type")) is not str:
            errors.append({"pointer": f"/dag/nodes/{i}", "message": "a node needs string node_id and node_type"})
            continue
        nid, ntype = node["node_id"], node["node_type"]
        if nid in seen:
            errors.append({"pointer": f"/dag/nodes/{i}/node_id", "message": f"node_id {nid} also at /dag/nodes/{seen[nid]}"})
            continue
        seen[nid] = i
        if ntype == VERSION_SENTINEL:
            if sentinel is not None:
                errors.append({"pointer": f"/dag/nodes/{i}", "message": "a DAG has at most one VersionSentinel"})
            sentinel = node
            continue
        if ntype == TAG_QUERY_NODE:
            try:
                key = TagKey.of(node.get("tags") or (), node.get("interval") or 0, node.get("match_mode"))
            except (TypeError, ValueError) as exc:
                errors.append({"pointer": f"/dag/nodes/{i}", "message": str(exc)})
                continue
            if not key.tags or key.interval < 1:
                errors.append({"pointer": f"/dag/nodes/{i}", "message": "a TagQueryNode needs tags and an interval >= 1"})
                continue
            tag_queries[nid] = key
        else:
            queue_nodes.append(nid)
        raw[nid] = node
        graph_nodes.append(nid)
    if errors:
        raise Unprocessable(f"the DAG is not valid: {errors[0]['message']} at {errors[0]['pointer']}", ext={"errors": errors[:50]})
    run_type = run_type or DEFAULT_RUN_TYPE
    sim = run_type in SIM_RUN_TYPES
    sentinel_version = sentinel.get("version") if sentinel is not None else None
    version = version or (sentinel_version if isinstance(sentinel_version, str) and sentinel_version else None) or naming.DEFAULT_VERSION
    asset = asset or naming.DEFAULT_ASSET
    by_id = {nid: _Node(nid, node, asset, version, sim) for nid, node in raw.items()}
    return _Plan(
        strategy_id=strategy_id,
        run_type=run_type,
        sim=sim,
        asset=asset,
        version=version,
        sentinel_id=sentinel["node_id"] if sentinel is not None else f"{strategy_id}-sentinel",
        nodes=by_id,
        queue_nodes=queue_nodes,
        graph_nodes=graph_nodes,
        tag_queries=tag_queries,
    )


__all__ = ["DagManagerService", "DiffResult", "SIM_RUN_TYPES", "TAG_QUERY_NODE", "VERSION_SENTINEL"]
