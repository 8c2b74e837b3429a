"""Training: a method's trl trainer (:mod:`backend.methods`: SFT, DPO, ORPO, KTO) with a peft LoRA
adapter on the held base model, in the job thread.

One function, :func:`run_training`, serves the ``train.start`` job and ``qlw train``; it adds
nothing to what trl computes (``tests/backend/test_train_equality.py`` and
``tests/backend/test_preference.py`` hold it to plain trl scripts, step for step):

- the run config is checked (:mod:`backend.train_config`) and adapted to the device (CPU: no
  paged/8-bit optimizer, fp32), errors keyed by field before anything heavy happens;
- the model is the one the backend holds when it is the one the config names, else it is loaded
  through :mod:`backend.models` (``model.source`` empty: the embedded tiny model, built first);
- the method (``method`` in the config) turns the prepared dataset into its trl rows, builds its
  trl config from the ``training`` section and its own section, and its trainer; everything else
  below is the same for every method;
- ``LoraConfig`` takes the ``lora`` section as peft names it;
- callbacks turn trl's logs into ``train.log`` rows (a step's training and evaluation logs merged:
  the training row first, the same step again when its ``eval_loss`` arrives), checkpoints into
  ``train.checkpoint``, and a stop request into a checkpoint and a clean end;
- a NaN or infinite loss is flagged on the step it appears (``train.alert``); CUDA out of memory
  ends the run cleanly (``train.alert`` kind ``oom`` with the step, the memory figures and what
  to change, ``train.finished`` status ``failed``), frees what the run allocated and keeps the
  base model and the backend.

Checkpoints go to ``<home>/runs/<session>/checkpoints/checkpoint-<step>`` (adapter, optimizer,
scheduler, RNG and trainer state: ``resume_from`` continues the same loss curve), the final
adapter to ``<home>/runs/<session>/adapter`` (safetensors, with the tokenizer), the config to
``<home>/runs/<session>/config.toml``.

A test seam: ``QLW_TRAIN_FAULT=oom@N`` (or ``nan@N``, ``inf@N``) makes the next run of this process
raise ``torch.OutOfMemoryError`` (or produce a NaN/inf loss) on step N; it is read once and
cleared, so a backend started with it fails one run and trains normally after.

Nothing heavy is imported at module level: the server imports this module lazily, but cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from backend import methods, protocol as P, speed, train_config as TC, watch
from backend.holdings import HOLDINGS, Holdings
from backend.jobs import JobCancelled, JobError, print_job_error
from backend.methods import base as methods_base

FAULT_ENV = methods_base.FAULT_ENV
MIB = 1024 * 1024
GIB = 1024 * MIB

#: Bytes of optimizer state per trainable parameter (two moments; 8-bit ones take a byte each).
OPTIMIZER_STATE_BYTES = {
    "paged_adamw_8bit": 2, "adamw_8bit": 2, "paged_adamw_32bit": 8, "adamw_torch": 8,
    "adamw_torch_fused": 8, "adafactor": 1, "sgd": 0,
}
#: Activation bytes per token and layer, in units of hidden_size, for a 16-bit transformer block
#: with fused (sdpa) attention: about 34 without checkpointing (Korthikanti et al. 2022); with
#: gradient checkpointing each layer keeps its 16-bit input (2) and one layer is recomputed.
ACTIVATION_FACTOR = 34
CHECKPOINTED_FACTOR = 2


# Where things go ------------------------------------------------------------------------------------


_SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def run_dir(home: Path, session: str) -> Path:
    """``<home>/runs/<session>``: checkpoints/, adapter/, config.toml. A session id is one plain
    path component (the store makes them): anything else ("..", "a/b") could reach outside runs/."""
    if not _SESSION_NAME.fullmatch(session or "") or ".." in session:
        raise JobError(f"{session!r} is not a session id", where="session",
                       hint="use an id from sessions.list (letters, digits, '-', '_' and '.')")
    return Path(home) / "runs" / session


def parse_fault(text: str | None) -> tuple[str, int] | None:
    """``"oom@3"`` -> ``("oom", 3)``; None for empty or malformed text."""
    m = re.fullmatch(r"\s*(oom|nan|inf)\s*@\s*(\d+)\s*", text or "")
    return (m.group(1), int(m.group(2))) if m else None


def take_fault() -> tuple[str, int] | None:
    """The fault the environment asks for, once per process."""
    return parse_fault(os.environ.pop(FAULT_ENV, None))


# Resolving the model and the data ---------------------------------------------------------------------


def tiny_path(home: Path) -> Path:
    from backend import tiny

    return tiny.tiny_model_path(home)


def is_embedded_model(source: str, home: Path) -> bool:
    """True for the embedded tiny model: an empty source, its id, or its folder."""
    from backend import tiny

    s = source.strip()
    if not s or s == tiny.TINY_MODEL_ID:
        return True
    try:
        return Path(s).expanduser().resolve() == tiny_path(home).resolve()
    except OSError:
        return False


def model_settings(model: dict[str, Any], home: Path, build: bool = False, progress=None,
                   cancelled=None) -> P.ModelSettings:
    """The :class:`~backend.protocol.ModelSettings` of a config's model section, with the embedded
    tiny model's folder for an empty source (built first when ``build``)."""
    from backend import tiny

    source = model["source"]
    if is_embedded_model(source, home):
        if build:
            report = progress or (lambda stage, done, total: None)
            try:
                source = str(tiny.ensure_tiny_model(
                    home, progress=lambda st, d, t: report(f"tiny model: {st}", d, t), cancelled=cancelled))
            except tiny.TinyBuildCancelled:
                raise JobCancelled() from None
        else:
            source = str(tiny_path(home))
    return P.ModelSettings(**{**model, "source": source})


def data_settings(data: dict[str, Any], home: Path, progress=None, cancelled=None,
                  method: str = "sft") -> tuple[dict[str, Any], list[str]]:
    """The prepared-data settings of a config's data section: the shipped sample of the method
    (instructions for SFT, preference pairs otherwise) for an empty path, and the detected column
    mapping when no role is mapped. Returns notes too."""
    from backend import data as D, tiny

    notes = []
    settings = json.loads(json.dumps(data))
    if not settings["source"].get("path"):
        settings["source"] = {"path": str(tiny.sample_for(method)), "config": "", "split": ""}
    if not any((settings.get("mapping") or {}).values()):
        opened = D.open_source(settings["source"], home, progress, cancelled)
        settings["mapping"] = dict(opened.summary["mapping"])
        mapped = ", ".join(f"{r} <- {c}" for r, c in settings["mapping"].items() if c) or "nothing"
        notes.append(f"no column mapping given: using the detected one ({opened.summary['shape']}: {mapped})")
    return settings, notes


