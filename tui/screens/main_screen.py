"""MainScreen: the shell; one tab per capability, the job line, the footer, and a notification
for each backend error that no job owns (no pane shows it).

The tab last shown is the shell's state ``"shell"`` (tui/ui_state.py): the next ``qlw`` opens on
it. A second terminal attached at the same time keeps its own tab (each terminal looks where its
user looks); it takes the stored one only when it attaches."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Input, TabbedContent, TabPane, Tabs, TextArea

from backend import protocol as P
from tui.client import CONNECTED
from tui.ui_state import UiChange
from tui.widgets.gpu.gpu_pane import GpuPane
from tui.widgets.shell.app_header import AppHeader
from tui.widgets.shell.error_notice import TITLE, error_notice
from tui.widgets.shell.footer import QlwFooter
from tui.widgets.shell.job_indicator import JobIndicator

if TYPE_CHECKING:
    from tui.widgets.data.data_pane import DataPane

#: (tab id, title, pane class or "module:class", what the tab is for): keys 1..8 in this order.
#: The first tab's pane paints at once; the others are imported and mounted just after the first
#: paint (issue 15: their ~760 widgets took a cold first paint from ~0.5 s to ~2 s).
TABS = [
    ("gpu", "GPU", GpuPane, "the card's memory, utilisation and temperature"),
    ("model", "Model", "tui.widgets.model.model_pane:ModelPane", "load the base model and inspect it"),
    ("data", "Data", "tui.widgets.data.data_pane:DataPane", "load and preview a dataset"),
    ("lora", "LoRA", "tui.widgets.lora.lora_pane:LoraPane", "the adapter's and the run's settings"),
    ("train", "Train", "tui.widgets.train.train_pane:TrainPane", "start, follow and stop a training run"),
    ("chat", "Chat", "tui.widgets.chat.chat_pane:ChatPane", "talk to the base model or a trained adapter"),
    ("merge", "Merge", "tui.widgets.merge.merge_pane:MergePane",
     "merge an adapter into its base model and upload it"),
    ("sessions", "Sessions", "tui.widgets.sessions.runs_pane:RunsPane",
     "past and present runs: open, compare, rename, delete; every session"),
]


def pane_class(pane: type | str) -> type:
    """A TABS entry's pane class (its module imported now if named as "module:class")."""
    if isinstance(pane, str):
        module, _, name = pane.partition(":")
        return getattr(importlib.import_module(module), name)
    return pane


#: The key of the shell's state in the backend (tui/ui_state.py).
STATE_KEY = "shell"


