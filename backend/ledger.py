"""The runs ledger (issue 18): every training run in the sessions store, as records to list, one
run in full, the settings that differ between runs, their loss curves, their logged rows as CSV;
rename and delete.

A *run* is a session that ran (or tried to run) a ``train.start`` job. Everything here is read
from what the store already holds (the session's config, its ``train.*`` and ``job.*`` events, its
artifacts and errors) on a fresh read-only connection, so it is safe from any thread and from
another process: the backend answers ``runs.*`` requests with it (:func:`register`), and
``qlw runs`` (:func:`cli`) reads the store directly, with or without a backend running. Only
rename and delete write, and only through the backend (the store's one writer).

Where a run is named, its session id, a unique prefix of it, or its exact name (when unique) is
accepted. The shapes of records and details are in :mod:`backend.protocol_runs`.

Merged, exported and uploaded flags follow the paths: a ``merge.start``, ``export.start`` or
``hub.push`` job (in whichever session it ran) that finished ``done`` from a run's adapter or
checkpoint (``<home>/runs/<session>/...``), or from a merged folder made from one, marks that run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from backend import protocol as P, protocol_runs as R

#: The ``train.log`` fields of a CSV row, in order (the method's metrics follow).
ROW_FIELDS = ("step", "total_steps", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s",
              "tokens_seen", "elapsed_s", "eta_s")
#: Config keys that are the run's identity, not a setting: its column in a diff, never a row.
IDENTITY_KEYS = ("name", "version")
#: How a ``train.finished`` status reads in the ledger.
FINISHED_STATUS = {"done": "finished", "stopped": "stopped", "failed": "failed"}
#: How a ``job.finished`` status reads in the ledger.
JOB_STATUS = {"done": "finished", "cancelled": "stopped", "failed": "failed"}
_EVENT_KINDS = ("job.started", "job.finished", "train.started", "train.log", "train.finished", "train.checkpoint",
                "train.alert", "error", "run.notice")
_LINK_JOBS = ("merge.start", "export.start", "hub.push")


class LedgerError(LookupError):
    """A run that cannot be found (or is named ambiguously): the message says which and why."""


def _connect(db: Path) -> sqlite3.Connection:
    if not Path(db).exists():
        raise LedgerError(f"no sessions store at {db}: no run has been recorded in this data home yet")
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _size(path: Path) -> int | None:
    try:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
        return path.stat().st_size
    except OSError:
        return None


class _Run:
    """What the store holds about one run's session, gathered once."""

    def __init__(self, sid: str, name: str, created: float, updated: float, status: str, config: dict):
        self.id, self.name, self.created, self.updated = sid, name, created, updated
        self.session_status, self.config = status, config
        self.events: dict[str, list[tuple[int, float, dict]]] = {}
        self.artifacts: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []

    def of(self, kind: str) -> list[tuple[int, float, dict]]:
        return self.events.get(kind, [])

    def train_job(self) -> tuple[str, float] | None:
        """(job_id, start time) of the session's last train.start job."""
        jobs = [(p.get("job_id", ""), t) for _, t, p in self.of("job.started") if p.get("kind") == "train.start"]
        return jobs[-1] if jobs else None

    def is_run(self) -> bool:
        return self.train_job() is not None or bool(self.of("train.started"))

    def rows(self) -> list[dict[str, Any]]:
        """Every logged row of the run's (last) training: a step's training and evaluation logs
        merged (a later ``train.log`` of the same step is a full copy that completes it)."""
        job = self.train_job()
        by_step: dict[int, dict[str, Any]] = {}
        for _, _, p in self.of("train.log"):
            if job and p.get("job_id") not in (None, "", job[0]):
                continue
            by_step[int(p.get("step", 0))] = p
        return [by_step[s] for s in sorted(by_step)]

    def finished(self) -> dict[str, Any]:
        job = self.train_job()
        ends = [p for _, _, p in self.of("train.finished") if not job or p.get("job_id") in (None, "", job[0])]
        return ends[-1] if ends else {}

    def job_end(self) -> dict[str, Any]:
        job = self.train_job()
        if not job:
            return {}
        ends = [p for _, _, p in self.of("job.finished") if p.get("job_id") == job[0]]
        return ends[-1] if ends else {}


