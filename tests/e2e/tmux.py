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
        self.tmux("new-session", "-d", "-s", name, "-x", str(size[0]), "-y", str(size[1]), f"sleep 0.5; {cmd}")

    def screen(self, name: str) -> str:
        return self.tmux("capture-pane", "-p", "-t", name)

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
        screen = ""
        while True:
            screen = self.screen(name)
            hit = found(screen)
            if hit:
                return screen, hit
            now = time.monotonic()
            state = ("\n".join(screen.splitlines()[1:]), self._home_state())
            if state != seen:
                seen, last_progress = state, now
            elif now - last_progress > limit:
                raise AssertionError(f"{what} (nothing moved for {limit:.0f} s); last screen:\n{screen}")
            time.sleep(0.2)

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
