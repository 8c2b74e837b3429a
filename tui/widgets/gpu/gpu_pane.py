"""GpuPane: the GPU tab. One card per GPU with 5-minute sparklines, the host and the backend,
the processes on the GPUs; the sampling interval (+/-); and the one-key cleanup (ctrl+f) with
its confirmation and result.

Data comes from the backend only: ``gpu.history`` on every (re)connect seeds the window, then
live ``gpu.sample`` events (coalesced by :class:`~tui.messages.BackendEvent`) extend it. Each
sample updates the data and draws once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Static

from backend import protocol as P
from tui.client import CONNECTED, GONE, RequestFailed
from tui.messages import ConnectionChanged
from tui.modals.confirm_screen import ConfirmScreen
from tui.modals.free_memory_result_screen import FreeMemoryResultScreen
from tui.widgets.backend_requests import BackendRequests
from tui.widgets.gpu.gpu_card import GpuCard
from tui.widgets.gpu.gpu_format import WINDOW_S, gpu_index, gpu_memory_fraction, no_gpu_reason
from tui.widgets.gpu.gpu_process_table import GpuProcessTable
from tui.widgets.gpu.host_card import HostCard

#: The sampling intervals +/- step through (the backend accepts 0.25 to 10 s).
INTERVALS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
#: Stopping a job before freeing waits for it to save (the backend allows it 120 s).
STOP_JOB_TIMEOUT_S = 150.0
#: gpu.free results kept for a request whose reply comes after its job.finished.
KEEP_FREE_RESULTS = 8


def seconds(s: float) -> str:
    return f"{s:g} s"


class GpuPane(BackendRequests, VerticalScroll):
    """The GPUs, the host and the backend, live."""

    BINDINGS = [
        Binding("plus", "step_interval(1)", "Sample less often", id="gpu.interval-longer", show=False,
                tooltip="Sample the GPUs less often: the next longer interval (up to 10 s)."),
        Binding("minus", "step_interval(-1)", "Sample more often", id="gpu.interval-shorter", show=False,
                tooltip="Sample the GPUs more often: the next shorter interval (down to 0.25 s)."),
    ]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        #: Samples of the last WINDOW_S seconds (by the backend's clock), oldest first.
        self.samples: deque[dict[str, Any]] = deque()
        #: The backend's sampling interval, when known.
        self.interval: float | None = None
        self.connected = False
        self._free_results: dict[str, asyncio.Future] = {}

    def compose(self) -> ComposeResult:
        yield Static("waiting for the backend…", id="gpu-status", markup=False)
        yield Static("", id="gpu-notice", markup=False)
        yield Vertical(id="gpu-cards")
        yield HostCard(id="host-card")
        yield GpuProcessTable(id="gpu-processes")

    def on_mount(self) -> None:
        self.query_one("#gpu-notice").display = False
        self.query_one(HostCard).display = False
        self.query_one(GpuProcessTable).display = False
        self.app.backend_events.subscribe(self, self.on_backend)  # type: ignore[attr-defined]
        self.app.connection_changed.subscribe(self, self.on_connection)  # type: ignore[attr-defined]
        self.on_connection(self.app.connection)  # type: ignore[attr-defined]

    # Data in ---------------------------------------------------------------------------------

    def on_backend(self, ev: P.Event) -> None:
        if ev.kind == "gpu.sample":
            self.add_sample(ev.payload)
        elif ev.kind == "job.finished" and ev.payload.get("kind") == "gpu.free":
            future = self._free_result(ev.payload.get("job_id", ""))
            if not future.done():
                future.set_result(ev.payload)

    def on_connection(self, change: ConnectionChanged) -> None:
        self.connected = change.state == CONNECTED
        if change.state == CONNECTED:
            self.load_history()
        self._show_status()

    @work(name="read the GPU history", group="gpu.history", exclusive=True, exit_on_error=False)
    async def load_history(self) -> None:
        result = await self.call(P.GpuHistory())
        self.seed(result.get("samples") or [], result.get("interval"))

    def seed(self, samples: list[dict[str, Any]], interval: float | None = None) -> None:
        """Merge ``samples`` (oldest first, as ``gpu.history`` sends them) into the window:
        what we had from before them (a restarted backend starts a new history) and live
        samples newer than them are kept. Then draw the newest."""
        if interval is not None:
            self.interval = interval
        samples = [s for s in samples if isinstance(s, dict)]
        if samples:
            first, last = samples[0].get("time", 0), samples[-1].get("time", 0)
            older = [s for s in self.samples if s.get("time", 0) < first]
            newer = [s for s in self.samples if s.get("time", 0) > last]
            self.samples = deque([*older, *samples, *newer])
        self._trim()
        self._draw()

    def add_sample(self, sample: dict[str, Any]) -> None:
        """Append one live sample and draw it."""
        self.samples.append(sample)
        self._trim()
        self._draw()

    def _trim(self) -> None:
        if not self.samples:
            return
        newest = self.samples[-1].get("time", 0)
        while self.samples and newest - self.samples[0].get("time", 0) > WINDOW_S:
            self.samples.popleft()

    @property
    def latest(self) -> dict[str, Any] | None:
        return self.samples[-1] if self.samples else None

    # Drawing ---------------------------------------------------------------------------------

    def _show_status(self) -> None:
        status = self.query_one("#gpu-status", Static)
        stale = not self.connected and self.latest is not None
        if not self.connected and self.latest is None:
            text = ("no backend: GPU state unknown" if self.app.connection.state == GONE  # type: ignore[attr-defined]
                    else "waiting for the backend…")
        elif self.latest is None:
            text = "waiting for the first sample…"
        else:
            if stale:
                parts = ["no backend: these are the last figures received"]
            else:
                every = f"every {seconds(self.interval)}" if self.interval else "live"
                parts = [f"sampling {every} (+/- to change)", "ctrl+f frees VRAM"]
            driver = self.latest.get("driver")
            if driver:
                parts.append(f"driver {driver}")
            text = " · ".join(parts)
        status.update(text)
        status.set_class(stale, "-stale")

    def _draw(self) -> None:
        sample = self.latest
        self._show_status()
        if sample is None:
            return
        gpus = [g for g in sample.get("gpus") or [] if isinstance(g, dict)]
        error = sample.get("nvml_error")

        notice = self.query_one("#gpu-notice", Static)
        if error or not gpus:
            reason = no_gpu_reason(error) if error else "the backend reports no GPU"
            notice.update(f"no NVIDIA GPU visible\n{reason}\n"
                          "Host CPU and RAM and the backend's memory are still shown below.")
        notice.display = bool(error or not gpus)

        self._draw_cards(gpus)

        host = self.query_one(HostCard)
        host.display = True
        host.show_sample(sample)

        table = self.query_one(GpuProcessTable)
        table.display = bool(gpus)
        table.show_gpus(gpus)

    def _draw_cards(self, gpus: list[dict[str, Any]]) -> None:
        box = self.query_one("#gpu-cards", Vertical)
        cards = {card.index: card for card in box.query_children(GpuCard)}
        wanted = [gpu_index(g, i) for i, g in enumerate(gpus)]
        if list(cards) != wanted:
            box.remove_children()
            cards = {index: GpuCard(index) for index in wanted}
            box.mount(*cards.values())
        history = self._histories(wanted)
        for (index, card), gpu in zip(cards.items(), gpus):
            mem, util = history[index]
            card.update_card(gpu, mem, util)

    def _histories(self, indices: list[int]) -> dict[int, tuple[list[float], list[float]]]:
        """Memory % and utilisation % of each GPU over the window (n/a samples left out)."""
        out: dict[int, tuple[list[float], list[float]]] = {i: ([], []) for i in indices}
        for sample in self.samples:
            for i, gpu in enumerate(sample.get("gpus") or []):
                lists = out.get(gpu_index(gpu, i)) if isinstance(gpu, dict) else None
                if lists is None:
                    continue
                frac = gpu_memory_fraction(gpu)
                if frac is not None:
                    lists[0].append(100 * frac)
                util = gpu.get("util_gpu")
                if isinstance(util, (int, float)):
                    lists[1].append(float(util))
        return out

    # The sampling interval ---------------------------------------------------------------------

    def action_step_interval(self, direction: int) -> None:
        current = self.interval or 1.0
        if direction > 0:
            choices = [s for s in INTERVALS if s > current]
            target = choices[0] if choices else INTERVALS[-1]
        else:
            choices = [s for s in INTERVALS if s < current]
            target = choices[-1] if choices else INTERVALS[0]
        self.set_interval_s(target)

    @work(name="set the GPU sampling interval", group="gpu.interval", exclusive=True, exit_on_error=False)
    async def set_interval_s(self, seconds_: float) -> None:
        """Ask the backend to sample every ``seconds_`` (0.25 to 10)."""
        result = await self.call(P.GpuInterval(seconds=seconds_))
        self.interval = result.get("interval", seconds_)
        self._show_status()
        self.notify(f"GPU sampling every {seconds(self.interval)}.", timeout=3)

    # Freeing the GPU memory ------------------------------------------------------------------

    def _free_result(self, job_id: str) -> asyncio.Future:
        """The future of ``job_id``'s job.finished: whichever comes first, the reply that names
        the job or its end, creates it."""
        future = self._free_results.get(job_id)
        if future is None:
            future = self._free_results[job_id] = asyncio.get_running_loop().create_future()
            while len(self._free_results) > KEEP_FREE_RESULTS:
                self._free_results.pop(next(iter(self._free_results)))
        return future

    @work(name="free the GPU memory", group="gpu.free", exclusive=True, exit_on_error=False)
    async def free_memory(self) -> None:
        """Ask the backend to drop what it holds and empty torch's cache; if a job runs, ask
        the user first. Then show what was given back and what is still held."""
        try:
            accepted = await self.call(P.FreeMemory())
        except RequestFailed as exc:
            if exc.reply.code != P.CONFIRM:
                raise
            question = ConfirmScreen(
                "Stop the running job to free the GPU memory?",
                f"The backend says: {exc.reply.reason}.",
                yes="Stop it and free", no="Keep it running",
            )
            if not await self.app.push_screen_wait(question):
                self.notify("Nothing freed: the job keeps running.", timeout=4)
                return
            self.notify("Stopping the job (it saves what it can), then freeing the GPU memory…",
                        timeout=4)
            accepted = await self.call(P.FreeMemory(stop_job=True), timeout=STOP_JOB_TIMEOUT_S)
        finished = await self._free_result(accepted.get("job_id", ""))
        status = finished.get("status")
        if status == "done":
            await self.app.push_screen_wait(FreeMemoryResultScreen(finished))
        elif status == "cancelled":
            self.notify("Freeing the GPU memory was cancelled.", severity="warning", timeout=6)
        else:
            error = (finished.get("error") or {}).get("message") or "see the backend log"
            self.notify(f"Could not free the GPU memory: {error}", severity="error",
                        markup=False, timeout=10)
