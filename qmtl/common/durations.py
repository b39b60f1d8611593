"""Durations as the contract writes them: ``"500ms"``, ``"30s"``, ``"15m"``, ``"2h"``, ``"1d"``,
or a number of seconds."""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["format_duration", "parse_duration"]

_DURATION_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)?$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any, *, bare_seconds: bool = False) -> float:
    """Seconds of ``value``: a non-negative finite number, or a string with a unit.
    ``bare_seconds`` also reads a string without a unit (``"45"``) as seconds. ValueError
    for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"not a duration: {value!r}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value.strip())
        if m and (m.group(2) or bare_seconds):
            return float(m.group(1)) * _UNIT_SECONDS[m.group(2) or "s"]
    raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 15m, 2h or a number of seconds)")


def format_duration(seconds: float) -> str:
    """Short human form of a duration (for reasons): ``90`` → ``1m30s``."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 1 and seconds != 0:
        return f"{seconds * 1000:g}ms"
    total = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if total >= size:
            parts.append(f"{total // size}{unit}")
            total %= size
    if total or not parts:
        parts.append(f"{total}s")
    return "".join(parts)
