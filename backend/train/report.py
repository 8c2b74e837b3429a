"""Reporting: trl's logs as ``train.log`` rows (a step's training and evaluation logs merged),
checkpoints as ``train.checkpoint``, NaN/inf losses as ``train.alert`` (:class:`Reporter`,
:func:`make_callback`); and the small pieces the trainer is built from.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

from backend import train_config as TC
from backend.methods import base as methods_base
from backend.train import launch


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
            "output_dir": str(self.output_dir), "resumed_from": self.resumed_from, "start_step": self.start_step,
            "processes": launch.world_size(), "global_batch": TC.global_batch(self.config)})
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

    at_step_end = getattr(ctx, "at_step_end", None)

    class QlwCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            reporter.on_train_begin(state)

        def on_step_end(self, args, state, control, **kwargs):
            reporter.on_step_end(state)
            if at_step_end is not None:
                at_step_end()  # a rank of a launched run: the ranks agree on a stop (backend/train/worker.py)
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

