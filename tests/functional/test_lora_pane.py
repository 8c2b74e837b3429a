"""The LoRA tab: the run config the form builds (with the Model and Data tabs' sections), checks
as typed and by the backend at the fields, presets, TOML export/import, Start and resume.

The tab runs in the shell, beside the Model, Data and Train tabs it reads and feeds. The backend's
answers come from a fake standing in for ``BackendRequests.call`` (the pane's one door to the
backend), so these tests hold the pane to the protocol, whatever the backend's progress; the last
test runs against a real backend. Waits poll a condition with a timeout, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path
from typing import Any, Callable

from textual.notifications import Notify
from textual.widgets import Button, Input, Select, SelectionList, TabbedContent

from backend import protocol as P
from tests.functional.helpers import make_app, until, without_backend
from tui.client import CONNECTED
from tui.messages import BackendEvent, ConnectionChanged
from tui.modals.confirm_screen import ConfirmScreen
from tui.widgets.data.data_pane import DataPane, sample_dataset_path
from tui.widgets.lora.lora_pane import LoraPane, expand_path
from tui.widgets.lora.run_config import FIELDS, cross_errors, flatten, parse, FIELD_BY_PATH
from tui.widgets.lora.validation_line import ValidationLine
from tui.widgets.model.model_pane import ModelPane
from tui.widgets.shell.job_indicator import JobIndicator
from tui.widgets.train.train_pane import TrainPane

SIZE = (100, 30)
TINY = "/models/tiny-llama"

#: A ``data.open`` summary of the shipped sample (as the backend gives it, examples cut).
SUMMARY = {
    "source": {"path": sample_dataset_path(), "config": "", "split": "train"}, "kind": "file",
    "splits": {"train": 585}, "split": "train", "num_rows": 585,
    "columns": [{"name": n, "type": "string", "nulls": 0, "examples": ["x"]}
                for n in ("instruction", "context", "response", "category")],
    "shape": "dolly", "shape_label": "instruction/context/response (databricks-dolly)",
    "mapping": {"instruction": "instruction", "context": "context", "response": "response", "system": "",
                "messages": "", "text": ""},
    "notes": [],
}
LINEAR_GROUPS = [
    {"name": n, "count": 2, "shapes": [[128, 128]], "quantized": True, "in_all_linear": True}
    for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
] + [{"name": "lm_head", "count": 1, "shapes": [[512, 128]], "quantized": False, "in_all_linear": False}]
PRESETS = {
    "presets": {
        "qlora-paper": {"lora": {"r": 16, "lora_alpha": 16, "lora_dropout": 0.05},
                        "training": {"learning_rate": 2e-4, "optim": "paged_adamw_8bit", "max_grad_norm": 0.3,
                                     "lr_scheduler_type": "constant", "warmup_ratio": 0.03},
                        "model": {"precision": "4bit", "quant_type": "nf4", "double_quant": True,
                                  "compute_dtype": "bf16"}},
        "small-gpu": {"lora": {"r": 8, "lora_alpha": 16},
                      "training": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 16,
                                   "gradient_checkpointing": True, "optim": "paged_adamw_8bit"},
                      "data": {"max_length": 512},
                      "model": {"precision": "4bit", "quant_type": "nf4", "double_quant": True,
                                "compute_dtype": "fp16"}},
    },
    "defaults": {"lora": P.to_dict(P.LoraSettings()), "training": P.to_dict(P.TrainingSettings())},
}
#: A ``train.validate`` answer for a valid config.
VALID = {"ok": True, "errors": {}, "warnings": {}, "trainable_params": 1_179_648, "total_params": 1_868_416,
         "trainable_percent": 63.1359, "total_steps": 37,
         "memory": {"total_bytes": 9_876_543_210, "free_bytes": 80_000_000_000, "verdict": "fits",
                    "device": "cuda:0", "parts": {}}}


# Helpers ------------------------------------------------------------------------------------


class FakeBackend:
    """Answers the pane's requests by method; records them."""

    def __init__(self, **answers: Callable[[Any], dict] | dict):
        self.sent: list[Any] = []
        self.answers: dict[str, Any] = {
            "train.presets": PRESETS, "status": {"job": None}, "model.inspect": {"loaded": False},
            "train.checkpoints": {"checkpoints": []}, "train.validate": VALID,
            **{k.replace("_", "."): v for k, v in answers.items()},
        }

    async def call(self, params: Any, timeout: float | None = 30.0) -> dict:
        self.sent.append(params)
        answer = self.answers.get(params.METHOD, {})
        return copy.deepcopy(answer(params) if callable(answer) else answer)

    def of(self, method: str) -> list[Any]:
        return [p for p in self.sent if p.METHOD == method]


