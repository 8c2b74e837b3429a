"""ORPO: trl's ``ORPOTrainer`` (``trl.experimental.orpo``; Hong et al. 2024): the chosen side's
NLL plus ``beta`` (the paper's lambda) times the odds-ratio term, with no reference model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backend import protocol as P
from backend.methods.base import training_kwargs
from backend.methods.preference import PreferenceMethod


class ORPO(PreferenceMethod):
    name = "orpo"
    settings_class = P.ORPOSettings
    roles = (("chosen", "rejected"),)
    log_columns = P.ORPOSettings.LOG_COLUMNS
    uses_reference = False

    def trl_config(self, eff: dict[str, Any], prepared, output_dir: Path, device: str, has_eval: bool):
        from trl.experimental.orpo import ORPOConfig

        st = self.settings(eff)
        return ORPOConfig(**training_kwargs(eff, ORPOConfig, output_dir, device, has_eval), beta=st["beta"],
                          max_length=eff["data"]["max_length"])

    def trainer_class(self) -> type:
        from trl.experimental.orpo import ORPOTrainer

        return ORPOTrainer
