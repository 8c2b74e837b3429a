"""The Chat tab: targets, load, streamed answers with their figures, stop, settings, multi-turn
history, compare mode side by side, export, refusals, a redraw from the session's events, and the
evaluation table.

Most tests drive the pane through a fake backend (``FakeChat``: the requests it got, and the
events a real backend sends for them, in the protocol's shapes, checked against the protocol's
dataclasses when it registers them); the last test runs against a real backend with the tiny
model (skipped while the backend has no ``chat.*`` requests). Waits poll a condition with a
timeout, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from textual.widgets import Collapsible, Input, Select

from backend import protocol as P
from tests.functional.helpers import make_app, skip_unless_backend_has, tab_after_tiny_training, until, without_backend
from tui.app import QlwApp
from tui.client import CONNECTED, RequestFailed
from tui.messages import BackendEvent, ConnectionChanged
from tui.modals.confirm_screen import ConfirmScreen
from tui.modals.export_screen import ExportScreen
from tui.widgets.chat.answer_view import AnswerView
from tui.widgets.chat.backend_call import params_of
from tui.widgets.chat.chat_format import answer_stats, eval_cells, short_target, target_label
from tui.widgets.chat.chat_pane import ChatPane
from tui.widgets.chat.eval_view import EvalView

SIZE = (80, 24)
T0 = 1_700_000_000.0
ADAPTER = "/data/qlw/runs/s1/adapter"
TUNED = f"tuned:{ADAPTER}"
TARGETS = {
    "targets": [
        {"id": "base", "label": "base (/data/qlw/models/tiny-llama)", "kind": "base", "path": "", "session": None,
         "step": None, "base_source": "/data/qlw/models/tiny-llama", "loaded": True},
        {"id": TUNED, "label": "tuned · s1 adapter (step 30)", "kind": "tuned", "path": ADAPTER,
         "session": "s1", "step": 30, "base_source": "", "loaded": False},
    ],
    "base_loaded": True, "base_source": "", "fast_path": "off: cpu"}


def event(session: str, seq: int, kind: str, payload: dict[str, Any]) -> P.Event:
    if kind in P.EVENTS:  # the payload is what the protocol says (once the backend registers it)
        P.build(P.EVENTS[kind], payload, kind)
    return P.Event(kind, payload, T0 + seq, session=None if kind == "chat.delta" else session,
                   seq=None if kind == "chat.delta" else seq)


class FakeChat:
    """The chat backend as the protocol describes it: answers requests, and sends the events of
    each chat.send (started, deltas, answer, job finished) through the app, like the client."""

    def __init__(self, app: QlwApp, answers: dict[str, str] | None = None, hold: bool = False):
        self.app = app
        self.sent: list[Any] = []
        self.answers = answers or {}
        self.seq = itertools.count(1)
        self.ids = itertools.count(1)
        self.conversation = "c1"
        self.hold = hold  # send no answer (a long generation, to be stopped)
        self.refuse: dict[str, str] = {}
        self.existing: set[str] = set()  # files an export must not replace unasked
        self.load_note = ""  # chat.load's note (how a merged folder was loaded)

    def of(self, method: str) -> list[dict[str, Any]]:
        return [params_of(p) for p in self.sent if p.METHOD == method]

    def post(self, kind: str, payload: dict[str, Any]) -> None:
        self.app.post_message(BackendEvent(event("s1", next(self.seq), kind, payload)))

    async def call(self, params, timeout=30.0):
        self.sent.append(params)
        method, p = params.METHOD, params_of(params)
        if method in self.refuse:
            raise RequestFailed(P.Reply(id="r", status="refused", reason=self.refuse[method]))
        if method == "chat.targets":
            return TARGETS
        if method == "chat.load":
            job = f"load{next(self.ids)}"
            self.post("job.started", {"job_id": job, "kind": "chat.load", "params": p})
            self.post("job.finished", {"job_id": job, "kind": "chat.load", "status": "done", "elapsed_s": 1.5,
                                       "result": {"target": p["target"], "load_s": 1.25, "fast_path": "off: cpu",
                                                  **({"note": self.load_note} if self.load_note else {})}})
            return {"job_id": job}
        if method == "chat.send":
            job = f"chat{next(self.ids)}"
            targets = [p["target"]] + ([p["compare_with"]] if p["compare_with"] else [])
            ids = [f"a{next(self.ids)}" for _ in targets]
            asyncio.get_running_loop().call_soon(self._answer, job, ids, targets, p)
            return {"job_id": job, "session": "s1", "answer_ids": ids}
        if method == "chat.clear":
            self.conversation = f"c{next(self.ids)}"
            return {"conversation": self.conversation}
        if method in ("chat.export", "eval.export") and p["path"] in self.existing and not p["overwrite"]:
            raise RequestFailed(P.Reply("r", "refused", {"path": p["path"]}, code="confirm",
                                        reason=f"{p['path']} exists: confirm to overwrite it"))
        if method == "chat.export":
            return {"path": p["path"], "answers": 3}
        if method == "job.cancel":
            return {"job_id": p["job_id"], "kind": "chat.send"}
        if method == "eval.run":
            job = f"eval{next(self.ids)}"
            self.post("job.started", {"job_id": job, "kind": "eval.run", "params": p})
            for i, target in enumerate(p["targets"]):
                self.post("eval.row", {"target": target, "label": short_target(target), "size_bytes": 2_000_000 * (i + 1),
                                       "load_s": 0.5, "gen_mean_s": 1.25, "gen_std_s": 0.05, "tokens_per_s": 51.2,
                                       "peak_bytes": 3 * 1024**2, "perplexity": 12.3456, "ppl_tokens": 400,
                                       "runs": p["runs"], "device": "cpu"})
            self.post("job.finished", {"job_id": job, "kind": "eval.run", "status": "done", "elapsed_s": 3.0})
            return {"job_id": job}
        if method == "eval.export":
            return {"path": p["path"]}
        raise AssertionError(f"unexpected request {method}")

    def _answer(self, job: str, ids: list[str], targets: list[str], p: dict[str, Any]) -> None:
        self.post("job.started", {"job_id": job, "kind": "chat.send", "params": {}})
        prompt = p["messages"][-1]["content"]
        for answer_id, target in zip(ids, targets):
            text = self.answers.get(target, f"answer of {target}")
            self.post("chat.started", {"answer_id": answer_id, "conversation": self.conversation, "target": target,
                                       "prompt_tokens": 12, "settings": p["settings"], "time": T0})
            for i in range(0, len(text), 4):
                self.post("chat.delta", {"answer_id": answer_id, "text": text[i:i + 4]})
            if self.hold:
                return
            self.post("chat.answer", {"answer_id": answer_id, "conversation": self.conversation, "target": target,
                                      "prompt": prompt, "text": text, "tokens": 20, "ttft_s": 0.125,
                                      "tokens_per_s": 40.0, "elapsed_s": 0.625, "stopped": False,
                                      "finish_reason": "eos", "path": "plain" if target == "base" else "fast"})
        self.post("job.finished", {"job_id": job, "kind": "chat.send", "status": "done", "elapsed_s": 1.0})

    def stop_held(self, job: str, answer_id: str, target: str, text: str) -> None:
        self.post("chat.answer", {"answer_id": answer_id, "conversation": self.conversation, "target": target,
                                  "prompt": "p", "text": text, "tokens": 3, "ttft_s": 0.1, "tokens_per_s": 30.0,
                                  "elapsed_s": 0.2, "stopped": True, "finish_reason": "stopped", "path": "fast"})
        self.post("job.finished", {"job_id": job, "kind": "chat.send", "status": "cancelled", "elapsed_s": 0.3})


async def open_chat(pilot, fake: FakeChat | None = None) -> ChatPane:
    """The Chat tab, its input focused (as the number key leaves it); with ``fake``, connected to it."""
    app = pilot.app
    await without_backend(pilot)
    app.screen.action_show_tab("chat")
    pane = app.screen.query_one(ChatPane)
    if fake is not None:
        pane.call = fake.call
        pane.on_connection(ConnectionChanged(CONNECTED))
        await until(pilot, lambda: pane.target == "base", "the targets")
    pane.query_one("#chat-input", Input).focus()
    await pilot.pause()
    return pane


async def type_and_send(pilot, pane: ChatPane, text: str) -> None:
    pane.query_one("#chat-input", Input).value = text
    pane.query_one("#chat-input", Input).focus()
    await pilot.press("enter")


def markdown_text(view: AnswerView) -> str:
    return view.body.source


def text_of(pane: ChatPane, selector: str) -> str:
    return str(pane.query_one(selector).render())


# Tests --------------------------------------------------------------------------------------


def test_streams_an_answer_with_its_figures_and_sends_the_history(qlw_home):
    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=SIZE) as pilot:
            fake = FakeChat(app, {"base": "Hello **there**, I am the base model.", TUNED: "Tuned answer."})
            pane = await open_chat(pilot, fake)
            assert [o for o in pane.query_one("#chat-target", Select)._options][-1][1] == TUNED
            assert all(b.id and b.tooltip for b in ChatPane.BINDINGS)

            # Load (f5): the job's result on the status line.
            await pilot.press("f5")
            await until(pilot, lambda: pane.status_text.startswith("✔ loaded"), "the load")
            assert fake.of("chat.load") == [{"target": "base"}]
            assert pane.status_text == "✔ loaded base in 1.25 s · fast path off: cpu"
            fake.load_note = "loaded like the base (4-bit nf4): in bf16 it needs 13.5 GiB"
            await pilot.press("f5")
            await until(pilot, lambda: pane.status_text.endswith("13.5 GiB"), "the load's note")
            assert pane.status_text == f"✔ loaded base in 1.25 s · fast path off: cpu · {fake.load_note}"

            await type_and_send(pilot, pane, "Who are you?")
            await until(pilot, lambda: pane.turns and pane.turns[0].views[0].answer is not None, "the answer")
            view = pane.turns[0].views[0]
            await until(pilot, lambda: markdown_text(view) == "Hello **there**, I am the base model.", "the text")
            assert view.stats_text == "20 tokens · first token 0.12 s · 40.0 tokens/s · 0.62 s · plain path"
            sent = fake.of("chat.send")[0]
            assert sent["messages"] == [{"role": "user", "content": "Who are you?"}]
            assert sent["settings"] == {"max_new_tokens": 256, "temperature": 0.7, "top_p": 0.9, "top_k": 50,
                                        "repetition_penalty": 1.0, "do_sample": True, "seed": 0,
                                        "system_prompt": "", "template": "auto"}
            assert sent["compare_with"] == "" and sent["conversation"] == ""
            assert pane.conversation == "c1" and pane.query_one("#chat-input", Input).value == ""
            await until(pilot, lambda: not pane.gen_job, "the job's end")

            # The second message carries the whole conversation, and the conversation id.
            await type_and_send(pilot, pane, "And then?")
            await until(pilot, lambda: len(pane.turns) == 2 and pane.turns[1].views[0].answer, "the second answer")
            sent = fake.of("chat.send")[1]
            assert sent["messages"] == [{"role": "user", "content": "Who are you?"},
                                        {"role": "assistant", "content": "Hello **there**, I am the base model."},
                                        {"role": "user", "content": "And then?"}]
            assert sent["conversation"] == "c1"

            # Clear: a new conversation, an empty view, no history.
            await until(pilot, lambda: not pane.gen_job, "the job's end")
            await pilot.press("ctrl+l")
            await until(pilot, lambda: not pane.turns, "the cleared view")
            assert pane.conversation == fake.conversation != "c1" and pane.history() == []
        await app.backend.stop()

    asyncio.run(body())


def test_settings_are_checked_and_stop_cancels_the_answer(qlw_home):
    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=SIZE) as pilot:
            fake = FakeChat(app, {"base": "a long answer that goes on"}, hold=True)
            pane = await open_chat(pilot, fake)
            await pilot.press("f2")
            assert not pane.query_one(Collapsible).collapsed
            form = pane.settings_form
            form.query_one("#chat-temperature", Input).value = "hot"
            form.query_one("#chat-top-p", Input).value = "1.5"
            form.query_one("#chat-max-new-tokens", Input).value = "32"
            await pilot.pause()
            assert form.query_one("#chat-temperature", Input).has_class("-invalid")
            assert "temperature: hot is not a number" in text_of(pane, "#chat-settings-errors")
            assert "top_p: 1.5 must be > 0 and ≤ 1" in text_of(pane, "#chat-settings-errors")
            await type_and_send(pilot, pane, "hi")
            await pilot.pause()
            assert fake.of("chat.send") == [] and pane.status_text.startswith("✖ fix the settings first")
            form.query_one("#chat-temperature", Input).value = "0"
            form.query_one("#chat-top-p", Input).value = "1"
            await pilot.pause()
            await type_and_send(pilot, pane, "hi")
            await until(pilot, lambda: pane.turns and pane.turns[0].views[0].text, "the first deltas")
            sent = fake.of("chat.send")[0]["settings"]
            assert (sent["temperature"], sent["top_p"], sent["max_new_tokens"]) == (0.0, 1.0, 32)
            # Stop is in the footer while the answer is written; escape sends job.cancel.
            assert "stop" in {b.binding.action for b in app.screen.active_bindings.values() if b.enabled}
            pane.query_one("#chat-input", Input).focus()
            await pilot.press("escape")
            await until(pilot, lambda: fake.of("job.cancel"), "the cancel")
            job = pane.gen_job
            assert fake.of("job.cancel") == [{"job_id": job}]
            view = pane.turns[0].views[0]
            fake.stop_held(job, view.answer_id, "base", "a long")
            await until(pilot, lambda: not pane.gen_job and view.answer is not None, "the stopped answer")
            assert view.has_class("-stopped") and view.stats_text.endswith("■ stopped")
            await until(pilot, lambda: markdown_text(view) == "a long", "the text as stopped")
        await app.backend.stop()

    asyncio.run(body())


def test_compare_mode_shows_both_answers_side_by_side(qlw_home):
    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=SIZE) as pilot:
            fake = FakeChat(app, {"base": "Base says hello.", TUNED: "Tuned says hello."})
            pane = await open_chat(pilot, fake)
            pane.query_one("#chat-target", Select).value = TUNED
            await pilot.pause()
            await pilot.press("f3")  # compare with base
            assert pane.compare_with == "base"
            await type_and_send(pilot, pane, "Say hello")
            await until(pilot, lambda: pane.turns and all(v.answer for v in pane.turns[0].views), "both answers")
            assert fake.of("chat.send")[0]["compare_with"] == "base"
            turn = pane.turns[0]
            left, right = turn.views
            assert (left.target, right.target) == (TUNED, "base") and turn.has_class("-compare")
            await until(pilot, lambda: markdown_text(left) == "Tuned says hello." and
                        markdown_text(right) == "Base says hello.", "the texts")
            await pilot.pause()
            assert left.region.y == right.region.y and left.region.right <= right.region.x  # side by side
            assert left.stats_text.endswith("fast path") and right.stats_text.endswith("plain path")
            # The history follows the first column.
            assert pane.history()[-1] == {"role": "assistant", "content": "Tuned says hello."}
        await app.backend.stop()

    asyncio.run(body())


def test_refusal_is_shown_plainly_and_export(qlw_home, tmp_path):
    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=SIZE) as pilot:
            fake = FakeChat(app)
            pane = await open_chat(pilot, fake)
            fake.refuse["chat.send"] = "a train.start job holds the GPU: chat after it ends or stop it"
            await type_and_send(pilot, pane, "hello?")
            await until(pilot, lambda: pane.status_text.startswith("✖"), "the refusal")
            assert pane.status_text == "✖ not sent: a train.start job holds the GPU: chat after it ends or stop it"
            assert pane.query_one("#chat-status").has_class("-error") and not pane.turns
            assert pane.query_one("#chat-input", Input).value == "hello?"  # kept to send again
            assert not pane.generating

            await pilot.press("ctrl+s")
            await until(pilot, lambda: isinstance(app.screen, ExportScreen), "the export prompt")
            path = tmp_path / "talk.md"
            app.screen.query_one("#export-path", Input).value = str(path)
            app.screen.query_one("#export-format", Select).value = "jsonl"
            await pilot.pause()
            assert app.screen.query_one("#export-path", Input).value == str(tmp_path / "talk.jsonl")
            fake.existing.add(str(tmp_path / "talk.jsonl"))
            await pilot.press("enter")
            # The file exists: the backend refuses with code confirm, the pane asks, y replaces it.
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirm")
            await pilot.press("y")
            await until(pilot, lambda: len(fake.of("chat.export")) == 2, "the export")
            assert fake.of("chat.export") == [{"path": str(tmp_path / "talk.jsonl"), "format": "jsonl",
                                               "conversation": "", "overwrite": overwrite}
                                              for overwrite in (False, True)]
            await until(pilot, lambda: pane.status_text.startswith("✔ wrote 3 answer(s)"), "the export's line")
        await app.backend.stop()

    asyncio.run(body())


def test_a_reattached_pane_redraws_the_conversation(qlw_home):
    """The session's stored events (no deltas: they are not stored) draw the same turns, a
    compare's two answers side by side."""

    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=SIZE) as pilot:
            pane = await open_chat(pilot)
            seq = itertools.count(1)
            events = []

            def add(kind_, /, **payload):
                events.append(event("s1", next(seq), kind_, payload))

            def answer(aid, target, prompt, text, job):
                add("chat.started", answer_id=aid, conversation="c9", target=target, prompt_tokens=5,
                    settings={}, time=T0)
                add("chat.answer", answer_id=aid, conversation="c9", target=target, prompt=prompt, text=text,
                    tokens=4, ttft_s=0.5, tokens_per_s=8.0, elapsed_s=1.0, stopped=False, finish_reason="eos",
                    path="plain")

            add("job.started", job_id="j1", kind="chat.send", params={})
            answer("a1", "base", "first question", "first answer", "j1")
            add("job.finished", job_id="j1", kind="chat.send", status="done", elapsed_s=1.0)
            add("job.started", job_id="j2", kind="chat.send", params={})
            answer("a2", TUNED, "compare this", "tuned view", "j2")
            answer("a3", "base", "compare this", "base view", "j2")
            add("job.finished", job_id="j2", kind="chat.send", status="done", elapsed_s=2.0)
            for ev in events:
                app.post_message(BackendEvent(ev))
            await until(pilot, lambda: len(pane.turns) == 2 and len(pane.turns[1].views) == 2, "the redraw")
            await until(pilot, lambda: markdown_text(pane.turns[1].views[1]) == "base view", "the texts")
            assert [t.prompt for t in pane.turns] == ["first question", "compare this"]
            assert markdown_text(pane.turns[0].views[0]) == "first answer"
            assert pane.conversation == "c9" and not pane.gen_job
            # The lists show the pair the conversation used last, a compare of tuned with base,
            # once chat.targets offers them (here after the replay).
            assert pane.targets == []
            pane.show_targets(TARGETS)
            assert (pane.target, pane.compare_with) == (TUNED, "base")
            assert pane.history() == [{"role": "user", "content": "first question"},
                                      {"role": "assistant", "content": "first answer"},
                                      {"role": "user", "content": "compare this"},
                                      {"role": "assistant", "content": "tuned view"}]
        await app.backend.stop()

    asyncio.run(body())


