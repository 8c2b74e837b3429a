"""ExportStep: step 6 of the merge wizard: the merged model as a GGUF file for llama.cpp, Ollama and
LM Studio (``export.plan``, ``export.start``): the level, the file, an Ollama Modelfile, the
export's progress, and the file read back against the merged model (``export.verified``, always
on here) beside the noise floor of a 16-bit file."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Checkbox, DataTable, Input, Label, ProgressBar, Select, Static

from backend import protocol as P
from tui.widgets.chat.chat_format import size

LEVEL_HELP = {
    "f16": "f16: the merged weights in 16 bits (about 2 bytes a parameter)",
    "bf16": "bf16: 16 bits with bf16's range (about 2 bytes a parameter)",
    "q8_0": "q8_0: 8-bit blocks, half of f16, close to it (written in Python)",
    "q4_k_m": "q4_k_m: llama.cpp's 4-bit k-quant (needs llama-cpp-python)",
    "q5_k_m": "q5_k_m: llama.cpp's 5-bit k-quant (needs llama-cpp-python)",
}
EXPORT_COLUMNS = ("Model", "Perplexity", "Max |Δlogit|", "Top-1 agree", "Greedy same", "Size")


def export_cells(row: dict[str, Any]) -> tuple[str, ...]:
    def num(x, spec):
        return "—" if x is None else format(x, spec)

    return (str(row.get("model", "?")), num(row.get("perplexity"), ".4f"), num(row.get("max_abs_logit_diff"), ".3e"),
            num(row.get("top1_agreement"), ".1%"), str(row.get("greedy_same") or "—"), size(row.get("size_bytes")))


def export_summary(v: dict[str, Any]) -> str:
    marks = {True: "✔", False: "✖", None: "—"}
    c = v.get("checks") or {}
    return (f"noise floor of a {v.get('noise_dtype', 'fp16')} file: max |Δlogit| {v.get('noise_floor', float('nan')):.3e} · "
            f"perplexity on {v.get('texts', '?')}\n"
            f"inside: chat template {marks[c.get('chat_template')]} · EOS {marks[c.get('eos')]} · conversation "
            f"tokenised the same {marks[c.get('conversation_tokens')]} · Modelfile TEMPLATE the same "
            f"{marks[c.get('modelfile_template')]}")


def plan_line(p: dict[str, Any]) -> str:
    model = p.get("model") or {}
    first = ("the adapter is merged first (bf16) · " if model.get("kind") == "adapter" else "")
    exists = " (exists: exporting asks before replacing it)" if p.get("out_exists") else ""
    line = (f"→ {p.get('out', '')}{exists}\n{first}{model.get('architecture', '?')} → GGUF "
            f"{model.get('gguf_architecture') or '?'} · about {size(p.get('size_bytes'))} · disk "
            f"{size((p.get('disk') or {}).get('need_bytes'))} of {size((p.get('disk') or {}).get('free_bytes'))} free")
    if p.get("modelfile"):
        line += f" · Modelfile {p['modelfile']}"
    return line


class ExportStep(Vertical):
    """The export form, its progress, and the read-back table."""

    EMPTY = "Not exported yet: pick the level and press f5."

    def compose(self) -> ComposeResult:
        with Horizontal(classes="merge-row"):
            yield Label("level", classes="merge-label")
            yield Select([(LEVEL_HELP[level], level) for level in P.EXPORT_LEVELS], value="q8_0",
                         allow_blank=False, id="export-quant", compact=True,
                         tooltip="How the weights are stored in the file; k-quants need llama-cpp-python.")
        with Horizontal(classes="merge-row"):
            yield Label("file", classes="merge-label")
            yield Input("", placeholder="(default: exports/<model>-<level>.gguf)", id="export-out", compact=True,
                        tooltip="The .gguf file or a folder for it; a relative path is under the data home's "
                                "exports/.")
            yield Checkbox("Ollama Modelfile", True, id="export-ollama", compact=True,
                           tooltip="Write a Modelfile beside the file: FROM, TEMPLATE, stop and generation "
                                   "parameters.")
        yield Static("", id="export-plan", markup=False)
        yield Button("Export ▶ (f5)", id="export-start", variant="success", compact=True,
                     tooltip="Write the GGUF (and the Modelfile), then read it back against the merged model.")
        yield Static("", id="export-stage", markup=False)
        yield ProgressBar(id="export-progress", show_eta=False)
        yield Static(self.EMPTY, id="export-line", markup=False)
        yield DataTable(id="export-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.query_one(ProgressBar).display = False
        self.table.add_columns(*EXPORT_COLUMNS)

    @property
    def table(self) -> DataTable:
        return self.query_one("#export-table", DataTable)

    @property
    def quant(self) -> str:
        return str(self.query_one("#export-quant", Select).value)

    @property
    def out(self) -> str:
        return self.query_one("#export-out", Input).value.strip()

    @property
    def ollama(self) -> bool:
        return self.query_one("#export-ollama", Checkbox).value

    def show_plan(self, text: str, bad: bool = False) -> None:
        line = self.query_one("#export-plan", Static)
        line.update(text)
        line.set_class(bad, "-error")

    def progress(self, stage: str, done: float, total: float, unit: str = "", message: str = "") -> None:
        bar = self.query_one(ProgressBar)
        bar.display = True
        if total:
            bar.update(total=total, progress=done)
        else:
            bar.update(total=None)
        amount = (f" {size(done)} of {size(total)}" if unit == "bytes" else
                  f" {done:,.0f}/{total:,.0f} {unit}".rstrip()) if total else ""
        self.query_one("#export-stage", Static).update(
            f"▶ {stage}{amount}{' · ' + message if message else ''} · ctrl+g stops")

    def finished(self, text: str) -> None:
        self.query_one("#export-stage", Static).update(text)
        bar = self.query_one(ProgressBar)
        if bar.total:
            bar.update(progress=bar.total)

    def saved(self, p: dict[str, Any]) -> None:
        notes = "".join(f"\nnote: {n}" for n in p.get("notes") or [])
        modelfile = f" · {p['modelfile']} (ollama create NAME -f Modelfile)" if p.get("modelfile") else ""
        self.status(f"✔ {p.get('path', '')}: {size(p.get('size_bytes'))}, {p.get('tensors', 0)} tensors in "
                    f"{p.get('write_s', 0):.1f} s{modelfile}{notes}")

    def show(self, v: dict[str, Any]) -> None:
        self.table.clear()
        for row in v.get("rows") or []:
            self.table.add_row(*export_cells(row))
        self.status(f"{v.get('path', '')}\n{export_summary(v)}")

    def status(self, text: str) -> None:
        self.query_one("#export-line", Static).update(text)
