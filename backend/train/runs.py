"""The run: :func:`run_training`, the one function behind ``train.start`` and ``qlw train``:
the held model or a fresh load, the method's trainer with a LoRA adapter, callbacks, checkpoints,
the final adapter; out of memory, a full disk or a stop end it cleanly (:func:`train_job`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from backend import methods, protocol as P, speed, train_config as TC, watch
from backend.holdings import HOLDINGS, Holdings
from backend.jobs import JobCancelled, JobError
from backend.train_config import model_settings
from backend.train.checks import (
    CheckedRun, MIB, check_run, checkpoint_info, data_settings, partial_checkpoints, run_dir, take_fault,
)
from backend.train.validate import count_trainable, estimate_memory
from backend.train import launch
from backend.train.report import Reporter, make_callback


# The run -------------------------------------------------------------------------------------------------------


def _held_model_matches(settings: P.ModelSettings, device: str) -> bool:
    from backend import models

    info = models._LOADED
    if HOLDINGS.get("base") is None or not info or info.get("device") != device:
        return False
    held = info.get("settings") or {}

    def same_source(a: str, b: str) -> bool:
        pa, pb = Path(a).expanduser(), Path(b).expanduser()
        if pa.exists() and pb.exists():
            return pa.resolve() == pb.resolve()
        return a.strip() == b.strip()

    if not same_source(str(held.get("source", "")), settings.source):
        return False
    keys = ["revision", "precision", "attn_implementation", "trust_remote_code"]
    if settings.precision == "4bit":
        keys += ["quant_type", "double_quant", "compute_dtype"]
    return all(held.get(k) == getattr(settings, k) for k in keys)


def _memory_now(device: str) -> dict[str, Any]:
    from backend import models
    from backend.gpu import torch_memory

    out: dict[str, Any] = {"device": device, "torch": torch_memory()}
    try:
        mem = models.device_memory(device)
        out.update(free_bytes=mem.get("free_bytes"), total_bytes=mem.get("total_bytes"))
    except Exception:
        pass
    import psutil

    out["rss_bytes"] = int(psutil.Process().memory_info().rss)
    return out


def _restore_base(model) -> bool:
    """Take the adapter out of the held base model (peft's ``unload``, no merge) and undo what
    training turned on (gradient checkpointing, input gradients), so the next run or chat gets
    the base model as loaded. False when the model still carries LoRA layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for fn in ("gradient_checkpointing_disable", "disable_input_require_grads"):
        try:
            getattr(model, fn)()
        except Exception:  # never enabled, or another transformers: nothing to undo
            pass
    model.eval()
    return not any(isinstance(m, BaseTunerLayer) for m in model.modules())


def _free_run(box: Holdings, device: str) -> dict[str, Any]:
    from backend.gpu import GpuSampler, free_memory

    try:
        return free_memory(box, GpuSampler())
    except Exception as exc:  # freeing must not hide what happened in the run
        return {"error": f"{type(exc).__name__}: {exc}"}


def _as_job_error(exc: Exception) -> JobError:
    """A failure inside the trainer as a JobError for people; the traceback goes to the log."""
    import logging

    from backend.jobs import describe_exception

    info = describe_exception(exc)
    logging.getLogger("qlw.train").error("training failed: %s", info["detail"])
    if isinstance(exc, JobError):
        return type(exc)(str(exc), where=exc.where, hint=exc.hint)
    text = str(exc)
    if "Target modules" in text or "target_modules" in text:
        return JobError(f"peft: {text.splitlines()[0]}", where="lora.target_modules",
                        hint="choose names from the model's linear layers (model.inspect), or all-linear")
    return JobError(info["message"], where=info["where"], hint="see the backend log for the traceback")


def _disk_full(exc: BaseException) -> bool:
    """True for a write that failed for want of space (ENOSPC or EDQUOT, as OSError or as the
    RuntimeError torch.save and safetensors turn it into)."""
    import errno

    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    text = str(exc)
    return "No space left" in text or "Disk quota exceeded" in text or "file write failed" in text


def _save_failure(exc: BaseException, output_dir: Path, what: str = "") -> JobError | None:
    """A failed save as a JobError for people, after removing what it left half-written; None
    when ``exc`` was no failed save."""
    import shutil

    partial = partial_checkpoints(output_dir) if not what else []
    if not partial and not what:
        return None
    for folder in partial:
        shutil.rmtree(folder, ignore_errors=True)
    target = Path(what) if what else partial[-1]
    kept = [c for c in (checkpoint_info(c, "") for c in Path(output_dir).glob("checkpoint-*") if c.is_dir()) if c]
    last = max(kept, key=lambda c: c["step"], default=None)
    intact = f"; the last complete checkpoint, {Path(last['path']).name}, is intact" if last else ""
    if _disk_full(exc):
        try:
            free = f" ({shutil.disk_usage(target.parent).free / MIB:.0f} MiB free there)"
        except OSError:
            free = ""
        return JobError(f"disk full while saving {target.name} at {target}{free}: the run stopped{intact}",
                        where=str(target), hint="free space or lower save_total_limit, then resume from the last checkpoint")
    return JobError(f"saving {target.name} at {target} failed: {type(exc).__name__}: {exc}"[:600] + intact,
                    where=str(target), hint="the half-written folder was removed; see the backend log for the traceback")


def oom_hint(eff: dict[str, Any]) -> str:
    t, d, lora = eff["training"], eff["data"], eff["lora"]
    tips = []
    if t["per_device_train_batch_size"] > 1:
        b = t["per_device_train_batch_size"]
        tips.append(f"lower per_device_train_batch_size (now {b}; raise gradient_accumulation_steps to "
                    f"{t['gradient_accumulation_steps'] * 2} with batch {max(1, b // 2)} to keep the effective batch)")
    tips.append(f"lower data.max_length (now {d['max_length']})")
    if not t["gradient_checkpointing"]:
        tips.append("turn on gradient_checkpointing")
    if lora["r"] > 8:
        tips.append(f"a smaller lora.r (now {lora['r']})")
    if eff["model"]["precision"] not in ("4bit",):
        tips.append("load the model in 4-bit")
    return "; ".join(tips)


def plan_speed(eff: dict[str, Any], settings: P.ModelSettings, model, device: str) -> speed.SpeedPlan:
    """The run's speed levers (:mod:`backend.speed`) for the loaded ``model``, by the memory
    estimate the form shows; the levers that go through the trainer's arguments (checkpointing,
    micro-batch) are written into ``eff``'s training section."""
    t = eff["training"]
    estimate, budget, copy_bytes = None, None, 0
    if device.startswith("cuda"):
        import torch

        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        model_bytes = int(model.get_memory_footprint())
        free, _total = torch.cuda.mem_get_info(device)
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        est = {"total_bytes": model_bytes, "hidden_size": getattr(text, "hidden_size", 0) or 0,
               "layers": getattr(text, "num_hidden_layers", 0) or 0, "vocab_size": getattr(text, "vocab_size", 0) or 0,
               "free_bytes": int(free), "device": device, "context_bytes": 0}
        try:
            trainable = count_trainable(settings, eff["lora"])[0]
        except Exception:
            trainable = None
        estimate = lambda training: estimate_memory({**eff, "training": training}, est, trainable)["total_bytes"]  # noqa: E731
        budget = speed.budget_bytes(t.get("memory_budget", 0.0), int(free) + unused + model_bytes)
        copy_bytes = 2 * speed.four_bit_params(model)
    p = speed.plan(t, device, tokens_per_sequence=int(eff["data"]["max_length"]), estimate=estimate, budget=budget,
                   copy_bytes=copy_bytes, quantized_4bit=eff["model"]["precision"] == "4bit")
    if eff.get("method") == "kto" and p.per_device_train_batch_size != t["per_device_train_batch_size"]:
        # KTO's KL term is estimated from the other rows of a micro-batch: splitting it changes the
        # math, so the batch stays and checkpointing makes the room instead.
        p.per_device_train_batch_size, p.gradient_accumulation_steps = (t["per_device_train_batch_size"],
                                                                        t["gradient_accumulation_steps"])
        p.gradient_checkpointing = True
        p.reasons.append("kto: the micro-batch is not split (its KL term depends on it)")
    t.update(p.training(t))
    on = getattr(model, "is_activation_checkpointing", None)  # transformers 5.2x's name
    if on is None:
        on = getattr(model, "is_gradient_checkpointing", False)
    if not p.gradient_checkpointing and on:
        # A held model keeps it on from an earlier run (transformers 5.2x renamed the method).
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    return p


def run_training(config: dict[str, Any], home: Path, ctx, *, resume_from: str = "",
                 record_artifact: Callable[[str, str], None] | None = None,
                 set_config: Callable[[dict[str, Any]], None] | None = None,
                 fault: tuple[str, int] | None = None, callbacks: list | None = None,
                 checked: "CheckedRun | None" = None) -> dict[str, Any]:
    """Train ``config`` (a run config dict) in this thread, reporting through ``ctx`` (a
    :class:`~backend.jobs.JobContext` or anything with ``job_id``, ``session``, ``emit``,
    ``progress``, ``cancelled``, ``check_cancelled``). Returns the ``train.finished`` payload; a
    bad config, bad data or an out-of-memory end raise :class:`JobError`. ``callbacks``: extra
    ``TrainerCallback`` objects (bench/train_speed.py times the steps with one). ``checked``: the
    :func:`check_run` of ``config`` when the caller (the ``train.start`` handler) made it already."""
    home = Path(home)
    record = record_artifact or (lambda kind, path: None)
    run = checked if checked is not None else check_run(config, home, resume_from)
    cfg, eff, device, warnings, resume = run.config, run.effective, run.device, run.warnings, run.resume_from
    for key, text in warnings.items():
        ctx.emit("log", {"level": "warning", "message": f"{key}: {text}"})
    if set_config is not None:
        set_config(cfg)
    folder = run_dir(home, ctx.session)
    output_dir = folder / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    main_rank = launch.rank() == 0  # a launched run's rank 0 (issue 19) writes what is written once
    if main_rank:
        (folder / "config.toml").write_text(TC.dumps_toml(cfg), encoding="utf-8")
        record("config", str(folder / "config.toml"))
    guard = watch.Guard(eff, ctx, folder)  # issue 18: logs, the divergence stop, early stopping (backend/watch.py)
    progress = lambda st, d, t: ctx.progress(st, d, t)  # noqa: E731
    cancelled = lambda: ctx.cancelled  # noqa: E731

    # The data first: a bad source or mapping stops the run before anything is loaded.
    ctx.progress("preparing data", 0, 0)
    from backend import data as D, models

    data, notes = data_settings(eff["data"], home, progress, cancelled, method=eff["method"])
    for note in notes:
        ctx.emit("log", {"level": "info", "message": note})
    method = methods.get(eff["method"])
    prepared = method.prepare(data, eff, home, progress, cancelled,
                              log=lambda level, message: ctx.emit("log", {"level": level, "message": message}))
    if len(prepared.train) == 0:
        raise D.DataError("no training row could be formatted", where="data.mapping",
                          hint="check the mapping and the template in the Data pane (qlw data shows why rows fail)")
    ctx.check_cancelled()

    # The model: the held one when it is the one the config names, else loaded now.
    settings = model_settings(eff["model"], home, build=True, progress=progress, cancelled=cancelled)
    if not _held_model_matches(settings, device):
        models.load_job(P.LoadModel(**P.to_dict(settings)))(ctx)
    else:
        ctx.emit("log", {"level": "info", "message": f"training on the held base model ({settings.source})"})
    ctx.check_cancelled()
    model, tokenizer = HOLDINGS.get("base"), HOLDINGS.get("tokenizer")
    if tokenizer is None:
        raise JobError(f"{settings.source} has no tokenizer", where="model.source",
                       hint="give a model folder that holds the tokenizer files")
    if prepared.report["form"] == "messages" and not getattr(tokenizer, "chat_template", None):
        raise D.DataError("the chat template was chosen, but this model's tokenizer has none", where="data.template",
                          hint="choose the mistral, alpaca or raw template, or a model with a chat template")

    import torch

    has_eval = prepared.validation is not None and len(prepared.validation) > 0
    speed_plan = plan_speed(eff, settings, model, device)
    ctx.emit("log", {"level": "info", "message": speed_plan.describe()})
    args = method.trl_config(eff, prepared, output_dir, device, has_eval)
    reporter = Reporter(ctx, has_eval=has_eval, record_artifact=record, config=eff, resumed_from=resume,
                        output_dir=output_dir, columns=method.log_columns)
    box = Holdings()  # what this run allocated; freed at the end, whatever happens
    status, oom, failure, applied = "done", None, None, None
    t0 = time.monotonic()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    try:
        ctx.progress("building the trainer", 0, 0)
        trainer = method.build_trainer(
            model, tokenizer, eff, prepared, args,
            [make_callback(reporter, ctx, has_eval), *guard.callbacks(has_eval, lambda: reporter.last_checkpoint),
             *(callbacks or ())],
            log=lambda level, message: ctx.emit("log", {"level": level, "message": message}))
        box.put("trainer", trainer, "trainer", "training run")
        HOLDINGS.put("trainer", trainer, "trainer", f"training run {ctx.job_id}")
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        for cb in (PrinterCallback, ProgressCallback):  # they print; qlw reports through events
            trainer.remove_callback(cb)
        trainer.qlw_fault = fault
        trainer.qlw_watch = reporter.watch
        guard.attach(trainer)  # issue 18
        applied = speed.apply(trainer.model, speed_plan)
        reporter.trainable, reporter.total_params = (int(x) for x in trainer.model.get_nb_trainable_parameters())
        del trainer
        ctx.check_cancelled()
        box.get("trainer").train(resume_from_checkpoint=resume or None)
        if ctx.cancelled:
            status = "stopped"
    except torch.OutOfMemoryError as exc:
        # Facts only: the exception's frames hold the step's activations, let them go now.
        in_step = getattr(box.get("trainer"), "qlw_step", None)
        oom = {"step": in_step or reporter.step, "phase": "training step" if in_step else "evaluation or saving",
               "message": str(exc).split("Tried")[0].strip() or "CUDA out of memory",
               "detail": str(exc)[:600], "memory": _memory_now(device)}
    except JobCancelled:
        status = "stopped"
    except Exception as exc:
        # Keep the story, not the exception: its frames would pin the run's tensors.
        failure = _as_job_error(exc)
        # A checkpoint save cut off (disk full): remove the half-written folder, say so plainly.
        failure = _save_failure(exc, output_dir) or failure
    trainer = box.get("trainer")
    adapter_path = ""
    if trainer is not None and oom is None and failure is None and reporter.started:
        adapter_dir = folder / "adapter"
        try:
            if launch.is_fsdp_rank():
                # FSDP: every rank gives its shard of the adapter to a full state dict that rank 0
                # writes (peft's FSDP guide); the trainer's save does both.
                trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
                trainer.save_model(str(adapter_dir))
            elif main_rank:
                # Only the trained adapter: a preference run from an earlier adapter also holds trl's
                # frozen "ref" copy of it, which is no part of the result.
                extra = {"selected_adapters": ["default"]} if len(getattr(trainer.model, "peft_config", {})) > 1 else {}
                trainer.model.save_pretrained(str(adapter_dir), **extra)  # safetensors
            if main_rank:
                tokenizer.save_pretrained(str(adapter_dir))
                adapter_path = str(adapter_dir)
                record("adapter", adapter_path)
        except Exception as exc:  # disk full: no half-written adapter, and the cleanup below still runs
            import shutil

            shutil.rmtree(adapter_dir, ignore_errors=True)
            failure = _save_failure(exc, output_dir, what=str(adapter_dir))
    import resource

    peak = {"device": device, "rss_peak_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}
    if device.startswith("cuda"):
        peak["torch_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        peak["torch_reserved_bytes"] = int(torch.cuda.memory_reserved(device))
    # Give the base model back as it was loaded, and free everything the run allocated.
    restored = False
    try:
        if applied is not None:  # the weight copy and the compiled layers go before the adapter does
            applied.restore()
            applied = None
        if trainer is not None and hasattr(trainer.model, "unload"):
            trainer.model.unload()
        restored = _restore_base(model)
    except Exception:
        restored = False
    trainer = None
    HOLDINGS.drop("trainer")
    freed = _free_run(box, device)
    if not restored:
        models.release_base_model()
        ctx.emit("log", {"level": "warning",
                         "message": "released the base model: it still carried the adapter; the next run loads it again"})
    del model
    elapsed = round(time.monotonic() - t0, 3)
    final = {
        "job_id": ctx.job_id, "status": status, "step": reporter.step, "total_steps": reporter.total_steps,
        "final_loss": reporter.final("loss"), "final_eval_loss": reporter.final("eval_loss"),
        "adapter_path": adapter_path, "checkpoint_path": reporter.last_checkpoint, "elapsed_s": elapsed,
        "tokens_per_s": reporter.tokens_per_s(), "peak_memory": peak, "speed": speed_plan.as_dict(),
    }
    if oom is not None:
        hint = oom_hint(eff)
        after = _memory_now(device)
        # at_failure/after_free: device free/total, torch per device, RSS; freed: free_memory's figures.
        memory = {"at_failure": oom["memory"], "after_free": after,
                  "freed": {k: freed.get(k) for k in ("before", "after", "dropped")}}
        ctx.emit("train.alert", {"job_id": ctx.job_id, "kind": "oom", "step": oom["step"],
                                 "message": f"{oom['message']} in the {oom['phase']} at step {oom['step']}: the run "
                                            "stopped; the base model and the logged rows are kept",
                                 "hint": hint, "memory": memory})
        final.update(status="failed")
        ctx.emit("train.finished", final)
        raise JobError(f"out of memory at step {oom['step']} of {reporter.total_steps} on {device}",
                       where=f"step {oom['step']}", hint=hint)
    if failure is not None:
        if reporter.started:
            final.update(status="failed")
            ctx.emit("train.finished", final)
        raise failure
    if not reporter.started:  # stopped before the first step
        ctx.check_cancelled()
    ctx.emit("train.finished", final)
    return final


def train_job(params: P.StartTraining, home: Path, store=None, checked: "CheckedRun | None" = None):
    """The ``train.start`` job, on the config the handler checked (:func:`check_run`)."""
    run_checked = checked if checked is not None else check_run(params.config, home, params.resume_from)
    fault = take_fault()

    def run(ctx) -> dict[str, Any]:
        record = (lambda kind, path: store.add_artifact(ctx.session, kind, path)) if store is not None else None
        set_config = (lambda cfg: store.set_config(ctx.session, cfg)) if store is not None else None
        with watch.Notices(ctx, run_checked.config) as watched:  # issue 18: run.notice, webhook, stall watch
            if launch.is_launched(run_checked.effective):  # issue 19: several processes, supervised from here
                from backend.train.multi import run_launched

                return run_launched(run_checked.config, home, watched, resume_from=params.resume_from,
                                    record_artifact=record, set_config=set_config, fault=fault, checked=run_checked)
            return run_training(run_checked.config, home, watched, resume_from=params.resume_from,
                                record_artifact=record, set_config=set_config, fault=fault, checked=run_checked)

    return run

