"""Caller authentication at the Gateway.

``mode: jwt`` — every request needs ``Authorization: Bearer <JWT>`` signed by a key from
the configured PEM files or JWKS URL, with the configured issuer and audience; anything
else is a 401 problem. ``mode: dev`` (the embedded default, announced at startup) — a
request without a token acts as the configured development subject with the configured
development roles; a request *with* a token is still verified when keys are configured.

The verified identity (subject and claims, including ``world_roles``) is what the
Gateway forwards to WorldService (trusted there by the service token) and what
descriptor tokens carry as ``sub``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.types import Options

from qmtl.common.cache import LRU
from qmtl.common.errors import Forbidden, ServiceUnavailable, Unauthorized

if TYPE_CHECKING:
    from qmtl.gateway.service import Gateway

log = logging.getLogger(__name__)

ROLE_IMPLIES = {"owner": {"owner", "operator", "reader"}, "operator": {"operator", "reader"}, "reader": {"reader"}}


@dataclass(frozen=True)
class Identity:
    subject: str
    claims: Mapping[str, Any] = field(default_factory=dict)
    anonymous_dev: bool = False

    @property
    def world_roles(self) -> Mapping[str, list[str]]:
        roles = self.claims.get("world_roles") or {}
        return roles if isinstance(roles, Mapping) else {}

    def roles_for(self, world_id: str) -> set[str]:
        granted: set[str] = set()
        for key in (world_id, "*"):
            for role in self.world_roles.get(key, []) or []:
                granted |= ROLE_IMPLIES.get(role, set())
        return granted

    def has_role(self, world_id: str, role: str) -> bool:
        return role in self.roles_for(world_id)

    def require(self, world_id: str, role: str) -> None:
        if not self.has_role(world_id, role):
            raise Forbidden(f"{self.subject!r} needs role {role!r} on world {world_id!r}")

    def forward_headers(self) -> dict[str, str]:
        """Headers WorldService trusts only together with the Gateway's service token."""
        claims = json.dumps(dict(self.claims), separators=(",", ":"), default=str).encode()
        return {
            "X-QMTL-Subject": self.subject,
            "X-QMTL-Claims": base64.urlsafe_b64encode(claims).decode().rstrip("="),
        }


class Authenticates(Protocol):
    """What the submit fast path and the rate limiter need of :class:`Authenticator`."""

    async def authenticate(self, headers: Mapping[str, str]) -> Identity: ...


class _VerifiedTokens:
    """Tokens already verified, so a repeat costs a dictionary lookup instead of a signature
    check (~130 µs for ES256). An entry lives until the token's ``exp`` (no leeway), at most
    ``max_age`` seconds (so a key withdrawn from the JWKS stops verifying within that
    time); bounded LRU."""

    def __init__(self, max_entries: int = 4096, max_age: float = 300.0, clock: Any = time.time) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self.clock = clock
        self._data: LRU[str, tuple[float, Identity]] = LRU(max_entries)

    def get(self, token: str) -> Identity | None:
        hit = self._data.get(token)
        if hit is None:
            return None
        until, identity = hit
        if self.clock() >= until:
            self._data.pop(token)
            return None
        return identity

    def put(self, token: str, identity: Identity) -> None:
        exp = identity.claims.get("exp")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            return
        until = min(float(exp), self.clock() + self.max_age)
        if until <= self.clock():
            return
        self._data.put(token, (until, identity))