class Ledger:
    """The runs of one data home's store. Each call reads on its own read-only connection."""

    def __init__(self, home: Path | str, db: Path | str | None = None):
        self.home = Path(home)
        self.db = Path(db) if db is not None else self.home / "sessions.db"

    # Reading -------------------------------------------------------------------------------------

    def _gather(self, conn: sqlite3.Connection, ids: Iterable[str] | None = None) -> dict[str, _Run]:
        if ids is None:
            rows = conn.execute("SELECT id, name, created, updated, status, config FROM sessions").fetchall()
        else:
            ids = list(ids)
            rows = conn.execute(f"SELECT id, name, created, updated, status, config FROM sessions WHERE id IN "
                                f"({','.join('?' * len(ids))})", ids).fetchall() if ids else []
        runs: dict[str, _Run] = {}
        for sid, name, created, updated, status, config in rows:
            try:
                cfg = json.loads(config) or {}
            except ValueError:
                cfg = {}
            runs[sid] = _Run(sid, name, created, updated, status, cfg if isinstance(cfg, dict) else {})
        if not runs:
            return runs
        marks = ",".join("?" * len(runs))
        kinds = ",".join("?" * len(_EVENT_KINDS))
        for sid, seq, t, kind, payload in conn.execute(
                f"SELECT session_id, seq, time, kind, payload FROM events WHERE session_id IN ({marks}) "
                f"AND kind IN ({kinds}) ORDER BY session_id, seq", (*runs, *_EVENT_KINDS)):
            try:
                data = json.loads(payload)
            except ValueError:
                continue
            runs[sid].events.setdefault(kind, []).append((seq, t, data if isinstance(data, dict) else {}))
        for sid, kind, path, size, created in conn.execute(
                f"SELECT session_id, kind, path, size, created FROM artifacts WHERE session_id IN ({marks}) ORDER BY id",
                tuple(runs)):
            runs[sid].artifacts.append({"kind": kind, "path": path, "size": size, "created": created})
        for sid, t, message, location, hint, detail in conn.execute(
                f"SELECT session_id, time, message, location, hint, detail FROM errors WHERE session_id IN ({marks}) "
                "ORDER BY id", tuple(runs)):
            runs[sid].errors.append({"time": t, "message": message, "where": location, "hint": hint,
                                     "detail": detail, "source": "store"})
        return {sid: run for sid, run in runs.items() if run.is_run()}

    def _links(self, conn: sqlite3.Connection, run_ids: set[str]) -> dict[str, list[dict[str, Any]]]:
        """Merges, exports and uploads that finished from each run's adapter or checkpoints (or
        from a merged folder made from one), by run id."""
        started: dict[str, tuple[float, str, dict]] = {}
        ended: dict[str, dict] = {}
        for t, payload in conn.execute("SELECT time, payload FROM events WHERE kind IN ('job.started', 'job.finished') "
                                       "ORDER BY time"):
            try:
                p = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(p, dict) or p.get("kind") not in _LINK_JOBS:
                continue
            if "params" in p:
                started[p.get("job_id", "")] = (t, p["kind"], p.get("params") or {})
            elif "status" in p:
                ended[p.get("job_id", "")] = p
        pattern = re.compile(r"(?:^|/)runs/([A-Za-z0-9][A-Za-z0-9._-]*)(?:/|$)")
        merged_from: dict[str, str] = {}  # a merged folder -> the run it was made from

        def run_of(path: str) -> str | None:
            path = str(path or "").rstrip("/")
            m = pattern.search(path)
            if m and m.group(1) in run_ids:
                return m.group(1)
            return merged_from.get(path)

        links: dict[str, list[dict[str, Any]]] = {}
        for job_id, (t, kind, params) in sorted(started.items(), key=lambda kv: kv[1][0]):
            end = ended.get(job_id)
            if not end or end.get("status") != "done":
                continue
            result = end.get("result") or {}
            if kind == "merge.start":
                run = run_of(params.get("adapter", ""))
                if run:
                    out = str(result.get("out") or params.get("out", "")).rstrip("/")
                    merged_from[out] = run
                    links.setdefault(run, []).append({"kind": "merged", "path": out, "time": t})
            elif kind == "export.start":
                run = run_of(params.get("model", ""))
                if run:
                    folder = str(result.get("merged_folder") or "").rstrip("/")
                    if folder and folder not in merged_from:
                        merged_from[folder] = run
                        links.setdefault(run, []).append({"kind": "merged", "path": folder, "time": t})
                    links.setdefault(run, []).append({"kind": "exported", "path": result.get("path", ""), "time": t})
            elif kind == "hub.push" and not params.get("dry_run"):
                run = run_of(params.get("folder", ""))
                if run:
                    links.setdefault(run, []).append({"kind": "uploaded", "path": result.get("url") or
                                                      params.get("repo_id", ""), "time": t})
        return links

    def _record(self, run: _Run, links: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = run.config
        rows = run.rows()
        fin, job_end = run.finished(), run.job_end()
        started = run.of("train.started")
        start = started[-1][2] if started else {}
        if fin:
            status = FINISHED_STATUS.get(fin.get("status"), fin.get("status") or "finished")
            if status == "finished" and job_end.get("status") == "failed":
                status = "failed"
        elif job_end:
            status = JOB_STATUS.get(job_end.get("status"), "failed")
        elif run.session_status in ("running", "interrupted"):
            status = run.session_status
        else:
            status = "idle"
        evals = [(r["step"], _finite(r.get("eval_loss"))) for r in rows if _finite(r.get("eval_loss")) is not None]
        best = min(evals, key=lambda e: e[1]) if evals else (None, None)
        losses = [_finite(r.get("loss")) for r in rows if _finite(r.get("loss")) is not None]
        step = int(fin.get("step") or (rows[-1]["step"] if rows else start.get("start_step", 0)) or 0)
        total = int(fin.get("total_steps") or start.get("total_steps") or (rows[-1].get("total_steps") if rows else 0) or 0)
        tps = _finite(fin.get("tokens_per_s"))
        if tps is None:
            rates = [_finite(r.get("tokens_per_s")) for r in rows if _finite(r.get("tokens_per_s")) is not None]
            tps = round(sum(rates) / len(rates), 1) if rates else None
        duration = _finite(job_end.get("elapsed_s"))
        if duration is None:
            duration = _finite(fin.get("elapsed_s"))
        if duration is None and status == "running" and run.train_job():
            duration = round(time.time() - run.train_job()[1], 1)
        adapter = fin.get("adapter_path") or next((a["path"] for a in reversed(run.artifacts) if a["kind"] == "adapter"), "")
        adapter_bytes = _size(Path(adapter)) if adapter and Path(adapter).exists() else None
        model = cfg.get("model") or {}
        data = cfg.get("data") or {}
        source = data.get("source") or {}
        kinds = {link["kind"] for link in links}
        return {
            "id": run.id, "name": run.name, "method": cfg.get("method") or "sft",
            "base_model": (model.get("source") or "(embedded tiny model)") if model else "",
            "dataset": (source.get("path") or "(shipped sample)") if data else "",
            "status": status, "created": run.created, "updated": run.updated,
            "step": step, "total_steps": total, "loss": losses[-1] if losses else None,
            "best_eval_loss": best[1], "best_eval_step": best[0], "last_eval_loss": evals[-1][1] if evals else None,
            "tokens_per_s": tps, "duration_s": duration, "adapter_path": adapter if adapter_bytes is not None else "",
            "adapter_bytes": adapter_bytes, "merged": "merged" in kinds, "exported": "exported" in kinds,
            "uploaded": "uploaded" in kinds, "run_dir": str(self.home / "runs" / run.id),
        }

    def runs(self, limit: int = 500) -> list[dict[str, Any]]:
        """Every run's record, newest first."""
        conn = _connect(self.db)
        try:
            runs = self._gather(conn)
            links = self._links(conn, set(runs))
        finally:
            conn.close()
        ordered = sorted(runs.values(), key=lambda r: (r.created, r.id), reverse=True)[:max(0, int(limit))]
        return [self._record(r, links.get(r.id, [])) for r in ordered]

    def resolve(self, ref: str) -> str:
        """The session id of the run ``ref`` names: an id, a unique id prefix or a unique name."""
        ref = (ref or "").strip()
        if not ref:
            raise LedgerError("no run named: give a run's id (or a unique prefix of it) or its name")
        conn = _connect(self.db)
        try:
            runs = self._gather(conn)
        finally:
            conn.close()
        if ref in runs:
            return ref
        for found in ([sid for sid in runs if sid.startswith(ref)], [sid for sid, r in runs.items() if r.name == ref]):
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                names = ", ".join(f"{sid} ({runs[sid].name})" for sid in sorted(found)[:6])
                raise LedgerError(f"{ref!r} names {len(found)} runs: {names}; give the run's id")
        raise LedgerError(f"no run {ref!r} in {self.db} (`qlw runs list` shows the runs and their ids)")

    def resolve_many(self, refs: list[str], low: int = 1, high: int = R.MAX_COMPARED) -> list[str]:
        if not low <= len(refs) <= high:
            raise LedgerError(f"name {low} to {high} runs, got {len(refs)}")
        ids = [self.resolve(r) for r in refs]
        if len(set(ids)) != len(ids):
            raise LedgerError("the same run is named twice")
        return ids

    def _one(self, sid: str) -> tuple[_Run, list[dict[str, Any]]]:
        conn = _connect(self.db)
        try:
            runs = self._gather(conn, [sid])
            if sid not in runs:
                raise LedgerError(f"no run {sid!r}")
            every = {r[0] for r in conn.execute("SELECT id FROM sessions")}
            links = self._links(conn, every).get(sid, [])
        finally:
            conn.close()
        return runs[sid], links

    def detail(self, ref: str) -> dict[str, Any]:
        """One run in full (see :mod:`backend.protocol_runs`)."""
        run, links = self._one(self.resolve(ref))
        rows = run.rows()
        errors = [{"time": t, "message": p.get("message", ""), "where": p.get("where", ""), "hint": p.get("hint", ""),
                   "source": "error"} for _, t, p in run.of("error")]
        errors += [{"time": t, "message": p.get("message", ""), "where": f"step {p.get('step')}", "hint": p.get("hint", ""),
                    "source": f"alert:{p.get('kind', '')}"} for _, t, p in run.of("train.alert")]
        errors += run.errors
        errors.sort(key=lambda e: e["time"])
        checkpoints = []
        for _, _, p in run.of("train.checkpoint"):
            checkpoints.append({"step": p.get("step"), "path": p.get("path", ""), "exists": Path(p.get("path", "")).is_dir()})
        tb = Path(self.home / "runs" / run.id / "tensorboard")
        return {
            "record": self._record(run, links), "config": run.config, "rows": rows, "checkpoints": checkpoints,
            "evaluations": [{"step": r["step"], "eval_loss": r.get("eval_loss"),
                             "metrics": {k: v for k, v in (r.get("metrics") or {}).items() if k.startswith("eval_")}}
                            for r in rows if r.get("eval_loss") is not None],
            "errors": errors, "notices": [p for _, _, p in run.of("run.notice")],
            "artifacts": [{**a, "exists": Path(a["path"]).exists()} for a in run.artifacts],
            "logs": {"tensorboard": str(tb) if tb.is_dir() else ""},
            "summary": run.finished(), "links": links,
        }

    def diff(self, refs: list[str]) -> dict[str, Any]:
        """The settings that differ between 2 to 6 runs' configs."""
        ids = self.resolve_many(refs, 2)
        conn = _connect(self.db)
        try:
            runs = self._gather(conn, ids)
        finally:
            conn.close()
        flat = [flatten({k: v for k, v in runs[sid].config.items() if k not in IDENTITY_KEYS}) for sid in ids]
        keys = sorted(set().union(*flat), key=_setting_order)
        rows = [{"setting": key, "values": [f.get(key) for f in flat]} for key in keys
                if any(json.dumps(f.get(key), sort_keys=True) != json.dumps(flat[0].get(key), sort_keys=True)
                       for f in flat[1:])]
        heads = [{"id": sid, "name": runs[sid].name} for sid in ids]
        return {"runs": heads, "rows": rows, "markdown": diff_markdown(heads, rows)}

    def curves(self, refs: list[str]) -> dict[str, Any]:
        ids = self.resolve_many(refs, 1)
        conn = _connect(self.db)
        try:
            runs = self._gather(conn, ids)
        finally:
            conn.close()
        out = []
        for sid in ids:
            rows = runs[sid].rows()

            def pts(x: str, y: str) -> list[list[float]]:
                return [[r[x], r[y]] for r in rows if _finite(r.get(x)) is not None and _finite(r.get(y)) is not None]

            out.append({"id": sid, "name": runs[sid].name, "train": pts("step", "loss"), "eval": pts("step", "eval_loss"),
                        "train_by_tokens": pts("tokens_seen", "loss"), "eval_by_tokens": pts("tokens_seen", "eval_loss")})
        return {"curves": out}

    def export_csv(self, refs: list[str]) -> tuple[str, int]:
        """Every logged row of the runs as CSV text, and the number of rows."""
        ids = self.resolve_many(refs, 1, 10_000)
        conn = _connect(self.db)
        try:
            runs = self._gather(conn, ids)
        finally:
            conn.close()
        per_run = [(runs[sid], runs[sid].rows()) for sid in ids]
        metrics = sorted({k for _, rows in per_run for r in rows for k in (r.get("metrics") or {})})
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["run", "name", *ROW_FIELDS, *metrics])
        n = 0
        for run, rows in per_run:
            for r in rows:
                m = r.get("metrics") or {}
                writer.writerow([run.id, run.name, *(_cell(r.get(f)) for f in ROW_FIELDS), *(_cell(m.get(k)) for k in metrics)])
                n += 1
        return buf.getvalue(), n

    # Deleting ------------------------------------------------------------------------------------

    def delete_plan(self, ref: str) -> dict[str, Any]:
        """What deleting a run removes: its run folder and the artifacts of its session inside
        the data home (never a path outside it); ``kept``: recorded paths outside the home."""
        sid = self.resolve(ref)
        run, _ = self._one(sid)
        home = self.home.resolve()
        paths: list[Path] = []
        kept: list[str] = []
        folder = home / "runs" / sid
        if folder.exists():
            paths.append(folder)
        for a in run.artifacts:
            p = Path(a["path"])
            if not p.exists():
                continue
            rp = p.resolve()
            if rp == folder or folder in rp.parents:
                continue
            if _deletable(rp, home):
                paths.append(rp)
            else:
                kept.append(str(p))
        paths = [p for p in dict.fromkeys(paths) if not any(q in p.parents for q in paths if q != p)]
        return {"run": sid, "name": run.name, "paths": [str(p) for p in paths],
                "bytes": sum(_size(p) or 0 for p in paths), "kept": kept}


