"""``qlw train CONFIG.toml``: a run without the front end, its loss table printed as it goes
(:class:`LocalRun`, the plain and rich printers, which ``qlw merge`` and ``qlw export`` use too).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from backend import protocol as P, train_config as TC, watch
from backend.jobs import JobCancelled, JobError, print_job_error
from backend.train.checks import GIB, check_run, take_fault
from backend.train.launch import is_launched
from backend.train.validate import validate_run
from backend.train.runs import run_training


# `qlw train`: headless ---------------------------------------------------------------------------------------------


ROW_HEADER = (f"{'step':>11}  {'train loss':>10}  {'val loss':>9}  {'learning rate':>13}  {'grad norm':>9}  "
              f"{'tokens/s':>9}  {'epoch':>6}  {'elapsed':>8}  {'eta':>8}")


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


#: Short headings of a preference method's own columns in the headless table.
METRIC_HEADINGS = {"rewards/chosen": "chosen", "rewards/rejected": "rejected", "rewards/margins": "margin",
                   "rewards/accuracies": "accuracy", "nll_loss": "nll loss", "log_odds_ratio": "log odds", "kl": "kl"}


def row_header(method: str = "sft") -> str:
    """The headless loss table's header for a run of ``method`` (SFT: :data:`ROW_HEADER`; a
    preference method adds its rewards, margin, ... at the end)."""
    extra = "".join(f"  {METRIC_HEADINGS.get(name, name):>9}" for name in P.METHOD_LOG_COLUMNS.get(method, ()))
    return ROW_HEADER + extra


def format_row(row: dict[str, Any], method: str = "sft") -> str:
    """One ``train.log`` row as a line of the loss table (the header is :func:`row_header`)."""
    def f(value, spec):
        return "—" if value is None else format(value, spec)

    step = f"{row['step']}/{row['total_steps']}"
    metrics = row.get("metrics") or {}
    extra = "".join(f"  {f(metrics.get(name), '.4f'):>9}" for name in P.METHOD_LOG_COLUMNS.get(method, ()))
    return (f"{step:>11}  {f(row.get('loss'), '.4f'):>10}  {f(row.get('eval_loss'), '.4f'):>9}  "
            f"{f(row.get('learning_rate'), '.3e'):>13}  {f(row.get('grad_norm'), '.3f'):>9}  "
            f"{f(row.get('tokens_per_s'), ',.0f'):>9}  {row.get('epoch') or 0:>6.2f}  {_clock(row.get('elapsed_s')):>8}  "
            f"{_clock(row.get('eta_s')):>8}" + extra)


class LocalRun:
    """A job context for ``qlw train``: events go to the store and to a printer, in this process."""

    def __init__(self, store, session: str, on_event: Callable[[str, dict[str, Any]], None]):
        import secrets

        self.store = store
        self.session = session
        self.job_id = secrets.token_hex(4)
        self.on_event = on_event
        self._cancel = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled()

    def emit(self, kind: str, payload: dict[str, Any]) -> None:
        self.store.append_event(self.session, kind, payload)
        self.on_event(kind, payload)

    def progress(self, stage: str, done: float, total: float = 0, unit: str = "", message: str = "") -> None:
        self.on_event("job.progress", {"job_id": self.job_id, "stage": stage, "done": done, "total": total,
                                       "unit": unit, "message": message})

    def finish(self, kind: str, status: str, elapsed_s: float, result: dict[str, Any],
               error: dict[str, Any] | None) -> None:
        """The end of the run (``status``: done, cancelled or failed): its error and job.finished
        events, the session's status, and the store closed."""
        if error:
            self.emit("error", {"job_id": self.job_id, **error})
        self.emit("job.finished", {"job_id": self.job_id, "kind": kind, "status": status,
                                   "elapsed_s": round(elapsed_s, 3), "result": result, "error": error})
        self.store.set_status(self.session, {"done": "finished", "cancelled": "cancelled", "failed": "failed"}[status])
        self.store.close()


def add_cli_arguments(parser) -> None:
    """The options of ``python -m backend train`` (and so of ``qlw train``)."""
    parser.add_argument("config", type=Path, nargs="?",
                        help="the run config (TOML, as the Train pane exports it; examples/ has some to start from)")
    parser.add_argument("--print-config", action="store_true",
                        help="write the default run config (TOML) to stdout and exit: a file to start from")
    parser.add_argument("--resume-from", default="", metavar="CHECKPOINT",
                        help="a checkpoint-N folder of an earlier run to continue from")
    parser.add_argument("--name", default="", help="the session's name (default: the config's name)")
    parser.add_argument("--check", action="store_true", help="only check the config (and the device); train nothing")
    parser.add_argument("--processes", type=int, default=None, metavar="N",
                        help="train in N processes (one per GPU; on the CPU over gloo), started with accelerate "
                             "launch: overrides launch.processes. The global batch is per_device_train_batch_size "
                             "x gradient_accumulation_steps x N")
    parser.add_argument("--home", type=Path, default=None, help="data home (default: $QLW_HOME or the user data dir)")