async def open_lora(pilot, fake: FakeBackend | None = None) -> LoraPane:
    """No backend runs; with ``fake``, the pane talks to it as if connected."""
    app = pilot.app
    await without_backend(pilot)
    app.screen.query_one(TabbedContent).active = "lora"
    pane = app.screen.query_one(LoraPane)
    pane.query_one("#lora-path", Input).focus()  # the pane's keys work from inside it
    if fake is not None:
        pane.call = fake.call
        pane.on_connection(ConnectionChanged(CONNECTED))
        await until(pilot, lambda: bool(pane.presets), "the presets")
    await pilot.pause()
    return pane


def set_field(pane: LoraPane, path: str, value: Any) -> None:
    pane.form.row(path).control.value = value


def error_at(pane: LoraPane, path: str) -> str:
    return pane.form.row(path).error


def start_enabled(pane: LoraPane) -> bool:
    return not pane.query_one("#lora-start", Button).disabled


def line_text(pane: LoraPane) -> str:
    return str(pane.query_one(ValidationLine).render())


async def with_sections(pilot, max_length: int | None = None) -> None:
    """A model in the Model tab and the sample dataset open in the Data tab."""
    screen = pilot.app.screen
    screen.query_one(ModelPane).form.set_source(TINY)
    data = screen.query_one(DataPane)
    data.show_summary(SUMMARY)  # its page and preview requests fail (no backend): not ours
    if max_length is not None:
        data.query_one("#data-max-length", Input).value = str(max_length)
    await pilot.pause()
    pilot.app.clear_notifications()


# Tests --------------------------------------------------------------------------------------


