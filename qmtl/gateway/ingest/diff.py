"""The DAG Manager's diffs of accepted strategies (``POST /diff``, ``POST /diff/batch``).

Small DAGs go together in ``POST /diff/batch`` requests (at most ``diff_batch_nodes`` nodes and
``diff_batch_max`` diffs each), a DAG larger than that alone in ``POST /diff``; each request's
budget grows with its nodes and diffs (``diff_budget_ms_per_node``, ``diff_budget_ms_per_diff``).
Two lanes, one request in flight each per process: small DAGs (batched), and DAGs of more than
``diff_batch_nodes`` nodes, so a large diff never holds up small ones here; the DAG Manager
applies diffs one at a time on SQLite, so more requests in flight would only queue there, on
their budget.

Each outcome is ``("ok", diff)``, ``("refused", error)`` or ``("unavailable", BackendUnavailable)``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from qmtl.gateway.backends import Backend, BackendUnavailable
from qmtl.gateway.ingest.dag import meta_str
from qmtl.gateway.ingest.metrics import IngestMetrics
from qmtl.gateway.ingest.state import IngestTuning
from qmtl.gateway.ingest.store import StrategyRecord

log = logging.getLogger(__name__)

_ASSET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,63}$")


class DiffClient:
    def __init__(self, backend: Backend, *, metrics: IngestMetrics, tuning: IngestTuning) -> None:
        self.backend = backend
        self.metrics = metrics
        self.tuning = tuning
        self._diff_slots = asyncio.Semaphore(1)
        self._large_slots = asyncio.Semaphore(1)

    async def diff_all(self, records: list[StrategyRecord]) -> list[tuple[str, Any]]:
        """Each record's diff outcome (see the module docstring)."""
        out: list[tuple[str, Any] | None] = [None] * len(records)
        groups: list[list[int]] = []
        weight = 0
        for i, rec in enumerate(records):
            w = node_count(rec.dag_json)
            if not groups or weight + w > self.tuning.diff_batch_nodes or len(groups[-1]) >= self.tuning.diff_batch_max:
                groups.append([])
                weight = 0
            groups[-1].append(i)
            weight += w

        async def one(i: int) -> None:
            lane = self._large_slots if node_count(records[i].dag_json) > self.tuning.diff_batch_nodes else self._diff_slots
            async with lane:
                try:
                    out[i] = await self._diff(records[i])
                except Exception as exc:  # a bug must not take the batch down; the strategy fails
                    log.exception("ingest: diff of %s failed unexpectedly", records[i].strategy_id)
                    out[i] = ("refused", f"internal error in the Gateway: {type(exc).__name__}: {exc}")

        async def many(group: list[int]) -> None:
            async with self._diff_slots:
                try:
                    answers = await self._diff_batch([records[i] for i in group])
                except Exception as exc:
                    log.exception("ingest: batch diff failed unexpectedly")
                    answers = [("refused", f"internal error in the Gateway: {type(exc).__name__}: {exc}")] * len(group)
            if answers is None:  # the batch as a whole was refused: one by one, so each gets its own answer
                await asyncio.gather(*(one(i) for i in group))
                return
            for i, answer in zip(group, answers):
                out[i] = answer

        await asyncio.gather(*(one(g[0]) if len(g) == 1 else many(g) for g in groups))
        return out  # type: ignore[return-value]

    @staticmethod
    def _diff_body(record: StrategyRecord) -> str:
        """The POST /diff body of a record, with the stored DAG text as is (not re-serialised)."""
        payload: dict[str, Any] = {"strategy_id": record.strategy_id, "run_type": record.run_type}
        asset = meta_str(record.meta, "asset", _ASSET_RE)
        if asset:
            payload["asset"] = asset
        head = json.dumps(payload, separators=(",", ":"))
        return head[:-1] + ',"dag":' + record.dag_json + "}"

    def _diff_timeout(self, nodes: int, diffs: int = 1) -> float:
        extra_ms = nodes * self.tuning.diff_budget_ms_per_node + (diffs - 1) * self.tuning.diff_budget_ms_per_diff
        return self.backend.policy.timeout + extra_ms / 1000.0

    async def _diff_batch(self, records: list[StrategyRecord]) -> list[tuple[str, Any]] | None:
        """One POST /diff/batch; None when the DAG Manager refused the request as a whole."""
        content = ('{"diffs":[' + ",".join(self._diff_body(r) for r in records) + "]}").encode()
        nodes = sum(node_count(r.dag_json) for r in records)
        started = time.perf_counter()
        try:
            resp = await self.backend.request("POST", "/diff/batch", content=content, headers={"Content-Type": "application/json"},
                                              idempotent=True, timeout=self._diff_timeout(nodes, len(records)))
        except BackendUnavailable as exc:
            return [("unavailable", exc)] * len(records)
        finally:
            self.metrics.diff_latency.observe((time.perf_counter() - started) * 1000.0)
        if resp.status_code != 200:
            log.info("ingest: POST /diff/batch answered HTTP %s (%s); diffing one by one", resp.status_code, _detail(resp))
            return None
        try:
            results = resp.json()["results"]
            if not isinstance(results, list) or len(results) != len(records):
                raise ValueError(f"not one result per diff ({len(records)})")
        except (ValueError, KeyError, TypeError) as exc:
            return [("refused", f"the DAG Manager's diff answer is malformed: {exc}")] * len(records)
        out: list[tuple[str, Any]] = []
        for rec, item in zip(records, results):
            item = item if isinstance(item, Mapping) else {}
            status = item.get("status")
            raw_problem = item.get("problem")
            problem: Mapping[str, Any] = raw_problem if isinstance(raw_problem, Mapping) else {}
            if status == 200:
                out.append(self._diff_outcome(rec, item.get("body")))
            elif isinstance(status, int) and (status >= 500 or status == 429):  # as Backend: worth retrying
                out.append(("unavailable", BackendUnavailable("dagmanager", f"answered HTTP {status} for this diff: {problem.get('detail', '')}")))
            else:
                detail = str(problem.get("detail") or problem.get("title") or item)[:500]
                out.append(("refused", f"the DAG Manager refused the diff (HTTP {status}): {detail}"))
        return out

    async def _diff(self, record: StrategyRecord) -> tuple[str, Any]:
        content = self._diff_body(record).encode()
        started = time.perf_counter()
        try:
            resp = await self.backend.request("POST", "/diff", content=content, headers={"Content-Type": "application/json"},
                                              idempotent=True,  # a diff is idempotent
                                              timeout=self._diff_timeout(node_count(record.dag_json)))
        except BackendUnavailable as exc:
            return "unavailable", exc
        finally:
            self.metrics.diff_latency.observe((time.perf_counter() - started) * 1000.0)
        if resp.status_code >= 400:
            return "refused", f"the DAG Manager refused the diff (HTTP {resp.status_code}): {_detail(resp)}"
        try:
            result = resp.json()
        except ValueError as exc:
            return "refused", f"the DAG Manager's diff answer is malformed: {exc}"
        return self._diff_outcome(record, result)

    @staticmethod
    def _diff_outcome(record: StrategyRecord, result: Any) -> tuple[str, Any]:
        try:
            diff = {
                "queue_map": dict(result["queue_map"]),
                "tag_queries": dict(result.get("tag_queries") or {}),
                "sentinel_id": result.get("sentinel_id") or record.sentinel_id,
                "new_queues": len(result.get("new_queues") or []),
                "reused_queues": len(result.get("reused_queues") or []),
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return "refused", f"the DAG Manager's diff answer is malformed: {exc}"
        return "ok", diff


def node_count(dag_json: str) -> int:
    """Nodes in a stored DAG, without parsing it (each node object has one ``node_id`` key)."""
    return max(1, dag_json.count('"node_id"'))


def _detail(resp: Any) -> str:
    try:
        body = resp.json()
        if isinstance(body, Mapping):
            return str(body.get("detail") or body.get("title") or body)[:500]
    except ValueError:
        pass
    return resp.text[:500]
