"""Strategy ingest (SPEC §2): ``POST /strategies``, ``GET /strategies/{id}/status``, and the
queue lookups of SPEC §3 (``GET /queues/by_tag``, ``GET /queues/watch``).

* :mod:`.dag`       – decode, CRC guard, DAG schema, NodeID verification, content hash, sentinel
* :mod:`.store`     – the database side: submissions and the append-only FSM mirror (group commit)
* :mod:`.redisq`    – the Redis side: FSM state, FIFO + processing list, per-strategy locks, epoch
* :mod:`.fallback`  – the bounded local queue used while the DAG Manager (or Redis) is away
* :mod:`.queues`    – tag lookups from the DAG Manager on its budget (single flight), the NDJSON watch
* :mod:`.service`   – :class:`IngestService`: composes the modules below, starts and stops them
* :mod:`.submit`    – ``POST /strategies``: admission, persist before ack, enqueue, the ack's queue map
* :mod:`.worker`    – the workers: pop, lock, drive the FSM through the diff, park while the DAG Manager is away
* :mod:`.diff`      – the DAG Manager's diffs: ``POST /diff/batch`` and ``POST /diff``, lanes and budgets
* :mod:`.fsm`       – FSM steps (mirror, then Redis, then relay) and ``GET /strategies/{id}/status``
* :mod:`.recovery`  – startup reconciliation and the reconcile loop: rebuild, janitor, sweep
* :mod:`.outage`    – the DAG Manager's availability: probe with backoff, the fallback queue's flush
* :mod:`.state`     – what one process holds: tuning, records accepted here, ids in flight, rate meter
* :mod:`.fastpath`  – valid ``POST /strategies`` answered in front of the contract stack (same answers)
* :mod:`.metrics`   – ``lost_requests_total``, ``gateway_e2e_latency_ms``, FSM and queue metrics

The Gateway's factory (:func:`qmtl.gateway.app.create_service`) builds the service with its
collaborators: the fallback queue and metrics it shares with the status part, the queue
lookup fed by the event relay, the degradation level and the relay.
"""

from __future__ import annotations

from qmtl.gateway.ingest.fallback import FallbackQueue
from qmtl.gateway.ingest.metrics import IngestMetrics
from qmtl.gateway.ingest.queues import QueueLookup
from qmtl.gateway.ingest.service import IngestService

__all__ = ["FallbackQueue", "IngestMetrics", "IngestService", "QueueLookup"]
