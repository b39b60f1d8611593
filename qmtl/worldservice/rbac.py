"""Who is calling, and may they? World-scope roles from the identity the Gateway forwards.

Trust rule: the identity headers ``X-QMTL-Subject`` and ``X-QMTL-Claims`` (base64url of
the JSON claims) are believed only when the request also carries
``X-QMTL-Service-Token`` equal to the configured service token (constant-time compare).
Otherwise they are ignored, as if absent.

* ``rbac: enforce`` — a request without trusted identity is 401; a missing role is 403.
* ``rbac: dev`` (the embedded default) — a request without trusted identity acts as
  ``dev_subject`` with every role on every world; a trusted identity still gets only its
  own roles.

Roles come from the claim ``world_roles`` (``{world_id: [roles]}``, ``"*"`` = every
world). ``owner`` implies ``operator`` implies ``reader``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qmtl.common.errors import Forbidden, Unauthorized

SERVICE_TOKEN_HEADER = "X-QMTL-Service-Token"
SUBJECT_HEADER = "X-QMTL-Subject"
CLAIMS_HEADER = "X-QMTL-Claims"

READER, OPERATOR, OWNER = "reader", "operator", "owner"
ALL_ROLES = frozenset({READER, OPERATOR, OWNER})
_IMPLIES = {OWNER: {OWNER, OPERATOR, READER}, OPERATOR: {OPERATOR, READER}, READER: {READER}}


@dataclass(frozen=True)
class Identity:
    subject: str
    world_roles: Mapping[str, frozenset[str]] = field(default_factory=dict)
    dev: bool = False  # the development-mode identity (every role everywhere)

    def roles_on(self, world_id: str) -> set[str]:
        if self.dev:
            return set(ALL_ROLES)
        granted = set(self.world_roles.get(world_id, ())) | set(self.world_roles.get("*", ()))
        out: set[str] = set()
        for role in granted:
            out |= _IMPLIES.get(role, set())
        return out

    def has(self, world_id: str, role: str) -> bool:
        return role in self.roles_on(world_id)

    def require(self, world_id: str, role: str, action: str) -> None:
        if not self.has(world_id, role):
            raise Forbidden(
                f"{action} needs the {role!r} role on world {world_id!r}; {self.subject!r} has "
                f"{sorted(self.roles_on(world_id)) or 'none'}",
                ext={"required_role": role, "world_id": world_id},
            )

    @classmethod
    def development(cls, subject: str) -> Identity:
        return cls(subject=subject, world_roles={"*": ALL_ROLES}, dev=True)

    @classmethod
    def from_claims(cls, subject: str, claims: Mapping[str, Any]) -> Identity:
        roles: dict[str, frozenset[str]] = {}
        raw = claims.get("world_roles") or {}
        if not isinstance(raw, Mapping):
            raise Unauthorized("forwarded claims: world_roles must be an object of world id → list of roles")
        for world, values in raw.items():
            if isinstance(values, str):
                values = [values]
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise Unauthorized(f"forwarded claims: world_roles[{world!r}] must be a list of role names")
            roles[str(world)] = frozenset(v for v in values if v in ALL_ROLES)
        return cls(subject=subject, world_roles=roles)


def decode_claims(value: str) -> dict:
    """base64url (padding optional) of a JSON object → the object; Unauthorized if unreadable."""
    try:
        raw = base64.urlsafe_b64decode(value.strip() + "=" * (-len(value.strip()) % 4))
        claims = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise Unauthorized(f"forwarded claims are not base64url JSON: {exc}") from None
    if not isinstance(claims, dict):
        raise Unauthorized("forwarded claims must be a JSON object")
    return claims


def encode_claims(claims: Mapping[str, Any]) -> str:
    """The ``X-QMTL-Claims`` value for ``claims`` (what the Gateway sends)."""
    return base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).decode().rstrip("=")


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


class Authenticator:
    """Turns request headers into an :class:`Identity` according to the RBAC mode."""

    def __init__(self, *, mode: str, service_token: str, dev_subject: str) -> None:
        if mode not in ("dev", "enforce"):
            raise ValueError(f"rbac mode must be 'dev' or 'enforce', got {mode!r}")
        self.mode = mode
        self._token = service_token.encode() if service_token else b""
        self.dev_subject = dev_subject

    def trusted(self, headers: Mapping[str, str]) -> bool:
        presented = _lower(headers).get(SERVICE_TOKEN_HEADER.lower())
        if not self._token or presented is None:
            return False
        return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), self._token)

    def identify(self, headers: Mapping[str, str]) -> Identity:
        """The caller (headers: any mapping; names are matched case-insensitively)."""
        headers = _lower(headers)
        if self.trusted(headers):
            raw_claims = headers.get(CLAIMS_HEADER.lower())
            claims = decode_claims(raw_claims) if raw_claims else {}
            subject = headers.get(SUBJECT_HEADER.lower()) or claims.get("sub")
            if not subject or not isinstance(subject, str):
                raise Unauthorized(f"the forwarded identity has no subject ({SUBJECT_HEADER} or claim 'sub')")
            return Identity.from_claims(subject, claims)
        if self.mode == "dev":
            return Identity.development(self.dev_subject)
        raise Unauthorized(
            "no trusted caller identity: WorldService is called through the Gateway, which forwards "
            f"the caller's identity with the service token ({SERVICE_TOKEN_HEADER})"
        )
