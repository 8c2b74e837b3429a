"""Preference tuning (DPO, ORPO, KTO) adds nothing to what trl computes.

As tests/backend/test_train_equality.py does for SFT: the same run (tiny model, fp32, CPU; the
shipped preference sample; one seed) goes once through qlw (``backend.train.run_training`` with
``method = "dpo"`` etc.: the run config, the pairs formatter, the held-model load, the callbacks)
and once through a plain script that builds trl's conversational preference rows from the JSONL
itself and calls peft and trl directly (``ref_model=None``). Every logged loss, gradient norm and
reward (rewards/chosen, rewards/rejected, rewards/margins) must agree within 1e-5, step by step,
and so must the validation loss.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import pytest

from backend import tiny, train, train_config as TC
from sessions.store import Store

pytestmark = pytest.mark.slow

STEPS = 6
SEED = 42
METRICS = {"dpo": ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"),
           "orpo": ("rewards/chosen", "rewards/rejected", "rewards/margins", "nll_loss", "log_odds_ratio"),
           "kto": ("rewards/chosen", "rewards/rejected", "kl")}


def qlw_config(tiny_folder: Path, method: str) -> dict:
    config = TC.defaults()
    config["method"] = method
    config["model"].update(source=str(tiny_folder), precision="fp32", device="cpu")
    config["data"].update(source={"path": str(tiny.preference_sample_path()), "config": "", "split": ""},
                          mapping={"instruction": "prompt", "chosen": "chosen", "rejected": "rejected"},
                          template="chat", split_mode="ratio", validation_ratio=0.1, seed=SEED, max_length=128)
    config["lora"].update(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    config["training"].update(max_steps=STEPS, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                              learning_rate=5e-4, lr_scheduler_type="linear", warmup_ratio=0.1,
                              optim="adamw_torch", weight_decay=0.01, max_grad_norm=0.3, logging_steps=1,
                              eval_steps=3, save_steps=0, seed=SEED, gradient_checkpointing=True, packing=False)
    config[method]["beta"] = 0.1
    return config


def run_qlw(config: dict, home: Path) -> tuple[dict[int, dict], dict]:
    store = Store(home / "sessions.db")
    rows: dict[int, dict] = {}

    def on_event(kind, payload):
        if kind == "train.log":
            row = rows.setdefault(payload["step"], {})
            row.update({k: v for k, v in payload.items() if v is not None and k != "metrics"})
            row.update({k: v for k, v in payload["metrics"].items() if v is not None})

    run = train.LocalRun(store, store.create_session("qlw").id, on_event)
    result = train.run_training(config, home, run)
    assert result["status"] == "done" and result["step"] == STEPS
    store.close()
    return rows, result


def run_plain_trl(tiny_folder: Path, out: Path, method: str) -> dict[int, dict]:
    """What a user would write with the libraries alone."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    table = datasets.load_dataset("json", data_files=str(tiny.preference_sample_path()), split="train")
    parts = table.train_test_split(test_size=math.ceil(0.1 * len(table)), seed=SEED)

    def to_pair(row):
        return {"prompt": [{"role": "user", "content": row["prompt"]}],
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}]}

    train_rows = parts["train"].map(to_pair, remove_columns=parts["train"].column_names)
    eval_rows = parts["test"].map(to_pair, remove_columns=parts["test"].column_names)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_folder), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_folder))
    common = dict(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=5e-4, lr_scheduler_type="linear",
        warmup_steps=0.1,  # transformers 5: below 1 it is the warmup ratio
        optim="adamw_torch", weight_decay=0.01, max_grad_norm=0.3, logging_steps=1, eval_strategy="steps",
        eval_steps=3, save_strategy="no", seed=SEED, bf16=False, use_cpu=True, max_length=128,
        gradient_checkpointing=True, report_to="none", beta=0.1)
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    rows: dict[int, dict] = {}

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            rows.setdefault(state.global_step, {}).update(logs or {})

    kwargs = dict(model=model, train_dataset=train_rows, eval_dataset=eval_rows, processing_class=tokenizer,
                  callbacks=[Keep()], peft_config=peft_config)
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(args=DPOConfig(**common), ref_model=None, **kwargs)
    elif method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer = ORPOTrainer(args=ORPOConfig(**common), **kwargs)
    else:
        from trl import KTOConfig, KTOTrainer
        from trl.data_utils import unpair_preference_dataset

        kwargs.update(train_dataset=unpair_preference_dataset(train_rows),
                      eval_dataset=unpair_preference_dataset(eval_rows))
        trainer = KTOTrainer(args=KTOConfig(**common), ref_model=None, **kwargs)
    trainer.train()
    return rows


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_qlw_preference_run_equals_plain_trl(tiny_folder, method):
    home = Path(tempfile.mkdtemp(prefix=f"qlw-{method}-", dir="/tmp"))
    try:
        ours, result = run_qlw(qlw_config(tiny_folder, method), home)
        assert Path(result["adapter_path"], "adapter_model.safetensors").is_file()
        from backend import models

        models.release_base_model()
        theirs = run_plain_trl(tiny_folder, home / "plain", method)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert sorted(s for s in ours if "loss" in ours[s]) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert ours[step]["loss"] == pytest.approx(theirs[step]["loss"], abs=1e-5), step
        assert ours[step]["grad_norm"] == pytest.approx(theirs[step]["grad_norm"], abs=1e-5), step
        assert ours[step]["learning_rate"] == pytest.approx(theirs[step]["learning_rate"], rel=1e-9), step
        for name in METRICS[method]:
            assert ours[step][name] == pytest.approx(theirs[step][name], abs=1e-5), (step, name)
    for step in (3, 6):
        assert ours[step]["eval_loss"] == pytest.approx(theirs[step]["eval_loss"], abs=1e-5), step
        assert ours[step]["eval_rewards/chosen"] == pytest.approx(theirs[step]["eval_rewards/chosen"], abs=1e-5), step
