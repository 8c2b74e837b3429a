"""Training speed and memory (issue 8): qlw against the plain Hugging Face recipe, side by side.

    python bench/train_speed.py --model /tmp/qlw-7b --budget 540 --out $OUT/train_speed.json
                                        # GPU: one call, ~7-8 minutes (the 7B is built first when DIR has none)
    python bench/train_speed.py --smoke --in-process --passes 1       # CPU: the tiny model, ~40 s

One command runs every variant on two generated datasets, each variant in its own process (a
model reused across runs keeps gradient checkpointing on; Liger patches model classes for the
whole process), then A, B and C again in the reverse order (and each process's datasets in the
reverse order), and prints one table; the same rows go to ``bench/results/train_speed.json``
(rewritten after every row). ``L`` and ``S`` run once, at the end of the first pass, so that the
whole bench fits one device call (~460 s on an H100 with the model already built, ~500 s with
the build; ``--budget`` skips what would not fit, and a process still running when the budget
ends is killed).

Model: a Mistral-7B-v0.3-shaped model with random weights (``bench/train_smoke.make_7b``: built
on the GPU in a subprocess and saved, or reused from ``--model DIR`` when that folder holds one),
loaded back through the real 4-bit path (bitsandbytes nf4, double quantisation, bf16 compute,
sdpa attention); LoRA r=16, lora_alpha 16, dropout 0.05 on the seven linear projections
(q, k, v, o, gate, up, down); learning rate 2e-4 constant, no warmup, max_grad_norm 0.3, seed 42.

Datasets (seeded; rows are words that are one token each, so each row has an exact length in
tokens including the BOS and the EOS that trl adds):
- ``fixed``: 256 rows of exactly 1,024 tokens (max_length 1,024);
- ``mix``: 1,000 rows of a realistic instruction-data length mix (log-normal, median 180 tokens:
  most rows 50-400, 5% a tail of 600-2,048; max_length 2,048, so nothing is cut).

Variants:
- ``A`` the notebook recipe as a plain script calling trl directly (``SFTTrainer`` defaults:
  each batch padded, gradient checkpointing on; batch 4, ``paged_adamw_8bit``, sdpa);
- ``B`` qlw's defaults, through ``backend.train.run_training`` itself (what ``train.start`` and
  ``qlw train`` run), whatever ``TrainingSettings``' defaults are now;
- ``C`` qlw with every speed option on (packing, Liger's kernels when installed);
- ``L`` qlw's defaults in a low-memory setting (activation offloading, half the micro-batch and
  twice the accumulation), on ``fixed``;
- ``S`` ``B`` served: a real backend process (``python -m backend serve``) runs the job, a client
  is attached and the GPU is sampled every second, on ``mix``. Its figures come from the
  ``train.log`` events, and so do ``B``'s ``event_tokens_per_s``: the workbench cost is
  ``1 - S / B`` on those.

The same work per optimizer step: ``A`` takes 4 rows a step on ``fixed`` and 4 x 2 accumulated
rows on ``mix``. A packed variant takes as many ``max_length`` sequences per step as hold the
same number of tokens on average (``mix``: one packed sequence of 2,048 tokens ~ 8 rows of the
mean length; ``fixed``: 4 sequences of one row each); the table shows the useful tokens each
variant actually took per optimizer step. Useful tokens are the non-padding ones (trl's
``num_tokens``). Each run takes ``--warmup`` steps, then ``--steps`` timed ones (the step times
are taken at ``on_step_end`` after a CUDA synchronise). Memory: torch's peak allocated and
reserved bytes, and the most NVML reported for the process (the paged optimizer's states are
managed memory that torch's counters miss). The epoch column is the dataset's useful tokens at
the measured rate. Every process runs with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``
(what the backend sets), unless the caller sets it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
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

GIB = 2**30
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LEARNING_RATE = 2e-4
SEED = 42
DEFAULT_MODEL = Path("/tmp/qlw-7b")

#: name -> what the process runs; ``datasets``: where it runs (default both).
VARIANTS: dict[str, dict[str, Any]] = {
    "A": {"kind": "plain", "label": "plain trl recipe", "datasets": ("fixed", "mix")},
    "B": {"kind": "qlw", "label": "qlw defaults (speed fast)", "options": {}, "datasets": ("fixed", "mix", "big")},
    # speed fast with memory_budget = A's peak on fixed in this run (6.0 GiB until A has run).
    "M": {"kind": "qlw", "label": "qlw fast within A's peak", "options": {"memory_budget": "A"},
          "datasets": ("fixed",)},
    "N": {"kind": "qlw", "label": "qlw speed lean", "options": {"speed": "lean"}, "datasets": ("fixed",)},
    # Unsloth (FastLanguageModel + its SFT trainer) in a process of its own with its own site.
    "U": {"kind": "unsloth", "label": "Unsloth", "datasets": ("fixed", "mix", "big")},
    # qlw's path before the levers (speed manual: the switches as set), once.
    "P": {"kind": "qlw", "label": "qlw speed manual", "options": {"speed": "manual"}, "datasets": ("fixed", "mix"),
          "once": True},
    "C": {"kind": "qlw", "label": "qlw all speed options", "options": {"packing": True, "use_liger_kernel": True}},
    "L": {"kind": "qlw", "label": "qlw low memory", "options": {"activation_offloading": True}, "halve": True,
          "datasets": ("fixed",), "once": True},
    # Not run by default (--variants A,B,C,L,S,L1): the lowest-memory setting, one row per micro-step.
    "L1": {"kind": "qlw", "label": "qlw lowest memory", "options": {"activation_offloading": True}, "quarter": True,
           "datasets": ("fixed",), "once": True},
    "S": {"kind": "served", "label": "qlw defaults, served", "options": {}, "datasets": ("mix",), "once": True},
}
#: Rough seconds per variant process on an H100 (imports, loads and steps), until pass 1 measures them.
GPU_ESTIMATE = {"A": 65, "B": 110, "C": 50, "L": 35, "L1": 40, "S": 50, "M": 55, "N": 55, "U": 110, "P": 60}


def dataset_specs(smoke: bool) -> dict[str, dict[str, Any]]:
    """The two datasets and the plain recipe's batch on each (rows per micro-step, accumulation)."""
    if smoke:
        return {"fixed": {"rows": 48, "length": 64, "max_length": 64, "batch": 4, "ga": 1},
                "mix": {"rows": 160, "length": None, "max_length": 128, "batch": 4, "ga": 2},
                "big": {"rows": 160, "length": None, "max_length": 128, "batch": 4, "ga": 2, "packed_batch": 8,
                        "same_rows_as": "mix"}}
    # big: the mix's rows with about as many tokens a step as Unsloth's packing takes at A's batch
    # (batch 4 x accumulation 2 packed by Unsloth: ~15,500); qlw packs 8 sequences of 2,048.
    return {"fixed": {"rows": 256, "length": 1024, "max_length": 1024, "batch": 4, "ga": 1},
            "mix": {"rows": 1000, "length": None, "max_length": 2048, "batch": 4, "ga": 2},
            "big": {"rows": 1000, "length": None, "max_length": 2048, "batch": 4, "ga": 2, "packed_batch": 8,
                    "same_rows_as": "mix"}}


