"""DPO: trl's ``DPOTrainer`` (Rafailov et al. 2023) on prompt/chosen/rejected pairs, LoRA on the
held base model, ``ref_model=None`` (the reference is the model with the adapter off)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backend import protocol as P
from backend.methods.base import training_kwargs
from backend.methods.preference import PreferenceMethod


class DPO(PreferenceMethod):
    name = "dpo"
    settings_class = P.DPOSettings
    roles = (("chosen", "rejected"),)
    log_columns = P.DPOSettings.LOG_COLUMNS

    def trl_config(self, eff: dict[str, Any], prepared, output_dir: Path, device: str, has_eval: bool):
        from trl import DPOConfig

        st = self.settings(eff)
        return DPOConfig(**training_kwargs(eff, DPOConfig, output_dir, device, has_eval), beta=st["beta"],
                         loss_type=[st["loss_type"]], label_smoothing=st["label_smoothing"],
                         max_length=eff["data"]["max_length"])

    def trainer_class(self) -> type:
        from trl import DPOTrainer

        return DPOTrainer
