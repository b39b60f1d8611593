"""WorldService tables (SQLAlchemy Core), one code path for SQLite and PostgreSQL.

* ``ws_worlds`` — worlds; ``rev`` is bumped by every write transaction on the world
  (it takes the world's row lock, serialising writes per world, and it makes
  activation etags unique); ``apply_run_id`` is set while an apply is in flight (the
  world is frozen), with the lease that says which attempt holds it and until when
  (``apply_owner``, ``apply_lease_until``).
* ``ws_policies`` — policy versions (YAML text, checksum, status).
* ``ws_decisions`` — each world's hysteresis state and latest observation.
* ``ws_strategy_observations`` — per world and strategy: the latest metrics recorded with an
  observation (``strategies``), what an evaluate without ``strategies`` judges.
* ``ws_activations`` — per world, strategy and side: active, weight, etag, run_id, ts.
* ``ws_apply_runs`` — every apply by (world, run_id): status, plan checksum, the
  activation snapshot taken before the switch (for rollback) and the stored result
  (for idempotent repeats, across restarts).
* ``ws_audit`` — the audit log.
* ``ws_outbox`` — events committed with the change that caused them, published on the
  ControlBus after the commit in ``seq`` order, deleted once published.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

from qmtl.store.outbox import outbox_table

metadata = sa.MetaData()

# Autoincrementing 64-bit keys that SQLite also autoincrements (it only does so for INTEGER).
BigIntId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)

worlds = sa.Table(
    "ws_worlds",
    metadata,
    sa.Column("world_id", sa.String(63), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("default_policy_version", sa.Integer, nullable=False, default=0),
    sa.Column("allow_live", sa.Boolean, nullable=False, default=False),
    sa.Column("circuit_breaker", sa.Boolean, nullable=False, default=False),
    sa.Column("rev", sa.BigInteger, nullable=False, default=0),
    # Bumped whenever the world's gate (deleted, suspended, circuit breaker) changes;
    # part of every activation view's etag (see qmtl.worldservice.views).
    sa.Column("gate_epoch", sa.Integer, nullable=False, default=0),
    sa.Column("gate_changed_at", TS, nullable=True),
    sa.Column("apply_run_id", sa.String(128), nullable=True),
    sa.Column("apply_started_at", TS, nullable=True),
    # The lease of the apply in flight: the attempt holding it (fencing token) and until
    # when; a replica that finds it expired rolls the apply back (see apply.py).
    sa.Column("apply_owner", sa.String(64), nullable=True),
    sa.Column("apply_lease_until", TS, nullable=True),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)

policies = sa.Table(
    "ws_policies",
    metadata,
    sa.Column("world_id", sa.String(63), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("yaml", sa.Text, nullable=False),
    sa.Column("checksum", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_by", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False),
)

decisions = sa.Table(
    "ws_decisions",
    metadata,
    sa.Column("world_id", sa.String(63), primary_key=True),
    sa.Column("policy_version", sa.Integer, nullable=False),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("mode_since", TS, nullable=False),
    sa.Column("mode_reason", sa.Text, nullable=False),
    sa.Column("passes", sa.Integer, nullable=False),
    sa.Column("fails", sa.Integer, nullable=False),
    sa.Column("passed", sa.Boolean, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("reasons", sa.JSON, nullable=False),
    sa.Column("data_end", TS, nullable=False),
    sa.Column("samples", sa.BigInteger, nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("recorded_at", TS, nullable=False),
)

strategy_observations = sa.Table(
    "ws_strategy_observations",
    metadata,
    sa.Column("world_id", sa.String(63), primary_key=True),
    sa.Column("strategy_id", sa.String(200), primary_key=True),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("samples", sa.BigInteger, nullable=True),
    sa.Column("data_end", TS, nullable=True),
    sa.Column("sides", sa.JSON, nullable=True),
    sa.Column("recorded_at", TS, nullable=False),
)

activations = sa.Table(
    "ws_activations",
    metadata,
    sa.Column("world_id", sa.String(63), primary_key=True),
    sa.Column("strategy_id", sa.String(200), primary_key=True),
    sa.Column("side", sa.String(8), primary_key=True),
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("weight", sa.Float, nullable=False),
    sa.Column("etag", sa.String(64), nullable=False),
    sa.Column("run_id", sa.String(128), nullable=True),
    sa.Column("ts", TS, nullable=False),
)

apply_runs = sa.Table(
    "ws_apply_runs",
    metadata,
    sa.Column("world_id", sa.String(63), primary_key=True),
    sa.Column("run_id", sa.String(128), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),  # in_flight | succeeded | rolled_back
    sa.Column("plan_checksum", sa.String(64), nullable=False),
    sa.Column("plan", sa.JSON, nullable=False),
    sa.Column("snapshot", sa.JSON, nullable=False),
    sa.Column("result", sa.JSON, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("correlation_id", sa.String(128), nullable=True),
    sa.Column("started_at", TS, nullable=False),
    sa.Column("finished_at", TS, nullable=True),
)

audit = sa.Table(
    "ws_audit",
    metadata,
    sa.Column("id", BigIntId, primary_key=True, autoincrement=True),
    sa.Column("world_id", sa.String(63), nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("event", sa.String(64), nullable=False),
    sa.Column("request", sa.JSON, nullable=False),
    sa.Column("result", sa.JSON, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("correlation_id", sa.String(128), nullable=True),
    sa.Index("ix_ws_audit_world_id_id", "world_id", "id"),
)

outbox = outbox_table(metadata, "ws_outbox", sa.Column("world_id", sa.String(63), nullable=False))


def utc(ts: datetime | None) -> datetime | None:
    """Timestamps read back from SQLite are naive; every stored time is UTC."""
    if ts is None:
        return None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
