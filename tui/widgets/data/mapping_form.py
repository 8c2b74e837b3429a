"""MappingForm: which column plays which role, the training template, the loss and the tokenizer.

The detected mapping fills it when a dataset opens; the user corrects it with one Select per
role. Every change posts :class:`MappingForm.Changed`; the pane turns the form into the prepared
dataset's plain settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Input, Label, Select

from backend import protocol as P

ROLE_HELP = {
    "instruction": "the user's request (prompt, question)",
    "context": "extra input added to the request",
    "response": "the answer to learn (output, completion)",
    "system": "a system prompt per row",
    "messages": "a conversation: role/content or from/value",
    "text": "plain text, trained as it is",
    "chosen": "the preferred answer of a pair (DPO, ORPO): text or messages",
    "rejected": "the dispreferred answer of a pair (DPO, ORPO): text or messages",
    "label": "KTO: true when the response is desirable",
}
TEMPLATE_LABELS = {
    "chat": "chat template (the tokenizer's)",
    "mistral": "Mistral [INST] … [/INST]",
    "alpaca": "Alpaca (### Instruction / ### Response)",
    "raw": "raw text (columns as they are)",
}
LOSS_LABELS = {
    "auto": "auto (answer only where there is one)",
    "assistant_only": "assistant tokens only (chat)",
    "completion_only": "completion only (prompt masked)",
    "all": "every token",
}


class MappingForm(Vertical):
    """Role -> column Selects, the template, the loss, a system prompt and the tokenizer."""

    @dataclass
    class Changed(Message):
        """Something in the form changed; read :attr:`MappingForm.values`."""

        form: "MappingForm"

        @property
        def control(self) -> "MappingForm":
            return self.form

    def compose(self) -> ComposeResult:
        for role in P.DATA_ROLES:
            with Horizontal(classes="data-form-row"):
                yield Label(role, classes="data-form-label")
                yield Select([], prompt="(not mapped)", id=f"map-{role}", compact=True,
                             tooltip=f"The column used as {role}: {ROLE_HELP.get(role, 'a column of preference rows')}.")
        with Horizontal(classes="data-form-row"):
            yield Label("template", classes="data-form-label")
            yield Select([(label, value) for value, label in TEMPLATE_LABELS.items()], value="chat",
                         allow_blank=False, id="data-template", compact=True,
                         tooltip="How a row becomes training text.")
        with Horizontal(classes="data-form-row"):
            yield Label("loss on", classes="data-form-label")
            yield Select([(label, value) for value, label in LOSS_LABELS.items()], value="auto",
                         allow_blank=False, id="data-loss", compact=True,
                         tooltip="Which tokens count in the loss (trl's assistant_only_loss / completion_only_loss).")
        with Horizontal(classes="data-form-row"):
            yield Label("system", classes="data-form-label")
            yield Input(placeholder="system prompt for rows without one (optional)", id="data-system-prompt",
                        compact=True)
        with Horizontal(classes="data-form-row"):
            yield Label("tokenizer", classes="data-form-label")
            yield Input(placeholder="model folder or Hub id (empty: the embedded tiny model)", id="data-tokenizer",
                        compact=True)

    def fill(self, columns: list[str], mapping: dict[str, str]) -> None:
        """Offer ``columns`` for every role and select ``mapping`` (without posting Changed)."""
        with self.prevent(Select.Changed):
            for role in P.DATA_ROLES:
                select = self.query_one(f"#map-{role}", Select)
                select.set_options([(c, c) for c in columns])
                column = mapping.get(role) or ""
                select.value = column if column in columns else Select.NULL

    def set_role(self, role: str, column: str) -> None:
        """Map ``role`` to ``column`` ("" unmaps), as the user would."""
        self.query_one(f"#map-{role}", Select).value = column or Select.NULL

    def set_template(self, template: str) -> None:
        self.query_one("#data-template", Select).value = template

    @property
    def mapping(self) -> dict[str, str]:
        out = {}
        for role in P.DATA_ROLES:
            value = self.query_one(f"#map-{role}", Select).value
            out[role] = value if isinstance(value, str) else ""
        return out

    @property
    def values(self) -> dict[str, Any]:
        """The form as the prepared dataset's fields (mapping, template, loss, system_prompt)."""
        template = self.query_one("#data-template", Select).value
        loss = self.query_one("#data-loss", Select).value
        return {
            "mapping": self.mapping,
            "template": template if isinstance(template, str) else "chat",
            "loss": loss if isinstance(loss, str) else "auto",
            "system_prompt": self.query_one("#data-system-prompt", Input).value,
        }

    @property
    def tokenizer(self) -> str:
        return self.query_one("#data-tokenizer", Input).value.strip()

    @on(Select.Changed)
    def _select_changed(self, event: Select.Changed) -> None:
        event.stop()
        self.post_message(self.Changed(self))

    @on(Input.Submitted)
    def _input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.post_message(self.Changed(self))

    @on(Input.Blurred)
    def _input_blurred(self, event: Input.Blurred) -> None:
        self.post_message(self.Changed(self))