# Data --------------------------------------------------------------------------------------------------


def one_token_words(tokenizer) -> list[str]:
    """Words that the tokenizer keeps as one token after a space, whatever comes before."""
    vocab = tokenizer.get_vocab()
    candidates = sorted(t[1:] for t in vocab if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 2)
    base = len(tokenizer("x", add_special_tokens=False)["input_ids"])
    return [w for w in candidates if len(tokenizer("x " + w, add_special_tokens=False)["input_ids"]) == base + 1]


def mix_lengths(n: int, max_length: int, rng: random.Random) -> list[int]:
    """Instruction-data lengths: log-normal around 180 tokens (most 50-400), 5% a tail to max_length
    (on a 2,048 scale; scaled down with max_length for the smoke run)."""
    scale = max_length / 2048
    out = []
    for _ in range(n):
        if rng.random() < 0.05:
            length = rng.uniform(600, 2048)
        else:
            length = min(rng.lognormvariate(math.log(180), 0.6), 1400)
        out.append(int(min(max(length * scale, 12 if scale < 1 else 40), max_length)))
    return out


def make_datasets(tokenizer, folder: Path, smoke: bool) -> dict[str, dict[str, Any]]:
    """Writes ``fixed.jsonl`` and ``mix.jsonl`` ({"text": ...} rows); returns their specs with the
    token counts. A row's length counts the BOS the tokenizer adds and the EOS trl appends."""
    words = one_token_words(tokenizer)
    assert len(words) > 100, f"the tokenizer has too few one-token words ({len(words)})"
    special = len(tokenizer("", add_special_tokens=True)["input_ids"]) + 1  # BOS (if any) + trl's EOS
    specs = dataset_specs(smoke)
    folder.mkdir(parents=True, exist_ok=True)
    for name, spec in specs.items():
        if spec.get("same_rows_as"):
            continue
        rng = random.Random(f"{SEED}-{name}")
        lengths = [spec["length"]] * spec["rows"] if spec["length"] else mix_lengths(spec["rows"], spec["max_length"], rng)
        rows = ["".join(" " + rng.choice(words) for _ in range(n - special)) for n in lengths]
        for text, n in list(zip(rows, lengths))[:20]:  # the exact length holds
            got = len(tokenizer(text)["input_ids"]) + 1
            assert got == n, f"{name}: a row meant to be {n} tokens is {got}"
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows), encoding="utf-8")
        spec.update(name=name, path=str(path), tokens=sum(lengths), mean=sum(lengths) / len(lengths),
                    p50=sorted(lengths)[len(lengths) // 2], longest=max(lengths))
    for name, spec in specs.items():
        if spec.get("same_rows_as"):
            same = specs[spec["same_rows_as"]]
            spec.update({k: same[k] for k in ("path", "tokens", "mean", "p50", "longest")}, name=name)
    return specs


# What each variant runs -------------------------------------------------------------------------------------


def qlw_training_defaults() -> dict[str, Any]:
    from backend import train_config as TC

    return TC.defaults()["training"]


def plan(variant: str, ds: dict[str, Any]) -> dict[str, Any]:
    """The effective settings of ``variant`` on dataset ``ds``: the same work per optimizer step."""
    v = VARIANTS[variant]
    padded = "sdpa, causal (no padding)" if ds.get("length") else "sdpa, padding mask"
    if v["kind"] == "plain":
        return {"packing": False, "use_liger_kernel": False, "activation_offloading": False,
                "gradient_checkpointing": True, "batch": ds["batch"], "ga": ds["ga"], "attention": padded}
    if v["kind"] == "unsloth":
        # fixed: padded (nothing to pad); mix: its padding-free default; big: its packing.
        return {"packing": ds["name"] == "big", "padding_free": None if ds["name"] == "mix" else False,
                "use_liger_kernel": False, "activation_offloading": False, "gradient_checkpointing": "unsloth",
                "batch": ds["batch"], "ga": ds["ga"],
                "attention": {"fixed": "padded batch", "mix": "its padding-free default",
                              "big": "its packing"}[ds["name"]]}
    t = {**qlw_training_defaults(), **{k: v for k, v in v.get("options", {}).items() if v != "A"}}
    batch, ga = ds["batch"], ds["ga"]
    if t["packing"] and ds.get("packed_batch"):
        batch, ga = ds["packed_batch"], 1
    elif t["packing"]:
        # Packed sequences per optimizer step holding the tokens of A's rows on average.
        per_step = ds["batch"] * ds["ga"] * ds["mean"]
        batch, ga = max(1, round(per_step / ds["max_length"])), 1
    if v.get("halve") and batch > 1:
        batch, ga = batch // 2, ga * 2
    if v.get("quarter") and batch > 1:
        batch, ga = max(1, batch // 4), ga * (batch // max(1, batch // 4))
    return {"packing": bool(t["packing"]), "use_liger_kernel": bool(t["use_liger_kernel"]),
            "activation_offloading": bool(t["activation_offloading"]), "speed": t["speed"],
            "memory_budget": v.get("options", {}).get("memory_budget", t["memory_budget"]),
            "gradient_checkpointing": bool(t["gradient_checkpointing"]), "batch": batch, "ga": ga,
            "attention": padded if not t["packing"] else ("sdpa, causal (equal rows stacked: train.stack_equal_rows)"
                                                          if ds.get("length") else "sdpa, block-diagonal mask (packed)")}


def liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


# Measuring -------------------------------------------------------------------------------------------------


_NVML_BASE: int | None = None


def note_nvml_base() -> None:
    """The device's used memory before this process touches CUDA (NvmlPeak's fallback baseline)."""
    global _NVML_BASE
    try:
        import pynvml

        pynvml.nvmlInit()
        index = int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0)
        _NVML_BASE = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used
    except Exception:
        _NVML_BASE = None


class NvmlPeak:
    """The most GPU memory NVML reports for ``pid`` (or, when NVML cannot see that pid in a
    container, the device's used memory above what it was at the start), sampled every 0.1 s."""

    def __init__(self, pid: int | None = None):
        self.pid = pid or os.getpid()
        self.peak_process = 0
        self.peak_device_delta = 0
        self._stop = threading.Event()
        self._thread = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0))
            # Before this process made its CUDA context (run_variant notes it), else now.
            self.base = _NVML_BASE if _NVML_BASE is not None else pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        except Exception:
            self.nvml = None

    def _sample(self) -> None:
        nv = self.nvml
        try:
            used = nv.nvmlDeviceGetMemoryInfo(self.handle).used
            self.peak_device_delta = max(self.peak_device_delta, used - self.base)
            for proc in nv.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if proc.pid == self.pid and proc.usedGpuMemory:
                    self.peak_process = max(self.peak_process, int(proc.usedGpuMemory))
        except Exception:
            pass

    def __enter__(self):
        if self.nvml is not None:
            def loop():
                while not self._stop.wait(0.1):
                    self._sample()
            self._thread = threading.Thread(target=loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._sample()

    def gib(self) -> float | None:
        if self.nvml is None:
            return None
        return round((self.peak_process or self.peak_device_delta) / GIB, 3)


def step_timer(cuda: bool):
    """A TrainerCallback keeping each step's end time (after a CUDA synchronise), trl's running
    count of useful tokens and each step's loss."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t: dict[int, float] = {}
            self.tokens: dict[int, float] = {}
            self.loss: dict[int, float] = {}
            self.counted: dict[int, float] = {}  # count_tokens, where a trainer logs no num_tokens
            self.peak_alloc = self.peak_reserved = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.t[int(state.global_step)] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.t[int(state.global_step)] = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            # Here, not after the run: qlw frees the run's memory and resets the peak counters.
            if cuda:
                self.peak_alloc = torch.cuda.max_memory_allocated()
                self.peak_reserved = torch.cuda.max_memory_reserved()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "num_tokens" in logs:
                self.tokens[int(state.global_step)] = float(logs["num_tokens"])
            if "loss" in logs:
                self.loss[int(state.global_step)] = float(logs["loss"])

    return StepTimer()


def timed_figures(t: dict[int, float], tokens: dict[int, float], warmup: int, last: int) -> dict[str, Any]:
    """Tokens/s and s/step over the steps after ``warmup`` up to ``last``."""
    if last not in t or warmup not in t or last not in tokens:
        return {"useful_tokens_per_s": None, "s_per_step": None, "tokens_per_step": None}
    span = t[last] - t[warmup]
    useful = tokens[last] - tokens.get(warmup, 0.0)
    steps = last - warmup
    return {"useful_tokens_per_s": round(useful / span, 1) if span > 0 else None,
            "s_per_step": round(span / steps, 4) if steps else None,
            "tokens_per_step": round(useful / steps, 1) if steps else None}


def event_figures(rows: dict[int, dict[str, Any]], warmup: int, last: int) -> dict[str, Any]:
    """The same from ``train.log`` events (what a served run can be measured with): each row's
    elapsed time and the tokens/s since the row before."""
    steps = [s for s in sorted(rows) if warmup < s <= last and rows[s].get("tokens_per_s") is not None]
    if not steps or warmup not in rows:
        return {"event_tokens_per_s": None, "event_s_per_step": None}
    tokens, prev = 0.0, rows[warmup]["elapsed_s"]
    for s in steps:
        tokens += rows[s]["tokens_per_s"] * (rows[s]["elapsed_s"] - prev)
        prev = rows[s]["elapsed_s"]
    span = rows[steps[-1]]["elapsed_s"] - rows[warmup]["elapsed_s"]
    return {"event_tokens_per_s": round(tokens / span, 1) if span > 0 else None,
            "event_s_per_step": round(span / len(steps), 4)}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "liger_kernel", "unsloth", "datasets"):
        try:
            from importlib.metadata import version

            out[name] = version(name.replace("_", "-"))
        except Exception:
            pass
    return out


# The runs (one variant, one dataset) -----------------------------------------------------------------------


def qlw_config(spec: dict[str, Any], ds: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    from backend import protocol as P, train_config as TC

    config = TC.defaults()
    smoke = spec["smoke"]
    config["name"] = f"train_speed {spec['variant']} {ds['name']}"
    config["model"].update(source=spec["model"], precision="fp32" if smoke else "4bit", quant_type="nf4",
                           double_quant=True, compute_dtype="fp32" if smoke else "bf16", attn_implementation="sdpa",
                           device="cpu" if smoke else "auto")
    config["data"].update(source={"path": ds["path"], "config": "", "split": ""},
                          mapping={**{r: "" for r in P.DATA_ROLES}, "text": "text"}, template="raw", loss="auto",
                          split_mode="none", seed=SEED, max_length=ds["max_length"])
    config["lora"].update(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=list(SEVEN), bias="none")
    options = {k: s[k] for k in ("packing", "use_liger_kernel", "activation_offloading", "speed")}
    budget = s.get("memory_budget") or 0.0
    options["memory_budget"] = float(spec.get("a_peak_gib") or 6.0) if budget == "A" else float(budget)
    config["training"].update(max_steps=spec["warmup"] + spec["steps"], per_device_train_batch_size=s["batch"],
                              gradient_accumulation_steps=s["ga"], learning_rate=LEARNING_RATE,
                              lr_scheduler_type="constant", warmup_ratio=0.0, warmup_steps=0, weight_decay=0.0,
                              max_grad_norm=0.3, logging_steps=1, eval_steps=0, save_steps=0, seed=SEED,
                              optim="adamw_torch" if smoke else "paged_adamw_8bit", **options)
    return config


def run_plain(spec: dict[str, Any], ds: dict[str, Any], s: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Variant A: what a user writes with the libraries alone (the notebook recipe)."""
    import dataclasses

    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    smoke, cuda = spec["smoke"], torch.cuda.is_available() and not spec["smoke"]
    if cuda:
        import gc

        gc.collect()  # the previous dataset's model and trainer, in this process
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    quant = None if smoke else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], quantization_config=quant, dtype=torch.float32 if smoke else torch.bfloat16,
        attn_implementation="sdpa", device_map={"": "cpu" if smoke else 0})
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    rows = datasets.load_dataset("json", data_files=ds["path"], split="train")
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = SFTConfig(
        output_dir=str(workdir / "plain-out"), max_steps=spec["warmup"] + spec["steps"],
        per_device_train_batch_size=s["batch"], gradient_accumulation_steps=s["ga"], learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch" if smoke else "paged_adamw_8bit",
        weight_decay=0.0, max_grad_norm=0.3, logging_steps=1, save_strategy="no", seed=SEED, bf16=not smoke,
        use_cpu=smoke, max_length=ds["max_length"], dataset_text_field="text", report_to="none", disable_tqdm=True,
        **{ckpt: True})
    timer = step_timer(cuda)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer, callbacks=[timer],
                         peft_config=LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=list(SEVEN),
                                                task_type="CAUSAL_LM"))
    count_tokens(trainer, timer)  # beside trl's num_tokens: checks the count U's figures rest on
    t0 = time.perf_counter()
    trainer.train()
    out = {"train_s": round(time.perf_counter() - t0, 2), "timer": timer}
    del trainer, model
    return out


