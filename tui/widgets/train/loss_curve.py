"""LossCurve: training and validation loss by step (and a preference run's reward margin), drawn in braille by plotext
(textual-plotext's ``PlotextPlot``).

The pane sets the points in batches (at most a few times a second, however fast rows come); the
plot is built from them when the widget is drawn. Non-finite losses (a NaN step) are left out of
the curve: the table and the alert show them.
"""

from __future__ import annotations

import math

from rich.text import Text
from textual.app import RenderResult
from textual_plotext import PlotextPlot

Points = list[tuple[int, float]]


class LossCurve(PlotextPlot):
    """``loss`` and ``eval_loss`` against the step."""

    EMPTY = "The loss curve appears with the first logged step."

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        #: The points drawn: (step, loss) of training and of validation, in step order.
        self.train: Points = []
        self.eval: Points = []
        #: A preference run's reward margin (rewards/margins), by step.
        self.margin: Points = []

    def set_points(self, train: Points, eval: Points, margin: Points = ()) -> None:
        """Replace the points and draw once."""
        self.train = [(s, v) for s, v in train if math.isfinite(v)]
        self.eval = [(s, v) for s, v in eval if math.isfinite(v)]
        self.margin = [(s, v) for s, v in margin if math.isfinite(v)]
        self.refresh()

    def render(self) -> RenderResult:
        if not self.train and not self.eval:
            return Text(self.EMPTY, style="dim")
        plt = self.plt
        plt.clear_figure()
        # The legend is the title, above the plot: plotext draws a legend inside the plot area,
        # over the line (issue 15).
        named = []
        for points, label, colour in ((self.train, "loss", "cyan"), (self.eval, "eval_loss", "orange"),
                                      (self.margin, "rewards/margins", "magenta")):
            if points:
                steps, values = zip(*points)
                # A lone validation point would be invisible as a braille dot: mark it.
                plt.plot(list(steps), list(values), color=colour,
                         marker="braille" if len(points) > 1 else "●")
                named.append(f"{label} ({colour})")
        plt.title(" · ".join(named))
        return super().render()