def test_evaluation_table_and_export(qlw_home, tmp_path):
    async def body():
        app = make_app(qlw_home)
        async with app.run_test(size=SIZE) as pilot:
            fake = FakeChat(app)
            pane = await open_chat(pilot, fake)
            await pilot.press("f6")
            assert pane.view == "eval-view" and not pane.query_one("#chat-input").display
            ev = pane.query_one(EvalView)
            # Base and the newest adapter are ticked by default (issue 15: only base was).
            await until(pilot, lambda: ev.selected == ["base", TUNED], "the default targets")
            await pilot.press("f5")
            await until(pilot, lambda: ev.table.row_count == 2, "two rows")
            assert fake.of("eval.run") == [{"targets": ["base", TUNED], "prompts": [], "runs": 3,
                                            "max_new_tokens": 64, "text_path": ""}]
            row = [str(c) for c in ev.table.get_row_at(0)]
            assert row == ["base", "1.91 MiB", "0.50", "1.25±0.05", "51.2", "3 MiB", "12.35"]
            await until(pilot, lambda: "✔ evaluated 2 target(s)" in str(ev.query_one("#eval-status").render()), "done")
            ev.table.focus()  # the highlighted row's note
            await until(pilot, lambda: "on cpu, 3 runs, perplexity over 400 tokens" in
                        str(ev.query_one("#eval-status").render()), "the row's note")
            # A perplexity of "—" says why at once.
            ev.add_row({"target": "merged:/m", "label": "merged m", "perplexity": None,
                        "note": "loaded in bf16; perplexity on no text to score: give a text file or evaluate an adapter"})
            await pilot.pause()
            assert str(ev.query_one("#eval-status").render()) == (
                "perplexity — for merged m: no text to score: give a text file or evaluate an adapter")
            await pilot.press("ctrl+s")
            await until(pilot, lambda: isinstance(app.screen, ExportScreen), "the export prompt")
            app.screen.query_one("#export-path", Input).value = str(tmp_path / "eval.md")
            app.screen.query_one("#export-format", Select).value = "csv"
            await pilot.pause()
            await pilot.press("enter")
            await until(pilot, lambda: fake.of("eval.export"), "the export")
            assert fake.of("eval.export") == [{"path": str(tmp_path / "eval.csv"), "format": "csv", "overwrite": False}]
            await pilot.press("f6")
            assert pane.view == "chat-view"
        await app.backend.stop()

    asyncio.run(body())


