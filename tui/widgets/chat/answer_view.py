"""AnswerView: one model's answer in the conversation, streamed into a Markdown widget.

``chat.delta`` text goes through ``Markdown.get_stream``, which batches what arrives faster than
the screen draws; ``chat.answer`` then sets the whole text (a view that missed deltas, after a
re-attach, is right again) and the figures line: tokens, time to first token, tokens/s, path.
"""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownStream

from tui.widgets.chat.chat_format import answer_stats, short_target


class AnswerView(Vertical):
    """The answer ``answer_id`` of ``target``."""

    def __init__(self, answer_id: str, target: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.answer_id = answer_id
        self.target = target
        #: The text so far (deltas appended; the final text at ``chat.answer``).
        self.text = ""
        #: ``chat.answer``'s payload once it came, ``chat.started``'s before.
        self.answer: dict[str, Any] | None = None
        self.started: dict[str, Any] | None = None
        self.error = ""
        self._stream: MarkdownStream | None = None
        self._stats_text = "▶ waiting for the first token …"
        self._composed = False

    def compose(self) -> ComposeResult:
        self._composed = True
        yield Static(short_target(self.target), classes="answer-title", markup=False)
        yield Markdown("", classes="answer-body")
        yield Static(self._stats_text, classes="answer-stats", markup=False)

    @property
    def done(self) -> bool:
        return self.answer is not None or bool(self.error)

    @property
    def body(self) -> Markdown:
        return self.query_one(".answer-body", Markdown)

    def set_target(self, target: str) -> None:
        self.target = target
        if self._composed:
            self.query_one(".answer-title", Static).update(short_target(target))

    def on_started(self, p: dict[str, Any]) -> None:
        self.started = dict(p)
        self.set_target(str(p.get("target") or self.target))
        if not self.done:
            tokens = p.get("prompt_tokens")
            self._stats(f"▶ generating … (prompt {tokens} tokens)" if isinstance(tokens, int) else "▶ generating …")

    def add_delta(self, text: str) -> None:
        """New text (a coalesced ``chat.delta``): appended through the Markdown stream."""
        if self.done or not text:
            return
        self.text += text
        self.call_later(self._write, text)

    async def _write(self, text: str) -> None:
        if self.answer is not None:
            return
        if self._stream is None:
            self._stream = Markdown.get_stream(self.body)
        await self._stream.write(text)

    def on_answer(self, p: dict[str, Any]) -> None:
        """The finished answer: its whole text and its figures."""
        self.answer = dict(p)
        self.set_target(str(p.get("target") or self.target))
        self.text = str(p.get("text") or "")
        self.call_later(self._finish, self.text)
        self._stats(answer_stats(p))
        self.set_class(bool(p.get("stopped")) or p.get("finish_reason") == "stopped", "-stopped")

    async def _finish(self, text: str) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        if not self.is_attached:
            return  # cleared away meanwhile
        bodies = self.query(".answer-body").results(Markdown)
        body = next(bodies, None)
        if body is None:  # the answer came (e.g. in a replay) before the view's children mounted
            self.call_after_refresh(self._finish, text)
            return
        await body.update(text or "*(no text)*")

    def on_failed(self, message: str) -> None:
        """The job ended without this answer (cancelled before it began, or failed)."""
        if self.done:
            return
        self.error = message
        self._stats(message)
        self.add_class("-failed")

    def _stats(self, text: str) -> None:
        self._stats_text = text
        if self._composed:
            self.query_one(".answer-stats", Static).update(text)

    @property
    def stats_text(self) -> str:
        return self._stats_text
