"""GpuPane: the GPU tab (a placeholder until the feature is built)."""

from __future__ import annotations

from tui.widgets.shell.placeholder_pane import PlaceholderPane


class GpuPane(PlaceholderPane):
    """GPU tab."""

    DESCRIPTION = "GPU: the card's memory, utilisation and temperature, live while jobs run."
