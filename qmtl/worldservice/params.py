"""Request values the schemas cannot check: page cursors, timestamps, unique strategy ids.

Each raises the error the operation documents (400 for a query parameter, 422 for a body
member), naming the parameter or the JSON pointer.
"""

from __future__ import annotations

import base64
import binascii
import collections
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from qmtl.common.errors import BadRequest, Unprocessable
from qmtl.worldservice import views


def encode_cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise BadRequest(f"invalid cursor {cursor!r}: pass the next_cursor of a previous page",
                         ext={"errors": [{"parameter": "cursor", "message": "invalid cursor"}]}) from None


def ts_param(value: str | datetime, name: str) -> datetime:
    """A timestamp from the query string (400 naming ``name``)."""
    try:
        return views.parse_ts(value)
    except ValueError as exc:
        raise BadRequest(f"query parameter {name!r}: {exc}", ext={"errors": [{"parameter": name, "message": str(exc)}]}) from None


def ts_body(value: str | datetime, pointer: str) -> datetime:
    """A timestamp from the body (422 at ``pointer``)."""
    try:
        return views.parse_ts(value)
    except ValueError as exc:
        raise Unprocessable(f"{exc} at {pointer}", ext={"errors": [{"pointer": pointer, "message": str(exc)}]}) from None


def unique_strategy_ids(strategies: Sequence[Mapping[str, Any]], pointer: str) -> None:
    """422 naming every strategy id that appears more than once."""
    ids = [s["strategy_id"] for s in strategies]
    dupes = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
    if dupes:
        raise Unprocessable(
            f"strategy ids must be unique; repeated: {', '.join(dupes)}",
            ext={"errors": [{"pointer": f"{pointer}/{ids.index(d)}/strategy_id", "message": f"{d!r} is repeated"} for d in dupes]},
        )
