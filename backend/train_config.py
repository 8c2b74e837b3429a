"""The run config: typed, versioned, plain data; checked field by field; TOML and environment.

A *run config* (``backend.protocol.RunConfig`` as a dict) is everything a training run needs:
``{"version": 1, "name": ..., "method": "sft", "model": ModelSettings, "data": PreparedData,
"lora": LoraSettings, "training": TrainingSettings, "dpo": DPOSettings, "orpo": ..., "kto": ...,
"launch": LaunchSettings}``
(``method`` picks the module of ``backend/methods/``; its section holds its own settings). The
checks of catalogued settings are made from their metadata (``protocol.setting``). Field names are those of transformers (``ModelSettings`` mirrors
``from_pretrained``/``BitsAndBytesConfig``), peft's ``LoraConfig`` and trl's ``SFTConfig``, so users
recognise their settings. This module is pure Python (stdlib, ``tomli_w`` for writing) and cheap
to import: the server, the LoRA form's validation and ``qlw train`` all use it.

- :func:`normalise` fills the defaults of the protocol's dataclasses and checks every field; errors
  are keyed by dotted path (``"lora.r": "must be a positive integer, got 0"``), all of them at
  once, so a form can mark each field.
- :func:`for_device` adapts a config to the device it will run on: on the CPU the paged and 8-bit
  optimizers become ``adamw_torch`` and bf16/fp16 become fp32 (each change is a warning), and an
  explicit ``bf16 = true`` is an error there; on a GPU, ``bf16``/``fp16`` left unset follow the
  model's compute dtype and what the card supports.
- :func:`presets`: the QLoRA paper's recipe and a fast small-GPU preset.
- :func:`dumps_toml` / :func:`loads_toml`: TOML export and import; import errors name the field
  and the file's line (syntax errors: line and column, from ``tomllib``).
- :func:`env_overrides`: ``QLW_<SECTION>__<FIELD>=value`` (nested: ``QLW_DATA__SOURCE__PATH``)
  overrides a field of a config read by ``qlw train``. Values are read as JSON where they parse
  (``2e-4``, ``true``, ``[\"q_proj\", \"v_proj\"]``, ``null``), else as plain text
  (``QLW_MODEL__SOURCE=mistralai/Mistral-7B-v0.3``). Sections: model, data, lora, training, dpo, orpo, kto, launch; an
  unknown section or field is an error naming the variable. The backend daemon does not read
  them (a long-lived process should not train differently because of how it was started).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

from backend import protocol as P

VERSION = P.RUN_CONFIG_VERSION
SECTIONS: dict[str, type] = {
    "model": P.ModelSettings,
    "data": P.PreparedData,
    "lora": P.LoraSettings,
    "training": P.TrainingSettings,
    **P.METHOD_SETTINGS,  # dpo, orpo, kto: the settings of the method of that name
    "launch": P.LaunchSettings,  # issue 19: processes and strategy
}
TOP_LEVEL = ("version", "name", "method", *SECTIONS)
#: The optimizers that need CUDA (bitsandbytes' paged and 8-bit ones).
GPU_OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit")
#: Attention implementations that keep packed rows apart: transformers turns the packed position ids
#: into a block-diagonal mask for sdpa and eager (masking_utils.find_packed_sequence_indices), and
#: flash-attention reads the row boundaries (tests/backend/test_packing.py checks sdpa and eager).
PACKING_SAFE_ATTENTION = ("sdpa", "eager", "flash_attention_2")
#: What a CPU run uses instead.
CPU_OPTIMIZER = "adamw_torch"
ENV_PREFIX = "QLW_"

Errors = dict[str, str]


class ConfigError(ValueError):
    """A run config with errors: ``errors`` maps each dotted field path to what is wrong."""

    def __init__(self, errors: Errors):
        self.errors = dict(errors)
        first = next(iter(self.errors.items()), ("", "invalid run config"))
        more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
        super().__init__(f"{first[0]}: {first[1]}{more}" if first[0] else first[1] + more)


# Defaults and presets ----------------------------------------------------------------------------


def _section_defaults(cls: type, **required: Any) -> dict[str, Any]:
    """The fields of ``cls`` in their order, with their defaults (``required`` for those without)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in required:
            out[f.name] = required[f.name]
        elif f.default is not dataclasses.MISSING:
            out[f.name] = copy.deepcopy(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def defaults() -> dict[str, Any]:
    """The run config a user starts from: the embedded tiny model (``model.source`` empty) and the
    shipped sample dataset (``data.source.path`` empty; its columns are mapped by detection), with
    the protocol's defaults everywhere else."""
    model = _section_defaults(P.ModelSettings, source="")
    data = _section_defaults(P.PreparedData, source={"path": "", "config": "", "split": ""},
                             mapping={role: "" for role in P.DATA_ROLES})
    return {"version": VERSION, "name": "", "method": "sft", "model": model, "data": data,
            "lora": _section_defaults(P.LoraSettings), "training": _section_defaults(P.TrainingSettings),
            **{m: _section_defaults(cls) for m, cls in P.METHOD_SETTINGS.items()},
            "launch": _section_defaults(P.LaunchSettings)}


PRESETS: dict[str, dict[str, Any]] = {
    "qlora-paper": {
        "description": "the QLoRA paper's recipe (Dettmers et al. 2023): 4-bit NF4 with double quantization, "
                       "bf16 compute, LoRA r=16 alpha=16 dropout 0.05 on every linear layer, lr 2e-4 constant, "
                       "paged 8-bit AdamW, max_grad_norm 0.3, effective batch 16",
        "model": {"precision": "4bit", "quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16"},
        "lora": {"r": 16, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear", "bias": "none",
                 "use_rslora": False, "use_dora": False},
        "training": {"learning_rate": 2e-4, "lr_scheduler_type": "constant", "warmup_ratio": 0.03,
                     "optim": "paged_adamw_8bit", "max_grad_norm": 0.3, "weight_decay": 0.0,
                     "per_device_train_batch_size": 4, "gradient_accumulation_steps": 4,
                     "gradient_checkpointing": True},
    },
    "small-gpu": {
        "description": "fast on a small GPU (8-16 GB): 4-bit NF4, LoRA r=8 alpha=16 on every linear layer, "
                       "batch 1 x 8 accumulation with gradient checkpointing, paged 8-bit AdamW, lr 2e-4 cosine",
        "model": {"precision": "4bit", "quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16"},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear", "bias": "none",
                 "use_rslora": False, "use_dora": False},
        "training": {"learning_rate": 2e-4, "lr_scheduler_type": "cosine", "warmup_ratio": 0.03,
                     "optim": "paged_adamw_8bit", "max_grad_norm": 0.3, "weight_decay": 0.0,
                     "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8,
                     "gradient_checkpointing": True, "logging_steps": 5},
    },
}
assert tuple(PRESETS) == P.TRAIN_PRESETS


