"""MergePane: the Merge tab (a placeholder until the feature is built)."""

from __future__ import annotations

from tui.widgets.shell.placeholder_pane import PlaceholderPane


class MergePane(PlaceholderPane):
    """Merge tab."""

    DESCRIPTION = "Merge: fold an adapter into its base model, save it, push it to the Hub."