def run_unsloth(spec: dict[str, Any], ds: dict[str, Any], s: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Variant U: Unsloth's recipe (``FastLanguageModel`` in 4-bit, its LoRA and its patched SFT
    trainer) with A's data, batch, optimizer and LoRA settings. Runs in a process whose path starts
    with Unsloth's own site (``--unsloth-site``: trl 1.15, datasets 4.x), never beside qlw."""
    import unsloth  # noqa: F401  (first: it patches transformers and trl as it is imported)
    from unsloth import FastLanguageModel

    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=spec["model"], max_seq_length=ds["max_length"], dtype=torch.bfloat16, load_in_4bit=True,
        use_exact_model_name=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=16, lora_dropout=0.05, target_modules=list(SEVEN), bias="none",
        use_gradient_checkpointing="unsloth", random_state=SEED)
    rows = datasets.load_dataset("json", data_files=ds["path"], split="train")
    extra: dict[str, Any] = {"packing": bool(s["packing"])}
    if s["padding_free"] is not None:
        extra["padding_free"] = s["padding_free"]
    args = SFTConfig(
        output_dir=str(workdir / "unsloth-out"), max_steps=spec["warmup"] + spec["steps"],
        per_device_train_batch_size=s["batch"], gradient_accumulation_steps=s["ga"], learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant", warmup_steps=0, optim="paged_adamw_8bit", weight_decay=0.0, max_grad_norm=0.3,
        logging_steps=1, save_strategy="no", seed=SEED, bf16=True, max_length=ds["max_length"],
        dataset_text_field="text", report_to="none", disable_tqdm=True, **extra)
    timer = step_timer(True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer, callbacks=[timer])
    count_tokens(trainer, timer)  # Unsloth's trainer logs no num_tokens
    t0 = time.perf_counter()
    trainer.train()
    out = {"train_s": round(time.perf_counter() - t0, 2), "timer": timer}
    if not timer.tokens and timer.counted:
        timer.tokens.update(timer.counted)
    elif not timer.tokens and ds["p50"] == ds["longest"] == ds["max_length"]:
        # Every row full length (fixed): the step's tokens are known without counting.
        per_step = s["batch"] * s["ga"] * ds["max_length"]
        timer.tokens.update({k: float(k * per_step) for k in timer.t})
    del trainer, model
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    return out