def presets() -> dict[str, Any]:
    """What ``train.presets`` answers: the presets and the defaults."""
    return {"presets": copy.deepcopy(PRESETS), "defaults": defaults()}


def apply_preset(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``config`` with the sections of preset ``name`` laid over it (other fields kept)."""
    if name not in PRESETS:
        raise ConfigError({"preset": f"unknown preset {name!r}; presets are {', '.join(PRESETS)}"})
    out = copy.deepcopy(dict(config))
    for section in ("model", "lora", "training"):
        out[section] = {**dict(out.get(section) or {}), **copy.deepcopy(PRESETS[name][section])}
    return out


# Field rules --------------------------------------------------------------------------------------
# A rule takes the value and returns (normalised value, error or None).


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)  # JSON clients may send 16.0
    return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def int_at_least(low: int, what: str = ""):
    def rule(value):
        v = _int(value)
        if v is None or v < low:
            text = what or ("a positive integer" if low == 1 else f"an integer of at least {low}")
            return value, f"must be {text}, got {_show(value)}"
        return v, None
    return rule


def steps_or_fraction(low: int):
    """``logging_steps``/``eval_steps``/``save_steps``: a whole number of steps (at least
    ``low``), or a fraction of the run below 1 as transformers reads it."""
    def rule(value):
        v = _float(value)
        if v is not None and math.isfinite(v) and not isinstance(value, bool):
            if 0 < v < 1:
                return v, None
            if v >= low and v == int(v):
                return int(v), None
        zero = "0 (only at the end), " if low == 0 else ""
        return value, (f"must be {zero}a whole number of steps of at least 1, or a fraction of the run below 1 "
                       f"(0.05: every 5% of the steps), got {_show(value)}")
    return rule


def float_range(low: float, high: float | None, *, low_open: bool = False, high_open: bool = True, what: str = ""):
    def rule(value):
        v = _float(value)
        ok = v is not None and math.isfinite(v) and (v > low if low_open else v >= low)
        if ok and high is not None:
            ok = v < high if high_open else v <= high
        if not ok:
            if not what:
                lo = f"{'>' if low_open else '>='} {low:g}"
                hi = f" and {'<' if high_open else '<='} {high:g}" if high is not None else ""
                text = f"a number {lo}{hi}"
            else:
                text = what
            return value, f"must be {text}, got {_show(value)}"
        return v, None
    return rule


def boolean(value):
    if isinstance(value, bool):
        return value, None
    return value, f"must be true or false, got {_show(value)}"


def optional_bool(value):
    if value is None or isinstance(value, bool):
        return value, None
    return value, f"must be true, false or unset (chosen from the device), got {_show(value)}"


def text(value):
    if isinstance(value, str):
        return value, None
    return value, f"must be text, got {_show(value)}"


def choice(allowed: tuple[str, ...]):
    def rule(value):
        if isinstance(value, str) and value in allowed:
            return value, None
        close = difflib.get_close_matches(str(value), allowed, n=1) if isinstance(value, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return value, f"must be one of {', '.join(allowed)}, got {_show(value)}{hint}"
    return rule


def device(value):
    if isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        return value, None
    return value, f"must be auto, cpu, cuda or cuda:N, got {_show(value)}"


def target_modules(value):
    if isinstance(value, str) and value.strip():
        return value.strip(), None
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return [v.strip() for v in value], None
    return value, ('must be "all-linear", a list of module names such as ["q_proj", "v_proj"] '
                   f"(see the model's linear layers), or a regular expression, got {_show(value)}")


def module_list(value):
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
        return [v.strip() for v in value], None
    return value, f"must be a list of module names (e.g. [\"lm_head\"]), got {_show(value)}"


def report_to(value):
    """transformers' ``report_to`` as qlw offers it: a list of tensorboard, wandb, mlflow (issue 18)."""
    from backend.watch import REPORTERS

    if isinstance(value, str):
        value = [v for v in (x.strip() for x in value.split(",")) if v and v != "none"]
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() in REPORTERS for v in value):
        return list(dict.fromkeys(v.strip() for v in value)), None
    return value, f"must be a list of {', '.join(REPORTERS)} (or empty), got {_show(value)}"


