"""PreviewView: the exact training text of the highlighted row, tokens in the loss highlighted.

It shows a ``data.preview`` result: what trl will train on (the trl row's form and the loss; for a
preference row, the chosen and the rejected side one after the other),
the text the tokens decode to, split into segments that count in the loss, that do not, and that
``max_length`` cuts off; warnings (truncation, a row trl drops) and errors (a null value, a
missing column) say what is wrong and where.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

FORMS = {"messages": "chat messages", "prompt_completion": "prompt/completion", "text": "plain text"}
#: A preference row's preview shows each side (chosen and rejected, or KTO's completion) in turn.
LOSSES = {"assistant_only": "assistant tokens", "completion_only": "the completion", "all": "every token"}


class PreviewView(VerticalScroll, can_focus=True):
    """The live preview of one row's training example."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        #: The last preview shown (the backend's answer), or None.
        self.preview: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield Static("Open a dataset and highlight a row: its training text appears here.",
                     id="preview-head", markup=False)
        yield Static("", id="preview-text", markup=False)

    def _styles(self) -> dict[str, str]:
        theme = self.app.theme_variables
        return {
            "loss": f"bold {theme.get('success', 'green')} underline",
            "context": "dim",
            "cut": f"strike {theme.get('error', 'red')}",
        }

    def show_preview(self, pv: dict[str, Any]) -> None:
        """Show a ``data.preview`` result."""
        self.preview = pv
        head = Text()
        if pv.get("error"):
            err = pv["error"]
            head.append(f"✖ {err['message']}\n", style=f"bold {self.app.theme_variables.get('error', 'red')}")
            if err.get("where"):
                head.append(f"  where: {err['where']}\n")
            if err.get("hint"):
                head.append(f"  what to do: {err['hint']}\n", style="dim")
            self.query_one("#preview-head", Static).update(head)
            self.query_one("#preview-text", Static).update("")
            return
        styles = self._styles()
        head.append(f"row {pv['index']:,} · {FORMS.get(pv.get('form'), pv.get('form'))} · loss on "
                    f"{LOSSES.get(pv.get('loss'), pv.get('loss'))} · {pv['tokens']:,} tokens, "
                    f"{pv['loss_tokens']:,} in the loss · max_length {pv.get('max_length', 0):,}\n")
        head.append("legend: ", style="dim")
        head.append("in the loss", style=styles["loss"])
        head.append("  ")
        head.append("not in the loss", style=styles["context"])
        head.append("  ")
        head.append("cut by max_length", style=styles["cut"])
        for warning in pv.get("warnings", []):
            head.append(f"\n⚠ {warning}", style=f"bold {self.app.theme_variables.get('warning', 'yellow')}")
        body = Text(overflow="fold")
        sides = pv.get("sides") or {}
        if sides:  # a preference row: each side's training text (prompt, then the answer in the loss)
            for name, side in sides.items():
                label = f" (label {str(pv.get('label')).lower()})" if "label" in pv else ""
                body.append(f"── {name}{label} · {side['tokens']:,} tokens, {side['loss_tokens']:,} in the loss ──\n",
                            style="bold")
                for seg in side["segments"]:
                    body.append(seg["text"], style=styles["cut"] if seg.get("cut") else
                                styles["loss"] if seg.get("loss") else styles["context"])
                body.append("\n\n")
            self.query_one("#preview-head", Static).update(head)
            self.query_one("#preview-text", Static).update(body)
            return
        for seg in pv.get("segments", []):
            if seg.get("cut"):
                style = styles["cut"]
            elif seg.get("loss") and pv.get("loss") != "all":
                style = styles["loss"]
            elif pv.get("loss") == "all":
                style = ""
            else:
                style = styles["context"]
            body.append(seg["text"], style=style)
        self.query_one("#preview-head", Static).update(head)
        self.query_one("#preview-text", Static).update(body)

    def show_message(self, message: str) -> None:
        self.preview = None
        self.query_one("#preview-head", Static).update(Text(message, style="dim"))
        self.query_one("#preview-text", Static).update("")

    @property
    def text(self) -> str:
        """The training text shown (plain)."""
        return str(self.query_one("#preview-text", Static).content)

    @property
    def head(self) -> str:
        return str(self.query_one("#preview-head", Static).content)