def _deletable(path: Path, home: Path) -> bool:
    """Inside the data home, and not one of its own folders (runs/, merged/, ...) or files."""
    try:
        rel = path.relative_to(home)
    except ValueError:
        return False
    return len(rel.parts) >= 2


def delete_files(paths: list[str]) -> list[str]:
    """Remove each path (folder or file); the ones that could not be removed, with why."""
    failed = []
    for text in paths:
        p = Path(text)
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        except OSError as exc:
            failed.append(f"{p}: {exc.strerror or exc}")
    return failed


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"training": {"learning_rate": 1e-4}}`` -> ``{"training.learning_rate": 1e-4}`` (lists are
    values; nested tables such as data.source and data.mapping are flattened too)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


_SECTION_ORDER = ("method", "model", "data", "lora", "training", "dpo", "orpo", "kto")


def _setting_order(key: str) -> tuple[int, str]:
    head = key.split(".", 1)[0]
    return (_SECTION_ORDER.index(head) if head in _SECTION_ORDER else len(_SECTION_ORDER), key)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def show_value(value: Any) -> str:
    """A setting's value as a diff cell shows it."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, str):
        return value if value else '""'
    return format(value, "g") if isinstance(value, float) else str(value)


def _md(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def diff_markdown(heads: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """The diff as a Markdown table: a column per run (its name; its id where names repeat)."""
    names = [h["name"] for h in heads]
    titles = [f"{h['name']} ({h['id']})" if names.count(h["name"]) > 1 else h["name"] for h in heads]
    lines = ["| setting | " + " | ".join(_md(t) for t in titles) + " |",
             "|---|" + "---|" * len(heads)]
    for row in rows:
        lines.append(f"| {_md(row['setting'])} | " + " | ".join(_md(show_value(v)) for v in row["values"]) + " |")
    if not rows:
        lines.append("| (no setting differs) |" + " |" * len(heads))
    return "\n".join(lines) + "\n"


# The backend's room ---------------------------------------------------------------------------------


def _refusal(exc: Exception) -> P.Reply:
    return P.Reply("", "refused", reason=str(exc), code=P.BAD_MESSAGE)


def register(server) -> None:
    """Add the ``runs.*`` requests to a :class:`backend.server.BackendServer`: reads run off the
    event loop on their own connections; rename and delete write through the server's store."""
    import asyncio

    def ledger() -> Ledger:
        return Ledger(server.home, server.store.path if server.store is not None else None)

    async def read(fn, *args) -> P.Reply:
        try:
            return P.Reply("", "ok", await asyncio.to_thread(fn, *args))
        except LedgerError as exc:
            return _refusal(exc)

    async def runs_list(client, params: R.ListRuns) -> P.Reply:
        return await read(lambda: {"runs": ledger().runs(params.limit)})

    async def runs_show(client, params: R.ShowRun) -> P.Reply:
        return await read(lambda: {"run": ledger().detail(params.run)})

    async def runs_diff(client, params: R.DiffRuns) -> P.Reply:
        return await read(ledger().diff, list(params.runs))

    async def runs_curves(client, params: R.RunCurves) -> P.Reply:
        return await read(ledger().curves, list(params.runs))

    async def runs_export(client, params: R.ExportRuns) -> P.Reply:
        def work():
            text, n = ledger().export_csv(list(params.runs))
            if not params.path:
                return {"csv": text, "rows": n}
            path = Path(params.path).expanduser()
            if not path.is_absolute():
                raise LedgerError(f"{params.path!r}: give an absolute path for the CSV file")
            if path.exists() and not params.overwrite:
                raise LedgerError(f"{path} exists: confirm to overwrite it")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            return {"path": str(path), "rows": n}

        return await read(work)

    async def runs_rename(client, params: R.RenameRun) -> P.Reply:
        name = params.name.strip()
        if not name or len(name) > 200 or any(ord(c) < 32 for c in name):
            return P.Reply("", "refused", reason="a run's name is 1 to 200 characters of text, no control characters",
                           code=P.BAD_MESSAGE)
        try:
            sid = await asyncio.to_thread(ledger().resolve, params.run)
        except LedgerError as exc:
            return _refusal(exc)
        server.store.set_name(sid, name)
        server.publish(sid, "session.renamed", {"session": sid, "name": name})
        return await read(lambda: {"run": next(r for r in ledger().runs(100000) if r["id"] == sid)})

    async def runs_delete(client, params: R.DeleteRun) -> P.Reply:
        try:
            plan = await asyncio.to_thread(ledger().delete_plan, params.run)
        except LedgerError as exc:
            return _refusal(exc)
        sid = plan["run"]
        job = server.jobs.current if server.jobs is not None else None
        if job is not None and job.session == sid:
            return P.Reply("", "refused", reason=f"run {plan['name']!r} has a {job.kind} job running: stop it first",
                           code=P.BAD_MESSAGE)
        if not params.confirm:
            size = f"{plan['bytes'] / 2**20:,.1f} MiB" if plan["bytes"] else "no files"
            return P.Reply("", "refused", plan, code=P.CONFIRM,
                           reason=f"delete run {plan['name']!r} ({sid}): its records and {len(plan['paths'])} "
                                  f"path(s), {size}? Confirm to delete")
        server.store.delete_session(sid)
        if server.current_session == sid:
            server.current_session = None
        failed = await asyncio.to_thread(delete_files, plan["paths"])
        server.publish(None, "runs.deleted", {"run": sid, "name": plan["name"], "bytes": plan["bytes"]})
        result = {"deleted": sid, "paths": plan["paths"], "bytes": plan["bytes"], "kept": plan["kept"]}
        if failed:
            result["failed"] = failed
        return P.Reply("", "ok", result)

    server.handlers.update({
        "runs.list": runs_list, "runs.show": runs_show, "runs.rename": runs_rename, "runs.delete": runs_delete,
        "runs.diff": runs_diff, "runs.curves": runs_curves, "runs.export": runs_export,
    })