def data_source(value):
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict):
        return value, f"must be a table with path (and config, split), got {_show(value)}"
    unknown = sorted(set(value) - {"path", "config", "split"})
    if unknown:
        return value, f"unknown key(s) {', '.join(unknown)}: a source has path, config and split"
    out = {"path": value.get("path", ""), "config": value.get("config", ""), "split": value.get("split", "")}
    for k, v in out.items():
        if not isinstance(v, str):
            return value, f"{k} must be text, got {_show(v)}"
    return out, None


def data_mapping(value):
    if not isinstance(value, dict):
        return value, f"must be a table of role = column, got {_show(value)}"
    unknown = sorted(set(value) - set(P.DATA_ROLES))
    if unknown:
        return value, f"unknown role(s) {', '.join(unknown)}; roles are {', '.join(P.DATA_ROLES)}"
    out = {}
    for role in P.DATA_ROLES:
        v = value.get(role) or ""
        if not isinstance(v, str):
            return value, f"the {role} role must name a column, got {_show(v)}"
        out[role] = v
    return out, None


def rule_for(f: dataclasses.Field):
    """The check of a catalogued setting (``protocol.setting``), from its metadata."""
    meta, kind = f.metadata, P.setting_kind(f)
    if kind == "int":
        inner = int_at_least(int(meta["minimum"] or 0), meta["what"])
        if meta["also"] is None:
            return inner
        also = int(meta["also"])
        return lambda v: (v, None) if _int(v) == also else inner(v)
    if kind == "float":
        return float_range(meta["minimum"] if meta["minimum"] is not None else -math.inf, meta["maximum"],
                           low_open=meta["low_open"], high_open=meta["open_max"], what=meta["what"])
    if kind == "choice":
        return choice(tuple(meta["choices"]))
    if kind == "steps":
        return steps_or_fraction(int(meta["minimum"] or 0))
    return {"bool": boolean, "tristate": optional_bool, "names": module_list}.get(kind, text)


