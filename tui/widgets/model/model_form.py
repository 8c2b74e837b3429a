"""ModelForm: where the base model comes from and how to load it (three compact rows).

Row 1: source (a folder or a Hub id), revision, the tiny-model shortcut. Row 2: precision, and
for 4-bit the quant type, compute dtype and double quantization. Row 3: attention implementation,
device, and ``trust_remote_code``. Every change posts :class:`ModelForm.Changed` with the
settings as plain data (the fields of ``protocol.ModelSettings``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Checkbox, Input, Label, Select, Switch

from backend import protocol as P

PRECISION_LABELS = {"4bit": "4-bit (QLoRA)", "8bit": "8-bit", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
ATTN_LABELS = {"sdpa": "sdpa attention", "eager": "eager attention", "flash_attention_2": "flash-attention 2"}
DEFAULTS = P.ModelSettings(source="")


def expand_source(text: str, cwd: str | None = None) -> str:
    """A source as the backend should see it: ``~`` and paths relative to this terminal's
    folder (``./x``, ``../x``) made absolute; Hub ids and absolute paths unchanged. The backend
    runs elsewhere (its own working folder), so only the front end knows what ``./`` meant."""
    text = text.strip()
    if text.startswith("~"):
        return os.path.expanduser(text)
    if text in (".", "..") or text.startswith(("./", "../")):
        return str((Path(cwd or os.getcwd()) / text).resolve())
    return text


class ModelForm(Vertical):
    """The settings of a base-model load."""

    @dataclass
    class Changed(Message):
        """A setting changed; ``settings`` are the fields of ``protocol.ModelSettings``."""

        form: "ModelForm"
        settings: dict[str, Any]

        @property
        def control(self) -> "ModelForm":
            return self.form

    def compose(self) -> ComposeResult:
        with Horizontal(classes="model-row"):
            yield Input(placeholder="model folder or Hub id (owner/name)", id="model-source", compact=True,
                        tooltip="A folder with config.json and *.safetensors, or a Hub id such as "
                                "mistralai/Mistral-7B-v0.3")
            yield Input(placeholder="revision", id="model-revision", compact=True,
                        tooltip="A branch, tag or commit of a Hub model; empty: main")
            yield Button("tiny", id="model-tiny", compact=True,
                         tooltip="Use the embedded tiny model (built once in the data home if needed)")
        with Horizontal(classes="model-row"):
            yield Select([(label, value) for value, label in PRECISION_LABELS.items()], value=DEFAULTS.precision,
                         allow_blank=False, id="model-precision", compact=True,
                         tooltip="4-bit/8-bit: bitsandbytes quantization; or unquantized bf16/fp16/fp32")
            yield Select([(q, q) for q in P.MODEL_QUANT_TYPES], value=DEFAULTS.quant_type, allow_blank=False,
                         id="model-quant-type", compact=True, tooltip="4-bit data type: nf4 (QLoRA's) or fp4")
            yield Select([(f"compute {d}", d) for d in P.MODEL_COMPUTE_DTYPES], value=DEFAULTS.compute_dtype,
                         allow_blank=False, id="model-compute-dtype", compact=True,
                         tooltip="The dtype 4-bit layers compute in (and the rest of the model is stored in)")
            yield Checkbox("double quant", DEFAULTS.double_quant, id="model-double-quant", compact=True,
                           tooltip="Quantize the quantization constants too (about 0.4 bits per weight less)")
        with Horizontal(classes="model-row"):
            yield Select([(ATTN_LABELS[a], a) for a in ("sdpa", "eager")], value=DEFAULTS.attn_implementation,
                         allow_blank=False, id="model-attn", compact=True,
                         tooltip="Attention implementation; flash-attention 2 is offered where it is installed")
            yield Select([("auto device", "auto"), ("cpu", "cpu")], value=DEFAULTS.device, allow_blank=False,
                         id="model-device", compact=True,
                         tooltip="Where the whole model goes: auto is the first GPU, else the CPU")
            yield Label("trust remote code", classes="model-label")
            yield Switch(DEFAULTS.trust_remote_code, id="model-trust",
                         tooltip="Let the model run its own Python code from its repository. "
                                 "Only for sources you trust.")

    def on_mount(self) -> None:
        self._sync_enabled()

    # Reading and setting ------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The form as the fields of ``protocol.ModelSettings``."""
        q = self.query_one
        return {
            "source": expand_source(q("#model-source", Input).value),
            "revision": q("#model-revision", Input).value.strip(),
            "trust_remote_code": q("#model-trust", Switch).value,
            "precision": q("#model-precision", Select).value,
            "quant_type": q("#model-quant-type", Select).value,
            "double_quant": q("#model-double-quant", Checkbox).value,
            "compute_dtype": q("#model-compute-dtype", Select).value,
            "attn_implementation": q("#model-attn", Select).value,
            "device": q("#model-device", Select).value,
        }

    def set_source(self, source: str, revision: str = "") -> None:
        """Fill in the source (and revision); a ``Changed`` follows."""
        self.query_one("#model-source", Input).value = source
        self.query_one("#model-revision", Input).value = revision

    def set_options(self, options: dict[str, Any]) -> None:
        """Offer what the backend can do: its devices (with free memory) and installed attention
        implementations. The current choices are kept where still offered."""
        from tui.widgets.model.model_format import size

        device = self.query_one("#model-device", Select)
        choices = []
        for d in options.get("devices") or []:
            if d["device"] == "auto":
                choices.append((f"{d.get('name', 'auto')}", "auto"))
            else:
                free = f", {size(d.get('free_bytes'))} free" if d.get("free_bytes") is not None else ""
                choices.append((f"{d['device']} ({d.get('name', '')}{free})", d["device"]))
        if choices:
            keep = device.value
            device.set_options(choices)
            device.value = keep if keep in {v for _, v in choices} else "auto"
        attn = self.query_one("#model-attn", Select)
        offered = [a for a in options.get("attn_implementations") or [] if a in ATTN_LABELS]
        if offered:
            keep = attn.value
            attn.set_options([(ATTN_LABELS[a], a) for a in offered])
            attn.value = keep if keep in offered else offered[0]

    # Changes ------------------------------------------------------------------------------------

    def _sync_enabled(self) -> None:
        four_bit = self.query_one("#model-precision", Select).value == "4bit"
        for selector in ("#model-quant-type", "#model-compute-dtype", "#model-double-quant"):
            self.query_one(selector).disabled = not four_bit

    def _changed(self) -> None:
        self._sync_enabled()
        self.post_message(self.Changed(self, self.settings()))

    @on(Input.Changed)
    @on(Select.Changed)
    @on(Checkbox.Changed)
    @on(Switch.Changed)
    def _on_control_changed(self, event: Message) -> None:
        event.stop()
        self._changed()