class Authenticator:
    def __init__(self, config: Any, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config  # AuthConfig
        self.mode = config.mode
        self.clock = clock  # wall time: exp/nbf/iat are checked against it, not PyJWT's own time.time()
        self._verified = _VerifiedTokens(clock=clock)
        self._static_keys = [self._load_pem(p) for p in config.public_keys]
        self._jwks_client = jwt.PyJWKClient(config.jwks_url, cache_keys=True, lifespan=300) if config.jwks_url else None
        self._dev = Identity(config.dev_subject, {"sub": config.dev_subject, "world_roles": dict(config.dev_roles)}, anonymous_dev=True)
        if self.mode == "jwt" and not (self._static_keys or self._jwks_client):
            raise ValueError("gateway.auth.mode is 'jwt' but neither auth.public_keys nor auth.jwks_url is set")

    @staticmethod
    def _load_pem(path: str) -> Any:
        try:
            return load_pem_public_key(Path(path).read_bytes())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load auth public key {path}: {exc}") from exc

    async def start(self) -> None:
        if self.mode == "dev":
            log.warning("Gateway auth in DEVELOPMENT mode: callers without a token act as %r with roles %s",
                        self._dev.subject, dict(self.config.dev_roles))

    async def stop(self) -> None:
        return None

    @property
    def verifies_tokens(self) -> bool:
        return bool(self._static_keys or self._jwks_client)

    async def authenticate(self, headers: Mapping[str, str]) -> Identity:
        auth = headers.get("authorization") or headers.get("Authorization")
        if not auth:
            if self.mode == "dev":
                return self._dev
            raise Unauthorized("a bearer token is required", headers={"WWW-Authenticate": 'Bearer realm="qmtl"'})
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'", headers={"WWW-Authenticate": 'Bearer error="invalid_request"'})
        if not self.verifies_tokens:
            # dev mode without keys: a token cannot be verified, so it is not trusted
            raise Unauthorized("this Gateway has no keys to verify bearer tokens (development mode: send no token)")
        token = token.strip()
        known = self._verified.get(token)
        if known is not None:
            return known
        claims = await self.verify(token)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthorized("the token has no subject ('sub')", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        identity = Identity(subject, claims)
        self._verified.put(token, identity)
        return identity

    async def verify(self, token: str) -> dict:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"malformed token: {exc}", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from exc
        alg = header.get("alg")
        if alg not in self.config.algorithms:
            raise Unauthorized(f"token algorithm {alg!r} is not allowed", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        keys = list(self._static_keys)
        if self._jwks_client is not None:
            try:
                signing = await asyncio.to_thread(self._jwks_client.get_signing_key_from_jwt, token)
                keys = [signing.key]
            except jwt.PyJWKClientConnectionError as exc:
                raise ServiceUnavailable(f"cannot fetch the JWKS to verify the token: {exc}", retry_after=5) from exc
            except jwt.PyJWKClientError as exc:
                if not keys:
                    raise Unauthorized(f"token key not found: {exc}", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from exc
        max_life = float(getattr(self.config, "max_token_lifetime", 0) or 0)
        # PyJWT reads time.time() itself: its time checks are off, _check_times applies them against self.clock
        options: Options = {"require": ["exp", "sub"], "verify_aud": bool(self.config.audience), "verify_iss": bool(self.config.issuer),
                   "verify_exp": False, "verify_nbf": False, "verify_iat": False}
        last: Exception | None = None
        for key in keys:
            try:
                claims = jwt.decode(
                    token, key=key, algorithms=list(self.config.algorithms),
                    audience=self.config.audience or None, issuer=self.config.issuer or None,
                    options=options,
                )
                now = self.clock()
                _check_times(claims, now)
                if max_life > 0:
                    _check_lifetime(claims, max_life, now)
                return claims
            except jwt.InvalidSignatureError as exc:
                last = exc
                continue
            except jwt.PyJWTError as exc:
                raise Unauthorized(f"invalid token: {exc}", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from exc
        raise Unauthorized(f"invalid token: {last or 'no key verifies it'}", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


LEEWAY = 5.0  # seconds of clock skew tolerated on exp/nbf/iat (PyJWT's ``leeway``)


def _invalid(message: str) -> Unauthorized:
    return Unauthorized(f"invalid token: {message}", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def _numeric(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _invalid(f"the {name!r} claim must be a number")
    return float(value)


def _check_times(claims: Mapping[str, Any], now: float) -> None:
    """PyJWT's exp/nbf/iat checks (same leeway, same messages) against the injected clock."""
    exp = _numeric(claims, "exp")
    if exp is not None and exp <= now - LEEWAY:
        raise _invalid("Signature has expired")
    nbf = _numeric(claims, "nbf")
    if nbf is not None and nbf > now + LEEWAY:
        raise _invalid("The token is not yet valid (nbf)")
    iat = _numeric(claims, "iat")
    if iat is not None and iat > now + LEEWAY:
        raise _invalid("The token is not yet valid (iat)")


def _check_lifetime(claims: Mapping[str, Any], max_life: float, now: float) -> None:
    """A token may not claim to live longer than ``gateway.auth.max_token_lifetime``:
    ``exp - iat``, or ``exp - now`` when it has no ``iat``."""
    exp = claims.get("exp")
    iat = claims.get("iat")
    start = float(iat) if isinstance(iat, (int, float)) and not isinstance(iat, bool) else now
    if isinstance(exp, (int, float)) and float(exp) - start > max_life + LEEWAY:
        raise Unauthorized(
            f"the token's lifetime ({float(exp) - start:.0f} s) exceeds the allowed {max_life:.0f} s (gateway.auth.max_token_lifetime)",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )


def spec_security(ctx: Gateway) -> tuple[dict, Any]:
    """The verifiers of the Gateway spec's security schemes and its anonymous rule, for
    :func:`qmtl.contracts.app.build_app` (see :mod:`qmtl.contracts.security`):

    * ``bearerAuth`` — the caller's JWT (:class:`Authenticator`), ``None`` without one;
    * ``serviceToken`` — ``X-QMTL-Service-Token`` equal to ``gateway.service_token``, or (on
      operations marked ``x-qmtl-trusted-networks``) a TCP peer inside
      ``gateway.callbacks.trusted_networks``; never a caller's token;
    * ``{}`` (anonymous) — only in development auth mode (the development identity)."""
    from qmtl.contracts.security import api_key_header, parse_networks, service_token_verifier

    g = ctx.config.gateway
    networks = parse_networks(g.callbacks.trusted_networks, "gateway.callbacks.trusted_networks")

    async def bearer(_scope: Any, headers: Mapping[str, str], _op: Any) -> Identity | None:
        if not headers.get("authorization"):
            return None
        return await ctx.auth.authenticate(headers)

    async def anonymous() -> Identity | None:
        auth = ctx.auth
        return await auth.authenticate({}) if auth.mode == "dev" else None

    verifiers = {"bearerAuth": bearer, "serviceToken": service_token_verifier(
        g.service_token, header=api_key_header("gateway", "serviceToken"), trusted_networks=networks)}
    return verifiers, anonymous


async def caller(ctx: Gateway, request: Any) -> Identity:
    """The identity the security middleware verified for this request (authenticating
    here only when the request did not pass through it)."""
    from qmtl.contracts.security import IDENTITY_KEY

    identity = request.scope.get(IDENTITY_KEY)
    return identity if identity is not None else await ctx.auth.authenticate(request.headers)
