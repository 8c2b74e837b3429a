"""Before a run: where its files go (:func:`run_dir`), the fault seam (``QLW_TRAIN_FAULT``), the
model and data a config names resolved (:func:`model_settings`, :func:`data_settings`), the device,
a resume checkpoint checked (:func:`check_resume`), the whole run checked (:func:`check_run`),
and the checkpoints a session has (:func:`list_checkpoints`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from backend import protocol as P, train_config as TC
from backend.jobs import JobError
from backend.methods import base as methods_base
from backend.train_config import is_embedded_model


FAULT_ENV = methods_base.FAULT_ENV
MIB = 1024 * 1024
GIB = 1024 * MIB


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
    from backend.train.launch import launch_checks

    more_errors, more_warnings = launch_checks(eff, device)  # issue 19: several processes
    return eff, device, {**errors, **more_errors}, {**warnings, **more_warnings}


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


def _field_of(exc: JobError, default: str) -> str:
    where = getattr(exc, "where", "") or ""
    if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", where):
        return where
    m = re.match(r"(source|revision|precision|device|attn_implementation|quant_type|compute_dtype)\b", where)
    return f"model.{m.group(1)}" if m else default