# `qlw runs`: headless ---------------------------------------------------------------------------------


def add_cli_arguments(parser) -> None:
    """``python -m backend runs`` (``qlw runs``): list, show, diff, export."""
    parser.add_argument("--home", type=Path, default=None, help="data home (default: $QLW_HOME or the user data dir)")
    sub = parser.add_subparsers(dest="runs_cmd", required=True)
    p = sub.add_parser("list", help="every run, newest first: status, steps, losses, tokens/s, time, adapter, flags")
    p.add_argument("--json", action="store_true", help="the records as JSON")
    p.add_argument("--limit", type=int, default=500)
    p = sub.add_parser("show", help="one run in full: config, logged rows, checkpoints, evaluations, errors, artifacts")
    p.add_argument("run", help="a run's id (or a unique prefix) or its name")
    p.add_argument("--json", action="store_true", help="the detail as JSON")
    p = sub.add_parser("diff", help="the settings that differ between 2 to 6 runs (a Markdown table)")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--json", action="store_true", help="the rows as JSON")
    p = sub.add_parser("export", help="every logged row of the runs as CSV")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("-o", "--output", type=Path, default=None, help="write to this file (default: stdout)")


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _short(text: str, width: int = 28) -> str:
    text = text if len(text) <= width else "…" + text[-(width - 1):]
    return text


