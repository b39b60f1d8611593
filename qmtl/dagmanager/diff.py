"""The diff (``POST /diff``, ``POST /diff/batch``, SPEC §7): a DAG's nodes mapped to
queues, new ones created.

Diff, in one transaction, with a fixed number of statements whatever the DAG size
(bulk driver SQL, see :class:`~qmtl.dagmanager.store.SqlHelpers`):

1. one SELECT of the known nodes among the DAG's, each with its queue in the run's
   namespace (live, or ``_sim`` for dry-run);
2. for unknown nodes one INSERT ``ON CONFLICT DO NOTHING RETURNING`` their keys; for
   nodes without a queue one INSERT of their queues, under their short names,
   ``ON CONFLICT DO NOTHING RETURNING``, and one INSERT of the new queues' tag rows
   (on PostgreSQL part of the queues' statement).
   Only rows an INSERT did not return (a concurrent diff's, or all of them on SQLite
   beyond ``store.SQLITE_RETURNING_ROWS``) are read back: a queue carrying another diff's
   ``creator`` token lost this diff the race for the node (unique ``(nid, sim)``) and
   is reused; a node with no queue lost its name to another node (unique ``topic``),
   or shares its short name with an earlier node of the DAG: it is renamed
   (lengthened: one SELECT of its candidate names) and retried;
3. the strategy's references and its sentinel's edges (a new strategy: one INSERT of
   each, on PostgreSQL all in one statement; a strategy diffed again: only the
   difference is written);
4. each TagQueryNode's matching queues (and its watch).

So a new strategy of new nodes costs, whatever its size, four statements on PostgreSQL
(after the GC lock) and eight on SQLite; of known nodes two and five.
Rows no other transaction can hold (the tag rows of this diff's queues, the edges of a
strategy or sentinel it just created) are inserted without ``ON CONFLICT``, which on
PostgreSQL is a speculative insertion per row. Results of 1,000 rows come back as one
array per column, which keeps the client's work (and the garbage collector's) small.

After commit the new topics are created through the topic admin and the tag index
changes are handed to the notifier (QueueUpdated, off the diff's path).

Batches (``POST /diff/batch``, what the Gateway's ingest workers send: up to 32 strategies
at once) are diffed set-based in one transaction (:meth:`Differ._batch_txn`): one SELECT
of the known nodes of all the batch's DAGs, one INSERT of all their new nodes, the short
names taken (one SELECT; on a clash one more of the clashing nodes' longer names), one
INSERT of all the missing queues (on SQLite one more of their tag rows), one each of the
strategies, the sentinels and the references of both, one match per distinct tag query
and one INSERT of the watches — for a batch of new strategies with new nodes nine
statements on SQLite and eight on PostgreSQL (two more with tag queries), instead of
eight and four per strategy. Each diff still gets exactly the answer it would get
applied alone after the ones before it: a node's row and queue come from the first DAG
of the batch that has it (its queue is new to that diff, reused by later ones), queue
names are decided as one by one (the renaming order included), a tag query does not see
the queues of later diffs, a watch is new to the first diff that has it. What that path
does not cover — a strategy or sentinel that exists already (a re-diff, or a 409),
several namespaces, one strategy twice, a name a concurrent transaction took, or any
error — rolls the batch's transaction back, and the diffs are then applied one by one,
each in its own transaction, so a diff that fails fails alone.

On PostgreSQL, rows are written in node-id order so that concurrent diffs lock them in
the same order, diffs hold a shared advisory lock that GC takes exclusively (a queue is
never collected while a diff is re-using it), and a deadlock or serialisation failure
is retried. On SQLite (one process) diffs and GC are serialised by a lock.

Replicas: every guarantee above is the database's (unique constraints, row and advisory
locks), so several DAG Manager processes may serve one PostgreSQL database: concurrent
diffs of one DAG through different processes converge on one queue per node (batches
too: their rows are written in node-id and strategy-id order, a queue another
transaction created is reused, and a strategy another one created sends the batch one
by one).
QueueUpdated goes through the transactional outbox (:mod:`qmtl.store.outbox`), so no
diff or GC waits for the ControlBus and each key's events are published in order by one
process at a time. The periodic GC runs once per interval across replicas (a lease row,
``dm_leases``); a topic a concurrent diff re-used while GC was deleting it is created
again.
"""

