"""ChatSettingsForm: generation settings (``ChatSettings`` of the protocol), compact and checked as
typed: a bad value is marked at its field and named on the error line, and is never sent."""

from __future__ import annotations

from typing import Any, Callable

from textual import on
from textual.app import ComposeResult
from textual.containers import Grid, Vertical
from textual.widgets import Checkbox, Input, Label, Select, Static

from backend import protocol as P

#: The protocol's ChatSettings defaults (spec of issue 6).
DEFAULTS: dict[str, Any] = dict(max_new_tokens=256, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.0,
                                do_sample=True, seed=0, system_prompt="", template="auto")
TEMPLATES = ("auto", *P.DATA_TEMPLATES)


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not lo <= value <= hi:
            raise ValueError(f"must be {lo}..{hi:,}")
        return value
    return parse


def _float(lo: float, hi: float, lo_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        if value != value or value > hi or value < lo or (lo_open and value == lo):
            raise ValueError(f"must be {'>' if lo_open else '≥'} {lo:g} and ≤ {hi:g}")
        return value
    return parse


#: Text fields: (name, label, parser, tooltip).
NUMBERS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    ("max_new_tokens", "max_new_tokens", _int(1, 32768), "How many tokens the answer may have at most."),
    ("temperature", "temperature", _float(0.0, 5.0), "Sampling temperature (0: the most likely token)."),
    ("top_p", "top_p", _float(0.0, 1.0, lo_open=True), "Nucleus sampling: keep the tokens within this probability mass."),
    ("top_k", "top_k", _int(0, 100000), "Keep this many most likely tokens (0: all)."),
    ("repetition_penalty", "rep. penalty", _float(0.0, 10.0, lo_open=True),
     "repetition_penalty: above 1 discourages repeating tokens."),
    ("seed", "seed", _int(0, 2**32 - 1), "Random seed: the same seed and settings give the same answer."),
)


class ChatSettingsForm(Vertical):
    """The settings; :meth:`settings` gives them with the errors by field."""

    def compose(self) -> ComposeResult:
        with Grid(id="chat-settings-grid"):
            for name, label, _, tip in NUMBERS:
                yield Label(label, classes="setting-label")
                yield Input(str(DEFAULTS[name]), id=f"chat-{name.replace('_', '-')}", compact=True, tooltip=tip)
            yield Label("template", classes="setting-label")
            yield Select([(t, t) for t in TEMPLATES], value="auto", allow_blank=False, compact=True,
                         id="chat-template",
                         tooltip="Prompt template: auto = the run's data template for an adapter, else the "
                                 "tokenizer's chat template.")
            yield Checkbox("do_sample", True, id="chat-do-sample", compact=True,
                           tooltip="Sample (temperature, top_p, top_k) or pick the most likely token (greedy).")
        yield Input("", placeholder="system prompt (optional)", id="chat-system-prompt", compact=True,
                    tooltip="A system message put before the conversation.")
        yield Static("", id="chat-settings-errors", markup=False)

    def on_mount(self) -> None:
        self.query_one("#chat-settings-errors").display = False

    def settings(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(the settings, {field: error}); the settings hold the defaults where a field is bad."""
        values: dict[str, Any] = dict(DEFAULTS)
        errors: dict[str, str] = {}
        for name, _, parse, _ in NUMBERS:
            field = self.query_one(f"#chat-{name.replace('_', '-')}", Input)
            try:
                values[name] = parse(field.value.strip())
                field.remove_class("-invalid")
            except ValueError as exc:
                message = str(exc)
                if "invalid literal" in message or "could not convert" in message:
                    message = "is not a number"
                errors[name] = f"{field.value.strip() or '(empty)'} {message}"
                field.add_class("-invalid")
        values["do_sample"] = self.query_one("#chat-do-sample", Checkbox).value
        values["system_prompt"] = self.query_one("#chat-system-prompt", Input).value
        template = self.query_one("#chat-template", Select).value
        values["template"] = template if isinstance(template, str) else "auto"
        line = self.query_one("#chat-settings-errors", Static)
        line.update("✖ " + " · ".join(f"{k}: {v}" for k, v in errors.items()) if errors else "")
        line.display = bool(errors)
        return values, errors

    def set_value(self, name: str, value: Any) -> None:
        if name == "do_sample":
            self.query_one("#chat-do-sample", Checkbox).value = bool(value)
        elif name == "template":
            self.query_one("#chat-template", Select).value = value
        else:
            self.query_one(f"#chat-{name.replace('_', '-')}", Input).value = str(value)

    @on(Input.Changed)
    def _check(self, event: Input.Changed) -> None:
        self.settings()