def resolve_device(model: dict[str, Any]) -> str:
    """``cpu`` or ``cuda:N`` for the model section's device; JobError keyed ``model.device``."""
    from backend import models

    try:
        return models.resolve_device(model["device"])
    except JobError as exc:
        raise JobError(str(exc), where="model.device", hint=exc.hint) from None


def bf16_supported(device: str) -> bool | None:
    """Whether a CUDA device computes in bf16 (compute capability 8.0+), without creating a CUDA
    context; None when unknown or on the CPU."""
    if not device.startswith("cuda"):
        return None
    index = int(device.split(":")[1]) if ":" in device else 0
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return bool(torch.cuda.get_device_capability(index) >= (8, 0))
    try:
        import pynvml

        from backend import models

        pynvml.nvmlInit()
        nvml_index = models._visible_nvml_indices(pynvml.nvmlDeviceGetCount())[index]
        major, _minor = pynvml.nvmlDeviceGetCudaComputeCapability(pynvml.nvmlDeviceGetHandleByIndex(nvml_index))
        return major >= 8
    except Exception:
        return None


def effective_config(config: dict[str, Any]) -> tuple[dict[str, Any], str, dict[str, str], dict[str, str]]:
    """``(effective config, device, errors, warnings)``: the checked config adapted to its device."""
    device = resolve_device(config["model"])
    eff, errors, warnings = TC.for_device(config, device, bf16_supported(device))
    return eff, device, errors, warnings


def preflight(config: dict[str, Any], home: Path) -> dict[str, str]:
    """Cheap checks before a run is accepted, keyed by field: the model folder or Hub id and the
    dataset exist (nothing heavy is imported; an uncached Hub id fails at once offline)."""
    from backend import data as D, models

    errors: dict[str, str] = {}
    if not is_embedded_model(config["model"]["source"], home):
        try:
            models.resolve_source(P.ModelSettings(**config["model"]))
        except JobError as exc:
            errors["model.source"] = str(exc) + (f": {exc.hint}" if exc.hint else "")
    method = config.get("method", "sft")
    if method in P.METHOD_SETTINGS:
        from backend.methods.preference import check_start_adapter

        why = check_start_adapter(config[method]["start_adapter"])
        if why:
            errors[f"{method}.start_adapter"] = why
    if config["data"]["source"].get("path"):
        try:
            D.resolve_source(config["data"]["source"])
        except JobError as exc:
            errors["data.source"] = str(exc) + (f": {exc.hint}" if exc.hint else "")
    return errors


def check_resume(path: str, config: dict[str, Any]) -> Path:
    """The checkpoint folder to resume from, checked: it exists, holds a trainer state and an
    adapter whose shape the config's LoRA settings can load. JobError keyed ``resume_from``."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise JobError(f"no checkpoint folder at {p}", where="resume_from",
                       hint="pick one from the checkpoints list (train.checkpoints)")
    if not (p / "trainer_state.json").is_file():
        raise JobError(f"{p} is not a training checkpoint (no trainer_state.json)", where="resume_from",
                       hint="resume from a checkpoint-N folder, not from a final adapter")
    broken = "pick an earlier checkpoint from the checkpoints list (this one is incomplete or damaged)"
    try:
        state = json.loads((p / "trainer_state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            raise ValueError("no global_step")
    except (OSError, ValueError) as exc:
        raise JobError(f"{p / 'trainer_state.json'} is damaged ({exc})", where="resume_from", hint=broken) from None
    try:
        adapter = json.loads((p / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise JobError(f"{p} holds no LoRA adapter (adapter_config.json)", where="resume_from") from None
    if not isinstance(adapter, dict):
        raise JobError(f"{p / 'adapter_config.json'} is damaged (not a JSON object)", where="resume_from", hint=broken)
    from backend import adapters

    try:
        adapters.read_safetensors_header(p / adapters.WEIGHTS_FILE)
    except JobError as exc:
        raise JobError(f"the checkpoint's adapter weights are unusable: {exc}", where="resume_from", hint=broken) from None
    # transformers resumes silently with a fresh optimizer or schedule when these are missing:
    # the curve would jump. torch.save writes zip files: a cut-off one has no central directory.
    import zipfile

    for name in ("optimizer.pt", "scheduler.pt"):
        if not zipfile.is_zipfile(p / name):
            what = "missing" if not (p / name).exists() else "truncated or damaged"
            raise JobError(f"the checkpoint's {name} is {what}", where=f"resume_from: {p / name}", hint=broken)
    lora = config["lora"]
    method = config.get("method", "sft")
    if method in P.METHOD_SETTINGS and (config.get(method) or {}).get("start_adapter"):
        lora = {}  # the run trains the start adapter, with its own LoRA settings, not the lora section's
    for key in ("r", "use_dora"):
        if key in adapter and key in lora and adapter[key] != lora[key]:
            raise JobError(f"the checkpoint's adapter has {key} = {adapter[key]!r}, the config {lora[key]!r}",
                           where=f"lora.{key}", hint="resume with the LoRA settings the checkpoint was trained with")
    return p.resolve()


@dataclasses.dataclass
class CheckedRun:
    """A run config checked once, for the job: the normalised ``config`` (what the session records),
    the ``effective`` one adapted to ``device``, the ``warnings`` to report, and the checked
    checkpoint folder to resume from ("" for a fresh run)."""

    config: dict[str, Any]
    effective: dict[str, Any]
    device: str
    warnings: dict[str, str]
    resume_from: str = ""


def check_run(config: Any, home: Path, resume_from: str = "") -> CheckedRun:
    """Every check a run gets before it starts, in one place (the ``train.start`` handler, ``qlw
    train`` and :func:`run_training` itself): the fields, the device, the model and data sources,
    the method's start adapter and the checkpoint to resume from. Raises
    :class:`~backend.train_config.ConfigError` with every error keyed by field."""
    cfg, errors = TC.normalise(config)
    if errors:
        raise TC.ConfigError(errors)
    try:
        eff, device, errors, warnings = effective_config(cfg)
    except JobError as exc:
        raise TC.ConfigError({_field_of(exc, "model.device"): str(exc)}) from None
    if not errors:
        errors = preflight(cfg, home)
    if errors:
        raise TC.ConfigError(errors)
    resume = ""
    if resume_from:
        try:
            resume = str(check_resume(resume_from, eff))
        except JobError as exc:
            raise TC.ConfigError({exc.where or "resume_from": str(exc) + (f": {exc.hint}" if exc.hint else "")}) from None
    return CheckedRun(cfg, eff, device, warnings, resume)


# Checkpoints ----------------------------------------------------------------------------------------------


def checkpoint_info(path: Path, session: str) -> dict[str, Any] | None:
    """One checkpoint as ``train.checkpoints`` lists it (None if it is not a checkpoint)."""
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    loss = next((e["loss"] for e in reversed(state.get("log_history") or []) if "loss" in e), None)
    eval_loss = next((e["eval_loss"] for e in reversed(state.get("log_history") or []) if "eval_loss" in e), None)
    from backend.adapters import run_name

    return {"session": session, "name": run_name(path.parent.parent) if session else "",
            "step": int(state.get("global_step") or 0), "path": str(path),
            "created": state_file.stat().st_mtime, "loss": loss, "eval_loss": eval_loss,
            "max_steps": state.get("max_steps")}


def partial_checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders without a readable trainer state: a save that was cut off (the
    trainer writes ``trainer_state.json`` last), by a full disk or a killed process."""
    if not Path(output_dir).is_dir():
        return []
    return sorted(c for c in Path(output_dir).iterdir()
                  if c.is_dir() and c.name.startswith("checkpoint-") and checkpoint_info(c, "") is None)


