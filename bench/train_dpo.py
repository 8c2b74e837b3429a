"""Preference tuning on the GPU (issue 16): a 4-bit DPO run's speed and memory beside SFT's on the
same pairs, and against the same DPO run with a second, reference copy of the model.

    . bench/gpu_setup.sh && python3 bench/train_dpo.py --model /tmp/qlw-7b --budget 500 --out $OUT/train_dpo.json
                                        # GPU: one call, the 7B is built first when DIR has none
    python bench/train_dpo.py --smoke   # CPU: the tiny model, a smoke check of every code path

Model: as ``bench/train_speed.py``, a Mistral-7B-v0.3-shaped model with random weights
(``bench/train_smoke.make_7b``, built on the GPU in a subprocess and saved, or reused from
``--model DIR``), loaded through the real 4-bit path (nf4, double quantisation, bf16 compute,
sdpa); LoRA r=16, lora_alpha 16 on the seven linear projections; learning rate 2e-4 constant,
max_grad_norm 0.3, ``paged_adamw_8bit``, gradient checkpointing on, seed 42. ``--smoke``: the
embedded tiny model in fp32 on the CPU (built once into /tmp/qlw-bench-tiny), ``adamw_torch``;
with ``--four-bit`` in 4-bit NF4 (bitsandbytes' CPU backend, fp32 compute), where D and R differ
slightly: bitsandbytes repacks the weights of a 4-bit module in eval mode (R's reference) into its
bf16 CPU inference format. In fp32 D and R log the same losses and rewards at every step.

Pairs: synthetic, made with the model's tokenizer at fixed lengths (prompt 256 tokens with its
BOS and the blank line qlw's ``raw`` template ends it with; chosen and rejected 512 tokens each
with the EOS trl appends; 64 pairs; smoke: 16 + 32 + 32). Not the shipped preference sample:
its pairs are a few dozen tokens long, so a 7B step on them would measure launch overhead, not
the work of a preference run on real answers; and with every side one exact length nothing is
padded, so each step processes the same, known number of tokens in every variant. Words that
the tokenizer keeps as one token make the lengths exact (``train_speed.one_token_words``); the
lengths are measured with trl's own tokenization (``preference.tokenize_side``) and printed.

Variants, each in its own process (``--in-process``: in this one, the smoke test's shortcut),
batch 4 (smoke 2) x grad_accum 1, the same settings everywhere:
- ``S`` SFT on the chosen answers (prompt + chosen, loss on the answer), through qlw
  (``backend.train.run_training``, ``method = "sft"``; packing off, ``speed = "manual"``);
- ``D`` DPO through qlw (``method = "dpo"``, beta 0.1, sigmoid loss; ``ref_model=None``: the
  model with the adapter switched off is the reference), ``speed = "manual"``;
- ``R`` the same DPO in plain trl (``DPOTrainer`` with ``peft_config`` and ``ref_model`` = a
  second copy of the base model, loaded in 4-bit as the first): what ``ref_model=None`` saves
  is R's memory minus D's;
- ``F`` D at qlw's defaults (``speed = "fast"``: the speed plan may drop checkpointing, copy the
  4-bit weights to bf16 and compile) - last, and skipped when the budget has no room for it.

Figures: tokens/s are the tokens of the batches each optimizer step processes (trl's
``num_tokens``: the attention mask's sum; R's also counted from its batches as a check): for DPO
prompt + chosen and prompt + rejected (the reference's forward over the same tokens is not
counted again: it is the method's cost), for SFT prompt + chosen; pairs/s puts both on one
footing. s/step after ``--warmup`` untimed steps (step end after a CUDA synchronise); torch's
allocated memory when training starts (the weights: R holds two models) and its peak; the most
NVML saw for the process; the final loss and, for DPO, rewards/margins (and chosen/rejected) at
the last step. D and R compute the same thing (trl disables dropout in both; the reference is
the same base either way): their losses and rewards are compared step by step.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.train_speed import (  # noqa: E402  (the same measuring as the SFT bench)
    GIB, SEVEN, NvmlPeak, _kill, build_model, count_tokens, emit, note_nvml_base, one_token_words, step_timer,
    timed_figures, versions)

LEARNING_RATE = 2e-4
SEED = 42
BETA = 0.1
DEFAULT_MODEL = Path("/tmp/qlw-7b")
SMOKE_HOME = Path("/tmp/qlw-bench-tiny")

VARIANTS: dict[str, dict[str, Any]] = {
    "S": {"kind": "qlw", "method": "sft", "speed": "manual", "label": "SFT on prompt+chosen (qlw)"},
    "D": {"kind": "qlw", "method": "dpo", "speed": "manual", "label": "DPO, ref_model=None (qlw)"},
    "R": {"kind": "reference", "label": "DPO + 2nd copy of the model as ref_model (plain trl)"},
    "F": {"kind": "qlw", "method": "dpo", "speed": "fast", "label": "DPO at qlw's defaults (speed fast)"},
}
#: Rough seconds per variant process on an H100 (imports, the 4-bit load, the steps).
GPU_ESTIMATE = {"S": 75, "D": 90, "R": 130, "F": 160}
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def data_spec(smoke: bool) -> dict[str, Any]:
    if smoke:
        return {"pairs": 16, "prompt": 16, "response": 32, "batch": 2, "ga": 1, "max_length": 64}
    return {"pairs": 64, "prompt": 256, "response": 512, "batch": 4, "ga": 1, "max_length": 1024}


# The pairs ---------------------------------------------------------------------------------------------


def side_lengths(tokenizer, row: dict[str, str]) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) tokens as trl 1.16 tokenizes the pair qlw's raw template makes."""
    from backend.methods.preference import tokenize_side

    prompt = row["prompt"] + "\n\n"  # qlw's raw rendering of the prompt (render_prompt)
    ids_c, mask_c = tokenize_side(tokenizer, prompt, row["chosen"])
    ids_r, mask_r = tokenize_side(tokenizer, prompt, row["rejected"])
    return mask_c.count(0), sum(mask_c), sum(mask_r)