def test_the_form_builds_the_run_config(qlw_home):
    """Defaults are the protocol's; the model comes from the Model tab, the dataset from the Data
    tab with the form's max_length and loss; target_modules from the inspector's groups."""

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=SIZE) as pilot:
            await with_sections(pilot, max_length=2048)
            pane = await open_lora(pilot)
            data_settings = app.screen.query_one(DataPane).settings
            assert data_settings["max_length"] == 2048
            expected = {
                "version": P.RUN_CONFIG_VERSION, "name": "", "method": "sft",
                "model": P.to_dict(P.ModelSettings(source=TINY)),
                "data": data_settings,
                "lora": P.to_dict(P.LoraSettings()),
                "training": P.to_dict(P.TrainingSettings()),
                **{m: P.to_dict(cls()) for m, cls in P.METHOD_SETTINGS.items()},
            }
            assert pane.config() == expected
            assert pane.local_errors() == {}
            assert "tiny-llama · 4-bit nf4, compute bf16, double quant · auto  (Model tab)" in str(
                pane.query_one("#run-model-line").render())
            assert "dolly_sample.jsonl · template chat · validation 0.1 of the rows  (Data tab)" in str(
                pane.query_one("#run-data-line").render())

            # The loaded model's linear groups are target_modules' choices.
            app.post_message(BackendEvent(P.Event("model.loaded", {
                "settings": P.to_dict(P.ModelSettings(source=TINY)), "source": TINY, "source_path": TINY,
                "device": "cpu", "estimate": {}, "measured": {}, "inspect": {"loaded": True,
                                                                            "linear_groups": LINEAR_GROUPS}},
                time.time(), session="s", seq=1)))
            picker = pane.form.picker
            await until(pilot, lambda: len(picker.groups) == 8, "the linear groups")
            await pilot.click("#target-all-linear")
            await until(pilot, lambda: picker.query_one(SelectionList).display, "the module list")
            assert picker.value == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            selection = picker.query_one(SelectionList)
            for name in ("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                selection.deselect(name)

            # Typed like a user: r, then other settings as their controls hold them.
            pane.form.row("lora.r").control.focus()
            await pilot.press("end", "backspace", "backspace", "3", "2")
            set_field(pane, "lora.modules_to_save", "lm_head, embed_tokens")
            set_field(pane, "lora.use_dora", True)
            set_field(pane, "training.max_steps", "10")
            set_field(pane, "training.learning_rate", "1e-4")
            set_field(pane, "training.lr_scheduler_type", "cosine")
            set_field(pane, "training.bf16", "true")
            set_field(pane, "training.fp16", "false")
            set_field(pane, "training.packing", True)
            set_field(pane, "data.max_length", "512")
            set_field(pane, "data.loss", "completion_only")
            pane.form.query_one("#run-name", Input).value = "tiny sft"
            await pilot.pause()
            expected["name"] = "tiny sft"
            expected["lora"].update(r=32, target_modules=["q_proj", "v_proj"], use_dora=True,
                                    modules_to_save=["lm_head", "embed_tokens"])
            expected["training"].update(max_steps=10, learning_rate=1e-4, lr_scheduler_type="cosine", bf16=True,
                                        fp16=False, packing=True)
            expected["data"] = {**data_settings, "max_length": 512, "loss": "completion_only"}
            config = pane.config()
            assert config["lora"] == expected["lora"]
            assert config == expected
            # Every section is what the protocol's dataclasses accept, names and types.
            run = P.build(P.RunConfig, config, "run config")
            P.build(P.ModelSettings, run.model, "model")
            P.build(P.PreparedData, run.data, "data")
            P.build(P.LoraSettings, run.lora, "lora")
            P.build(P.TrainingSettings, run.training, "training")

            # The Data tab changes max_length: the form takes it when shown again.
            app.screen.query_one(TabbedContent).active = "data"
            data = app.screen.query_one(DataPane)
            data.query_one("#data-max-length", Input).value = "4096"
            await pilot.pause()
            app.screen.query_one(TabbedContent).active = "lora"
            await until(pilot, lambda: pane.config()["data"]["max_length"] == 4096, "the Data tab's max_length")
            assert pane.form.row("data.max_length").raw == "4096"

    asyncio.run(body())


def test_checks_as_typed_and_by_the_backend_disable_start(qlw_home):
    def validate(params: P.ValidateRun) -> dict:
        if params.config["lora"]["lora_alpha"] > 1024:
            return {**VALID, "ok": False, "errors": {"lora.lora_alpha": "lora_alpha=2048 with r=16 scales the "
                                                                        "update by 128: use at most 4×r"}}
        return VALID

    fake = FakeBackend(train_validate=validate, train_checkpoints={"checkpoints": [
        {"session": "20240101-abcdef", "step": 30, "path": "/data/qlw/runs/s0/checkpoint-30",
         "created": 1.0, "loss": 1.2345}]}, train_start={"job_id": "job-1"})

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=(80, 24)) as pilot:
            await with_sections(pilot)
            pane = await open_lora(pilot, fake)
            await until(pilot, lambda: start_enabled(pane), "Start enabled by a clean check")
            assert line_text(pane) == (
                "trainable params: 1,179,648 || all params: 1,868,416 || trainable%: 63.1359\n"
                "memory ~9.20 GiB of 74.5 GiB free on cuda:0 → ✔ fits · 37 steps")
            assert fake.of("train.validate")[-1].config == pane.config()

            # Out of range: the message at the field, at once; Start off.
            set_field(pane, "lora.r", "0")
            await pilot.pause()
            assert error_at(pane, "lora.r") == "out of range: a whole number of at least 1"
            assert not start_enabled(pane)
            assert line_text(pane).startswith("✖ 1 setting needs attention: lora.r")
            assert pane.form.row("lora.r").query_one(".setting-error").display
            assert pane.form.row("lora.r").has_class("-invalid")
            set_field(pane, "training.learning_rate", "")
            set_field(pane, "lora.lora_dropout", "1")
            set_field(pane, "training.bf16", "true")
            set_field(pane, "training.fp16", "true")
            await pilot.pause()
            assert error_at(pane, "training.learning_rate") == "required: a number above 0 and below 1"
            assert error_at(pane, "lora.lora_dropout") == "out of range: a number from 0 to below 1"
            assert error_at(pane, "training.fp16") == "bf16 and fp16 cannot both be on: choose one (or auto)"
            assert line_text(pane).startswith("✖ 4 settings need attention: lora.lora_dropout, lora.r, "
                                              "training.fp16 and 1 more")
            # f5 with errors goes to the first one instead of starting.
            await pilot.press("f5")
            assert pane.form.row("lora.r").control.has_focus
            assert not fake.of("train.start")

            for path, value in (("lora.r", "16"), ("training.learning_rate", "2e-4"), ("lora.lora_dropout", "0.05"),
                                ("training.fp16", "auto")):
                set_field(pane, path, value)
            await until(pilot, lambda: start_enabled(pane), "Start enabled again")
            assert all(not pane.form.row(f.path).error for f in FIELDS)

            # Cleared and typed again to the value the backend checked: the summary goes with the
            # error (issue 15: "1 setting needs attention: lora.r" stayed beside an enabled Start).
            set_field(pane, "lora.r", "")
            await pilot.pause()
            assert line_text(pane).startswith("✖ 1 setting needs attention: lora.r")
            set_field(pane, "lora.r", "16")
            await until(pilot, lambda: start_enabled(pane), "Start enabled with r retyped")
            await pilot.pause()
            assert "needs attention" not in line_text(pane)
            assert line_text(pane).startswith("trainable params: 1,179,648")


            # The backend's error, at its field by dotted path.
            set_field(pane, "lora.lora_alpha", "2048")
            await until(pilot, lambda: error_at(pane, "lora.lora_alpha"), "the backend's error")
            assert error_at(pane, "lora.lora_alpha").startswith("lora_alpha=2048 with r=16")
            assert not start_enabled(pane)
            assert "trainable params: 1,179,648" in line_text(pane)  # the count stays in view
            set_field(pane, "lora.lora_alpha", "32")
            await until(pilot, lambda: start_enabled(pane), "Start enabled after the fix")

            # A job runs: Start waits for it.
            app.post_message(BackendEvent(P.Event("job.started", {"job_id": "other", "kind": "model.load"},
                                                  time.time(), "s", 1)))
            await until(pilot, lambda: not start_enabled(pane), "Start off while a job runs")
            assert "a model.load job runs" in str(pane.query_one("#lora-status").render())
            app.post_message(BackendEvent(P.Event("job.finished", {"job_id": "other", "kind": "model.load",
                                                                   "status": "done", "elapsed_s": 1.0},
                                                  time.time(), "s", 2)))
            await until(pilot, lambda: start_enabled(pane), "Start back")

            # Resume from a checkpoint, then Start: the exact config and the checkpoint go out.
            resume = pane.query_one("#lora-resume", Select)
            await until(pilot, lambda: pane.checkpoints, "the checkpoints")
            resume.value = "/data/qlw/runs/s0/checkpoint-30"
            await pilot.press("f5")
            await until(pilot, lambda: fake.of("train.start"), "train.start")
            start = fake.of("train.start")[0]
            assert start == P.StartTraining(config=pane.config(), resume_from="/data/qlw/runs/s0/checkpoint-30")
            await until(pilot, lambda: app.screen.query_one(TabbedContent).active == "train", "the Train tab")

    asyncio.run(body())


