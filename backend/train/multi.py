"""A run in several processes, supervised (issue 19): :func:`run_launched` is what ``train.start``
and ``qlw train`` do instead of :func:`backend.train.run_training` when ``launch.processes`` > 1.

It runs in the job thread (the backend's, or ``qlw train``'s main thread) and:

1. prepares what the ranks must not race for: the embedded tiny model is built, the data source
   opened and formatted once (its caches written; a bad source or mapping fails here, before N
   processes start);
2. writes the run's ``launch/`` folder (:mod:`backend.train.launch`): the accelerate config, the
   spec the ranks read (the checked config, the session, the job id, the checkpoint to resume from);
3. starts ``accelerate launch`` (the accelerate CLI) in a session of its own (``start_new_session``):
   a dropped SSH connection or a ctrl+c in the terminal reaches the backend, never the ranks;
4. tails rank 0's events (``launch/events.jsonl``) and re-emits them through the job's context, so
   the store records them with their sequence numbers (replay on re-attach) and the Train pane and
   ``qlw train``'s table see one run; artifacts are recorded as rank 0 reports them;
5. a stop (the job's cancel, ctrl+c) writes ``launch/stop``: the ranks agree on it at the next step
   boundary, save a checkpoint and end (``backend/train/worker.py``); before the first step there
   is nothing to save and the process group is ended at once. A group that does not end within
   ``QLW_STOP_GRACE_S`` seconds (default 600) after the stop, or a supervisor that is itself
   interrupted (a second ctrl+c), ends the group: SIGTERM, then SIGKILL;
6. a rank that fails or dies ends the run (torchrun ends the others): the error names the rank, its
   error (its own ``rank-N.error.json``, else torchrun's report: the signal that killed it), the
   step, and the last checkpoint to resume from; ``train.finished`` says ``failed``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from backend import methods
from backend.jobs import JobCancelled, JobError
from backend.train import launch
from backend.train.checks import CheckedRun, check_run, data_settings, list_checkpoints, run_dir

#: rank 0's events that are the run's (``model.loaded`` and the like are the rank's own business:
#: the backend holds no model for a launched run).
FORWARDED = ("train.started", "train.log", "train.checkpoint", "train.alert", "train.finished", "log")
POLL_S = 0.1
#: Messages of a rank that failed because another one did (its peer closed the connection).
_PEER_FAILURE = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|DistBackendError|"
                           r"NCCL communicator was aborted|ProcessGroupNCCL|Socket Timeout|recvBytes|"
                           r"read: Connection|gloo", re.I)


def stop_grace_s() -> float:
    try:
        return float(os.environ.get("QLW_STOP_GRACE_S", "600"))
    except ValueError:
        return 600.0


class _Tail:
    """Complete JSON lines appended to a file since the last read."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


def _kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End the launched process group: SIGTERM (torchrun ends its workers), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    # Ranks left behind by a launcher that died first (they share its process group).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


def torchrun_failures(log_text: str) -> list[dict[str, Any]]:
    """The failures torchrun's ``ChildFailedError`` report lists (root cause first): ``{"rank",
    "exitcode", "traceback"}``."""
    out = []
    root = log_text.rfind("Root Cause")
    blocks = re.split(r"\n\[\d+\]:\s*\n", log_text[log_text.rfind("Failures:"):] if "Failures:" in log_text else "")
    text = log_text[root:] if root >= 0 else ""
    for chunk in ([text] if text else []) + blocks[1:]:
        rank = re.search(r"rank\s*:\s*(\d+)", chunk)
        code = re.search(r"exitcode\s*:\s*(-?\d+)", chunk)
        tb = re.search(r"traceback\s*:\s*(.+)", chunk)
        if rank and code:
            out.append({"rank": int(rank.group(1)), "exitcode": int(code.group(1)),
                        "traceback": tb.group(1).strip() if tb else ""})
    return out


