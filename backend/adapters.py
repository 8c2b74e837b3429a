"""LoRA adapters on disk: find them, check them, and put them on a base model.

Chat, evaluation and merging all start from an adapter folder (a session's final ``adapter/`` or
one of its ``checkpoints/checkpoint-N``). Everything here reads the folder's two files without
loading a model first (``adapter_config.json`` and the safetensors header), so a broken or
mismatched adapter is refused with a message for people before any memory is spent, instead of
a shape error from deep inside peft.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from backend import protocol as P
from backend.jobs import JobError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: peft prefixes every saved key with this (the PeftModel's own attribute path).
KEY_PREFIX = "base_model.model."
_MAX_HEADER = 100 * 1024 * 1024


def _error(message: str, path: Path | str, hint: str = "") -> JobError:
    return JobError(message, where=str(path), hint=hint)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file (name -> dtype, shape, data_offsets), checked
    against the file's size: a truncated or corrupted file raises :class:`JobError`."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _error(f"{path.name} is empty or truncated ({size} bytes)", path,
                             "save the adapter again (or pick another checkpoint)")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or n > _MAX_HEADER or 8 + n > size:
                raise _error(f"{path.name} is not a valid safetensors file (header of {n:,} bytes in a "
                             f"{size:,}-byte file)", path, "the file is truncated or corrupted: save the adapter again")
            header = json.loads(fh.read(n).decode("utf-8"))
    except OSError as exc:
        raise _error(f"cannot read {path}: {exc.strerror or exc}", path) from None
    except (UnicodeDecodeError, ValueError):
        raise _error(f"{path.name} has a corrupted header", path, "save the adapter again") from None
    if not isinstance(header, dict):
        raise _error(f"{path.name} has a corrupted header", path, "save the adapter again")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((int(v.get("data_offsets", [0, 0])[1]) for v in tensors.values() if isinstance(v, dict)), default=0)
    if 8 + n + end > size:
        raise _error(f"{path.name} is truncated: its header describes {8 + n + end:,} bytes, the file has "
                     f"{size:,}", path, "the copy or save was cut off: save the adapter again, or pick another checkpoint")
    return tensors


def _run_folder(path: Path) -> Path | None:
    """The session's run folder that holds this adapter (the one with config.toml), if any."""
    for parent in (path, *path.parents[:3]):
        if (parent / "config.toml").is_file():
            return parent
    return None


def _run_field(run: Path | None, key: str) -> str:
    """A top-level text field of the run's config.toml ("" when there is none)."""
    if run is None:
        return ""
    import tomllib

    try:
        value = tomllib.loads((run / "config.toml").read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError):
        return ""
    return value.strip() if isinstance(value, str) else ""


def run_name(run: Path | None) -> str:
    """The name of the run in ``run`` (its config.toml's ``name``), "" when it has none."""
    return _run_field(run, "name")