def list_table(records: list[dict[str, Any]]) -> str:
    """The records as an aligned text table (``qlw runs list``)."""
    head = ("RUN", "NAME", "METHOD", "MODEL", "DATA", "STATUS", "STEPS", "LOSS", "BEST VAL", "LAST VAL", "TOK/S",
            "TIME", "ADAPTER", "M E U")
    rows = [head]
    for r in records:
        flags = " ".join("x" if r[k] else "-" for k in ("merged", "exported", "uploaded"))
        data = r["dataset"]
        rows.append((r["id"], _short(r["name"], 24), r["method"], _short(r["base_model"]),
                     _short(Path(data).name if "/" in data and Path(data).suffix else data), r["status"],
                     f"{r['step']}/{r['total_steps']}", _fmt(r["loss"], ".4f"), _fmt(r["best_eval_loss"], ".4f"),
                     _fmt(r["last_eval_loss"], ".4f"), _fmt(r["tokens_per_s"], ",.0f"), _dur(r["duration_s"]),
                     _bytes(r["adapter_bytes"]), flags))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows) + "\n"


def show_text(d: dict[str, Any]) -> str:
    """One run's detail as text (``qlw runs show``)."""
    from backend import train, train_config as TC

    r = d["record"]
    out = [f"run {r['id']}: {r['name']}", ""]
    facts = [("status", r["status"]), ("method", r["method"]), ("base model", r["base_model"]),
             ("dataset", r["dataset"]), ("steps", f"{r['step']}/{r['total_steps']}"),
             ("loss", _fmt(r["loss"], ".4f")),
             ("best val loss", f"{_fmt(r['best_eval_loss'], '.4f')}" + (f" (step {r['best_eval_step']})"
                                                                         if r["best_eval_step"] is not None else "")),
             ("last val loss", _fmt(r["last_eval_loss"], ".4f")), ("tokens/s", _fmt(r["tokens_per_s"], ",.0f")),
             ("time", _dur(r["duration_s"])), ("adapter", f"{r['adapter_path'] or '—'} ({_bytes(r['adapter_bytes'])})"),
             ("merged / exported / uploaded", " / ".join("yes" if r[k] else "no" for k in ("merged", "exported", "uploaded"))),
             ("run folder", r["run_dir"]), ("tensorboard", d["logs"]["tensorboard"] or "—")]
    width = max(len(k) for k, _ in facts)
    out += [f"{k:<{width}}  {v}" for k, v in facts]
    method = r["method"]
    out += ["", "logged rows:", train.row_header(method)]
    out += [train.format_row(row, method) for row in d["rows"]] or ["(none)"]
    out += ["", "checkpoints:"]
    out += [f"  step {c['step']}: {c['path']}{'' if c['exists'] else ' (deleted)'}" for c in d["checkpoints"]] or ["  (none)"]
    out += ["", "evaluations:"]
    out += [f"  step {e['step']}: eval_loss {_fmt(e['eval_loss'], '.4f')}" for e in d["evaluations"]] or ["  (none)"]
    out += ["", "errors and alerts:"]
    for e in d["errors"]:
        out.append(f"  [{e['source']}] {e['message']}" + (f" ({e['where']})" if e["where"] else ""))
        if e["hint"]:
            out.append(f"      hint: {e['hint']}")
    if not d["errors"]:
        out.append("  (none)")
    out += ["", "artifacts:"]
    out += [f"  {a['kind']:<10} {a['path']}{'' if a['exists'] else ' (gone)'}" for a in d["artifacts"]] or ["  (none)"]
    for link in d["links"]:
        out.append(f"  {link['kind']:<10} {link['path']}")
    out += ["", "config:", TC.dumps_toml(d["config"]).rstrip() if d["config"] else "(none recorded)"]
    return "\n".join(out) + "\n"