def count_tokens(trainer, timer) -> None:
    """Count each micro-batch's real tokens as the trainer takes it (attention mask, else every
    token: padding-free and packed batches have no padding), into ``timer.counted`` by step end,
    for trainers that log no ``num_tokens`` (trl's count, which the other variants use)."""
    original = trainer.training_step
    seen = {"n": 0.0}

    def training_step(model, inputs, *args, **kwargs):
        mask = inputs.get("attention_mask") if hasattr(inputs, "get") else None
        ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
        if mask is not None:
            seen["n"] += float(mask.sum())
        elif ids is not None:
            seen["n"] += float(ids.numel())
        return original(model, inputs, *args, **kwargs)

    trainer.training_step = training_step
    from transformers import TrainerCallback

    class Counted(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            timer.counted[int(state.global_step)] = seen["n"]

    trainer.add_callback(Counted())


def profiler_callback(at_step: int, label: str):
    """A TrainerCallback that profiles optimizer step ``at_step`` (CPU and CUDA) and prints where its
    time went: GPU kernel time by kind, the GPU's idle share of the step, the top kernels."""
    import torch
    from transformers import TrainerCallback

    class StepProfile(TrainerCallback):
        def __init__(self):
            self.prof = None
            self.summary: dict[str, Any] | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == at_step and self.prof is None:
                torch.cuda.synchronize()
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and self.summary is None:
                torch.cuda.synchronize()
                wall = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)
                self.summary = summarise_profile(self.prof, wall)
                emit("PROFILE", {"label": label, **self.summary})

    return StepProfile()


#: Kernel names by kind, first match wins (lower case).
KERNEL_KINDS = (
    ("4-bit dequantise", ("dequantize", "kdequant", "dequant")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "splitk", "cublas", "_mm", "matmul")),
    ("optimizer", ("adam", "optimizer", "multi_tensor", "foreach", "8bit_blockwise", "optimizer32bit")),
    ("loss / LM head", ("cross_entropy", "log_softmax", "logsumexp", "nll")),
    ("norms", ("rms", "norm")),
    ("copies", ("copy", "memcpy", "memset", "cat", "clone")),
    ("compiled fused (triton)", ("triton",)),
    ("elementwise / other", ("",)),
)


def summarise_profile(prof, wall_s: float) -> dict[str, Any]:
    import torch

    kinds: dict[str, float] = {k: 0.0 for k, _ in KERNEL_KINDS}
    kernels: dict[str, float] = {}
    busy = 0.0
    launches = 0
    for e in prof.events():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = float(getattr(e, "self_device_time_total", 0) or getattr(e, "device_time_total", 0) or 0)
        busy += us
        launches += 1
        name = e.name.lower()
        kernels[e.name[:90]] = kernels.get(e.name[:90], 0.0) + us
        for kind, keys in KERNEL_KINDS:
            if any(k in name for k in keys):
                kinds[kind] += us
                break
    wall_us = wall_s * 1e6
    return {"wall_s": round(wall_s, 4), "gpu_busy_s": round(busy / 1e6, 4),
            "gpu_idle_share": round(max(0.0, 1 - busy / wall_us), 3) if wall_us else None, "kernels": launches,
            "by_kind_s": {k: round(v / 1e6, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]) if v},
            "top_kernels_s": {k: round(v / 1e6, 4) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]}}


