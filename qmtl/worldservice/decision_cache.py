"""What a decision reads of a world, kept in this process so that ``GET decide`` needs
no SQL when nothing changed.

An entry is the world's decision inputs at revision ``rev`` (the world row's fields a
decision depends on, its hysteresis state and its default policy), read in one statement.
Every write on a world bumps its ``rev`` in the same transaction (see
:class:`~qmtl.worldservice.repository.Repository`), and this process's writes drop the
world's entry before they start and after they end (:meth:`DecisionCache.invalidate`,
called by ``Repository.write``). A read that overlapped a write does not store what it
read (a generation counter), so an entry never outlives the write that changed it.

Other processes' writes: with ``shared_database`` (PostgreSQL, several replicas) an entry
is used only after one primary-key read of the world's ``rev`` confirms it (a small
round trip, no row decoding); on SQLite — the embedded, one-process setup (as apply
recovery assumes too) — this process's own writes are the only ones, and an entry is
used as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from qmtl.common.cache import LRU
from qmtl.worldservice import policy as pol


@dataclass(frozen=True, slots=True)
class DecisionInputs:
    """Everything :func:`qmtl.worldservice.policy.decide` reads of a world at ``rev``."""

    rev: int
    policy_version: int
    policy: pol.Policy | None
    state: pol.HysteresisState | None
    data_end: datetime | None
    allow_live: bool
    suspended: bool
    circuit_breaker: bool


class DecisionCache:
    def __init__(self, *, shared_database: bool, max_worlds: int = 10_000) -> None:
        self.shared_database = shared_database
        self._entries: LRU[str, DecisionInputs] = LRU(max_worlds)
        self._generation = 0

    def get(self, world_id: str) -> DecisionInputs | None:
        return self._entries.get(world_id)

    def generation(self) -> int:
        """Taken before a read; :meth:`put` stores its result only if no write happened since."""
        return self._generation

    def put(self, world_id: str, generation: int, inputs: DecisionInputs) -> None:
        if generation == self._generation:
            self._entries.put(world_id, inputs)

    def invalidate(self, world_id: str) -> None:
        """A write on ``world_id`` starts or ended (committed or not)."""
        self._generation += 1
        self._entries.pop(world_id)
