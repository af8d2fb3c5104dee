"""The highest level of a sorted grid that passes a check assumed monotone (every level
below a passing one passes), found by bisection, with speculative probes for idle workers.

The answer is that of the serial bisection whatever the number of workers: the serial path
is followed exactly, and a spare worker only evaluates a level the path may need next (the
next levels of the bisection tree below the current interval), never changes the path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Bisection:
    """Bisection over `levels` (ascending). Feed results with `record(index, passed)`."""

    levels: Sequence[float]
    results: dict[int, bool] = field(default_factory=dict)

    def _walk(self) -> tuple[int, int]:
        """The serial path as far as the results known allow: (highest known pass, lowest
        known fail) of the interval it has reached; -1 and len(levels) are the ends."""
        low, high = -1, len(self.levels)
        while high - low > 1:
            middle = (low + high) // 2
            if middle not in self.results:
                break
            if self.results[middle]:
                low = middle
            else:
                high = middle
        return low, high

    @property
    def done(self) -> bool:
        low, high = self._walk()
        return high - low <= 1

    @property
    def answer(self) -> int | None:
        """The index of the highest passing level (None: none passes); when done."""
        low, _ = self._walk()
        return low if low >= 0 else None

    def record(self, index: int, passed: bool) -> None:
        self.results[index] = passed

    def wanted(self, count: int, busy: frozenset[int] = frozenset()) -> list[int]:
        """Up to `count` levels to evaluate now, the one the serial path needs first, then
        those it may need after, breadth first; none already known or in `busy`."""
        low, high = self._walk()
        out: list[int] = []
        queue = [(low, high)]
        while queue and len(out) < count:
            low, high = queue.pop(0)
            if high - low <= 1:
                continue
            middle = (low + high) // 2
            if middle in self.results:  # known off the serial path: follow it as well
                queue.append((middle, high) if self.results[middle] else (low, middle))
                continue
            if middle not in busy:
                out.append(middle)
            queue.extend([(middle, high), (low, middle)])
        return out
