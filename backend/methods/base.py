"""The seam every training method plugs into: :class:`TrainingMethod`.

A method is a small class (one module per method in this package, picked by ``method`` in the run
config): the protocol dataclass of its settings (the run config's section of its name), the data
roles it needs, how the prepared dataset becomes its trl rows, how it builds its trl config and
trainer, and the log columns it reports. :func:`backend.train.run_training` does everything else
the same way for every method (the run config, the model, the callbacks, checkpoints, stop and
resume, OOM, the final adapter).

Shared here: peft's ``LoraConfig`` of the ``lora`` section, the ``TrainingArguments`` fields of
the ``training`` section (every trl config is a ``TrainingArguments``), and the mixin that
watches each micro-step's loss and carries the fault seam (``QLW_TRAIN_FAULT``) for any trl
trainer class. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar


FAULT_ENV = "QLW_TRAIN_FAULT"


class TrainingMethod:
    """One training method. Subclasses set the class attributes and implement :meth:`prepare`,
    :meth:`trl_config` and :meth:`build_trainer`."""

    #: ``RunConfig.method`` value, and the name of its settings section.
    name: ClassVar[str] = ""
    #: The protocol dataclass of the method's section (None: the method has none).
    settings_class: ClassVar[type | None] = None
    #: Data roles of which at least one set must be mapped (each tuple is one accepted set).
    roles: ClassVar[tuple[tuple[str, ...], ...]] = ()
    #: trl log names reported beside loss, eval_loss, learning_rate, grad_norm, tokens/s.
    log_columns: ClassVar[tuple[str, ...]] = ()

    def settings(self, eff: dict[str, Any]) -> dict[str, Any]:
        """The method's section of the (checked) run config; {} for a method without one."""
        return dict(eff.get(self.name) or {}) if self.settings_class is not None else {}

    def prepare(self, data: dict[str, Any], eff: dict[str, Any], home: Path, progress=None, cancelled=None, log=None):
        """The rows it trains on: a :class:`backend.data.Prepared` (train, validation, the trl
        config fields that go with the rows, a report). ``log(level, message)`` reports what was
        left out and why."""
        raise NotImplementedError

    def trl_config(self, eff: dict[str, Any], prepared, output_dir: Path, device: str, has_eval: bool):
        """trl's config object of this method for the checked, device-adapted config."""
        raise NotImplementedError

    def build_trainer(self, model, tokenizer, eff: dict[str, Any], prepared, args, callbacks: list, log=None):
        """trl's trainer (a subclass made by :func:`watched`), with peft LoRA on ``model``."""
        raise NotImplementedError


# Shared pieces ---------------------------------------------------------------------------------------


