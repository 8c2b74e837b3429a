"""The runs ledger (backend/ledger.py, issue 18): three tiny CPU runs that differ only in
learning_rate, then `qlw runs list | show | diff | export` and the backend's runs.* requests
(in this process, on a stand-in server: the same handlers the real one registers).

One module-scoped data home holds the three runs, trained once (about a second each on the tiny
model); every test reads it.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backend import ledger as L, protocol as P, protocol_runs as R, train
from sessions.store import Store
from tests.backend.test_train import Run, make_home, small_config
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

RATES = (1e-3, 2e-3, 3e-3)


def run_tiny(home: Path, name: str, **training) -> Run:
    """One tiny run recorded as the backend records it: session config, events, artifacts, status."""
    config = small_config(max_steps=4, eval_steps=2, **training)
    config["name"] = name
    run = Run(home)
    run.store.set_name(run.session, name)
    run.store.set_status(run.session, "running")
    run.emit("job.started", {"job_id": run.job_id, "kind": "train.start", "params": {"config": config}})
    status, error = "done", None
    try:
        train.run_training(config, home, run, record_artifact=lambda k, p: run.store.add_artifact(run.session, k, p),
                           set_config=lambda cfg: run.store.set_config(run.session, cfg))
    except Exception as exc:  # noqa: BLE001 - recorded as the job runner would
        status, error = "failed", {"message": str(exc), "where": getattr(exc, "where", ""), "hint": ""}
    run.finish("train.start", status, 1.5, {}, error)
    return run


@pytest.fixture(scope="module")
def ledger_home(tiny_folder):
    home = make_home(tiny_folder)
    runs = [run_tiny(home, f"lr {lr:g}", learning_rate=lr, seed=3) for lr in RATES]
    from backend import models

    models.release_base_model()
    yield home, [r.session for r in runs], runs
    shutil.rmtree(home, ignore_errors=True)


def qlw(home: Path, *args: str) -> subprocess.CompletedProcess:
    code = "import sys; from tui.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "--home", str(home), *args], cwd=str(home), capture_output=True,
                          text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_qlw_runs_list_shows_every_run_with_its_figures(ledger_home):
    home, ids, runs = ledger_home
    records = L.Ledger(home).runs()
    assert [r["id"] for r in records] == ids[::-1]  # newest first
    for record, run, lr in zip(records[::-1], runs, RATES):
        rows = {r["step"]: r for r in run.of("train.log")}
        assert record["name"] == f"lr {lr:g}" and record["status"] == "finished" and record["method"] == "sft"
        assert (record["step"], record["total_steps"]) == (4, 4)
        assert record["loss"] == rows[4]["loss"]
        assert record["last_eval_loss"] == rows[4]["eval_loss"]
        assert record["best_eval_loss"] == min(rows[2]["eval_loss"], rows[4]["eval_loss"])
        assert record["tokens_per_s"] > 0 and record["duration_s"] == 1.5
        assert record["adapter_bytes"] > 0 and Path(record["adapter_path"]).name == "adapter"
        assert record["base_model"] == "(embedded tiny model)" and record["dataset"] == "(shipped sample)"
        assert not (record["merged"] or record["exported"] or record["uploaded"])

    out = qlw(home, "runs", "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["RUN", "NAME", "METHOD"]
    for record in records:
        line = next(line for line in lines if line.startswith(record["id"]))
        assert f"lr {record['name'][3:]}" in line and "finished" in line and "4/4" in line
        assert f"{record['loss']:.4f}" in line and f"{record['best_eval_loss']:.4f}" in line
    listed = json.loads(qlw(home, "runs", "list", "--json").stdout)
    assert listed == json.loads(json.dumps(records))


def test_qlw_runs_diff_shows_only_learning_rate(ledger_home):
    home, ids, _ = ledger_home
    diff = L.Ledger(home).diff(ids)
    assert [row["setting"] for row in diff["rows"]] == ["training.learning_rate"]
    assert diff["rows"][0]["values"] == list(RATES)
    out = qlw(home, "runs", "diff", *ids)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ("| setting | lr 0.001 | lr 0.002 | lr 0.003 |\n"
                          "|---|---|---|---|\n"
                          "| training.learning_rate | 0.001 | 0.002 | 0.003 |\n")
    # Names and unique prefixes work as well as ids; a run named once is refused.
    assert qlw(home, "runs", "diff", "lr 0.001", ids[1][:-2]).stdout.count("\n") == 3
    bad = qlw(home, "runs", "diff", ids[0])
    assert bad.returncode == 2 and "2 to 6" in bad.stderr
    missing = qlw(home, "runs", "diff", ids[0], "nope")
    assert missing.returncode == 1 and "no run 'nope'" in missing.stderr


def test_qlw_runs_export_rows_equal_the_logged_rows(ledger_home):
    home, ids, runs = ledger_home
    out = qlw(home, "runs", "export", *ids)
    assert out.returncode == 0, out.stderr
    table = list(csv.DictReader(io.StringIO(out.stdout)))
    for sid, run in zip(ids, runs):
        logged: dict[int, dict] = {}
        for row in run.of("train.log"):  # a step's evaluation completes its training row
            logged[row["step"]] = row
        mine = [r for r in table if r["run"] == sid]
        assert [int(r["step"]) for r in mine] == sorted(logged) == [1, 2, 3, 4]
        for r in mine:
            want = logged[int(r["step"])]
            for name in L.ROW_FIELDS:
                got = r[name]
                assert (float(got) if got != "" else None) == want[name], (name, r["step"])
        assert all(r["name"] == f"lr {RATES[ids.index(sid)]:g}" for r in mine)
        assert all(float(r["tokens_seen"]) > 0 for r in mine)


def test_qlw_runs_show_has_config_rows_checkpoints_and_artifacts(ledger_home):
    home, ids, runs = ledger_home
    detail = L.Ledger(home).detail(ids[0])
    assert detail["config"]["training"]["learning_rate"] == RATES[0]
    assert [r["step"] for r in detail["rows"]] == [1, 2, 3, 4]
    assert [(c["step"], c["exists"]) for c in detail["checkpoints"]] == [(4, True)]
    assert [e["step"] for e in detail["evaluations"]] == [2, 4]
    assert {a["kind"] for a in detail["artifacts"]} >= {"config", "checkpoint", "adapter"}
    assert detail["errors"] == [] and detail["summary"]["status"] == "done"
    out = qlw(home, "runs", "show", "lr 0.001")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"run {ids[0]}: lr 0.001") and "learning_rate = 0.001" in out.stdout
    assert train.row_header("sft") in out.stdout and "checkpoint-4" in out.stdout
    curves = L.Ledger(home).curves(ids[:2])["curves"]
    assert [c["id"] for c in curves] == ids[:2]
    assert [s for s, _ in curves[0]["train"]] == [1, 2, 3, 4] and [s for s, _ in curves[0]["eval"]] == [2, 4]
    tokens = [t for t, _ in curves[0]["train_by_tokens"]]
    assert len(tokens) == 4 and tokens == sorted(tokens) and tokens[0] > 0


class StandIn:
    """What ledger.register needs of a BackendServer."""

    def __init__(self, home: Path):
        self.home = home
        self.store = Store(home / "sessions.db")
        self.handlers: dict = {}
        self.jobs = None
        self.current_session = None
        self.published: list = []

    def publish(self, session, kind, payload):
        self.published.append((session, kind, payload))

    def call(self, method: str, **params) -> P.Reply:
        typed = P.request_params(P.Request(id="1", method=method, params=params))
        return asyncio.run(self.handlers[method](None, typed))


def test_runs_requests_rename_and_delete_through_the_room(ledger_home, tiny_folder, tmp_path):
    home, ids, _ = ledger_home
    # A copy: deleting must not take the other tests' runs.
    copy = Path(str(home) + "-copy")
    shutil.copytree(home, copy)
    try:
        server = StandIn(copy)
        L.register(server)
        assert set(server.handlers) == {m for m in P.REQUESTS if m.startswith("runs.")}
        listed = server.call("runs.list")
        assert listed.status == "ok" and [r["id"] for r in listed.result["runs"]] == ids[::-1]
        # Paths in the copy's records still point into the original home; the copy's own run folders are what a
        # delete takes (a recorded path outside the data home is never touched: it is "kept").
        diff = server.call("runs.diff", runs=ids)
        assert [r["setting"] for r in diff.result["rows"]] == ["training.learning_rate"]
        assert server.call("runs.diff", runs=ids[:1]).status == "refused"

        renamed = server.call("runs.rename", run=ids[0], name="baseline")
        assert renamed.status == "ok" and renamed.result["run"]["name"] == "baseline"
        assert server.published[-1] == (ids[0], "session.renamed", {"session": ids[0], "name": "baseline"})
        assert server.call("runs.show", run="baseline").result["run"]["record"]["id"] == ids[0]

        folder = copy / "runs" / ids[0]
        asked = server.call("runs.delete", run="baseline")
        assert asked.status == "refused" and asked.code == P.CONFIRM
        assert asked.result["paths"] == [str(folder.resolve())] and asked.result["bytes"] > 0
        assert folder.is_dir()  # nothing happens before the confirmation
        done = server.call("runs.delete", run="baseline", confirm=True)
        assert done.status == "ok" and done.result["deleted"] == ids[0]
        assert not folder.exists() and (copy / "runs" / ids[1]).is_dir()
        assert server.published[-1][:2] == (None, "runs.deleted")
        assert [r["id"] for r in server.call("runs.list").result["runs"]] == ids[1:][::-1]
        assert server.store.get_session(ids[0]) is None and server.store.events(ids[0]) == []
        assert server.call("runs.show", run=ids[0]).status == "refused"

        csv_reply = server.call("runs.export", runs=[ids[1]])
        assert csv_reply.result["rows"] == 4 and csv_reply.result["csv"].startswith("run,name,step,")
        target = tmp_path / "rows.csv"
        assert server.call("runs.export", runs=[ids[1]], path=str(target)).result == {"path": str(target), "rows": 4}
        assert server.call("runs.export", runs=[ids[1]], path=str(target)).status == "refused"  # exists
        server.store.close()
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def test_merged_exported_and_uploaded_follow_the_adapter_path(tmp_path):
    """The flags come from merge/export/upload jobs that finished from a run's adapter or from a
    merged folder made from one, in whichever session they ran."""
    home = tmp_path
    store = Store(home / "sessions.db")
    run = store.create_session("r", {"method": "sft", "model": {"source": "m"}, "data": {"source": {"path": "d.jsonl"}}})
    store.append_event(run.id, "job.started", {"job_id": "t", "kind": "train.start", "params": {}})
    store.append_event(run.id, "job.finished", {"job_id": "t", "kind": "train.start", "status": "done",
                                                "elapsed_s": 3.0, "result": {}, "error": None})
    other = store.create_session("other")
    adapter = str(home / "runs" / run.id / "adapter")
    merged = str(home / "merged" / "m1")
    for job, kind, params, result in (
            ("a", "merge.start", {"adapter": adapter, "out": merged}, {"out": merged}),
            ("b", "export.start", {"model": merged}, {"path": str(home / "exports" / "m1.gguf")}),
            ("c", "hub.push", {"folder": merged, "repo_id": "me/m1", "dry_run": True}, {}),
    ):
        store.append_event(other.id, "job.started", {"job_id": job, "kind": kind, "params": params})
        store.append_event(other.id, "job.finished", {"job_id": job, "kind": kind, "status": "done", "elapsed_s": 1,
                                                      "result": result, "error": None})
    store.close()
    [record] = L.Ledger(home).runs()
    assert (record["merged"], record["exported"], record["uploaded"]) == (True, True, False)  # a dry run sends nothing
    assert (record["status"], record["duration_s"], record["dataset"]) == ("finished", 3.0, "d.jsonl")
    assert R.RUN_STATUSES.index(record["status"]) >= 0