def test_a_result_being_checked_again_says_so_in_words(qlw_home):
    """While the backend checks changed settings, the last result stays in view marked ⧗ (its dim
    colour alone is lost on a terminal without colours), until the new answer replaces it."""
    gate = asyncio.Event()

    class SlowValidate(FakeBackend):
        async def call(self, params, timeout=30.0):
            answer = await super().call(params, timeout)
            if params.METHOD == "train.validate" and len(self.of("train.validate")) > 1:
                await gate.wait()  # the second check is slow to answer
            return answer

    fake = SlowValidate()

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=(80, 24)) as pilot:
            await with_sections(pilot)
            pane = await open_lora(pilot, fake)
            await until(pilot, lambda: start_enabled(pane), "Start enabled by a clean check")
            checked = "memory ~9.20 GiB of 74.5 GiB free on cuda:0 → ✔ fits · 37 steps"
            assert line_text(pane).endswith("\n" + checked)
            set_field(pane, "lora.r", "8")
            await until(pilot, lambda: len(fake.of("train.validate")) == 2, "the second check asked for")
            assert line_text(pane).endswith("\n⧗ " + checked) and not start_enabled(pane)
            gate.set()
            await until(pilot, lambda: start_enabled(pane), "the second check's answer")
            assert line_text(pane).endswith("\n" + checked)

    asyncio.run(body())


def test_presets(qlw_home):
    fake = FakeBackend()

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=SIZE) as pilot:
            await with_sections(pilot)
            pane = await open_lora(pilot, fake)
            set_field(pane, "training.num_train_epochs", "3")  # a preset starts from the defaults
            set_field(pane, "lora.r", "64")
            pane.form.row("lora.r").control.focus()
            await pilot.press("f3")  # small-gpu
            await until(pilot, lambda: pane.config()["lora"]["r"] == 8, "the small-gpu preset")
            config = pane.config()
            assert config["lora"] == {**P.to_dict(P.LoraSettings()), "r": 8, "lora_alpha": 16}
            assert config["training"] == {**P.to_dict(P.TrainingSettings()), "per_device_train_batch_size": 1,
                                          "gradient_accumulation_steps": 16}
            assert config["data"]["max_length"] == 512
            assert config["model"]["compute_dtype"] == "fp16"  # its precision, over the Model tab's
            assert "precision from small-gpu" in str(pane.query_one("#run-model-line").render())

            await pilot.click("#preset-qlora-paper")
            await until(pilot, lambda: pane.config()["lora"]["r"] == 16, "the qlora-paper preset")
            config = pane.config()
            assert config["lora"] == P.to_dict(P.LoraSettings())
            assert config["training"] == P.to_dict(P.TrainingSettings())
            assert {k: config["model"][k] for k in ("precision", "quant_type", "double_quant", "compute_dtype")} == {
                "precision": "4bit", "quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16"}

            # The Model tab's precision changes afterwards: the Model tab wins.
            app.screen.query_one(ModelPane).form.query_one("#model-precision", Select).value = "bf16"
            await pilot.pause()
            pane.sync_sections()
            assert pane.config()["model"]["precision"] == "bf16"
            assert "precision from" not in str(pane.query_one("#run-model-line").render())

            titles = {c.title for c in app.get_system_commands(app.screen)}
            assert {"QLoRA preset", "Small-GPU preset", "Start", "Export", "Import"} <= titles

    asyncio.run(body())


