"""The watch on a run (backend/watch.py, backend/notify.py, issue 18): TensorBoard logs equal to
the logged rows, the stop on a NaN loss (checkpoint kept, error with where and what to do),
early stopping, and run notices to a webhook (a local HTTP stand-in) when a run finishes, fails
or stalls. Tiny model on the CPU, fixed seeds; waits use tests/waits.py."""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from backend import notify, train, train_config as TC, watch
from backend.jobs import JobError
from tests.backend.test_train import Run, make_home, small_config
from tests.waits import Budget

pytestmark = pytest.mark.slow


@pytest.fixture
def home(tiny_folder):
    h = make_home(tiny_folder)
    yield h
    shutil.rmtree(h, ignore_errors=True)


@pytest.fixture(autouse=True)
def _release_models():
    yield
    from backend import models

    models.release_base_model()


class Hook:
    """A webhook receiver on 127.0.0.1: keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                hook.bodies.append({"_content_type": self.headers.get("Content-Type"),
                                    **json.loads(self.rfile.read(length))})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/secret-token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, status: str, timeout: float = 60.0) -> dict:
        budget = Budget(timeout)
        while not budget.spent():
            found = [b for b in self.bodies if b["status"] == status]
            if found:
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no {status!r} notice arrived; got {[b['status'] for b in self.bodies]}")


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


def watched_run(home: Path, config: dict, **kw) -> tuple[Run, watch.Notices, dict | Exception]:
    """run_training inside the watch, as the train.start job and `qlw train` run it."""
    run = Run(home)
    result: dict | Exception
    try:
        with watch.Notices(run, config, environ={}) as watched:
            result = train.run_training(config, home, watched,
                                        record_artifact=lambda k, p: run.store.add_artifact(run.session, k, p),
                                        set_config=lambda cfg: run.store.set_config(run.session, cfg), **kw)
    except Exception as exc:  # noqa: BLE001 - the tests look at it
        result = exc
    return run, watched, result


def merged_rows(run: Run) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for row in run.of("train.log"):
        rows[row["step"]] = row
    return rows


def test_tensorboard_scalars_equal_the_logged_rows(home):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = small_config(max_steps=6, eval_steps=3)
    assert config["training"]["report_to"] == ["tensorboard"]  # the default
    run, _, result = watched_run(home, config)
    assert isinstance(result, dict) and result["status"] == "done", result
    folder = train.run_dir(home, run.session)
    logs = folder / "tensorboard"
    assert list(logs.glob("events.out.tfevents.*")), "no event file in the run folder"
    assert not list((folder / "checkpoints").rglob("events.out.tfevents.*"))  # not transformers' default place
    acc = EventAccumulator(str(logs), size_guidance={"scalars": 0})
    acc.Reload()
    rows = merged_rows(run)
    for tag, field in (("train/loss", "loss"), ("eval/loss", "eval_loss"), ("train/learning_rate", "learning_rate"),
                       ("train/grad_norm", "grad_norm")):
        scalars = {e.step: e.value for e in acc.Scalars(tag)}
        logged = {step: row[field] for step, row in rows.items() if row[field] is not None}
        assert sorted(scalars) == sorted(logged), tag
        for step, value in logged.items():
            assert scalars[step] == pytest.approx(value, rel=1e-6), (tag, step)  # TensorBoard keeps float32
    assert sorted(s for s, r in rows.items() if r["eval_loss"] is not None) == [3, 6]


def test_report_to_is_checked_and_a_missing_reporter_is_an_error_before_loading(home):
    _, errors = TC.normalise({"training": {"report_to": ["tensorboard", "neptune"]}})
    assert errors["training.report_to"].startswith("must be a list of tensorboard, wandb, mlflow")
    config, errors = TC.normalise({"training": {"report_to": "wandb, mlflow"}})
    assert errors == {} and config["training"]["report_to"] == ["wandb", "mlflow"]
    assert TC.normalise({"training": {"report_to": []}})[0]["training"]["report_to"] == []
    missing = next((n for n in ("wandb", "mlflow") if not watch._installed(n)), None)
    if missing is None:
        pytest.skip("wandb and mlflow are both installed here")
    run, _, result = watched_run(home, small_config(report_to=[missing]))
    assert isinstance(result, JobError) and result.where == "training.report_to" and f"pip install {missing}" in result.hint
    assert not run.of("model.loaded") and not run.of("train.started")


def test_a_nan_loss_stops_the_run_keeps_the_checkpoint_and_the_webhook_hears_failed(home, hook):
    config = small_config(max_steps=6, save_steps=2, notify_url=hook.url)
    config["data"]["split_mode"] = "none"
    run, watched, result = watched_run(home, config, fault=("nan", 4))
    folder = train.run_dir(home, run.session)
    checkpoint = folder / "checkpoints" / "checkpoint-2"
    assert isinstance(result, JobError), result
    assert str(result).startswith("the training loss is nan at step 4 of 6: the run stopped before that step's update")
    assert f"the last checkpoint, {checkpoint}, is kept" in str(result)
    assert result.where == "step 4"
    assert result.hint.startswith(f"resume from {checkpoint} with a lower training.learning_rate (now 0.002)")
    # Stopped before step 4's update: rows 1-3, checkpoint-2 kept with finite weights, no NaN adapter written.
    assert sorted(merged_rows(run)) == [1, 2, 3]
    assert sorted(p.name for p in (folder / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert weights and all(bool(t.isfinite().all()) for t in weights.values())
    assert not (folder / "adapter").exists()
    assert [(a["kind"], a["step"]) for a in run.of("train.alert")] == [("nan", 4)]
    finished = run.of("train.finished")[0]
    assert (finished["status"], finished["step"], finished["adapter_path"]) == ("failed", 3, "")
    body = hook.wait_for("failed")
    assert body["_content_type"] == "application/json"
    assert body["text"] == body["content"] == body["message"]
    assert body["text"].startswith("qlw: run \u201ctest run\u201d failed at step 3/6 (loss ")
    assert "nan at step 4" in body["text"]
    assert (body["run"], body["session"], body["step"], body["total_steps"]) == ("test run", run.session, 3, 6)
    assert body["error"]["where"] == "step 4" and "resume from" in body["error"]["hint"]
    assert math.isfinite(body["loss"])
    notice = run.of("run.notice")[-1]
    assert (notice["status"], notice["delivered"]) == ("failed", True)


def test_an_exploding_loss_stops_the_run_too():
    """The rule itself, without a run: the first step's loss is the reference."""
    events = []

    class Ctx:
        job_id = "j"

        def emit(self, kind, payload):
            events.append((kind, payload))

    eff = TC.checked(small_config(divergence_factor=3.0))
    guard = watch.Guard(eff, Ctx(), Path("/nonexistent"))
    guard.on_loss(1, 2.0)
    guard.check_step(1, 10)
    for step, loss in ((2, 5.9), (3, 1.0)):
        guard.on_loss(step, loss)
        guard.check_step(step, 10)
    guard.on_loss(4, 6.5)
    with pytest.raises(JobError) as err:
        guard.check_step(4, 10)
    assert "exploded at step 4 of 10: 6.5, more than 3 times the first step's 2" in str(err.value)
    assert "no checkpoint had been saved yet" in str(err.value)
    assert events[-1][0] == "train.alert" and events[-1][1]["kind"] == "exploding"
    eff["training"]["stop_on_divergence"] = False
    off = watch.Guard(eff, Ctx(), Path("/nonexistent"))
    for step, loss in ((1, 2.0), (2, float("nan")), (3, 100.0)):
        off.on_loss(step, loss)
        off.check_step(step, 10)  # flagged elsewhere (train.alert), never stopped


