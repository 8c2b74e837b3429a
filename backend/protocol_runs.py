"""The protocol of the runs ledger and of run notices (issue 18): ``runs.*`` requests and the
``run.notice`` / ``runs.deleted`` events. Registered into :mod:`backend.protocol`'s ``REQUESTS`` and
``EVENTS`` when that module is imported (its last line imports this one), so a client that has
``backend.protocol`` has these too. Pure Python, cheap to import.

A *run* is a session that ran (or tried to run) a ``train.start`` job; it is named by its session
id. Where a request takes ``run``/``runs``, a unique id prefix or a run's exact (unique) name is
accepted too. The answers are built by :mod:`backend.ledger` from the sessions store:

- a *record* (``runs.list``): ``{"id", "name", "method", "base_model", "dataset", "status"
  (running, finished, stopped, failed, interrupted, idle), "created", "updated", "step",
  "total_steps", "loss" (last training loss), "best_eval_loss", "best_eval_step",
  "last_eval_loss", "tokens_per_s", "duration_s", "adapter_path", "adapter_bytes", "merged",
  "exported", "uploaded", "run_dir"}``; figures are ``None`` where the run has none;
- a *detail* (``runs.show``): the record as ``"record"``, plus ``"config"`` (the run config as
  stored), ``"rows"`` (every logged row, a step's training and evaluation logs merged, as
  ``train.log`` payloads), ``"checkpoints"`` (``{"step", "path", "exists"}``), ``"evaluations"``
  (``{"step", "eval_loss", "metrics"}``), ``"errors"`` (``{"time", "message", "where", "hint",
  "source"}``: error events, alerts, and the store's error records), ``"notices"`` (``run.notice``
  payloads), ``"artifacts"`` (``{"kind", "path", "size", "created", "exists"}``), ``"logs"``
  (``{"tensorboard": path or ""}``), ``"summary"`` (the ``train.finished`` payload or ``{}``),
  ``"links"`` (merges, exports and uploads made from this run: ``{"kind", "path", "time"}``).
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from backend import protocol as P

#: A run's status in the ledger (a session's status says what its last job did; a run's says how
#: its training ended).
RUN_STATUSES = ("running", "finished", "stopped", "failed", "interrupted", "idle")
#: What a ``run.notice`` tells: the run's end, or that it made no step for ``stall_minutes``.
NOTICE_STATUSES = ("finished", "stopped", "failed", "stalled")
#: How many runs ``runs.diff`` and ``runs.curves`` compare at most.
MAX_COMPARED = 6


@P.request("runs.list")
class ListRuns:
    """Every run, newest first: ``{"runs": [record, ...]}`` (see the module's docstring)."""

    limit: int = 500


@P.request("runs.show")
class ShowRun:
    """One run in full: ``{"run": detail}`` (see the module's docstring)."""

    run: str


@P.request("runs.rename")
class RenameRun:
    """Give a run a new name: ``{"run": record}``; a ``session.renamed`` event follows."""

    run: str
    name: str


@P.request("runs.delete")
class DeleteRun:
    """Delete a run: its records and its files (the run folder with checkpoints, adapter, logs;
    artifacts of its session inside the data home). Without ``confirm`` it is refused with code
    ``confirm`` and the result ``{"run", "name", "paths": [...], "bytes"}`` saying what would go;
    with it: ``{"deleted": id, "paths": [...], "bytes"}`` and a ``runs.deleted`` event. A run
    whose job is running is refused."""

    run: str
    confirm: bool = False


@P.request("runs.diff")
class DiffRuns:
    """The settings that differ between 2 to 6 runs' configs (dotted paths, e.g.
    ``training.learning_rate``; the run's name is its column, not a row): ``{"runs": [{"id",
    "name"}], "rows": [{"setting", "values": [...]}], "markdown": table}``."""

    runs: list[str]


@P.request("runs.curves")
class RunCurves:
    """Loss curves of 1 to 6 runs: ``{"curves": [{"id", "name", "train": [[step, loss], ...],
    "eval": [[step, eval_loss], ...], "train_by_tokens": [[tokens_seen, loss], ...],
    "eval_by_tokens": [[tokens_seen, eval_loss], ...]}]}`` (rows without a token count are left
    out of the ``_by_tokens`` curves)."""

    runs: list[str]


@P.request("runs.export")
class ExportRuns:
    """Every logged row of the runs as CSV (one line per run and step; the run's id and name in
    the first columns, then the ``train.log`` fields, then the method's metrics): ``{"csv": text,
    "rows": n}``; with ``path`` (absolute, a file the user named; an existing one only with
    ``overwrite``) it is written there instead: ``{"path", "rows"}``."""

    runs: list[str]
    path: str = ""
    overwrite: bool = False


@P.event("run.notice")
class RunNotice:
    """A run finished, stopped, failed or stalled (no step for ``stall_minutes``): what an
    unattended run tells. The front end rings the terminal bell; the same text went to the
    webhook (``training.notify_url`` or ``QLW_NOTIFY_URL``) when one is set (``delivered``: it
    answered 2xx; ``delivery`` says why not)."""

    session: str
    run: str
    status: str
    text: str
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    best_eval_loss: float | None = None
    message: str = ""
    where: str = ""
    hint: str = ""
    idle_s: float | None = None
    delivered: bool = False
    delivery: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@P.event("runs.deleted")
class RunsDeleted:
    """A run was deleted (records and files); panes that list runs drop it."""

    run: str
    name: str = ""
    bytes: int = 0
