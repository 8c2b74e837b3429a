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


class Tmux:
    """A private tmux server (its own socket) running one command per session."""

    def __init__(self):
        self.sock = f"qlw-test-{os.getpid()}-{next(_SERVERS)}"  # a fresh server per test

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
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen(name)
            if text in screen:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never appeared on the screen; last screen:\n{screen}")

    def wait_match(self, name: str, pattern: str, timeout: float = 60.0, flags=0):
        """Wait until the screen matches the regular expression; returns (screen, match)."""
        import re

        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen(name)
            m = re.search(pattern, screen, flags)
            if m:
                return screen, m
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} never matched the screen; last screen:\n{screen}")

    def kill(self, name: str) -> None:
        self.tmux("kill-session", "-t", name, check=False)

    def close(self) -> None:
        self.tmux("kill-server", check=False)