def _trainer_state(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _final_losses(path: Path, run: Path | None) -> tuple[float | None, float | None, int | None]:
    """(training loss, validation loss, step) last logged for this adapter: its own
    trainer_state.json (a checkpoint), else the newest checkpoint of its run."""
    state = _trainer_state(path)
    if state is None and run is not None and (run / "checkpoints").is_dir():
        states = [s for s in (_trainer_state(c) for c in (run / "checkpoints").iterdir() if c.is_dir()) if s]
        state = max(states, key=lambda s: int(s.get("global_step") or 0), default=None)
    if state is None:
        return None, None, None
    history = state.get("log_history") or []
    loss = next((e["loss"] for e in reversed(history) if "loss" in e), None)
    eval_loss = next((e["eval_loss"] for e in reversed(history) if "eval_loss" in e), None)
    return loss, eval_loss, int(state.get("global_step") or 0)


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """Plain facts about one adapter folder; :class:`JobError` for a folder that is not a usable
    LoRA adapter (missing, no or bad config, missing or truncated weights, no LoRA tensors)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise _error(f"no adapter folder at {folder}", folder, "pick an adapter from the list (a session's "
                     "adapter/ or checkpoints/checkpoint-N)")
    cfg_path = folder / CONFIG_FILE
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _error(f"{folder} has no {CONFIG_FILE}: it is not a peft adapter", folder,
                     "pick a folder saved by qlw or peft's save_pretrained") from None
    except (OSError, ValueError) as exc:
        raise _error(f"{cfg_path} cannot be read as JSON: {exc}", cfg_path, "save the adapter again") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise _error(f"{cfg_path} describes a {kind} adapter; qlw works with LoRA adapters", cfg_path)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        legacy = folder / "adapter_model.bin"
        raise _error(f"{folder} has no {WEIGHTS_FILE}" + (" (only a pickled adapter_model.bin, which qlw does "
                     "not load)" if legacy.exists() else ""), folder, "save the adapter again with safetensors")
    tensors = read_safetensors_header(weights)
    lora = [k for k in tensors if ".lora_A." in k or ".lora_B." in k or "lora_embedding" in k]
    if not lora:
        raise _error(f"{weights.name} holds no LoRA tensors ({len(tensors)} tensors)", weights,
                     "this is not a LoRA adapter's weight file")
    run = _run_folder(folder)
    loss, eval_loss, step = _final_losses(folder, run)
    targets = config.get("target_modules")
    if isinstance(targets, list):
        # peft writes "all-linear" out as module paths in a varying order: show the layer names.
        targets = sorted({str(t).rsplit(".", 1)[-1] for t in targets})
    kind = "checkpoint" if folder.name.startswith("checkpoint-") else "adapter"
    if kind == "checkpoint":
        try:
            step = int(folder.name.split("-", 1)[1])
        except ValueError:
            pass
    return {
        "path": str(folder.resolve()),
        "session": run.name if run is not None else "",
        "name": run_name(run),
        "method": _run_field(run, "method") or "sft",
        "kind": kind,
        "step": step,
        "base_model": config.get("base_model_name_or_path") or "",
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "lora_dropout": config.get("lora_dropout"),
        "target_modules": targets,
        "use_rslora": bool(config.get("use_rslora")),
        "use_dora": bool(config.get("use_dora")),
        "modules_to_save": config.get("modules_to_save") or [],
        "tensors": len(tensors),
        "size_bytes": weights.stat().st_size,
        "mtime": weights.stat().st_mtime,
        "run_config": str(run / "config.toml") if run is not None else None,
        "final_loss": loss,
        "final_eval_loss": eval_loss,
    }


def list_adapters(home: str | Path) -> list[dict[str, Any]]:
    """Every usable adapter under the data home's runs: each session's final adapter and its
    checkpoints, newest first. Broken folders are left out (inspect one to see why)."""
    runs = Path(home) / "runs"
    found: list[dict[str, Any]] = []
    if not runs.is_dir():
        return found
    for run in runs.iterdir():
        if not run.is_dir():
            continue
        candidates = [run / "adapter"]
        if (run / "checkpoints").is_dir():
            candidates += [c for c in (run / "checkpoints").iterdir() if c.name.startswith("checkpoint-")]
        for folder in candidates:
            if (folder / CONFIG_FILE).is_file():
                try:
                    found.append(inspect_adapter(folder))
                except JobError:
                    continue
    found.sort(key=lambda a: (a["mtime"], a["kind"] == "adapter"), reverse=True)
    return found


def _plain_model(model):
    """The transformers model under a PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _module_shapes(module) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear-like module (nn.Linear, bnb Linear4bit/8bitLt,
    or a peft LoRA layer wrapping one)."""
    base = getattr(module, "base_layer", module)
    fin, fout = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if fin is None or fout is None:
        return None
    return int(fin), int(fout)


def check_against_base(path: str | Path, model) -> None:
    """Raise :class:`JobError` when the adapter in ``path`` does not fit ``model``: a LoRA tensor
    for a module the model lacks, or one whose shape does not match that module's."""
    folder = Path(path).expanduser()
    tensors = read_safetensors_header(folder / WEIGHTS_FILE)
    plain = _plain_model(model)
    modules = dict(plain.named_modules())
    base_name = getattr(getattr(plain, "config", None), "_name_or_path", "") or type(plain).__name__
    try:
        trained_for = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("base_model_name_or_path") or "?"
    except (OSError, ValueError):
        trained_for = "?"
    hint = (f"it was trained on {trained_for}; load that base model (the Model tab), or pick an adapter "
            f"trained on {base_name}")
    missing: list[str] = []
    for key, meta in tensors.items():
        for marker, axis in ((".lora_A.", "in"), (".lora_B.", "out")):
            if marker not in key:
                continue
            name = key.split(marker)[0]
            if name.startswith(KEY_PREFIX):
                name = name[len(KEY_PREFIX):]
            module = modules.get(name)
            if module is None:
                missing.append(name)
                break
            shapes = _module_shapes(module)
            shape = list(meta.get("shape") or [])
            if shapes is None or len(shape) != 2:
                break
            want = shapes[0] if axis == "in" else shapes[1]
            got = shape[1] if axis == "in" else shape[0]
            if got != want:
                raise _error(f"this adapter was trained for another base model: {name} has "
                             f"{'in' if axis == 'in' else 'out'}_features {want} here, the adapter's {key.rsplit('.', 1)[0]} "
                             f"expects {got}", folder, hint)
    if missing:
        raise _error(f"this adapter was trained for another base model: {len(missing)} of its LoRA modules "
                     f"do not exist in {base_name} (first: {missing[0]})", folder, hint)


def attach_adapter(model, path: str | Path, name: str = "tuned"):
    """Check the adapter against ``model``, then load it with peft under ``name`` (inference mode).
    Returns the PeftModel (``model`` itself when it already is one)."""
    from peft import PeftModel

    folder = Path(path).expanduser()
    inspect_adapter(folder)
    check_against_base(folder, model)
    try:
        if isinstance(model, PeftModel):
            if name not in model.peft_config:
                model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
            model.set_adapter(name)
            peft_model = model
        else:
            peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise _error(f"peft could not load the adapter in {folder}: {exc}", folder,
                     "the adapter files may be damaged: pick another checkpoint") from None
    peft_model.eval()
    return peft_model


def base_settings_for(path: str | Path, home: str | Path) -> P.ModelSettings:
    """How the base this adapter was trained on was loaded: the model section of its run's
    config.toml when there is one (precision, quantization and all), else the adapter config's
    ``base_model_name_or_path`` in 4-bit NF4 (the QLoRA default)."""
    from backend import train_config as TC
    from backend.train_config import model_settings

    folder = Path(path).expanduser()
    run = _run_folder(folder)
    if run is not None:
        config, errors = TC.read_toml(run / "config.toml")
        if "file" not in errors and isinstance(config.get("model"), dict):
            return model_settings(config["model"], Path(home))
    info = inspect_adapter(folder)
    if not info["base_model"]:
        raise _error(f"{folder} does not say which base model it was trained on", folder / CONFIG_FILE,
                     "load the base model yourself (the Model tab), then pick the adapter")
    return P.ModelSettings(source=info["base_model"])
