"""Descriptor tokens: the signing keys, the JWKS, and the scope a token grants.

Keys (SPEC §5): ``gateway.events.signing_keys`` lists PEM private keys (P-256 → ES256,
RSA → RS256), newest last; the last one signs and the others keep verifying for one token
lifetime, which is how a rotation is rolled out (add the new file at the end, restart or
:meth:`Tokens.reload`). With no files configured (the embedded default) one ES256 key is
generated on first start and written to ``<data_dir>/gateway-events-signing-key.pem``
(mode 0600), so a restarted Gateway still verifies the tokens it issued.

Tokens: ``{aud: "controlbus", iss: <public url>, sub, world_id, strategy_id, topics,
queue_keys?, jti, iat, exp}``, ``kid`` in the header, lifetime ``events.token_ttl``
(5 min). Verification accepts only the configured algorithm and a ``kid`` in the ring.
"""

from __future__ import annotations

import logging
import os
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
    def __init__(self, *, signing_keys: list[str], data_dir: str, token_ttl: float, algorithm: str, issuer: str) -> None:
        self.algorithm = algorithm
        self.token_ttl = float(token_ttl)
        self.issuer = issuer
        self._paths = list(signing_keys)
        self._data_dir = data_dir
        if self._paths:
            self.ring = KeyRing.from_config(self._paths, token_ttl=self.token_ttl)
        else:
            self.ring = KeyRing([_load_or_generate(data_dir)], token_ttl=self.token_ttl)
        if self.ring.signer.algorithm != algorithm:
            raise ValueError(
                f"gateway.events.algorithm is {algorithm!r} but the signing key {self.ring.signer.kid!r} is {self.ring.signer.algorithm}"
            )

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
