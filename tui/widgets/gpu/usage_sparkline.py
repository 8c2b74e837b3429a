"""UsageSparkline: Textual's Sparkline on a fixed 0-100 % scale.

Textual's Sparkline scales its bars between the smallest and the largest value it is given, so a
card steady at 70-71 % memory would look like it swings from empty to full. For usage that is a
lie; this one always spans 0 to 100 %.
"""

from __future__ import annotations

from typing import Sequence

from textual.widgets import Sparkline


class _Point(float):
    """One sample as the sparkline sees it: it compares (for the scale's min and max) as
    ``scale_as`` and draws (through the summary function) as ``value``."""

    value: float

    def __new__(cls, scale_as: float, value: float) -> "_Point":
        point = super().__new__(cls, scale_as)
        point.value = value
        return point


def _bar_height(points: Sequence[_Point]) -> float:
    """The summary of one bar: the highest value among the samples it covers."""
    return max(p.value for p in points)


class UsageSparkline(Sparkline):
    """A percentage (0-100) over time, on a fixed scale; feed it with :meth:`set_values`."""

    def __init__(self, **kwargs) -> None:
        super().__init__([], summary_function=_bar_height, **kwargs)
        self.values: list[float] = []

    def set_values(self, values: Sequence[float]) -> None:
        """Show ``values`` (percentages, oldest first; clamped to 0-100)."""
        values = [min(100.0, max(0.0, float(v))) for v in values]
        self.values = values
        if len(values) == 1:
            values = values * 2  # one sample alone is drawn as a full block whatever it is
        points = [_Point(v, v) for v in values]
        if points:
            # The first point pins the scale's bottom at 0, the last its top at 100; both still
            # draw as their own values.
            points[0] = _Point(0.0, values[0])
            points[-1] = _Point(100.0, values[-1])
        self.data = points
        self.refresh()  # the reactive compares floats: pinned points may look unchanged
