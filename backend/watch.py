"""The watch on a training run (issue 18): standard logs, a stop on a diverging loss, early
stopping, and notices when a run ends or stalls.

- :func:`trainer_arguments`: transformers' ``report_to`` from ``training.report_to`` (TensorBoard by
  default: its event files go to ``<run folder>/tensorboard``; W&B and MLflow when named), the run's
  name as ``run_name``, and what ``EarlyStoppingCallback`` needs (evaluation and saving on the same
  steps, ``load_best_model_at_end`` on ``eval_loss``). TensorBoard left in the default but not
  installed is dropped with a warning; W&B or MLflow named but not installed is an error naming
  the field, before anything is loaded.
- :class:`Guard` (made by :func:`backend.train.run_training`): the trainer callbacks. It sees
  every micro-step's loss (chained onto the trainer's ``qlw_watch``) and, with
  ``training.stop_on_divergence``, stops the run in ``on_pre_optimizer_step`` when a step's loss
  is NaN/inf or above ``divergence_factor`` times the run's first step's: the weights never take
  that update, the checkpoints saved so far stay, and the error says at which step, which
  checkpoint to resume from and what to change. ``training.early_stopping_patience`` adds
  transformers' ``EarlyStoppingCallback`` (and says so in the log when it stops the run).
- :class:`Notices` wraps the job context of a run (``train.start`` and ``qlw train``): it sees the
  run's events, watches for a stall (no step for ``training.stall_minutes``, from a small thread:
  the training thread is the one that is stuck), and at the end, or on a stall, emits
  ``run.notice`` (the front end rings the bell) and POSTs it to the webhook
  (:mod:`backend.notify`).

Nothing heavy at import: transformers is imported when the callbacks are made.
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from backend import notify
from backend.jobs import JobCancelled, JobError

#: What ``training.report_to`` may name (transformers' integration names).
REPORTERS = ("tensorboard", "wandb", "mlflow")
#: The package each reporter needs.
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}
#: Where W&B and MLflow write unless the user said otherwise when this process started: the run
#: folder, never the current directory.
_USER_ENV = {k: os.environ.get(k) for k in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI")}


def _installed(name: str) -> bool:
    return any(importlib.util.find_spec(p) is not None for p in _PACKAGES[name])


def reporters(eff: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(report_to, warnings)``: the reporters of the run that are installed. A missing W&B or
    MLflow raises :class:`JobError`; a missing TensorBoard is dropped with a warning."""
    wanted = list((eff.get("training") or {}).get("report_to") or [])
    out, warnings = [], []
    for name in wanted:
        if _installed(name):
            out.append(name)
        elif name == "tensorboard":
            warnings.append("tensorboard is not installed: this run writes no TensorBoard logs "
                            "(pip install tensorboard, or set training.report_to = [] to silence this)")
        else:
            raise JobError(f"training.report_to names {name}, which is not installed", where="training.report_to",
                           hint=f"pip install {name} in qlw's environment, or remove {name} from training.report_to")
    return out, warnings


def trainer_arguments(eff: dict[str, Any], has_eval: bool, output_dir: Path | None = None,
                      names: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """The ``TrainingArguments`` fields of the logs and early stopping. ``names``: the fields the
    trl config has (transformers before 5.2x still has ``logging_dir``, which its TensorBoard
    callback reads; later ones read the callback's own, set by :meth:`Guard.attach`)."""
    t = eff["training"]
    found, _ = reporters(eff)
    kwargs: dict[str, Any] = {"report_to": found or "none"}
    if output_dir is not None and "logging_dir" in names:
        kwargs["logging_dir"] = str(Path(output_dir).parent / "tensorboard")
    if eff.get("name"):
        kwargs["run_name"] = eff["name"]
    if early_stopping_on(eff, has_eval):
        # EarlyStoppingCallback reads the best metric that load_best_model_at_end keeps, which wants
        # saving on the evaluation steps.
        kwargs.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
                      save_strategy="steps", save_steps=t["eval_steps"])
    return kwargs


def early_stopping_on(eff: dict[str, Any], has_eval: bool) -> bool:
    t = eff["training"]
    return bool(t.get("early_stopping_patience")) and has_eval and bool(t.get("eval_steps"))


def _value(loss) -> float:
    try:
        return float(loss.detach().float().item())
    except AttributeError:
        return float(loss)


