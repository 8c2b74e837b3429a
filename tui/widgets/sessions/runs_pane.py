"""RunsPane: the tab of past and present runs (issue 18): the runs ledger as a table, sorted and
filtered here; a run's detail, the compare view, rename and delete; and, one key away, every
session of the store (:class:`SessionsPane`, jobs that were not training runs included).

The records come from the backend (``runs.list``); they are read again when a run starts, logs,
finishes, is renamed or deleted, after every (re)connect, and on ``r``. Sorting and filtering
work on the records held, so they cost no request. ``run.notice`` events (a run finished,
failed, stopped or stalled) ring the terminal's bell and show their text.
"""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import ContentSwitcher, DataTable, Input, Static

from backend import protocol as P, protocol_runs as R
from tui.client import CONNECTED
from tui.messages import ConnectionChanged
from tui.widgets.sessions import runs_format as F
from tui.widgets.sessions.run_actions import RunActions
from tui.widgets.sessions.sessions_pane import STATUS_STYLES, SessionsPane

#: Events after which the ledger is out of date (read once, shortly after, for a burst).
REFRESH_KINDS = frozenset({"session.created", "session.renamed", "session.status", "job.started", "job.finished",
                           "train.started", "train.finished", "runs.deleted", "run.notice"})
#: Events of a running run that change its figures: read at most every LIVE_DELAY_S.
LIVE_KINDS = frozenset({"train.log", "train.checkpoint"})
REFRESH_DELAY_S = 0.1
LIVE_DELAY_S = 2.0
#: A ``run.notice`` older than this (a replay after attaching) is not rung or notified again.
NOTIFY_RECENT_S = 30.0
#: notice status -> notification severity.
NOTICE_SEVERITY = {"finished": "information", "stopped": "warning", "stalled": "warning", "failed": "error"}


