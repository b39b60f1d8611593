"""The ``node_ids_crc32`` guard of ``POST /strategies`` (SPEC §2).

CRC32 of the node ids in DAG order: ``zlib.crc32`` chained over each id's UTF-8 bytes,
starting from 0, masked to 32 bits. A cheap early check that client and Gateway agree on
the list of ids before the (more expensive) per-node recomputation.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

__all__ = ["crc32_of_node_ids"]


def crc32_of_node_ids(ids: Iterable[str]) -> int:
    """Chained CRC32 of ``ids`` (each UTF-8 encoded) as an unsigned 32-bit int."""
    crc = 0
    for node_id in ids:
        crc = zlib.crc32(node_id.encode(), crc)
    return crc & 0xFFFFFFFF
