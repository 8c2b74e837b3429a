"""CompareCurve: the loss curves of 2 to 6 runs on one plot, each run in its own colour: its
training loss as a line, its validation loss as marks; by step, or by tokens seen.

Drawn by plotext (textual-plotext's ``PlotextPlot``), as the Train tab's :class:`LossCurve` is.
The legend is :func:`legend`'s text, shown beside the plot by the compare view: plotext draws
its own legend inside the plot area, over the lines.
"""

from __future__ import annotations

import math
from typing import Any

from rich.text import Text
from textual.app import RenderResult
from textual_plotext import PlotextPlot

#: One colour per run, as (r, g, b): plotext and Rich draw the same colour from it.
COLOURS = ((0, 200, 220), (255, 150, 0), (220, 80, 220), (80, 200, 80), (235, 70, 70), (90, 130, 255))
Points = list[tuple[float, float]]


def colour(i: int) -> tuple[int, int, int]:
    return COLOURS[i % len(COLOURS)]


def legend(names: list[str], by_tokens: bool = False) -> Text:
    """``━ name`` per run in its colour, then what the line and the marks are."""
    text = Text()
    for i, name in enumerate(names):
        if i:
            text.append("  ")
        r, g, b = colour(i)
        text.append("━ ", style=f"bold rgb({r},{g},{b})")
        text.append(name)
    text.append(f"   line: loss · ●: eval_loss · x: {'tokens seen' if by_tokens else 'step'}", style="dim")
    return text


class CompareCurve(PlotextPlot):
    """The curves of the compared runs (``set_curves`` with ``runs.curves``' answer)."""

    EMPTY = "None of these runs logged a loss yet."

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        #: ``runs.curves``' curves, in the compared order.
        self.curves: list[dict[str, Any]] = []
        #: Against tokens seen instead of the step.
        self.by_tokens = False

    def set_curves(self, curves: list[dict[str, Any]]) -> None:
        self.curves = list(curves)
        self.refresh()

    def set_by_tokens(self, by_tokens: bool) -> None:
        self.by_tokens = by_tokens
        self.refresh()

    def series(self) -> list[tuple[str, Points, Points]]:
        """(name, training points, validation points) per run, on the x axis chosen; non-finite
        values left out."""
        train_key, eval_key = ("train_by_tokens", "eval_by_tokens") if self.by_tokens else ("train", "eval")

        def finite(points: Any) -> Points:
            return [(float(x), float(y)) for x, y in points or () if math.isfinite(x) and math.isfinite(y)]

        return [(str(c.get("name") or c.get("id", "")), finite(c.get(train_key)), finite(c.get(eval_key)))
                for c in self.curves]

    def render(self) -> RenderResult:
        series = self.series()
        if not any(train or evals for _, train, evals in series):
            return Text(self.EMPTY + (" (by tokens: no row counted its tokens)" if self.by_tokens and self.curves
                                      else ""), style="dim")
        plt = self.plt
        plt.clear_figure()
        for i, (_, train, evals) in enumerate(series):
            if train:
                xs, ys = zip(*train)
                plt.plot(list(xs), list(ys), color=colour(i), marker="braille" if len(train) > 1 else "●")
            if evals:
                xs, ys = zip(*evals)
                plt.scatter(list(xs), list(ys), color=colour(i), marker="●")
        plt.xlabel("tokens seen" if self.by_tokens else "step")
        return super().render()