def find_failure(folder: Path, log_text: str, returncode: int | None) -> dict[str, Any]:
    """Which rank ended the run, and why: ``{"rank", "message", "where", "hint", "step"}``. A rank's
    own error file comes first, unless its error is only that a peer went away; then torchrun's
    report (a rank killed by a signal writes nothing itself)."""
    errors = []
    for path in sorted(folder.glob("rank-*.error.json")):
        try:
            errors.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    errors.sort(key=lambda e: e.get("time") or 0)
    primary = [e for e in errors if not _PEER_FAILURE.search(str(e.get("message", "")))]
    reported = torchrun_failures(log_text)
    with_file = {e.get("rank") for e in errors}
    if primary:
        return primary[0]
    for failure in reported:
        if failure["rank"] not in with_file and failure["exitcode"] != 0:
            code = failure["exitcode"]
            why = (f"the process was killed by {_signal_name(-code)}" if code < 0
                   else f"the process exited with code {code} without a report")
            return {"rank": failure["rank"], "message": why, "where": "", "hint": "", "step": None,
                    "detail": failure["traceback"]}
    if errors:
        return errors[0]
    if reported:
        f = reported[0]
        return {"rank": f["rank"], "message": f"exit code {f['exitcode']}", "where": "", "hint": "", "step": None}
    return {"rank": None, "message": f"accelerate launch ended with exit code {returncode}", "where": "", "hint": "",
            "step": None}


def _prepare(checked: CheckedRun, home: Path, ctx) -> None:
    """What the ranks would race for, done once here: the tiny model built, the data opened and
    formatted (its caches written). Errors are the one-process run's (DataError by field)."""
    from backend import data as D
    from backend.train_config import model_settings

    eff = checked.effective
    progress = lambda st, d, t: ctx.progress(st, d, t)  # noqa: E731
    cancelled = lambda: ctx.cancelled  # noqa: E731
    ctx.progress("preparing data", 0, 0)
    data, _notes = data_settings(eff["data"], home, progress, cancelled, method=eff["method"])
    prepared = methods.get(eff["method"]).prepare(data, eff, home, progress, cancelled, log=lambda level, message: None)
    if len(prepared.train) == 0:
        raise D.DataError("no training row could be formatted", where="data.mapping",
                          hint="check the mapping and the template in the Data pane (qlw data shows why rows fail)")
    ctx.check_cancelled()
    model_settings(eff["model"], home, build=True, progress=progress, cancelled=cancelled)
    ctx.check_cancelled()