def test_export_asks_before_overwriting_and_import_fills_the_form(qlw_home, tmp_path):
    imported = {
        "version": 1, "name": "from file",
        "model": P.to_dict(P.ModelSettings(source="/models/other", precision="8bit")),
        "data": P.to_dict(P.PreparedData(source={"path": "/data/rows.jsonl"}, template="alpaca", max_length=256)),
        "lora": {**P.to_dict(P.LoraSettings()), "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "training": {**P.to_dict(P.TrainingSettings()), "max_steps": 5, "optim": "adamw_torch"},
        "launch": {"processes": 2, "strategy": "ddp"},  # issue 19: no fields yet, carried as imported
    }
    fake = FakeBackend(train_export=lambda p: {"path": p.path},
                       train_import={"config": imported, "errors": {"lora.r": "line 9: r=4 is below 8? (a test)"}})

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=SIZE) as pilot:
            await with_sections(pilot)
            pane = await open_lora(pilot, fake)
            existing = tmp_path / "run.toml"
            existing.write_text("# mine\n")
            pane.query_one("#lora-path", Input).value = str(existing)
            pane.query_one("#lora-path", Input).focus()
            await pilot.press("ctrl+s")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the overwrite question")
            await pilot.press("n")
            await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), "the answer")
            await pilot.pause(0.1)
            assert not fake.of("train.export")
            await pilot.press("ctrl+s")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the question again")
            await pilot.press("y")
            await until(pilot, lambda: fake.of("train.export"), "train.export")
            export = fake.of("train.export")[0]
            assert export == P.ExportRunConfig(config=pane.config(), path=str(existing), overwrite=True)

            # A new file needs no question; a relative path is this terminal's.
            pane.query_one("#lora-path", Input).value = "new-run.toml"
            await pilot.press("ctrl+s")
            await until(pilot, lambda: len(fake.of("train.export")) == 2, "the second export")
            assert fake.of("train.export")[1].path == expand_path("new-run.toml") and \
                not fake.of("train.export")[1].overwrite

            await pilot.press("ctrl+o")
            await until(pilot, lambda: pane.config()["name"] == "from file", "the imported config")
            config = pane.config()
            assert config["lora"] == imported["lora"] and config["training"] == imported["training"]
            assert config["model"] == imported["model"] and config["data"] == imported["data"]
            assert config["launch"] == imported["launch"]
            assert "(from new-run.toml)" in str(pane.query_one("#run-model-line").render())
            assert pane.form.picker.value == ["q_proj", "v_proj"]
            assert error_at(pane, "lora.r") == "line 9: r=4 is below 8? (a test)"
            await until(pilot, lambda: pane.validated == pane.config(), "the check of the imported config")
            assert not start_enabled(pane)  # the file's message at a field keeps Start off
            set_field(pane, "lora.r", "8")
            await until(pilot, lambda: start_enabled(pane), "Start once corrected")
            assert error_at(pane, "lora.r") == ""

    asyncio.run(body())