def lora_config(lora: dict[str, Any]):
    """peft's ``LoraConfig`` of the lora section (its field names are peft's)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=lora["lora_dropout"],
        target_modules=lora["target_modules"], bias=lora["bias"], use_rslora=lora["use_rslora"],
        use_dora=lora["use_dora"], modules_to_save=list(lora["modules_to_save"]) or None, task_type="CAUSAL_LM")


def training_kwargs(eff: dict[str, Any], config_class: type, output_dir: Path, device: str,
                    has_eval: bool) -> dict[str, Any]:
    """The ``TrainingArguments`` fields of the ``training`` section, as ``config_class`` (a trl
    config) names them; method-specific fields are the method's to add."""
    t = eff["training"]
    names = {f.name for f in dataclasses.fields(config_class)}
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        num_train_epochs=t["num_train_epochs"], max_steps=t["max_steps"], learning_rate=t["learning_rate"],
        lr_scheduler_type=t["lr_scheduler_type"], per_device_train_batch_size=t["per_device_train_batch_size"],
        per_device_eval_batch_size=t["per_device_train_batch_size"],
        gradient_accumulation_steps=t["gradient_accumulation_steps"], auto_find_batch_size=t["auto_find_batch_size"],
        optim=t["optim"], weight_decay=t["weight_decay"], max_grad_norm=t["max_grad_norm"],
        logging_strategy="steps", logging_steps=t["logging_steps"],
        eval_strategy="steps" if has_eval and t["eval_steps"] > 0 else "no",
        save_strategy="steps" if t["save_steps"] > 0 else "no",
        save_total_limit=t["save_total_limit"] or None, seed=t["seed"], bf16=bool(t["bf16"]), fp16=bool(t["fp16"]),
        use_cpu=device == "cpu", report_to="none", disable_tqdm=True,
    )
    if t["eval_steps"] > 0:
        kwargs["eval_steps"] = t["eval_steps"]
    if t["save_steps"] > 0:
        kwargs["save_steps"] = t["save_steps"]
    # transformers 5.x: warmup_steps takes a ratio when below 1 (warmup_ratio is gone); older: both.
    if "warmup_ratio" in names:
        kwargs.update(warmup_ratio=t["warmup_ratio"], warmup_steps=t["warmup_steps"])
    else:
        kwargs["warmup_steps"] = t["warmup_steps"] if t["warmup_steps"] > 0 else t["warmup_ratio"]
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (old name: a warning).
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    kwargs[key] = t["gradient_checkpointing"]
    from backend.train import launch

    if launch.world_size() > 1 and "ddp_find_unused_parameters" in names:
        # A rank of a launched run (issue 19): every LoRA weight gets a gradient each step, so DDP
        # need not walk the graph for unused ones (transformers' default does, without checkpointing).
        kwargs["ddp_find_unused_parameters"] = False
    for name in ("use_liger_kernel", "activation_offloading"):  # speed options; off: trl's defaults
        if t.get(name) and name in names:
            kwargs[name] = True
    # Issue 18: report_to (TensorBoard by default), run_name, early stopping's arguments (backend/watch.py).
    from backend import watch

    kwargs.update(watch.trainer_arguments(eff, has_eval, output_dir, names))
    return kwargs


_WATCHED: dict[type, type] = {}


def watched(trainer_class: type, prepare_inputs: Callable[[Any], Any] | None = None) -> type:
    """``trainer_class`` (a trl trainer) watching each micro-step's loss (``qlw_watch``: NaN/inf
    at once) and carrying the test seam (``qlw_fault``: an OOM, NaN or inf on step N). It changes
    nothing that is computed; ``prepare_inputs`` may hand the model an equivalent batch (SFT:
    equal-length packed rows stacked)."""
    key = (trainer_class, prepare_inputs)
    if key in _WATCHED:
        return _WATCHED[key]
    import torch

    class Watched(trainer_class):
        qlw_fault: tuple[str, int] | None = None
        qlw_step: int | None = None
        qlw_watch: Callable[[int, Any], None] | None = None

        def training_step(self, model, inputs, *args, **kwargs):
            if prepare_inputs is not None:
                inputs = prepare_inputs(inputs)
            step = self.qlw_step = self.state.global_step + 1
            fault = self.qlw_fault
            hook = None
            if fault and fault[1] == step:
                if fault[0] == "oom":
                    self.qlw_fault = None
                    raise torch.OutOfMemoryError(
                        f"CUDA out of memory. Tried to allocate 2.00 GiB (injected at step {step} by {FAULT_ENV})")
                value = float("nan") if fault[0] == "nan" else float("inf")
                hook = self.model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out * value)
            try:
                loss = super().training_step(model, inputs, *args, **kwargs)
            finally:
                if hook is not None:
                    hook.remove()
            self.qlw_step = None  # out of the step: an OOM now is in evaluation or saving
            if self.qlw_watch is not None:
                self.qlw_watch(step, loss)
            return loss

    Watched.__name__ = Watched.__qualname__ = f"Qlw{trainer_class.__name__}"
    _WATCHED[key] = Watched
    return Watched
