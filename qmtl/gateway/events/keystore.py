"""The descriptor-token signing keys shared by every Gateway replica, in the Gateway's database.

Why the database: every replica (and every ``--workers`` process) of one Gateway already
shares it (PostgreSQL in production), so a token issued by any replica verifies on every
other without copying key files around. One table, ``gw_signing_keys``: one row per key
(kid, algorithm, PKCS#8 PEM private key, ``signs_from`` epoch seconds). **Rotation is an
insert**: a new row with ``signs_from`` in the future is published (JWKS, verification) by
every replica as soon as it re-reads the table, and signs from ``signs_from`` on; the key it
replaces keeps verifying for one token lifetime after that (+ leeway).

Each replica re-reads the table every ``refresh`` seconds, and when a token names a kid it
does not hold (at most once per ``min_reload_interval`` seconds: a flood of forged kids
cannot turn into a flood of queries). The first replica to start on an empty table creates
the first key; two replicas starting at once may each create one — the later ``signs_from``
signs everywhere and the other keeps verifying, so nothing is refused.

Rows whose key stopped verifying more than ``PURGE_AFTER`` seconds ago are deleted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization

from qmtl.common.keys import KeyRing, SigningKey
from qmtl.store import Database

log = logging.getLogger(__name__)

metadata = sa.MetaData()

signing_keys = sa.Table(
    "gw_signing_keys",
    metadata,
    sa.Column("kid", sa.String(128), primary_key=True),
    sa.Column("algorithm", sa.String(16), nullable=False),
    sa.Column("private_pem", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("signs_from", sa.Float, nullable=False),
    sa.Column("created_by", sa.String(200), nullable=True),
)

LEEWAY = 5.0  # seconds a retired key verifies beyond token_ttl (clock skew between replicas)
PURGE_AFTER = 86400.0


@dataclass(frozen=True)
class KeyRow:
    key: SigningKey
    signs_from: float


def private_pem(key: SigningKey) -> str:
    return key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


def schedule_ring(rows: list[KeyRow], *, now: float, token_ttl: float, clock: Callable[[], float] = time.time) -> tuple[KeyRing, float | None]:
    """The ring the rows give at ``now``, and when it changes next by itself (a staged key
    starts signing, or a retired key stops verifying), None when it does not."""
    ordered = sorted(rows, key=lambda r: (r.signs_from, r.key.kid))
    active = [r for r in ordered if r.signs_from <= now] or ordered[:1]
    staged = [r for r in ordered if r.signs_from > now and r is not active[0]]
    signer = active[-1]
    retired: list[tuple[SigningKey, float]] = []
    changes: list[float] = [r.signs_from for r in staged]
    for older, newer in itertools.pairwise(active):
        drop_at = newer.signs_from + token_ttl + LEEWAY
        retired.append((older.key, drop_at))
        if drop_at > now:
            changes.append(drop_at)
    ring = KeyRing.from_schedule(signer.key, retired=retired, staged=[r.key for r in staged], token_ttl=token_ttl, clock=clock)
    return ring, (min(changes) if changes else None)


class DatabaseKeyStore:
    """Reads and writes ``gw_signing_keys``; builds the :class:`KeyRing` of this moment."""

    source = "database"

    def __init__(self, db: Database, *, algorithm: str, token_ttl: float, owner: str, refresh: float = 30.0,
                 min_reload_interval: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.algorithm = algorithm
        self.token_ttl = float(token_ttl)
        self.owner = owner
        self.refresh = float(refresh)
        self.min_reload_interval = float(min_reload_interval)
        self._clock = clock
        self.rows: list[KeyRow] = []
        self.loaded_at: float | None = None
        self.reloads = 0
        self._last_reload = float("-inf")
        self._lock = asyncio.Lock()
        self._next_change: float | None = None
        self.ring: KeyRing | None = None

    @property
    def shared(self) -> bool:
        return not self.db.is_sqlite

    def describe_scope(self) -> str:
        if self.db.is_sqlite:
            return ("the Gateway's SQLite database: shared only by Gateway processes on this machine with the same data_dir "
                    "(--workers); replicas elsewhere refuse this replica's tokens — use PostgreSQL (gateway.database_url)")
        return "the Gateway's database: every replica and worker using it verifies every other's tokens"

    async def load(self) -> KeyRing:
        """Create the table; create the first key when there is none; build the ring."""
        await self.db.create_all(metadata)
        rows = await self._read()
        if not rows:
            await self.insert(SigningKey.generate(self.algorithm), signs_from=self._clock())
            rows = await self._read()
        self._install(rows)
        assert self.ring is not None
        return self.ring

    async def insert(self, key: SigningKey, *, signs_from: float) -> None:
        if key.algorithm != self.algorithm:
            raise ValueError(f"the new key is {key.algorithm}, the configured algorithm is {self.algorithm}")
        async with self.db.begin() as conn:
            await conn.execute(signing_keys.insert().values(
                kid=key.kid, algorithm=key.algorithm, private_pem=private_pem(key), created_at=self._clock(),
                signs_from=float(signs_from), created_by=self.owner[:200]))
        log.info("signing key %s added to the shared key ring (signs from %.0f)", key.kid, signs_from)

    async def rotate(self, *, stage: float | None = None) -> SigningKey:
        """Insert a new key that signs ``stage`` seconds from now (default: two refresh periods,
        so every replica publishes it before any replica signs with it)."""
        key = SigningKey.generate(self.algorithm)
        await self.insert(key, signs_from=self._clock() + (2 * self.refresh if stage is None else stage))
        await self.reload(force=True)
        return key

    async def reload(self, *, force: bool = False) -> bool:
        """Re-read the table (rate-bounded unless ``force``); True when it was read."""
        async with self._lock:
            now = time.monotonic()
            if not force and now - self._last_reload < self.min_reload_interval:
                return False
            self._last_reload = now
            rows = await self._read()
            if rows:
                self._install(rows)
            await self._purge()
            return True

    def current(self) -> KeyRing:
        """The ring now: rebuilt from the rows held when a staged key started signing or a
        retired one stopped verifying since the last build (no query)."""
        assert self.ring is not None, "load() first"
        if self._next_change is not None and self._clock() >= self._next_change:
            self._install(self.rows)
        return self.ring

    def _install(self, rows: list[KeyRow]) -> None:
        self.rows = rows
        self.ring, self._next_change = schedule_ring(rows, now=self._clock(), token_ttl=self.token_ttl, clock=self._clock)
        self.loaded_at = self._clock()
        self.reloads += 1

    async def _read(self) -> list[KeyRow]:
        async with self.db.connect() as conn:
            result = await conn.execute(sa.select(signing_keys).where(signing_keys.c.algorithm == self.algorithm))
            records = result.fetchall()
        rows = []
        for r in records:
            try:
                key = SigningKey.from_pem(r.private_pem.encode("ascii"), kid=r.kid, created_at=r.created_at)
            except Exception as exc:  # one bad row must not take the others down
                log.error("signing key %s in gw_signing_keys cannot be loaded: %s", r.kid, exc)
                continue
            rows.append(KeyRow(key, float(r.signs_from)))
        return rows

    async def _purge(self) -> None:
        ordered = sorted(self.rows, key=lambda r: (r.signs_from, r.key.kid))
        now = self._clock()
        dead = [older.key.kid for older, newer in itertools.pairwise(ordered)
                if newer.signs_from <= now and newer.signs_from + self.token_ttl + LEEWAY + PURGE_AFTER < now]
        if dead:
            async with self.db.begin() as conn:
                await conn.execute(signing_keys.delete().where(signing_keys.c.kid.in_(dead)))
            log.info("purged %d signing key(s) retired more than a day ago", len(dead))

    def state(self) -> dict[str, Any]:
        return {"rows": len(self.rows), "reloads": self.reloads, "refresh_seconds": self.refresh}