def _print_errors(errors: dict[str, str], path: Path) -> None:
    print(f"qlw train: {path}: the run config has {len(errors)} error(s):", file=sys.stderr)
    for key, text in errors.items():
        print(f"  {key}: {text}", file=sys.stderr)


def cli(args) -> int:
    """``qlw train CONFIG.toml``: run the config here (no daemon), print the loss table, record a
    session in the data home's store. 0: done; 1: the run failed; 2: the config is invalid;
    130: stopped with ctrl+c (after saving a checkpoint)."""
    if args.print_config:
        sys.stdout.write(TC.dumps_toml(TC.defaults(), defaults_note=True))
        return 0
    if args.config is None:
        print("qlw train: name a run config (TOML): `qlw train CONFIG.toml`; `qlw train --print-config > run.toml` "
              "writes the defaults to start from, and examples/ holds ready ones", file=sys.stderr)
        return 2
    home = (args.home or P.data_home()).expanduser().resolve()
    config, errors = TC.read_toml(args.config, os.environ)
    if getattr(args, "processes", None) is not None:
        config["launch"]["processes"], error = TC.RULES["launch"]["processes"](args.processes)
        if error:
            errors["launch.processes"] = f"--processes {error}"
    if errors:
        _print_errors(errors, args.config)
        return 2
    try:
        checked_run = check_run(config, home, args.resume_from)
    except TC.ConfigError as exc:
        _print_errors(exc.errors, args.config)
        return 2
    device = checked_run.device
    if args.check:
        checked = validate_run(config, home)
        for key, text in checked["warnings"].items():
            print(f"warning: {key}: {text}")
        if checked["errors"]:
            _print_errors(checked["errors"], args.config)
            return 2
        if checked["trainable_params"] is not None:
            print(f"trainable params: {checked['trainable_params']:,} || all params: {checked['total_params']:,} "
                  f"|| trainable%: {checked['trainable_percent']:.4f}")
        mem = checked["memory"]
        if mem:
            parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in mem["parts"].items() if v)
            print(f"memory: about {mem['total_bytes'] / GIB:.1f} GiB of {mem['free_bytes'] / GIB:.1f} GiB free on "
                  f"{mem['device_name']}: {mem['verdict']} (GiB: {parts})")
        if checked["total_steps"] is not None:
            print(f"steps: {checked['total_steps']:,}")
        if checked.get("launch"):
            print(checked["launch"]["text"])
        print(f"{args.config}: ok (device {device})")
        return 0
    from sessions.store import Store

    import logging
    import warnings

    # The loss table is the output: the libraries' deprecation notes and bitsandbytes' optional
    # kernel notice are noise here (QLW_LOG_LEVEL=INFO or DEBUG shows them).
    if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for name in ("bitsandbytes", "transformers", "peft", "trl", "accelerate"):
            logging.getLogger(name).setLevel(logging.ERROR)
    home.mkdir(parents=True, exist_ok=True)
    store = Store(home / "sessions.db")
    info = store.create_session(args.name or config["name"] or f"qlw train {args.config.name}", config)
    tty = sys.stdout.isatty()
    printer = _RichPrinter() if tty else _PlainPrinter()
    run = LocalRun(store, info.id, printer.event)
    print(f"session {info.id} in {home}", flush=True)
    stops = {"n": 0}

    def on_sigint(signum, frame):
        stops["n"] += 1
        if stops["n"] > 1:
            raise KeyboardInterrupt
        print("\nstopping: saving a checkpoint first (ctrl+c again to abort without it)", file=sys.stderr, flush=True)
        run.cancel()

    old = signal.signal(signal.SIGINT, on_sigint)
    store.set_status(info.id, "running")
    run.emit("job.started", {"job_id": run.job_id, "kind": "train.start",
                             "params": {"config": config, "resume_from": args.resume_from}})
    t0 = time.monotonic()
    status, error, result, code = "done", None, {}, 0
    try:
        with printer, watch.Notices(run, checked_run.config) as watched:  # issue 18: notices, webhook, stalls
            train = run_training
            if is_launched(checked_run.effective):  # issue 19: N processes, supervised from here
                from backend.train.multi import run_launched as train
            result = train(config, home, watched, resume_from=args.resume_from,
                           record_artifact=lambda kind, path: store.add_artifact(info.id, kind, path),
                           set_config=lambda cfg: store.set_config(info.id, cfg), fault=take_fault(),
                           checked=checked_run)
        if result.get("status") == "stopped":
            status, code = "cancelled", 130
    except JobCancelled:
        status, code = "cancelled", 130
    except TC.ConfigError as exc:
        _print_errors(exc.errors, args.config)
        status, code, error = "failed", 2, {"message": str(exc), "where": "", "hint": ""}
    except JobError as exc:
        status, code = "failed", 1
        error = {"message": str(exc), "where": exc.where, "hint": exc.hint}
        print_job_error("train", exc)
    except KeyboardInterrupt:
        status, code = "cancelled", 130
    finally:
        signal.signal(signal.SIGINT, old)
    run.finish("train.start", status, time.monotonic() - t0, result, error)
    return code