def make_pairs(tokenizer, folder: Path, smoke: bool) -> dict[str, Any]:
    """Writes ``pairs.jsonl`` ({"prompt", "chosen", "rejected"} rows of one-token words, every side
    of the spec's exact length in tokens); returns the spec with the measured lengths."""
    spec = data_spec(smoke)
    words = one_token_words(tokenizer)
    assert len(words) > 100, f"the tokenizer has too few one-token words ({len(words)})"

    def rows_of(n_prompt: int, n_answer: int) -> list[dict[str, str]]:
        rng = random.Random(f"{SEED}-pairs")
        out = []
        for _ in range(spec["pairs"]):
            # A leading space too: the first word without one would be several tokens.
            prompt = "".join(" " + rng.choice(words) for _ in range(n_prompt))
            chosen = "".join(" " + rng.choice(words) for _ in range(n_answer))
            rejected = "".join(" " + rng.choice(words) for _ in range(n_answer))
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        return out

    # What the tokenizer adds around the words (BOS, the blank line, EOS), from a first row.
    probe = rows_of(spec["prompt"], spec["response"])[0]
    p, c, _ = side_lengths(tokenizer, probe)
    n_prompt, n_answer = 2 * spec["prompt"] - p, 2 * spec["response"] - c
    rows = rows_of(n_prompt, n_answer)
    lengths = [side_lengths(tokenizer, r) for r in rows]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    prompt_t = [x[0] for x in lengths]
    answer_t = [x[1] for x in lengths] + [x[2] for x in lengths]
    spec.update(path=str(path), prompt_tokens=(min(prompt_t), max(prompt_t)), answer_tokens=(min(answer_t), max(answer_t)),
                exact=min(prompt_t) == max(prompt_t) == spec["prompt"] and min(answer_t) == max(answer_t) == spec["response"],
                dpo_tokens_per_pair=sum(2 * a + b + c for a, b, c in lengths) / len(lengths),
                sft_tokens_per_pair=sum(a + b for a, b, _ in lengths) / len(lengths))
    return spec


# The runs ----------------------------------------------------------------------------------------------