def test_the_method_and_its_settings(qlw_home):
    """The method Select shows that method's own settings only (and hides SFT's packing and loss
    mask for a preference method); the run config carries the method and its section; an error
    from the backend shows at the method's field; an imported KTO config shows KTO's fields."""

    def validate(params: P.ValidateRun) -> dict:
        if params.config["method"] == "dpo" and params.config["dpo"]["start_adapter"].startswith("/missing"):
            return {**VALID, "ok": False, "errors": {"dpo.start_adapter": "/missing holds no LoRA adapter"}}
        return VALID

    # As merge.adapters sends them: run_config is the run's config.toml path, method its method.
    adapters = [{"path": "/data/qlw/runs/s2/adapter", "kind": "adapter", "method": "dpo",
                 "run_config": "/data/qlw/runs/s2/config.toml"},
                {"path": "/data/qlw/runs/s1/adapter", "kind": "adapter", "method": "sft",
                 "run_config": "/data/qlw/runs/s1/config.toml"},
                {"path": "/data/qlw/runs/s1/checkpoints/checkpoint-3", "kind": "checkpoint", "method": "sft",
                 "run_config": "/data/qlw/runs/s1/config.toml"}]
    fake = FakeBackend(train_validate=validate, merge_adapters={"adapters": adapters})

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=SIZE) as pilot:
            await with_sections(pilot)
            pane = await open_lora(pilot, fake)
            form = pane.form
            # Finished runs' adapters are offered as the start, the SFT run's first.
            await until(pilot, lambda: form.adapters == ["/data/qlw/runs/s1/adapter", "/data/qlw/runs/s2/adapter"],
                        "the adapters offered")
            start = form.row("dpo.start_adapter").control
            assert "/data/qlw/runs/s1/adapter" in start.placeholder and start.suggester is not None
            shown = lambda: {f.path for f in FIELDS if form.row(f.path).display}  # noqa: E731
            assert pane.config()["method"] == "sft" and "training.packing" in shown()
            assert not {p for p in shown() if p.split(".")[0] in P.METHOD_SETTINGS}

            set_field(pane, "method", "dpo")
            await until(pilot, lambda: "dpo.beta" in shown(), "DPO's settings")
            assert {p for p in shown() if p.split(".")[0] in P.METHOD_SETTINGS} == {
                "dpo.beta", "dpo.loss_type", "dpo.label_smoothing", "dpo.malformed", "dpo.start_adapter"}
            assert "training.packing" not in shown() and "data.loss" not in shown()
            set_field(pane, "dpo.beta", "0.05")
            set_field(pane, "dpo.loss_type", "ipo")
            set_field(pane, "dpo.start_adapter", "/missing/adapter")
            await pilot.pause()
            config = pane.config()
            assert config["method"] == "dpo" and config["dpo"] == {
                "beta": 0.05, "start_adapter": "/missing/adapter", "malformed": "skip", "loss_type": "ipo",
                "label_smoothing": 0.0}
            P.build(P.DPOSettings, config["dpo"], "dpo")
            await until(pilot, lambda: error_at(pane, "dpo.start_adapter") == "/missing holds no LoRA adapter",
                        "the backend's error at the field")
            assert not start_enabled(pane)
            # A local range error of a hidden method's field does not block this one.
            set_field(pane, "dpo.beta", "0")
            await pilot.pause()
            assert error_at(pane, "dpo.beta") == "out of range: a number above 0"

            imported = copy.deepcopy(config)
            imported.update(method="kto")
            imported["kto"].update(desirable_weight=1.33)
            form.set_values(flatten(imported))
            await until(pilot, lambda: "kto.desirable_weight" in shown(), "KTO's settings")
            assert "dpo.beta" not in shown() and pane.config()["kto"]["desirable_weight"] == 1.33
            assert "dpo.beta" not in form.local_errors()  # DPO's typed beta is not KTO's concern

    asyncio.run(body())


def test_a_setting_that_would_hide_the_loss_table_is_said_at_its_field(qlw_home):
    """The backend's warning for logging_steps (issue 15: 2 steps with logging_steps 10 gave
    a one-row table) shows at the field, beside an enabled Start, and goes with the change."""

    def validate(params: P.ValidateRun) -> dict:
        if params.config["training"]["logging_steps"] == 50:
            return {**VALID, "warnings": {"training.logging_steps": "logging_steps 50 with 37 step(s): the loss "
                                                                    "table gets only the last step and no curve"}}
        return VALID

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=SIZE) as pilot:
            await with_sections(pilot)
            pane = await open_lora(pilot, FakeBackend(train_validate=validate))
            await until(pilot, lambda: start_enabled(pane), "Start enabled by a clean check")
            row = pane.form.row("training.logging_steps")
            assert row.raw == "0.01" and not row.query_one(".setting-error").display
            set_field(pane, "training.logging_steps", "50")
            await until(pilot, lambda: row.warning, "the warning at logging_steps")
            await pilot.pause()
            assert "⚠ logging_steps 50 with 37 step(s)" in str(row.query_one(".setting-error").render())
            assert row.query_one(".setting-error").display and row.has_class("-warning")
            assert start_enabled(pane)  # a warning, not an error
            set_field(pane, "training.logging_steps", "0.05")
            await until(pilot, lambda: not row.warning and start_enabled(pane), "the warning gone")
            assert pane.config()["training"]["logging_steps"] == 0.05

    asyncio.run(body())


def test_f5_in_the_train_tab_starts_the_run_set_up_in_the_lora_tab(qlw_home):
    """Issue 15: the Train tab says "press Start (f5)", and f5 there did nothing."""
    fake = FakeBackend(train_start={"job_id": "job-1"})

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=SIZE) as pilot:
            await with_sections(pilot)
            pane = await open_lora(pilot, fake)
            await until(pilot, lambda: start_enabled(pane), "Start enabled by a clean check")
            await pilot.press("escape", "5")
            await until(pilot, lambda: app.screen.query_one(TabbedContent).active == "train", "the Train tab")
            assert "press Start (f5)" in str(app.screen.query_one("#train-live").render())
            await pilot.press("f5")
            await until(pilot, lambda: fake.of("train.start"), "train.start from the Train tab")
            assert fake.of("train.start")[0].config == pane.config()

    asyncio.run(body())