class _PlainPrinter:
    """Rows as lines on stdout; stages and alerts as lines too (no progress bar off a terminal)."""

    def __init__(self) -> None:
        self.stage = ""
        self.method = "sft"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def line(self, text: str, err: bool = False) -> None:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)

    def event(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "job.progress":
            if payload["stage"] != self.stage and payload["stage"] != "training":
                self.line(f"{payload['stage']}...")
            self.stage = payload["stage"]
            self.progress(payload)
        elif kind == "train.started":
            t = payload
            resumed = f", resumed from {t['resumed_from']} at step {t['start_step']}" if t["resumed_from"] else ""
            self.method = str((t.get("config") or {}).get("method") or "sft")
            procs = f", {t['processes']} processes" if (t.get("processes") or 1) > 1 else ""
            batch = f", global batch {t['global_batch']}" if t.get("global_batch") else ""
            self.line(f"training {t['total_steps']} steps ({self.method}{procs}{batch}); {t['trainable_params']:,} "
                      f"trainable of {t['total_params']:,} parameters{resumed}")
            self.line(row_header(self.method))
        elif kind == "train.log":
            self.line(format_row(payload, self.method))
        elif kind == "train.checkpoint":
            self.line(f"checkpoint at step {payload['step']}: {payload['path']}")
        elif kind == "train.alert":
            self.line(f"ALERT ({payload['kind']}) step {payload['step']}: {payload['message']}", err=True)
            if payload.get("hint"):
                self.line(f"  what to change: {payload['hint']}", err=True)
        elif kind == "train.finished":
            f = payload
            loss = "—" if f["final_loss"] is None else f"{f['final_loss']:.4f}"
            val = "—" if f["final_eval_loss"] is None else f"{f['final_eval_loss']:.4f}"
            tps = "—" if f["tokens_per_s"] is None else f"{f['tokens_per_s']:,.0f}"
            self.line(f"{f['status']} at step {f['step']}/{f['total_steps']} in {_clock(f['elapsed_s'])}: "
                      f"train loss {loss}, validation loss {val}, {tps} tokens/s")
            peak = f.get("peak_memory") or {}
            if peak.get("torch_peak_bytes") is not None:
                self.line(f"peak memory on {peak['device']}: torch allocated "
                          f"{peak['torch_peak_bytes'] / 2**30:.2f} GiB, reserved "
                          f"{peak.get('torch_reserved_bytes', 0) / 2**30:.2f} GiB")
            if f["adapter_path"]:
                self.line(f"adapter: {f['adapter_path']}")
        elif kind == "log":
            self.line(f"{payload['level']}: {payload['message']}", err=payload["level"] != "info")

    def progress(self, payload: dict[str, Any]) -> None:
        pass


class _RichPrinter(_PlainPrinter):
    """On a terminal: the same lines, with a rich progress bar below them (rich is imported here
    only: the backend package never imports it)."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[message]}"), transient=True)
        self.bar.__enter__()
        self.task = self.bar.add_task("starting", total=None, message="")
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def line(self, text: str, err: bool = False) -> None:
        if err:
            super().line(text, err)
        else:
            self.bar.console.print(text, markup=False, highlight=False)

    def progress(self, payload: dict[str, Any]) -> None:
        total = payload["total"] or None
        self.bar.update(self.task, description=payload["stage"], completed=payload["done"], total=total,
                        message=payload.get("message", ""))
