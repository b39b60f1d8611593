"""State hashes shared by WorldService (which publishes them) and the Gateway (which
recomputes them from events) so that a client can confirm convergence without a
snapshot (SPEC §5, "state_hash probe").

Canonical JSON below is ``sort_keys``, compact separators, UTF-8, non-ASCII kept.

* activation (incremental, so that the Gateway updates it in O(1) per event whatever
  the world's size): each entry of a world's activation set (inactive ones included)
  has a digest, the SHA-256 of the canonical JSON of ``{strategy_id, side, active,
  weight}`` (``weight`` as a float, ``active`` as a bool) read as a 256-bit big-endian
  integer; the set's hash is the SHA-256 hex digest of ``b"qmtl.activation.v2:"``
  followed by the sum of its entries' digests modulo 2**256 (32 bytes, big-endian).
  An empty set sums to 0. Order does not matter; a change of one entry subtracts its
  old digest and adds its new one.
* policy: the SHA-256 hex digest of the canonical JSON of ``{world_id,
  policy_version, checksum, status}`` of the world's
  *default* policy (status ``ACTIVE``). A world without a default policy hashes
  ``{world_id, policy_version: 0, checksum: "", status: "NONE"}``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["NO_POLICY_STATUS", "activation_entry_digest", "activation_hash_of_sum", "activation_state_hash", "canonical_json",
           "policy_state_hash"]

NO_POLICY_STATUS = "NONE"


# Stateless, built once (json.dumps with these options would build an encoder per call).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, UTF-8."""
    return _CANONICAL.encode(value).encode("utf-8")


def _sha256(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


_MOD = 1 << 256
_ACTIVATION_PREFIX = b"qmtl.activation.v2:"


def activation_entry_digest(entry: Mapping[str, Any]) -> int:
    """One activation entry's share of its world's hash (needs strategy_id, side, active, weight)."""
    doc = {"strategy_id": str(entry["strategy_id"]), "side": str(entry["side"]), "active": bool(entry["active"]),
           "weight": float(entry["weight"])}
    return int.from_bytes(hashlib.sha256(canonical_json(doc)).digest(), "big")


def activation_hash_of_sum(total: int) -> str:
    """The activation hash of a set whose entry digests sum to ``total``."""
    return hashlib.sha256(_ACTIVATION_PREFIX + (total % _MOD).to_bytes(32, "big")).hexdigest()


def activation_state_hash(entries: Iterable[Mapping[str, Any]]) -> str:
    """Hash of a world's activation set; each entry needs strategy_id, side, active, weight."""
    return activation_hash_of_sum(sum(activation_entry_digest(e) for e in entries))


def policy_state_hash(world_id: str, policy_version: int | None, checksum: str | None, status: str | None) -> str:
    """Hash of a world's default policy (see module docstring for the no-policy case)."""
    if not policy_version:
        policy_version, checksum, status = 0, "", NO_POLICY_STATUS
    return _sha256(
        {
            "world_id": world_id,
            "policy_version": int(policy_version),
            "checksum": checksum or "",
            "status": status or NO_POLICY_STATUS,
        }
    )