def list_checkpoints(home: Path, session: str = "") -> list[dict[str, Any]]:
    """Checkpoints of ``session`` (every session when empty), newest first; partial ones are
    left out (see :func:`partial_checkpoints`)."""
    runs = Path(home) / "runs"
    sessions = [run_dir(home, session)] if session else (sorted(runs.iterdir()) if runs.is_dir() else [])
    out = []
    for folder in sessions:
        ckpts = folder / "checkpoints"
        if not ckpts.is_dir():
            continue
        for child in ckpts.iterdir():
            if child.is_dir() and child.name.startswith("checkpoint-"):
                info = checkpoint_info(child, folder.name)
                if info is not None:
                    out.append(info)
    out.sort(key=lambda c: (c["created"], c["step"]), reverse=True)
    return out


# Validation (train.validate) -------------------------------------------------------------------------------


def _field_of(exc: JobError, default: str) -> str:
    where = getattr(exc, "where", "") or ""
    if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", where):
        return where
    m = re.match(r"(source|revision|precision|device|attn_implementation|quant_type|compute_dtype)\b", where)
    return f"model.{m.group(1)}" if m else default


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


def steps_for(rows: int, t: dict[str, Any]) -> int:
    """Optimizer steps as transformers counts them for ``rows`` training rows."""
    if t["max_steps"] > 0:
        return t["max_steps"]
    batches = math.ceil(rows / t["per_device_train_batch_size"])
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
                           "trainable_percent": None, "memory": None, "total_steps": None, "device": None}
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
                planned = {**eff["training"], "gradient_checkpointing": plan.gradient_checkpointing,
                           "per_device_train_batch_size": plan.per_device_train_batch_size,
                           "gradient_accumulation_steps": plan.gradient_accumulation_steps}
                out["memory"] = estimate_memory({**eff, "training": planned}, est, trainable)
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
    if rows is not None and not (eff["training"]["packing"] and method == "sft"):  # packing is SFT's only
        out["total_steps"] = steps_for(rows, eff["training"])
    elif eff["training"]["max_steps"] > 0:
        out["total_steps"] = eff["training"]["max_steps"]
    warnings.update(hidden_table_warnings(eff["training"], out["total_steps"],
                                          steps_for(rows, eff["training"]) if rows is not None else None))
    out.update(ok=not errors, errors=errors, warnings=warnings)
    return out


# Building the trainer ------------------------------------------------------------------------------------


def lora_config(lora: dict[str, Any]):
    """peft's ``LoraConfig`` of the lora section (see :mod:`backend.methods.base`)."""
    return methods_base.lora_config(lora)


def stack_equal_rows(inputs: dict[str, Any]) -> dict[str, Any]:
    """SFT's stacking of equal-length packed rows (see :mod:`backend.methods.sft`)."""
    from backend.methods.sft import stack_equal_rows as stack

    return stack(inputs)


# Reporting ---------------------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class Reporter:
    """Turns the trainer's callbacks into ``train.*`` events and ``job.progress``."""

    def __init__(self, ctx, *, has_eval: bool, record_artifact: Callable[[str, str], None], config: dict[str, Any],
                 resumed_from: str, output_dir: Path, columns: tuple[str, ...] = ()):
        self.ctx = ctx
        #: The method's own log columns (trl's names), carried in each row's ``metrics``.
        self.columns = tuple(columns)
        self.has_eval = has_eval
        self.record_artifact = record_artifact
        self.config = config
        self.resumed_from = resumed_from
        self.output_dir = output_dir
        self.rows: dict[int, dict[str, Any]] = {}
        self.started = False
        self.total_steps = 0
        self.start_step = 0
        self.step = 0
        self.t0 = time.monotonic()
        self.t_begin = self.t0
        self.last_tokens: float | None = None
        self.last_time = self.t0
        self.first_tokens = None
        self.tokens_total = 0.0
        self.bad_loss: str | None = None
        self.last_checkpoint = ""
        self.trainable = 0
        self.total_params = 0
        self.summary: dict[str, Any] = {}

    # From the trainer --------------------------------------------------------------------------------

    def on_train_begin(self, state) -> None:
        self.total_steps = int(state.max_steps)
        self.start_step = self.step = int(state.global_step)
        self.t_begin = self.last_time = time.monotonic()
        self.started = True
        self.ctx.emit("train.started", {
            "job_id": self.ctx.job_id, "config": self.config, "total_steps": self.total_steps,
            "trainable_params": self.trainable, "total_params": self.total_params,
            "output_dir": str(self.output_dir), "resumed_from": self.resumed_from, "start_step": self.start_step})
        self.ctx.progress("training", self.step, self.total_steps, "steps")

    def on_step_end(self, state) -> None:
        self.step = int(state.global_step)
        self._progress()

    def _progress(self) -> None:
        loss = self.final("loss")
        self.ctx.progress("training", self.step, self.total_steps, "steps", "" if loss is None else f"loss {loss:.4f}")

    def watch(self, step: int, loss) -> None:
        """Every micro-step's loss: flag NaN/inf on the step it first appears."""
        value = float(loss.detach().float().item())
        kind = "nan" if math.isnan(value) else ("inf" if math.isinf(value) else None)
        if kind and kind != self.bad_loss:
            self.ctx.emit("train.alert", {
                "job_id": self.ctx.job_id, "kind": kind, "step": step,
                "message": f"the training loss is {value} at step {step}",
                "hint": "the run is diverging: stop it (ctrl+g) and lower learning_rate, keep max_grad_norm on "
                        "(e.g. 0.3), or check the rows of this batch; fp16 overflows where bf16 does not",
                "memory": {}})
        self.bad_loss = kind

    def on_log(self, state, logs: dict[str, Any]) -> None:
        step = int(state.global_step)
        now = time.monotonic()
        if "train_runtime" in logs or "train_loss" in logs:
            self.summary = dict(logs)
            return
        row = self.rows.get(step)
        if row is None:
            row = {"job_id": self.ctx.job_id, "step": step, "total_steps": self.total_steps, "epoch": 0.0,
                   "loss": None, "eval_loss": None, "learning_rate": None, "grad_norm": None,
                   "tokens_per_s": None, "elapsed_s": 0.0, "eta_s": None, "tokens_seen": None, "metrics": {}}
            self.rows[step] = row
        for name in self.columns:
            for key in (name, f"eval_{name}"):
                if key in logs:
                    row["metrics"][key] = _num(logs[key])
        row["epoch"] = round(_num(logs.get("epoch")) or row["epoch"] or 0.0, 4)
        if "eval_loss" in logs:
            row["eval_loss"] = _num(logs["eval_loss"])
        if "loss" in logs:
            row["loss"] = _num(logs["loss"])
            row["learning_rate"] = _num(logs.get("learning_rate"))
            row["grad_norm"] = _num(logs.get("grad_norm"))
            tokens = _num(logs.get("num_tokens"))
            if tokens is not None:
                if self.last_tokens is None or tokens < self.last_tokens:
                    self.last_tokens = 0.0  # trl counts from its trainer's creation
                dt = now - self.last_time
                if dt > 0:
                    row["tokens_per_s"] = round((tokens - self.last_tokens) / dt, 1)
                self.tokens_total += tokens - self.last_tokens
                self.last_tokens = tokens
                row["tokens_seen"] = self.tokens_total  # issue 18: curves by tokens seen
            self.last_time = now
        elapsed = now - self.t0
        row["elapsed_s"] = round(elapsed, 3)
        done = step - self.start_step
        if done > 0 and self.total_steps:
            row["eta_s"] = round((now - self.t_begin) / done * max(self.total_steps - step, 0), 1)
        self.ctx.emit("train.log", {**row, "metrics": dict(row["metrics"])})
        if "loss" in logs:
            self._progress()

    def on_save(self, state) -> None:
        path = self.output_dir / f"checkpoint-{int(state.global_step)}"
        self.last_checkpoint = str(path)
        self.ctx.emit("train.checkpoint", {"job_id": self.ctx.job_id, "step": int(state.global_step), "path": str(path)})
        self.record_artifact("checkpoint", str(path))

    # Summaries ---------------------------------------------------------------------------------------------

    def final(self, key: str) -> float | None:
        for step in sorted(self.rows, reverse=True):
            if self.rows[step].get(key) is not None:
                return self.rows[step][key]
        return None

    def tokens_per_s(self) -> float | None:
        span = self.last_time - self.t_begin
        return round(self.tokens_total / span, 1) if self.tokens_total and span > 0 else None


