"""The Model pane at 80x24 against a real backend: the tiny shortcut, the estimate line, Load with
progress, the inspector, and errors for people.

The pane is mounted the way the lead will mount it (a tab of the shell, between the header and
the job line); the tiny model is copied into the backend's data home from pytest's cache.
Waits poll a condition with a timeout, never a fixed sleep."""

from __future__ import annotations

import asyncio
import io
import os

from rich.console import Console
from textual.notifications import Notify
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Select, TabbedContent, TabPane

from backend import tiny
from tests.conftest import ROOT
from tests.functional import helpers
from tui.app import QlwApp
from tui.widgets.model.estimate_line import EstimateLine
from tui.widgets.model.model_form import ModelForm, expand_source
from tui.widgets.model.model_format import estimate_text, group_rows, measured_text, size, tokenizer_text
from tui.widgets.model.model_inspector import ModelInspector
from tui.widgets.model.model_pane import ModelPane
from tui.widgets.shell.app_header import AppHeader
from tui.widgets.shell.job_indicator import JobIndicator

SIZE = (80, 24)


class ModelScreen(Screen):
    """The shell's layout with the Model tab only."""

    def compose(self):
        yield AppHeader(id="app-header")
        with TabbedContent(id="tabs"):
            with TabPane("Model", id="model"):
                yield ModelPane(id="model-pane")
        yield JobIndicator(id="job-indicator")
        yield Footer()


class ModelApp(QlwApp):
    CSS_PATH = str(ROOT / "tui" / "styles" / "app.tcss")

    def get_default_screen(self) -> Screen:
        return ModelScreen(id="main")


async def until(pilot, condition, what: str, timeout: float = 30.0) -> None:
    """The shared wait, with the longer default that a model load needs."""
    await helpers.until(pilot, condition, what, timeout)


def screen_text(app) -> str:
    """What the terminal shows, as plain text."""
    console = Console(width=SIZE[0], height=SIZE[1], file=io.StringIO(), color_system=None, record=True)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens,
                                                      simplify=True))
    return console.export_text()


def test_load_the_tiny_model_and_inspect_it_at_80x24(backend_with_tiny):
    home = backend_with_tiny
    tiny_path = str(tiny.tiny_model_path(home))
    notes: list[str] = []

    def hook(message):
        if isinstance(message, Notify):
            notes.append(message.notification.message)

    async def body():
        app = ModelApp(home=home)
        app.animation_level = "none"
        async with app.run_test(size=SIZE, message_hook=hook) as pilot:
            pane = app.screen.query_one(ModelPane)
            form = pane.query_one(ModelForm)
            line = pane.query_one(EstimateLine)
            inspector = pane.query_one(ModelInspector)
            await until(pilot, lambda: app.connection.state == "connected", "connected")
            device = form.query_one("#model-device", Select)
            await until(pilot, lambda: any(v == "cpu" for _, v in device._options), "the backend's devices")
            assert inspector.info is None and "No base model loaded" in screen_text(app)

            # The shortcut fills in the tiny model; the estimate follows by itself.
            await pilot.click("#model-tiny")
            await until(pilot, lambda: form.query_one("#model-source", Input).value == tiny_path, "the tiny path")
            await until(pilot, lambda: line.has_class("-fits"), "the estimate", timeout=60)
            assert line.estimate["parameters"] == 688_768 and line.estimate["device"] == "cpu"
            assert "689k params" in str(line.content) and str(line.content).endswith("✔ fits")
            assert str(line.tooltip).startswith("688,768 parameters, 294,912 of them quantized")

            # Another precision: a new estimate, without quantization state.
            form.query_one("#model-precision", Select).value = "bf16"
            await until(pilot, lambda: line.estimate and line.estimate["precision"] == "bf16", "the bf16 estimate")
            assert form.query_one("#model-quant-type").disabled
            form.query_one("#model-precision", Select).value = "4bit"
            await until(pilot, lambda: line.estimate and line.estimate["precision"] == "4bit", "the 4-bit estimate")

            # Load: progress, then the inspector and the footprint beside the estimate.
            await pilot.click("#model-load")
            await until(pilot, lambda: inspector.info is not None, "the loaded model", timeout=60)
            await until(pilot, lambda: not pane.job_id, "the job's end")
            status = str(pane.query_one("#model-status").content)
            assert status.startswith("✔ loaded on cpu in "), status
            measured = str(inspector.query_one("#inspect-measured").content)
            assert measured.startswith("measured 913.4 KiB + 19.5 KiB quant state = 932.9 KiB (×1.000"), measured
            table = inspector.query_one(DataTable)
            rows = {str(table.get_row_at(i)[0]): [str(c) for c in table.get_row_at(i)] for i in range(table.row_count)}
            assert rows["q_proj"] == ["q_proj", "2", "128×128", "yes", "all-linear"]
            assert rows["k_proj"][1:3] == ["2", "64×128"] and rows["down_proj"][1:3] == ["2", "128×256"]
            assert rows["lm_head"][3:] == ["no", "output head"]
            assert inspector.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"]
            text = screen_text(app)
            for visible in ("LlamaForCausalLM · 2 layers", "4-bit nf4 + double quant", "×1.000 the estimate",
                            "down_proj", "pad <pad> ✔ · chat template ✔", "Load"):
                assert visible in text, (visible, text)

            # A folder that is not there: the estimate line says so, for people.
            form.set_source(tiny_path + "-missing")
            await until(pilot, lambda: line.has_class("-error"), "the error")
            assert "no model folder at" in str(line.content) and "check the path" in str(line.content)
            # Loading it fails as a job: the status line and a notification say why; the
            # previous model was released first, and the inspector shows that.
            await pilot.click("#model-load")
            await until(pilot, lambda: pane.query_one("#model-status").has_class("-failed"), "the failed load")
            await until(pilot, lambda: inspector.info is None, "the released model")
            assert any("no model folder" in n for n in notes), notes
        await app.backend.stop()

    asyncio.run(asyncio.wait_for(body(), 120))


