"""``train.validate``: a run config checked without training (:func:`validate_run`): field
errors, steps, trainable parameters, LoRA targets that match nothing, and a memory estimate
(:func:`estimate_memory`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from backend import protocol as P, speed, train_config as TC
from backend.jobs import JobError
from backend.train_config import is_embedded_model, model_settings
from backend.train.checks import GIB, MIB, _field_of, effective_config, preflight
from backend.train import launch
from backend.train.report import lora_config


# Validation (train.validate) -------------------------------------------------------------------------------


#: Bytes of optimizer state per trainable parameter (two moments; 8-bit ones take a byte each).
OPTIMIZER_STATE_BYTES = {
    "paged_adamw_8bit": 2, "adamw_8bit": 2, "paged_adamw_32bit": 8, "adamw_torch": 8,
    "adamw_torch_fused": 8, "adamw_bnb_8bit": 2, "paged_adamw": 8, "adafactor": 1, "sgd": 0,
}
#: Activation bytes per token and layer, in units of hidden_size, without checkpointing: about 34
#: for a 16-bit transformer block with fused (sdpa) attention (Korthikanti et al. 2022), plus what
#: LoRA keeps: each adapted projection's (dropped-out) input and its dropout mask. Measured on an
#: H100 (bench/README.md, issue 14, 2026-12-07; Mistral-7B shape, r=16 on all seven projections,
#: compiled layers): 51-57 from the peaks of 4,096-, 2,048- and 8,192-token micro-steps; 34 had
#: the estimate 20-44% low, and a plan chosen on it ran at the card's limit.
ACTIVATION_FACTOR = 58
#: With gradient checkpointing each layer keeps its 16-bit input (2) and one layer is recomputed.
CHECKPOINTED_FACTOR = 2


def estimate_memory(eff: dict[str, Any], est: dict[str, Any], trainable: int | None) -> dict[str, Any]:
    """A rough training-memory estimate: the model (``models.estimate``), the LoRA weights, their
    gradients and optimizer states, activations and logits, against the device's free memory."""
    m, t, d = eff["model"], eff["training"], eff["data"]
    quantized = m["precision"] in ("4bit", "8bit")
    compute = {"4bit": m["compute_dtype"], "8bit": "fp16"}.get(m["precision"], m["precision"])
    act_bytes = 4 if compute == "fp32" else 2
    # trl casts LoRA weights of quantized models to bf16; peft keeps them in fp32 otherwise.
    lora_bytes = 2 if quantized else 4
    n = trainable or 0
    # A preference pair is two sequences in one forward (chosen and rejected; KTO: a completion
    # and its KL counterpart), and the reference pass runs without gradients beside them.
    sequences = 1 if eff.get("method", "sft") == "sft" else 2
    tokens = t["per_device_train_batch_size"] * d["max_length"] * sequences
    hidden, layers, vocab = est.get("hidden_size") or 0, est.get("layers") or 0, est.get("vocab_size") or 0
    per_token_layer = hidden * (act_bytes // 2)
    if t["gradient_checkpointing"]:
        activations = tokens * per_token_layer * (CHECKPOINTED_FACTOR * layers + ACTIVATION_FACTOR)
    else:
        activations = tokens * per_token_layer * ACTIVATION_FACTOR * layers
    parts = {
        "model": int(est["total_bytes"]),
        "lora_weights": n * lora_bytes,
        "gradients": n * lora_bytes,
        "optimizer_states": n * OPTIMIZER_STATE_BYTES.get(t["optim"], 8),
        "activations": int(activations),
        "logits": int(tokens * vocab * 4 * 2),  # fp32 logits for the loss, and their gradient
        "cuda_context": int(est.get("context_bytes") or 0),
    }
    total = sum(parts.values())
    free = int(est["free_bytes"])
    from backend import models

    return {"total_bytes": total, "free_bytes": free, "device": est["device"],
            "device_name": est.get("device_name", est["device"]), "verdict": models.verdict(total, free),
            "parts": parts, "rough": True}


def count_trainable(settings: P.ModelSettings, lora: dict[str, Any]) -> tuple[int, int]:
    """``(trainable, total)`` parameters as peft counts them, on the model built on the meta
    device from config.json (no weights, no memory; the held model is not touched)."""
    from backend import models

    src = models.resolve_source(settings)
    models.import_ml_stack()
    raw, where = models.read_config_json(src)
    meta = models._build_meta_model(raw, where, src, settings.trust_remote_code)
    from peft import get_peft_model

    peft_model = get_peft_model(meta, lora_config(lora))
    trainable, total = peft_model.get_nb_trainable_parameters()
    return int(trainable), int(total)


def unmatched_targets(settings: P.ModelSettings, lora: dict[str, Any]) -> list[str]:
    """Names in a ``target_modules`` list that match no module of the model (peft only refuses
    a list of which none matches)."""
    targets = lora["target_modules"]
    if not isinstance(targets, list):
        return []
    from backend import models

    src = models.resolve_source(settings)
    raw, where = models.read_config_json(src)
    meta = models._build_meta_model(raw, where, src, settings.trust_remote_code)
    names = [n for n, _ in meta.named_modules()]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def train_rows(data: dict[str, Any], home: Path) -> int | None:
    """Rows of the train split (before formatting), when the source is open in this backend or a
    local file small enough to open now; None otherwise."""
    from backend import data as D

    try:
        settings = D.settings_from(data)
        opened = D.find_open(settings.source)
        if opened is None:
            res = D.resolve_source(settings.source)
            files = getattr(res, "files", None) or []
            if res.kind == "hub" or sum(Path(f).stat().st_size for f in files) > 64 * MIB:
                return None
            opened = D.open_source(settings.source, home)
        return int(D.split_counts(opened, settings)["train"])
    except Exception:
        return None


def steps_for(rows: int, t: dict[str, Any], processes: int = 1) -> int:
    """Optimizer steps as transformers counts them for ``rows`` training rows (each of ``processes``
    takes every N-th batch: accelerate's sharded sampler, even batches)."""
    if t["max_steps"] > 0:
        return t["max_steps"]
    batches = math.ceil(rows / (t["per_device_train_batch_size"] * max(processes, 1)))
    per_epoch = max(batches // t["gradient_accumulation_steps"] + int(batches % t["gradient_accumulation_steps"] > 0), 1)
    return math.ceil(t["num_train_epochs"] * per_epoch)


def hidden_table_warnings(t: dict[str, Any], total: int | None, at_most: int | None) -> dict[str, str]:
    """Warnings for a ``logging_steps`` (in whole steps) that leaves the loss table with only the
    last step's row: the run has fewer steps (``total``, exact; or ``at_most``, its bound before
    packing makes fewer)."""
    every = t.get("logging_steps")
    steps, bound = (total, "") if total is not None else (at_most, "at most ")
    if not isinstance(every, int) or every < 1 or steps is None or every <= max(steps // 2, 1):
        return {}
    return {"training.logging_steps": (
        f"logging_steps {every} with {bound}{steps} step(s): the loss table gets "
        f"{'only the last step' if every > steps else 'one row before the last step'} and no curve; "
        "use a fraction of the run (0.05: a row every 5% of the steps) or a smaller number")}


def validate_run(config: Any, home: Path) -> dict[str, Any]:
    """``train.validate``: the checked config, field errors and warnings, trainable parameters as
    peft counts them, a memory estimate against the device, and the number of steps."""
    checked = TC.validate(config)
    out: dict[str, Any] = {**checked, "effective": None, "trainable_params": None, "total_params": None,
                           "trainable_percent": None, "memory": None, "total_steps": None, "device": None,
                           "launch": None}
    if checked["errors"]:
        return out
    config = checked["config"]
    errors, warnings = dict(checked["errors"]), dict(checked["warnings"])
    try:
        eff, device, dev_errors, dev_warnings = effective_config(config)
    except JobError as exc:
        errors[_field_of(exc, "model.device")] = str(exc)
        out.update(ok=False, errors=errors)
        return out
    errors.update(dev_errors)
    warnings.update(dev_warnings)
    errors.update(preflight(eff, home))
    out.update(effective=eff, device=device)
    settings = model_settings(eff["model"], home)
    if is_embedded_model(config["model"]["source"], home) and not (Path(settings.source) / "config.json").is_file():
        warnings["model.source"] = "the embedded tiny model is built when training starts (about 10 s)"
    elif "model.source" not in errors:
        from backend import models

        try:
            est = models.estimate(settings)
        except JobError as exc:
            errors[_field_of(exc, "model.source")] = str(exc) + (f": {exc.hint}" if exc.hint else "")
            est = None
        if est is not None:
            try:
                trainable, total = count_trainable(settings, eff["lora"])
                out.update(trainable_params=trainable, total_params=total,
                           trainable_percent=round(100 * trainable / total, 4) if total else None)
            except ValueError as exc:  # peft: target modules not found, and the like
                errors["lora.target_modules"] = str(exc).split("\n")[0]
                trainable = None
            else:
                missing = unmatched_targets(settings, eff["lora"])
                if missing:
                    warnings["lora.target_modules"] = (f"{', '.join(missing)} match(es) no layer of this model: "
                                                       "only the others get an adapter")
            out["memory"] = estimate_memory(eff, est, trainable)
            quantized = eff["model"]["precision"] == "4bit"
            copy_bytes = 2 * int(est.get("quantized_parameters") or 0) if quantized else 0
            plan = speed.plan(
                eff["training"], device, tokens_per_sequence=int(eff["data"]["max_length"]),
                estimate=lambda t: estimate_memory({**eff, "training": t}, est, trainable)["total_bytes"],
                budget=speed.budget_bytes(eff["training"]["memory_budget"], int(est["free_bytes"])),
                copy_bytes=copy_bytes, quantized_4bit=quantized)
            out["speed"] = {**plan.as_dict(), "text": plan.describe()}
            if plan.estimate_bytes is not None:  # the footprint of the levers the run will take
                out["memory"] = estimate_memory({**eff, "training": plan.training(eff["training"])}, est, trainable)
                if plan.bf16_base:
                    out["memory"]["parts"]["bf16_weight_copy"] = copy_bytes
                    out["memory"]["total_bytes"] += copy_bytes
                    from backend import models

                    out["memory"]["verdict"] = models.verdict(out["memory"]["total_bytes"], out["memory"]["free_bytes"])
            if out["memory"]["verdict"] == "will not fit":
                warnings["memory"] = (f"about {out['memory']['total_bytes'] / GIB:.1f} GiB needed, "
                                      f"{out['memory']['free_bytes'] / GIB:.1f} GiB free on {device}: lower "
                                      "per_device_train_batch_size or max_length, or turn on gradient_checkpointing")
    data = dict(eff["data"])
    if not data["source"].get("path"):
        from backend import tiny

        data["source"] = {"path": str(tiny.sample_for(eff["method"])), "config": "", "split": ""}
    if not any(data["mapping"].values()):
        warnings["data.mapping"] = "no column is mapped: the mapping detected from the columns is used"
    rows = train_rows(data, home)
    method = eff.get("method", "sft")
    if rows is not None and method == "kto" and not (data["mapping"].get("response") and data["mapping"].get("label")):
        rows *= 2  # pairs, unpaired: a desirable and an undesirable row each
    n = launch.processes(eff)
    if rows is not None and not (eff["training"]["packing"] and method == "sft"):  # packing is SFT's only
        out["total_steps"] = steps_for(rows, eff["training"], n)
    elif eff["training"]["max_steps"] > 0:
        out["total_steps"] = eff["training"]["max_steps"]
    warnings.update(hidden_table_warnings(eff["training"], out["total_steps"],
                                          steps_for(rows, eff["training"], n) if rows is not None else None))
    out["launch"] = launch.plan(eff, device)  # issue 19: processes, strategy, the global batch
    out.update(ok=not errors, errors=errors, warnings=warnings)
    return out