def test_the_resume_list_names_runs_on_one_line_each(qlw_home):
    """Issue 15: the resume dropdown was garbled (labels wrapped over the form) and said
    ``resume 20261207 step 4`` for every run of a day."""
    import html
    import re

    now = time.time()
    checkpoints = [{"session": f"20261207-1{i}0000-abc12{i}", "name": f"tui-run{i}", "step": 4 * i,
                    "path": f"/data/qlw/runs/s{i}/checkpoints/checkpoint-{4 * i}", "created": now - 600 * i,
                    "loss": 4.1 + i / 10} for i in (1, 2, 3)]

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=(80, 24)) as pilot:
            await with_sections(pilot)
            pane = await open_lora(pilot, FakeBackend(train_checkpoints={"checkpoints": checkpoints}))
            await until(pilot, lambda: len(pane.checkpoints) == 3, "the checkpoints")
            select = pane.query_one("#lora-resume", Select)
            select.focus()
            await pilot.press("enter")
            await until(pilot, lambda: select.expanded, "the list open")
            await pilot.pause()
            svg = app.export_screenshot()
            lines: dict[float, str] = {}
            for m in re.finditer(r'<text[^>]*y="([\d.]+)"[^>]*>(.*?)</text>', svg):
                lines[float(m.group(1))] = lines.get(float(m.group(1)), "") + html.unescape(m.group(2)).replace("\xa0", " ")
            screen = "\n".join(lines[k] for k in sorted(lines))
            for i in (1, 2, 3):
                assert f"resume tui-run{i} · step {4 * i} · loss {4.1 + i / 10:.4f}" in screen, screen

    asyncio.run(body())


def test_field_checks():
    every = FIELD_BY_PATH["training.logging_steps"]
    assert parse(every, "0.05") == (0.05, "") and parse(every, "10") == (10, "") and parse(every, "10.0") == (10, "")
    assert parse(every, "0")[1] == ("out of range: a whole number of steps of at least 1, or a fraction of the "
                                    "run below 1")
    assert parse(FIELD_BY_PATH["training.eval_steps"], "0") == (0, "")
    r, lr, steps = FIELD_BY_PATH["lora.r"], FIELD_BY_PATH["training.learning_rate"], FIELD_BY_PATH["training.max_steps"]
    assert parse(r, "16") == (16, "") and parse(r, "1_024") == (1024, "")
    assert parse(r, "1.5")[1] == "not a whole number: '1.5'; a whole number of at least 1"
    assert parse(lr, "0")[1] == "out of range: a number above 0 and below 1"  # as the backend's check says
    assert parse(lr, "2e-4") == (2e-4, "") and parse(lr, "nan")[1] == "must be a finite number"
    assert parse(steps, "-1") == (-1, "") and parse(steps, "0")[1] == "out of range: a whole number of at least 1 or -1"
    assert parse(FIELD_BY_PATH["training.num_train_epochs"], "0")[1] == "out of range: a number above 0"
    assert parse(FIELD_BY_PATH["lora.modules_to_save"], "lm_head embed_tokens") == (["lm_head", "embed_tokens"], "")
    assert parse(FIELD_BY_PATH["lora.modules_to_save"], "lm-head")[1].startswith("not a module name: 'lm-head'")
    assert cross_errors({"model": {"source": "x"}, "data": {"source": {"path": "y"}},
                         "lora": {"target_modules": []}, "training": {}}) == {
        "lora.target_modules": "pick at least one module, or all-linear"}


def test_lora_pane_snapshot(snap_compare, qlw_home):
    """An imported config with a clean check at 100x30, no backend (nothing from the clock)."""
    config = {
        "version": 1, "name": "mistral-dolly",
        "model": P.to_dict(P.ModelSettings(source="mistralai/Mistral-7B-v0.3")),
        "data": P.to_dict(P.PreparedData(source={"path": "/data/dolly.jsonl"}, max_length=2048)),
        "lora": P.to_dict(P.LoraSettings()), "training": P.to_dict(P.TrainingSettings()),
    }

    async def settle(pilot):
        pane = await open_lora(pilot, FakeBackend(train_validate={**VALID, "trainable_params": 41_943_040,
                                                                  "total_params": 7_289_966_592,
                                                                  "trainable_percent": 0.5754}))
        pane.apply_config(config, origin="mistral.toml")
        await until(pilot, lambda: pane.validated == pane.config(), "the check of the imported config")
        control = pane.form.row("lora.r").control
        control.cursor_blink = False  # a blinking cursor would make the picture depend on timing
        control.focus()
        await pilot.pause()

    assert snap_compare(make_app(qlw_home), terminal_size=SIZE, run_before=settle)