def test_formatting_and_paths():
    assert size(935_296) == "913.4 KiB" and size(512) == "512 B"
    assert size(3.85 * 1024**3) == "3.85 GiB" and size(None) == "n/a"
    assert expand_source("./models/x", cwd="/home/u/work") == "/home/u/work/models/x"
    assert expand_source("~/m") == os.path.expanduser("~/m")
    assert expand_source(" mistralai/Mistral-7B-v0.3 ") == "mistralai/Mistral-7B-v0.3"
    est = {"architecture": "MistralForCausalLM", "parameters": 7_248_023_552, "precision": "4bit",
           "precision_label": "4-bit nf4 + double quant, compute bf16", "total_bytes": 4_138_000_000,
           "footprint_bytes": 4_026_000_000, "quant_state_bytes": 112_000_000, "device": "cuda:0",
           "free_bytes": 3_900_000_000, "verdict": "will not fit"}
    assert estimate_text(est).endswith("→ ✖ will not fit") and "7.25B" in estimate_text(est)
    assert "\nusual fix for the missing pad token: tokenizer.pad_token = tokenizer.eos_token" in tokenizer_text(
        {"loaded": True, "class": "X", "vocab_size": 10, "has_pad": False,
         "pad_fix": "tokenizer.pad_token = tokenizer.eos_token ('</s>')", "has_chat_template": False})
    assert group_rows({"linear_groups": [{"name": "c_attn", "count": 12, "shapes": [[2304, 768]], "quantized": False,
                                          "in_all_linear": True}]}) == [("c_attn", "12", "2304×768", "no", "all-linear")]
    text = measured_text({"estimate": {"footprint_bytes": 100, "total_bytes": 110},
                          "measured": {"footprint_bytes": 100, "quant_state_bytes": 10, "tensor_bytes": 110,
                                       "torch_allocated_bytes": 112},
                          "comparison": {"footprint_vs_estimate": 1.0, "tensors_vs_estimate": 1.0,
                                         "allocated_vs_estimate": 1.018}})
    assert text == ("measured 100 B + 10 B quant state = 110 B (×1.000 the estimate) · "
                    "torch allocated 112 B (×1.018)")


def test_f5_without_a_source_says_so_and_a_freed_model_is_not_loaded(qlw_home):
    """Issue 15: f5 with an empty model source said nothing; after Free VRAM the line still said
    "✔ loaded on cpu" beside the inspector's "No base model loaded"."""
    import asyncio

    from textual.widgets import Input

    from tests.functional.helpers import make_app, until, without_backend
    from tui.widgets.model.model_pane import ModelPane

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=(100, 30)) as pilot:
            await without_backend(pilot)
            await pilot.press("2")
            pane = app.screen.query_one(ModelPane)
            pane.form.query_one("#model-source", Input).value = ""
            await pilot.press("escape", "f5")
            status = pane.query_one("#model-status")
            await until(pilot, lambda: str(status.content).startswith("name a model first"), "the hint")
            assert any("No model source" in n.message for n in app._notifications)

            async def nothing_loaded(params, timeout=None):
                return {"loaded": False}

            pane.call = nothing_loaded
            pane._show_status("✔ loaded on cpu in 1.00 s", "-done")
            pane.read_inspection()
            await until(pilot, lambda: not str(status.content).startswith("✔ loaded"), "the freed line")
            assert str(status.content) == "no base model loaded (freed); f5 loads one again"

    asyncio.run(body())