def metrics_callback(cuda: bool):
    """A TrainerCallback keeping each step's rewards and the memory allocated when training starts."""
    import torch
    from transformers import TrainerCallback

    class Keep(TrainerCallback):
        def __init__(self):
            self.rewards: dict[int, dict[str, float]] = {}
            self.start_alloc = None

        def on_train_begin(self, args, state, control, **kwargs):
            if cuda:
                self.start_alloc = torch.cuda.memory_allocated()

        def on_log(self, args, state, control, logs=None, **kwargs):
            got = {k: float(v) for k, v in (logs or {}).items() if k in REWARDS}
            if got:
                self.rewards[int(state.global_step)] = got

    return Keep()


def qlw_config(spec: dict[str, Any]) -> dict[str, Any]:
    from backend import protocol as P, train_config as TC

    v, ds, smoke = VARIANTS[spec["variant"]], spec["data"], spec["smoke"]
    config = TC.defaults()
    config["name"] = f"train_dpo {spec['variant']}"
    config["method"] = v["method"]
    config["model"].update(source=spec["model"], precision="4bit" if spec["four_bit"] else "fp32", quant_type="nf4",
                           double_quant=True, compute_dtype="fp32" if smoke else "bf16", attn_implementation="sdpa",
                           device="cpu" if smoke else "auto")
    mapping = {**{r: "" for r in P.DATA_ROLES}, "instruction": "prompt"}
    if v["method"] == "sft":
        mapping["response"] = "chosen"  # prompt + chosen, the loss on the answer
    else:
        mapping.update(chosen="chosen", rejected="rejected")
    config["data"].update(source={"path": ds["path"], "config": "", "split": ""}, mapping=mapping, template="raw",
                          loss="auto", split_mode="none", seed=SEED, max_length=ds["max_length"])
    config["lora"].update(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=list(SEVEN), bias="none")
    training = dict(max_steps=spec["warmup"] + spec["steps"], per_device_train_batch_size=ds["batch"],
                    gradient_accumulation_steps=ds["ga"], learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
                    warmup_ratio=0.0, warmup_steps=0, weight_decay=0.0, max_grad_norm=0.3, logging_steps=1,
                    eval_steps=0, save_steps=0, seed=SEED, optim="adamw_torch" if smoke else "paged_adamw_8bit",
                    report_to=[], packing=False, speed=v["speed"], memory_budget=0.0)
    if v["speed"] == "manual":
        training.update(gradient_checkpointing=True, use_liger_kernel=False, activation_offloading=False)
    config["training"].update(training)
    if v["method"] == "dpo":
        config["dpo"].update(beta=BETA, loss_type="sigmoid", label_smoothing=0.0, start_adapter="")
    return config


def run_qlw(spec: dict[str, Any], workdir: Path, cuda: bool) -> dict[str, Any]:
    """S, D, F: ``backend.train.run_training``, as ``train.start`` and ``qlw train`` run it."""
    from backend import train
    from sessions.store import Store

    home = workdir / "qlw-home"
    home.mkdir(parents=True, exist_ok=True)
    store = Store(home / "sessions.db")
    logs: list[str] = []

    def on_event(kind, payload):
        if kind == "log":
            logs.append(payload["message"])

    run = train.LocalRun(store, store.create_session(f"dpo-bench-{spec['variant']}").id, on_event)
    timer, keep = step_timer(cuda), metrics_callback(cuda)
    t0 = time.perf_counter()
    result = train.run_training(qlw_config(spec), home, run, callbacks=[timer, keep])
    store.close()
    if result.get("status") != "done":
        raise RuntimeError(f"the qlw run ended {result.get('status')}")
    return {"train_s": round(time.perf_counter() - t0, 2), "timer": timer, "keep": keep, "notes": logs,
            "speed_plan": result.get("speed")}


