"""TrainPane: the Train tab (a placeholder until the feature is built)."""

from __future__ import annotations

from tui.widgets.shell.placeholder_pane import PlaceholderPane


class TrainPane(PlaceholderPane):
    """Train tab."""

    DESCRIPTION = "Train: start, follow and stop a run: loss and eval_loss curves, checkpoints."
