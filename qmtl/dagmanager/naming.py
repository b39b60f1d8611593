"""Queue (Kafka topic) names for nodes (SPEC §7).

``{asset}_{node_type}_{short_hash}_{version}``, plus ``_sim`` for dry-run queues.
``short_hash`` is the first 6 hex characters of the node's ``code_hash``; when that
name is already taken by another node, it is lengthened by 2 characters, again and
again, until the name is free. The characters come from the code hash first; past its
end they come from the node id (and then from its SHA-256). Two nodes that share their
code but differ in config have the same code hash — only the node id can tell their
names apart.

Every part is made Kafka-safe (``[A-Za-z0-9._-]``, at most 249 characters in all).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Iterator

SHORT_HASH_LEN = 6
STEP = 2
SIM_SUFFIX = "_sim"
MAX_TOPIC_LEN = 249
DEFAULT_ASSET = "qmtl"
DEFAULT_VERSION = "v1"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_NOT_HEX = re.compile(r"[^0-9a-f]+")


def safe_part(value: str, *, default: str, max_len: int = 64) -> str:
    """A topic-safe name part: unsafe characters become ``-``; empty becomes ``default``."""
    part = _UNSAFE.sub("-", value or "").strip("-")[:max_len]
    return part or default


def hash_source(code_hash: str, node_id: str) -> str:
    """The characters ``short_hash`` is cut from: the code hash's hex digits, then the node
    id's, then those of the node id's SHA-256 (so that any two nodes can be told apart).

    An algorithm prefix (``sha256:ab12…``) is dropped, the rest lowercased, and only its
    hex digits kept."""
    code = _NOT_HEX.sub("", (code_hash or "").lower().split(":", 1)[-1])
    # Node ids are SHA-256 hex; should one not be, its own digest still tells it apart.
    return code + _NOT_HEX.sub("", (node_id or "").lower()) + hashlib.sha256((node_id or "").encode("utf-8", "surrogatepass")).hexdigest()


def topic_name(asset: str, node_type: str, short_hash: str, version: str, *, sim: bool = False) -> str:
    name = f"{asset}_{node_type}_{short_hash}_{version}" + (SIM_SUFFIX if sim else "")
    if len(name) > MAX_TOPIC_LEN:
        raise ValueError(f"topic name longer than {MAX_TOPIC_LEN} characters: {name[:40]}…")
    return name


@functools.lru_cache(maxsize=1024)
def _frame(asset: str, node_type: str, version: str, sim: bool) -> tuple[str, str, str, int]:
    """The safe asset, node type and version, and the longest hash that fits: the same for
    every node of a type in a diff (cached: a 1,000-node diff names 1,000 queues)."""
    asset = safe_part(asset, default=DEFAULT_ASSET)
    node_type = safe_part(node_type, default="node")
    version = safe_part(version, default=DEFAULT_VERSION, max_len=32)
    return asset, node_type, version, max(SHORT_HASH_LEN, MAX_TOPIC_LEN - len(topic_name(asset, node_type, "", version, sim=sim)))


def candidates(
    asset: str, node_type: str, code_hash: str, version: str, *, node_id: str, sim: bool = False
) -> Iterator[str]:
    """Every name the node may get, shortest first (6, 8, 10 … characters of hash)."""
    asset, node_type, version, limit = _frame(asset, node_type, version, sim)
    # The code hash alone gives the first names; the rest of the source is only built
    # when a clash asks for more characters than it has.
    source = _NOT_HEX.sub("", (code_hash or "").lower().split(":", 1)[-1])
    full = False
    length = SHORT_HASH_LEN
    while True:
        if length > len(source) and not full:
            source = hash_source(code_hash, node_id)  # at least 64 characters
            full = True
        yield topic_name(asset, node_type, source[:length], version, sim=sim)
        if length >= limit or (full and length >= len(source)):
            return
        length = min(length + STEP, limit)


def assign_name(
    asset: str,
    node_type: str,
    code_hash: str,
    version: str,
    *,
    node_id: str,
    sim: bool = False,
    taken: Callable[[str], bool],
) -> str:
    """The first candidate name that ``taken`` reports free."""
    last = None
    for name in candidates(asset, node_type, code_hash, version, node_id=node_id, sim=sim):
        if not taken(name):
            return name
        last = name
    raise ValueError(f"no free topic name for node {node_id}: every candidate up to {last!r} is taken")


__all__ = [
    "DEFAULT_ASSET",
    "DEFAULT_VERSION",
    "SHORT_HASH_LEN",
    "SIM_SUFFIX",
    "assign_name",
    "candidates",
    "hash_source",
    "safe_part",
    "topic_name",
]
