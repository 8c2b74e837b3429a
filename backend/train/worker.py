"""One process of a launched run (issue 19): ``accelerate launch ... -m backend.train.worker SPEC``
starts this module in every process; each runs :func:`backend.train.run_training` on the same
config, and the trainer (through accelerate) makes them one data-parallel run.

What a rank does beside training:

- rank 0 reports: its events (``train.*``, ``log``, ``job.progress``, and the artifacts it records)
  go as JSON lines to ``launch/events.jsonl`` in the run folder, which the supervising backend
  (:mod:`backend.train.multi`) tails and re-emits through the job's context: the store, the Train
  pane, replay and ``qlw train``'s table see them as from one process. The other ranks report
  nothing;
- a stop: at each step boundary every rank looks for ``launch/stop`` and the ranks agree (an
  all-reduce of the flag, so they all stop at the same step: one rank leaving the loop early would
  leave the others waiting in a collective); then the usual stop follows (a checkpoint, then the end);
- a failure: the rank writes ``launch/rank-<N>.error.json`` (its error, where, the step) before it
  exits non-zero; torchrun then ends the other ranks and the supervisor names the rank;
- ``launch/rank-<N>.pid``: its process id (tests kill one rank by it); rank 0 writes
  ``launch/result.json`` (the ``train.finished`` payload) at a clean end.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from backend.jobs import JobCancelled, describe_exception
from backend.train import launch


class RankContext:
    """The job context of one rank (what :func:`run_training` reports through)."""

    def __init__(self, spec: dict[str, Any], folder: Path, rank: int):
        self.job_id = spec["job_id"]
        self.session = spec["session"]
        self.rank = rank
        self.folder = folder
        self.step = 0
        self._stop = False
        self._out = open(folder / launch.EVENTS_FILE, "a", encoding="utf-8") if rank == 0 else None

    # What run_training reads --------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """The stop the ranks agreed on at the last step boundary (never before training starts:
        every rank must leave the loop at the same step)."""
        return self._stop

    def check_cancelled(self) -> None:
        if self._stop:
            raise JobCancelled()

    def at_step_end(self) -> None:
        """Called by the trainer callback at each step's end, on every rank: agree on a stop."""
        asked = (self.folder / launch.STOP_FILE).exists()
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = "cpu"
            if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
                device = f"cuda:{torch.cuda.current_device()}"
            flag = torch.tensor([1 if asked else 0], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            asked = bool(flag.item())
        self._stop = self._stop or asked

    def emit(self, kind: str, payload: dict[str, Any]) -> None:
        self._write(kind, payload)

    def progress(self, stage: str, done: float, total: float = 0, unit: str = "", message: str = "") -> None:
        if stage == "training":
            self.step = int(done)
        self._write("job.progress", {"stage": stage, "done": done, "total": total, "unit": unit, "message": message})

    def artifact(self, kind: str, path: str) -> None:
        self._write("qlw.artifact", {"kind": kind, "path": path})

    def _write(self, kind: str, payload: dict[str, Any]) -> None:
        if self._out is None:
            return
        self._out.write(json.dumps({"kind": kind, "payload": payload, "time": time.time()}, default=str) + "\n")
        self._out.flush()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def _quiet() -> None:
    """The launcher log holds what the libraries say; their deprecation notes are noise there."""
    if os.environ.get("QLW_LOG_LEVEL", "").upper() in ("INFO", "DEBUG"):
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("bitsandbytes", "transformers", "peft", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, default=str), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    spec_file = Path(argv[0]).resolve()
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    folder = spec_file.parent
    rank = launch.rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    (folder / f"rank-{rank}.pid").write_text(str(os.getpid()), encoding="utf-8")
    _quiet()
    config = spec["config"]
    home = Path(spec["home"])
    ctx = RankContext(spec, folder, rank)
    code = 0
    try:
        import torch

        if config["model"]["device"] != "cpu" and torch.cuda.is_available():
            # One GPU per process: accelerate's ranks each take cuda:LOCAL_RANK.
            config["model"]["device"] = f"cuda:{local_rank}"
            torch.cuda.set_device(local_rank)
        if launch.is_fsdp_rank():
            from backend.models import loading

            loading.FSDP_RANK = True
        from backend.train.runs import run_training

        fault = tuple(spec["fault"]) if spec.get("fault") else None  # the test seam, taken by the supervisor
        result = run_training(config, home, ctx, resume_from=spec.get("resume_from", ""),
                              record_artifact=ctx.artifact, fault=fault)
        if rank == 0:
            _write_json(folder / launch.RESULT_FILE, result)
    except JobCancelled:
        if rank == 0:
            _write_json(folder / launch.RESULT_FILE, {"status": "cancelled"})
    except BaseException as exc:  # noqa: BLE001 - told to the supervisor, then the rank ends
        info = describe_exception(exc)
        _write_json(folder / f"rank-{rank}.error.json",
                    {"rank": rank, "step": ctx.step, "time": time.time(), "type": type(exc).__name__, **info})
        print(info["detail"], file=sys.stderr, flush=True)
        code = 1
    finally:
        ctx.close()
        try:
            import torch.distributed as dist

            if code == 0 and dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
    return code


if __name__ == "__main__":
    sys.exit(main())
