"""The run config of the LoRA form as plain data: its fields, local checks and formatting.

No widget here. Each :class:`Field` names one setting by its dotted path in the run config
(``"lora.r"``, ``"training.learning_rate"``, ``"dpo.beta"``; ``"method"`` at the top) and by the
name peft, trl and transformers give it, with the type and range the form checks as the user
types (the backend's ``train.validate`` checks the rest). Help, ranges and choices come from the
protocol's catalogue (field metadata made by ``protocol.setting``), as the backend's checks do. :func:`build_config` turns the form's values plus the Model
and Data panes' sections into the ``protocol.RunConfig`` dict that ``train.validate``,
``train.start`` and ``train.export`` take.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from backend import protocol as P

LORA_DEFAULTS = P.to_dict(P.LoraSettings())
TRAINING_DEFAULTS = P.to_dict(P.TrainingSettings())
DATA_DEFAULTS = P.to_dict(P.PreparedData(source={"path": "", "config": "", "split": ""}))
MODEL_DEFAULTS = P.to_dict(P.ModelSettings(source=""))
METHOD_DEFAULTS = {m: P.to_dict(cls()) for m, cls in P.METHOD_SETTINGS.items()}

#: The kinds typed as numbers (``steps``: whole steps, or a fraction of the run below 1).
NUMBER_KINDS = ("int", "float", "steps")
#: The two ``bool | None`` settings (``bf16``, ``fp16``) as a three-way choice.
TRISTATE = {"auto": None, "true": True, "false": False}
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


@dataclass(frozen=True)
class Field:
    """One setting of the form. ``kind``: int, float, bool, choice, tristate, names (a list of
    module names) or text. ``minimum``/``maximum`` bound numbers (``low_open``/``open_max``: the
    bound itself is out); ``also`` is one more allowed value outside the range (max_steps' -1).
    ``path`` is dotted (``lora.r``), or a top-level key of the run config (``method``)."""

    path: str
    kind: str
    help: str
    minimum: float | None = None
    maximum: float | None = None
    open_max: bool = False
    also: float | None = None
    choices: tuple[str, ...] = ()
    low_open: bool = False

    @property
    def section(self) -> str:
        return self.path.split(".", 1)[0] if "." in self.path else ""

    @property
    def name(self) -> str:
        return self.path.split(".", 1)[-1]

    @property
    def dom_id(self) -> str:
        return "f-" + self.path.replace(".", "-").replace("_", "-")


#: The protocol dataclass of each section the form shows fields of.
SECTION_CLASSES: dict[str, type] = {"lora": P.LoraSettings, "training": P.TrainingSettings, "data": P.PreparedData,
                                    **P.METHOD_SETTINGS}
#: The top-level ``method`` setting: which trainer the run uses.
METHOD = "method"


def catalogued(path: str) -> Field:
    """The form field of a setting, from its catalogue entry on the protocol dataclass."""
    section, name = path.split(".", 1)
    f = P.settings_catalogue(SECTION_CLASSES[section])[name]
    m = f.metadata
    return Field(path, P.setting_kind(f), m["help"], minimum=m["minimum"], maximum=m["maximum"],
                 open_max=m["open_max"], also=m["also"], choices=tuple(m["choices"]), low_open=m["low_open"])


def _method_fields(method: str) -> tuple[Field, ...]:
    return tuple(catalogued(f"{method}.{name}") for name in P.settings_catalogue(P.METHOD_SETTINGS[method]))


#: The form's fields in the order shown, section by section (``target_modules`` has its own
#: picker; the model's quantization is the Model pane's, shown as a line). Help, ranges and
#: choices are the protocol's catalogue (``protocol.setting``).
FIELDS: tuple[Field, ...] = (
    Field(METHOD, "choice", "Training method: sft (supervised), or preference tuning with dpo, orpo or kto "
          "(trl's trainers; the data then needs chosen/rejected answers, or labels for kto).",
          choices=P.TRAINING_METHODS),
    *(catalogued(f"lora.{name}") for name in P.settings_catalogue(P.LoraSettings)),
    *(catalogued(f"training.{name}") for name in (
        "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
        "auto_find_batch_size", "gradient_checkpointing", "speed", "memory_budget", "learning_rate",
        "lr_scheduler_type", "warmup_ratio",
        "warmup_steps", "optim", "weight_decay", "max_grad_norm", "logging_steps", "eval_steps", "save_steps",
        "save_total_limit", "seed", "bf16", "fp16")),
    catalogued("data.max_length"), catalogued("data.loss"), catalogued("training.packing"),
    *(f for method in P.METHOD_SETTINGS for f in _method_fields(method)),
)
FIELD_BY_PATH = {f.path: f for f in FIELDS}
#: Paths with their own widget rather than a :class:`Field` row.
TARGET_MODULES = "lora.target_modules"


def default_value(path: str) -> Any:
    """A field's default, from the protocol's dataclasses."""
    if path == METHOD:
        return "sft"
    section, name = path.split(".", 1)
    return {"lora": LORA_DEFAULTS, "training": TRAINING_DEFAULTS, "data": DATA_DEFAULTS,
            "model": MODEL_DEFAULTS, **METHOD_DEFAULTS}[section][name]


def default_text(path: str) -> Any:
    """A field's default as its control holds it (text for inputs, a key for tristates)."""
    return to_control(FIELD_BY_PATH[path], default_value(path))


def to_control(field: Field, value: Any) -> Any:
    """A config value as the field's control holds it."""
    if field.kind in NUMBER_KINDS:
        return format_number(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
    if field.kind == "names":
        return ", ".join(value) if isinstance(value, list) else str(value or "")
    if field.kind == "tristate":
        return "auto" if value is None else ("true" if value else "false")
    if field.kind == "bool":
        return bool(value)
    return value


def format_number(value: float) -> str:
    """A number as a person would type it: ``16``, ``0.05``, ``2e-04`` stays ``0.0002``."""
    if isinstance(value, int):
        return str(value)
    if value == int(value) and abs(value) < 1e15:
        return f"{value:.1f}"
    return f"{value:g}"


def parse(field: Field, raw: Any) -> tuple[Any, str]:
    """(value, error) of a control's content; error is "" when it is fine. The error is a
    sentence for the user, naming the allowed range."""
    kind = field.kind
    if kind == "bool":
        return bool(raw), ""
    if kind == "tristate":
        return TRISTATE.get(raw, None), ""
    if kind == "choice":
        if raw not in field.choices:
            return raw, f"choose one of {', '.join(field.choices)}"
        return raw, ""
    if kind == "names":
        names = [n for n in re.split(r"[,\s]+", str(raw or "")) if n]
        bad = [n for n in names if not _MODULE_NAME.match(n)]
        if bad:
            return names, f"not a module name: {bad[0]!r} (letters, digits, _ and .)"
        return names, ""
    if kind == "text":
        return str(raw or "").strip(), ""
    text = str(raw or "").strip().replace("_", "")
    if not text:
        return None, "required: " + _range_text(field)
    if kind == "steps":
        return _parse_steps(field, text, raw)
    try:
        value: Any = int(text) if kind == "int" else float(text)
    except ValueError:
        return None, f"not {'a whole number' if kind == 'int' else 'a number'}: {raw!r}; " + _range_text(field)
    if kind == "float" and not math.isfinite(value):
        return None, "must be a finite number"
    if field.also is not None and value == field.also:
        return value, ""
    low, high = field.minimum, field.maximum
    if low is not None and (value < low or (field.low_open and value <= low)):
        return value, "out of range: " + _range_text(field)
    if high is not None and (value > high or (field.open_max and value >= high)):
        return value, "out of range: " + _range_text(field)
    return value, ""


def _parse_steps(field: Field, text: str, raw: Any) -> tuple[Any, str]:
    """A whole number of steps (at least the field's minimum) or a fraction of the run in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        return None, f"not a number: {raw!r}; " + _range_text(field)
    if math.isfinite(value) and 0 < value < 1:
        return value, ""
    if math.isfinite(value) and value == int(value) and value >= (field.minimum or 0):
        return int(value), ""
    return value, "out of range: " + _range_text(field)


def _range_text(field: Field) -> str:
    if field.kind == "steps":
        zero = "0 (only at the end), " if field.minimum == 0 else ""
        return f"{zero}a whole number of steps of at least 1, or a fraction of the run below 1"
    low, high = field.minimum, field.maximum
    what = "a whole number" if field.kind == "int" else "a number"
    if low is not None and high is not None:
        if field.low_open:
            return (f"{what} above {format_number(low)} and {'below' if field.open_max else 'at most'} "
                    f"{format_number(high)}")
        return f"{what} from {format_number(low)} to {'below ' if field.open_max else ''}{format_number(high)}"
    parts = []
    if low is not None:
        parts.append(f"{what} {'above' if field.low_open else 'of at least'} {format_number(low)}")
    if field.also is not None:
        parts.append(f"or {format_number(field.also)}")
    return " ".join(parts) or what


def method_of(path: str) -> str:
    """The method a field belongs to ("" for the fields every method has)."""
    section = path.split(".", 1)[0] if "." in path else ""
    return section if section in P.METHOD_SETTINGS else ""


def shown_for(path: str, method: str) -> bool:
    """Whether the form shows field ``path`` for a run of ``method``: a method's own fields for
    that method only; SFT's (packing, the loss mask) for SFT only."""
    own = method_of(path)
    if own:
        return own == method
    if path in SFT_ONLY:
        return method == "sft"
    return True


#: Settings only SFT uses (a preference run trains on whole pairs, prompt masked).
SFT_ONLY = ("training.packing", "data.loss")


def cross_errors(config: dict[str, Any]) -> dict[str, str]:
    """Checks across fields, on a built config: keyed by dotted path."""
    errors: dict[str, str] = {}
    training, lora = config.get("training", {}), config.get("lora", {})
    if training.get("bf16") is True and training.get("fp16") is True:
        errors["training.fp16"] = "bf16 and fp16 cannot both be on: choose one (or auto)"
    target = lora.get("target_modules")
    if isinstance(target, list) and not target:
        errors[TARGET_MODULES] = "pick at least one module, or all-linear"
    # An empty model source or data path is no error: the backend then trains the embedded tiny
    # model on the shipped sample dataset (the run config a user starts from).
    return errors


def build_config(values: dict[str, Any], model: dict[str, Any] | None, data: dict[str, Any] | None,
                 name: str = "") -> dict[str, Any]:
    """The ``protocol.RunConfig`` dict of the form's parsed ``values`` (by dotted path), the
    Model pane's settings and the Data pane's prepared dataset (whose ``max_length`` and
    ``loss`` the form overrides). Missing values fall back to the protocol's defaults."""
    sections: dict[str, dict[str, Any]] = {
        "model": {**MODEL_DEFAULTS, **(model or {})},
        "data": {**DATA_DEFAULTS, **(data or {})},
        "lora": dict(LORA_DEFAULTS),
        "training": dict(TRAINING_DEFAULTS),
        **{m: dict(d) for m, d in METHOD_DEFAULTS.items()},
    }
    method = values.get(METHOD) or "sft"
    for path, value in values.items():
        if path == METHOD:
            continue
        section, key = path.split(".", 1)
        if value is None and FIELD_BY_PATH.get(path, Field(path, "", "")).kind in NUMBER_KINDS:
            continue  # unparseable: the default stands in; the field shows its error
        sections[section][key] = value
    return {"version": P.RUN_CONFIG_VERSION, "name": name, "method": method, **sections}


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """The form's values (by dotted path) of a run config (an imported file, a preset)."""
    out: dict[str, Any] = {METHOD: config.get(METHOD) or "sft"}
    for section in ("lora", "training", "data", *P.METHOD_SETTINGS):
        for key, value in (config.get(section) or {}).items():
            path = f"{section}.{key}"
            if path in FIELD_BY_PATH or path == TARGET_MODULES:
                out[path] = value
    return out


# Figures ------------------------------------------------------------------------------------


def size(n: Any) -> str:
    """Bytes as people read them (``9.81 GiB``); "n/a" for None."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return "n/a"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


def trainable_text(result: dict[str, Any]) -> str:
    """The trainable parameters as peft's ``print_trainable_parameters`` says them."""
    trainable, total = result.get("trainable_params"), result.get("total_params")
    if not isinstance(trainable, int) or not isinstance(total, int):
        return "trainable params: n/a"
    percent = result.get("trainable_percent")
    if not isinstance(percent, (int, float)):
        percent = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}"


VERDICT_MARKS = {"fits": "✔ fits", "tight": "⚠ tight", "will not fit": "✖ will not fit"}


def memory_text(memory: dict[str, Any]) -> str:
    """The run's memory estimate against the device."""
    if not memory:
        return ""
    verdict = memory.get("verdict", "")
    text = f"memory ~{size(memory.get('total_bytes'))}"
    if memory.get("free_bytes") is not None:
        text += f" of {size(memory.get('free_bytes'))} free"
    if memory.get("device"):
        text += f" on {memory['device']}"
    return f"{text} → {VERDICT_MARKS.get(verdict, verdict)}" if verdict else text


def speed_text(plan: dict[str, Any]) -> str:
    """The speed levers the run will take on a GPU (``train.validate``'s ``speed``), in short;
    nothing where none is taken (the CPU, speed manual)."""
    if not plan or not plan.get("compile"):
        return ""
    parts = [plan.get("speed", ""), "compiled"]
    parts.append("checkpointing" if plan.get("gradient_checkpointing") else "no checkpointing")
    if plan.get("bf16_base"):
        parts.append("bf16 weight copy")
    if plan.get("optim"):
        parts.append(f"optimizer {plan['optim']}")
    parts.append(f"micro-batch {plan.get('per_device_train_batch_size')}×{plan.get('gradient_accumulation_steps')}")
    return ": ".join(parts[:1]) + " " + ", ".join(parts[1:])


def model_line(model: dict[str, Any], origin: str) -> str:
    """The base model section in one line: which model, how it is quantized, where it comes from.
    An empty source is the backend's embedded tiny model."""
    model = {**MODEL_DEFAULTS, **model}
    precision = model["precision"]
    if precision == "4bit":
        quant = (f"4-bit {model['quant_type']}, compute {model['compute_dtype']}"
                 + (", double quant" if model["double_quant"] else ""))
    elif precision == "8bit":
        quant = "8-bit"
    else:
        quant = precision
    if model["source"]:
        parts = model["source"].rstrip("/").rsplit("/", 2)
        name = "/".join(parts[-2:]) if len(parts) > 1 else parts[0]
    else:
        name = "embedded tiny model"
    where = f"({origin})" if origin else "(choose another in the Model tab)"
    return f"model   {name} · {quant} · {model['device']}  {where}"


def data_line(data: dict[str, Any], origin: str) -> str:
    """The prepared dataset in one line: the source, the template and the validation rows. An
    empty path is the shipped sample dataset."""
    data = {**DATA_DEFAULTS, **data}
    source = (data.get("source") or {}).get("path", "")
    name = source.rstrip("/").rsplit("/", 1)[-1] if source else "shipped sample dataset"
    split = {"none": "no validation",
             "ratio": f"validation {data['validation_ratio']:g} of the rows",
             "split": f"validation split {data['validation_split'] or '?'}"}.get(data["split_mode"], "")
    where = f"({origin})" if origin else "(open another in the Data tab)"
    return f"data    {name} · template {data['template']} · {split}  {where}"
