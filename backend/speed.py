"""The training run's speed levers, chosen against a memory budget (``training.speed``).

Each lever trades memory for time. All but the fused optimizer compute exactly what the run
without them computes; the fused optimizer keeps 32-bit moments where bitsandbytes keeps 8-bit
ones (see below):

- ``compile``: every decoder layer is compiled with ``torch.compile`` as one region (the layers
  share one graph, so the first steps compile once for all of them). bitsandbytes' 4-bit ops and
  peft's LoRA layers trace; the code between the layers stays eager.
- ``gradient_checkpointing`` off: the layers keep their activations for the backward pass instead
  of running each layer's forward twice (about a quarter of a step's work), at the cost of those
  activations.
- ``bf16_base``: a bf16 copy of the 4-bit base weights, dequantised once, serves the training
  step's matmuls. A 4-bit layer dequantises its weights to the compute dtype and multiplies in
  that dtype anyway (bitsandbytes' ``matmul_4bit`` for inputs of more than one row), so the copy
  gives the same products without dequantising in every forward, recompute and backward. The
  4-bit weights stay as they are, and the copy is dropped when the run ends.
- fused optimizer: torch's fused AdamW (one kernel for every adapter tensor, 32-bit moments) in
  place of bitsandbytes' AdamW (``paged_adamw_8bit`` and the other bitsandbytes AdamW names), or of
  the unfused ``adamw_torch``. bitsandbytes updates one tensor at a time and synchronises the GPU
  after each (``bitsandbytes.utils.sync_gpu``, 448 times a step for r=16 on the seven projections
  of a 32-layer model), which the H100 profile put at 15% of a step. The 8-bit moments are a
  block-wise quantisation of the 32-bit ones, so this is the update the 8-bit optimizer
  approximates (same betas, epsilon, weight decay and learning rate), for 6 more bytes per trainable
  parameter; the losses are compared step by step in ``bench/train_speed.py --equality``.
- micro-batch: ``lean`` runs one sequence per micro-step and accumulates the rest (the same rows
  per optimizer step: trl normalises the loss by the tokens of the whole step); ``fast`` halves the
  micro-batch only where that lets checkpointing go.

``speed = "fast"`` takes the first of these combinations, fastest first, whose memory estimate
(the estimate the LoRA form shows) fits ``memory_budget`` (GiB; 0: 90% of what the device has
for the run); ``"lean"`` takes the smallest footprint; ``"manual"`` takes the switches as set. On
the CPU no lever is taken: compiling costs more than it saves on the small runs a CPU trains.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

GIB = 2**30
#: The share of the device's memory that ``memory_budget = 0`` lets a run take.
DEFAULT_BUDGET_SHARE = 0.9
#: ``fast`` splits a micro-batch only while each micro-step keeps at least this many tokens
#: (below it a step is bound by launching kernels, and checkpointing costs less than that).
MIN_SPLIT_TOKENS = 2048
#: The optimizers ``fast`` replaces with torch's fused AdamW (the same update rule, 32-bit moments).
FUSED_OPTIMIZER = "adamw_torch_fused"
FUSABLE_OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_32bit", "paged_adamw",
                      "adamw_torch")
#: torch.compile's backend for the compiled layers (the CPU tests trace with ``aot_eager``: the
#: same graphs, without generating kernels).
COMPILE_BACKEND = "inductor"


@dataclass
class SpeedPlan:
    """What a run takes of the levers, and why (plain data: it goes into events and the store)."""

    speed: str
    compile: bool = False
    gradient_checkpointing: bool = True
    bf16_base: bool = False
    #: The optimizer the run takes instead of the configured one ("" when it keeps it).
    optim: str = ""
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    estimate_bytes: int | None = None
    budget_bytes: int | None = None
    reasons: list[str] = field(default_factory=list)

    def training(self, training: dict[str, Any]) -> dict[str, Any]:
        """``training`` (a run's training section) with the levers that go through the trainer's
        arguments: checkpointing, the micro-batch and the optimizer."""
        out = {**training, "gradient_checkpointing": self.gradient_checkpointing,
               "per_device_train_batch_size": self.per_device_train_batch_size,
               "gradient_accumulation_steps": self.gradient_accumulation_steps}
        if self.optim:
            out["optim"] = self.optim
        return out

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for the run's log: the levers taken, the estimate against the budget, why."""
        taken = [name for name, on in (("compiled layers", self.compile),
                                        ("bf16 copy of the 4-bit weights", self.bf16_base),
                                        (f"{self.optim} optimizer", bool(self.optim))) if on]
        taken.append("gradient checkpointing" if self.gradient_checkpointing else "no gradient checkpointing")
        taken.append(f"micro-batch {self.per_device_train_batch_size} x accumulation {self.gradient_accumulation_steps}")
        fit = ""
        if self.estimate_bytes is not None and self.budget_bytes is not None:
            fit = f" (about {self.estimate_bytes / GIB:.1f} GiB of a {self.budget_bytes / GIB:.1f} GiB budget)"
        why = f": {'; '.join(self.reasons)}" if self.reasons else ""
        return f"speed {self.speed}: {', '.join(taken)}{fit}{why}"


def budget_bytes(memory_budget_gib: float, available_bytes: int | None) -> int | None:
    """The run's memory budget: ``memory_budget`` GiB when set, else 90% of ``available_bytes``
    (what the device has for the run, the loaded model included)."""
    if memory_budget_gib and memory_budget_gib > 0:
        return int(memory_budget_gib * GIB)
    if available_bytes is None:
        return None
    return int(available_bytes * DEFAULT_BUDGET_SHARE)


def candidates(batch: int, ga: int, tokens_per_sequence: int, can_copy: bool):
    """``fast``'s combinations, fastest first: (checkpointing, bf16 copy, micro-batch, accumulation).

    The weight copy goes before a larger micro-batch: on an H100 (bench/README.md, issue 14's third
    run) 8 packed sequences of 2,048 tokens split in 2 without the copy ran at 3,402 tokens/s, where
    one such sequence per micro-step with the copy (``mix``) ran at 5,286."""
    splits = [1]
    while batch // (splits[-1] * 2) >= 1 and batch % (splits[-1] * 2) == 0 \
            and (batch // (splits[-1] * 2)) * tokens_per_sequence >= MIN_SPLIT_TOKENS:
        splits.append(splits[-1] * 2)
    copies = (True, False) if can_copy else (False,)
    for copy in copies:
        for split in splits:
            yield False, copy, batch // split, ga * split
    for copy in copies:
        yield True, copy, batch, ga


def plan(training: dict[str, Any], device: str, *, tokens_per_sequence: int, estimate: Callable[[dict], int] | None,
         budget: int | None, copy_bytes: int = 0, quantized_4bit: bool = False) -> SpeedPlan:
    """The levers for ``training`` (the effective training section) on ``device``.

    ``estimate(training_section) -> bytes`` is the run's memory estimate with a training section
    changed as a lever would change it (checkpointing, micro-batch); ``copy_bytes`` what the bf16
    copy of the 4-bit weights adds (0 when the model is not 4-bit); ``budget`` the bytes the run
    may take (:func:`budget_bytes`), ``None`` when unknown."""
    speed = training.get("speed", "fast")
    batch, ga = int(training["per_device_train_batch_size"]), int(training["gradient_accumulation_steps"])
    p = SpeedPlan(speed=speed, gradient_checkpointing=bool(training["gradient_checkpointing"]),
                  per_device_train_batch_size=batch, gradient_accumulation_steps=ga, budget_bytes=budget)

    def total(gc: bool, copy: bool, micro: int, acc: int, optim: str = "") -> int | None:
        if estimate is None:
            return None
        t = {**training, "gradient_checkpointing": gc, "per_device_train_batch_size": micro,
             "gradient_accumulation_steps": acc}
        if optim:
            t["optim"] = optim
        return int(estimate(t)) + (copy_bytes if copy else 0)

    if speed == "manual":
        p.estimate_bytes = total(p.gradient_checkpointing, False, batch, ga)
        p.reasons.append("the switches as set")
        return p
    if not device.startswith("cuda"):
        p.estimate_bytes = total(p.gradient_checkpointing, False, batch, ga)
        p.reasons.append("on the CPU the switches as set: compiling costs more than it saves on a CPU run")
        return p
    p.compile = True
    if speed == "lean":
        p.gradient_checkpointing, p.per_device_train_batch_size, p.gradient_accumulation_steps = True, 1, batch * ga
        p.estimate_bytes = total(True, False, 1, batch * ga)
        p.reasons.append("the smallest footprint: one sequence per micro-step, checkpointing, no weight copy")
        return p
    can_copy = quantized_4bit and copy_bytes > 0
    if budget is None or estimate is None:
        p.estimate_bytes = total(p.gradient_checkpointing, False, batch, ga)
        p.reasons.append("no memory estimate for this device: checkpointing as set, no weight copy")
        return p
    configured = str(training.get("optim", ""))
    optims = (FUSED_OPTIMIZER, "") if configured in FUSABLE_OPTIMIZERS else ("",)
    for (gc, copy, micro, acc), optim in ((c, o) for c in candidates(batch, ga, tokens_per_sequence, can_copy)
                                          for o in optims):
        need = total(gc, copy, micro, acc, optim)
        if need is not None and need <= budget:
            p.gradient_checkpointing, p.bf16_base, p.optim = gc, copy, optim
            if optim:
                why = ("one fused update for every adapter tensor (bitsandbytes updates them one at a time "
                       "with a GPU synchronise after each), with the 32-bit moments the 8-bit ones approximate"
                       if "8bit" in configured else "the same update in one fused kernel")
                p.reasons.append(f"{optim} in place of {configured}: {why}")
            elif len(optims) > 1:
                p.reasons.append(f"no room for {FUSED_OPTIMIZER}'s 32-bit moments: {configured} stays")
            p.per_device_train_batch_size, p.gradient_accumulation_steps = micro, acc
            p.estimate_bytes = need
            if micro != batch:
                p.reasons.append(f"micro-batch {batch} split in {batch // micro} so that checkpointing can go"
                                 + (" and the weight copy fits" if copy else ""))
            if gc:
                p.reasons.append("no room for the activations of every layer: checkpointing stays")
            elif can_copy and not copy:
                p.reasons.append(f"no room for the {copy_bytes / GIB:.1f} GiB weight copy")
            return p
    p.gradient_checkpointing = True
    p.estimate_bytes = total(True, False, batch, ga)
    p.reasons.append("even the smallest setting is estimated above the budget: checkpointing on, as little as possible")
    return p


# Applying a plan to the model a trainer trains ---------------------------------------------------------------


def decoder_layers(model) -> list:
    """The model's decoder layers (transformers' ``GradientCheckpointingLayer`` instances)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def four_bit_lora_layers(model) -> list:
    """peft LoRA layers whose base layer is a bitsandbytes 4-bit linear layer."""
    try:
        import bitsandbytes as bnb
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [m for m in model.modules()
            if isinstance(m, BaseTunerLayer) and isinstance(getattr(m, "base_layer", None), bnb.nn.Linear4bit)]


def four_bit_params(model) -> int:
    """The parameter count of the 4-bit linear layers (what a bf16 copy holds, 2 bytes each)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    total = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            total += int(m.in_features) * int(m.out_features)
    return total


def dequantized_linear(layer):
    """A plain ``nn.Linear`` holding ``layer``'s (a bitsandbytes ``Linear4bit``) weights dequantised
    to its compute dtype, frozen: the product bitsandbytes computes for a multi-row input."""
    import bitsandbytes.functional as BF
    import torch

    weight = layer.weight
    dtype = layer.compute_dtype or weight.quant_state.dtype
    dense = BF.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    out = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=dense.device, dtype=dtype)
    out.weight = torch.nn.Parameter(dense, requires_grad=False)
    if layer.bias is not None:
        out.bias = torch.nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return out


class Applied:
    """What :func:`apply` changed in the model, undone by :meth:`restore` (before peft unloads the
    adapter, so that the held base model goes back exactly as it was loaded)."""

    def __init__(self):
        self.swapped: list[tuple[Any, Any]] = []
        self.compiled: list[Any] = []

    def restore(self) -> None:
        for lora_layer, base in reversed(self.swapped):
            lora_layer.base_layer = base
        self.swapped.clear()
        for layer in self.compiled:
            # Module.compile() keeps the compiled call in this instance attribute; deleting it
            # brings back the class default (None), i.e. the eager call.
            layer.__dict__.pop("_compiled_call_impl", None)
        self.compiled.clear()


def apply(model, p: SpeedPlan, *, compile_backend: str | None = None) -> Applied:
    """Apply ``p``'s model levers (the bf16 weight copy, compiled layers) to ``model`` (the peft
    model a trainer holds); checkpointing and the micro-batch go through the trainer's arguments.
    ``compile_backend``: torch.compile's backend (default :data:`COMPILE_BACKEND`)."""
    applied = Applied()
    compile_backend = compile_backend or COMPILE_BACKEND
    try:
        if p.bf16_base:
            for lora_layer in four_bit_lora_layers(model):
                base = lora_layer.base_layer
                lora_layer.base_layer = dequantized_linear(base)
                applied.swapped.append((lora_layer, base))
        if p.compile:
            for layer in decoder_layers(model):
                layer.compile(backend=compile_backend)
                applied.compiled.append(layer)
    except Exception:
        applied.restore()
        raise
    return applied
