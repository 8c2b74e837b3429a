"""Every pane's state belongs to the backend: what one app typed and chose comes back in a fresh
app on the same backend (a re-attach), after the backend restarts (``qlw stop``, then ``qlw``),
and shows live in a second app attached at the same time.

Each pane is set through its own controls, as a user would; waits poll a condition (never a
fixed sleep) and fail only when nothing moves for long.
"""

from __future__ import annotations

import asyncio
import json

from textual.widgets import Checkbox, Input, Select, TabbedContent

from tests.conftest import start_backend, stop_backend
from tests.functional.helpers import make_app, until
from tui.widgets.chat.chat_pane import ChatPane
from tui.widgets.data.data_pane import DataPane
from tui.widgets.lora.lora_pane import LoraPane
from tui.widgets.merge.merge_pane import MergePane
from tui.widgets.model.model_pane import ModelPane

SIZE = (80, 24)
ROWS = [{"question": f"What is {i} + {i}?", "answer": f"{2 * i}."} for i in range(30)]
#: The LoRA fields set, by dotted path, as typed.
LORA = {"lora.r": "8", "lora.lora_alpha": "32", "training.max_steps": "7", "training.learning_rate": "0.001",
        "training.logging_steps": "1", "training.eval_steps": "2", "training.save_steps": "3"}


def write_data(home):
    path = home / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(path)


async def connected(pilot):
    app = pilot.app
    await until(pilot, lambda: app.connection.state == "connected", "connected", timeout=60)


def panes(app):
    q = app.screen.query_one
    return q(ModelPane), q(DataPane), q(LoraPane), q(ChatPane), q(MergePane)


async def show_tab(pilot, tab: str) -> None:
    pilot.app.screen.action_show_tab(tab)
    # The focus moves into the tab by a message: let it land before the next tab is shown.
    await until(pilot, lambda: pilot.app.screen.query_one("#tabs", TabbedContent).active == tab
                and pilot.app.focused is not None, f"the {tab} tab shown")
    await pilot.pause()


async def set_everything(pilot, data_path: str) -> None:
    """Set a value in every pane, through its controls."""
    app = pilot.app
    model, data, lora, chat, merge = panes(app)
    await show_tab(pilot, "model")
    model.form.query_one("#model-source", Input).value = "/nowhere/my-base"
    model.form.query_one("#model-precision", Select).value = "bf16"

    await show_tab(pilot, "data")
    data.query_one("#data-path", Input).value = data_path
    data.open_dataset()
    await until(pilot, lambda: data.summary is not None and data.summary["source"]["path"] == data_path,
                "the dataset open", timeout=60)
    data.query_one("#data-template", Select).value = "alpaca"
    data.query_one("#data-split-mode", Select).value = "none"
    data.query_one("#data-max-length", Input).value = "256"
    data.query_one("#data-split-mode", Select).focus()  # leaves max_length: the form takes it
    await pilot.pause()

    await show_tab(pilot, "lora")
    for path, value in LORA.items():
        lora.form.row(path).control.value = value
    lora.form.query_one("#run-name", Input).value = "my run"

    await show_tab(pilot, "chat")
    chat.settings_form.query_one("#chat-temperature", Input).value = "0.3"
    chat.settings_form.query_one("#chat-max-new-tokens", Input).value = "77"
    chat.settings_form.query_one("#chat-do-sample", Checkbox).value = False

    await show_tab(pilot, "merge")
    merge.upload_step.query_one("#hub-repo", Input).value = "me/my-model"
    merge.upload_step.query_one("#hub-private", Checkbox).value = False

    await show_tab(pilot, "lora")  # the tab last shown
    await pilot.pause()


def shown(app) -> dict:
    """What the panes show of the values :func:`set_everything` set."""
    model, data, lora, chat, merge = panes(app)
    return {
        "tab": app.screen.query_one("#tabs", TabbedContent).active,
        "model.source": model.form.query_one("#model-source", Input).value,
        "model.precision": model.form.query_one("#model-precision", Select).value,
        "data.open": (data.summary or {}).get("source", {}).get("path"),
        "data.template": data.query_one("#data-template", Select).value,
        "data.split_mode": data.query_one("#data-split-mode", Select).value,
        "data.max_length": data.query_one("#data-max-length", Input).value,
        "lora": {path: lora.form.row(path).raw for path in LORA},
        "lora.name": lora.form.query_one("#run-name", Input).value,
        "lora.data": (lora.data.get("source") or {}).get("path"),
        "chat.temperature": chat.settings_form.query_one("#chat-temperature", Input).value,
        "chat.max_new_tokens": chat.settings_form.query_one("#chat-max-new-tokens", Input).value,
        "chat.do_sample": chat.settings_form.query_one("#chat-do-sample", Checkbox).value,
        "merge.repo": merge.upload_step.query_one("#hub-repo", Input).value,
        "merge.private": merge.upload_step.query_one("#hub-private", Checkbox).value,
    }


