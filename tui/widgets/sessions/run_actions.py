"""RunActions: rename and delete a run of the ledger, for the Runs pane and the run's detail.

Rename asks for the name in a dialog, then sends ``runs.rename`` (a ``session.renamed`` event
follows, which refreshes every list). Delete first asks the backend without ``confirm``: it
refuses with code ``confirm`` and says what would go (paths, bytes); the dialog shows exactly
that, and only a yes sends ``runs.delete`` with ``confirm=True``.
"""

from __future__ import annotations

from typing import Any

from textual import work

from backend import protocol as P, protocol_runs as R
from tui.client import RequestFailed
from tui.widgets.backend_requests import BackendRequests
from tui.widgets.sessions.runs_format import delete_question, run_name, size


class RunActions(BackendRequests):
    """Mixin (first in the bases, before the widget or screen class)."""

    def run_renamed(self, record: dict[str, Any]) -> None:
        """A run got a new name (``record``: the backend's record of it)."""

    def run_deleted(self, run_id: str) -> None:
        """A run was deleted."""

    @work(name="rename the run", group="runs.rename", exclusive=True, exit_on_error=False)
    async def rename_run(self, record: dict[str, Any]) -> None:
        from tui.modals.rename_screen import RenameScreen

        old = str(record.get("name") or "") if record.get("name") != record.get("id") else ""
        name = await self.app.push_screen_wait(RenameScreen(f"Rename run {run_name(record)} ({record['id']})", old))
        if not name:
            return
        result = await self.call(R.RenameRun(run=record["id"], name=name))
        self.app.notify(f"Renamed run {record['id']} to {name!r}.", markup=False, timeout=4)
        self.run_renamed(result.get("run") or {**record, "name": name})

    @work(name="delete the run", group="runs.delete", exclusive=True, exit_on_error=False)
    async def delete_run(self, record: dict[str, Any]) -> None:
        from tui.modals.confirm_screen import ConfirmScreen

        try:
            await self.call(R.DeleteRun(run=record["id"]))
            plan: dict[str, Any] = {"run": record["id"], "name": record.get("name", ""), "paths": [], "bytes": 0}
        except RequestFailed as exc:
            if exc.reply.code != P.CONFIRM:
                raise
            plan = exc.reply.result or {}
        question, detail = delete_question(plan)
        if not await self.app.push_screen_wait(ConfirmScreen(question, detail, yes="Delete", no="Keep")):
            return
        result = await self.call(R.DeleteRun(run=record["id"], confirm=True))
        freed = size(result.get("bytes")) if result.get("bytes") else "no files"
        text = f"Deleted run {run_name(record)} ({record['id']}): {len(result.get('paths') or [])} path(s), {freed}."
        if result.get("failed"):
            text += " Could not remove: " + "; ".join(result["failed"])
        self.app.notify(text, markup=False, severity="warning" if result.get("failed") else "information", timeout=6)
        self.run_deleted(record["id"])
