"""The qlw Textual app: screens, global bindings and the connection to the backend.

The app owns one :class:`~tui.client.BackendClient`, run as a worker on the app's own loop. Its
callbacks post :class:`BackendEvent` and :class:`ConnectionChanged`; the app hands both to the
widgets that subscribed to :attr:`QlwApp.backend_events` / :attr:`QlwApp.connection_changed`.
Everything shown comes from the backend and can be sent again: quitting loses nothing and never
stops the backend.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable

from textual import on
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.signal import Signal
from textual.timer import Timer
from textual.worker import Worker

from backend import protocol as P
from tui.client import CONNECTED, CONNECTING, GONE, BackendClient
from tui.messages import BackendEvent, ConnectionChanged
from tui.screens.main_screen import MainScreen
from tui.ui_state import UiState
from tui.widgets.backend_requests import BackendRequests

if TYPE_CHECKING:
    from textual.pilot import Pilot


class QlwApp(BackendRequests, App[None]):
    """qlw: the QLoRA workbench."""

    TITLE = "qlw"
    SUB_TITLE = "QLoRA workbench"
    CSS_PATH = "styles/app.tcss"

    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", id="app.quit-now", show=False, priority=True,
                tooltip="Quit qlw from anywhere. The backend keeps running, and any job with it."),
        Binding("ctrl+r", "restart_backend", "Start backend", id="app.restart-backend",
                tooltip="Start a backend (if none runs) and attach to it again."),
    ]

    def __init__(self, home: Path | None = None, start_backend: bool = True) -> None:
        super().__init__()
        self.backend = BackendClient(home, self._on_client_event, self._on_client_state,
                                     client="qlw-tui", start_backend=start_backend, listening=False)
        #: Every backend event, in order (the session's replay included); widgets subscribe in
        #: on_mount, and the client attaches only once the first screen's widgets are mounted.
        self.backend_events: Signal[P.Event] = Signal(self, "backend-events")
        #: Every change of the connection's state.
        self.connection_changed: Signal[ConnectionChanged] = Signal(self, "connection-changed")
        #: The latest connection state, for widgets mounted after it changed.
        self.connection = ConnectionChanged(CONNECTING)
        #: Printed to the shell after the app exits (``q``): what keeps running, how to come back.
        self.farewell = ""
        #: What the user typed and chose in each pane, kept by the backend (tui/ui_state.py).
        self.ui_state = UiState(self)
        self._client_worker: Worker | None = None
        #: Set once every tab's pane has mounted (the hidden tabs' just after the first paint)
        #: and the client may attach.
        self.panes_mounted = asyncio.Event()
        #: The watch that repaints the screen once a toast has gone (:meth:`notify`).
        self._toast_watch: Timer | None = None
        self._toasts_shown = 0
        self._toasts_until = 0.0

    def get_default_screen(self) -> Screen:
        return MainScreen(id="main")

    def on_mount(self) -> None:
        self._start_client()
        # The first screen mounts after the app (its panes subscribe in their on_mount, the
        # hidden tabs' panes just after the first paint): the client attaches once they all
        # have, so that its replay reaches every pane.
        screen = self.screen
        when = getattr(screen, "when_panes_mounted", None)
        screen.call_later(when or (lambda callback: callback()), self._panes_mounted)

    def _panes_mounted(self) -> None:
        self.panes_mounted.set()
        self.backend.listen()

    # Tests drive the app once every pane is there (the hidden tabs' mount after the first paint).

    @asynccontextmanager
    async def run_test(self, **kwargs: Any) -> AsyncIterator[Pilot]:
        """Textual's test harness, entered once every tab's pane has mounted."""
        async with super().run_test(**kwargs) as pilot:
            await self.panes_mounted.wait()
            await pilot.pause()
            yield pilot

    async def run_async(self, *, auto_pilot: Any = None, **kwargs: Any) -> Any:
        """As Textual's; an auto pilot (a snapshot test's) starts once every tab's pane has mounted."""
        if auto_pilot is not None:
            steer = auto_pilot

            async def auto_pilot(pilot: Pilot) -> None:
                await self.panes_mounted.wait()
                await pilot.pause()
                await steer(pilot)

        return await super().run_async(auto_pilot=auto_pilot, **kwargs)

    # The channel ---------------------------------------------------------------------------

    def _start_client(self) -> None:
        self._client_worker = self.run_worker(
            self._stay_connected(), name="stay connected to the backend", group="backend",
            exit_on_error=False,
        )

    async def _stay_connected(self) -> None:
        try:
            await self.backend.run()
        except Exception as exc:  # a bug in the client: say so, and let ctrl+r run it again
            self.post_message(ConnectionChanged(
                GONE, f"the connection loop failed ({type(exc).__name__}: {exc}); press ctrl+r to retry"))
            raise

    def _on_client_event(self, event: P.Event) -> None:
        self.post_message(BackendEvent(event))

    def _on_client_state(self, state: str, detail: str) -> None:
        self.post_message(ConnectionChanged(state, detail))

    @on(BackendEvent)
    def _fan_out_event(self, message: BackendEvent) -> None:
        self.ui_state.on_event(message.event)
        self.backend_events.publish(message.event)

    @on(ConnectionChanged)
    def _fan_out_connection(self, message: ConnectionChanged) -> None:
        if message.state == GONE and self.connection.state != GONE and message.detail:
            # The header says "gone"; this says why (the socket, the log to read) and what to do.
            self.notify(message.detail, title="No backend", severity="error", markup=False, timeout=10)
        self.connection = message
        self.ui_state.on_connection(message.state == CONNECTED)
        self.refresh_bindings()
        self.connection_changed.publish(message)

    # Notices ------------------------------------------------------------------------------------

    def notify(self, message: str, *, title: str = "", severity: Any = "information",
               timeout: float | None = None, markup: bool = True) -> None:
        """Textual's notice, and a full repaint of the screen once its toast has gone: Textual
        8.2 can take an expired toast out of the DOM and leave its cells on the terminal (seen
        over the chat's compare columns: a 10 s notice stood for minutes, until something
        repainted that corner). qlw calls this on the app's loop only."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)
        wait = self.NOTIFICATION_TIMEOUT if timeout is None else timeout
        self._toasts_until = max(self._toasts_until, time.monotonic() + wait + 1.0)
        if self._toast_watch is None:
            self._toast_watch = self.set_interval(0.25, self._watch_toasts, name="toast watch")

    def _watch_toasts(self) -> None:
        """While notices may show: a toast fewer than at the last look repaints every cell."""
        shown = len(self.screen.query("Toast"))
        if shown < self._toasts_shown:
            self.screen.refresh()
        self._toasts_shown = shown
        if shown == 0 and time.monotonic() > self._toasts_until and self._toast_watch is not None:
            self._toast_watch.stop()
            self._toast_watch = None

    # Actions -------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "restart_backend":
            worker = self._client_worker
            return self.connection.state == GONE or worker is None or worker.is_finished
        return True

    def action_restart_backend(self) -> None:
        if self._client_worker is None or self._client_worker.is_finished:
            self._start_client()
        else:
            self.backend.restart()

    async def action_quit(self) -> None:
        # Close our connection only: the backend (and its job) outlives the front end. What was
        # typed last is sent first, so that the next qlw shows it.
        await self.ui_state.flush()
        self.farewell = await self._farewell()
        await self.backend.stop()
        self.exit()

    async def _farewell(self) -> str:
        """What the shell is told after the app has gone: what keeps running, how to come back."""
        if self.connection.state != CONNECTED:
            return ("qlw: no backend was attached; `qlw` starts one (and attaches), `qlw status` "
                    "says whether one runs.")
        try:
            status = (await self.backend.request(P.Status(), timeout=3)).result or {}
        except Exception:  # noqa: BLE001 - gone meanwhile: say what is known
            status = {}
        job = status.get("job") or {}
        pid = f" (pid {status['pid']})" if status.get("pid") else ""
        doing = ""
        if job:
            progress = f", {job.get('stage') or ''} {job['done']:g}/{job['total']:g}" if job.get("total") else ""
            doing = f" with its {job.get('kind') or 'job'} job{progress}"
        return (f"qlw: the backend{pid} keeps running{doing}. `qlw` attaches again and shows what "
                "happened meanwhile; `qlw status` shows it, `qlw stop` ends it.")

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The built-in commands plus every enabled binding with an id (tabs, jobs, backend),
        so whatever has a key can also be found in the command palette."""
        yield from super().get_system_commands(screen)
        seen: set[tuple[int, str]] = set()
        for active in screen.active_bindings.values():
            binding = active.binding
            key = (id(active.node), binding.action)
            if (not binding.id or binding.system or not active.enabled or binding.action in ("quit", "app.quit")
                    or key in seen):
                continue
            seen.add(key)
            help_text = f"{binding.tooltip} ({self.get_key_display(binding)})"
            yield SystemCommand(binding.description, help_text,
                                partial(self.run_action, binding.action, active.node))