def expected(data_path: str) -> dict:
    return {"tab": "lora", "model.source": "/nowhere/my-base", "model.precision": "bf16", "data.open": data_path,
            "data.template": "alpaca", "data.split_mode": "none", "data.max_length": "256", "lora": LORA,
            "lora.name": "my run", "lora.data": data_path, "chat.temperature": "0.3", "chat.max_new_tokens": "77",
            "chat.do_sample": False, "merge.repo": "me/my-model", "merge.private": False}


async def until_shown(pilot, app, want: dict, what: str, timeout: float = 60) -> None:
    try:
        await until(pilot, lambda: shown(app) == want, what, timeout=timeout)
    except AssertionError:
        got = shown(app)
        assert {k: v for k, v in got.items() if want.get(k) != v} == {}, f"{what}: differs from {want}"
        raise


async def quit_app(pilot) -> None:
    await pilot.app.action_quit()


def test_every_pane_comes_back_in_a_fresh_app_and_after_a_backend_restart(qlw_home):
    data_path = write_data(qlw_home)
    want = expected(data_path)
    proc = start_backend(qlw_home)
    try:
        async def first():
            app = make_app(qlw_home)
            async with app.run_test(size=SIZE) as pilot:
                await connected(pilot)
                await set_everything(pilot, data_path)
                assert shown(app) == want
                await quit_app(pilot)

        async def again():
            app = make_app(qlw_home)
            async with app.run_test(size=SIZE) as pilot:
                await connected(pilot)
                await until_shown(pilot, app, want, "every value back")
                # Start stays off while the dataset is opened again, and then names the user's data.
                lora = app.screen.query_one(LoraPane)
                assert (lora.data.get("source") or {}).get("path") == data_path
                await quit_app(pilot)

        asyncio.run(asyncio.wait_for(first(), 180))
        asyncio.run(asyncio.wait_for(again(), 180))
    finally:
        stop_backend(proc)

    # `qlw stop`, then `qlw`: a new backend that holds no dataset any more.
    proc = start_backend(qlw_home)
    try:
        asyncio.run(asyncio.wait_for(again(), 180))
    finally:
        stop_backend(proc)


def test_a_second_app_attached_at_the_same_time_sees_the_changes(qlw_home):
    data_path = write_data(qlw_home)
    proc = start_backend(qlw_home)
    try:
        async def body():
            one, two = make_app(qlw_home), make_app(qlw_home)
            async with one.run_test(size=SIZE) as p1, two.run_test(size=SIZE) as p2:
                await connected(p1)
                await connected(p2)
                await set_everything(p1, data_path)
                want = expected(data_path)
                want["tab"] = "gpu"  # each terminal keeps its own tab while both are attached
                await until_shown(p2, two, want, "the second app shows every value")
                # And back: a change in the second app shows in the first.
                two.screen.query_one(LoraPane).form.row("lora.r").control.value = "64"
                await until(p1, lambda: one.screen.query_one(LoraPane).form.row("lora.r").raw == "64",
                            "the first app shows the second's change", timeout=30)
                await quit_app(p1)
                await quit_app(p2)

        asyncio.run(asyncio.wait_for(body(), 240))
    finally:
        stop_backend(proc)


def test_settings_taken_from_the_data_tab_are_shown_not_sent_as_an_edit(qlw_home):
    """The LoRA form takes the Data tab's max_length and loss when that tab changes. That is not
    an edit of the LoRA pane: sent, its state would carry every other field as this terminal
    shows it, over the edits another terminal made meanwhile (the second app of
    test_a_second_app_attached_at_the_same_time_sees_the_changes lost its LoRA values so once,
    in a loaded suite run). Only the user's edits are sent."""
    from tests.functional.helpers import without_backend

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=SIZE) as pilot:
            await without_backend(pilot)
            lora = app.screen.query_one(LoraPane)
            sent: list[tuple[str, dict]] = []
            real_set = app.ui_state.set

            def spy(key, value):
                sent.append((key, value))
                return real_set(key, value)

            app.ui_state.set = spy  # type: ignore[method-assign]
            data = {"source": {"path": "/data/mine.jsonl", "config": "", "split": ""}, "max_length": 333, "loss": "all"}
            lora._data_pane_settings = lambda: data  # type: ignore[method-assign]
            lora.data_changed()  # as the Data tab calls it when its dataset opens or is restored
            await pilot.pause()
            await pilot.pause()
            assert lora.form.row("data.max_length").raw == "333" and lora.config()["data"]["max_length"] == 333
            assert [key for key, _ in sent if key == "lora"] == []
            # An edit of the user's is sent, with the value taken from the Data tab.
            lora.form.row("lora.r").control.value = "32"
            await until(pilot, lambda: any(key == "lora" for key, _ in sent), "the edit sent")
            fields = [v for key, v in sent if key == "lora"][-1]["fields"]
            assert fields["lora.r"] == "32" and fields["data.max_length"] == "333"

    asyncio.run(body())
