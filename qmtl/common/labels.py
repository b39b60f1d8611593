"""Bounded metric label values for labels whose values come from client input.

A Prometheus series per value a client chooses (a sentinel id, say) lets any caller grow a
service's memory and its scrape without bound (20,000 callbacks made 20,007 series). A
:class:`BoundedLabel` admits the first ``cap`` distinct values it sees; every other value is
folded into the single value ``other`` (for a gauge: the last value set for any folded id).
Releasing a value (:meth:`release`, when its object is gone) makes room for a new one.
"""

from __future__ import annotations

OTHER = "other"


class BoundedLabel:
    def __init__(self, cap: int, *, other: str = OTHER) -> None:
        self.cap = max(0, int(cap))
        self.other = other
        self._admitted: set[str] = set()

    def __call__(self, value: str) -> str:
        """The label value to use for ``value``: itself while within the cap, else ``other``."""
        if value in self._admitted:
            return value
        if len(self._admitted) < self.cap and value != self.other:
            self._admitted.add(value)
            return value
        return self.other

    def release(self, value: str) -> bool:
        """Forget ``value``; True when it had a series of its own (the caller removes it)."""
        try:
            self._admitted.remove(value)
            return True
        except KeyError:
            return False

    def __len__(self) -> int:
        return len(self._admitted)
