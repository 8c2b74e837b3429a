"""DataPane: the Data tab, a dataset browser that prepares what training will use.

Open a file, a folder or a Hub id; page through its rows (the backend slices its memory-mapped
Arrow table, so pages of a million-row file come as fast as those of a small one); filter; read a
row in full; check the columns; correct the detected role -> column mapping; pick the template,
the loss and the split; see the exact training text of the highlighted row with the tokens that
count in the loss; and count tokens over every row (a backend job).

Everything shown comes from the backend and can be asked for again. The prepared dataset is
plain data (:attr:`DataPane.settings`, a ``backend.protocol.PreparedData`` as a dict): the LoRA
and Train panes send it back to the backend as it is, and :class:`DataPane.SettingsChanged`
tells them when it changes.

What the user typed and chose here (the path fields, the dataset opened, its mapping, template,
loss and split, the filter, the inner tab) is the pane's state ``"data"``, kept by the backend
(:mod:`tui.ui_state`): after a re-attach, a backend restart or in a second terminal the same
dataset is opened again (at once when the backend still holds it) with the same choices.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, DataTable, Input, Static, TabbedContent, TabPane

from backend import protocol as P
from tui.client import RequestFailed
from tui.ui_state import UiChange, read_fields, write_fields
from tui.widgets.backend_requests import BackendRequests
from tui.widgets.data.columns_table import ColumnsTable
from tui.widgets.data.mapping_form import MappingForm
from tui.widgets.data.preview_view import PreviewView
from tui.widgets.data.row_detail import RowDetail
from tui.widgets.data.rows_table import RowsTable
from tui.widgets.data.split_form import SplitForm
from tui.widgets.data.token_stats_view import TokenStatsView
from tui.widgets.shell.error_notice import error_text

#: Rows per page, and the width cells are cut to by the backend.
PAGE_SIZE = 100
CELL_CHARS = 60
#: Highlighting runs through rows quickly; the row and its preview are asked for once it rests.
ROW_DELAY_S = 0.12
FILTER_DELAY_S = 0.35
SETTINGS_DELAY_S = 0.2
#: The key of this pane's state in the backend (tui/ui_state.py).
STATE_KEY = "data"
#: The fields naming the dataset to open.
SOURCE_FIELDS = ("data-path", "data-config", "data-split")


def sample_dataset_path() -> str:
    """The shipped sample dataset, found without importing the backend's rooms."""
    spec = importlib.util.find_spec("backend")
    if spec is None or not spec.submodule_search_locations:
        return ""
    return str(Path(list(spec.submodule_search_locations)[0]) / "samples" / "dolly_sample.jsonl")


#: The inner tabs' keys, shown together in the footer ("rdcmvs tabs"; ? names each).
TAB_KEYS = Binding.Group("tabs", compact=True)