# With a real backend ------------------------------------------------------------------------


def test_real_backend_checks_and_trains_the_tiny_model_at_80x24(backend_with_tiny):
    """The embedded tiny model (empty source) on the shipped sample (no dataset open), fp32 on
    the CPU: train.validate's trainable-params line, then a 4-step run whose rows, merged
    evaluation and result reach the Train tab."""

    notes: list[str] = []

    def hook(message):
        if isinstance(message, Notify):
            notes.append(message.notification.message)

    async def body():
        app = make_app(backend_with_tiny)
        async with app.run_test(size=(80, 24), message_hook=hook) as pilot:
            await until(pilot, lambda: app.connection.state == "connected", "connected")
            screen = app.screen
            screen.query_one(ModelPane).form.query_one("#model-precision", Select).value = "fp32"
            screen.query_one(TabbedContent).active = "lora"
            pane = screen.query_one(LoraPane)
            await until(pilot, lambda: set(pane.presets) == set(P.TRAIN_PRESETS), "the backend's presets")
            for path, value in (("training.max_steps", "4"), ("training.logging_steps", "1"),
                                ("training.per_device_train_batch_size", "2"),
                                ("training.gradient_accumulation_steps", "1"), ("training.eval_steps", "2"),
                                ("training.optim", "adamw_torch"), ("data.max_length", "128")):
                set_field(pane, path, value)
            # The first check imports the ML stack and builds the model on the meta device.
            await until(pilot, lambda: start_enabled(pane), "a clean check", timeout=60)
            result = pane.query_one(ValidationLine).result
            assert result["total_steps"] == 4 and result["memory"]["device"] == "cpu"
            trainable, total = result["trainable_params"], result["total_params"]
            assert 0 < trainable < total
            assert line_text(pane).startswith(
                f"trainable params: {trainable:,} || all params: {total:,} || trainable%: "
                f"{100 * trainable / total:.4f}\nmemory ~")
            assert "→ ✔ fits · 4 steps" in line_text(pane)
            assert pane.config()["model"]["precision"] == "fp32" and pane.config()["model"]["source"] == ""

            pane.query_one("#lora-path", Input).focus()
            await pilot.press("f5")
            tp = screen.query_one(TrainPane)
            await until(pilot, lambda: screen.query_one(TabbedContent).active == "train", f"the Train tab (notices: {notes})")
            try:
                await until(pilot, lambda: tp.finished is not None, "the end of the run", timeout=150)
            except AssertionError:  # say how it ended instead, and what the backend logged
                log = (backend_with_tiny / "backend-test.log").read_text()[-2000:]
                raise AssertionError(f"no train.finished; job line: {screen.query_one(JobIndicator).render()}; "
                                     f"notices: {notes}; backend log:\n{log}") from None
            await until(pilot, lambda: tp.table.row_count == 4 and tp.drawn, "the rows")
            table = rows_of(tp)
            assert [r[0] for r in table] == ["1", "2", "3", "4"]
            assert [r[2] != "—" for r in table] == [False, True, False, True]  # eval merged at 2 and 4
            assert len(tp.curve.train) == 4 and len(tp.curve.eval) == 2
            assert tp.finished["status"] == "done"
            result_text = str(tp.query_one("#train-result").render())
            assert result_text.startswith("✔ finished at step 4/4") and "adapter: " in result_text
            assert Path(tp.finished["adapter_path"]).is_dir()
            # The checkpoint is offered for a resume.
            await until(pilot, lambda: pane.checkpoints, "the checkpoint to resume from")
            assert pane.checkpoints[0]["step"] == 4

            # The config round-trips through a TOML file the backend writes and reads.
            app.screen.action_show_tab("lora")
            config = pane.config()
            path = backend_with_tiny / "runs-config" / "tiny.toml"
            pane.query_one("#lora-path", Input).value = str(path)
            pane.query_one("#lora-path", Input).focus()
            await pilot.press("ctrl+s")
            await until(pilot, lambda: path.is_file(), "the exported file")
            set_field(pane, "lora.r", "4")
            await pilot.press("ctrl+o")
            await until(pilot, lambda: pane.config()["lora"]["r"] == 16, "the imported file")
            imported = pane.config()
            assert {k: imported[k] for k in ("lora", "training", "name")} == {
                k: config[k] for k in ("lora", "training", "name")}
            assert imported["data"]["max_length"] == 128 and imported["model"]["precision"] == "fp32"
        await app.backend.stop()

    asyncio.run(asyncio.wait_for(body(), 300))  # seconds alone; minutes on a busy 2-core machine


def rows_of(tp: TrainPane) -> list[list[str]]:
    return [[str(c) for c in tp.table.get_row_at(i)] for i in range(tp.table.row_count)]