def make_callback(reporter: Reporter, ctx, has_eval: bool):
    """The TrainerCallback: reports, stops gracefully (checkpoint first) and evaluates and saves
    at the last step."""
    from transformers import TrainerCallback

    class QlwCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            reporter.on_train_begin(state)

        def on_step_end(self, args, state, control, **kwargs):
            reporter.on_step_end(state)
            if ctx.cancelled:
                # The stop the user asked for: save a checkpoint, then end the loop.
                control.should_save = True
                control.should_training_stop = True
            elif state.global_step >= state.max_steps:
                # The last step: its loss row, a checkpoint to continue from, and the final
                # validation loss, whatever logging_steps, save_steps and eval_steps say.
                control.should_log = True
                control.should_save = True
                if has_eval:
                    control.should_evaluate = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            reporter.on_log(state, logs or {})

        def on_save(self, args, state, control, **kwargs):
            reporter.on_save(state)

    return QlwCallback()


# The run -------------------------------------------------------------------------------------------------------


def _held_model_matches(settings: P.ModelSettings, device: str) -> bool:
    from backend import models

    info = models._LOADED
    if HOLDINGS.get("base") is None or not info or info.get("device") != device:
        return False
    held = info.get("settings") or {}

    def same_source(a: str, b: str) -> bool:
        pa, pb = Path(a).expanduser(), Path(b).expanduser()
        if pa.exists() and pb.exists():
            return pa.resolve() == pb.resolve()
        return a.strip() == b.strip()

    if not same_source(str(held.get("source", "")), settings.source):
        return False
    keys = ["revision", "precision", "attn_implementation", "trust_remote_code"]
    if settings.precision == "4bit":
        keys += ["quant_type", "double_quant", "compute_dtype"]
    return all(held.get(k) == getattr(settings, k) for k in keys)


def _memory_now(device: str) -> dict[str, Any]:
    from backend import models
    from backend.gpu import torch_memory

    out: dict[str, Any] = {"device": device, "torch": torch_memory()}
    try:
        mem = models.device_memory(device)
        out.update(free_bytes=mem.get("free_bytes"), total_bytes=mem.get("total_bytes"))
    except Exception:
        pass
    import psutil

    out["rss_bytes"] = int(psutil.Process().memory_info().rss)
    return out


