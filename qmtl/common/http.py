"""HTTP conditional requests, RFC 9110 §8.8.3 and §13.1: entity tags and their comparison.

* ``If-None-Match`` (``GET`` → 304) uses the **weak** comparison: ``W/"x"`` matches ``"x"``.
* ``If-Match`` (a write → 412 unless it matches) uses the **strong** comparison: a weak tag
  never matches.
* ``*`` matches any current representation.

Entity tags are quoted on the wire (``"abc"``); a bare token is read as the tag it spells
(lenient with hand-written clients).
"""

from __future__ import annotations

__all__ = ["if_match", "if_none_match", "quote_etag"]


def quote_etag(tag: str) -> str:
    """``abc`` → ``"abc"``; already quoted (strong or weak) tags are kept."""
    if tag.startswith(('"', 'W/"')):
        return tag
    return f'"{tag}"'


def _parse(tag: str) -> tuple[bool, str]:
    """(weak?, opaque tag without quotes)."""
    weak = tag.startswith("W/")
    if weak:
        tag = tag[2:]
    tag = tag.strip()
    if len(tag) >= 2 and tag[0] == tag[-1] == '"':
        tag = tag[1:-1]
    return weak, tag


def _candidates(header: str | None) -> list[str] | None:
    """The listed tags, ``None`` for ``*``, ``[]`` when absent or empty."""
    if not header or not header.strip():
        return []
    if header.strip() == "*":
        return None
    return [part.strip() for part in header.split(",") if part.strip()]


def if_none_match(header: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` value matches ``etag`` (weak comparison): the answer is 304."""
    tags = _candidates(header)
    if tags is None:
        return True
    ours = _parse(quote_etag(etag))[1]
    return any(_parse(t)[1] == ours for t in tags)


def if_match(header: str | None, etag: str) -> bool:
    """Whether an ``If-Match`` value matches ``etag`` (strong comparison): the write may go on."""
    tags = _candidates(header)
    if tags is None:
        return True
    weak_ours, ours = _parse(quote_etag(etag))
    if weak_ours:
        return False
    return any(not weak and tag == ours for weak, tag in map(_parse, tags))
