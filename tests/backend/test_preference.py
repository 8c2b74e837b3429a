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

STEPS = 4
EVAL_STEPS = 2
SEED = 42
RATIO = 0.05  # 30 validation pairs: evaluation is most of these runs' time on a CPU
METRICS = {"dpo": ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"),
           "orpo": ("rewards/chosen", "rewards/rejected", "rewards/margins", "nll_loss", "log_odds_ratio"),
           "kto": ("rewards/chosen", "rewards/rejected", "kl")}


def qlw_config(tiny_folder: Path, method: str) -> dict:
    config = TC.defaults()
    config["method"] = method
    config["model"].update(source=str(tiny_folder), precision="fp32", device="cpu")
    config["data"].update(source={"path": str(tiny.preference_sample_path()), "config": "", "split": ""},
                          mapping={"instruction": "prompt", "chosen": "chosen", "rejected": "rejected"},
                          template="chat", split_mode="ratio", validation_ratio=RATIO, seed=SEED, max_length=128)
    config["lora"].update(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    config["training"].update(max_steps=STEPS, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                              learning_rate=5e-4, lr_scheduler_type="linear", warmup_ratio=0.1,
                              optim="adamw_torch", weight_decay=0.01, max_grad_norm=0.3, logging_steps=1,
                              eval_steps=EVAL_STEPS, save_steps=0, seed=SEED, gradient_checkpointing=True,
                              packing=False)
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
    parts = table.train_test_split(test_size=math.ceil(RATIO * len(table)), seed=SEED)

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
        eval_steps=EVAL_STEPS, save_strategy="no", seed=SEED, bf16=False, use_cpu=True, max_length=128,
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


@pytest.mark.timeout(900)  # two runs and their evaluations, on a busy CPU
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
        # trl logs a reward only for the rows a step had (a KTO batch may hold no undesirable row).
        logged = [name for name in METRICS[method] if name in theirs[step]]
        assert [name for name in METRICS[method] if name in ours[step]] == logged, step
        for name in logged:
            assert ours[step][name] == pytest.approx(theirs[step][name], abs=1e-5), (step, name)
    for step in range(EVAL_STEPS, STEPS + 1, EVAL_STEPS):
        assert ours[step]["eval_loss"] == pytest.approx(theirs[step]["eval_loss"], abs=1e-5), step
        # trl's ORPO evaluation gives NaN rewards when a validation prompt alone fills max_length
        # (its warning says so): NaN in both runs is agreement too.
        assert ours[step]["eval_rewards/chosen"] == pytest.approx(theirs[step]["eval_rewards/chosen"], abs=1e-5,
                                                                  nan_ok=True), step


# The SFT -> DPO chain, stop and resume, and `qlw train` ---------------------------------------------


@pytest.fixture
def home(tiny_folder):
    from tests.backend.test_train import make_home

    h = make_home(tiny_folder)
    yield h
    shutil.rmtree(h, ignore_errors=True)
    from backend import models

    models.release_base_model()


def dpo_config(start_adapter: str = "", **training) -> dict:
    """DPO on the shipped preference sample (empty data path; the mapping is detected)."""
    from tests.backend.test_train import small_config

    config = small_config(**training)
    config["method"] = "dpo"
    config["data"]["split_mode"] = "none"
    config["dpo"]["start_adapter"] = start_adapter
    return config


@pytest.mark.timeout(900)
def test_dpo_from_an_sft_adapter_stops_and_resumes_on_the_same_curve(home):
    """SFT for 3 steps, then DPO from its adapter (trl's frozen copy of it is the reference): an
    uninterrupted 4-step DPO run against one stopped after step 2 and resumed from its checkpoint.
    The resumed steps' losses and margins equal the uninterrupted ones; the adapter holds the
    trained adapter only; the held base model is given back without LoRA layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from backend.holdings import HOLDINGS
    from tests.backend.test_train import small_config, train_here

    sft_config = small_config(max_steps=3)
    sft_config["data"]["split_mode"] = "none"
    sft, result = train_here(home, sft_config)
    assert isinstance(result, dict) and result["status"] == "done", result
    adapter = result["adapter_path"]

    config = dpo_config(adapter, max_steps=4)
    full, result = train_here(home, config)
    assert isinstance(result, dict) and result["status"] == "done", result
    assert any("starting from the adapter" in p["message"] for p in full.of("log"))
    rows = {r["step"]: r for r in full.of("train.log")}
    assert set(rows[1]["metrics"]) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    # Step 1 starts from the SFT adapter, which is also the reference: the rewards start at 0.
    assert rows[1]["metrics"]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert rows[4]["metrics"]["rewards/margins"] != 0.0
    assert Path(result["adapter_path"], "adapter_model.safetensors").is_file()
    assert not Path(result["adapter_path"], "ref").exists()  # trl's reference copy is not saved

    stopped, result = train_here(home, config, stop_at=2)
    assert isinstance(result, dict) and result["status"] == "stopped" and result["step"] == 2, result
    checkpoint = train.run_dir(home, stopped.session) / "checkpoints" / "checkpoint-2"
    resumed, result = train_here(home, config, resume_from=str(checkpoint))
    assert isinstance(result, dict) and result["status"] == "done", result
    assert sorted(resumed.losses()) == [3, 4]
    others = {**stopped.losses(), **resumed.losses()}
    margins = {r["step"]: r["metrics"]["rewards/margins"] for run in (stopped, resumed) for r in run.of("train.log")}
    for step in range(1, 5):
        assert others[step] == pytest.approx(full.losses()[step], abs=1e-5), step
        assert margins[step] == pytest.approx(rows[step]["metrics"]["rewards/margins"], abs=1e-5), step
    base = HOLDINGS.get("base")
    assert base is not None and not any(isinstance(m, BaseTunerLayer) for m in base.modules())


@pytest.mark.timeout(600)
def test_qlw_train_runs_dpo_headless_with_its_columns(home):
    from tests.backend.test_train import qlw

    path = home / "dpo.toml"
    path.write_text(TC.dumps_toml(dpo_config(max_steps=2)), encoding="utf-8")
    out = qlw(home, "train", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    header = lines.index(train.row_header("dpo"))
    assert lines[header].split()[-4:] == ["chosen", "rejected", "margin", "accuracy"]
    assert [line.split()[0] for line in lines[header + 1:header + 3]] == ["1/2", "2/2"]
    assert len(lines[header + 2].split()) == len(lines[header].split()) - 4  # four two-word headings; a cell is one word
    assert any(line.startswith("done at step 2/2") for line in lines)

    bad = dpo_config(max_steps=2)
    bad["dpo"]["start_adapter"] = str(home / "no-such-adapter")
    path.write_text(TC.dumps_toml(bad), encoding="utf-8")
    out = qlw(home, "train", str(path))
    assert out.returncode == 2 and "dpo.start_adapter:" in out.stderr and "holds no LoRA adapter" in out.stderr


@pytest.mark.timeout(600)
def test_a_kto_run_flags_a_nan_loss_and_ends_cleanly_out_of_memory(home):
    """The seam's watch and fault hooks hold for every method: KTO (on the sample's pairs,
    unpaired) flags a NaN loss on its step and ends an out-of-memory run with the base kept."""
    from backend.holdings import HOLDINGS
    from backend.jobs import JobError
    from tests.backend.test_train import train_here

    config = dpo_config(max_steps=2)
    config["method"] = "kto"
    # By default the watch stops the run on the NaN, before that step's update (issue 18) ...
    run, result = train_here(home, config, fault=("nan", 2))
    assert isinstance(result, JobError) and result.where == "step 2", result
    assert str(result).startswith("the training loss is nan at step 2 of 2"), result
    # ... and with the stop off the run flags it on its step and goes on.
    config["training"]["stop_on_divergence"] = False
    run, result = train_here(home, config, fault=("nan", 2))
    assert isinstance(result, dict) and result["status"] == "done", result
    assert [(a["kind"], a["step"]) for a in run.of("train.alert")] == [("nan", 2)]
    assert "kl" in run.of("train.log")[0]["metrics"]

    run, result = train_here(home, config, fault=("oom", 2))
    assert isinstance(result, JobError) and "out of memory at step 2" in str(result)
    assert run.of("train.finished")[0]["status"] == "failed" and sorted(run.losses()) == [1]
    assert HOLDINGS.get("trainer") is None and HOLDINGS.get("base") is not None