def _restore_base(model) -> bool:
    """Take the adapter out of the held base model (peft's ``unload``, no merge) and undo what
    training turned on (gradient checkpointing, input gradients), so the next run or chat gets
    the base model as loaded. False when the model still carries LoRA layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for fn in ("gradient_checkpointing_disable", "disable_input_require_grads"):
        try:
            getattr(model, fn)()
        except Exception:  # never enabled, or another transformers: nothing to undo
            pass
    model.eval()
    return not any(isinstance(m, BaseTunerLayer) for m in model.modules())


def _free_run(box: Holdings, device: str) -> dict[str, Any]:
    from backend.gpu import GpuSampler, free_memory

    try:
        return free_memory(box, GpuSampler())
    except Exception as exc:  # freeing must not hide what happened in the run
        return {"error": f"{type(exc).__name__}: {exc}"}


def _as_job_error(exc: Exception) -> JobError:
    """A failure inside the trainer as a JobError for people; the traceback goes to the log."""
    import logging

    from backend.jobs import describe_exception

    info = describe_exception(exc)
    logging.getLogger("qlw.train").error("training failed: %s", info["detail"])
    if isinstance(exc, JobError):
        return type(exc)(str(exc), where=exc.where, hint=exc.hint)
    text = str(exc)
    if "Target modules" in text or "target_modules" in text:
        return JobError(f"peft: {text.splitlines()[0]}", where="lora.target_modules",
                        hint="choose names from the model's linear layers (model.inspect), or all-linear")
    return JobError(info["message"], where=info["where"], hint="see the backend log for the traceback")


def _disk_full(exc: BaseException) -> bool:
    """True for a write that failed for want of space (ENOSPC or EDQUOT, as OSError or as the
    RuntimeError torch.save and safetensors turn it into)."""
    import errno

    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    text = str(exc)
    return "No space left" in text or "Disk quota exceeded" in text or "file write failed" in text


def _save_failure(exc: BaseException, output_dir: Path, what: str = "") -> JobError | None:
    """A failed save as a JobError for people, after removing what it left half-written; None
    when ``exc`` was no failed save."""
    import shutil

    partial = partial_checkpoints(output_dir) if not what else []
    if not partial and not what:
        return None
    for folder in partial:
        shutil.rmtree(folder, ignore_errors=True)
    target = Path(what) if what else partial[-1]
    kept = [c for c in (checkpoint_info(c, "") for c in Path(output_dir).glob("checkpoint-*") if c.is_dir()) if c]
    last = max(kept, key=lambda c: c["step"], default=None)
    intact = f"; the last complete checkpoint, {Path(last['path']).name}, is intact" if last else ""
    if _disk_full(exc):
        try:
            free = f" ({shutil.disk_usage(target.parent).free / MIB:.0f} MiB free there)"
        except OSError:
            free = ""
        return JobError(f"disk full while saving {target.name} at {target}{free}: the run stopped{intact}",
                        where=str(target), hint="free space or lower save_total_limit, then resume from the last checkpoint")
    return JobError(f"saving {target.name} at {target} failed: {type(exc).__name__}: {exc}"[:600] + intact,
                    where=str(target), hint="the half-written folder was removed; see the backend log for the traceback")


def oom_hint(eff: dict[str, Any]) -> str:
    t, d, lora = eff["training"], eff["data"], eff["lora"]
    tips = []
    if t["per_device_train_batch_size"] > 1:
        b = t["per_device_train_batch_size"]
        tips.append(f"lower per_device_train_batch_size (now {b}; raise gradient_accumulation_steps to "
                    f"{t['gradient_accumulation_steps'] * 2} with batch {max(1, b // 2)} to keep the effective batch)")
    tips.append(f"lower data.max_length (now {d['max_length']})")
    if not t["gradient_checkpointing"]:
        tips.append("turn on gradient_checkpointing")
    if lora["r"] > 8:
        tips.append(f"a smaller lora.r (now {lora['r']})")
    if eff["model"]["precision"] not in ("4bit",):
        tips.append("load the model in 4-bit")
    return "; ".join(tips)


def plan_speed(eff: dict[str, Any], settings: P.ModelSettings, model, device: str) -> speed.SpeedPlan:
    """The run's speed levers (:mod:`backend.speed`) for the loaded ``model``, by the memory
    estimate the form shows; the levers that go through the trainer's arguments (checkpointing,
    micro-batch) are written into ``eff``'s training section."""
    t = eff["training"]
    estimate, budget, copy_bytes = None, None, 0
    if device.startswith("cuda"):
        import torch

        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        model_bytes = int(model.get_memory_footprint())
        free, _total = torch.cuda.mem_get_info(device)
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        est = {"total_bytes": model_bytes, "hidden_size": getattr(text, "hidden_size", 0) or 0,
               "layers": getattr(text, "num_hidden_layers", 0) or 0, "vocab_size": getattr(text, "vocab_size", 0) or 0,
               "free_bytes": int(free), "device": device, "context_bytes": 0}
        try:
            trainable = count_trainable(settings, eff["lora"])[0]
        except Exception:
            trainable = None
        estimate = lambda training: estimate_memory({**eff, "training": training}, est, trainable)["total_bytes"]  # noqa: E731
        budget = speed.budget_bytes(t.get("memory_budget", 0.0), int(free) + unused + model_bytes)
        copy_bytes = 2 * speed.four_bit_params(model)
    p = speed.plan(t, device, tokens_per_sequence=int(eff["data"]["max_length"]), estimate=estimate, budget=budget,
                   copy_bytes=copy_bytes, quantized_4bit=eff["model"]["precision"] == "4bit")
    if eff.get("method") == "kto" and p.per_device_train_batch_size != t["per_device_train_batch_size"]:
        # KTO's KL term is estimated from the other rows of a micro-batch: splitting it changes the
        # math, so the batch stays and checkpointing makes the room instead.
        p.per_device_train_batch_size, p.gradient_accumulation_steps = (t["per_device_train_batch_size"],
                                                                        t["gradient_accumulation_steps"])
        p.gradient_checkpointing = True
        p.reasons.append("kto: the micro-batch is not split (its KL term depends on it)")
    t.update(gradient_checkpointing=p.gradient_checkpointing, per_device_train_batch_size=p.per_device_train_batch_size,
             gradient_accumulation_steps=p.gradient_accumulation_steps)
    on = getattr(model, "is_activation_checkpointing", None)  # transformers 5.2x's name
    if on is None:
        on = getattr(model, "is_gradient_checkpointing", False)
    if not p.gradient_checkpointing and on:
        # A held model keeps it on from an earlier run (transformers 5.2x renamed the method).
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    return p


