"""ChatPane: the Chat tab: talk to the base model, a session's adapter or checkpoint, or a merged
model, with answers streamed as they are written; compare two targets side by side; evaluate.

Everything comes from the backend (``chat.targets``, ``chat.load``, ``chat.send``, ``chat.clear``,
``chat.export``, ``eval.run``, ``eval.export``) and from its events: ``chat.started`` and
``chat.answer`` are stored with the session, so a terminal that attaches later redraws the same
conversation from them; ``chat.delta`` (live only) streams the text into each answer's Markdown
widget through ``Markdown.get_stream``, never a refresh per token. The whole conversation is sent
with each message (multi-turn); escape stops the answer being written (``job.cancel``).

The targets chosen, the generation settings as typed, whether they are shown, and the view
(conversation or evaluation) are the pane's state ``"chat"``, kept by the backend
(tui/ui_state.py): they come back after a re-attach, and a second terminal shows them.
"""

from __future__ import annotations

from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Checkbox, Collapsible, ContentSwitcher, Input, Select, Static

from backend import protocol as P
from tui.client import CONNECTED, RequestFailed
from tui.messages import ConnectionChanged
from tui.modals.confirm_screen import ConfirmScreen
from tui.modals.export_screen import ExportScreen
from tui.ui_state import UiChange, read_fields, write_fields
from tui.widgets.backend_requests import BackendRequests
from tui.widgets.chat.answer_view import AnswerView
from tui.widgets.chat.backend_call import by_method
from tui.widgets.chat.chat_format import short_target, target_label
from tui.widgets.chat.chat_settings_form import ChatSettingsForm
from tui.widgets.chat.chat_turn import ChatTurn
from tui.widgets.chat.eval_view import EvalView
from tui.widgets.lora.lora_pane import expand_path
from tui.widgets.shell.error_notice import error_text

NO_COMPARE = ""
CHAT_VIEW, EVAL_VIEW = "chat-view", "eval-view"
#: Jobs after which the list of targets may have changed (a new adapter, a model loaded/freed).
TARGET_JOBS = {"chat.load", "train.start", "merge.start", "model.load", "gpu.free", "backend.restart"}
#: The key of this pane's state in the backend (tui/ui_state.py).
STATE_KEY = "chat"


def failure_text(what: str, p: dict[str, Any]) -> str:
    """A failed or cancelled job for people: what failed, where, what to do."""
    if p.get("status") == "cancelled":
        return f"■ {what} stopped"
    return error_text(f"{what} failed: ", p.get("error") or {})


