"""KTO: trl's ``KTOTrainer`` (Ethayarajh et al. 2024) on unpaired rows (prompt, completion, label
true/false; paired data is unpaired), LoRA on the held base model, ``ref_model=None``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backend import protocol as P
from backend.methods.base import training_kwargs
from backend.methods.preference import PreferenceMethod


class KTO(PreferenceMethod):
    name = "kto"
    settings_class = P.KTOSettings
    roles = (("response", "label"), ("chosen", "rejected"))
    log_columns = P.KTOSettings.LOG_COLUMNS
    unpaired = True

    def trl_config(self, eff: dict[str, Any], prepared, output_dir: Path, device: str, has_eval: bool):
        from trl import KTOConfig

        st = self.settings(eff)
        return KTOConfig(**training_kwargs(eff, KTOConfig, output_dir, device, has_eval), beta=st["beta"],
                         loss_type=st["loss_type"], desirable_weight=st["desirable_weight"],
                         undesirable_weight=st["undesirable_weight"], max_length=eff["data"]["max_length"])

    def trainer_class(self) -> type:
        from trl import KTOTrainer

        return KTOTrainer