def test_formatting():
    assert answer_stats({"tokens": 5, "ttft_s": None, "tokens_per_s": 2.5, "path": "fast",
                         "finish_reason": "length"}) == "5 tokens · first token — · 2.5 tokens/s · fast path · max_new_tokens reached"
    assert short_target("tuned:/h/runs/ab12/checkpoints/checkpoint-4") == "tuned ab12/checkpoint-4"
    assert short_target("tuned:/h/runs/20261123-142436-b14576/adapter") == "tuned b14576/adapter"
    assert short_target("merged:/h/merged/b14576-adapter-merged") == "merged b14576-adapter-merged"
    assert [target_label(t) for t in TARGETS["targets"]] == ["base · tiny-llama ●", "tuned s1/adapter · step 30"]
    assert target_label({"id": "base", "kind": "base", "base_source": "/h/models/tiny-llama/"}) == "base · tiny-llama"
    assert eval_cells({"target": "base", "perplexity": float("nan")})[-1] == "—"


def test_runs_are_listed_by_their_name():
    """Issue 15: Chat, Eval and Merge called runs ``159391/adapter``; the resume list said
    ``resume 20261207 step 4`` for every run of a day. A named run goes by its name."""
    from tui.widgets.lora.lora_pane import checkpoint_label
    from tui.widgets.merge.merge_format import adapter_name

    tuned = {"id": "tuned:/h/runs/20261207-101010-159391/adapter", "kind": "tuned", "step": 24, "name": "tui-run1"}
    assert target_label(tuned) == "tuned tui-run1/adapter · step 24"
    ckpt = {**tuned, "id": "tuned:/h/runs/20261207-101010-159391/checkpoints/checkpoint-12", "step": 12}
    assert target_label(ckpt) == "tuned tui-run1/checkpoint-12"
    assert target_label({**tuned, "name": ""}) == "tuned 159391/adapter · step 24"  # no name: the session's id
    adapter = {"session": "20261207-101010-159391", "name": "tui-run1", "kind": "adapter", "path": "/h/runs/x/adapter"}
    assert adapter_name(adapter) == "tui-run1 adapter"
    assert adapter_name({**adapter, "name": "", "kind": "checkpoint",
                         "path": "/h/runs/x/checkpoints/checkpoint-4"}) == "159391 checkpoint-4"
    import time

    created = time.mktime((2026, 12, 7, 14, 2, 0, 0, 0, -1))
    two = [checkpoint_label({"session": f"20261207-1{i}0000-abc12{i}", "name": f"run{i}", "step": 4, "loss": 1.5,
                             "created": created + 60 * i}) for i in (1, 2)]
    assert two[0] == "resume run1 · step 4 · loss 1.5000 · 12-07 14:03"
    assert two[0] != two[1]
    assert checkpoint_label({"session": "20261207-101010-159391", "step": 4}) == "resume 159391 · step 4"