from __future__ import annotations

import collections
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qmtl.common import correlation
from qmtl.common.errors import ServiceError, ServiceUnavailable
from qmtl.contracts.constants import operation
from qmtl.contracts.defaults import defaults_filler

from . import store
from .analyze import GrowthAnalyzer
from .errors import database_errors
from .metrics import DagManagerMetrics
from .plan import Plan, PlanNode, make_plan, node_values
from .strategies import StrategyReferences
from .tagindex import QueueChange, QueueNotifier, TagKey, match, register_watches
from .topics import QueueTopics
from .transactions import Transactions

# The diff's request body schema (its `dag` is dag.schema.json): the `default`s it declares are applied.
DIFF_REQUEST_SCHEMA = operation("dagmanager", "diff").request_schema

log = logging.getLogger(__name__)

_MAX_NAME_ROUNDS = 8
_BATCH_CANDIDATES = 8  # names looked up per clashing queue in a batch (6 to 20 hash characters)

# Queues (one array per column; only this diff's rows are tagged: no other transaction
# can hold a tag row of a queue this statement inserted, hence no ON CONFLICT there).
_INSERT_TAGGED_QUEUES_SQL = (
    "WITH r AS (INSERT INTO dm_queues (topic, nid, sim, node_type, tags, interval, created_at, ttl_seconds, released_at, creator) "
    "SELECT u.topic, u.nid, $3::bool, u.node_type, u.tags, u.interval, $7::float8, $8::int4, NULL, $9::text "
    "FROM unnest($1::text[], $2::int4[], $4::text[], $5::text[], $6::int4[]) AS u(topic, nid, node_type, tags, interval) "
    "ON CONFLICT DO NOTHING RETURNING qid, nid, topic), "
    "t AS (INSERT INTO dm_queue_tags (tag, interval, sim, qid) SELECT g.tag, g.interval, $3::bool, r.qid "
    "FROM r JOIN unnest($10::int4[], $11::text[], $12::int4[]) AS g(nid, tag, interval) ON g.nid = r.nid) "
    "SELECT array_agg(r.qid), array_agg(r.nid), array_agg(r.topic) FROM r"
)


@dataclass
class _Queues:
    """Queues being created by one transaction (``creator`` = ``token``)."""

    token: str
    created: dict[str, str] = field(default_factory=dict)  # node → topic
    qids: dict[str, int] = field(default_factory=dict)  # node → qid of a created queue
    tagged: set[str] = field(default_factory=set)  # created queues whose tag rows are written
    concurrent: dict[str, str] = field(default_factory=dict)  # node → topic created by another transaction


class _OneByOne(Exception):
    """The batch's diffs go one by one (see :meth:`Differ._batch_txn`)."""


def _problem(exc: ServiceError) -> dict[str, Any]:
    problem: dict[str, Any] = {"type": exc.type, "title": exc.title, "status": exc.status, "detail": exc.detail, **exc.ext}
    cid = correlation.get()
    if cid:
        problem.setdefault("correlation_id", cid)
    return {"status": exc.status, "problem": problem}


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