def run_qlw(spec: dict[str, Any], ds: dict[str, Any], s: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Variants B, C, L: ``backend.train.run_training``, as ``train.start`` and ``qlw train`` run it."""
    import torch

    from backend import train
    from sessions.store import Store

    cuda = torch.cuda.is_available() and not spec["smoke"]
    if cuda:
        import gc

        gc.collect()  # the previous dataset's model and trainer, in this process
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    home = workdir / "qlw-home"
    home.mkdir(parents=True, exist_ok=True)
    store = Store(home / "sessions.db")
    rows: dict[int, dict[str, Any]] = {}
    logs: list[str] = []

    def on_event(kind, payload):
        if kind == "train.log" and payload.get("loss") is not None:
            rows[payload["step"]] = payload
        elif kind == "log":
            logs.append(payload["message"])

    run = train.LocalRun(store, store.create_session(f"speed-{spec['variant']}-{ds['name']}").id, on_event)
    timer = step_timer(cuda)
    # The last warm-up step (after the first has compiled), so that the timed steps stay untouched.
    extra = ([profiler_callback(max(spec["warmup"], 1), f"{spec['variant']} {ds['name']}")]
             if spec.get("profile") and cuda and ds["name"] == "fixed" else [])
    t0 = time.perf_counter()
    # The profiler before the timer: its summary (seconds of Python) ends the warm-up, not the first timed step.
    result = train.run_training(qlw_config(spec, ds, s), home, run, callbacks=[*extra, timer])
    out = {"train_s": round(time.perf_counter() - t0, 2), "timer": timer, "result": result, "logs": logs,
           **event_figures(_event_rows(rows, timer), spec["warmup"], spec["warmup"] + spec["steps"])}
    store.close()
    return out


def _event_rows(rows: dict[int, dict[str, Any]], timer) -> dict[int, dict[str, Any]]:
    """``train.log`` rows by step, with the timed window's first step (the warm-up's last row)."""
    return {s: r for s, r in rows.items() if "elapsed_s" in r}


def run_served(spec: dict[str, Any], ds: dict[str, Any], s: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Variant S: a real backend process trains; this process is its attached client, and the
    backend samples the GPU every second while a client is attached."""
    import asyncio

    from backend import protocol as P
    from tui import client as C

    home = Path(tempfile.mkdtemp(prefix="qlw-s-", dir="/tmp"))  # short: a Unix socket path has 107 bytes
    os.environ["QLW_GPU_INTERVAL"] = "1"
    proc = C.spawn_backend(home)
    (workdir / "backend.pid").write_text(str(proc.pid), encoding="utf-8")  # killed by the parent if we are
    rows: dict[int, dict[str, Any]] = {}
    seen = {"gpu.sample": 0}
    done = {}

    async def main():
        conn = None
        for _ in range(600):
            try:
                conn = await C.Connection.open(P.socket_path(home), "bench", on_event)
                break
            except C.BackendUnavailable:
                if proc.poll() is not None:
                    raise RuntimeError(f"the backend exited ({proc.returncode}); see {C.backend_log_path(home)}")
                await asyncio.sleep(0.1)
        finished = asyncio.Event()

        def handle(ev):
            if ev.kind == "gpu.sample":
                seen["gpu.sample"] += 1
            elif ev.kind == "train.log" and ev.payload.get("loss") is not None:
                rows[ev.payload["step"]] = ev.payload
            elif ev.kind == "train.finished":
                done["result"] = ev.payload
            elif ev.kind in ("job.finished", "error"):
                done.setdefault(ev.kind, ev.payload)
                if ev.kind == "job.finished":
                    finished.set()

        handlers.append(handle)
        await conn.call(P.Attach())
        t0 = time.perf_counter()
        await conn.call(P.StartTraining(config=qlw_config(spec, ds, s)))
        await asyncio.wait_for(finished.wait(), timeout=1800)
        done["train_s"] = round(time.perf_counter() - t0, 2)
        try:
            await conn.call(P.Shutdown(graceful=False, timeout=5))
        except Exception:
            pass
        await conn.close()

    handlers: list = []

    def on_event(ev):
        for h in handlers:
            h(ev)

    with NvmlPeak(proc.pid) as nvml:
        try:
            asyncio.run(main())
        finally:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    result = done.get("result") or {}
    peak = result.get("peak_memory") or {}
    job = done.get("job.finished") or {}
    if job.get("status") not in (None, "done"):
        raise RuntimeError(f"the served run ended {job.get('status')}: {job.get('error')}")
    shutil.rmtree(home, ignore_errors=True)
    warm, last = spec["warmup"], spec["warmup"] + spec["steps"]
    ev = event_figures(_event_rows(rows, None), warm, last)
    return {"train_s": done.get("train_s"), "result": result, "nvml_gib": nvml.gib(),
            "peak_alloc_gib": round(peak["torch_peak_bytes"] / GIB, 3) if peak.get("torch_peak_bytes") else None,
            "peak_reserved_gib": None, "gpu_samples": seen["gpu.sample"],
            "losses": {st: r["loss"] for st, r in rows.items() if r.get("loss") is not None},
            "useful_tokens_per_s": ev["event_tokens_per_s"], "s_per_step": ev["event_s_per_step"], **ev}