class DataPane(BackendRequests, Vertical):
    """The Data tab."""

    BINDINGS = [
        Binding("ctrl+o", "open", "Open", id="data.open",
                tooltip="Open the data file, folder or Hub id (owner/name) named in the path box "
                        "(with an empty box: go there to type one)."),
        Binding("slash", "focus_filter", "Filter", id="data.filter",
                tooltip="Filter the rows: text anywhere (any case), or column:text for one column."),
        Binding("t", "count_tokens", "Count tokens", id="data.count-tokens",
                tooltip="Token lengths of every row as training will tokenize them (a backend job)."),
        Binding("r", "show_tab('data-rows-tab')", "Rows", id="data.tab.rows", group=TAB_KEYS,
                tooltip="Show the rows of the open dataset, a page at a time."),
        Binding("d", "show_tab('data-row-tab')", "Row", id="data.tab.row", group=TAB_KEYS,
                tooltip="Show the highlighted row in full."),
        Binding("c", "show_tab('data-columns-tab')", "Columns", id="data.tab.columns", group=TAB_KEYS,
                tooltip="Show the columns: types, null counts, examples."),
        Binding("m", "show_tab('data-format-tab')", "Format", id="data.tab.format", group=TAB_KEYS,
                tooltip="Correct the role -> column mapping; choose the template, the loss and the split."),
        Binding("v", "show_tab('data-preview-tab')", "Preview", id="data.tab.preview", group=TAB_KEYS,
                tooltip="Show the exact training text of the highlighted row, loss tokens highlighted."),
        Binding("s", "show_tab('data-stats-tab')", "Stats", id="data.tab.stats", group=TAB_KEYS,
                tooltip="Show the token-length statistics."),
    ]

    @dataclass
    class SettingsChanged(Message):
        """The prepared dataset's settings changed (plain data, ``PreparedData`` as a dict)."""

        settings: dict[str, Any]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        #: The open dataset's summary (the backend's ``data.open`` answer), or None.
        self.summary: dict[str, Any] | None = None
        self.filter_text = ""
        self._futures: dict[str, asyncio.Future] = {}
        self._finished: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._open_job = ""
        self._stats_job = ""
        #: The settings the token statistics shown were counted for.
        self._stats_for: dict[str, Any] | None = None
        self._row_timer = None
        self._filter_timer = None
        self._settings_timer = None
        #: A restored state whose dataset is being opened again (its choices wait for it), or None.
        self.restoring: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(id="data-source"):
            # The button first: the tab's first focusable widget gets the focus when the tab is
            # shown, and a button (unlike an input) leaves the number keys to the tab bar.
            yield Button("Open", id="data-open", compact=True,
                         tooltip="Open the dataset named on the right (or press enter in the path).")
            yield Input(sample_dataset_path(), placeholder="data file, folder or Hub id (owner/name)",
                        id="data-path", compact=True, select_on_focus=False,
                        tooltip="JSON, JSONL, CSV, TSV, Parquet, Arrow or text; a folder of them; or a Hub id.")
            yield Input(placeholder="config", id="data-config", compact=True, tooltip="The Hub dataset's config.")
            yield Input(placeholder="split", id="data-split", compact=True,
                        tooltip="The split to browse and train on (default: train).")
        yield Static("No dataset open: press Open for the shipped sample, or type a path.", id="data-status",
                     markup=False)
        with TabbedContent(id="data-tabs"):
            with TabPane("Rows", id="data-rows-tab"):
                yield Input(placeholder="filter: text anywhere, or column:text  (/)", id="data-filter", compact=True)
                yield RowsTable(PAGE_SIZE, id="data-table")
                yield Static("", id="data-page-line", markup=False)
            with TabPane("Row", id="data-row-tab"):
                yield RowDetail(id="data-row-detail")
            with TabPane("Columns", id="data-columns-tab"):
                yield ColumnsTable(id="data-columns")
            with TabPane("Format", id="data-format-tab"):
                with VerticalScroll(id="data-format"):
                    yield Static("No dataset open: the Format tab maps the columns of the open one.",
                                 id="data-format-caption", markup=False)
                    yield MappingForm(id="data-mapping")
                    yield SplitForm(id="data-split-form")
            with TabPane("Preview", id="data-preview-tab"):
                yield PreviewView(id="data-preview")
            with TabPane("Stats", id="data-stats-tab"):
                yield TokenStatsView(id="data-stats")

    def on_mount(self) -> None:
        self.app.backend_events.subscribe(self, self.on_backend)  # type: ignore[attr-defined]
        ui_state = getattr(self.app, "ui_state", None)
        if ui_state is not None:
            ui_state.changed.subscribe(self, self.on_ui_state)

    # The pane's state, kept by the backend -----------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What the user typed and chose here, as plain data (the pane's ``"data"`` state)."""
        if self.restoring is not None:
            return self.restoring  # until its dataset is open again, the restored state stands
        return {
            "fields": read_fields(self, SOURCE_FIELDS),
            "open": self.source or None,
            "format": {**read_fields(self.query_one(MappingForm)), **read_fields(self.query_one(SplitForm))},
            "filter": self.query_one("#data-filter", Input).value,
            "tab": self.query_one("#data-tabs", TabbedContent).active,
        }

    def save_state(self) -> None:
        ui_state = getattr(self.app, "ui_state", None)
        if ui_state is not None and self._alive():
            ui_state.set(STATE_KEY, self.state())

    def on_ui_state(self, change: UiChange) -> None:
        if change.key == STATE_KEY and isinstance(change.value, dict):
            self.restore(change.value)

    def restore(self, state: dict[str, Any]) -> None:
        """Show a state of this pane: its fields at once; its dataset opened again (at once when
        the backend still holds it), then its mapping, split and filter."""
        write_fields(self, {k: v for k, v in (state.get("fields") or {}).items() if k in SOURCE_FIELDS})
        wanted = state.get("open")
        if isinstance(wanted, dict) and wanted.get("path") and wanted != (self.source or None):
            self.restoring = state
            self.reopen(wanted)
        else:
            self._restore_choices(state)

    @work(name="open the dataset again", group="data.open", exclusive=True, exit_on_error=False)
    async def reopen(self, source: dict[str, Any]) -> None:
        try:
            summary = await self._open(source)
            if summary is not None:
                self.show_summary(summary)
                if self.restoring is not None:
                    self._restore_choices(self.restoring)
        finally:
            self.restoring = None
        self.save_state()
        self.post_message(self.SettingsChanged(self.settings or {}))

    def _restore_choices(self, state: dict[str, Any]) -> None:
        """The mapping, template, loss, split and filter of ``state`` on the open dataset."""
        with self.prevent(MappingForm.Changed, SplitForm.Changed):
            write_fields(self.query_one(MappingForm), state.get("format") or {})
            write_fields(self.query_one(SplitForm), state.get("format") or {})
        if isinstance(state.get("filter"), str):
            self.query_one("#data-filter", Input).value = state["filter"]
            self._apply_filter()
        tab = state.get("tab")
        if isinstance(tab, str) and self.query(f"#{tab}"):
            self.query_one("#data-tabs", TabbedContent).active = tab
        if self.summary is not None:
            self._settings_changed()

    @on(Input.Changed, "#data-path, #data-config, #data-split, #data-filter")
    @on(TabbedContent.TabActivated, "#data-tabs")
    def _typed(self, event: Message) -> None:
        self.save_state()

    def _alive(self) -> bool:
        """False once the pane is being taken down (a timer may still fire then)."""
        return self.is_attached and bool(self.query("#data-filter"))

    # The prepared dataset ---------------------------------------------------------------------

    @property
    def settings(self) -> dict[str, Any] | None:
        """The prepared dataset as plain data (``backend.protocol.PreparedData`` fields), or None
        while no dataset is open. This is what training uses, exactly."""
        if self.summary is None:
            return None
        source = self.summary["source"]
        return {
            "source": {"path": source["path"], "config": source.get("config", ""), "split": source.get("split", "")},
            **self.query_one(MappingForm).values,
            **self.query_one(SplitForm).values,
        }

    @property
    def tokenizer(self) -> str:
        """The tokenizer of the preview and the statistics ("" = the embedded tiny model)."""
        return self.query_one(MappingForm).tokenizer

    @property
    def source(self) -> dict[str, Any]:
        """The open source as the backend names it (resolved path, config, split)."""
        return dict(self.summary["source"]) if self.summary else {}

    # Backend events ---------------------------------------------------------------------------

    def on_backend(self, ev: P.Event) -> None:
        p = ev.payload
        if ev.kind == "job.progress":
            if p.get("job_id") == self._open_job:
                amount = f"{p.get('done', 0):,.0f}/{p['total']:,.0f}" if p.get("total") else f"{p.get('done', 0):,.0f}"
                self._status(f"▶ {p.get('stage') or 'opening'} · {amount} {p.get('unit') or ''}".rstrip())
            elif p.get("job_id") == self._stats_job:
                self.query_one(TokenStatsView).show_progress(p.get("stage", ""), p.get("done", 0), p.get("total", 0))
        elif ev.kind == "job.finished":
            job_id = p.get("job_id", "")
            self._finished[job_id] = p
            while len(self._finished) > 50:
                self._finished.popitem(last=False)
            future = self._futures.pop(job_id, None)
            if future is not None and not future.done():
                future.set_result(p)

    async def _wait_job(self, job_id: str) -> dict[str, Any]:
        """The ``job.finished`` payload of ``job_id`` (it may have come before we asked)."""
        if job_id in self._finished:
            return self._finished[job_id]
        future = asyncio.get_running_loop().create_future()
        self._futures[job_id] = future
        try:
            return await future
        finally:
            self._futures.pop(job_id, None)

    # Opening ------------------------------------------------------------------------------------

    def _requested_source(self) -> dict[str, Any]:
        return {
            "path": self.query_one("#data-path", Input).value.strip(),
            "config": self.query_one("#data-config", Input).value.strip(),
            "split": self.query_one("#data-split", Input).value.strip(),
        }

    def _status(self, text: str, kind: str = "") -> None:
        status = self.query_one("#data-status", Static)
        status.update(text)
        status.set_class(kind == "error", "-error")
        status.set_class(kind == "busy", "-busy")

    def _show_error(self, error: dict[str, Any], what: str = "") -> None:
        self._status(error_text(what, error, default="failed"), "error")

    async def _open(self, source: dict[str, Any], reload: bool = False) -> dict[str, Any] | None:
        """Open ``source`` in the backend (a job the first time); its summary, or None after
        showing why not."""
        reply = await self.app.backend.request(P.OpenData(source=source, reload=reload))  # type: ignore[attr-defined]
        if not reply.ok:
            raise RequestFailed(reply)
        if "dataset" in reply.result:
            return reply.result["dataset"]
        self._open_job = reply.result["job_id"]
        self._status(f"▶ opening {source.get('path')}", "busy")
        done = await self._wait_job(self._open_job)
        if done.get("status") == "done":
            return done["result"]["dataset"]
        if done.get("status") == "cancelled":
            self._status("Opening was cancelled.")
        else:
            self._show_error(done.get("error") or {}, "could not open the dataset: ")
        return None

    async def _call_open(self, params: Any) -> dict[str, Any]:
        """A data request on the open dataset; re-opens it once if the backend let it go."""
        try:
            return await self.call(params)
        except RequestFailed as exc:
            if exc.reply.code != P.NOT_OPEN or self.summary is None:
                raise
        if await self._open(self.source) is None:
            raise RuntimeError("the dataset could not be opened again")
        return await self.call(params)

    @work(name="open the dataset", group="data.open", exclusive=True, exit_on_error=False)
    async def open_dataset(self, reload: bool = False) -> None:
        source = self._requested_source()
        if not source["path"]:
            self._status("Type a data file, a folder or a Hub id first.", "error")
            return
        try:
            summary = await self._open(source, reload)
        except RequestFailed as exc:  # refused at once (a bad source): said like a failed job
            error = (exc.reply.result or {}).get("error") or {"message": exc.reply.reason or exc.reply.code}
            self._show_error(error, "could not open the dataset: ")
            summary = None
        if summary is not None:
            self.show_summary(summary)
        elif self.summary is not None:
            self._still_open(source)

    def _still_open(self, failed: dict[str, Any]) -> None:
        """A failed open leaves the previous dataset open: say which, here and in a notice, so
        that nobody trains it believing the new one is in use."""
        name = self.dataset_name
        status = self.query_one("#data-status", Static)
        status.update(f"{status.content}\n{name} stays open: Rows, Format, Stats and the LoRA tab still use it")
        self.notify(f"{failed.get('path')} could not be opened; {name} stays open and the LoRA tab still uses it.",
                    severity="warning", timeout=8, markup=False)

    @property
    def dataset_name(self) -> str:
        """The open dataset's file name (or Hub id), "" when none is open."""
        if self.summary is None:
            return ""
        path = self.summary["source"]["path"]
        return Path(path).name or path

    def show_summary(self, summary: dict[str, Any]) -> None:
        """A dataset is open: fill the columns, the forms, the status; ask for the first page."""
        self.summary = summary
        self.filter_text = ""
        self.query_one("#data-filter", Input).value = ""
        columns = [c["name"] for c in summary["columns"]]
        self.query_one(MappingForm).fill(columns, summary["mapping"])
        self.query_one(SplitForm).fill(summary["splits"], summary["split"])
        self.query_one(ColumnsTable).show_columns(summary["columns"], summary["mapping"])
        self.query_one(RowsTable).clear_rows()
        self.query_one(RowDetail).show_message("Highlight a row in the Rows tab to see it here in full.")
        self.query_one(PreviewView).show_message("Highlight a row: its training text appears here.")
        name = self.dataset_name
        # Every view names the dataset it describes; figures of the last one go.
        self.query_one(SplitForm).show_counts(None)
        self.query_one(TokenStatsView).reset(name)
        self._stats_for = None
        self.query_one("#data-format-caption", Static).update(
            f"Format of {name} · {summary['num_rows']:,} rows ({summary['split']}) · what training will use")
        notes = f" · {summary['notes'][0]}" if summary.get("notes") else ""
        self._status(f"{name} · {summary['num_rows']:,} rows ({summary['split']}) · "
                     f"{summary['shape']}: {summary['shape_label']}{notes}",
                     "error" if summary["shape"] == "unknown" else "")
        self.load_page(0)
        self._settings_changed()
        self.save_state()

    # Pages --------------------------------------------------------------------------------------

    @work(name="read a page of rows", group="data.page", exclusive=True, exit_on_error=False)
    async def load_page(self, start: int = 0, cursor: str = "first") -> None:
        table = self.query_one(RowsTable)
        if self.summary is None:
            return
        try:
            page = await self._call_open(P.DataPage(source=self.source, start=start, count=PAGE_SIZE,
                                                    filter=self.filter_text, cell_chars=CELL_CHARS))
        except BaseException:
            table.page_failed()
            raise
        table.show_page(page, cursor)
        self._page_line()
        if not page["rows"]:
            self.query_one(RowDetail).show_message("No row matches the filter.")

    def _page_line(self) -> None:
        table = self.query_one(RowsTable)
        line = self.query_one("#data-page-line", Static)
        if not table.total:
            line.update(f"no rows match {self.filter_text!r}" if self.filter_text else "no rows")
            return
        of = f"{table.total:,} matching {self.filter_text!r}" if self.filter_text else f"{table.total:,}"
        line.update(f"rows {table.page_start + 1:,}–{table.page_end:,} of {of} · "
                    "↓/pgdn past the end: next page · ctrl+home/end · enter: row in full")

    @on(RowsTable.PageWanted)
    def _page_wanted(self, event: RowsTable.PageWanted) -> None:
        self.load_page(event.start, event.cursor)

    @on(DataTable.RowHighlighted, "#data-table")
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if self._row_timer is not None:
            self._row_timer.stop()
        self._row_timer = self.set_timer(ROW_DELAY_S, self._row_rested)

    def _row_rested(self) -> None:
        if not self._alive():
            return
        self._row_timer = None
        index = self.query_one(RowsTable).highlighted_index
        if index is not None:
            self.load_row(index)
            self.load_preview(index)

    @on(DataTable.RowSelected, "#data-table")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_show_tab("data-row-tab")

    @work(name="read the row", group="data.row", exclusive=True, exit_on_error=False)
    async def load_row(self, index: int) -> None:
        row = await self._call_open(P.DataRow(source=self.source, index=index))
        self.query_one(RowDetail).show_row(row)

    # Filter -------------------------------------------------------------------------------------

    @on(Input.Changed, "#data-filter")
    def _filter_typed(self, event: Input.Changed) -> None:
        if self._filter_timer is not None:
            self._filter_timer.stop()
        self._filter_timer = self.set_timer(FILTER_DELAY_S, self._apply_filter)

    @on(Input.Submitted, "#data-filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        if self._filter_timer is not None:
            self._filter_timer.stop()
        self._apply_filter()
        self.query_one(RowsTable).focus()

    def _apply_filter(self) -> None:
        if not self._alive():
            return
        self._filter_timer = None
        text = self.query_one("#data-filter", Input).value.strip()
        if text != self.filter_text and self.summary is not None:
            self.filter_text = text
            self.load_page(0)

    # Preview and settings ---------------------------------------------------------------------

    @work(name="preview the training text", group="data.preview", exclusive=True, exit_on_error=False)
    async def load_preview(self, index: int) -> None:
        settings = self.settings
        if settings is None:
            return
        view = self.query_one(PreviewView)
        try:
            pv = await self._call_open(P.DataPreview(settings=settings, index=index, tokenizer=self.tokenizer))
        except RequestFailed as exc:  # bad settings or tokenizer: shown where the preview goes
            error = exc.reply.result.get("error") or {"message": exc.reply.reason or exc.reply.code}
            view.show_preview({"index": index, "error": error})
            return
        view.show_preview(pv)
        self.query_one(SplitForm).show_counts(pv.get("split"))

    @on(MappingForm.Changed)
    @on(SplitForm.Changed)
    def _form_changed(self, event: Message) -> None:
        self.save_state()
        if self._settings_timer is not None:
            self._settings_timer.stop()
        self._settings_timer = self.set_timer(SETTINGS_DELAY_S, self._settings_changed)

    def _settings_changed(self) -> None:
        if not self._alive():
            return
        self._settings_timer = None
        settings = self.settings
        if settings is None:
            return
        self.query_one(ColumnsTable).show_columns(self.summary["columns"], settings["mapping"])
        if self._stats_for is not None and self._stats_for != settings:
            self.query_one(TokenStatsView).mark_stale()
        self.post_message(self.SettingsChanged(settings))
        index = self.query_one(RowsTable).highlighted_index
        self.load_preview(index if index is not None else 0)

    # Token statistics -------------------------------------------------------------------------

    @work(name="count the tokens", group="data.stats", exclusive=True, exit_on_error=False)
    async def count_tokens(self) -> None:
        settings = self.settings
        view = self.query_one(TokenStatsView)
        if settings is None:
            view.show_status("Open a dataset first.")
            return
        view.show_status("▶ asking the backend to count tokens …")
        started = await self.call(P.DataStats(settings=settings, tokenizer=self.tokenizer, bins=40))
        self._stats_job = started["job_id"]
        done = await self._wait_job(self._stats_job)
        if done.get("status") == "done":
            self._stats_for = settings
            view.show_stats(done["result"]["stats"])
            if settings != self.settings:
                view.mark_stale()  # changed while counting
        elif done.get("status") == "cancelled":
            view.show_status("■ counting was cancelled")
        else:
            err = done.get("error") or {}
            where = f" ({err['where']})" if err.get("where") else ""
            hint = f" · {err['hint']}" if err.get("hint") else ""
            view.show_status(f"✖ {err.get('message', 'failed')}{where}{hint}")

    # Actions and controls -----------------------------------------------------------------------

    @on(Input.Submitted, "#data-path, #data-config, #data-split")
    def _path_submitted(self, event: Input.Submitted) -> None:
        self.open_dataset()

    @on(Button.Pressed, "#data-open")
    def _open_pressed(self, event: Button.Pressed) -> None:
        self.open_dataset()

    @on(Button.Pressed, "#stats-run")
    def _stats_pressed(self, event: Button.Pressed) -> None:
        self.count_tokens()

    def action_focus_path(self) -> None:
        self.query_one("#data-path", Input).focus()

    def action_open(self) -> None:
        """ctrl+o: open what the path box names (the same as Open); an empty box gets the focus."""
        if self._requested_source()["path"]:
            self.open_dataset()
        else:
            self.action_focus_path()
            self._status("Type a data file, a folder or a Hub id, then press enter.")

    def action_focus_filter(self) -> None:
        self.action_show_tab("data-rows-tab")
        self.query_one("#data-filter", Input).focus()

    def action_count_tokens(self) -> None:
        self.action_show_tab("data-stats-tab")
        self.count_tokens()

    def action_show_tab(self, tab: str) -> None:
        """Show an inner tab and put the focus in it (a focus left behind in a hidden tab would
        make TabbedContent switch back to that tab)."""
        tabs = self.query_one("#data-tabs", TabbedContent)
        tabs.active = tab
        focusable = [w for w in tabs.get_pane(tab).query("*") if w.focusable]
        # The table rather than the filter above it: keys then page and highlight at once.
        target = next((w for w in focusable if not isinstance(w, Input)), focusable[0] if focusable else None)
        if target is not None:
            target.focus()