class Differ:
    def __init__(
        self,
        txn: Transactions,
        sql: store.SqlHelpers,
        *,
        strategies: StrategyReferences,
        topics: QueueTopics,
        notifier: QueueNotifier,
        analyzer: GrowthAnalyzer,
        metrics: DagManagerMetrics,
        queue_ttl_seconds: int,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        self.txn = txn
        self.sql = sql
        self.strategies = strategies
        self.topics = topics
        self.notifier = notifier
        self.analyzer = analyzer
        self.metrics = metrics
        self.queue_ttl_seconds = int(queue_ttl_seconds)
        self.clock = clock
        self.monotonic = monotonic

    async def diff(
        self,
        strategy_id: str,
        dag: Mapping[str, Any],
        *,
        run_type: str | None = None,
        asset: str | None = None,
        version: str | None = None,
    ) -> DiffResult:
        result = await self._diff(strategy_id, dag, run_type=run_type, asset=asset, version=version)
        await self._announce([result])
        return result

    async def diff_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[dict]:
        """``POST /diff/batch``: each request answered as :meth:`diff` answers it, in order;
        a failing diff answers its status and problem and does not stop the others.

        The batch's valid diffs are first tried together, set-based, in one transaction
        (:meth:`_batch_txn`), which gives each diff exactly the answer it would get
        applied alone after the ones before it. Whatever that path does not cover — a
        strategy or sentinel that exists already, a queue name clash, mixed namespaces,
        or any error — rolls it back, and the diffs are then applied one by one, each in
        its own transaction, so a diff that fails fails alone. The batch's new topics are
        created, and its queue changes handed to the notifier, once after the last diff."""
        results: list[dict | None] = [None] * len(requests)
        plans: list[tuple[int, Plan, Mapping[str, Any]]] = []
        for i, req in enumerate(requests):
            try:
                plan = self._plan(req["strategy_id"], req["dag"], run_type=req.get("run_type"), asset=req.get("asset"),
                                  version=req.get("version"))
            except ServiceError as exc:
                results[i] = _problem(exc)
            else:
                plans.append((i, plan, req["dag"]))
        done: list[DiffResult] = []
        try:
            together = await self._diff_together([plan for _, plan, _ in plans])
            if together is not None:
                for (i, _, _), result in zip(plans, together):
                    done.append(result)
                    results[i] = {"status": 200, "body": result.body()}
            else:
                for i, plan, dag in plans:
                    try:
                        result = await self._diff_plan(plan, dag)
                    except ServiceError as exc:
                        results[i] = _problem(exc)
                    else:
                        done.append(result)
                        results[i] = {"status": 200, "body": result.body()}
        finally:  # the diffs committed so far are announced even when a later one fails unexpectedly
            await self._announce(done)
        return [r for r in results if r is not None]

    @staticmethod
    def _plan(strategy_id: str, dag: Mapping[str, Any], *, run_type: str | None, asset: str | None,
              version: str | None) -> Plan:
        defaults_filler(DIFF_REQUEST_SCHEMA)({"dag": dag})  # e.g. a TagQueryNode without match_mode is `any`
        return make_plan(strategy_id, dag, run_type=run_type, asset=asset, version=version)

    async def _diff(
        self, strategy_id: str, dag: Mapping[str, Any], *, run_type: str | None, asset: str | None, version: str | None,
    ) -> DiffResult:
        return await self._diff_plan(self._plan(strategy_id, dag, run_type=run_type, asset=asset, version=version), dag)

    async def _diff_plan(self, plan: Plan, dag: Mapping[str, Any]) -> DiffResult:
        """The diff's transaction, retried on a deadlock, and its metrics."""
        started = self.monotonic()
        try:
            with database_errors({"dag": dag}):
                result = await self.txn.retrying(lambda: self._diff_txn(plan))
        except Exception:
            self.metrics.diffs.labels("error").inc()
            raise
        self._count(plan, result, (self.monotonic() - started) * 1000.0)
        return result

    def _count(self, plan: Plan, result: DiffResult, elapsed_ms: float) -> None:
        self.metrics.diff_duration_ms.observe(elapsed_ms)
        self.metrics.diff_nodes.observe(len(plan.nodes))
        self.metrics.diffs.labels("ok").inc()
        self.metrics.queues_created.inc(len(result.new_queues))
        self.metrics.queues_reused.inc(len(plan.queue_nodes) - len(result.new_queues))

    async def _diff_together(self, plans: Sequence[Plan]) -> list[DiffResult] | None:
        """The diffs of ``plans`` in one set-based transaction (:meth:`_batch_txn`), or None
        when that path does not apply or failed (nothing of it was committed)."""
        if len(plans) < 2 or len({p.sim for p in plans}) > 1:
            return None
        if len({p.strategy_id for p in plans}) < len(plans) or len({p.sentinel_id for p in plans}) < len(plans):
            return None  # a strategy diffed twice in one batch: the second is a re-diff of the first
        started = self.monotonic()
        try:
            results = await self.txn.retrying(lambda: self._batch_txn(plans))
        except _OneByOne as exc:
            log.debug("batch of %d diffs applied one by one: %s", len(plans), exc)
            return None
        except Exception as exc:  # the per-diff path answers each diff's own error
            log.info("batch of %d diffs applied one by one after %s: %s", len(plans), type(exc).__name__, exc)
            return None
        elapsed_ms = (self.monotonic() - started) * 1000.0 / len(plans)
        for plan, result in zip(plans, results):
            self._count(plan, result, elapsed_ms)
        return results

    async def _announce(self, results: Sequence[DiffResult]) -> None:
        """After commit: the new queues' topics created, the tag index changes and new
        watches handed to the notifier."""
        new_queues = sorted(topic for result in results for topic in result.new_queues)
        if new_queues:
            self.analyzer.grew(len(new_queues))
            await self.topics.create(new_queues)
        # the notifier recomputes the watches a queue's (tags, interval) can match: one change
        # per distinct pair (a DAG has few) instead of one per new queue
        changes = {(tags, interval): topic for result in results for topic, tags, interval in result.created}
        self.notifier.queues_changed([QueueChange(topic, tags, interval) for (tags, interval), topic in changes.items()])
        self.notifier.recheck([key for result in results for key in result.new_watches])

    async def _diff_txn(self, plan: Plan) -> DiffResult:
        now = self.clock()
        sim = plan.sim
        async with self.txn.write() as conn:
            # 1. known nodes, with their queue in this namespace (one SELECT)
            nids: dict[str, int] = {}
            assigned: dict[str, str] = {}
            for nid, node_id, topic in await self._known(conn, plan.graph_nodes, sim):
                nids[node_id] = nid
                if topic is not None:
                    assigned[node_id] = topic
            reused = set(assigned.values())

            # 2. new nodes, and queues for the nodes that have none in this namespace
            await self._insert_nodes(conn, [plan.nodes[n] for n in sorted(n for n in plan.graph_nodes if n not in nids)],
                                     nids, now)
            missing = [node_id for node_id in plan.queue_nodes if node_id not in assigned]
            created: list[tuple[str, tuple[str, ...], int]] = []
            new_topics: list[str] = []
            if missing:
                created_topics, concurrent = await self._create_queues(conn, sim, plan.nodes, sorted(missing), nids, now)
                assigned.update(concurrent)
                reused.update(concurrent.values())
                assigned.update(created_topics)
                new_topics = sorted(created_topics.values())
                if not sim:
                    for node_id, topic in created_topics.items():
                        n = plan.nodes[node_id]
                        created.append((topic, n.tags, n.queue_interval))

            # 3. strategy references and sentinel edges
            await self.strategies.record(conn, plan, {nids[n] for n in plan.graph_nodes}, now)

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

    async def _batch_txn(self, plans: Sequence[Plan]) -> list[DiffResult]:
        """Several new strategies (one namespace) diffed in one transaction, set-based: one
        SELECT of the known nodes of all their DAGs, one INSERT of all new nodes, one of
        all missing queues (and their tag rows), the strategies, sentinels and their
        references in one statement each, one match per distinct tag query, one INSERT of
        the watches. Each answer is the one the diff would get applied alone after the
        ones before it: a node's row and queue come from the first DAG that has it (its
        queue is new to that diff, reused by the later ones), a tag query does not see
        the queues of later diffs, a watch is new to the first diff that has it.

        Queue names are decided up front as the diffs one by one would get them (see
        :meth:`_create_batch_queues`). Raises :class:`_OneByOne` (the caller rolls back
        and applies the diffs one by one) where the per-diff path is needed: a strategy
        or sentinel that exists (a re-diff, or a 409), a name a concurrent transaction
        took."""
        now = self.clock()
        sim = plans[0].sim
        async with self.txn.write() as conn:
            first: dict[str, PlanNode] = {}  # each graph node as the first DAG that has it gives it
            for plan in plans:
                for node_id in plan.graph_nodes:
                    if node_id not in first:
                        first[node_id] = plan.nodes[node_id]
            nids: dict[str, int] = {}
            known: dict[str, str] = {}  # node → its queue before this batch
            for nid, node_id, topic in await self._known(conn, list(first), sim):
                nids[node_id] = nid
                if topic is not None:
                    known[node_id] = topic
            await self._insert_nodes(conn, [first[n] for n in sorted(n for n in first if n not in nids)], nids, now)

            owner: dict[str, int] = {}  # a missing queue → the index of the first diff that needs it
            queue_nodes: dict[str, PlanNode] = {}
            missing: list[list[str]] = [[] for _ in plans]
            for j, plan in enumerate(plans):
                for node_id in plan.queue_nodes:
                    if node_id not in known and node_id not in owner:
                        owner[node_id] = j
                        queue_nodes[node_id] = plan.nodes[node_id]
                        missing[j].append(node_id)
            created: dict[str, str] = {}
            concurrent: dict[str, str] = {}
            if owner:
                created, concurrent = await self._create_batch_queues(
                    conn, sim, queue_nodes, [sorted(group) for group in missing if group], nids, now)
            topic_of = {**known, **concurrent, **created}

            if not await self.strategies.record_new(conn, plans, [{nids[n] for n in p.graph_nodes} for p in plans], now):
                raise _OneByOne("a strategy or sentinel of the batch exists")

            # tag queries: each key matched once; a diff does not see the queues later diffs created
            matched: dict[TagKey, list[str]] = {}
            for plan in plans:
                for key in plan.tag_queries.values():
                    if key not in matched:
                        matched[key] = await match(conn, key)
            later: list[set[str]] = [set() for _ in plans]  # topics created by the diffs after each
            for node_id, topic in created.items():
                for j in range(owner[node_id]):
                    later[j].add(topic)
            seen_by: list[dict[TagKey, list[str]]] = []
            watch_sets: dict[TagKey, list[str]] = {}  # each key with the set of the first diff that has it
            watch_owner: dict[TagKey, int] = {}
            for j, plan in enumerate(plans):
                sets = {key: [t for t in matched[key] if t not in later[j]] for key in plan.tag_queries.values()}
                seen_by.append(sets)
                for key, queues in sets.items():
                    if key not in watch_sets:
                        watch_sets[key] = queues
                        watch_owner[key] = j
            new_watches = await register_watches(conn, self.sql, watch_sets, now)

        results: list[DiffResult] = []
        for j, plan in enumerate(plans):
            mine = {node_id for node_id in plan.queue_nodes if owner.get(node_id) == j and node_id in created}
            # a queue the batch creates exists for this diff if an earlier diff created it
            # (or, for its own nodes, a concurrent transaction did)
            seen = [n for n in plan.graph_nodes if n in topic_of and n not in mine and owner.get(n, j) <= j]
            results.append(DiffResult(
                strategy_id=plan.strategy_id,
                sentinel_id=plan.sentinel_id,
                version=plan.version,
                sim=sim,
                queue_map={node_id: topic_of[node_id] for node_id in plan.queue_nodes},
                new_queues=sorted(created[n] for n in mine),
                reused_queues=sorted({topic_of[n] for n in seen}),
                tag_queries={node_id: seen_by[j][key] for node_id, key in plan.tag_queries.items()},
                created=[] if sim else [(created[n], plan.nodes[n].tags, plan.nodes[n].queue_interval) for n in sorted(mine)],
                new_watches=[key for key in new_watches if watch_owner[key] == j],
            ))
        return results

    async def _insert_nodes(self, conn: Any, batch: Sequence[PlanNode], nids: dict[str, int], now: float) -> None:
        """INSERT of new nodes (``batch``, in node-id order) ``ON CONFLICT DO NOTHING``; their
        nids added to ``nids`` (a concurrent diff's rows, or all on SQLite beyond
        ``store.SQLITE_RETURNING_ROWS``, read back)."""
        if not batch:
            return
        inserted = await self.sql.insert_ignore(conn, store.nodes, node_values(batch, now),
                                                conflict=("node_id",), returning=("nid", "node_id"))
        if inserted:
            nids.update(zip(inserted[1], inserted[0]))
        unseen = [n.node_id for n in batch if n.node_id not in nids]
        if unseen:
            sql = f"SELECT nid, node_id FROM dm_nodes WHERE node_id {self.sql.in_list(1)}"
            for nid, node_id in (await conn.exec_driver_sql(sql, (self.sql.list_param(unseen),))).all():
                nids[node_id] = nid

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
        self, conn: Any, sim: bool, nodes: Mapping[str, PlanNode], missing: list[str], nids: Mapping[str, int], now: float,
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Create queues for ``missing`` nodes (in namespace ``sim``, node-id order).
        Returns (created by this diff, created by a concurrent one).

        Each node tries its short name straight away — one INSERT ``ON CONFLICT DO
        NOTHING RETURNING``, rows in node-id order; a node whose short name an earlier
        node of this diff has waits for the next round. Only the rows not returned are
        read back: a queue carrying another diff's ``creator`` token lost this diff the
        race for the node (unique ``(nid, sim)``) and is reused; no queue means the name
        is taken (unique ``topic``), and the node gets the shortest free longer name
        (:meth:`_assign_names`) in the next round."""
        out = _Queues(uuid.uuid4().hex)
        names: dict[str, str] = {}
        later: list[str] = []
        short: set[str] = set()
        for node_id in missing:
            name = nodes[node_id].first_name
            if name in short:
                later.append(node_id)
            else:
                short.add(name)
                names[node_id] = name
        for _round in range(_MAX_NAME_ROUNDS):
            await self._insert_queues(conn, sim, nodes, names, nids, now, out)
            # a node with no queue now lost its name (to another node, or to an earlier node of this diff)
            pending = sorted(later + [n for n in names if n not in out.created and n not in out.concurrent])
            if not pending:
                break
            self.metrics.name_clashes.inc(len(pending))
            names = await self._assign_names(conn, nodes, pending)
            later = []
        else:
            raise ServiceUnavailable(f"could not assign queue names for {len(pending)} node(s) under contention; retry")
        await self._insert_tags(conn, sim, nodes, out)
        return out.created, out.concurrent

    async def _create_batch_queues(
        self, conn: Any, sim: bool, nodes: Mapping[str, PlanNode], missing: Sequence[Sequence[str]], nids: Mapping[str, int],
        now: float,
    ) -> tuple[dict[str, str], dict[str, str]]:
        """:meth:`_create_queues` for a batch: ``missing`` holds each diff's missing nodes
        (node-id order), in the batch's order. The names are decided before one INSERT of
        all the queues, as the diffs one by one would get them: one SELECT of the short
        names taken and, on a clash, one of the clashing nodes' longer names. Raises
        :class:`_OneByOne` where that cannot be decided up front (a concurrent
        transaction took a name)."""
        first = {n: nodes[n].first_name for group in missing for n in group}
        taken = await self._taken(conn, sorted(set(first.values())))
        counts = collections.Counter(first.values())
        maybe = sorted(n for n, name in first.items() if name in taken or counts[name] > 1)
        cands = {n: nodes[n].candidates(_BATCH_CANDIDATES) for n in maybe}
        if maybe:
            taken |= await self._taken(conn, sorted({c for options in cands.values() for c in options}))
        names: dict[str, str] = {}
        used: set[str] = set()  # names the batch's earlier queues got
        for group in missing:
            later: list[str] = []
            short: set[str] = set()
            for node_id in group:  # round one: the short names
                name = first[node_id]
                if name in short or name in taken or name in used:
                    later.append(node_id)
                else:
                    short.add(name)
                    names[node_id] = name
            used |= short
            if later:
                self.metrics.name_clashes.inc(len(later))
            for node_id in sorted(later):  # round two: the shortest free longer name
                name = next((c for c in cands.get(node_id, ()) if c not in taken and c not in used), "")
                if not name:  # (rare: the one-by-one path looks further)
                    raise _OneByOne(f"no free name among a clashing queue's first {_BATCH_CANDIDATES}")
                used.add(name)
                names[node_id] = name
        out = _Queues(uuid.uuid4().hex)
        await self._insert_queues(conn, sim, nodes, names, nids, now, out)
        if len(out.created) + len(out.concurrent) < len(names):
            raise _OneByOne("a new queue's name was taken by a concurrent transaction")
        await self._insert_tags(conn, sim, nodes, out)
        return out.created, out.concurrent

    async def _insert_queues(
        self, conn: Any, sim: bool, nodes: Mapping[str, PlanNode], names: Mapping[str, str], nids: Mapping[str, int],
        now: float, out: _Queues,
    ) -> None:
        """One INSERT ``ON CONFLICT DO NOTHING RETURNING`` of the queues ``names`` (node →
        topic), rows in node-id order; the rows not returned are read back."""
        batch = [nodes[node_id] for node_id in sorted(names)]
        node_of = {nids[n.node_id]: n.node_id for n in batch}
        values = {
            "topic": [names[n.node_id] for n in batch], "nid": [nids[n.node_id] for n in batch], "sim": sim,
            "node_type": [n.node_type for n in batch], "tags": [n.tags_json for n in batch],
            "interval": [n.queue_interval for n in batch], "created_at": now, "ttl_seconds": self.queue_ttl_seconds,
            "released_at": None, "creator": out.token,
        }
        if self.sql.is_sqlite:
            inserted = await self.sql.insert_ignore(conn, store.queues, values, returning=("qid", "nid", "topic"))
        else:  # with the tag rows of the queues it inserted, in the same statement
            inserted = await self._insert_tagged_queues(conn, values, batch)
            out.tagged.update(node_of[nid_int] for nid_int in inserted[1])
        for qid, nid_int, topic in zip(*inserted) if inserted else ():
            node_id = node_of[nid_int]
            out.created[node_id] = topic
            out.qids[node_id] = qid
        unseen = [nids[node_id] for node_id in names if node_id not in out.created]
        if unseen:
            for qid, nid_int, topic, creator in await self._queues_of(conn, unseen, sim):
                node_id = node_of[nid_int]
                if creator == out.token:
                    out.created[node_id] = topic
                    out.qids[node_id] = qid
                else:
                    out.concurrent[node_id] = topic
                    log.debug("queue %s was created by a concurrent diff; reusing it", topic)

    async def _insert_tags(self, conn: Any, sim: bool, nodes: Mapping[str, PlanNode], out: _Queues) -> None:
        """The tag rows of the created queues not tagged yet (only this transaction's new
        queues: no other transaction can hold these rows)."""
        tags: list[str] = []
        intervals: list[int] = []
        qids: list[int] = []
        for node_id, qid in out.qids.items():
            if node_id in out.tagged:
                continue
            n = nodes[node_id]
            interval = n.queue_interval
            for tag in n.tags:
                tags.append(tag)
                intervals.append(interval)
                qids.append(qid)
        await self.sql.insert_new(conn, store.queue_tags, {"tag": tags, "interval": intervals, "sim": sim, "qid": qids})

    async def _insert_tagged_queues(self, conn: Any, values: Mapping[str, Any], batch: Sequence[PlanNode]) -> list[list]:
        """PostgreSQL: INSERT of queues (``values`` as for :meth:`SqlHelpers.insert_ignore`)
        ``ON CONFLICT DO NOTHING``, and of the tag rows of those it inserted, in one
        statement; returns (qids, nids, topics) of the inserted queues."""
        tag_nids: list[int] = []
        tags: list[str] = []
        intervals: list[int] = []
        for nid, n in zip(values["nid"], batch):
            interval = n.queue_interval
            for tag in n.tags:
                tag_nids.append(nid)
                tags.append(tag)
                intervals.append(interval)
        row = (await conn.exec_driver_sql(_INSERT_TAGGED_QUEUES_SQL, (
            values["topic"], values["nid"], values["sim"], values["node_type"], values["tags"], values["interval"],
            values["created_at"], values["ttl_seconds"], values["creator"], tag_nids, tags, intervals,
        ))).one()
        return [list(col) if col is not None else [] for col in row]

    async def _assign_names(self, conn: Any, nodes: Mapping[str, PlanNode], node_ids: list[str]) -> dict[str, str]:
        """Shortest free name per node, for nodes whose short name is taken: one SELECT of
        every candidate name of theirs; in the (sorted) order given, each node takes its
        first candidate neither taken nor taken by an earlier node."""
        cands = {nid: nodes[nid].candidates() for nid in node_ids}
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


__all__ = ["DIFF_REQUEST_SCHEMA", "DiffResult", "Differ"]
