"""qlw adds nothing to what the libraries compute.

The same training (tiny model, fp32, CPU; the sample dataset; one seed) is run twice in this
process: through qlw (``backend.train.run_training``: the run config, ``data.load_prepared``'s
formatter, the held-model load, the callbacks) and through a plain script that calls datasets,
peft, transformers and trl directly, building its rows from the JSONL in trl's documented
conversational shape (``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``) with
none of qlw's code. Every logged training loss, gradient norm and validation loss must agree
within 1e-5: a second formatter, a different mask or any setting qlw changed would show. Both
runs pack rows (qlw's default, ``packing=True`` in the plain script: trl's best-fit-decreasing
packing, padding-free); tests/backend/test_packing.py shows that packing computes what the rows
compute one by one.
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

STEPS = 8
SEED = 42


def qlw_config(tiny_folder: Path) -> dict:
    config = TC.defaults()
    config["model"].update(source=str(tiny_folder), precision="fp32", device="cpu")
    config["data"].update(source={"path": str(tiny.sample_dataset_path()), "config": "", "split": ""},
                          mapping={"instruction": "instruction", "context": "context", "response": "response"},
                          template="chat", loss="auto", split_mode="ratio", validation_ratio=0.1, seed=SEED,
                          max_length=128)
    config["lora"].update(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    config["training"].update(max_steps=STEPS, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                              learning_rate=1e-3, lr_scheduler_type="linear", warmup_ratio=0.1,
                              optim="adamw_torch", weight_decay=0.01, max_grad_norm=0.3, logging_steps=1,
                              eval_steps=4, save_steps=0, seed=SEED, gradient_checkpointing=True, packing=True)
    return config


def run_qlw(tiny_folder: Path, home: Path) -> dict[int, dict]:
    store = Store(home / "sessions.db")
    rows: dict[int, dict] = {}

    def on_event(kind, payload):
        if kind == "train.log":
            rows.setdefault(payload["step"], {}).update({k: v for k, v in payload.items() if v is not None})

    run = train.LocalRun(store, store.create_session("qlw").id, on_event)
    result = train.run_training(qlw_config(tiny_folder), home, run)
    assert result["status"] == "done" and result["step"] == STEPS
    store.close()
    return rows


def run_plain_trl(tiny_folder: Path, out: Path) -> dict[int, dict]:
    """What a user would write with the libraries alone."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    table = datasets.load_dataset("json", data_files=str(tiny.sample_dataset_path()), split="train")
    parts = table.train_test_split(test_size=math.ceil(0.1 * len(table)), seed=SEED)

    def to_messages(row):
        user = row["instruction"] + ("\n\n" + row["context"] if row["context"] else "")
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["response"]}]}

    train_rows = parts["train"].map(to_messages, remove_columns=parts["train"].column_names)
    eval_rows = parts["test"].map(to_messages, remove_columns=parts["test"].column_names)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_folder), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_folder))
    args = SFTConfig(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-3, lr_scheduler_type="linear",
        warmup_steps=0.1,  # transformers 5: below 1 it is the warmup ratio
        optim="adamw_torch", weight_decay=0.01, max_grad_norm=0.3, logging_steps=1, eval_strategy="steps",
        eval_steps=4, save_strategy="no", seed=SEED, bf16=False, use_cpu=True, max_length=128,
        assistant_only_loss=True, gradient_checkpointing=True, packing=True, report_to="none")
    rows: dict[int, dict] = {}

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            rows.setdefault(state.global_step, {}).update(logs or {})

    trainer = SFTTrainer(model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows,
                         processing_class=tokenizer, callbacks=[Keep()],
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    trainer.train()
    return rows


def test_qlw_trains_exactly_as_plain_trl(tiny_folder):
    home = Path(tempfile.mkdtemp(prefix="qlw-eq-", dir="/tmp"))
    try:
        ours = run_qlw(tiny_folder, home)
        from backend import models

        models.release_base_model()
        theirs = run_plain_trl(tiny_folder, home / "plain")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert sorted(s for s in ours if "loss" in ours[s]) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert ours[step]["loss"] == pytest.approx(theirs[step]["loss"], abs=1e-5), step
        assert ours[step]["grad_norm"] == pytest.approx(theirs[step]["grad_norm"], abs=1e-5), step
        assert ours[step]["learning_rate"] == pytest.approx(theirs[step]["learning_rate"], rel=1e-9), step
    for step in (4, 8):
        assert ours[step]["eval_loss"] == pytest.approx(theirs[step]["eval_loss"], abs=1e-5), step
