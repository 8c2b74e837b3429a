"""TokenStatsView: token lengths of the prepared rows (a backend job): percentiles, a histogram,
how many rows ``max_length`` cuts and how many trl drops."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, Static

from tui.widgets.data.length_histogram import LengthHistogram


class TokenStatsView(VerticalScroll):
    """The ``data.stats`` result, and the job's progress while it runs."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stats: dict[str, Any] | None = None
        #: The dataset these figures describe (its file name), and whether its settings have
        #: changed since they were counted.
        self.dataset = ""
        self.stale = False

    def reset(self, dataset: str) -> None:
        """Another dataset is open: the figures of the last one go; nothing counted yet."""
        self.stats, self.dataset, self.stale = None, dataset, False
        self.show_status(f"Token lengths of {dataset}: not counted yet (t counts every row as trl will).")
        for selector in ("#stats-summary", "#stats-axis", "#stats-errors"):
            self.query_one(selector, Static).update("")
        self.query_one(LengthHistogram).set_counts([])

    def mark_stale(self) -> None:
        """The mapping, template, loss or split changed since the count: the figures stay, marked."""
        if self.stats is None or self.stale:
            return
        self.stale = True
        self.show_status(f"⚠ {self.dataset}: counted before the settings changed (mapping, template, loss or "
                         "split): these figures are out of date; t counts again")

    def compose(self) -> ComposeResult:
        with Horizontal(id="stats-bar"):
            yield Button("Count tokens", id="stats-run", compact=True,
                         tooltip="Tokenize every row as training will (a backend job with progress).")
            yield Static("Token lengths of every row, as trl will tokenize them (t).", id="stats-status",
                         markup=False)
        yield Static("", id="stats-summary", markup=False)
        yield LengthHistogram(id="stats-histogram")
        yield Static("", id="stats-axis", markup=False)
        yield Static("", id="stats-errors", markup=False)

    def show_progress(self, stage: str, done: float, total: float) -> None:
        amount = f"{done:,.0f}/{total:,.0f} rows" if total else f"{done:,.0f}"
        self.query_one("#stats-status", Static).update(f"▶ {stage} · {amount}")

    def show_status(self, message: str) -> None:
        self.query_one("#stats-status", Static).update(message)

    def show_stats(self, st: dict[str, Any]) -> None:
        """Show a ``data.stats`` result."""
        self.stats, self.stale = st, False
        theme = self.app.theme_variables
        skipped = f", {st['skipped']:,} skipped" if st.get("skipped") else ""
        of = f"{self.dataset}: " if self.dataset else ""
        self.show_status(f"✔ {of}{st['rows']:,} rows tokenized with {st['tokenizer']}{skipped}")
        summary = Text()
        if not st["rows"]:
            summary.append("No row could be formatted: see below.", style="bold")
        else:
            summary.append(f"p50 {st['p50']:,} · p95 {st['p95']:,} · p99 {st['p99']:,} · max {st['max']:,} · "
                           f"mean {st['mean']:,} tokens\n")
            cut = f"{st['truncated']:,} rows longer than max_length {st['max_length']:,}"
            summary.append(cut, style=f"bold {theme.get('warning', 'yellow')}" if st["truncated"] else "")
            if st["truncated"]:
                summary.append(f" ({st.get('tokens_cut', 0):,} tokens cut)")
            if st.get("dropped"):
                summary.append(f" · {st['dropped']:,} left without loss tokens: trl drops them",
                               style=f"bold {theme.get('error', 'red')}")
            split = st.get("split") or {}
            if split:
                summary.append(f"\nsplit: train {split.get('train', 0):,} · validation {split.get('validation', 0):,}")
        self.query_one("#stats-summary", Static).update(summary)
        counts = st["histogram"]["counts"]
        edges = st["histogram"]["edges"]
        self.query_one(LengthHistogram).set_counts(counts)
        marker = ""
        if edges and st["max_length"] < edges[-1]:
            marker = f" · max_length {st['max_length']:,} at {100 * st['max_length'] / edges[-1]:.0f}% of the axis"
        self.query_one("#stats-axis", Static).update(
            f"{edges[0]:,} tokens ← {len(counts)} bins of {edges[1] - edges[0]:,} → {edges[-1]:,} tokens · "
            f"tallest bin {max(counts) if counts else 0:,} rows{marker}")
        errors = Text()
        for e in st.get("errors", []):
            errors.append(f"skipped row {e['index']:,}: {e['message']}\n", style="dim")
        self.query_one("#stats-errors", Static).update(errors)