def _catalogued(cls: type, **custom) -> dict[str, Any]:
    """Rules for every field of ``cls``: ``custom`` ones, else the catalogue's."""
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = custom[f.name] if f.name in custom else rule_for(f)
    return out


RULES: dict[str, dict[str, Any]] = {
    "model": {
        "source": text, "revision": text, "trust_remote_code": boolean,
        "precision": choice(P.MODEL_PRECISIONS), "quant_type": choice(P.MODEL_QUANT_TYPES),
        "double_quant": boolean, "compute_dtype": choice(P.MODEL_COMPUTE_DTYPES),
        "attn_implementation": choice(P.MODEL_ATTN_IMPLEMENTATIONS), "device": device,
    },
    "data": {
        "source": data_source, "mapping": data_mapping, "template": choice(P.DATA_TEMPLATES),
        "loss": choice(P.DATA_LOSSES), "system_prompt": text, "split_mode": choice(P.DATA_SPLIT_MODES),
        "validation_ratio": float_range(0, 1, low_open=True, what="a fraction between 0 and 1 (e.g. 0.1)"),
        "validation_split": text, "seed": int_at_least(0), "max_length": int_at_least(1),
    },
    "lora": _catalogued(P.LoraSettings, target_modules=target_modules),
    "training": _catalogued(P.TrainingSettings, report_to=report_to),  # report_to: issue 18
    **{m: _catalogued(cls) for m, cls in P.METHOD_SETTINGS.items()},
    "launch": _catalogued(P.LaunchSettings),
}
for _section, _cls in SECTIONS.items():  # every protocol field has a rule, and no rule lacks a field
    assert set(RULES[_section]) == {f.name for f in dataclasses.fields(_cls)}, _section

#: Names people bring from other tools, and what the field is called here.
ALIASES = {
    "lora.rank": "r", "lora.alpha": "lora_alpha", "lora.dropout": "lora_dropout", "lora.targets": "target_modules",
    "training.lr": "learning_rate", "training.batch_size": "per_device_train_batch_size",
    "training.epochs": "num_train_epochs", "training.max_seq_length": "max_length (in [data])",
    "training.max_length": "max_length (in [data])", "training.scheduler": "lr_scheduler_type",
    "training.warmup": "warmup_ratio", "training.optimizer": "optim",
    "training.gradient_accumulation": "gradient_accumulation_steps", "training.activation_checkpointing":
    "gradient_checkpointing", "model.load_in_4bit": "precision = \"4bit\"", "model.dtype": "compute_dtype",
    "model.bnb_4bit_quant_type": "quant_type", "model.bnb_4bit_use_double_quant": "double_quant",
    "model.bnb_4bit_compute_dtype": "compute_dtype", "model.name": "source", "model.model_name_or_path": "source",
}


