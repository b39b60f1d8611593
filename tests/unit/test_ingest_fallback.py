"""The local fallback queue (qmtl.gateway.ingest.fallback)."""

from __future__ import annotations

import pytest

from qmtl.gateway.ingest.fallback import FallbackQueue


def test_fallback_queue_is_bounded_ordered_and_idempotent():
    sizes = []
    fq = FallbackQueue(3, on_change=sizes.append)
    assert fq.put("a") and fq.put("b") and fq.put("a")
    assert fq.put("c") and fq.full()
    assert not fq.put("d")
    assert fq.put("b")  # already in: fine even when full
    assert list(fq) == ["a", "b", "c"] and fq.peek(2) == ["a", "b"]
    fq.remove(["a", "b"])
    assert list(fq) == ["c"] and "c" in fq and len(fq) == 1
    assert sizes[-1] == 1
    with pytest.raises(ValueError):
        FallbackQueue(0)