class MainScreen(Screen):
    """The one screen of the shell."""

    BINDINGS = [
        # First of the shell's keys, so that the footer keeps it at 80 columns (issue 15).
        Binding("q", "app.quit", "Quit", id="app.quit",
                tooltip="Quit qlw. The backend keeps running, and any job with it."),
        *(
            Binding(str(n), f"show_tab('{tab}')", f"{title} tab", id=f"tab.{tab}", show=False,
                    tooltip=f"Show the {title} tab: {what}.")
            for n, (tab, title, _, what) in enumerate(TABS, 1)
        ),
        Binding("escape", "leave_field", "Leave field", id="focus.leave-field", show=False,
                tooltip="Leave the text field being typed in, so that the number keys switch tabs again."),
        Binding("question_mark", "show_keys", "Keys", id="help.keys",
                tooltip="Show every key of this tab, and the keys that work everywhere."),
        Binding("ctrl+t", "prepare_tiny", "Tiny model", id="job.prepare-tiny",
                tooltip="Build the embedded tiny model in the data home (a backend job), "
                        "to try every step in seconds."),
        Binding("ctrl+g", "cancel_job", "Cancel job", id="job.cancel",
                tooltip="Ask the backend's running job to stop; it saves what it can first."),
        Binding("ctrl+f", "free_vram", "Free VRAM", id="gpu.free-vram",
                tooltip="Free the GPU memory the backend holds (models, trainers, caches) and "
                        "show what was given back; asks first if a job runs."),
    ]

    def compose(self) -> ComposeResult:
        yield AppHeader(id="app-header")
        with TabbedContent(initial=TABS[0][0], id="tabs"):
            for n, (tab, title, pane, _) in enumerate(TABS, 1):
                with TabPane(f"{n} {title}", id=tab):
                    if n == 1:  # the others mount after the first paint (_mount_next_pane)
                        yield pane_class(pane)(id=f"{tab}-pane")
        yield JobIndicator(id="job-indicator")
        yield QlwFooter(compact=True)  # every key a little tighter: q Quit stays at 80 columns

    @property
    def panes_mounted(self) -> bool:
        """Every tab's pane is mounted (and subscribed to the app's events)."""
        return not self._unmounted_tabs

    def when_panes_mounted(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` once every tab's pane has mounted: the hidden tabs' panes mount just
        after the first paint, and the client must not attach (and replay) before they listen."""
        if self.panes_mounted:
            callback()
        else:
            self._when_mounted.append(callback)

    async def _mount_next_pane(self) -> None:
        """Mount the next hidden tab's pane, then ask for the one after it after the next refresh
        (one pane per frame: the GPU tab keeps drawing and keys keep working meanwhile)."""
        tab, pane = self._unmounted_tabs[0]
        tabs = self.query_one("#tabs", TabbedContent)
        await tabs.get_pane(tab).mount(pane_class(pane)(id=f"{tab}-pane"))
        self._unmounted_tabs.pop(0)
        if tabs.active == tab and not isinstance(self.focused, (Input, TextArea)):
            self._focus_in_pane()  # its key was pressed before the pane was there
        if self._unmounted_tabs:
            self.call_after_refresh(self._mount_next_pane)
            return
        waiting, self._when_mounted = self._when_mounted, []
        for callback in waiting:
            callback()

    def on_mount(self) -> None:
        self._unmounted_tabs: list[tuple[str, type | str]] = [(tab, pane) for tab, _, pane, _ in TABS[1:]]
        self._when_mounted: list[Callable[[], object]] = []
        # After the first paint. (While the first screen mounts the app is not running yet, and
        # Textual drops a call_after_refresh made then: the app's queue asks for it once it runs.)
        self.app.call_later(self.call_after_refresh, self._mount_next_pane)
        self.app.backend_events.subscribe(self, self.on_backend)  # type: ignore[attr-defined]
        ui_state = getattr(self.app, "ui_state", None)
        if ui_state is not None:
            ui_state.changed.subscribe(self, self.on_ui_state)

    def on_ui_state(self, change: UiChange) -> None:
        if change.key == STATE_KEY and change.replay and isinstance(change.value, dict):
            tab = change.value.get("tab")
            if tab in {t for t, *_ in TABS} and self.query_one("#tabs", TabbedContent).active != tab:
                self.action_show_tab(tab)

    @on(TabbedContent.TabActivated, "#tabs")
    def _tab_shown(self, event: TabbedContent.TabActivated) -> None:
        ui_state = getattr(self.app, "ui_state", None)
        if ui_state is not None:
            # The tab shown now: activations may be queued behind one another.
            ui_state.set(STATE_KEY, {"tab": self.query_one("#tabs", TabbedContent).active})

    def on_backend(self, ev: P.Event) -> None:
        """An error no job owns (no pane shows it): a notification, with what to do."""
        text = error_notice(ev)
        if text:
            self.notify(text, title=TITLE, severity="error", markup=False, timeout=15)

    def on_data_pane_settings_changed(self, message: DataPane.SettingsChanged) -> None:
        # The LoRA tab's data line and check follow the Data tab even while the LoRA tab is the
        # one shown (a dataset opened again after a re-attach, or in another terminal).
        from tui.widgets.lora.lora_pane import LoraPane

        for pane in self.query(LoraPane):
            pane.data_changed()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "free_vram":
            # Only a connected backend can free anything; hidden (footer, palette) until then.
            return self.app.connection.state == CONNECTED  # type: ignore[attr-defined]
        return super().check_action(action, parameters)

    def action_leave_field(self) -> None:
        """From a text field to the pane's first other control, so that both the number keys and
        the pane's own keys work (a pane's own esc, e.g. stopping an answer, comes first)."""
        if isinstance(self.focused, (Input, TextArea)):
            self._focus_in_pane()

    def on_screen_resume(self) -> None:
        # A closed dialog gives the focus back to where it was; a text field there would take the
        # next key as text (a tab's number became a chat message): the pane's controls get it.
        if isinstance(self.focused, (Input, TextArea)):
            self._focus_in_pane()

    def action_show_tab(self, tab: str) -> None:
        """Show ``tab`` and put the focus in it (or on the tab bar if nothing there takes it).

        Text fields are skipped: they would swallow the number keys that switch tabs."""
        tabs = self.query_one(TabbedContent)
        tabs.active = tab
        self._focus_in_pane()

    def _focus_in_pane(self) -> None:
        """Focus the shown pane's first control that is not a text field (else the tab bar)."""
        tabs = self.query_one(TabbedContent)
        pane = tabs.get_pane(tabs.active)
        for widget in pane.query("*"):
            if widget.focusable and not isinstance(widget, (Input, TextArea)):
                widget.focus()
                return
        tabs.query_one(Tabs).focus()

    def action_show_keys(self) -> None:
        from tui.modals.keys_screen import KeysScreen, pane_keys

        tabs = self.query_one(TabbedContent)
        pane = tabs.get_pane(tabs.active)
        title = next((t for tab, t, _, _ in TABS if tab == tabs.active), tabs.active)
        everywhere = [b for b in (*self.app.BINDINGS, *self.BINDINGS)
                      if isinstance(b, Binding) and b.id and not b.id.startswith("tab.")]
        tab_keys = Binding("1,2,3,4,5,6,7,8", "show_tab", "Tabs", id="tab.any",
                           tooltip=", ".join(f"{n} {t}" for n, (_, t, _, _) in enumerate(TABS, 1)))
        self.app.push_screen(KeysScreen(f"the {title} tab", pane_keys(pane), [tab_keys, *everywhere]))

    def action_prepare_tiny(self) -> None:
        self.query_one(JobIndicator).prepare_tiny()

    def action_cancel_job(self) -> None:
        self.query_one(JobIndicator).cancel_job()

    def action_free_vram(self) -> None:
        self.query_one(GpuPane).free_memory()