class ChatPane(BackendRequests, Vertical):
    """The Chat tab: the target bar, the settings, the conversation (or the evaluation), the input."""

    BINDINGS = [
        Binding("f5", "load", "Load", id="chat.load",
                tooltip="Load the chosen target (base, adapter, checkpoint or merged folder) on the backend."),
        Binding("f5", "run_eval", "Run eval", id="chat.eval-run",
                tooltip="Evaluate the ticked targets (eval.run): load time, speed, memory, perplexity."),
        Binding("escape", "stop", "Stop", id="chat.stop",
                tooltip="Stop the answer being written (job.cancel); what was written stays."),
        Binding("escape", "leave_message", "Leave message", id="chat.leave-message", show=False,
                tooltip="Leave the message box, so that the number keys switch tabs again."),
        Binding("m", "focus_message", "Message", id="chat.message",
                tooltip="Put the cursor in the message box (esc leaves it)."),
        Binding("f2", "toggle_settings", "Settings", id="chat.settings",
                tooltip="Show or hide the generation settings (max_new_tokens, temperature, top_p, ...)."),
        Binding("f3", "toggle_compare", "Compare", id="chat.compare",
                tooltip="Compare mode: each prompt is answered by the target and a second one, side by side."),
        Binding("f6", "toggle_eval", "Eval", id="chat.evaluate",
                tooltip="Switch between the conversation and the evaluation table."),
        # Clear is listed by ? and the palette: the footer keeps room for q Quit at 80 columns.
        Binding("ctrl+l", "clear", "Clear", id="chat.clear", show=False,
                tooltip="Start a new conversation (chat.clear); the old one stays in the session."),
        Binding("ctrl+s", "export", "Export", id="chat.export",
                tooltip="Write the conversation to a Markdown or JSONL file (chat.export)."),
        Binding("ctrl+s", "export_eval", "Export table", id="chat.eval-export",
                tooltip="Write the evaluation table to a Markdown or CSV file (eval.export)."),
        Binding("f4", "read_targets", "Targets", id="chat.targets", show=False,
                tooltip="Read the list of targets again (adapters, checkpoints, merged folders)."),
    ]

    IDLE = "Pick a target, type below and press enter · f5 loads · f3 compares · f6 evaluates"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.connected = False
        #: ``chat.targets``' reply.
        self.targets: list[dict[str, Any]] = []
        self.base_loaded = False
        self.fast_path = ""
        #: The conversation shown ("" before the backend named one).
        self.conversation = ""
        self.turns: list[ChatTurn] = []
        self.views: dict[str, AnswerView] = {}
        #: The chat.send job writing answers now, the chat.load job, the eval.run job ("" when none).
        self.gen_job = ""
        self.load_job = ""
        self.eval_job = ""
        #: job.finished payloads by job id (the newest few), for jobs that end before their reply.
        self._finished: dict[str, dict[str, Any]] = {}
        #: The newest chat.send job seen (job.started), to put its two answers in one turn.
        self._seen_chat_job = ""
        #: Events for answers not known yet, held while our chat.send waits for its reply.
        self._sending = False
        self._early: list[P.Event] = []
        #: The last line of the status bar, and whether it reports a refusal or failure.
        self.status_text = self.IDLE
        #: (target, compare) of the newest answer this pane did not ask for (a replay after
        #: attaching, or another terminal), to be shown in the two lists once they offer them.
        self._follow: tuple[str, str] | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(id="chat-bar"):
            yield Select([], prompt="target", id="chat-target", compact=True,
                         tooltip="Who answers: the base model, a session's adapter or checkpoint, a merged folder.")
            yield Button("Load", id="chat-load", compact=True, tooltip="Load the target now (f5).")
            yield Select([("no compare", NO_COMPARE)], value=NO_COMPARE, allow_blank=False, id="chat-compare",
                         compact=True, tooltip="Compare with a second target, side by side (f3).")
        yield Static(self.IDLE, id="chat-status", markup=False)
        with Collapsible(title="settings (f2)", collapsed=True, id="chat-settings"):
            yield ChatSettingsForm(id="chat-settings-form")
        with ContentSwitcher(initial=CHAT_VIEW, id="chat-views"):
            with VerticalScroll(id=CHAT_VIEW):
                yield Static("No conversation yet.", id="chat-empty", markup=False)
            yield EvalView(id=EVAL_VIEW)
        yield Input(placeholder="› message · enter sends · esc stops", id="chat-input", compact=True,
                    tooltip="Your message; enter sends it with the conversation so far.")

    def on_mount(self) -> None:
        self.query_one(f"#{CHAT_VIEW}", VerticalScroll).anchor()
        self.app.backend_events.subscribe(self, self.on_backend)  # type: ignore[attr-defined]
        self.app.connection_changed.subscribe(self, self.on_connection)  # type: ignore[attr-defined]
        ui_state = getattr(self.app, "ui_state", None)
        if ui_state is not None:
            ui_state.changed.subscribe(self, self.on_ui_state)
        self.on_connection(self.app.connection)  # type: ignore[attr-defined]

    # The pane's state, kept by the backend (tui/ui_state.py) ----------------------------------------

    def state(self) -> dict[str, Any]:
        """The targets, the settings as typed and the view (the pane's ``"chat"`` state)."""
        target, compare = self._follow if self._follow is not None else (self.target, self.compare_with)
        return {
            "target": target,
            "compare": compare,
            "settings": read_fields(self.settings_form),
            "settings_shown": not self.query_one(Collapsible).collapsed,
            "view": self.view,
        }

    def save_state(self) -> None:
        ui_state = getattr(self.app, "ui_state", None)
        if ui_state is not None and self.is_mounted:
            ui_state.set(STATE_KEY, self.state())

    def on_ui_state(self, change: UiChange) -> None:
        if change.key != STATE_KEY or not isinstance(change.value, dict):
            return
        state = change.value
        with self.prevent(Input.Changed, Select.Changed):
            write_fields(self.settings_form, state.get("settings") or {})
        self.settings_form.settings()  # marks what is wrong, as typing would
        self.query_one(Collapsible).collapsed = not state.get("settings_shown")
        if state.get("view") in (CHAT_VIEW, EVAL_VIEW) and state["view"] != self.view:
            self._show_view(state["view"], focus=False)
        if state.get("target"):
            self._follow_targets(str(state["target"]), str(state.get("compare") or NO_COMPARE))

    @on(Select.Changed, "#chat-target, #chat-compare, #chat-template")
    @on(Input.Changed, "#chat-settings-form Input")
    @on(Checkbox.Changed, "#chat-do-sample")
    @on(Collapsible.Expanded)
    @on(Collapsible.Collapsed)
    def _chosen(self, event) -> None:
        if isinstance(event, Select.Changed) and event.select.id in ("chat-target", "chat-compare"):
            self._follow = None  # the user's choice now
        self.save_state()

    # Parts ----------------------------------------------------------------------------------------

    @property
    def settings_form(self) -> ChatSettingsForm:
        return self.query_one(ChatSettingsForm)

    @property
    def eval_view(self) -> EvalView:
        return self.query_one(EvalView)

    @property
    def view(self) -> str:
        return self.query_one(ContentSwitcher).current or CHAT_VIEW

    @property
    def target(self) -> str:
        value = self.query_one("#chat-target", Select).value
        return value if isinstance(value, str) else ""

    @property
    def compare_with(self) -> str:
        value = self.query_one("#chat-compare", Select).value
        return value if isinstance(value, str) else NO_COMPARE

    @property
    def generating(self) -> bool:
        return bool(self.gen_job) or self._sending

    def history(self) -> list[dict[str, str]]:
        """The conversation so far as chat.send's messages: each prompt and its (first) answer."""
        messages: list[dict[str, str]] = []
        for turn in self.turns:
            if not turn.prompt:
                continue
            messages.append({"role": "user", "content": turn.prompt})
            first = turn.views[0] if turn.views else None
            if first is not None and first.answer is not None and first.text:
                messages.append({"role": "assistant", "content": first.text})
        return messages

    def status(self, text: str, kind: str = "") -> None:
        """The line under the bar; ``kind``: "" / "busy" / "ok" / "error"."""
        self.status_text = text
        line = self.query_one("#chat-status", Static)
        line.update(text)
        for cls in ("busy", "ok", "error"):
            line.set_class(cls == kind, f"-{cls}")

    # The backend ------------------------------------------------------------------------------------

    def on_connection(self, change: ConnectionChanged) -> None:
        self.connected = change.state == CONNECTED
        if self.connected:
            self.read_targets()
        self.refresh_bindings()

    @work(name="list the chat targets", group="chat.targets", exclusive=True, exit_on_error=False)
    async def read_targets(self) -> None:
        try:
            result = await self.call(by_method("chat.targets"))
        except RequestFailed as exc:
            self.status(f"✖ no chat targets: {exc.reply.reason or exc.reply.code}", "error")
            return
        self.show_targets(result)

    def action_read_targets(self) -> None:
        self.read_targets()

    def show_targets(self, result: dict[str, Any]) -> None:
        """Offer ``chat.targets``' targets (the chosen ones stay chosen; base by default)."""
        self.targets = [t for t in result.get("targets") or [] if t.get("id")]
        self.base_loaded = bool(result.get("base_loaded"))
        self.fast_path = str(result.get("fast_path") or "")
        options = [(target_label(t), str(t["id"])) for t in self.targets]
        ids = {v for _, v in options}
        target, compare = self.query_one("#chat-target", Select), self.query_one("#chat-compare", Select)
        keep_target, keep_compare = self.target, self.compare_with
        with self.prevent(Select.Changed):
            target.set_options(options)
            if keep_target in ids:
                target.value = keep_target
            elif "base" in ids:
                target.value = "base"
            compare.set_options([("no compare", NO_COMPARE), *options])
            compare.value = keep_compare if keep_compare in ids else NO_COMPARE
        self._apply_follow()
        self.eval_view.set_targets(self.targets)
        self.refresh_bindings()

    def _follow_targets(self, target: str, compare: str) -> None:
        """Show ``target`` and ``compare`` in the lists: what the conversation on screen used
        last, so that a terminal attached later goes on with the same pair (now, or once
        ``chat.targets`` offers them)."""
        self._follow = (target, compare)
        self._apply_follow()

    def _apply_follow(self) -> None:
        if self._follow is None:
            return
        target, compare = self._follow
        ids = {str(t["id"]) for t in self.targets}
        if target not in ids:
            return  # the list comes later (chat.targets), or the target is gone: keep the choice
        with self.prevent(Select.Changed):
            self.query_one("#chat-target", Select).value = target
            self.query_one("#chat-compare", Select).value = compare if compare in ids and compare != target else NO_COMPARE
        self._follow = None
        self.refresh_bindings()

    def on_backend(self, ev: P.Event) -> None:
        p, kind = ev.payload, ev.kind
        if kind in ("chat.started", "chat.delta", "chat.answer"):
            if p.get("answer_id") not in self.views and self._sending:
                self._early.append(ev)  # ours, probably: its reply (with the ids) is on the way
                return
            self._on_chat(ev)
        elif kind == "eval.row":
            self.eval_view.add_row(p)
        elif kind == "job.started":
            if p.get("kind") == "chat.send":
                self._seen_chat_job = p.get("job_id", "")
                if not self.gen_job:
                    self.gen_job = self._seen_chat_job
                    self.refresh_bindings()
        elif kind == "job.finished":
            # A job that fails at once can end before the reply that started it comes back.
            self._finished[str(p.get("job_id", ""))] = p
            while len(self._finished) > 32:
                self._finished.pop(next(iter(self._finished)))
            self._on_job_finished(p)

    def _on_chat(self, ev: P.Event) -> None:
        p, kind = ev.payload, ev.kind
        answer_id = str(p.get("answer_id", ""))
        view = self.views.get(answer_id)
        if kind == "chat.delta":
            if view is not None:
                view.add_delta(str(p.get("text") or ""))
            return
        if view is None:
            view = self._foreign_answer(p)
        if kind == "chat.started":
            view.on_started(p)
            users = [m for m in p.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
            if users:
                for turn in self.turns:
                    if view in turn.views:
                        turn.set_prompt(str(users[-1].get("content") or ""))
        else:
            view.on_answer(p)
            for turn in self.turns:
                if view in turn.views:
                    turn.set_prompt(str(p.get("prompt") or ""))
        if p.get("conversation"):
            self.conversation = str(p["conversation"])

    def _foreign_answer(self, p: dict[str, Any]) -> AnswerView:
        """An answer this pane did not ask for (a replay after attaching, or another terminal):
        a new turn, or the second column of the compare whose first answer came from the same job."""
        conversation = str(p.get("conversation") or "")
        if conversation and self.conversation and conversation != self.conversation:
            self._clear_turns()  # a new conversation began (a clear, elsewhere or earlier)
        answer_id, target = str(p.get("answer_id", "")), str(p.get("target") or "")
        last = self.turns[-1] if self.turns else None
        job = self._seen_chat_job
        if (last is not None and not last.mine and job and last.job_id == job and len(last.views) == 1
                and last.views[0].target != target):
            view = last.add_answer(answer_id, target)
            self._follow_targets(last.views[0].target, target)
        else:
            turn = self._add_turn(str(p.get("prompt") or ""), [(answer_id, target)], job, mine=False)
            view = turn.views[0]
            self._follow_targets(target, NO_COMPARE)
        self.views[answer_id] = view
        return view

    def _add_turn(self, prompt: str, answers: list[tuple[str, str]], job_id: str, mine: bool) -> ChatTurn:
        turn = ChatTurn(prompt, answers, job_id=job_id, mine=mine)
        self.turns.append(turn)
        for view in turn.views:
            self.views[view.answer_id] = view
        self.query_one("#chat-empty").display = False
        chat = self.query_one(f"#{CHAT_VIEW}", VerticalScroll)
        chat.mount(turn)
        chat.anchor()
        return turn

    def _clear_turns(self) -> None:
        for turn in self.turns:
            turn.remove()
        self.turns.clear()
        self.views.clear()
        self.query_one("#chat-empty").display = True

    def _on_job_finished(self, p: dict[str, Any]) -> None:
        job_id, job_kind = p.get("job_id", ""), p.get("kind", "")
        if job_id and job_id == self.gen_job:
            self.gen_job = ""
            for turn in self.turns:
                if turn.job_id == job_id:
                    for view in turn.views:
                        view.on_failed(failure_text("the answer", p) if p.get("status") != "cancelled"
                                       else "■ stopped before it began")
            if p.get("status") == "failed":
                self.status(failure_text("chat", p), "error")
            elif self.status_text.startswith("▶ generating"):
                self.status("■ stopped" if p.get("status") == "cancelled" else "✔ answered", "ok")
            self.refresh_bindings()
        elif job_id and job_id == self.load_job:
            self.load_job = ""
            if p.get("status") == "done":
                r = p.get("result") or {}
                load_s = r.get("load_s")
                took = f" in {load_s:.2f} s" if isinstance(load_s, (int, float)) else ""
                note = f" · {r['note']}" if r.get("note") else ""  # e.g. how a merged folder was loaded
                self.status(f"✔ loaded {short_target(str(r.get('target') or ''))}{took} · fast path "
                            f"{r.get('fast_path') or 'n/a'}{note}", "ok")
            else:
                self.status(failure_text("loading", p), "error")
        elif job_id and job_id == self.eval_job:
            self.eval_job = ""
            if p.get("status") == "done":
                self.eval_view.status(f"✔ evaluated {len(self.eval_view.rows)} target(s) in "
                                      f"{p.get('elapsed_s', 0):.1f} s · ctrl+s exports the table")
            else:
                self.eval_view.status(failure_text("evaluation", p))
        if job_kind in TARGET_JOBS and self.connected:
            self.read_targets()

    # Sending ----------------------------------------------------------------------------------------

    @on(Input.Submitted, "#chat-input")
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.send(event.value)

    def send(self, text: str) -> bool:
        """Send ``text`` with the conversation so far; False (and why, on the status line) when not."""
        text = text.strip()
        if not text:
            return False
        if self.generating:
            self.status("▶ still answering: wait, or press esc to stop it", "busy")
            return False
        if not self.target:
            self.status("✖ pick a target first (the list at the top left)", "error")
            return False
        settings, errors = self.settings_form.settings()
        if errors:
            self.query_one(Collapsible).collapsed = False
            self.status("✖ fix the settings first: " + " · ".join(f"{k} {v}" for k, v in errors.items()), "error")
            return False
        compare = self.compare_with if self.compare_with != self.target else NO_COMPARE
        self._sending = True
        self.refresh_bindings()
        self._send(text, settings, compare)
        return True

    @work(name="send the message", group="chat.send", exclusive=True, exit_on_error=False)
    async def _send(self, text: str, settings: dict[str, Any], compare: str) -> None:
        target = self.target
        messages = [*self.history(), {"role": "user", "content": text}]
        try:
            result = await self.call(by_method("chat.send", target=target, messages=messages, settings=settings,
                                               compare_with=compare, conversation=self.conversation))
        except RequestFailed as exc:
            self.status(f"✖ not sent: {exc.reply.reason or exc.reply.code}", "error")
            self._sending = False
            self._flush_early()
            self.refresh_bindings()
            return
        except BaseException:
            self._sending = False
            self._flush_early()
            self.refresh_bindings()
            raise
        self.query_one("#chat-input", Input).value = ""
        ids = [str(a) for a in result.get("answer_ids") or []]
        job_id = str(result.get("job_id") or "")
        targets = [target, compare][: len(ids)] if compare else [target]
        answers = list(zip(ids, targets + [compare] * (len(ids) - len(targets))))
        self.gen_job = job_id or self.gen_job
        self._add_turn(text, answers, job_id, mine=True)
        self._sending = False
        self.status(f"▶ generating {' and '.join(short_target(t) for _, t in answers)} · esc stops", "busy")
        self._flush_early()
        self.refresh_bindings()

    def _flush_early(self) -> None:
        early, self._early = self._early, []
        for ev in early:
            self._on_chat(ev)

    # Actions ----------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        in_eval = self.view == EVAL_VIEW
        if action in ("run_eval", "export_eval"):
            return (None if action == "run_eval" and self.eval_job else True) if in_eval else False
        if action in ("load", "export"):
            if in_eval or (action == "load" and self.generating):
                return False  # the footer shows Stop instead
            return True if self.connected and (action == "export" or self.target) else None
        if action == "stop":
            return bool(self.gen_job) and not in_eval  # in the footer while an answer is written
        if action == "leave_message":
            return not self.gen_job and self.app.focused is self.query_one("#chat-input")
        if action == "focus_message":
            return not in_eval
        if action in ("toggle_compare", "clear"):
            return not in_eval
        return True

    @on(Button.Pressed, "#chat-load")
    def _load_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_load()

    @on(Select.Changed, "#chat-target")
    def _target_changed(self, event: Select.Changed) -> None:
        self.refresh_bindings()

    def action_load(self) -> None:
        if not self.target:
            self.status("✖ pick a target first", "error")
            return
        self.load(self.target)

    @work(name="load the chat target", group="chat.load", exclusive=True, exit_on_error=False)
    async def load(self, target: str) -> None:
        self.status(f"▶ loading {short_target(target)} …", "busy")
        try:
            result = await self.call(by_method("chat.load", target=target))
        except RequestFailed as exc:
            self.status(f"✖ not loaded: {exc.reply.reason or exc.reply.code}", "error")
            return
        self.load_job = str(result.get("job_id") or "")
        if self.load_job in self._finished:
            self._on_job_finished(self._finished[self.load_job])

    def action_stop(self) -> None:
        if self.gen_job:
            self.stop()

    @work(name="stop the answer", group="chat.stop", exclusive=True, exit_on_error=False)
    async def stop(self) -> None:
        await self.call(P.CancelJob(job_id=self.gen_job))
        self.status("■ stopping …", "busy")

    def action_focus_message(self) -> None:
        self.query_one("#chat-input", Input).focus()

    def action_leave_message(self) -> None:
        self.query_one("#chat-load", Button).focus()

    def action_toggle_settings(self) -> None:
        box = self.query_one(Collapsible)
        box.collapsed = not box.collapsed
        if not box.collapsed:
            self.settings_form.query_one(Input).focus()
        else:
            self.query_one("#chat-input", Input).focus()

    def action_toggle_compare(self) -> None:
        select = self.query_one("#chat-compare", Select)
        if self.compare_with:
            select.value = NO_COMPARE
            self.status("compare off", "")
            return
        others = [str(t["id"]) for t in self.targets if t["id"] != self.target]
        if not others:
            self.status("✖ nothing to compare with: one target only", "error")
            return
        pick = "base" if "base" in others else others[0]
        select.value = pick
        self.status(f"compare: {short_target(self.target)} | {short_target(pick)} (each prompt, side by side)", "")

    def action_toggle_eval(self) -> None:
        self._show_view(EVAL_VIEW if self.view == CHAT_VIEW else CHAT_VIEW)
        self.save_state()

    def _show_view(self, view: str, focus: bool = True) -> None:
        switcher = self.query_one(ContentSwitcher)
        switcher.current = view
        in_eval = view == EVAL_VIEW
        self.query_one("#chat-input").display = not in_eval
        if focus:
            if in_eval:
                self.query_one("#eval-targets").focus()
            else:
                self.query_one("#chat-input", Input).focus()
        self.refresh_bindings()

    def action_clear(self) -> None:
        self.clear_conversation()

    @work(name="start a new conversation", group="chat.clear", exclusive=True, exit_on_error=False)
    async def clear_conversation(self) -> None:
        result = await self.call(by_method("chat.clear", conversation=self.conversation))
        self._clear_turns()
        self.conversation = str(result.get("conversation") or "")
        self.status("new conversation", "ok")

    def _ask_export(self, title: str, suffixes: dict[str, str], default: str, then) -> None:
        """Ask for a path and a format (``suffixes``: format -> file suffix), then ``then(path, format)``."""
        self.app.push_screen(ExportScreen(title, tuple(suffixes), default, suffixes),
                             lambda answer: then(*answer) if answer else None)

    def action_export(self) -> None:
        self._ask_export("Export the conversation", {"markdown": ".md", "jsonl": ".jsonl"}, "qlw-chat.md",
                         self.export)

    @work(name="export the conversation", group="chat.export", exclusive=True, exit_on_error=False)
    async def export(self, path: str, fmt: str, overwrite: bool = False) -> None:
        params = by_method("chat.export", path=path, format=fmt, conversation=self.conversation, overwrite=overwrite)
        result = await self._write_file(params, lambda yes: self.export(path, fmt, True) if yes else None)
        if result is not None:
            self.status(f"✔ wrote {result.get('answers', 0)} answer(s) to {result.get('path') or path}", "ok")

    async def _write_file(self, params: Any, again) -> dict[str, Any] | None:
        """Send an export; an existing file is refused with code ``confirm``: ask, and ``again(yes)``."""
        try:
            return await self.call(params)
        except RequestFailed as exc:
            if exc.reply.code != "confirm" or getattr(params, "overwrite", True):
                raise
            self.app.push_screen(ConfirmScreen("Replace the file?", exc.reply.reason, yes="Replace", no="Keep it"),
                                 again)
            return None

    def action_run_eval(self) -> None:
        params, error = self.eval_view.options()
        if error:
            self.eval_view.status(f"✖ {error}")
            return
        self.run_eval(params)

    @on(Button.Pressed, "#eval-run")
    def _eval_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_run_eval()

    @work(name="run the evaluation", group="eval.run", exclusive=True, exit_on_error=False)
    async def run_eval(self, params: dict[str, Any]) -> None:
        if "text_path" in params and params["text_path"]:
            params = {**params, "text_path": expand_path(params["text_path"])}
        self.eval_view.clear_rows()  # before the request: its rows may come before its reply
        try:
            result = await self.call(by_method("eval.run", prompts=[], **params))
        except RequestFailed as exc:
            self.eval_view.status(f"✖ not started: {exc.reply.reason or exc.reply.code}")
            return
        self.eval_job = str(result.get("job_id") or "")
        self.eval_view.status(f"▶ evaluating {len(params['targets'])} target(s) …")
        self.refresh_bindings()
        if self.eval_job in self._finished:  # it ended before this reply came
            self._on_job_finished(self._finished[self.eval_job])

    def action_export_eval(self) -> None:
        self._ask_export("Export the evaluation table", {"markdown": ".md", "csv": ".csv"}, "qlw-eval.md",
                         self.export_eval)

    @work(name="export the evaluation table", group="eval.export", exclusive=True, exit_on_error=False)
    async def export_eval(self, path: str, fmt: str, overwrite: bool = False) -> None:
        params = by_method("eval.export", path=path, format=fmt, overwrite=overwrite)
        result = await self._write_file(params, lambda yes: self.export_eval(path, fmt, True) if yes else None)
        if result is not None:
            self.eval_view.status(f"✔ wrote {result.get('path') or path}")
