"""A private tmux server for end-to-end tests: open the real `qlw`, send keys, read the screen."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_SERVERS = itertools.count()


def qlw_command(home: Path) -> str:
    """The shell command that runs `qlw` on ``home`` as a user would (from another folder)."""
    env = f"QLW_HOME={home} PYTHONPATH={ROOT} TERM=xterm-256color HF_HUB_OFFLINE=1"
    return f"cd {tempfile.gettempdir()} && env {env} {sys.executable} -m tui.cli"


#: Seconds a wait lets pass with nothing moving on the screen or in the data home before it
#: fails (QLW_TEST_STALL_S overrides; the per-call ``timeout`` raises it further).
STALL_S = float(os.environ.get("QLW_TEST_STALL_S", "180"))


#: Textual's default dark theme at 256 colours (TERM=xterm-256color, as :func:`qlw_command` sets):
#: a focused Input or Select is drawn on colour 235 (234 without the focus), an Input's cursor
#: cell on 253, and the text an Input selects as it takes the focus on 24.
FOCUS_BACKGROUNDS = {"235", "253", "24"}


def _cells(line: str) -> tuple[str, list[str | None]]:
    """A captured line's text and, for each character, its background colour (the 256-colour
    number as text, None for the default)."""
    import re

    text: list[str] = []
    backgrounds: list[str | None] = []
    bg: str | None = None
    for i, part in enumerate(re.split(r"\x1b\[([0-9;]*)m", line)):
        if i % 2:  # an SGR sequence: follow the background through it
            codes = part.split(";") if part else ["0"]
            j = 0
            while j < len(codes):
                if codes[j] in ("0", "49"):
                    bg = None
                elif codes[j] == "48" and j + 2 < len(codes) and codes[j + 1] == "5":
                    bg = codes[j + 2]
                    j += 2
                elif codes[j] in ("38", "48") and j + 1 < len(codes) and codes[j + 1] == "2":
                    j += 4  # a 24-bit colour: not used at 256 colours
                elif codes[j] == "38" and j + 2 < len(codes):
                    j += 2
                j += 1
        else:
            text.append(part)
            backgrounds.extend([bg] * len(part))
    return "".join(text), backgrounds


class Tmux:
    """A private tmux server (its own socket) running one command per session. ``home``: the
    data home whose files count as progress for the waits."""

    def __init__(self, home: Path | None = None):
        self.sock = f"qlw-test-{os.getpid()}-{next(_SERVERS)}"  # a fresh server per test
        self.home = Path(home) if home is not None else None

    def tmux(self, *args: str, check=True) -> str:
        out = subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {out.stderr}")
        return out.stdout

    def open(self, name: str, cmd: str, size: tuple[int, int]) -> None:
        # A detached session's window can reach its -x/-y size only just after the command starts
        # (tmux 3.3): a program that reads its size at once may keep 80x24. Start it a moment later.
        args = ("new-session", "-d", "-s", name, "-x", str(size[0]), "-y", str(size[1]), f"sleep 0.5; {cmd}")
        for attempt in range(5):
            try:
                self.tmux(*args)
                return
            except RuntimeError as exc:
                # The last session was just killed: the server is still exiting, and a new session
                # asked of it then fails. Once it has gone, the same call starts a new server.
                if "server exited unexpectedly" not in str(exc) or attempt == 4:
                    raise
                time.sleep(0.5)

    def screen(self, name: str) -> str:
        return self.tmux("capture-pane", "-p", "-t", name)

    def styled_screen(self, name: str) -> str:
        """The screen with its colours (SGR escape sequences), as :meth:`focused` reads it."""
        return self.tmux("capture-pane", "-p", "-e", "-t", name)

    def focused(self, name: str, label: str) -> bool:
        """Whether the control right after ``label`` (a regular expression matched on the first
        line of the screen it matches) has the focus: its first character is drawn on the focus
        background (or is an Input's cursor). A key sent right after one that moves the focus can
        reach the widget that had it before (Textual routes a key to the focused widget before
        the last key's binding has moved the focus): wait for this first."""
        import re

        for line in self.styled_screen(name).splitlines():
            text, backgrounds = _cells(line)
            m = re.search(label, text)
            if m is None:
                continue
            rest = text[m.end():]
            start = m.end() + len(rest) - len(rest.lstrip(" "))
            return start < len(text) and backgrounds[start] in FOCUS_BACKGROUNDS
        return False

    def keys(self, name: str, *keys: str) -> None:
        self.tmux("send-keys", "-t", name, *keys)

    def wait_for(self, name: str, text: str, timeout: float = 60.0) -> str:
        """Wait until ``text`` is on the screen; fail only when nothing moved for long (see
        :meth:`wait_match`)."""
        return self._wait(name, lambda screen: text in screen or None, timeout,
                          f"{text!r} never appeared on the screen")[0]

    def wait_match(self, name: str, pattern: str, timeout: float = 60.0, flags=0):
        """Wait until the screen matches the regular expression; returns (screen, match)."""
        import re

        return self._wait(name, lambda screen: re.search(pattern, screen, flags), timeout,
                          f"{pattern!r} never matched the screen")

    def wait_until(self, name: str, found, what: str, timeout: float = 60.0):
        """Wait until ``found(screen)`` is true (it may also send keys or look at files); the
        screen. Fails like :meth:`wait_for`: only when nothing moved for long."""
        return self._wait(name, found, timeout, what)[0]

    def _wait(self, name: str, found, timeout: float, what: str):
        """Poll the screen until ``found(screen)``. A wait waits for progress, not for a clock: it
        fails when neither the screen (below its header, whose GPU line always moves) nor the
        watched data home changed for ``max(timeout, STALL_S)`` seconds, so a machine under
        load slows a test down without failing it (issue 15)."""
        limit = max(timeout, STALL_S)
        last_progress = time.monotonic()
        seen: tuple = ()
        screen = header = ""
        while True:
            screen = self.screen(name)
            hit = found(screen)
            if hit:
                return screen, hit
            now = time.monotonic()
            state = ("\n".join(screen.splitlines()[1:]), self._home_state())
            if state != seen:
                seen, last_progress, header = state, now, screen.split("\n", 1)[0]
            elif now - last_progress > limit:
                # A header that kept moving (its CPU figure) says the app still paints.
                painted = "the header still moved" if screen.split("\n", 1)[0] != header else "the header too stood still"
                raise AssertionError(f"{what} (nothing moved for {limit:.0f} s; {painted}); last screen:\n{screen}"
                                     f"{self.stacks(name, screen)}")
            time.sleep(0.2)

    def stacks(self, name: str, screen: str) -> str:
        """Where the pane's processes and the backend (its pid read off the header) are: their
        Python stacks by py-spy, when it is installed (a stalled wait says whether the app hangs
        or waits on the backend); "" without it."""
        import re
        import shutil

        spy = shutil.which("py-spy") or (str(Path(sys.executable).parent / "py-spy")
                                         if (Path(sys.executable).parent / "py-spy").exists() else None)
        if spy is None:
            return ""
        pids = []
        pane = self.tmux("display-message", "-p", "-t", name, "#{pane_pid}", check=False).strip()
        todo = [pane] if pane.isdigit() else []
        while todo:  # the pane's shell and everything under it
            pid = todo.pop()
            pids.append(pid)
            out = subprocess.run(["ps", "-o", "pid=", "--ppid", pid], capture_output=True, text=True).stdout
            todo.extend(out.split())
        m = re.search(r"backend pid (\d+)", screen)
        if m:
            pids.append(m.group(1))
        parts = []
        for pid in pids:
            out = subprocess.run([spy, "dump", "--pid", pid], capture_output=True, text=True, timeout=60)
            if out.returncode == 0:
                parts.append(f"--- py-spy dump --pid {pid}\n{out.stdout}{out.stderr}")
        return "\n\nstacks:\n" + "\n".join(parts) if parts else ""

    def _home_state(self) -> tuple:
        """Sizes and times of the watched data home's files (its log, store, runs)."""
        if self.home is None or not self.home.exists():
            return ()
        out = []
        for folder, _, files in os.walk(self.home):
            for f in files:
                try:
                    st = os.stat(os.path.join(folder, f))
                except OSError:
                    continue
                out.append((f, st.st_size, st.st_mtime_ns))
        return tuple(sorted(out))

    def kill(self, name: str) -> None:
        self.tmux("kill-session", "-t", name, check=False)

    def close(self) -> None:
        self.tmux("kill-server", check=False)