def run_training(config: dict[str, Any], home: Path, ctx, *, resume_from: str = "",
                 record_artifact: Callable[[str, str], None] | None = None,
                 set_config: Callable[[dict[str, Any]], None] | None = None,
                 fault: tuple[str, int] | None = None, callbacks: list | None = None,
                 checked: "CheckedRun | None" = None) -> dict[str, Any]:
    """Train ``config`` (a run config dict) in this thread, reporting through ``ctx`` (a
    :class:`~backend.jobs.JobContext` or anything with ``job_id``, ``session``, ``emit``,
    ``progress``, ``cancelled``, ``check_cancelled``). Returns the ``train.finished`` payload; a
    bad config, bad data or an out-of-memory end raise :class:`JobError`. ``callbacks``: extra
    ``TrainerCallback`` objects (bench/train_speed.py times the steps with one). ``checked``: the
    :func:`check_run` of ``config`` when the caller (the ``train.start`` handler) made it already."""
    home = Path(home)
    record = record_artifact or (lambda kind, path: None)
    run = checked if checked is not None else check_run(config, home, resume_from)
    cfg, eff, device, warnings, resume = run.config, run.effective, run.device, run.warnings, run.resume_from
    for key, text in warnings.items():
        ctx.emit("log", {"level": "warning", "message": f"{key}: {text}"})
    if set_config is not None:
        set_config(cfg)
    folder = run_dir(home, ctx.session)
    output_dir = folder / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(TC.dumps_toml(cfg), encoding="utf-8")
    record("config", str(folder / "config.toml"))
    guard = watch.Guard(eff, ctx, folder)  # issue 18: logs, the divergence stop, early stopping (backend/watch.py)
    progress = lambda st, d, t: ctx.progress(st, d, t)  # noqa: E731
    cancelled = lambda: ctx.cancelled  # noqa: E731

    # The data first: a bad source or mapping stops the run before anything is loaded.
    ctx.progress("preparing data", 0, 0)
    from backend import data as D, models

    data, notes = data_settings(eff["data"], home, progress, cancelled, method=eff["method"])
    for note in notes:
        ctx.emit("log", {"level": "info", "message": note})
    method = methods.get(eff["method"])
    prepared = method.prepare(data, eff, home, progress, cancelled,
                              log=lambda level, message: ctx.emit("log", {"level": level, "message": message}))
    if len(prepared.train) == 0:
        raise D.DataError("no training row could be formatted", where="data.mapping",
                          hint="check the mapping and the template in the Data pane (qlw data shows why rows fail)")
    ctx.check_cancelled()

    # The model: the held one when it is the one the config names, else loaded now.
    settings = model_settings(eff["model"], home, build=True, progress=progress, cancelled=cancelled)
    if not _held_model_matches(settings, device):
        models.load_job(P.LoadModel(**P.to_dict(settings)))(ctx)
    else:
        ctx.emit("log", {"level": "info", "message": f"training on the held base model ({settings.source})"})
    ctx.check_cancelled()
    model, tokenizer = HOLDINGS.get("base"), HOLDINGS.get("tokenizer")
    if tokenizer is None:
        raise JobError(f"{settings.source} has no tokenizer", where="model.source",
                       hint="give a model folder that holds the tokenizer files")
    if prepared.report["form"] == "messages" and not getattr(tokenizer, "chat_template", None):
        raise D.DataError("the chat template was chosen, but this model's tokenizer has none", where="data.template",
                          hint="choose the mistral, alpaca or raw template, or a model with a chat template")

    import torch

    has_eval = prepared.validation is not None and len(prepared.validation) > 0
    speed_plan = plan_speed(eff, settings, model, device)
    ctx.emit("log", {"level": "info", "message": speed_plan.describe()})
    args = method.trl_config(eff, prepared, output_dir, device, has_eval)
    reporter = Reporter(ctx, has_eval=has_eval, record_artifact=record, config=eff, resumed_from=resume,
                        output_dir=output_dir, columns=method.log_columns)
    box = Holdings()  # what this run allocated; freed at the end, whatever happens
    status, oom, failure, applied = "done", None, None, None
    t0 = time.monotonic()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    try:
        ctx.progress("building the trainer", 0, 0)
        trainer = method.build_trainer(
            model, tokenizer, eff, prepared, args,
            [make_callback(reporter, ctx, has_eval), *guard.callbacks(has_eval, lambda: reporter.last_checkpoint),
             *(callbacks or ())],
            log=lambda level, message: ctx.emit("log", {"level": level, "message": message}))
        box.put("trainer", trainer, "trainer", "training run")
        HOLDINGS.put("trainer", trainer, "trainer", f"training run {ctx.job_id}")
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        for cb in (PrinterCallback, ProgressCallback):  # they print; qlw reports through events
            trainer.remove_callback(cb)
        trainer.qlw_fault = fault
        trainer.qlw_watch = reporter.watch
        guard.attach(trainer)  # issue 18
        applied = speed.apply(trainer.model, speed_plan)
        reporter.trainable, reporter.total_params = (int(x) for x in trainer.model.get_nb_trainable_parameters())
        del trainer
        ctx.check_cancelled()
        box.get("trainer").train(resume_from_checkpoint=resume or None)
        if ctx.cancelled:
            status = "stopped"
    except torch.OutOfMemoryError as exc:
        # Facts only: the exception's frames hold the step's activations, let them go now.
        in_step = getattr(box.get("trainer"), "qlw_step", None)
        oom = {"step": in_step or reporter.step, "phase": "training step" if in_step else "evaluation or saving",
               "message": str(exc).split("Tried")[0].strip() or "CUDA out of memory",
               "detail": str(exc)[:600], "memory": _memory_now(device)}
    except JobCancelled:
        status = "stopped"
    except Exception as exc:
        # Keep the story, not the exception: its frames would pin the run's tensors.
        failure = _as_job_error(exc)
        # A checkpoint save cut off (disk full): remove the half-written folder, say so plainly.
        failure = _save_failure(exc, output_dir) or failure
    trainer = box.get("trainer")
    adapter_path = ""
    if trainer is not None and oom is None and failure is None and reporter.started:
        adapter_dir = folder / "adapter"
        try:
            # Only the trained adapter: a preference run from an earlier adapter also holds trl's
            # frozen "ref" copy of it, which is no part of the result.
            extra = {"selected_adapters": ["default"]} if len(getattr(trainer.model, "peft_config", {})) > 1 else {}
            trainer.model.save_pretrained(str(adapter_dir), **extra)  # safetensors
            tokenizer.save_pretrained(str(adapter_dir))
            adapter_path = str(adapter_dir)
            record("adapter", adapter_path)
        except Exception as exc:  # disk full: no half-written adapter, and the cleanup below still runs
            import shutil

            shutil.rmtree(adapter_dir, ignore_errors=True)
            failure = _save_failure(exc, output_dir, what=str(adapter_dir))
    import resource

    peak = {"device": device, "rss_peak_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}
    if device.startswith("cuda"):
        peak["torch_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        peak["torch_reserved_bytes"] = int(torch.cuda.memory_reserved(device))
    # Give the base model back as it was loaded, and free everything the run allocated.
    restored = False
    try:
        if applied is not None:  # the weight copy and the compiled layers go before the adapter does
            applied.restore()
            applied = None
        if trainer is not None and hasattr(trainer.model, "unload"):
            trainer.model.unload()
        restored = _restore_base(model)
    except Exception:
        restored = False
    trainer = None
    HOLDINGS.drop("trainer")
    freed = _free_run(box, device)
    if not restored:
        models.release_base_model()
        ctx.emit("log", {"level": "warning",
                         "message": "released the base model: it still carried the adapter; the next run loads it again"})
    del model
    elapsed = round(time.monotonic() - t0, 3)
    final = {
        "job_id": ctx.job_id, "status": status, "step": reporter.step, "total_steps": reporter.total_steps,
        "final_loss": reporter.final("loss"), "final_eval_loss": reporter.final("eval_loss"),
        "adapter_path": adapter_path, "checkpoint_path": reporter.last_checkpoint, "elapsed_s": elapsed,
        "tokens_per_s": reporter.tokens_per_s(), "peak_memory": peak, "speed": speed_plan.as_dict(),
    }
    if oom is not None:
        hint = oom_hint(eff)
        after = _memory_now(device)
        # at_failure/after_free: device free/total, torch per device, RSS; freed: free_memory's figures.
        memory = {"at_failure": oom["memory"], "after_free": after,
                  "freed": {k: freed.get(k) for k in ("before", "after", "dropped")}}
        ctx.emit("train.alert", {"job_id": ctx.job_id, "kind": "oom", "step": oom["step"],
                                 "message": f"{oom['message']} in the {oom['phase']} at step {oom['step']}: the run "
                                            "stopped; the base model and the logged rows are kept",
                                 "hint": hint, "memory": memory})
        final.update(status="failed")
        ctx.emit("train.finished", final)
        raise JobError(f"out of memory at step {oom['step']} of {reporter.total_steps} on {device}",
                       where=f"step {oom['step']}", hint=hint)
    if failure is not None:
        if reporter.started:
            final.update(status="failed")
            ctx.emit("train.finished", final)
        raise failure
    if not reporter.started:  # stopped before the first step
        ctx.check_cancelled()
    ctx.emit("train.finished", final)
    return final


def train_job(params: P.StartTraining, home: Path, store=None, checked: "CheckedRun | None" = None):
    """The ``train.start`` job, on the config the handler checked (:func:`check_run`)."""
    run_checked = checked if checked is not None else check_run(params.config, home, params.resume_from)
    fault = take_fault()

    def run(ctx) -> dict[str, Any]:
        record = (lambda kind, path: store.add_artifact(ctx.session, kind, path)) if store is not None else None
        set_config = (lambda cfg: store.set_config(ctx.session, cfg)) if store is not None else None
        with watch.Notices(ctx, run_checked.config) as watched:  # issue 18: run.notice, webhook, stall watch
            return run_training(run_checked.config, home, watched, resume_from=params.resume_from,
                                record_artifact=record, set_config=set_config, fault=fault, checked=run_checked)

    return run


# `qlw train`: headless ---------------------------------------------------------------------------------------------


ROW_HEADER = (f"{'step':>11}  {'train loss':>10}  {'val loss':>9}  {'learning rate':>13}  {'grad norm':>9}  "
              f"{'tokens/s':>9}  {'epoch':>6}  {'elapsed':>8}  {'eta':>8}")


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


#: Short headings of a preference method's own columns in the headless table.
METRIC_HEADINGS = {"rewards/chosen": "chosen", "rewards/rejected": "rejected", "rewards/margins": "margin",
                   "rewards/accuracies": "accuracy", "nll_loss": "nll loss", "log_odds_ratio": "log odds", "kl": "kl"}


def row_header(method: str = "sft") -> str:
    """The headless loss table's header for a run of ``method`` (SFT: :data:`ROW_HEADER`; a
    preference method adds its rewards, margin, ... at the end)."""
    extra = "".join(f"  {METRIC_HEADINGS.get(name, name):>9}" for name in P.METHOD_LOG_COLUMNS.get(method, ()))
    return ROW_HEADER + extra


def format_row(row: dict[str, Any], method: str = "sft") -> str:
    """One ``train.log`` row as a line of the loss table (the header is :func:`row_header`)."""
    def f(value, spec):
        return "—" if value is None else format(value, spec)

    step = f"{row['step']}/{row['total_steps']}"
    metrics = row.get("metrics") or {}
    extra = "".join(f"  {f(metrics.get(name), '.4f'):>9}" for name in P.METHOD_LOG_COLUMNS.get(method, ()))
    return (f"{step:>11}  {f(row.get('loss'), '.4f'):>10}  {f(row.get('eval_loss'), '.4f'):>9}  "
            f"{f(row.get('learning_rate'), '.3e'):>13}  {f(row.get('grad_norm'), '.3f'):>9}  "
            f"{f(row.get('tokens_per_s'), ',.0f'):>9}  {row.get('epoch') or 0:>6.2f}  {_clock(row.get('elapsed_s')):>8}  "
            f"{_clock(row.get('eta_s')):>8}" + extra)


class LocalRun:
    """A job context for ``qlw train``: events go to the store and to a printer, in this process."""

    def __init__(self, store, session: str, on_event: Callable[[str, dict[str, Any]], None]):
        import secrets

        self.store = store
        self.session = session
        self.job_id = secrets.token_hex(4)
        self.on_event = on_event
        self._cancel = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled()

    def emit(self, kind: str, payload: dict[str, Any]) -> None:
        self.store.append_event(self.session, kind, payload)
        self.on_event(kind, payload)

    def progress(self, stage: str, done: float, total: float = 0, unit: str = "", message: str = "") -> None:
        self.on_event("job.progress", {"job_id": self.job_id, "stage": stage, "done": done, "total": total,
                                       "unit": unit, "message": message})

    def finish(self, kind: str, status: str, elapsed_s: float, result: dict[str, Any],
               error: dict[str, Any] | None) -> None:
        """The end of the run (``status``: done, cancelled or failed): its error and job.finished
        events, the session's status, and the store closed."""
        if error:
            self.emit("error", {"job_id": self.job_id, **error})
        self.emit("job.finished", {"job_id": self.job_id, "kind": kind, "status": status,
                                   "elapsed_s": round(elapsed_s, 3), "result": result, "error": error})
        self.store.set_status(self.session, {"done": "finished", "cancelled": "cancelled", "failed": "failed"}[status])
        self.store.close()


def add_cli_arguments(parser) -> None:
    """The options of ``python -m backend train`` (and so of ``qlw train``)."""
    parser.add_argument("config", type=Path, nargs="?",
                        help="the run config (TOML, as the Train pane exports it; examples/ has some to start from)")
    parser.add_argument("--print-config", action="store_true",
                        help="write the default run config (TOML) to stdout and exit: a file to start from")
    parser.add_argument("--resume-from", default="", metavar="CHECKPOINT",
                        help="a checkpoint-N folder of an earlier run to continue from")
    parser.add_argument("--name", default="", help="the session's name (default: the config's name)")
    parser.add_argument("--check", action="store_true", help="only check the config (and the device); train nothing")
    parser.add_argument("--home", type=Path, default=None, help="data home (default: $QLW_HOME or the user data dir)")


def _print_errors(errors: dict[str, str], path: Path) -> None:
    print(f"qlw train: {path}: the run config has {len(errors)} error(s):", file=sys.stderr)
    for key, text in errors.items():
        print(f"  {key}: {text}", file=sys.stderr)


def cli(args) -> int:
    """``qlw train CONFIG.toml``: run the config here (no daemon), print the loss table, record a
    session in the data home's store. 0: done; 1: the run failed; 2: the config is invalid;
    130: stopped with ctrl+c (after saving a checkpoint)."""
    if args.print_config:
        sys.stdout.write(TC.dumps_toml(TC.defaults(), defaults_note=True))
        return 0
    if args.config is None:
        print("qlw train: name a run config (TOML): `qlw train CONFIG.toml`; `qlw train --print-config > run.toml` "
              "writes the defaults to start from, and examples/ holds ready ones", file=sys.stderr)
        return 2
    home = (args.home or P.data_home()).expanduser().resolve()
    config, errors = TC.read_toml(args.config, os.environ)
    if errors:
        _print_errors(errors, args.config)
        return 2
    try:
        checked_run = check_run(config, home, args.resume_from)
    except TC.ConfigError as exc:
        _print_errors(exc.errors, args.config)
        return 2
    device = checked_run.device
    if args.check:
        checked = validate_run(config, home)
        for key, text in checked["warnings"].items():
            print(f"warning: {key}: {text}")
        if checked["errors"]:
            _print_errors(checked["errors"], args.config)
            return 2
        if checked["trainable_params"] is not None:
            print(f"trainable params: {checked['trainable_params']:,} || all params: {checked['total_params']:,} "
                  f"|| trainable%: {checked['trainable_percent']:.4f}")
        mem = checked["memory"]
        if mem:
            parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in mem["parts"].items() if v)
            print(f"memory: about {mem['total_bytes'] / GIB:.1f} GiB of {mem['free_bytes'] / GIB:.1f} GiB free on "
                  f"{mem['device_name']}: {mem['verdict']} (GiB: {parts})")
        if checked["total_steps"] is not None:
            print(f"steps: {checked['total_steps']:,}")
        print(f"{args.config}: ok (device {device})")
        return 0
    from sessions.store import Store

    import logging
    import warnings

    # The loss table is the output: the libraries' deprecation notes and bitsandbytes' optional
    # kernel notice are noise here (QLW_LOG_LEVEL=INFO or DEBUG shows them).
    if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for name in ("bitsandbytes", "transformers", "peft", "trl", "accelerate"):
            logging.getLogger(name).setLevel(logging.ERROR)
    home.mkdir(parents=True, exist_ok=True)
    store = Store(home / "sessions.db")
    info = store.create_session(args.name or config["name"] or f"qlw train {args.config.name}", config)
    tty = sys.stdout.isatty()
    printer = _RichPrinter() if tty else _PlainPrinter()
    run = LocalRun(store, info.id, printer.event)
    print(f"session {info.id} in {home}", flush=True)
    stops = {"n": 0}

    def on_sigint(signum, frame):
        stops["n"] += 1
        if stops["n"] > 1:
            raise KeyboardInterrupt
        print("\nstopping: saving a checkpoint first (ctrl+c again to abort without it)", file=sys.stderr, flush=True)
        run.cancel()

    old = signal.signal(signal.SIGINT, on_sigint)
    store.set_status(info.id, "running")
    run.emit("job.started", {"job_id": run.job_id, "kind": "train.start",
                             "params": {"config": config, "resume_from": args.resume_from}})
    t0 = time.monotonic()
    status, error, result, code = "done", None, {}, 0
    try:
        with printer, watch.Notices(run, checked_run.config) as watched:  # issue 18: notices, webhook, stalls
            result = run_training(config, home, watched, resume_from=args.resume_from,
                                  record_artifact=lambda kind, path: store.add_artifact(info.id, kind, path),
                                  set_config=lambda cfg: store.set_config(info.id, cfg), fault=take_fault(),
                                  checked=checked_run)
        if result.get("status") == "stopped":
            status, code = "cancelled", 130
    except JobCancelled:
        status, code = "cancelled", 130
    except TC.ConfigError as exc:
        _print_errors(exc.errors, args.config)
        status, code, error = "failed", 2, {"message": str(exc), "where": "", "hint": ""}
    except JobError as exc:
        status, code = "failed", 1
        error = {"message": str(exc), "where": exc.where, "hint": exc.hint}
        print_job_error("train", exc)
    except KeyboardInterrupt:
        status, code = "cancelled", 130
    finally:
        signal.signal(signal.SIGINT, old)
    run.finish("train.start", status, time.monotonic() - t0, result, error)
    return code


class _PlainPrinter:
    """Rows as lines on stdout; stages and alerts as lines too (no progress bar off a terminal)."""

    def __init__(self) -> None:
        self.stage = ""
        self.method = "sft"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def line(self, text: str, err: bool = False) -> None:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)

    def event(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "job.progress":
            if payload["stage"] != self.stage and payload["stage"] != "training":
                self.line(f"{payload['stage']}...")
            self.stage = payload["stage"]
            self.progress(payload)
        elif kind == "train.started":
            t = payload
            resumed = f", resumed from {t['resumed_from']} at step {t['start_step']}" if t["resumed_from"] else ""
            self.method = str((t.get("config") or {}).get("method") or "sft")
            self.line(f"training {t['total_steps']} steps ({self.method}); {t['trainable_params']:,} trainable of "
                      f"{t['total_params']:,} parameters{resumed}")
            self.line(row_header(self.method))
        elif kind == "train.log":
            self.line(format_row(payload, self.method))
        elif kind == "train.checkpoint":
            self.line(f"checkpoint at step {payload['step']}: {payload['path']}")
        elif kind == "train.alert":
            self.line(f"ALERT ({payload['kind']}) step {payload['step']}: {payload['message']}", err=True)
            if payload.get("hint"):
                self.line(f"  what to change: {payload['hint']}", err=True)
        elif kind == "train.finished":
            f = payload
            loss = "—" if f["final_loss"] is None else f"{f['final_loss']:.4f}"
            val = "—" if f["final_eval_loss"] is None else f"{f['final_eval_loss']:.4f}"
            tps = "—" if f["tokens_per_s"] is None else f"{f['tokens_per_s']:,.0f}"
            self.line(f"{f['status']} at step {f['step']}/{f['total_steps']} in {_clock(f['elapsed_s'])}: "
                      f"train loss {loss}, validation loss {val}, {tps} tokens/s")
            peak = f.get("peak_memory") or {}
            if peak.get("torch_peak_bytes") is not None:
                self.line(f"peak memory on {peak['device']}: torch allocated "
                          f"{peak['torch_peak_bytes'] / 2**30:.2f} GiB, reserved "
                          f"{peak.get('torch_reserved_bytes', 0) / 2**30:.2f} GiB")
            if f["adapter_path"]:
                self.line(f"adapter: {f['adapter_path']}")
        elif kind == "log":
            self.line(f"{payload['level']}: {payload['message']}", err=payload["level"] != "info")

    def progress(self, payload: dict[str, Any]) -> None:
        pass


class _RichPrinter(_PlainPrinter):
    """On a terminal: the same lines, with a rich progress bar below them (rich is imported here
    only: the backend package never imports it)."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[message]}"), transient=True)
        self.bar.__enter__()
        self.task = self.bar.add_task("starting", total=None, message="")
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def line(self, text: str, err: bool = False) -> None:
        if err:
            super().line(text, err)
        else:
            self.bar.console.print(text, markup=False, highlight=False)

    def progress(self, payload: dict[str, Any]) -> None:
        total = payload["total"] or None
        self.bar.update(self.task, description=payload["stage"], completed=payload["done"], total=total,
                        message=payload.get("message", ""))