def _unknown(section: str, key: str, known: list[str]) -> str:
    alias = ALIASES.get(f"{section}.{key}")
    if alias:
        return f"unknown field: here it is called {alias}"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"unknown field{f' (did you mean {close[0]}?)' if close else ''}"


# Normalising and checking --------------------------------------------------------------------------


def normalise(raw: Any) -> tuple[dict[str, Any], Errors]:
    """``(config, errors)``: ``raw`` with every default filled in and every field checked.

    ``config`` always has the full shape (a field with an error keeps the value as given, so a
    form can show it); ``errors`` maps dotted paths to messages, empty when the config is valid.
    """
    errors: Errors = {}
    config = defaults()
    if not isinstance(raw, Mapping):
        return config, {"config": f"a run config is a table of sections (model, data, lora, training, ...), got {_show(raw)}"}
    for key in raw:
        if key not in TOP_LEVEL:
            close = difflib.get_close_matches(str(key), TOP_LEVEL, n=1)
            errors[str(key)] = (f"unknown section{f' (did you mean {close[0]}?)' if close else ''}; "
                                f"a run config has {', '.join(TOP_LEVEL)}")
    version = raw.get("version", VERSION)
    if _int(version) is None or _int(version) < 1:
        errors["version"] = f"must be a positive integer, got {_show(version)}"
    elif _int(version) > VERSION:
        errors["version"] = (f"this config is version {_int(version)}, written by a newer qlw; this qlw reads "
                             f"version {VERSION}: upgrade qlw")
    name = raw.get("name", "")
    if not isinstance(name, str):
        errors["name"] = f"must be text, got {_show(name)}"
    else:
        config["name"] = name
    method, error = choice(P.TRAINING_METHODS)(raw.get("method", "sft"))
    config["method"] = method
    if error:
        errors["method"] = error
    for section, rules in RULES.items():
        given = raw.get(section, {})
        if given is None:
            given = {}
        if not isinstance(given, Mapping):
            errors[section] = f"must be a table of fields, got {_show(given)}"
            continue
        for key, value in given.items():
            if key not in rules:
                errors[f"{section}.{key}"] = _unknown(section, str(key), list(rules))
                continue
            value, error = rules[key](value)
            config[section][key] = value
            if error:
                errors[f"{section}.{key}"] = error
    _cross_checks(config, errors)
    return config, errors


def _cross_checks(c: dict[str, Any], errors: Errors) -> None:
    t, d = c["training"], c["data"]
    kto = c.get("kto") or {}
    if c.get("method") == "kto" and kto.get("loss_type") == "kto" and t.get("per_device_train_batch_size") == 1:
        errors["training.per_device_train_batch_size"] = ("KTO estimates its KL term from the other rows of a batch: "
                                                          "use a batch of 2 or more (or loss_type apo_zero_unpaired)")
    if t.get("bf16") is True and t.get("fp16") is True and "training.fp16" not in errors:
        errors["training.fp16"] = "bf16 and fp16 cannot both be on: choose one mixed precision"
    if d.get("split_mode") == "split" and not d.get("validation_split") and "data.validation_split" not in errors:
        errors["data.validation_split"] = "split_mode \"split\" needs the name of the source's validation split"
    if c["model"].get("precision") == "8bit" and t.get("bf16") is True:
        errors["training.bf16"] = "8-bit (LLM.int8) models compute in fp16: use fp16 or leave bf16 unset"
    launch = c.get("launch") or {}
    if launch.get("strategy") == "fsdp" and c["model"].get("precision") == "8bit" and "launch.strategy" not in errors:
        errors["launch.strategy"] = ("FSDP shards 4-bit (FSDP-QLoRA) or 16/32-bit weights, not 8-bit ones: "
                                     "load the model in 4bit, or use strategy ddp")
    if (_int(launch.get("processes")) or 1) > 1 and t.get("auto_find_batch_size") is True:
        errors["training.auto_find_batch_size"] = ("cannot halve the batch of several processes in step: turn it "
                                                   "off and set per_device_train_batch_size")


