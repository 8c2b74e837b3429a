"""LengthHistogram: token-length counts per bin as a Sparkline whose scale starts at zero.

Textual's Sparkline scales between the smallest and largest value it gets; a histogram whose
emptiest bin still holds rows would draw that bin as empty. Here the scale is pinned to 0.
"""

from __future__ import annotations

from typing import Sequence

from textual.widgets import Sparkline


class _Count(float):
    """A bin as the sparkline sees it: compared (for the scale) as ``scale_as``, drawn as
    ``value``."""

    value: float

    def __new__(cls, scale_as: float, value: float) -> "_Count":
        point = super().__new__(cls, scale_as)
        point.value = value
        return point


def _tallest(points: Sequence[_Count]) -> float:
    return max(p.value for p in points)


class LengthHistogram(Sparkline):
    """Counts per token-length bin; feed it with :meth:`set_counts`."""

    def __init__(self, **kwargs) -> None:
        super().__init__([], summary_function=_tallest, **kwargs)
        self.counts: list[int] = []

    def set_counts(self, counts: Sequence[int]) -> None:
        self.counts = [int(c) for c in counts]
        points = [_Count(float(c), float(c)) for c in self.counts]
        if points:
            points[0] = _Count(0.0, float(self.counts[0]))  # pins the bottom of the scale at 0
            if len(points) == 1:
                points.append(_Count(float(self.counts[0]), float(self.counts[0])))
        self.data = points
        self.refresh()