class RunsPane(RunActions, Vertical):
    """The runs ledger: one row per training run, newest first unless sorted."""

    BINDINGS = [
        Binding("enter", "open", "Open", id="runs.open",
                tooltip="Open the highlighted run: its config, loss table and curve, checkpoints, evaluations, "
                        "errors and files."),
        Binding("space", "mark", "Mark", id="runs.mark",
                tooltip=f"Mark or unmark the highlighted run for the compare view (2 to {F.MAX_COMPARED} runs)."),
        Binding("c", "compare", "Compare", id="runs.compare",
                tooltip="Compare the marked runs: their loss curves on one plot, the settings that differ, "
                        "their evaluations side by side."),
        Binding("s", "sort", "Sort", id="runs.sort",
                tooltip="Sort by the next column (the header shows which; clicking a header sorts by it)."),
        Binding("S", "reverse", "Reverse", id="runs.reverse", show=False,
                tooltip="Reverse the sort order."),
        Binding("slash", "filter", "Filter", id="runs.filter",
                tooltip="Filter the runs: words match any column; column:value one column "
                        "(status:failed, best:<1.5, merged:yes)."),
        Binding("n", "rename", "Rename", id="runs.rename",
                tooltip="Give the highlighted run a new name."),
        Binding("d,delete", "delete", "Delete", id="runs.delete",
                tooltip="Delete the highlighted run, its records and its files (asks first, saying what goes)."),
        # v and r are left out of the footer: at 80 columns it keeps q Quit (issue 15); ? lists them.
        Binding("v", "toggle_view", "Sessions", id="runs.toggle-view", show=False,
                tooltip="Show every session of the store (jobs that were not training runs too), or the runs again."),
        Binding("r", "refresh", "Refresh", id="runs.refresh", show=False,
                tooltip="Read the runs from the backend again."),
    ]

    EMPTY = "No runs yet: the LoRA tab sets one up, f5 starts it · v shows every session"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        #: The backend's last answer (newest first) and the same by id.
        self.records: list[dict[str, Any]] = []
        self.by_id: dict[str, dict[str, Any]] = {}
        #: The runs marked for the compare view, in the order marked.
        self.marked: list[str] = []
        #: The sort column (None: newest first, as the backend sends them) and its direction.
        self.sort_key: str | None = None
        self.sort_reverse = False
        #: The ids shown, in table order (filtered and sorted).
        self.shown: list[str] = []
        #: How many times runs.list was answered (tests wait for a fresh read).
        self.reads = 0
        self._refresh_timer = None
        self._live_timer = None

    def compose(self) -> ComposeResult:
        with ContentSwitcher(initial="runs-view", id="runs-switcher"):
            with Vertical(id="runs-view"):
                yield Input(placeholder="/ filter: words, or column:value (status:failed, best:<1.5, merged:yes)",
                            id="runs-filter", compact=True,
                            tooltip="Words match any column; column:value matches one; all terms must match.")
                yield DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
                yield Static("", id="run-line", markup=False)
            yield SessionsPane(id="sessions-view")

    def on_mount(self) -> None:
        self._add_columns()
        self._show_line()
        self.app.backend_events.subscribe(self, self.on_backend)  # type: ignore[attr-defined]
        self.app.connection_changed.subscribe(self, self.on_connection)  # type: ignore[attr-defined]
        if self.app.connection.state == CONNECTED:  # type: ignore[attr-defined]
            self.refresh_runs()

    @property
    def table(self) -> DataTable:
        return self.query_one("#runs-table", DataTable)

    # Events ---------------------------------------------------------------------------------------

    def on_backend(self, ev: P.Event) -> None:
        if ev.kind == "run.notice":
            self._notice(ev)
        if ev.kind in REFRESH_KINDS:
            if self._refresh_timer is None:
                self._refresh_timer = self.set_timer(REFRESH_DELAY_S, self._timed_refresh)
        elif ev.kind in LIVE_KINDS and self._live_timer is None and self._refresh_timer is None:
            self._live_timer = self.set_timer(LIVE_DELAY_S, self._timed_refresh)

    def _timed_refresh(self) -> None:
        for timer in (self._refresh_timer, self._live_timer):
            if timer is not None:
                timer.stop()
        self._refresh_timer = self._live_timer = None
        if self.app.connection.state == CONNECTED:  # type: ignore[attr-defined]
            self.refresh_runs()

    def _notice(self, ev: P.Event) -> None:
        """A run finished, stopped, failed or stalled: the bell and the notice's text (a replayed,
        older notice only refreshes the list)."""
        if time.time() - ev.time > NOTIFY_RECENT_S:
            return
        p = ev.payload
        status = str(p.get("status") or "")
        self.app.bell()
        self.app.notify(str(p.get("text") or f"run {p.get('run', '')} {status}"), title=f"Run {status}",
                        severity=NOTICE_SEVERITY.get(status, "information"), markup=False,
                        timeout=30 if status in ("failed", "stalled") else 10)

    def on_connection(self, change: ConnectionChanged) -> None:
        if change.state == CONNECTED:
            self.refresh_runs()

    @work(name="list the runs", group="runs.list", exclusive=True, exit_on_error=False)
    async def refresh_runs(self) -> None:
        result = await self.call(R.ListRuns())
        self.show_runs(result.get("runs", []))

    # The table ------------------------------------------------------------------------------------

    def show_runs(self, records: list[dict[str, Any]]) -> None:
        """Show ``records`` (newest first, as ``runs.list`` sends them), keeping the sort, the
        filter, the marks of runs still there and the cursor on the run it was on."""
        self.records = list(records)
        self.by_id = {r["id"]: r for r in self.records}
        self.marked = [m for m in self.marked if m in self.by_id]
        self.reads += 1
        self._fill()

    def _add_columns(self) -> None:
        table = self.table
        for key, title in F.COLUMNS:
            if key == self.sort_key:
                title = f"{title} {'▼' if self.sort_reverse else '▲'}"
            table.add_column(Text(title, justify="right" if key in F.NUMERIC else "left"), key=key)

    def _fill(self) -> None:
        table = self.table
        keep = self.highlighted
        query = self.query_one("#runs-filter", Input).value
        shown = F.sort_records([r for r in self.records if F.matches(query, r)], self.sort_key, self.sort_reverse)
        self.shown = [r["id"] for r in shown]
        table.clear()
        for record in shown:
            table.add_row(*self._cells(record), key=record["id"])
        if keep in self.shown:
            table.move_cursor(row=self.shown.index(keep), scroll=False)
        self._show_line()

    def _cells(self, record: dict[str, Any]) -> list[Text]:
        cells = []
        for key, _ in F.COLUMNS:
            if key == "mark":
                cells.append(Text(F.MARK if record["id"] in self.marked else " ", style=self._theme("accent", "bold")))
            elif key == "status":
                status = str(record.get("status") or "")
                colour, style = STATUS_STYLES.get(status, (None, ""))
                cells.append(Text(status, style=f"{style} {self._theme(colour)}".strip()))
            else:
                # Text, not str: DataTable parses str cells as markup, and names are the user's.
                text = F.cell(key, record)
                style = "dim" if key == "name" and not F.named(record) else ""
                cells.append(Text(text, style=style, justify="right" if key in F.NUMERIC else "left"))
        return cells

    def _theme(self, colour: str | None, style: str = "") -> str:
        value = self.app.theme_variables.get(colour, "") if colour else ""
        return f"{style} {value}".strip()

    @property
    def highlighted(self) -> str | None:
        """The id of the run under the cursor, if any."""
        table = self.table
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    @property
    def highlighted_record(self) -> dict[str, Any] | None:
        rid = self.highlighted
        return self.by_id.get(rid) if rid else None

    def _show_line(self) -> None:
        line = self.query_one("#run-line", Static)
        record = self.highlighted_record
        if not self.records:
            line.update(self.EMPTY)
            return
        if record is None:
            line.update(f"No run matches the filter ({len(self.records)} runs in all).")
            return
        text = F.record_line(record)
        if self.marked:
            text = f"{len(self.marked)} marked (c compares) · " + text
        line.update(text)

    @on(DataTable.RowHighlighted, "#runs-table")
    def _on_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_line()

    @on(DataTable.RowSelected, "#runs-table")
    def _on_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    @on(DataTable.HeaderSelected, "#runs-table")
    def _on_header(self, event: DataTable.HeaderSelected) -> None:
        key = event.column_key.value
        if key not in F.SORTABLE:
            return
        if key == self.sort_key:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_key, self.sort_reverse = key, False
        self._resort()

    def sort_by(self, key: str | None, reverse: bool = False) -> None:
        """Sort by column ``key`` (None: newest first)."""
        self.sort_key, self.sort_reverse = key, reverse
        self._resort()

    def _resort(self) -> None:
        self.table.clear(columns=True)
        self._add_columns()
        self._fill()

    @on(Input.Changed, "#runs-filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self._fill()

    @on(Input.Submitted, "#runs-filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        self.table.focus()

    # Actions ---------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # While every session is shown, the runs' keys are hidden (they would act on a hidden row).
        if action not in ("toggle_view", "refresh") and self.is_mounted and self.sessions_shown:
            return False
        return super().check_action(action, parameters)

    @property
    def sessions_shown(self) -> bool:
        return self.query_one(ContentSwitcher).current == "sessions-view"

    def action_refresh(self) -> None:
        self.refresh_runs()

    def action_filter(self) -> None:
        self.query_one(ContentSwitcher).current = "runs-view"
        self.query_one("#runs-filter", Input).focus()

    def action_sort(self) -> None:
        order = [None, *F.SORTABLE]
        self.sort_by(order[(order.index(self.sort_key) + 1) % len(order)])

    def action_reverse(self) -> None:
        self.sort_by(self.sort_key, not self.sort_reverse)

    def action_mark(self) -> None:
        rid = self.highlighted
        if rid is None:
            return
        if rid in self.marked:
            self.marked.remove(rid)
        elif len(self.marked) >= F.MAX_COMPARED:
            self.app.notify(f"At most {F.MAX_COMPARED} runs are compared: unmark one first (space).",
                            severity="warning", markup=False, timeout=4)
            return
        else:
            self.marked.append(rid)
        self.table.update_cell(rid, "mark", self._cells(self.by_id[rid])[0])
        self._show_line()

    def action_compare(self) -> None:
        if not 2 <= len(self.marked) <= F.MAX_COMPARED:
            self.app.notify(f"Mark 2 to {F.MAX_COMPARED} runs to compare (space marks the highlighted run); "
                            f"{len(self.marked)} marked.", severity="warning", markup=False, timeout=5)
            return
        from tui.screens.run_compare_screen import RunCompareScreen

        self.app.push_screen(RunCompareScreen([self.by_id[m] for m in self.marked]))

    def action_open(self) -> None:
        record = self.highlighted_record
        if record is None:
            return
        from tui.screens.run_detail_screen import RunDetailScreen

        self.app.push_screen(RunDetailScreen(record))

    def action_rename(self) -> None:
        record = self.highlighted_record
        if record is not None:
            self.rename_run(record)

    def action_delete(self) -> None:
        record = self.highlighted_record
        if record is not None:
            self.delete_run(record)

    def action_toggle_view(self) -> None:
        switcher = self.query_one(ContentSwitcher)
        if switcher.current == "runs-view":
            switcher.current = "sessions-view"
            self.query_one("#sessions-table", DataTable).focus()
        else:
            switcher.current = "runs-view"
            self.table.focus()
        self.refresh_bindings()

    def run_renamed(self, record: dict[str, Any]) -> None:
        self.refresh_runs()

    def run_deleted(self, run_id: str) -> None:
        self.refresh_runs()
