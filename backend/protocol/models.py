"""Models: the base model (backend/models/, tui/widgets/model/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backend.protocol.core import event, request


# --------------------------------------------------------------------------------------------
# Models: the base model (backend/models/, tui/widgets/model/).
#
# How to load a base model is plain data, :class:`ModelSettings`: the same fields are the
# parameters of ``model.estimate`` (what it will cost, from config.json alone) and of ``model.load``
# (the job), and they are recorded with the session (``job.started`` and ``model.loaded``).

#: bitsandbytes 4-bit or 8-bit, or unquantized.
MODEL_PRECISIONS = ("4bit", "8bit", "bf16", "fp16", "fp32")
#: bitsandbytes' 4-bit data types.
MODEL_QUANT_TYPES = ("nf4", "fp4")
#: The dtype 4-bit layers compute in (and the unquantized modules are stored in).
MODEL_COMPUTE_DTYPES = ("bf16", "fp16", "fp32")
#: transformers' ``attn_implementation``; flash_attention_2 only where flash-attn is installed.
MODEL_ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
#: The estimate's verdicts: the model plus room to train, the model alone, or not even that.
MODEL_VERDICTS = ("fits", "tight", "will not fit")


@dataclass
class ModelSettings:
    """How to load a base model, as plain data.

    ``source``: a local folder (holding config.json and the weights) or a Hub id, at ``revision``
    (a branch, tag or commit; empty: main). ``trust_remote_code`` lets a model run its own Python
    code from its repository (off unless the user turns it on). ``precision``: one of
    ``MODEL_PRECISIONS``; for 4-bit, ``quant_type`` (nf4/fp4), ``double_quant`` and
    ``compute_dtype`` (``MODEL_COMPUTE_DTYPES``); 8-bit keeps the other modules in fp16.
    ``attn_implementation``: one of ``MODEL_ATTN_IMPLEMENTATIONS``. ``device``: ``auto`` (the first
    GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; the whole model goes there.
    """

    source: str
    revision: str = ""
    trust_remote_code: bool = False
    precision: str = "4bit"
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bf16"
    attn_implementation: str = "sdpa"
    device: str = "auto"


@request("model.options")
class ModelOptions:
    """What this backend can load with: ``{"precisions", "quant_types", "compute_dtypes",
    "attn_implementations" (installed ones only), "devices": [{"device", "name", "free_bytes",
    "total_bytes"}, ...] (auto first, then each GPU, then the CPU), "bitsandbytes", "offline"
    (the Hub is off), "tiny_path", "tiny_ready"}``. Creates no CUDA context."""


@request("model.estimate")
class EstimateModel(ModelSettings):
    """What loading with these settings takes, from config.json alone (no weights are read): the
    exact parameter count, the bytes of weights, buffers and quantization state, the free memory
    of the device, and ``verdict`` (one of ``MODEL_VERDICTS``). Result keys: ``source``,
    ``architecture``, ``model_type``, ``layers``, ``parameters``, ``quantized_parameters``,
    ``unquantized_parameters``, ``unquantized_linear`` (linear layers bitsandbytes keeps in 16
    bits: the output head, tied weights), ``precision_label``, ``dtype``, ``weight_bytes``, ``buffer_bytes``,
    ``quant_state_bytes``, ``footprint_bytes`` (what ``get_memory_footprint`` will say),
    ``total_bytes`` (with the quantization state), ``device``, ``free_bytes``, ``reclaimed_bytes``
    (a loaded model that the load would replace), ``context_bytes`` (a CUDA context still to be
    created), ``verdict``, ``shards``, ``disk_bytes``. A bad source or config is an ``error``
    reply whose result is ``{"error": {"message", "where", "hint"}}``; offline, an uncached Hub id
    fails at once."""


@request("model.load")
class LoadModel(ModelSettings):
    """Job: release the held base model, then load this one (and its tokenizer) with progress by
    shard (``job.progress``: stage ``loading weights``, ``done``/``total`` in shards); cancellable
    between tensors. Ends with a ``model.loaded`` event; the ``job.finished`` result has the
    estimate beside the measured footprint (``estimate``, ``measured``, ``comparison``)."""


@request("model.inspect")
class InspectModel:
    """The held base model: ``{"loaded": false}``, or what ``model.loaded``'s ``inspect`` holds
    (architecture, layers, parameters, dtype, quantization, device, ``linear_groups``:
    ``[{"name", "count", "shapes": [[out, in], ...], "quantized", "in_all_linear"}]`` and
    ``tokenizer``: vocab size, special tokens, ``has_pad`` and ``pad_fix``,
    ``has_chat_template``) plus ``load``: how it was loaded and what it measured (``settings``,
    ``source``, ``device``, ``estimate``, ``measured``, ``comparison``, ``load_seconds``, as in
    ``model.loaded``)."""


@event("model.loaded")
class ModelLoaded:
    """A base model was loaded and is held by the backend (replacing any earlier one).

    ``settings``: the :class:`ModelSettings` used, as a dict. ``estimate``: the answer
    ``model.estimate`` gives. ``measured``: ``footprint_bytes`` (``get_memory_footprint``),
    ``quant_state_bytes``, ``tensor_bytes`` (their sum), ``torch_allocated_bytes`` and
    ``torch_peak_bytes`` (CUDA; null on the CPU), ``rss_delta_bytes``. ``comparison``: measured
    over estimated. ``inspect``: as ``model.inspect``."""

    settings: dict[str, Any]
    source: str
    source_path: str
    device: str
    estimate: dict[str, Any]
    measured: dict[str, Any]
    comparison: dict[str, Any] = field(default_factory=dict)
    inspect: dict[str, Any] = field(default_factory=dict)
    load_seconds: float = 0.0
    tokenizer_error: str = ""

