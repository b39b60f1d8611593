"""What one Gateway process holds while it ingests, shared by :mod:`.submit`, :mod:`.worker`,
:mod:`.recovery` and :mod:`.outage`: the tuning (timings and batch sizes; tests shorten them),
the records accepted here and not finished yet, the ids a worker holds now, the wakeup
event, and the submission rate (acks first during a burst)."""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from qmtl.gateway.ingest.store import StrategyRecord

TRANSIENT = (RedisError, OSError, SQLAlchemyError, ConnectionError)
_RECORD_CACHE = 50_000


def new_strategy_id() -> str:
    return "s-" + uuid.uuid4().hex[:20]


@dataclass
class IngestTuning:
    """Timings (seconds) and sizes of the ingest; tests shorten the timings."""

    pop_timeout: float = 1.0
    reconcile_interval: float = 1.0
    janitor_interval: float = 5.0
    sweep_interval: float = 30.0
    probe_backoff: tuple[float, float] = (0.1, 2.0)
    watch_poll_interval: float = 1.0
    retry_after: int = 5
    # acks first during a burst: while submissions arrive faster than ``burst_rate`` per
    # second (more than the diffs can follow anyway), a worker waits up to
    # ``ingest_yield_max`` s before each diff, so that in one process (``qmtl up``) the
    # diffs do not take the CPU the acks need (G-02). Below that rate workers run freely;
    # during a burst each still makes progress, and all drain at full speed after it.
    burst_rate: float = 200.0
    ingest_yield_max: float = 1.0
    # a worker takes up to ``batch_size`` waiting ids at once: their FSM steps share the
    # mirror commits and Redis round trips; their diffs go in POST /diff/batch requests
    batch_size: int = 32
    diff_batch_nodes: int = 2_000  # a batch request carries at most this many nodes
    diff_batch_max: int = 32  # diffs per POST /diff/batch (the spec allows 64): a worker's batch in one request, applied set-based
    diff_budget_ms_per_node: float = 0.0  # gateway.diff_budget_ms_per_node
    diff_budget_ms_per_diff: float = 0.0  # gateway.diff_budget_ms_per_diff


class ProcessState:
    """This process's share of the ingest: records accepted here (a bounded cache: the
    database has them all), ids a worker holds now, the event that wakes idle workers when
    this process puts ids on the FIFO, and whether the service is stopping."""

    def __init__(self) -> None:
        self.records: collections.OrderedDict[str, StrategyRecord] = collections.OrderedDict()
        self.inflight: set[str] = set()
        self.wakeup = asyncio.Event()  # set when this process puts ids on the FIFO
        self.stopping = False

    def remember(self, record: StrategyRecord) -> None:
        self.records[record.strategy_id] = record
        while len(self.records) > _RECORD_CACHE:
            self.records.popitem(last=False)


class RateMeter:
    """Events per second over the last second (ten 100 ms buckets)."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._buckets = [0] * 10
        self._stamps = [0] * 10

    def tick(self) -> None:
        slot = int(self._monotonic() * 10)
        i = slot % 10
        if self._stamps[i] != slot:
            self._stamps[i], self._buckets[i] = slot, 0
        self._buckets[i] += 1

    def per_second(self) -> float:
        slot = int(self._monotonic() * 10)
        return float(sum(n for n, st in zip(self._buckets, self._stamps) if slot - st < 10))