def test_chat_pane_snapshot(snap_compare, qlw_home):
    """Compare mode at 80x24 after both answers (fake backend: fixed texts and figures, no clock)."""

    async def settle(pilot):
        app = pilot.app
        app.animation_level = "none"
        fake = FakeChat(app, {"base": "Hello! I am a small language model.",
                              TUNED: "Hi there. I was **fine-tuned** on the sample:\n\n- short answers\n- polite"})
        pane = await open_chat(pilot, fake)
        pane.query_one("#chat-target", Select).value = TUNED
        await pilot.pause()
        await pilot.press("f3")
        await type_and_send(pilot, pane, "Who are you?")
        await until(pilot, lambda: pane.turns and all(v.answer for v in pane.turns[0].views) and not pane.gen_job,
                    "both answers")
        await until(pilot, lambda: all(markdown_text(v) == v.text for v in pane.turns[0].views), "the texts")
        field = pane.query_one("#chat-input", Input)
        field.cursor_blink = False  # a blinking cursor is drawn or not, by the clock
        field.focus()
        await pilot.pause(0.2)
        app.clear_notifications()  # other tabs' notices (the Sessions tab has no backend to list)
        await pilot.pause()

    assert snap_compare(make_app(qlw_home), terminal_size=SIZE, run_before=settle)


