"""EvalView: the Chat tab's evaluation: pick targets, run ``eval.run``, one table row per
``eval.row`` (size, load time, generation mean±std, tokens/s, peak memory, perplexity)."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, DataTable, Input, Label, SelectionList, Static

from tui.widgets.chat.chat_format import EVAL_COLUMNS, eval_cells, target_label


class EvalView(Vertical):
    """Targets to compare, the run's settings, and the table of ``eval.row`` events."""

    IDLE = "Pick targets (space), then Run (f5): one row per target; ctrl+s exports the table."

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        #: ``eval.row`` payloads by target, in arrival order.
        self.rows: dict[str, dict[str, Any]] = {}

    def compose(self) -> ComposeResult:
        with Horizontal(id="eval-top"):
            yield SelectionList[str](id="eval-targets")
            with Vertical(id="eval-options"):
                with Horizontal(classes="eval-option"):
                    yield Label("runs", classes="setting-label")
                    yield Input("3", id="eval-runs", compact=True,
                                tooltip="Generations per prompt and target (mean ± std over them).")
                with Horizontal(classes="eval-option"):
                    yield Label("max_new_tokens", classes="setting-label")
                    yield Input("64", id="eval-max-new-tokens", compact=True,
                                tooltip="Tokens generated per prompt in the timing runs.")
                yield Input("", placeholder="text for perplexity (empty: the run's validation split)",
                            id="eval-text-path", compact=True,
                            tooltip="A text or JSONL file for the perplexity; empty: the validation split "
                                    "of the target's run.")
                yield Button("Run ▶ (f5)", id="eval-run", variant="success", compact=True,
                             tooltip="Run eval.run on the ticked targets (a backend job).")
        yield Static(self.IDLE, id="eval-status", markup=False)
        yield DataTable(id="eval-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.table.add_columns(*EVAL_COLUMNS)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.show_note()

    def on_descendant_focus(self, event) -> None:
        self.show_note()

    def show_note(self) -> None:
        """The highlighted row's label and note (what its size, load and perplexity mean), while
        the table has the focus."""
        table = self.table
        if not table.has_focus or not self.rows or not 0 <= table.cursor_row < len(self.rows):
            return
        row = list(self.rows.values())[table.cursor_row]
        note = f" · {row['note']}" if row.get("note") else ""
        self.status(f"{row.get('label') or row.get('target')} on {row.get('device', '?')}, "
                    f"{row.get('runs', '?')} runs, perplexity over {row.get('ppl_tokens', '?')} tokens{note}")

    @property
    def table(self) -> DataTable:
        return self.query_one("#eval-table", DataTable)

    def set_targets(self, targets: list[dict[str, Any]]) -> None:
        """Offer ``chat.targets``' targets; those ticked before stay ticked. By default the base
        and the newest trained adapter: base against tuned is the comparison people want, and the
        adapter's run gives the validation text that perplexity is measured on."""
        sl = self.query_one("#eval-targets", SelectionList)
        newest = next((str(t["id"]) for t in targets if t.get("kind") == "tuned" and "checkpoint-" not in str(t["id"])),
                      next((str(t["id"]) for t in targets if t.get("kind") == "tuned"), None))
        keep = set(sl.selected) or {"base", *([newest] if newest else [])}
        sl.clear_options()
        sl.add_options([(target_label(t), t["id"], t["id"] in keep) for t in targets])

    @property
    def selected(self) -> list[str]:
        return list(self.query_one("#eval-targets", SelectionList).selected)

    def options(self) -> tuple[dict[str, Any], str]:
        """(eval.run's parameters, an error or "")."""
        params: dict[str, Any] = {"targets": self.selected}
        for name, field_id, lo, hi in (("runs", "#eval-runs", 1, 100), ("max_new_tokens", "#eval-max-new-tokens", 1, 8192)):
            text = self.query_one(field_id, Input).value.strip()
            try:
                value = int(text)
                if not lo <= value <= hi:
                    raise ValueError
            except ValueError:
                return params, f"{name} must be a whole number {lo}..{hi}, not {text or '(empty)'}"
            params[name] = value
        params["text_path"] = self.query_one("#eval-text-path", Input).value.strip()
        if not params["targets"]:
            return params, "tick at least one target (space in the list)"
        return params, ""

    def status(self, text: str) -> None:
        self.query_one("#eval-status", Static).update(text)

    def clear_rows(self) -> None:
        self.rows.clear()
        self.table.clear()

    def add_row(self, row: dict[str, Any]) -> None:
        target = str(row.get("target", ""))
        cells = eval_cells(row)
        if target in self.rows:
            for column, cell in zip(self.table.columns, cells):
                self.table.update_cell(target, column, cell)
        else:
            self.table.add_row(*cells, key=target)
        self.rows[target] = dict(row)
        if row.get("perplexity") is None:
            # The table shows "—": say why, without waiting for the row to be highlighted.
            why = next((n.strip() for n in str(row.get("note") or "").split(";")
                        if "perplexity" in n), "no text to score")
            self.status(f"perplexity — for {row.get('label') or target}: {why.removeprefix('perplexity on ')}")
