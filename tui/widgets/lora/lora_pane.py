"""LoraPane: the LoRA tab (a placeholder until the feature is built)."""

from __future__ import annotations

from tui.widgets.shell.placeholder_pane import PlaceholderPane


class LoraPane(PlaceholderPane):
    """LoRA tab."""

    DESCRIPTION = "LoRA: base model, quantisation and the adapter (r, lora_alpha, target_modules)."