# With a real backend ------------------------------------------------------------------------

def test_real_backend_compare_mode_shows_both_answers(backend_with_tiny):
    """A 3-step adapter of the tiny model; the pane compares it with the base: both answers
    streamed side by side, each with its figures."""
    skip_unless_backend_has(backend_with_tiny, "chat.targets")

    async def body():
        async with tab_after_tiny_training(backend_with_tiny, "chat", SIZE) as (pilot, adapter):
            app = pilot.app
            pane = app.screen.query_one(ChatPane)
            tuned = lambda: [t["id"] for t in pane.targets if t.get("kind") == "tuned"]  # noqa: E731
            await until(pilot, lambda: tuned(), "the adapter among the targets", timeout=20)
            target = next((t for t in tuned() if t.endswith(adapter)), tuned()[0])
            pane.query_one("#chat-target", Select).value = target
            pane.query_one("#chat-compare", Select).value = "base"
            pane.settings_form.set_value("max_new_tokens", 12)
            pane.settings_form.set_value("do_sample", False)
            await pilot.pause()
            await type_and_send(pilot, pane, "Hello, who are you?")
            try:
                await until(pilot, lambda: pane.turns and len(pane.turns[0].views) == 2
                            and all(v.done for v in pane.turns[0].views), "both answers", timeout=120)
            except AssertionError:
                log = (backend_with_tiny / "backend-test.log").read_text()[-2000:]
                raise AssertionError(f"status: {pane.status_text}; backend log:\n{log}") from None
            left, right = pane.turns[0].views
            assert (left.target, right.target) == (target, "base")
            for view in (left, right):
                assert view.answer is not None, view.stats_text
                assert view.answer["tokens"] > 0 and view.answer["path"] in ("fast", "plain")
                assert view.stats_text.startswith(f"{view.answer['tokens']} tokens · first token ")
            await pilot.pause()
            assert left.region.y == right.region.y and left.region.right <= right.region.x
            await until(pilot, lambda: not pane.gen_job, "the job's end", timeout=20)
            texts = [left.text, right.text]
            # The transcript, by a relative name: under the data home's exports/.
            pane.query_one("#chat-input", Input).focus()
            await pilot.press("ctrl+s")
            await until(pilot, lambda: isinstance(app.screen, ExportScreen), "the export prompt")
            app.screen.query_one("#export-path", Input).value = "talk.md"
            await pilot.press("enter")
            await until(pilot, lambda: pane.status_text.startswith("✔ wrote"), f"the export ({pane.status_text})")
            assert "Hello, who are you?" in (backend_with_tiny / "exports" / "talk.md").read_text()
            # The evaluation of the base: one row with its figures.
            await pilot.press("f6")
            ev = pane.eval_view
            ev.query_one("#eval-runs", Input).value = "1"
            ev.query_one("#eval-max-new-tokens", Input).value = "4"
            await pilot.press("f5")
            await until(pilot, lambda: not pane.eval_job and ev.rows and "✔ evaluated" in
                        str(ev.query_one("#eval-status").render()), "the evaluation", timeout=60)
            cells = [str(c) for c in ev.table.get_row_at(0)]
            assert cells[0] == "base" and all(c != "—" for c in cells[1:5]), cells
        await app.backend.stop()

        # Another terminal attaching later redraws the conversation from the session's events
        # (the app's replay: its client attaches once the panes have subscribed).
        again = make_app(backend_with_tiny)
        seen: list = []

        def hook(message):
            if isinstance(message, BackendEvent) and message.event.kind.startswith("chat."):
                seen.append((message.event.kind, message.event.seq))

        async with again.run_test(size=SIZE, message_hook=hook) as pilot:
            await until(pilot, lambda: again.connection.state == "connected", "connected again", timeout=20)
            again.screen.action_show_tab("chat")
            pane = again.screen.query_one(ChatPane)
            try:
                await until(pilot, lambda: pane.turns and len(pane.turns[0].views) == 2
                            and all(v.answer is not None for v in pane.turns[0].views), "the redrawn turn")
            except AssertionError:
                raise AssertionError(f"chat events the app got: {seen}; turns: {pane.turns}") from None
            assert pane.turns[0].prompt == "Hello, who are you?"
            assert [v.text for v in pane.turns[0].views] == texts
            assert [v.target for v in pane.turns[0].views] == [target, "base"]
            await until(pilot, lambda: (pane.target, pane.compare_with) == (target, "base"), "the compare chosen again")
        await again.backend.stop()

    asyncio.run(asyncio.wait_for(body(), 240))
