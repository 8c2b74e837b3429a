"""DataPane: the Data tab (a placeholder until the feature is built)."""

from __future__ import annotations

from tui.widgets.shell.placeholder_pane import PlaceholderPane


class DataPane(PlaceholderPane):
    """Data tab."""

    DESCRIPTION = "Data: load a dataset, map its fields to a chat template, preview samples."
