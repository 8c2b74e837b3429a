"""The run config of the LoRA form as plain data: its fields, local checks and formatting.

No widget here. Each :class:`Field` names one setting by its dotted path in the run config
(``"lora.r"``, ``"training.learning_rate"``, ``"data.max_length"``) and by the name peft, trl and
transformers give it, with the type and range the form checks as the user types (the backend's
``train.validate`` checks the rest). :func:`build_config` turns the form's values plus the Model
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

#: The two ``bool | None`` settings (``bf16``, ``fp16``) as a three-way choice.
TRISTATE = {"auto": None, "true": True, "false": False}
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


@dataclass(frozen=True)
class Field:
    """One setting of the form. ``kind``: int, float, bool, choice, tristate, names (a list of
    module names) or text. ``minimum``/``maximum`` bound numbers (``open_max``: the maximum
    itself is out); ``also`` is one more allowed value outside the range (max_steps' -1)."""

    path: str
    kind: str
    help: str
    minimum: float | None = None
    maximum: float | None = None
    open_max: bool = False
    also: float | None = None
    choices: tuple[str, ...] = ()

    @property
    def section(self) -> str:
        return self.path.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.path.split(".", 1)[1]

    @property
    def dom_id(self) -> str:
        return "f-" + self.path.replace(".", "-").replace("_", "-")


def _f(path, kind, help, **kw) -> Field:
    return Field(path, kind, help, **kw)


#: The form's fields in the order shown, section by section (``target_modules`` has its own
#: picker; the model's quantization is the Model pane's, shown as a line).
FIELDS: tuple[Field, ...] = (
    # peft LoraConfig
    _f("lora.r", "int", "LoRA rank: the width of the low-rank update (8-64 typical).", minimum=1),
    _f("lora.lora_alpha", "int", "LoRA scaling numerator: the update is scaled by lora_alpha/r "
       "(by lora_alpha/sqrt(r) with use_rslora).", minimum=1),
    _f("lora.lora_dropout", "float", "Dropout on the LoRA input, 0 to below 1 (0.05 in QLoRA).",
       minimum=0, maximum=1, open_max=True),
    _f("lora.bias", "choice", "Which biases train: none, all, or those of the LoRA layers.",
       choices=P.LORA_BIASES),
    _f("lora.use_rslora", "bool", "Rank-stabilised LoRA: scale by lora_alpha/sqrt(r)."),
    _f("lora.use_dora", "bool", "DoRA: weight-decomposed LoRA (slower, sometimes better)."),
    _f("lora.modules_to_save", "names", "Modules trained in full and saved with the adapter, "
       "comma-separated (e.g. lm_head, embed_tokens after adding tokens)."),
    # trl SFTConfig / TrainingArguments: length of the run
    _f("training.num_train_epochs", "float", "Passes over the training rows (used when max_steps is -1).",
       minimum=0, also=None),
    _f("training.max_steps", "int", "Optimizer steps in all; -1: run num_train_epochs instead.",
       minimum=1, also=-1),
    _f("training.per_device_train_batch_size", "int", "Rows per forward pass.", minimum=1),
    _f("training.gradient_accumulation_steps", "int", "Forward passes per optimizer step "
       "(effective batch = batch size × this).", minimum=1),
    _f("training.auto_find_batch_size", "bool", "Halve the batch size and retry on CUDA out-of-memory."),
    _f("training.gradient_checkpointing", "bool", "Recompute activations in the backward pass: "
       "much less memory, about 30% slower (speed fast/lean decide it on a GPU)."),
    _f("training.speed", "choice", "fast: the fastest levers that fit memory_budget (compiled layers, "
       "checkpointing off, a bf16 weight copy); lean: the smallest footprint; manual: the switches as set. "
       "The same math either way; the CPU takes the switches as set.", choices=P.SPEEDS),
    _f("training.memory_budget", "float", "GiB the run may take on the GPU, for speed fast; "
       "0: 90% of what the device has.", minimum=0),
    # optimizer and schedule
    _f("training.learning_rate", "float", "Peak learning rate (2e-4 in QLoRA).", minimum=0, maximum=1),
    _f("training.lr_scheduler_type", "choice", "How the learning rate moves after warmup.",
       choices=P.LR_SCHEDULERS),
    _f("training.warmup_ratio", "float", "Fraction of the steps spent warming up, 0 to below 1.",
       minimum=0, maximum=1, open_max=True),
    _f("training.warmup_steps", "int", "Warmup in steps; overrides warmup_ratio when above 0.", minimum=0),
    _f("training.optim", "choice", "Optimizer; paged_adamw_8bit is QLoRA's (needs bitsandbytes).",
       choices=P.OPTIMIZERS),
    _f("training.weight_decay", "float", "Decoupled weight decay (0 in QLoRA).", minimum=0),
    _f("training.max_grad_norm", "float", "Gradient clipping norm (0.3 in QLoRA); 0: no clipping.", minimum=0),
    # logging, evaluation, saving, precision
    _f("training.logging_steps", "int", "A row of the loss table every this many steps.", minimum=1),
    _f("training.eval_steps", "int", "Validation loss every this many steps; 0: only at the end.", minimum=0),
    _f("training.save_steps", "int", "A checkpoint every this many steps; 0: only at the end.", minimum=0),
    _f("training.save_total_limit", "int", "Checkpoints kept (older ones are deleted).", minimum=1),
    _f("training.seed", "int", "Seed of the run (shuffling, dropout, LoRA init).", minimum=0),
    _f("training.bf16", "tristate", "bf16 mixed precision; auto: from the model's compute dtype "
       "and the device."),
    _f("training.fp16", "tristate", "fp16 mixed precision; auto: from the model's compute dtype "
       "and the device."),
    # the prepared dataset's settings shown here
    _f("data.max_length", "int", "trl's max_length in tokens: longer rows are cut (keeping the start).",
       minimum=1),
    _f("data.loss", "choice", "Which tokens count in the loss: auto, assistant_only (chat rows), "
       "completion_only (prompt/completion rows) or all.", choices=P.DATA_LOSSES),
    _f("training.packing", "bool", "Pack several short rows into one max_length sequence."),
)
FIELD_BY_PATH = {f.path: f for f in FIELDS}
#: Paths with their own widget rather than a :class:`Field` row.
TARGET_MODULES = "lora.target_modules"


def default_value(path: str) -> Any:
    """A field's default, from the protocol's dataclasses."""
    section, name = path.split(".", 1)
    return {"lora": LORA_DEFAULTS, "training": TRAINING_DEFAULTS, "data": DATA_DEFAULTS,
            "model": MODEL_DEFAULTS}[section][name]


def default_text(path: str) -> Any:
    """A field's default as its control holds it (text for inputs, a key for tristates)."""
    return to_control(FIELD_BY_PATH[path], default_value(path))


def to_control(field: Field, value: Any) -> Any:
    """A config value as the field's control holds it."""
    if field.kind in ("int", "float"):
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
    try:
        value: Any = int(text) if kind == "int" else float(text)
    except ValueError:
        return None, f"not {'a whole number' if kind == 'int' else 'a number'}: {raw!r}; " + _range_text(field)
    if kind == "float" and not math.isfinite(value):
        return None, "must be a finite number"
    if field.also is not None and value == field.also:
        return value, ""
    low, high = field.minimum, field.maximum
    # num_train_epochs, learning_rate: above 0 (a zero would train nothing).
    strict_low = kind == "float" and low == 0 and field.name in ("num_train_epochs", "learning_rate")
    if low is not None and (value < low or (strict_low and value <= low)):
        return value, "out of range: " + _range_text(field)
    if high is not None and (value > high or (field.open_max and value >= high)):
        return value, "out of range: " + _range_text(field)
    return value, ""


def _range_text(field: Field) -> str:
    low, high = field.minimum, field.maximum
    strict_low = field.kind == "float" and low == 0 and field.name in ("num_train_epochs", "learning_rate")
    what = "a whole number" if field.kind == "int" else "a number"
    if low is not None and high is not None:
        return f"{what} from {format_number(low)} to {'below ' if field.open_max else ''}{format_number(high)}"
    parts = []
    if low is not None:
        parts.append(f"{what} {'above' if strict_low else 'of at least'} {format_number(low)}")
    if field.also is not None:
        parts.append(f"or {format_number(field.also)}")
    return " ".join(parts) or what


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
    }
    for path, value in values.items():
        section, key = path.split(".", 1)
        if value is None and FIELD_BY_PATH.get(path, Field(path, "", "")).kind in ("int", "float"):
            continue  # unparseable: the default stands in; the field shows its error
        sections[section][key] = value
    return {"version": P.RUN_CONFIG_VERSION, "name": name, **sections}


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """The form's values (by dotted path) of a run config (an imported file, a preset)."""
    out: dict[str, Any] = {}
    for section in ("lora", "training", "data"):
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
