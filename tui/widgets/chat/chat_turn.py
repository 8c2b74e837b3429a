"""ChatTurn: one user message and its answer, or, in compare mode, two answers side by side."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Static

from tui.widgets.chat.answer_view import AnswerView


class ChatTurn(Vertical):
    """The user's ``prompt`` and one :class:`AnswerView` per ``(answer_id, target)``."""

    def __init__(self, prompt: str, answers: list[tuple[str, str]], job_id: str = "", mine: bool = True,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.prompt = prompt
        self.job_id = job_id
        #: Sent from this pane (its answer ids came in the reply), or drawn from events only.
        self.mine = mine
        #: The answers, in column order (created now, so events can reach them before the mount).
        self.views = [AnswerView(answer_id, target) for answer_id, target in answers]
        self._composed = False
        self.set_class(len(self.views) > 1, "-compare")

    def compose(self) -> ComposeResult:
        self._composed = True
        yield Static(self._prompt_text(), classes="turn-prompt", markup=False)
        with Horizontal(classes="turn-answers"):
            yield from self.views

    def _prompt_text(self) -> str:
        return f"you › {self.prompt}" if self.prompt else "you › …"

    def set_prompt(self, prompt: str) -> None:
        if prompt and not self.prompt:
            self.prompt = prompt
            if self._composed:
                self.query_one(".turn-prompt", Static).update(self._prompt_text())

    def add_answer(self, answer_id: str, target: str) -> AnswerView:
        """Another column (the second answer of a compare this pane did not send)."""
        view = AnswerView(answer_id, target)
        self.views.append(view)
        if self._composed:
            self.query_one(".turn-answers", Horizontal).mount(view)
        self.set_class(len(self.views) > 1, "-compare")
        return view
