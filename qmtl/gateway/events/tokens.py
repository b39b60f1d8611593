"""Descriptor tokens: the signing keys, the JWKS, and the scope a token grants.

Keys (SPEC §5): ``gateway.events.signing_keys`` lists PEM private keys (P-256 → ES256,
RSA → RS256), newest last; the last one signs and the others keep verifying for one token
lifetime, which is how a rotation is rolled out (add the new file at the end, restart or
:meth:`Tokens.reload`). With no files configured (the embedded default) one ES256 key is
generated on first start and written to ``<data_dir>/gateway-events-signing-key.pem``
(mode 0600), so a restarted Gateway still verifies the tokens it issued.

**Shared between replicas** (``gateway.events.key_store``): ``database`` keeps the ring in
the Gateway's database (:mod:`.keystore`; the default when no files are listed), so every
replica and ``--workers`` process signs and verifies with the same keys and a rotation is one
insert; ``files`` is the list above (every replica must list the same files); ``generated``
is a key of this replica alone (tokens from other replicas are refused — said at start and in
``/status``). A token naming a kid this replica does not hold makes it re-read the shared
ring (files or table) before refusing, at most once per second.

Tokens: ``{aud: "controlbus", iss: <public url>, sub, world_id, strategy_id, topics,
queue_keys?, jti, iat, exp}``, ``kid`` in the header, lifetime ``events.token_ttl``
(5 min). Verification accepts only the configured algorithm and a ``kid`` in the ring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization

from qmtl.common.keys import InvalidToken, KeyRing, SigningKey
from qmtl.contracts.constants import STREAM_TOPICS, StreamTopic

from .state import QueueKey, normalise_queue_key

log = logging.getLogger(__name__)

AUDIENCE = "controlbus"
TOPICS = STREAM_TOPICS  # stream_descriptor.schema.json
# The alias subscribe_request.schema.json accepts besides TOPICS (documented in prose there;
# test_spec_drift checks the schema's enum is exactly TOPICS plus these).
TOPIC_ALIASES = {"queue": StreamTopic.QUEUES.value}
GENERATED_KEY_FILE = "gateway-events-signing-key.pem"

__all__ = ["AUDIENCE", "TOPICS", "InvalidToken", "Scope", "Tokens", "normalise_topics"]


def _aliases() -> str:
    return ", ".join(f"{a!r} as an alias of {t!r}" for a, t in TOPIC_ALIASES.items())


def normalise_topics(topics: Iterable[str]) -> list[str]:
    """Aliases resolved, duplicates dropped, order kept; ValueError for an unknown topic."""
    out: list[str] = []
    for t in topics:
        t = TOPIC_ALIASES.get(t, t)
        if t not in TOPICS:
            raise ValueError(f"unknown topic {t!r}; known: {', '.join(TOPICS)} (and {_aliases()})")
        if t not in out:
            out.append(t)
    return out


@dataclass(frozen=True)
class Scope:
    """What a verified token lets its bearer see."""

    subject: str
    topics: tuple[str, ...]
    world_id: str | None
    strategy_id: str | None
    queue_keys: tuple[QueueKey, ...]
    claims: Mapping[str, Any]


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _load_or_generate(data_dir: str) -> SigningKey:
    path = Path(data_dir) / GENERATED_KEY_FILE
    if path.exists():
        return SigningKey.from_pem(path)
    key = SigningKey.generate("ES256")
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.replace(tmp, path)
    log.info("generated the event-stream signing key %s (kid %s)", path, key.kid)
    return key


class Tokens:
    min_reload_interval = 1.0  # seconds between re-reads of the ring prompted by unknown kids

    def __init__(self, *, signing_keys: list[str], data_dir: str, token_ttl: float, algorithm: str, issuer: str,
                 store: Any = None) -> None:
        """``store``: a :class:`~.keystore.DatabaseKeyStore` (the ring is loaded by ``start()``);
        without it the ring comes from ``signing_keys`` files, or a key generated for this replica."""
        self.algorithm = algorithm
        self.token_ttl = float(token_ttl)
        self.issuer = issuer
        self._paths = list(signing_keys)
        self._data_dir = data_dir
        self.store = store
        self.unknown_kid_refusals = 0
        self._last_reload = float("-inf")
        self._refresher: asyncio.Task | None = None
        self._ring: KeyRing | None = None
        if store is not None:
            self.source = "database"
        elif self._paths:
            self.source = "files"
            self._ring = KeyRing.from_config(self._paths, token_ttl=self.token_ttl)
        else:
            self.source = "generated"
            self._ring = KeyRing([_load_or_generate(data_dir)], token_ttl=self.token_ttl)
        if self._ring is not None:
            self._check_algorithm()

    def _check_algorithm(self) -> None:
        signer = self.ring.signer
        if signer.algorithm != self.algorithm:
            raise ValueError(
                f"gateway.events.algorithm is {self.algorithm!r} but the signing key {signer.kid!r} is {signer.algorithm}"
            )

    @property
    def ring(self) -> KeyRing:
        if self.store is not None:
            return self.store.current()
        assert self._ring is not None
        return self._ring

    # -- lifecycle (the shared store) ---------------------------------------------------
    async def start(self) -> None:
        if self.store is None:
            return
        await self.store.load()
        self._check_algorithm()
        self._refresher = asyncio.create_task(self._refresh_loop(), name="signing-keys-refresh")

    async def stop(self) -> None:
        task, self._refresher = self._refresher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.store.refresh)
            try:
                await self.store.reload(force=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: keep the ring held
                log.warning("signing keys not re-read (%s: %s); keeping the ring held", type(exc).__name__, exc)

    @property
    def shared(self) -> bool:
        """Whether other replicas can verify this replica's tokens (as far as it can tell)."""
        if self.store is not None:
            return bool(self.store.shared)
        return self.source == "files"

    def sharing_note(self) -> str:
        if self.store is not None:
            return self.store.describe_scope()
        if self.source == "files":
            return ("gateway.events.signing_keys files: replicas verify each other's tokens only when every one lists the "
                    "same files (newest last)")
        return (f"a key generated for this replica alone ({Path(self._data_dir) / GENERATED_KEY_FILE}): other Gateway "
                "replicas refuse its tokens (1008 unknown kid) — use key_store: database or the same signing_keys files")

    def describe(self) -> dict[str, Any]:
        """The key ring state for ``/status`` (no key material)."""
        ring = self.ring
        out: dict[str, Any] = {
            "source": self.source, "shared": self.shared, "detail": self.sharing_note(), "algorithm": self.algorithm,
            "signer": ring.signer.kid, "keys": ring.describe(), "unknown_kid_refusals": self.unknown_kid_refusals,
        }
        if self.store is not None and self.store.loaded_at is not None:
            out["loaded_at"] = _rfc3339(self.store.loaded_at)
        return out

    # -- keys -------------------------------------------------------------------------------
    def jwks(self) -> dict:
        return self.ring.jwks()

    def rotate(self, key: SigningKey) -> None:
        """Make ``key`` the signer; the previous one verifies until its last token expires."""
        if key.algorithm != self.algorithm:
            raise ValueError(f"the new key is {key.algorithm}, the configured algorithm is {self.algorithm}")
        self.ring.rotate(key)

    def reload(self) -> bool:
        """Re-read ``signing_keys``: when the last file holds a new key, rotate to it."""
        if not self._paths:
            return False
        newest = SigningKey.from_pem(self._paths[-1])
        if newest.kid == self.ring.signer.kid:
            return False
        self.rotate(newest)
        return True

    async def _reload_shared(self) -> bool:
        """Re-read the shared ring after an unknown kid, at most once per ``min_reload_interval``."""
        now = time.monotonic()
        if now - self._last_reload < self.min_reload_interval:
            return False
        self._last_reload = now
        try:
            if self.store is not None:
                return await self.store.reload(force=True)
            if self.source == "files":
                return await asyncio.to_thread(self.reload)
        except Exception as exc:
            log.warning("re-reading the signing keys failed (%s: %s)", type(exc).__name__, exc)
        return False

    # -- tokens -----------------------------------------------------------------------------
    def issue(
        self,
        *,
        subject: str,
        topics: list[str],
        world_id: str | None,
        strategy_id: str | None,
        queue_keys: list[QueueKey] | None = None,
    ) -> tuple[str, float]:
        claims: dict[str, Any] = {
            "aud": AUDIENCE,
            "iss": self.issuer,
            "sub": subject,
            "world_id": world_id,
            "strategy_id": strategy_id,
            "topics": list(topics),
        }
        if queue_keys:
            claims["queue_keys"] = [{"tags": list(k[0]), "interval": k[1], "match_mode": k[2]} for k in queue_keys]
        token = self.ring.sign(claims)
        exp = jwt.decode(token, options={"verify_signature": False})["exp"]
        return token, float(exp)

    @staticmethod
    def expires_at(exp: float) -> str:
        return _rfc3339(exp)

    async def verify_fresh(self, token: str) -> Scope:
        """:meth:`verify`; a token naming a kid not held re-reads the shared ring (bounded
        rate) and is verified again before it is refused."""
        try:
            return self.verify(token)
        except InvalidToken as exc:
            if exc.reason != "unknown kid":
                raise
        if await self._reload_shared():
            try:
                return self.verify(token)
            except InvalidToken as exc:
                if exc.reason != "unknown kid":
                    raise
        self.unknown_kid_refusals += 1
        raise InvalidToken("unknown kid")

    def verify(self, token: str) -> Scope:
        """The token's scope; :class:`InvalidToken` (reason safe to log) otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.InvalidTokenError, TypeError, ValueError):
            raise InvalidToken("malformed") from None
        if header.get("alg") != self.algorithm:
            raise InvalidToken("algorithm not allowed")
        claims = self.ring.verify(token, audience=AUDIENCE, leeway=2)
        subject = claims.get("sub")
        topics = claims.get("topics")
        if not isinstance(subject, str) or not isinstance(topics, list):
            raise InvalidToken("malformed")
        try:
            topics_n = tuple(normalise_topics(topics))
            keys = tuple(
                normalise_queue_key(k.get("tags") or [], k.get("interval"), k.get("match_mode"))
                for k in (claims.get("queue_keys") or [])
            )
        except (ValueError, AttributeError, TypeError):
            raise InvalidToken("malformed") from None
        world_id = claims.get("world_id")
        strategy_id = claims.get("strategy_id")
        return Scope(
            subject=subject,
            topics=topics_n,
            world_id=world_id if isinstance(world_id, str) and world_id else None,
            strategy_id=strategy_id if isinstance(strategy_id, str) and strategy_id else None,
            queue_keys=keys,
            claims=claims,
        )