def global_batch(config: Mapping[str, Any]) -> int:
    """Rows (preference methods: pairs; packed SFT: packed sequences) that one optimizer step sees:
    ``per_device_train_batch_size x gradient_accumulation_steps x launch.processes`` (issue 19)."""
    t = config["training"]
    processes = (config.get("launch") or {}).get("processes") or 1
    return int(t["per_device_train_batch_size"]) * int(t["gradient_accumulation_steps"]) * int(processes)


def batch_text(config: Mapping[str, Any]) -> str:
    """How the global batch is made, in words: ``4 rows x 2 accumulation x 2 processes = 16``."""
    t = config["training"]
    processes = int((config.get("launch") or {}).get("processes") or 1)
    parts = [f"{t['per_device_train_batch_size']} per device", f"{t['gradient_accumulation_steps']} accumulation"]
    if processes > 1:
        parts.append(f"{processes} processes")
    return f"global batch {global_batch(config)} ({' x '.join(parts)})"


def warnings_for(config: dict[str, Any]) -> Errors:
    """Things that are allowed but probably not meant, keyed like errors."""
    out: Errors = {}
    t, d, lora = config["training"], config["data"], config["lora"]
    if config.get("method", "sft") != "sft" and t.get("packing"):
        out["training.packing"] = f"packing is SFT's: a {config['method']} run keeps each pair apart (packing is off)"
    lr = _float(t.get("learning_rate"))
    if lr is not None and lr > 1e-2:
        out["training.learning_rate"] = f"{lr:g} is very high for LoRA (usual: 1e-5 to 5e-4); expect a diverging loss"
    if d.get("split_mode") == "none" and _int(t.get("eval_steps")):
        out["training.eval_steps"] = "there are no validation rows (data.split_mode = \"none\"): nothing is evaluated"
    launch = config.get("launch") or {}
    if launch.get("strategy") == "fsdp" and (_int(launch.get("processes")) or 1) < 2:
        out["launch.strategy"] = "fsdp with one process shards nothing: the run trains as one process"
    if t.get("packing") and config["model"].get("attn_implementation") not in PACKING_SAFE_ATTENTION:
        out["training.packing"] = (f"packing puts several rows in one sequence; with attention "
                                   f"{config['model'].get('attn_implementation')!r} they may attend to each other: "
                                   f"use one of {', '.join(PACKING_SAFE_ATTENTION)}")
    r, alpha = _int(lora.get("r")), _int(lora.get("lora_alpha"))
    if r and alpha and alpha / r > 8 and not lora.get("use_rslora"):
        out["lora.lora_alpha"] = f"lora_alpha/r = {alpha / r:g} scales the update strongly; usual is 1 or 2"
    return out


def validate(raw: Any) -> dict[str, Any]:
    """The config checked: ``{"ok", "config", "errors", "warnings"}`` (no device involved)."""
    config, errors = normalise(raw)
    return {"ok": not errors, "config": config, "errors": errors, "warnings": warnings_for(config) if not errors else {}}


def checked(raw: Any) -> dict[str, Any]:
    """The normalised config, or :class:`ConfigError` with every error."""
    config, errors = normalise(raw)
    if errors:
        raise ConfigError(errors)
    return config