class Guard:
    """The trainer side of the watch, for one run (see the module's docstring)."""

    def __init__(self, eff: dict[str, Any], ctx, folder: Path):
        self.eff = eff
        self.ctx = ctx
        self.folder = Path(folder)
        t = eff["training"]
        self.stop = bool(t.get("stop_on_divergence", True))
        self.factor = float(t.get("divergence_factor") or 0.0)
        self.reporters, warnings = reporters(eff)
        for text in warnings:
            ctx.emit("log", {"level": "warning", "message": text})
        if "wandb" in self.reporters:
            if _USER_ENV["WANDB_DIR"] is None:
                os.environ["WANDB_DIR"] = str(self.folder)
            if _USER_ENV["WANDB_PROJECT"] is None:
                os.environ["WANDB_PROJECT"] = "qlw"
        if "mlflow" in self.reporters and _USER_ENV["MLFLOW_TRACKING_URI"] is None:
            os.environ["MLFLOW_TRACKING_URI"] = (self.folder / "mlruns").resolve().as_uri()
        self.pending: list[float] = []
        self.reference: float | None = None
        self.last_checkpoint: Callable[[], str] = lambda: ""

    # The trainer's side ---------------------------------------------------------------------------

    def attach(self, trainer) -> None:
        """Chain onto the trainer's loss watch; point TensorBoard at the run folder."""
        before = getattr(trainer, "qlw_watch", None)

        def watch(step: int, loss) -> None:
            if before is not None:
                before(step, loss)
            self.on_loss(step, loss)

        trainer.qlw_watch = watch
        for cb in trainer.callback_handler.callbacks:
            if type(cb).__name__ == "TensorBoardCallback" and getattr(cb, "logging_dir", None) is None:
                cb.logging_dir = str(self.folder / "tensorboard")  # TENSORBOARD_LOGGING_DIR, when set, wins

    def on_loss(self, step: int, loss) -> None:
        """One micro-step's loss."""
        self.pending.append(_value(loss))

    def check_step(self, step: int, total: int) -> None:
        """Before step ``step``'s update: raise :class:`JobError` when its loss diverged."""
        values, self.pending = self.pending, []
        if not values or not self.stop:
            return
        bad = next((v for v in values if not math.isfinite(v)), None)
        if bad is not None:
            self._stop(step, total, f"the training loss is {bad} at step {step} of {total}", "nan" if math.isnan(bad) else "inf")
        mean = sum(values) / len(values)
        if self.reference is None:
            self.reference = mean
            return
        if self.factor > 0 and self.reference > 0 and mean > self.factor * self.reference:
            text = (f"the training loss exploded at step {step} of {total}: {mean:.4g}, more than "
                    f"{self.factor:g} times the first step's {self.reference:.4g}")
            self.ctx.emit("train.alert", {"job_id": self.ctx.job_id, "kind": "exploding", "step": step, "message": text,
                                          "hint": "the run is diverging: lower learning_rate or keep max_grad_norm on",
                                          "memory": {}})
            self._stop(step, total, text, "exploding")

    def _stop(self, step: int, total: int, text: str, kind: str) -> None:
        t = self.eff["training"]
        checkpoint = self.last_checkpoint()
        kept = (f"the last checkpoint, {checkpoint}, is kept" if checkpoint
                else "no checkpoint had been saved yet (training.save_steps sets how often)")
        resume = f"resume from {checkpoint} with" if checkpoint else "start again with"
        raise JobError(
            f"{text}: the run stopped before that step's update (training.stop_on_divergence); {kept}",
            where=f"step {step}",
            hint=(f"{resume} a lower training.learning_rate (now {t['learning_rate']:g}) and max_grad_norm on "
                  f"(now {t['max_grad_norm']:g}), or check the rows of that batch (qlw data); fp16 overflows where "
                  "bf16 does not; training.stop_on_divergence = false only flags it"))

    def callbacks(self, has_eval: bool, last_checkpoint: Callable[[], str] | None = None) -> list:
        """The TrainerCallbacks of the watch: the divergence stop and, when asked, early stopping."""
        from transformers import EarlyStoppingCallback, TrainerCallback

        if last_checkpoint is not None:
            self.last_checkpoint = last_checkpoint
        guard = self

        class DivergenceStop(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                guard.check_step(int(state.global_step) + 1, int(state.max_steps))

        out: list = [DivergenceStop()]
        t = self.eff["training"]
        if t.get("early_stopping_patience"):
            if not early_stopping_on(self.eff, has_eval):
                self.ctx.emit("log", {"level": "warning", "message": (
                    "training.early_stopping_patience: early stopping needs validation rows and eval_steps above 0; "
                    "it is off for this run")})
                return out
            ctx = self.ctx

            class EarlyStop(EarlyStoppingCallback):
                def on_evaluate(self, args, state, control, metrics, **kwargs):
                    super().on_evaluate(args, state, control, metrics, **kwargs)
                    if control.should_training_stop and self.early_stopping_patience_counter >= self.early_stopping_patience:
                        best = state.best_metric
                        ctx.emit("log", {"level": "info", "message": (
                            f"early stopping at step {state.global_step}: eval_loss has not improved for "
                            f"{self.early_stopping_patience} evaluation(s); the best"
                            + (f", {best:.4f}," if isinstance(best, float) else "") + " becomes the adapter")})

            out.append(EarlyStop(early_stopping_patience=int(t["early_stopping_patience"]),
                                 early_stopping_threshold=float(t.get("early_stopping_threshold") or 0.0)))
        return out


class StallWatch:
    """Calls ``on_stall(idle_s, step)`` once when no :meth:`beat` came for ``seconds``; a later
    beat re-arms it. :meth:`check` is the logic (an injectable ``clock`` tests it); :meth:`start`
    runs it every ``poll`` seconds in a small thread until :meth:`stop`."""

    def __init__(self, seconds: float, on_stall: Callable[[float, int], None], clock: Callable[[], float] = time.monotonic):
        self.seconds = float(seconds)
        self.on_stall = on_stall
        self.clock = clock
        self.last: float | None = None
        self.step = 0
        self.stalled = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, step: int) -> None:
        self.last = self.clock()
        self.step = int(step)
        self.stalled = False

    def check(self) -> bool:
        if self.last is None or self.stalled or self.seconds <= 0:
            return False
        idle = self.clock() - self.last
        if idle < self.seconds:
            return False
        self.stalled = True
        self.on_stall(idle, self.step)
        return True

    def start(self, poll: float | None = None) -> None:
        if self._thread is not None or self.seconds <= 0:
            return
        poll = poll if poll is not None else min(30.0, max(0.05, self.seconds / 4))

        def loop() -> None:
            while not self._stop.wait(poll):
                try:
                    self.check()
                except Exception:  # a notice that fails must not end the watch silently in a loop
                    import logging

                    logging.getLogger("qlw.watch").exception("stall notice failed")

        self._thread = threading.Thread(target=loop, name="qlw-stall-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)


_END_STATUS = {"done": "finished", "stopped": "stopped", "failed": "failed"}


class Notices:
    """A run's job context, watched: use ``with Notices(ctx, config) as ctx: run_training(..., ctx)``.
    Every attribute is the wrapped context's; ``emit`` and ``progress`` are seen on the way."""

    def __init__(self, ctx, config: dict[str, Any], *, environ=None, clock: Callable[[], float] = time.monotonic,
                 poll: float | None = None, post: Callable[[str, dict], tuple[bool, str]] = notify.post):
        self._ctx = ctx
        t = dict(config.get("training") or {})
        self._name = config.get("name") or getattr(ctx, "session", "")
        self._url = notify.url_for(t.get("notify_url", ""), os.environ if environ is None else environ)
        self._post = post
        self._poll = poll
        minutes = float(t.get("stall_minutes") or 0)
        self._stall = StallWatch(minutes * 60, self._stalled, clock) if minutes > 0 else None
        self._lock = threading.Lock()
        self.step = 0
        self.total_steps = 0
        self.loss: float | None = None
        self.eval_loss: float | None = None
        self.best_eval_loss: float | None = None
        self.final: dict[str, Any] = {}
        self.notes: list[str] = []
        self.sent: list[dict[str, Any]] = []

    def __getattr__(self, name: str):
        return getattr(self._ctx, name)

    # What the run reports --------------------------------------------------------------------------

    def emit(self, kind: str, payload: dict[str, Any]) -> None:
        self._ctx.emit(kind, payload)
        if kind == "train.started":
            self.total_steps = int(payload.get("total_steps") or 0)
            self.step = int(payload.get("start_step") or 0)
            if self._stall is not None:
                self._stall.beat(self.step)
                self._stall.start(self._poll)
        elif kind == "train.log":
            self.step = int(payload.get("step") or self.step)
            if payload.get("loss") is not None:
                self.loss = payload["loss"]
            ev = payload.get("eval_loss")
            if ev is not None:
                self.eval_loss = ev
                if isinstance(ev, (int, float)) and math.isfinite(ev) and (self.best_eval_loss is None or ev < self.best_eval_loss):
                    self.best_eval_loss = ev
        elif kind == "train.finished":
            self.final = dict(payload)
            self.step = int(payload.get("step") or self.step)
        elif kind == "log" and str(payload.get("message", "")).startswith("early stopping"):
            self.notes.append(payload["message"])

    def progress(self, stage: str, done: float, total: float = 0, unit: str = "", message: str = "") -> None:
        self._ctx.progress(stage, done, total, unit, message)
        if stage == "training" and self._stall is not None and self._stall.last is not None:
            self._stall.beat(int(done))

    # The notices ------------------------------------------------------------------------------------

    def __enter__(self) -> "Notices":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._stall is not None:
            self._stall.stop()
        if exc is None:
            status = _END_STATUS.get(self.final.get("status"), "stopped" if not self.final else "finished")
            self.notice(status)
        elif isinstance(exc, JobCancelled) or not isinstance(exc, Exception):
            self.notice("stopped")
        else:
            self.notice("failed", message=str(exc) or type(exc).__name__, where=getattr(exc, "where", ""),
                        hint=getattr(exc, "hint", ""))
        return False

    def _stalled(self, idle_s: float, step: int) -> None:
        self.notice("stalled", idle_s=idle_s,
                    message=f"no step for {idle_s / 60:.1f} min (training.stall_minutes)",
                    hint="the run may be stuck (a hung data loader, a GPU wait, a frozen disk), or steps are slower "
                         "than stall_minutes: look at the backend log and the GPU pane")

    def text(self, status: str, message: str = "", idle_s: float | None = None) -> str:
        where = f"step {self.step}/{self.total_steps}" if self.total_steps else f"step {self.step}"
        figures = []
        if self.loss is not None:
            figures.append(f"loss {self.loss:.4f}")
        if self.eval_loss is not None:
            figures.append(f"val loss {self.eval_loss:.4f}")
        if self.best_eval_loss is not None and self.best_eval_loss != self.eval_loss:
            figures.append(f"best val {self.best_eval_loss:.4f}")
        tail = f" ({', '.join(figures)})" if figures else ""
        if status == "stalled":
            return f"qlw: run \u201c{self._name}\u201d has made no step for {(idle_s or 0) / 60:.1f} min, at {where}{tail}"
        head = f"qlw: run \u201c{self._name}\u201d {status} at {where}{tail}"
        extra = "; ".join([*self.notes, message] if message else self.notes)
        return head + (f": {extra}" if extra else "")

    def notice(self, status: str, *, message: str = "", where: str = "", hint: str = "",
               idle_s: float | None = None) -> dict[str, Any]:
        """Emit a ``run.notice`` and POST it to the webhook (if any); returns its payload."""
        payload = {
            "session": getattr(self._ctx, "session", ""), "run": self._name, "status": status,
            "text": self.text(status, message, idle_s), "step": self.step, "total_steps": self.total_steps,
            "loss": self.loss, "eval_loss": self.eval_loss, "best_eval_loss": self.best_eval_loss,
            "message": message, "where": where, "hint": hint, "idle_s": None if idle_s is None else round(idle_s, 1),
            "delivered": False, "delivery": "", "extra": {},
        }
        if self._url:
            ok, why = self._post(self._url, notify.body(payload))
            payload["delivered"], payload["delivery"] = ok, why
            if not ok:
                self._ctx.emit("log", {"level": "warning", "message": f"the {status} notice was not delivered: {why}"})
        with self._lock:
            self.sent.append(payload)
        try:
            self._ctx.emit("run.notice", payload)
        except Exception:  # the store or the loop is gone (a closing backend): the webhook went already
            pass
        return payload
