"""StepBar: the wizard's steps on one line, the current one marked, the reached ones bright."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from tui.widgets.merge.merge_format import STEPS


class StepBar(Static):
    """``1 Adapter › 2 Precision › ...``; :meth:`show` marks ``step`` (0-based) of ``reached``."""

    def show(self, step: int, reached: int) -> None:
        text = Text()
        for i, name in enumerate(STEPS):
            if i:
                text.append(" › ", style="dim")
            label = f"{i + 1} {name}"
            if i == step:
                text.append(f"[{label}]", style="bold reverse")
            elif i <= reached:
                text.append(label, style="bold")
            else:
                text.append(label, style="dim")
        self.update(text)