def run_launched(config: dict[str, Any], home: Path, ctx, *, resume_from: str = "",
                 record_artifact: Callable[[str, str], None] | None = None,
                 set_config: Callable[[dict[str, Any]], None] | None = None,
                 fault: tuple[str, int] | None = None, checked: CheckedRun | None = None) -> dict[str, Any]:
    """Train ``config`` in ``launch.processes`` processes, supervised from this thread; returns the
    ``train.finished`` payload as :func:`run_training` does, raises :class:`JobError` (a rank
    failed: named) or :class:`JobCancelled` (stopped before the first step)."""
    home = Path(home)
    run = checked if checked is not None else check_run(config, home, resume_from)
    cfg, eff, device = run.config, run.effective, run.device
    n, how = launch.processes(eff), launch.strategy(eff)
    record = record_artifact or (lambda kind, path: None)
    if set_config is not None:
        set_config(cfg)
    folder = run_dir(home, ctx.session)
    ldir = launch.launch_dir(folder)
    shutil.rmtree(ldir, ignore_errors=True)  # a folder left by an earlier launch of this session
    ldir.mkdir(parents=True)
    _prepare(run, home, ctx)
    if device.startswith("cuda"):
        from backend import models
        from backend.holdings import HOLDINGS

        if HOLDINGS.get("base") is not None:
            # Each rank loads its own copy on its GPU: one held here would take rank 0's room.
            models.release_base_model()
            ctx.emit("log", {"level": "info", "message": "released the held base model: each of the "
                                                         f"{n} processes loads its own copy"})

    layers = launch.decoder_layer_classes(eff["model"], home) if how == "fsdp" and device != "cpu" else None
    config_file = ldir / launch.CONFIG_FILE
    config_file.write_text(launch.dumps_yaml(launch.accelerate_config(eff, device, layers)), encoding="utf-8")
    spec_file = ldir / launch.SPEC_FILE
    spec_file.write_text(json.dumps({"config": cfg, "home": str(home), "session": ctx.session, "job_id": ctx.job_id,
                                     "resume_from": run.resume_from, "fault": list(fault) if fault else None}),
                         encoding="utf-8")
    cmd = launch.launch_command(config_file, spec_file)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # where the backend package is, for `-m backend.train.worker`
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    log_path = ldir / launch.LOG_FILE
    ctx.progress("launching", 0, 0, "", f"{n} processes ({how})")
    ctx.emit("log", {"level": "info", "message": f"training in {n} processes ({how}): accelerate launch "
                                                 f"{' '.join(cmd[3:])}; their log: {log_path}"})
    tail = _Tail(ldir / launch.EVENTS_FILE)
    seen: dict[str, Any] = {"started": False, "finished": False, "step": 0, "checkpoint": "", "total_steps": 0,
                            "t0": time.monotonic()}

    def dispatch(line: dict[str, Any]) -> None:
        kind, payload = line.get("kind"), line.get("payload") or {}
        if kind == "job.progress":
            ctx.progress(payload.get("stage", ""), payload.get("done", 0), payload.get("total", 0),
                         payload.get("unit", ""), payload.get("message", ""))
        elif kind == "qlw.artifact":
            record(payload["kind"], payload["path"])
        elif kind in FORWARDED:
            if kind == "train.started":
                seen.update(started=True, total_steps=payload.get("total_steps", 0), step=payload.get("start_step", 0),
                            t0=time.monotonic())
            elif kind == "train.log":
                seen["step"] = max(seen["step"], int(payload.get("step") or 0))
            elif kind == "train.checkpoint":
                seen["checkpoint"] = payload.get("path", "")
            elif kind == "train.finished":
                seen["finished"] = True
            ctx.emit(kind, payload)

    stop_at: float | None = None
    ended_by_us = ""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=str(ldir), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            (ldir / "launcher.pid").write_text(str(proc.pid), encoding="utf-8")
            while True:
                for line in tail.read():
                    dispatch(line)
                if proc.poll() is not None:
                    break
                if ctx.cancelled and stop_at is None:
                    stop_at = time.monotonic()
                    if seen["started"]:
                        (ldir / launch.STOP_FILE).write_text("stop\n", encoding="utf-8")
                        ctx.emit("log", {"level": "info", "message": f"stopping: the {n} processes save a checkpoint "
                                                                     "at the end of this step"})
                    else:  # nothing to save yet
                        ended_by_us = "cancelled"
                        _kill_group(proc)
                        break
                if stop_at is not None and not ended_by_us and time.monotonic() - stop_at > stop_grace_s():
                    ended_by_us = "stop timed out"
                    ctx.emit("log", {"level": "warning", "message": f"the processes did not stop within "
                                                                    f"{stop_grace_s():.0f} s: ending them"})
                    _kill_group(proc)
                    break
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:  # the supervisor itself was interrupted (a second ctrl+c)
                _kill_group(proc)
    for line in tail.read():
        dispatch(line)
    rc = proc.returncode
    result_path = ldir / launch.RESULT_FILE
    if rc == 0 and result_path.is_file():
        result = json.loads(result_path.read_text(encoding="utf-8"))
        if result.get("status") == "cancelled":
            raise JobCancelled()
        return result
    if ended_by_us == "cancelled":
        raise JobCancelled()
    try:
        log_text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        log_text = ""
    failure = find_failure(ldir, log_text, rc)
    if ended_by_us:
        failure = {"rank": None, "message": f"the processes were ended ({ended_by_us})", "where": "", "hint": "",
                   "step": None}
    step = failure.get("step") or seen["step"]
    checkpoint = seen["checkpoint"]
    if not checkpoint:
        found = [c for c in list_checkpoints(home, ctx.session)]
        checkpoint = found[0]["path"] if found else ""
    if seen["started"] and not seen["finished"]:
        ctx.emit("train.finished", {"job_id": ctx.job_id, "status": "failed", "step": seen["step"],
                                    "total_steps": seen["total_steps"], "final_loss": None, "final_eval_loss": None,
                                    "adapter_path": "", "checkpoint_path": checkpoint,
                                    "elapsed_s": round(time.monotonic() - seen["t0"], 3),
                                    "tokens_per_s": None, "peak_memory": {}})
    who = f"rank {failure['rank']} of {n}" if failure.get("rank") is not None else f"the launch of {n} processes"
    at = f" at step {step}" if step else " before the first step"
    message = f"{who} failed{at}: {failure.get('message') or 'no report'}"
    resume = (f"the last checkpoint is {checkpoint}: resume from it" if checkpoint
              else "no checkpoint was saved before it")
    hint = "; ".join(x for x in (failure.get("hint") or "", resume, f"the processes' log: {log_path}") if x)
    where = f"rank {failure['rank']}" if failure.get("rank") is not None else str(log_path)
    if failure.get("where"):
        where += f": {failure['where']}"
    raise JobError(message, where=where, hint=hint)