def test_early_stopping_ends_the_run_on_a_stalled_validation_loss(home, hook):
    """patience 1 and a threshold no improvement can pass: the second evaluation stops the run."""
    config = small_config(max_steps=12, eval_steps=2, early_stopping_patience=1, early_stopping_threshold=10.0,
                          notify_url=hook.url)
    run, _, result = watched_run(home, config)
    assert isinstance(result, dict) and result["status"] == "done", result
    assert result["step"] == 4 and result["total_steps"] == 12 and result["adapter_path"]
    assert any(p["message"].startswith("early stopping at step 4: eval_loss has not improved for 1 evaluation")
               for p in run.of("log"))
    body = hook.wait_for("finished")
    assert body["text"].startswith("qlw: run \u201ctest run\u201d finished at step 4/12 (loss ")
    assert "early stopping at step 4" in body["text"] and body["error"] is None
    assert body["eval_loss"] == merged_rows(run)[4]["eval_loss"]
    assert body["best_eval_loss"] == min(merged_rows(run)[s]["eval_loss"] for s in (2, 4))


def test_a_stall_is_noticed_while_the_run_waits(home, hook):
    """stall_minutes made tiny (0.15 s) and a callback that holds step 3 for a second: the stall
    thread tells the webhook while the training thread waits; the run still finishes."""
    from transformers import TrainerCallback

    class Hold(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                budget = Budget(30.0)
                while not any(b["status"] == "stalled" for b in hook.bodies) and not budget.spent():
                    time.sleep(0.02)

    config = small_config(max_steps=4, stall_minutes=0.0025, notify_url=hook.url)
    run, _, result = watched_run(home, config, callbacks=[Hold()])
    assert isinstance(result, dict) and result["status"] == "done", result
    body = hook.wait_for("stalled")
    assert body["text"].startswith("qlw: run \u201ctest run\u201d has made no step for ")
    assert body["idle_s"] >= 0.15 and body["error"]["message"].startswith("no step for")
    assert hook.wait_for("finished")["step"] == 4
    assert [n["status"] for n in run.of("run.notice")][-1] == "finished"


def test_the_stall_watch_with_an_injected_clock():
    now = [100.0]
    seen = []
    w = watch.StallWatch(60.0, lambda idle, step: seen.append((idle, step)), clock=lambda: now[0])
    assert not w.check()  # not started: no step yet
    w.beat(3)
    now[0] += 59.9
    assert not w.check()
    now[0] += 0.2
    assert w.check() and seen == [(pytest.approx(60.1), 3)]
    now[0] += 600
    assert not w.check()  # once per stall
    w.beat(4)
    now[0] += 61
    assert w.check() and seen[-1][1] == 4


def test_notices_without_a_run_and_delivery_failures(hook):
    """The notice's body and what happens when the webhook cannot be reached."""
    events = []

    class Ctx:
        session = "s1"
        job_id = "j"

        def emit(self, kind, payload):
            events.append((kind, payload))

        def progress(self, *a, **k):
            pass

    now = [0.0]
    notices = watch.Notices(Ctx(), {"name": "nightly", "training": {"stall_minutes": 1.0}},
                            environ={notify.ENV: hook.url}, clock=lambda: now[0], poll=3600)
    with notices as ctx:
        ctx.emit("train.started", {"total_steps": 10, "start_step": 0})
        ctx.emit("train.log", {"step": 2, "loss": 1.5, "eval_loss": float("nan")})
        now[0] = 61.0
        assert notices._stall.check()
        ctx.emit("train.finished", {"status": "done", "step": 10})
    stalled, finished = hook.wait_for("stalled"), hook.wait_for("finished")
    assert stalled["text"] == "qlw: run \u201cnightly\u201d has made no step for 1.0 min, at step 2/10 (loss 1.5000, val loss nan)"
    assert stalled["eval_loss"] is None  # NaN goes as null: strict JSON
    assert finished["status"] == "finished" and finished["step"] == 10
    assert [p["status"] for k, p in events if k == "run.notice"] == ["stalled", "finished"]

    # A webhook that cannot be reached: a warning and delivered false; the URL's secret path is never shown.
    events.clear()
    dead = watch.Notices(Ctx(), {"name": "x", "training": {"notify_url": "http://127.0.0.1:9/hooks/secret"}}, environ={})
    with pytest.raises(RuntimeError):
        with dead:
            raise RuntimeError("boom")
    notice = [p for k, p in events if k == "run.notice"][0]
    assert notice["status"] == "failed" and notice["message"] == "boom" and not notice["delivered"]
    warning = [p["message"] for k, p in events if k == "log"][0]
    assert "127.0.0.1:9" in warning and "secret" not in warning