def run_reference(spec: dict[str, Any], workdir: Path, cuda: bool) -> dict[str, Any]:
    """R: plain trl, ``DPOTrainer(model, ref_model=<a second copy>, peft_config=...)`` with D's
    settings and D's rows (the prompt as qlw's raw template renders it)."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    smoke, ds = spec["smoke"], spec["data"]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32 if smoke else torch.bfloat16) if spec["four_bit"] else None

    def load():
        return AutoModelForCausalLM.from_pretrained(
            spec["model"], quantization_config=quant, dtype=torch.float32 if smoke else torch.bfloat16,
            attn_implementation="sdpa", device_map={"": "cpu" if smoke else 0})

    model, ref = load(), load()
    ref_bytes = int(ref.get_memory_footprint())
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    table = datasets.load_dataset("json", data_files=ds["path"], split="train")
    rows = table.map(lambda r: {"prompt": r["prompt"] + "\n\n", "chosen": r["chosen"], "rejected": r["rejected"]},
                     remove_columns=table.column_names)
    import dataclasses

    names = {f.name for f in dataclasses.fields(DPOConfig)}  # transformers 5.2x renamed it
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = DPOConfig(
        output_dir=str(workdir / "plain-out"), max_steps=spec["warmup"] + spec["steps"],
        per_device_train_batch_size=ds["batch"], gradient_accumulation_steps=ds["ga"], learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch" if smoke else "paged_adamw_8bit",
        weight_decay=0.0, max_grad_norm=0.3, logging_steps=1, save_strategy="no", seed=SEED, bf16=not smoke,
        use_cpu=smoke, max_length=ds["max_length"], report_to="none", disable_tqdm=True, beta=BETA,
        loss_type=["sigmoid"], label_smoothing=0.0, **{ckpt: True})
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # as run_training does once the model is loaded
    timer, keep = step_timer(cuda), metrics_callback(cuda)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=rows, processing_class=tokenizer,
                         callbacks=[timer, keep],
                         peft_config=LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=list(SEVEN),
                                                bias="none", task_type="CAUSAL_LM"))
    count_tokens(trainer, timer)
    t0 = time.perf_counter()
    trainer.train()
    out = {"train_s": round(time.perf_counter() - t0, 2), "timer": timer, "keep": keep,
           "ref_model_gib": round(ref_bytes / GIB, 3)}
    del trainer, model, ref
    return out


def run_one(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    import torch

    v = VARIANTS[spec["variant"]]
    cuda = torch.cuda.is_available() and not spec["smoke"]
    if cuda:
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with NvmlPeak() as nvml:
        out = (run_reference if v["kind"] == "reference" else run_qlw)(spec, workdir, cuda)
    timer, keep = out["timer"], out["keep"]
    warm, last = spec["warmup"], spec["warmup"] + spec["steps"]
    row: dict[str, Any] = {"variant": spec["variant"], "label": v["label"], "method": v.get("method", "dpo"),
                           **timed_figures(timer.t, timer.tokens, warm, last)}
    row["tokens_per_s"] = row.pop("useful_tokens_per_s")
    rows_per_step = spec["data"]["batch"] * spec["data"]["ga"]
    if row["s_per_step"]:
        row["pairs_per_s"] = round(rows_per_step / row["s_per_step"], 3)
    if timer.counted and last in timer.counted and warm in timer.counted and spec["steps"]:
        row["tokens_counted_per_step"] = round((timer.counted[last] - timer.counted[warm]) / spec["steps"], 1)
    row.update(train_s=out["train_s"], nvml_gib=nvml.gib() if cuda else None,
               start_alloc_gib=round(keep.start_alloc / GIB, 3) if keep.start_alloc else None,
               peak_alloc_gib=round(timer.peak_alloc / GIB, 3) if timer.peak_alloc else None,
               peak_reserved_gib=round(timer.peak_reserved / GIB, 3) if timer.peak_reserved else None)
    for key in ("ref_model_gib", "speed_plan", "notes"):
        if key in out:
            row[key] = out[key]
    row["losses"] = [round(timer.loss[k], 6) for k in sorted(timer.loss)]
    row["final_loss"] = row["losses"][-1] if row["losses"] else None
    row["rewards"] = [{"step": k, **{n: round(x, 6) for n, x in keep.rewards[k].items()}} for k in sorted(keep.rewards)]
    final = keep.rewards[max(keep.rewards)] if keep.rewards else {}
    row.update(final_margin=final.get("rewards/margins"), final_reward_chosen=final.get("rewards/chosen"),
               final_reward_rejected=final.get("rewards/rejected"))
    return row


def run_variant(spec: dict[str, Any]) -> None:
    """A variant process: one @@RESULT line."""
    workdir = Path(spec["workdir"]) / spec["variant"]
    workdir.mkdir(parents=True, exist_ok=True)
    if not spec.get("in_process"):
        note_nvml_base()
    info: dict[str, Any] = {"versions": versions(), "host": platform.node()}
    try:
        import torch

        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not spec["smoke"] else "cpu"
    except Exception:
        info["device"] = "?"
    try:
        row = run_one(spec, workdir)
    except Exception as exc:  # a failed variant is a row of the table, not the end of the bench
        import traceback

        traceback.print_exc()
        row = {"variant": spec["variant"], "label": VARIANTS[spec["variant"]]["label"],
               "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    emit("RESULT", {**row, **info})
    if spec.get("in_process"):
        from backend import models

        models.release_base_model()


# The parent: plan, run, print --------------------------------------------------------------------------


COLUMNS = (("variant", 7, "{}"), ("tok/s", 8, "{:,.0f}"), ("pairs/s", 7, "{:.2f}"), ("s/step", 7, "{:.3f}"),
           ("tok/step", 8, "{:,.0f}"), ("start", 6, "{:.2f}"), ("alloc", 6, "{:.2f}"), ("nvml", 6, "{:.2f}"),
           ("loss", 8, "{:.4f}"), ("margin", 8, "{:.4f}"))
KEYS = {"tok/s": "tokens_per_s", "pairs/s": "pairs_per_s", "s/step": "s_per_step", "tok/step": "tokens_per_step",
        "start": "start_alloc_gib", "alloc": "peak_alloc_gib", "nvml": "nvml_gib", "loss": "final_loss",
        "margin": "final_margin"}
HEADER = "  ".join(f"{name:>{width}}" for name, width, _ in COLUMNS) + "  what"


def format_row(row: dict[str, Any]) -> str:
    if row.get("error"):
        return f"{row['variant']:>7}  ERROR {row['error']}"
    cells = []
    for name, width, fmt in COLUMNS:
        value = row.get(KEYS.get(name, name))
        cells.append(f"{'—' if value is None else fmt.format(value):>{width}}")
    return "  ".join(cells) + f"  {row['label']}"


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """D against R (memory; the same losses and rewards) and D against S (speed)."""
    by = {r["variant"]: r for r in rows if not r.get("error")}
    out: dict[str, Any] = {}

    def ratio(a, b):
        return round(a / b, 3) if a is not None and b else None

    def minus(a, b):
        return round(a - b, 3) if a is not None and b is not None else None

    d, r, s = by.get("D"), by.get("R"), by.get("S")
    if d and r:
        out["ref_model_none_saves"] = {
            "peak_alloc_gib": minus(r.get("peak_alloc_gib"), d.get("peak_alloc_gib")),
            "start_alloc_gib": minus(r.get("start_alloc_gib"), d.get("start_alloc_gib")),
            "nvml_gib": minus(r.get("nvml_gib"), d.get("nvml_gib")),
            "d_over_r_peak": ratio(d.get("peak_alloc_gib"), r.get("peak_alloc_gib")),
            "ref_model_gib": r.get("ref_model_gib"),
            "d_over_r_tokens_per_s": ratio(d.get("tokens_per_s"), r.get("tokens_per_s"))}
        n = min(len(d["losses"]), len(r["losses"]))
        loss_diff = [abs(a - b) for a, b in zip(d["losses"][:n], r["losses"][:n])]
        rd, rr = {x["step"]: x for x in d["rewards"]}, {x["step"]: x for x in r["rewards"]}
        reward_diff = [abs(rd[k][name] - rr[k][name]) for k in rd if k in rr for name in REWARDS
                       if name in rd[k] and name in rr[k]]
        out["d_equals_r"] = {"steps": n, "max_abs_loss_diff": max(loss_diff) if loss_diff else None,
                             "max_abs_reward_diff": max(reward_diff) if reward_diff else None}
    if d and s:
        out["dpo_vs_sft"] = {"d_over_s_tokens_per_s": ratio(d.get("tokens_per_s"), s.get("tokens_per_s")),
                             "d_over_s_pairs_per_s": ratio(d.get("pairs_per_s"), s.get("pairs_per_s")),
                             "d_minus_s_peak_alloc_gib": minus(d.get("peak_alloc_gib"), s.get("peak_alloc_gib"))}
    return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.meta: dict[str, Any] = {}

    def remaining(self) -> float:
        return self.args.budget - (time.monotonic() - self.t0)

    def write(self) -> None:
        out = self.args.out
        if out is None:
            return
        first = next((r for r in self.rows if "versions" in r), {})
        doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "device": first.get("device"),
               "host": first.get("host"), "versions": first.get("versions"), **self.meta, "rows": self.rows,
               "skipped": self.skipped, "compare": compare(self.rows), "elapsed_s": round(time.monotonic() - self.t0, 1)}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
        tmp.replace(out)

    def take(self, line: str) -> None:
        if line.startswith("@@RESULT "):
            row = json.loads(line[len("@@RESULT "):])
            row["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            self.rows.append(row)
            print(format_row(row), flush=True)
            self.write()

    def run_process(self, spec: dict[str, Any], log: Path) -> None:
        spec_path = log.with_suffix(".json")
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the backend sets it
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        timer = threading.Timer(max(self.remaining(), 1), lambda: _kill(proc))
        timer.start()
        with open(log, "w", encoding="utf-8") as f:
            for line in proc.stdout:
                f.write(line)
                if line.startswith("@@"):
                    self.take(line.strip())
        proc.wait()
        timer.cancel()
        if proc.returncode != 0:
            print(f"  ({spec['variant']}: process exit {proc.returncode}; log {log})", flush=True)
            tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            print("    " + "\n    ".join(tail), flush=True)
            if not any(r["variant"] == spec["variant"] for r in self.rows):
                self.rows.append({"variant": spec["variant"], "label": VARIANTS[spec["variant"]]["label"],
                                  "error": f"process exit {proc.returncode} (budget end or crash)"})
                self.write()

    def run(self, data: dict[str, Any], model: str, workdir: Path) -> None:
        logs = workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        print(HEADER, flush=True)
        for name in self.args.variants:
            spec = {"variant": name, "model": model, "smoke": self.args.smoke, "warmup": self.args.warmup,
                    "steps": self.args.steps, "workdir": str(workdir), "data": data,
                    "four_bit": not self.args.smoke or self.args.four_bit,
                    "in_process": self.args.in_process}
            estimate = 0 if self.args.smoke else GPU_ESTIMATE[name]
            if self.remaining() < estimate:
                self.skipped.append(f"{name}: {self.remaining():.0f} s of budget left, needs about {estimate:.0f} s")
                print(f"  skipped: {self.skipped[-1]}", flush=True)
                self.write()
                continue
            if self.args.in_process:
                run_in_process(spec, self)
            else:
                self.run_process(spec, logs / f"{name}.log")
        self.write()


def run_in_process(spec: dict[str, Any], bench: Bench) -> None:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run_variant(spec)
    for line in buf.getvalue().splitlines():
        if line.startswith("@@"):
            bench.take(line)


def print_comparison(doc: dict[str, Any]) -> None:
    saves, same, speed = doc.get("ref_model_none_saves"), doc.get("d_equals_r"), doc.get("dpo_vs_sft")
    print()
    if saves:
        print(f"ref_model=None saves (R - D): peak allocated {saves['peak_alloc_gib']} GiB (D/R {saves['d_over_r_peak']}), "
              f"allocated at the start {saves['start_alloc_gib']} GiB (R's reference copy: {saves['ref_model_gib']} GiB), "
              f"NVML {saves['nvml_gib']} GiB; D's tokens/s / R's {saves['d_over_r_tokens_per_s']}")
    else:
        print("ref_model=None saves: no figure (D or R has no row)")
    if same:
        print(f"D and R over {same['steps']} steps: max |loss D - loss R| {same['max_abs_loss_diff']}, "
              f"max |reward D - reward R| {same['max_abs_reward_diff']}")
    if speed:
        print(f"DPO beside SFT: D's tokens/s / S's {speed['d_over_s_tokens_per_s']}, pairs/s / rows/s "
              f"{speed['d_over_s_pairs_per_s']}; D's peak minus S's {speed['d_minus_s_peak_alloc_gib']} GiB")
    else:
        print("DPO beside SFT: no figure (D or S has no row)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny model, short pairs, few steps")
    parser.add_argument("--model", type=Path, default=None,
                        help=f"model folder: reused when it holds a model, else the 7B-shaped one is built there "
                             f"(default {DEFAULT_MODEL}; --smoke: the tiny model, built once into {SMOKE_HOME})")
    parser.add_argument("--budget", type=float, default=500.0,
                        help="seconds for the whole run, the build included; variants that would not fit are "
                             "skipped, one still running at the end is killed (default 500)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per run (default 2; smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 8; smoke 3)")
    parser.add_argument("--variants", default="S,D,R,F", help="which variants, in order (default S,D,R,F)")
    parser.add_argument("--four-bit", action="store_true",
                        help="--smoke in 4-bit NF4 on the CPU (bitsandbytes' CPU backend, fp32 compute): the "
                             "quantized loads of the GPU run, slowly")
    parser.add_argument("--in-process", action="store_true", help="run the variants in this process (smoke test)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default bench/results/train_dpo.json; --smoke: none)")
    parser.add_argument("--workdir", type=Path, default=None, help="pairs, logs and runs (default: a temp folder)")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_variant(json.loads(args.child.read_text(encoding="utf-8")))
        return 0
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant: {', '.join(unknown)}")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    args.steps = args.steps if args.steps is not None else (3 if args.smoke else 8)
    if args.out is None and not args.smoke:
        args.out = ROOT / "bench" / "results" / "train_dpo.json"
    bench = Bench(args)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qlw-dpo-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.smoke:
            from backend import tiny

            model = args.model or tiny.ensure_tiny_model(SMOKE_HOME)
        else:
            model = args.model or DEFAULT_MODEL
            build_model(Path(model).expanduser().resolve())
        model = Path(model).expanduser().resolve()
        from transformers import AutoTokenizer

        data = make_pairs(AutoTokenizer.from_pretrained(str(model)), workdir / "data", args.smoke)
        bench.meta = {"model": str(model), "warmup_steps": args.warmup, "timed_steps": args.steps,
                      "data": {k: v for k, v in data.items() if k != "path"},
                      "variants": {k: v for k, v in VARIANTS.items() if k in args.variants}}
        print(f"pairs: {data['pairs']}, prompt {data['prompt_tokens']} tokens, chosen/rejected {data['answer_tokens']} "
              f"tokens ({'exact' if data['exact'] else 'NOT the lengths asked: ' + str((data['prompt'], data['response']))}); "
              f"a DPO pair is {data['dpo_tokens_per_pair']:.0f} tokens (prompt twice), an SFT row "
              f"{data['sft_tokens_per_pair']:.0f}; batch {data['batch']} x grad_accum {data['ga']}, max_length "
              f"{data['max_length']}", flush=True)
        print(f"{args.warmup} warm-up + {args.steps} timed steps per run; budget {args.budget:.0f} s, "
              f"{bench.remaining():.0f} s left", flush=True)
        bench.run(data, str(model), workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(HEADER)
    for row in bench.rows:
        print(format_row(row))
    print("(tok/s: tokens of the batches per second, DPO: prompt+chosen and prompt+rejected; start/alloc: torch's "
          "allocated GiB when training starts / at its peak; nvml: the process's most, GiB; margin: rewards/margins "
          "at the last step)")
    for s in bench.skipped:
        print(f"skipped: {s}")
    print_comparison(compare(bench.rows))
    print(f"\nelapsed {time.monotonic() - bench.t0:.0f} s" + (f"; wrote {args.out}" if args.out else ""), flush=True)
    return 0 if bench.rows and not any(r.get("error") for r in bench.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
