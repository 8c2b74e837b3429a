"""FreeMemoryResultScreen: what a ``gpu.free`` job gave back, what is still held and why, and
the offer to restart the backend (the only way to release a CUDA context)."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from backend import protocol as P
from tui.widgets.backend_requests import BackendRequests
from tui.widgets.gpu.gpu_format import mib

NOTHING_DROPPED = "nothing: no model, adapter, trainer, optimizer or cache was loaded"
NO_CUDA = ("No CUDA memory in use: the backend has not started CUDA, "
           "so there was no GPU memory to give back.")


def describe_dropped(dropped: list[dict[str, Any]]) -> str:
    """What was dropped, in people's words: each holding's note (``dataset dolly_sample.jsonl
    (585 rows, memory-mapped)``) with its kind, never the backend's internal key."""
    if not dropped:
        return NOTHING_DROPPED
    parts = []
    for d in dropped:
        kind = d.get("kind") or "object"
        note = str(d.get("note") or "").strip()
        if not note:
            parts.append(kind)
        elif note.split(" ", 1)[0] in (kind, "dataset", "training", "chat", "merged", "tokenizer"):
            parts.append(note)
        else:
            parts.append(f"{kind} {note}")
    return ", ".join(dict.fromkeys(parts))


def _before_after(before: Any, after: Any, unknown: str) -> str:
    if before is None and after is None:
        return unknown
    return f"{mib(before)} → {mib(after)}"


def figures(result: dict[str, Any]) -> Text:
    """Before → after for torch's reserved memory, the process's GPU memory and its RSS; with
    no CUDA in the backend, a sentence saying so first."""
    before, after = result.get("before") or {}, result.get("after") or {}
    rows = [
        ("torch reserved", _before_after(before.get("torch_reserved_mib"), after.get("torch_reserved_mib"),
                                         "none (CUDA not in use)")),
        ("GPU memory (NVML)", _before_after(before.get("nvml_process_mib"), after.get("nvml_process_mib"),
                                            "n/a (no GPU visible to NVML)")),
        ("backend RSS", _before_after(before.get("rss_mib"), after.get("rss_mib"), "n/a")),
    ]
    text = Text()
    if not result.get("cuda"):
        text.append(NO_CUDA + "\n\n")
    width = max(len(label) for label, _ in rows) + 2
    text.append(f"{'':{width}}before → after", style="dim")
    for label, value in rows:
        text.append("\n")
        text.append(label.ljust(width), style="bold")
        text.append(value)
    return text


def describe_still_held(result: dict[str, Any]) -> Text:
    still = result.get("still_held") or []
    text = Text()
    if not still:
        text.append("Still held: nothing on the GPU.", style="bold")
        text.append(" A restart also gives back the RAM the backend process grew into.")
        return text
    text.append("Still held:", style="bold")
    for item in still:
        text.append(f"\n• {item.get('what', '?')}", style="bold")
        if item.get("why"):
            text.append(f": {item['why']}")
    return text


class FreeMemoryResultScreen(BackendRequests, ModalScreen[bool]):
    """The result of freeing the GPU memory; dismisses with True when the backend restarts."""

    BINDINGS = [
        Binding("r", "restart", "Restart backend", id="free-result.restart",
                tooltip="Restart the backend process in place to release its CUDA context; "
                        "qlw re-attaches by itself."),
        Binding("escape", "close", "Close", id="free-result.close",
                tooltip="Close this report."),
    ]

    def __init__(self, finished: dict[str, Any]) -> None:
        super().__init__()
        #: The ``job.finished`` payload of the gpu.free job.
        self.finished = finished
        self.result: dict[str, Any] = finished.get("result") or {}

    def compose(self) -> ComposeResult:
        result = self.result
        with VerticalScroll(id="free-result-dialog", classes="dialog"):
            yield Static(f"Dropped: {describe_dropped(result.get('dropped') or [])}",
                         id="free-dropped", markup=False)
            yield Static(figures(result), id="free-figures")
            yield Static(describe_still_held(result), id="free-still-held")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Restart backend (r)", id="free-restart", variant="warning")
                yield Button("Close (esc)", id="free-close", variant="primary")

    def on_mount(self) -> None:
        elapsed = self.finished.get("elapsed_s")
        took = f" in {elapsed:.1f} s" if isinstance(elapsed, (int, float)) else ""
        self.query_one("#free-result-dialog").border_title = f"GPU memory freed{took}"
        self.query_one("#free-close", Button).focus()

    @on(Button.Pressed, "#free-restart")
    def _restart_pressed(self) -> None:
        self.action_restart()

    @on(Button.Pressed, "#free-close")
    def _close_pressed(self) -> None:
        self.dismiss(False)

    def action_close(self) -> None:
        self.dismiss(False)

    def action_restart(self) -> None:
        self.restart_backend()

    @work(name="restart the backend", group="backend.restart", exclusive=True, exit_on_error=False)
    async def restart_backend(self) -> None:
        """Ask the backend to restart in place; the connection indicator shows it come back."""
        self.query_one("#free-restart", Button).disabled = True
        try:
            await self.call(P.RestartBackend())
        finally:
            self.query_one("#free-restart", Button).disabled = False
        self.app.notify("Restarting the backend to release its CUDA context; qlw re-attaches by itself.",
                        timeout=5)
        self.dismiss(True)