def run_one(spec: dict[str, Any], ds: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """One variant on one dataset: the row of the table."""
    variant = VARIANTS[spec["variant"]]
    s = plan(spec["variant"], ds)
    if s["use_liger_kernel"] and (spec["smoke"] or not liger_installed()):
        s["use_liger_kernel"] = False  # what for_device does too (a warning in the run's log)
    emit("SETTINGS", {"variant": spec["variant"], "dataset": ds["name"], **s})
    kind = variant["kind"]
    row: dict[str, Any] = {"variant": spec["variant"], "label": variant["label"], "pass": spec["pass"],
                           "dataset": ds["name"], "settings": s}
    warm, last = spec["warmup"], spec["warmup"] + spec["steps"]
    if kind == "served":
        out = run_served(spec, ds, s, workdir)
        row.update({k: out[k] for k in ("useful_tokens_per_s", "s_per_step", "peak_alloc_gib", "peak_reserved_gib",
                                        "nvml_gib", "event_tokens_per_s", "event_s_per_step", "gpu_samples",
                                        "train_s")})
        losses = out["losses"]
        row["tokens_per_step"] = None
    else:
        import torch

        cuda = torch.cuda.is_available() and not spec["smoke"]
        runner = {"plain": run_plain, "qlw": run_qlw, "unsloth": run_unsloth}[kind]
        with NvmlPeak() as nvml:
            out = runner(spec, ds, s, workdir)
        timer = out["timer"]
        row.update(timed_figures(timer.t, timer.tokens, warm, last))
        if timer.counted and last in timer.counted and warm in timer.counted and spec["steps"]:
            row["tokens_counted_per_step"] = round((timer.counted[last] - timer.counted[warm]) / spec["steps"], 1)
        losses = timer.loss
        row.update(train_s=out["train_s"], nvml_gib=nvml.gib() if cuda else None,
                   peak_alloc_gib=round(timer.peak_alloc / GIB, 3) if timer.peak_alloc else None,
                   peak_reserved_gib=round(timer.peak_reserved / GIB, 3) if timer.peak_reserved else None)
        if kind == "qlw":
            row.update(event_tokens_per_s=out["event_tokens_per_s"], event_s_per_step=out["event_s_per_step"],
                       notes=out["logs"], speed_plan=out["result"].get("speed"))
            if out["result"].get("status") != "done":
                raise RuntimeError(f"the qlw run ended {out['result'].get('status')}")
    row["losses"] = [round(losses[k], 5) for k in sorted(losses)]
    row["final_loss"] = row["losses"][-1] if row["losses"] else None
    tps = row.get("useful_tokens_per_s")
    row["epoch_s"] = round(ds["tokens"] / tps, 1) if tps else None
    return row


def emit(kind: str, payload: dict[str, Any]) -> None:
    print(f"@@{kind} {json.dumps(payload, default=str)}", flush=True)


def run_variant(spec: dict[str, Any]) -> None:
    """A variant process: each of its datasets in turn; one @@RESULT line per row."""
    workdir = Path(spec["workdir"]) / f"{spec['variant']}-{spec['pass']}"
    workdir.mkdir(parents=True, exist_ok=True)
    if not spec.get("in_process"):
        note_nvml_base()
    if VARIANTS[spec["variant"]]["kind"] == "unsloth":
        import unsloth  # noqa: F401  (before transformers, in its own process)
    info = {"versions": versions(), "host": platform.node()}
    try:
        import torch

        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not spec["smoke"] else "cpu"
    except Exception:
        info["device"] = "?"
    for ds in spec["datasets"]:
        try:
            row = run_one(spec, ds, workdir)
        except Exception as exc:  # a failed row is a row of the table, not the end of the bench
            import traceback

            traceback.print_exc()
            row = {"variant": spec["variant"], "label": VARIANTS[spec["variant"]]["label"], "pass": spec["pass"],
                   "dataset": ds["name"], "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        emit("RESULT", {**row, **info})
        if spec.get("in_process"):
            from backend import models

            models.release_base_model()


# The parent: plan, run, print ------------------------------------------------------------------------------


COLUMNS = (("pass", 4, "{}"), ("variant", 7, "{}"), ("dataset", 7, "{}"), ("tok/s", 8, "{:,.0f}"),
           ("s/step", 7, "{:.3f}"), ("epoch s", 8, "{:,.0f}"), ("tok/step", 8, "{:,.0f}"),
           ("alloc", 6, "{:.2f}"), ("reserv", 6, "{:.2f}"), ("nvml", 6, "{:.2f}"), ("loss", 7, "{:.4f}"))
KEYS = {"tok/s": "useful_tokens_per_s", "s/step": "s_per_step", "epoch s": "epoch_s", "tok/step": "tokens_per_step",
        "alloc": "peak_alloc_gib", "reserv": "peak_reserved_gib", "nvml": "nvml_gib", "loss": "final_loss"}


def format_row(row: dict[str, Any]) -> str:
    if row.get("error"):
        return f"{row['pass']:>4}  {row['variant']:>7}  {row['dataset']:>7}  ERROR {row['error']}"
    cells = []
    for name, width, fmt in COLUMNS:
        value = row.get(KEYS.get(name, name))
        cells.append(f"{'—' if value is None else fmt.format(value):>{width}}")
    return "  ".join(cells)


HEADER = "  ".join(f"{name:>{width}}" for name, width, _ in COLUMNS)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the passes, ratios against A and U, and issue 14's targets."""
    def mean(variant, dataset, key):
        vals = [r[key] for r in rows if r["variant"] == variant and r["dataset"] == dataset and r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    def peak(variant, dataset, key):
        vals = [r[key] for r in rows if r["variant"] == variant and r["dataset"] == dataset and r.get(key) is not None]
        return max(vals) if vals else None

    out: dict[str, Any] = {"means": {}, "targets": []}
    for r in rows:
        key = f"{r['variant']}/{r['dataset']}"
        if key not in out["means"]:
            out["means"][key] = {"useful_tokens_per_s": mean(r["variant"], r["dataset"], "useful_tokens_per_s"),
                                 "tokens_per_step": mean(r["variant"], r["dataset"], "tokens_per_step"),
                                 "peak_alloc_gib": peak(r["variant"], r["dataset"], "peak_alloc_gib"),
                                 "nvml_gib": peak(r["variant"], r["dataset"], "nvml_gib"),
                                 "final_loss": mean(r["variant"], r["dataset"], "final_loss")}

    def ratio(a, b):
        return round(a / b, 3) if a is not None and b else None

    def speed(v, ds):
        return mean(v, ds, "useful_tokens_per_s")

    def mem(v, ds):
        return peak(v, ds, "peak_alloc_gib")

    def target(what, value, ok):
        out["targets"].append({"target": what, "value": value, "met": None if value is None else bool(ok(value))})

    target("fixed: B (fast) tokens/s >= 2.0x A", ratio(speed("B", "fixed"), speed("A", "fixed")), lambda v: v >= 2.0)
    target("fixed: B (fast) tokens/s >= 1.4x U", ratio(speed("B", "fixed"), speed("U", "fixed")), lambda v: v >= 1.4)
    target("fixed: M (fast within A's peak) peak alloc <= 1.0x A", ratio(mem("M", "fixed"), mem("A", "fixed")),
           lambda v: v <= 1.0)
    target("fixed: M tokens/s >= 1.4x A", ratio(speed("M", "fixed"), speed("A", "fixed")), lambda v: v >= 1.4)
    target("fixed: M tokens/s >= 1.0x U", ratio(speed("M", "fixed"), speed("U", "fixed")), lambda v: v >= 1.0)
    target("fixed: N (lean) peak alloc <= 0.75x A", ratio(mem("N", "fixed"), mem("A", "fixed")), lambda v: v <= 0.75)
    target("fixed: N (lean) tokens/s >= 1.0x A", ratio(speed("N", "fixed"), speed("A", "fixed")), lambda v: v >= 1.0)
    target("mix: B tokens/s >= 5x A (same tokens a step)", ratio(speed("B", "mix"), speed("A", "mix")),
           lambda v: v >= 5.0)
    target("mix: B tokens/s >= 2.5x U's padding-free default", ratio(speed("B", "mix"), speed("U", "mix")),
           lambda v: v >= 2.5)
    target("big: B tokens/s >= 1.0x U's packing (~15,500 tokens a step)", ratio(speed("B", "big"), speed("U", "big")),
           lambda v: v >= 1.0)
    target("fixed: U peak alloc vs A (info)", ratio(mem("U", "fixed"), mem("A", "fixed")), lambda v: True)
    target("fixed: P (qlw before the levers) tokens/s vs A (info)", ratio(speed("P", "fixed"), speed("A", "fixed")),
           lambda v: True)
    target("mix: S (served) tokens/s >= 0.98x B, both from train.log events",
           ratio(mean("S", "mix", "event_tokens_per_s"), mean("B", "mix", "event_tokens_per_s")), lambda v: v >= 0.98)
    out["targets"] = [t for t in out["targets"] if t["value"] is not None or "(info)" not in t["target"]]
    return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.durations: dict[str, float] = {}
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
               "versions": first.get("versions"), **self.meta, "rows": self.rows, "skipped": self.skipped,
               "summary": summary([r for r in self.rows if not r.get("error")]),
               "elapsed_s": round(time.monotonic() - self.t0, 1)}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
        tmp.replace(out)

    def take(self, line: str) -> None:
        if line.startswith("@@SETTINGS "):
            s = json.loads(line[len("@@SETTINGS "):])
            print(f"  {s['variant']} on {s['dataset']}: packing={s['packing']} attention={s['attention']} "
                  f"checkpointing={s['gradient_checkpointing']} batch={s['batch']} x grad_accum={s['ga']} "
                  f"liger={s['use_liger_kernel']} offloading={s['activation_offloading']}", flush=True)
        elif line.startswith("@@PROFILE "):
            prof = json.loads(line[len("@@PROFILE "):])
            self.meta.setdefault("profiles", []).append(prof)
            print(f"  profile of one step of {prof['label']}: {prof['wall_s']:.3f} s wall, GPU busy "
                  f"{prof['gpu_busy_s']:.3f} s (idle {prof['gpu_idle_share']:.0%}), {prof['kernels']} kernels; "
                  + ", ".join(f"{k} {v:.3f}" for k, v in prof["by_kind_s"].items()), flush=True)
            self.write()
        elif line.startswith("@@RESULT "):
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
        if VARIANTS[spec["variant"]]["kind"] == "unsloth":
            # Unsloth's own site first (its trl/datasets), and not qlw's wheels.
            env["PYTHONPATH"] = os.pathsep.join((str(self.args.unsloth_site), str(ROOT)))
            env.update(UNSLOTH_DISABLE_STATISTICS="1", HF_DATASETS_OFFLINE="1")
        else:
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
        pidfile = Path(spec["workdir"]) / f"{spec['variant']}-{spec['pass']}" / "backend.pid"
        if proc.returncode != 0 and pidfile.is_file():  # a served run cut off: its backend has its own session
            try:
                os.killpg(int(pidfile.read_text()), 9)
            except (OSError, ValueError):
                pass
        if proc.returncode != 0:
            print(f"  ({spec['variant']} pass {spec['pass']}: process exit {proc.returncode}; log {log})", flush=True)
            tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            print("    " + "\n    ".join(tail), flush=True)

    def run(self, order: list[list[str]], specs: dict[str, dict[str, Any]], model: str, workdir: Path,
            first_pass: int = 1) -> None:
        logs = workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        print(HEADER, flush=True)
        for p, variants in enumerate(order, first_pass):
            for name in variants:
                if p > 1 and VARIANTS[name].get("once"):
                    continue  # L and S: one run each, to keep the whole bench in one device call
                wanted = VARIANTS[name].get("datasets", ("fixed", "mix"))
                names = [d for d in self.args.datasets if d in wanted]
                if p % 2 == 0:
                    names.reverse()
                if not names:
                    continue
                if VARIANTS[name]["kind"] == "unsloth" and not (Path(self.args.unsloth_site) / "unsloth").is_dir():
                    self.skipped.append(f"{name} pass {p}: no Unsloth site at {self.args.unsloth_site} "
                                        "(../shared/gpu/unsloth-site.sh builds it)")
                    print(f"  skipped: {self.skipped[-1]}", flush=True)
                    continue
                a_peak = [r.get("peak_alloc_gib") for r in self.rows
                          if r["variant"] == "A" and r["dataset"] == "fixed" and r.get("peak_alloc_gib")]
                spec = {"variant": name, "pass": p, "datasets": [specs[d] for d in names], "model": model,
                        "smoke": self.args.smoke, "warmup": self.args.warmup, "steps": self.args.steps,
                        "workdir": str(workdir), "in_process": self.args.in_process,
                        "profile": self.args.profile and p == 1 and name in ("B", "P"),
                        "a_peak_gib": max(a_peak) if a_peak else None}
                estimate = self.durations.get(name, 0 if self.args.smoke else GPU_ESTIMATE.get(name, 60))
                if self.remaining() < estimate:
                    self.skipped.append(f"{name} pass {p} ({', '.join(names)}): {self.remaining():.0f} s of budget left, "
                                        f"needs about {estimate:.0f} s")
                    print(f"  skipped: {self.skipped[-1]}", flush=True)
                    self.write()
                    continue
                t = time.monotonic()
                if self.args.in_process:
                    run_in_process(spec, self)
                else:
                    self.run_process(spec, logs / f"{name}-{p}.log")
                self.durations[name] = time.monotonic() - t
        self.write()


def run_in_process(spec: dict[str, Any], bench: Bench) -> None:
    """The smoke test's shortcut: a variant in this process (no GPU, nothing patched process-wide
    on the CPU), its lines taken as a child's would be."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        spec = {**spec, "in_process": True}
        run_variant(spec)
    for line in buf.getvalue().splitlines():
        if line.startswith("@@"):
            bench.take(line)


def _kill(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass


def build_model(folder: Path) -> None:
    """The 7B-shaped model, built and saved in a process of its own (its CUDA memory goes with it)."""
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        print(f"model: reusing {folder}", flush=True)
        return
    t = time.monotonic()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from bench.train_smoke import make_7b; "
                    "make_7b(Path(sys.argv[1]))", str(folder)], check=True, env=env, cwd=str(ROOT))
    print(f"model: built {folder} in {time.monotonic() - t:.0f} s", flush=True)


def equality_report(bench: "Bench", args) -> int:
    """A's and B's logged losses step by step (the same seed, rows and batches)."""
    by = {r["variant"]: r for r in bench.rows if not r.get("error")}
    if "A" not in by or "B" not in by:
        print("equality: A or B has no row")
        return 1
    a, b = by["A"]["losses"], by["B"]["losses"]
    n = min(len(a), len(b))
    diffs = [abs(x - y) for x, y in zip(a[:n], b[:n])]
    doc = {"steps": n, "max_abs_diff": round(max(diffs), 5) if diffs else None, "tolerance": 2e-2,
           "met": bool(diffs) and max(diffs) <= 2e-2 and n == args.steps, "a_losses": a, "b_losses": b,
           "b_speed_plan": by["B"].get("speed_plan"), "device": by["A"].get("device"), "host": by["A"].get("host")}
    bench.meta["equality"] = doc
    bench.write()
    print(f"\nequality over {n} steps: max |loss A - loss B| = {doc['max_abs_diff']} (tolerance 2e-2: "
          f"{'met' if doc['met'] else 'NOT met'}); first {a[:3]} / {b[:3]}, last {a[-1:]} / {b[-1:]}", flush=True)
    return 0 if doc["met"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny model, small datasets, few steps")
    parser.add_argument("--model", type=Path, default=None,
                        help="model folder: reused when it holds a model, else the 7B-shaped one is built there "
                             f"(default {DEFAULT_MODEL}; --smoke: the embedded tiny model)")
    parser.add_argument("--budget", type=float, default=540.0,
                        help="seconds for the whole run; variants that would not fit are skipped (default 540)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per run (default 2; smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 6; smoke 2)")
    parser.add_argument("--variants", default="A,U,B,M,N,P", help="which variants, in pass-1 order (default A,U,B,M,N,P)")
    parser.add_argument("--datasets", default="fixed,mix,big", help="which datasets (default fixed,mix,big)")
    parser.add_argument("--passes", type=int, default=2, help="passes; even passes run in the reverse order (default 2)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the variants in this process (the CPU smoke test's shortcut; S's backend is still "
                             "a process of its own)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default bench/results/train_speed.json; --smoke: none)")
    parser.add_argument("--workdir", type=Path, default=None, help="datasets, logs and runs (default: a temp folder)")
    parser.add_argument("--unsloth-site", type=Path, default=Path("/tmp/usite/site"),
                        help="Unsloth's unpacked site for variant U (../shared/gpu/unsloth-site.sh; default /tmp/usite/site)")
    parser.add_argument("--profile", action="store_true", help="profile one step of B and P in pass 1 (torch.profiler)")
    parser.add_argument("--equality", type=int, default=0, metavar="STEPS",
                        help="instead of the speed table: A and B on fixed for STEPS steps from one seed, every "
                             "logged loss compared (written to bench/results/train_equality.json)")
    parser.add_argument("--prior", type=Path, default=None,
                        help="an earlier call's JSON (same host): its rows and profiles are kept, this call's passes "
                             "are numbered after them (pass 2 in the reverse order) and the summary covers both")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_variant(json.loads(args.child.read_text(encoding="utf-8")))
        return 0
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if args.equality:
        args.variants, args.datasets, args.passes, args.warmup, args.steps = ["A", "B"], ["fixed"], 1, 0, args.equality
        if args.out is None and not args.smoke:
            args.out = ROOT / "bench" / "results" / "train_equality.json"
    unknown = [v for v in args.variants if v not in VARIANTS] + [d for d in args.datasets if d not in ("fixed", "mix", "big")]
    if unknown:
        parser.error(f"unknown variant or dataset: {', '.join(unknown)}")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 6)
    if args.out is None and not args.smoke:
        args.out = ROOT / "bench" / "results" / "train_speed.json"
    bench = Bench(args)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qlw-speed-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.smoke:
            from backend import tiny

            model = args.model or tiny.ensure_tiny_model(workdir / "tiny-home")
        else:
            model = args.model or DEFAULT_MODEL
            build_model(Path(model).expanduser().resolve())
        model = Path(model).expanduser().resolve()
        from transformers import AutoTokenizer

        specs = make_datasets(AutoTokenizer.from_pretrained(str(model)), workdir / "data", args.smoke)
        bench.meta = {"model": str(model), "warmup_steps": args.warmup, "timed_steps": args.steps,
                      "datasets": {k: {x: v[x] for x in ("rows", "max_length", "tokens", "mean", "p50", "longest",
                                                         "batch", "ga")} for k, v in specs.items()},
                      "variants": {k: {x: v[x] for x in ("kind", "label") } | {"options": v.get("options", {})}
                                   for k, v in VARIANTS.items() if k in args.variants},
                      "qlw_training_defaults": qlw_training_defaults()}
        for name, s in specs.items():
            if name in args.datasets:
                print(f"dataset {name}: {s['rows']} rows, {s['tokens']:,} tokens (mean {s['mean']:.0f}, median "
                      f"{s['p50']}, longest {s['longest']}), max_length {s['max_length']}; A: batch {s['batch']} x "
                      f"grad_accum {s['ga']}", flush=True)
        print(f"{args.warmup} warm-up + {args.steps} timed steps per run; budget {args.budget:.0f} s, "
              f"{bench.remaining():.0f} s left", flush=True)
        first_pass = 1
        if args.prior:
            prior = json.loads(args.prior.read_text(encoding="utf-8"))
            bench.rows = list(prior.get("rows", []))
            if prior.get("profiles"):
                bench.meta["profiles"] = list(prior["profiles"])
            bench.meta["prior"] = {"file": str(args.prior), "date": prior.get("date"), "command": prior.get("command"),
                                   "device": prior.get("device"), "skipped": prior.get("skipped", [])}
            first_pass = max((int(r.get("pass", 1)) for r in bench.rows), default=0) + 1
            print(f"prior: {len(bench.rows)} rows from {args.prior} ({prior.get('date')}); this call is pass "
                  f"{first_pass}", flush=True)
        order = [list(args.variants) if p % 2 else list(reversed(args.variants))
                 for p in range(first_pass, first_pass + args.passes)]
        bench.run(order, specs, str(model), workdir, first_pass)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(HEADER)
    for row in sorted(bench.rows, key=lambda r: (r["dataset"], r["variant"], r["pass"])):
        print(format_row(row))
    for s in bench.skipped:
        print(f"skipped: {s}")
    if args.equality:
        return equality_report(bench, args)
    result = summary([r for r in bench.rows if not r.get("error")])
    print("\ntargets (means over the passes; memory: the larger peak):")
    for t in result["targets"]:
        mark = {True: "met", False: "NOT met", None: "no figure"}[t["met"]]
        print(f"  {t['target']}: {t['value'] if t['value'] is not None else '—'} ({mark})")
    print(f"\nelapsed {time.monotonic() - bench.t0:.0f} s" + (f"; wrote {args.out}" if args.out else ""), flush=True)
    return 0 if bench.rows and not any(r.get("error") for r in bench.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