def for_device(config: dict[str, Any], device: str, bf16_supported: bool | None = None) -> tuple[dict[str, Any], Errors, Errors]:
    """``(effective config, errors, warnings)`` for a run on ``device`` (``cpu`` or ``cuda:N``).

    - CPU: the paged and 8-bit optimizers (CUDA only) become ``adamw_torch``; a bf16/fp16 model
      or 4-bit compute dtype becomes fp32 (CPUs train in fp32 here); ``bf16``/``fp16`` unset mean
      off, and set to true are errors.
    - GPU: ``bf16``/``fp16`` unset follow the model's compute dtype (4-bit: ``compute_dtype``;
      8-bit: fp16; bf16/fp16 models: their dtype; fp32: neither). A card without bf16 (compute
      capability below 8.0, ``bf16_supported`` False) computes in fp16 instead, with a warning.
    """
    c = copy.deepcopy(config)
    m, t = c["model"], c["training"]
    errors: Errors = {}
    warnings: Errors = {}
    launch = c.get("launch") or {}
    if device == "cpu" and launch.get("strategy") == "fsdp" and (launch.get("processes") or 1) > 1:
        errors["launch.strategy"] = ("FSDP needs CUDA GPUs (and bitsandbytes' 4-bit layers there); on the CPU several "
                                     "processes train with strategy ddp (gloo)")
    if device == "cpu":
        if t["use_liger_kernel"]:
            warnings["training.use_liger_kernel"] = "Liger's kernels need a CUDA GPU: off on the CPU"
            t["use_liger_kernel"] = False
        if t["activation_offloading"]:
            warnings["training.activation_offloading"] = "activation offloading moves GPU memory to the CPU: off on the CPU"
            t["activation_offloading"] = False
        if t["optim"] in GPU_OPTIMIZERS:
            warnings["training.optim"] = f"{t['optim']} needs a CUDA GPU; on the CPU {CPU_OPTIMIZER} is used"
            t["optim"] = CPU_OPTIMIZER
        for flag in ("bf16", "fp16"):
            if t[flag] is True:
                errors[f"training.{flag}"] = (f"{flag} mixed precision needs a GPU; on the CPU qlw trains in fp32: "
                                              "set it to false or leave it unset")
            t[flag] = False
        if m["precision"] in ("bf16", "fp16"):
            warnings["model.precision"] = f"{m['precision']} is slow and imprecise on the CPU; the model is loaded in fp32"
            m["precision"] = "fp32"
        if m["precision"] == "4bit" and m["compute_dtype"] != "fp32":
            warnings["model.compute_dtype"] = (f"4-bit layers compute in fp32 on the CPU (not {m['compute_dtype']})")
            m["compute_dtype"] = "fp32"
        return c, errors, warnings
    if t["use_liger_kernel"]:
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            warnings["training.use_liger_kernel"] = "the liger-kernel package is not installed: Liger's kernels are off"
            t["use_liger_kernel"] = False
    compute = {"4bit": m["compute_dtype"], "8bit": "fp16"}.get(m["precision"], m["precision"])
    if compute == "bf16" and bf16_supported is False:
        if t["bf16"] is True:
            errors["training.bf16"] = f"{device} does not support bf16 (compute capability below 8.0): use fp16"
        else:
            target = "model.compute_dtype" if m["precision"] == "4bit" else "model.precision"
            warnings[target] = f"{device} has no bf16: computing in fp16 instead"
            if m["precision"] == "4bit":
                m["compute_dtype"] = "fp16"
            else:
                m["precision"] = "fp16"
            compute = "fp16"
    if t["bf16"] is None and t["fp16"] is None:
        t["bf16"], t["fp16"] = compute == "bf16", compute == "fp16"
    elif t["bf16"] is None:
        t["bf16"] = bool(not t["fp16"] and compute == "bf16")
    elif t["fp16"] is None:
        t["fp16"] = bool(not t["bf16"] and compute == "fp16")
    return c, errors, warnings


# The model section, resolved ------------------------------------------------------------------
# (here, not in backend/train/, so that adapters, chat and evaluate read a run's model section
# without importing the training package: no import circle)


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
    from backend.jobs import JobCancelled

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


# TOML files and QLW_* overrides live in backend/run_toml.py (it uses the checks above).
from backend.run_toml import (  # noqa: E402,F401
    _strip_none, DEFAULTS_NOTE, dumps_toml, _toml_value, _plain_toml, key_lines, _line_of, loads_toml, read_toml, _parse_env_value, env_overrides, apply_env,
)
