"""The Data pane against a real backend, at 80x24: browse the shipped sample dataset page by
page, filter, read Korean and Japanese rows in full, correct the mapping, switch the template,
watch the live preview, count tokens, and see a bad file explained.

One backend (with the tiny model copied into its data home) serves the whole test; waits poll a
condition with a timeout, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from textual.widgets import Input, Select

from backend import protocol as P
from backend import tiny
from tests.backend.test_data import install_tiny
from tests.conftest import start_backend, stop_backend
from tests.functional import helpers
from tui.app import QlwApp
from tui.widgets.data.columns_table import ColumnsTable
from tui.widgets.data.data_pane import DataPane
from tui.widgets.data.mapping_form import MappingForm
from tui.widgets.data.preview_view import PreviewView
from tui.widgets.data.row_detail import RowDetail
from tui.widgets.data.rows_table import RowsTable
from tui.widgets.data.split_form import SplitForm
from tui.widgets.data.token_stats_view import TokenStatsView

SIZE = (80, 24)
SAMPLE_ROWS = [json.loads(line) for line in tiny.sample_dataset_path().read_text(encoding="utf-8").splitlines()]


async def until(pilot, condition, what: str, timeout: float = 20.0) -> None:
    """The shared wait, with the longer default that reading a dataset needs."""
    await helpers.until(pilot, condition, what, timeout)


@pytest.fixture
def data_backend(qlw_home):
    install_tiny(qlw_home)
    proc = start_backend(qlw_home)
    yield qlw_home
    stop_backend(proc)


def test_data_bindings_have_ids_and_tooltips():
    bindings = [*DataPane.BINDINGS, *RowsTable.BINDINGS]
    assert all(b.id and b.tooltip for b in bindings)
    assert len({b.id for b in bindings}) == len(bindings)


def test_browse_the_sample_dataset(data_backend, tmp_path):
    home = data_backend
    changed: list[dict] = []

    def hook(message):
        if isinstance(message, DataPane.SettingsChanged):
            changed.append(message.settings)

    async def body():
        app = QlwApp(home=home)
        app.animation_level = "none"
        async with app.run_test(size=SIZE, message_hook=hook) as pilot:
            await until(pilot, lambda: app.connection.state == "connected", "connected")
            await pilot.press("3")
            pane = app.screen.query_one(DataPane)
            table = pane.query_one(RowsTable)
            status = pane.query_one("#data-status")
            assert pane.query_one("#data-path", Input).value == str(tiny.sample_dataset_path())

            # Open the sample (enter in the path box): a data.open job, then the first page.
            pane.query_one("#data-path", Input).focus()
            await pilot.press("enter")
            await until(pilot, lambda: table.row_count == 100, "the first page")
            assert "585 rows (train)" in str(status.content) and "dolly" in str(status.content)
            assert table.total == 585 and table.indices[:3] == [0, 1, 2]
            assert table.columns_shown == ["instruction", "context", "response", "category"]
            columns = pane.query_one(ColumnsTable)
            assert columns.row_count == 4
            assert [str(c) for c in columns.get_row_at(0)][:3] == ["instruction → instruction", "string", "0"]

            # Page on keys: past the end of a page comes the next one, and back.
            table.focus()
            await pilot.press("end", "pagedown")  # end: column; pagedown to the bottom
            for _ in range(10):
                if table.page_start == 100:
                    break
                await pilot.press("pagedown")
                await pilot.pause(0.05)
            await until(pilot, lambda: table.page_start == 100, "the second page")
            assert table.highlighted_index == 100
            await pilot.press("up")
            await until(pilot, lambda: table.page_start == 0 and table.highlighted_index == 99, "back to page one")
            await pilot.press("ctrl+end")
            await until(pilot, lambda: table.page_start == 500 and table.highlighted_index == 584, "the last page")
            assert "rows 501–585 of 585" in str(pane.query_one("#data-page-line").content)
            await pilot.press("ctrl+home")
            await until(pilot, lambda: table.page_start == 0, "the first page again")

            # Filter to a Japanese row; enter shows it in full.
            japanese = next(i for i, r in enumerate(SAMPLE_ROWS) if "新幹線" in r["response"] and r["context"])
            pane.query_one("#data-filter", Input).value = "新幹線"
            await until(pilot, lambda: table.total and table.total < 585 and table.row_count == table.total,
                        "the filtered rows")
            assert japanese in table.indices
            table.focus()
            table.move_cursor(row=table.indices.index(japanese))
            await pilot.press("enter")
            detail = pane.query_one(RowDetail)
            await until(pilot, lambda: f"row {japanese} of 585" in detail.text, "the Japanese row in full")
            for key in ("instruction", "context", "response"):
                assert SAMPLE_ROWS[japanese][key] in detail.text  # in full, not cut
            svg = app.export_screenshot()
            first_word = SAMPLE_ROWS[japanese]["instruction"][:4]
            assert first_word in svg  # drawn on the screen, wide characters and all

            # A Korean row, with its long context.
            korean = max((i for i, r in enumerate(SAMPLE_ROWS) if "다" in r["response"] and r["context"]),
                         key=lambda i: len(SAMPLE_ROWS[i]["context"]))
            pane.query_one("#data-filter", Input).value = f"instruction:{SAMPLE_ROWS[korean]['instruction']}"
            await until(pilot, lambda: table.indices[:1] == [korean], "the Korean row")
            await pilot.press("r")
            table.move_cursor(row=0)
            await pilot.press("enter")
            await until(pilot, lambda: f"row {korean} of 585" in detail.text, "the Korean row in full")
            assert SAMPLE_ROWS[korean]["context"] in detail.text and SAMPLE_ROWS[korean]["response"] in detail.text

            # The live preview of that row: the chat template, the answer in the loss.
            await pilot.press("v")
            preview = pane.query_one(PreviewView)
            await until(pilot, lambda: preview.preview is not None and preview.preview.get("index") == korean,
                        "the preview")
            pv = preview.preview
            assert pv["error"] is None and pv["loss"] == "assistant_only" and pv["form"] == "messages"
            in_loss = "".join(s["text"] for s in pv["segments"] if s["loss"])
            assert in_loss == SAMPLE_ROWS[korean]["response"] + "</s>"
            assert "<|assistant|>" in preview.text and SAMPLE_ROWS[korean]["context"] in preview.text
            assert f"{pv['loss_tokens']} in the loss" in preview.head
            assert pane.query_one(SplitForm).query_one("#data-split-counts").content == \
                "train 526 rows · validation 59 rows"

            # Correct the mapping: the category is the response now.
            form = pane.query_one(MappingForm)
            form.set_role("response", "category")
            await until(pilot, lambda: preview.preview.get("example") and
                        preview.preview["example"]["messages"][-1]["content"] == SAMPLE_ROWS[korean]["category"],
                        "the preview with the corrected mapping")
            await until(pilot, lambda: changed and changed[-1]["mapping"]["response"] == "category",
                        "SettingsChanged")
            settings = changed[-1]
            P.build(P.PreparedData, json.loads(json.dumps(settings)), "settings")  # plain data, as sent
            assert settings == pane.settings and settings["source"]["split"] == "train"
            form.set_role("response", "response")

            # Mistral: prompt/completion, the completion in the loss.
            form.set_template("mistral")
            await until(pilot, lambda: preview.preview.get("loss") == "completion_only", "the Mistral preview")
            assert preview.text.startswith("<s>[INST] ") and "[/INST]" in preview.text
            assert in_loss.removesuffix("</s>") in "".join(s["text"] for s in preview.preview["segments"] if s["loss"])

            # A loss that does not fit the template is explained where the preview goes.
            form.set_template("chat")
            form.query_one("#data-loss", Select).value = "completion_only"
            await until(pilot, lambda: preview.preview.get("error") is not None, "the error in the preview")
            assert "completion-only loss needs prompt/completion rows" in preview.head
            form.query_one("#data-loss", Select).value = "auto"

            # Token statistics: a backend job, with a histogram.
            await pilot.press("t")
            stats = pane.query_one(TokenStatsView)
            await until(pilot, lambda: stats.stats is not None, "the token statistics", timeout=60)
            st = stats.stats
            assert st["rows"] == 585 and st["p50"] <= st["p95"] <= st["max"]
            assert sum(stats.query_one("LengthHistogram").counts) == 585
            assert "p50" in str(stats.query_one("#stats-summary").content)

            # Everything fits at 80x24.
            for selector in ("#data-path", "#data-status", "#data-tabs", "#stats-histogram"):
                region = pane.query_one(selector).region
                assert region.width > 0 and region.height > 0 and region.right <= 80 and region.bottom <= 24

            # A bad file: what is wrong and where.
            bad = tmp_path / "bad.jsonl"
            bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c" "response": "d"}\n', encoding="utf-8")
            pane.query_one("#data-path", Input).value = str(bad)
            pane.query_one("#data-path", Input).focus()
            await pilot.press("enter")
            await until(pilot, lambda: status.has_class("-error"), "the error")
            text = str(status.content)
            assert "line 2 of bad.jsonl is not valid JSON" in text and f"{bad}:2" in text
            assert pane.summary["num_rows"] == 585  # the open dataset is still there

    asyncio.run(body())


def test_preference_pairs_are_detected_and_previewed_side_by_side(data_backend):
    """The shipped preference sample: its shape is recognised and mapped (prompt, chosen,
    rejected), and the preview shows the chosen and the rejected training text in turn, each
    with its answer in the loss and the prompt out of it."""
    rows = [json.loads(line) for line in tiny.preference_sample_path().read_text(encoding="utf-8").splitlines()]

    async def body():
        app = QlwApp(home=data_backend)
        app.animation_level = "none"
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: app.connection.state == "connected", "connected")
            await pilot.press("3")
            pane = app.screen.query_one(DataPane)
            table = pane.query_one(RowsTable)
            path = pane.query_one("#data-path", Input)
            path.value = str(tiny.preference_sample_path())
            path.focus()
            await pilot.press("enter")
            await until(pilot, lambda: table.row_count == 100, "the first page")
            status = str(pane.query_one("#data-status").content)
            assert f"{len(rows)} rows (train)" in status and "preference" in status
            mapping = pane.query_one(MappingForm).mapping
            assert {k: v for k, v in mapping.items() if v} == {"instruction": "prompt", "chosen": "chosen",
                                                               "rejected": "rejected"}
            table.focus()
            table.move_cursor(row=0)
            await pilot.press("v")
            preview = pane.query_one(PreviewView)
            await until(pilot, lambda: preview.preview is not None and preview.preview.get("sides"), "the preview")
            pv = preview.preview
            for side in ("chosen", "rejected"):
                in_loss = "".join(s["text"] for s in pv["sides"][side]["segments"] if s["loss"])
                assert in_loss.startswith(rows[0][side]) and rows[0]["prompt"] not in in_loss
                assert f"── {side} · " in preview.text
            assert preview.text.index("── chosen") < preview.text.index("── rejected")

    asyncio.run(body())


def test_every_view_names_its_dataset_and_a_failed_open_says_what_stays_open(qlw_home):
    """Issue 15: after opening a second file the Stats tab showed the first file's counts and
    split; after a failed open, Format and the LoRA tab silently kept the previous dataset."""
    from tests.functional.test_lora_pane import SUMMARY
    from tui.widgets.lora.lora_pane import LoraPane

    other = {**SUMMARY, "source": {"path": "/data/other.jsonl", "config": "", "split": "train"}, "num_rows": 12,
             "splits": {"train": 12}}
    stats = {"rows": 585, "tokenizer": "qlw-tiny-llama", "p50": 80, "p95": 200, "p99": 300, "max": 400,
             "mean": 95, "truncated": 0, "max_length": 1024, "dropped": 0, "split": {"train": 527, "validation": 58},
             "histogram": {"counts": [3, 5, 2], "edges": [0, 100, 200, 300]}, "errors": []}

    async def body():
        app = helpers.make_app(qlw_home)
        async with app.run_test(size=(100, 30)) as pilot:
            await helpers.without_backend(pilot)
            await pilot.press("3")
            pane = app.screen.query_one(DataPane)
            view = pane.query_one(TokenStatsView)
            pane.show_summary(SUMMARY)
            await pilot.pause()
            caption = pane.query_one("#data-format-caption")
            assert str(caption.content).startswith("Format of dolly_sample.jsonl · 585 rows (train)")
            pane._stats_for = pane.settings
            view.show_stats(stats)
            pane.query_one(SplitForm).show_counts({"train": 527, "validation": 58})
            assert str(pane.query_one("#stats-status").content).startswith("✔ dolly_sample.jsonl: 585 rows")

            # The settings change: the figures stay, marked out of date.
            pane.query_one(MappingForm).set_template("alpaca")
            await until(pilot, lambda: view.stale, "the stats marked out of date")
            assert str(pane.query_one("#stats-status").content).startswith("⚠ dolly_sample.jsonl: counted before")

            # Another dataset: the last one's figures go; every view names the new one.
            pane.show_summary(other)
            await pilot.pause()
            assert view.stats is None and str(pane.query_one("#stats-summary").content) == ""
            assert str(pane.query_one("#stats-status").content).startswith("Token lengths of other.jsonl: not counted")
            assert str(pane.query_one("#data-split-counts").content) == ""
            assert str(caption.content).startswith("Format of other.jsonl · 12 rows (train)")

            # A failed open: the status and a notice say which dataset stays open (and trains).
            async def failing_open(source, reload=False):
                pane._show_error({"message": "no such file", "where": source["path"]}, "could not open the dataset: ")
                return None

            pane._open = failing_open
            pane.query_one("#data-path", Input).value = "/data/missing.jsonl"
            pane.open_dataset()
            await until(pilot, lambda: "stays open" in str(pane.query_one("#data-status").content), "the note")
            status = str(pane.query_one("#data-status").content)
            assert status.startswith("✖ could not open the dataset: no such file")
            assert "other.jsonl stays open: Rows, Format, Stats and the LoRA tab still use it" in status
            assert any("other.jsonl stays open" in n.message for n in app._notifications)
            app.screen.query_one(LoraPane).sync_sections()
            assert "other.jsonl" in str(app.screen.query_one("#run-data-line").render())

    asyncio.run(body())