def cli(args) -> int:
    """``qlw runs list | show RUN | diff RUN RUN... | export RUN...``: read the store directly.
    0: done; 1: no such run (or no store); 2: bad arguments."""
    home = (args.home or P.data_home()).expanduser().resolve()
    ledger = Ledger(home)
    try:
        if args.runs_cmd == "list":
            records = ledger.runs(args.limit) if ledger.db.exists() else []
            if args.json:
                print(json.dumps(records, indent=2))
            elif not records:
                print(f"no runs in {home} yet (`qlw train CONFIG.toml` or the Train pane makes one)")
            else:
                sys.stdout.write(list_table(records))
            return 0
        if args.runs_cmd == "show":
            detail = ledger.detail(args.run)
            sys.stdout.write(json.dumps(detail, indent=2) + "\n" if args.json else show_text(detail))
            return 0
        if args.runs_cmd == "diff":
            if not 2 <= len(args.runs) <= R.MAX_COMPARED:
                print(f"qlw runs diff: name 2 to {R.MAX_COMPARED} runs", file=sys.stderr)
                return 2
            diff = ledger.diff(args.runs)
            sys.stdout.write(json.dumps(diff, indent=2) + "\n" if args.json else diff["markdown"])
            return 0
        if args.runs_cmd == "export":
            text, n = ledger.export_csv(args.runs)
            if args.output:
                args.output.write_text(text, encoding="utf-8")
                print(f"{n} rows written to {args.output}", file=sys.stderr)
            else:
                sys.stdout.write(text)
            return 0
    except LedgerError as exc:
        print(f"qlw runs: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `qlw runs export ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 2
