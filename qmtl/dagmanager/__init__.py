"""The DAG Manager (SPEC §7): the node graph, one queue per node, tag queries, GC.

- ``app.py`` — ``create_service`` builds every part below; ``create_app`` serves it over HTTP.
- ``service.py`` — ``DagManagerService``: the parts composed, lifecycle (start/stop/drain), health.
- ``plan.py`` — a diff request checked and indexed before any SQL (``Plan``, ``make_plan``).
- ``diff.py`` — the diff: nodes mapped to queues, new queues named and created (``Differ``).
- ``strategies.py`` — strategy and sentinel references to nodes, release of a strategy.
- ``queues.py`` — the queue catalogue: queues by tag, queue list, one node (``QueueCatalogue``).
- ``sentinels.py`` — version sentinels and their traffic weight (``Sentinels``).
- ``gc.py`` — garbage collection of unreferenced queues, the GC lease and loop.
- ``tagindex.py`` — tag keys, tag queries, watches, QueueUpdated via ``QueueNotifier``.
- ``topics.py`` — topic admins (embedded, Kafka) and ``QueueTopics`` (create with partitions/retention).
- ``naming.py`` — queue (topic) names for nodes.
- ``callbacks.py`` — ``GatewayCallback``: events sent to the Gateway's callback endpoint.
- ``transactions.py`` — write transactions (SQLite lock, PostgreSQL GC advisory lock) and retries.
- ``errors.py`` — database errors mapped to 503/422 (``database_errors``), SQLSTATE helpers.
- ``analyze.py`` — ANALYZE of the graph's tables after growth (PostgreSQL).
- ``store.py`` — tables and the bulk SQL helpers (``SqlHelpers``).
- ``metrics.py`` — the Prometheus metrics (``DagManagerMetrics``).
- ``readiness.py`` — the ``GET /ready`` checks.
"""
