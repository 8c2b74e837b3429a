"""End to end: the work comes back, not only the job. In the real `qlw` at 80x24, keys only: open
a dataset file, set the LoRA run (a TOML file read into the form, then the name typed), fill in
the model, type a generation setting, show the LoRA tab; `q`; `qlw`: every value is back. Then
`qlw stop` and `qlw`: back again, the dataset opened anew by the new backend. And a second
terminal attached at the same time shows the same values and a change made in the first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.waits import Budget

from tests.e2e.tmux import ROOT, Tmux, qlw_command

pytestmark = [pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
              pytest.mark.slow]

SIZE = (80, 24)
RUN_TOML = """version = 1
name = "from the file"
[model]
source = ""
[data]
max_length = 256
[lora]
r = 8
lora_alpha = 32
[training]
max_steps = 7
learning_rate = 0.001
logging_steps = 1
eval_steps = 2
save_steps = 3
"""


@pytest.fixture
def tmux():
    t = Tmux()
    yield t
    t.close()


def open_qlw(tmux: Tmux, name: str, home) -> None:
    tmux.open(name, qlw_command(home), SIZE)
    tmux.wait_for(name, "connected", timeout=120)


def press(tmux: Tmux, name: str, *keys: str) -> None:
    """Each key on its own: a key sent at once after one that moves the focus may get lost."""
    for key in keys:
        tmux.keys(name, key)
        # A lone escape byte waits to be told from the start of an escape sequence: a key sent
        # soon after it would be read as alt+key.
        time.sleep(1.0 if key == "Escape" else 0.3)


def clear_and_type(tmux: Tmux, name: str, text: str) -> None:
    time.sleep(0.3)  # keys typed at once after the focus moved or a field was cleared get lost
    press(tmux, name, "End", "C-u")  # Textual's Input: delete everything left of the cursor
    time.sleep(0.3)
    tmux.keys(name, "-l", text)
    time.sleep(0.3)


def set_everything(tmux: Tmux, name: str, data_path, toml_path) -> None:
    # Data: a file of the user's, opened by typing its path.
    press(tmux, name, "3")
    tmux.wait_for(name, "No dataset open")
    time.sleep(0.5)  # the tab's focus settles (the Open button)
    press(tmux, name, "Tab")  # the path box
    clear_and_type(tmux, name, str(data_path))
    press(tmux, name, "Enter")
    tmux.wait_for(name, "mine.jsonl · 30 rows", timeout=120)

    # LoRA: a run config file read into the form, then the run's name typed.
    press(tmux, name, "Escape", "4")
    tmux.wait_for(name, "LoRA · peft LoraConfig")
    time.sleep(1)  # the first preset button has the focus
    press(tmux, name, "Tab", "Tab")  # the run config file's path box
    time.sleep(0.3)
    tmux.keys(name, "-l", str(toml_path))
    tmux.wait_for(name, toml_path.name)
    press(tmux, name, "C-o")
    tmux.wait_for(name, "imported", timeout=30)  # "imported run.toml" where the status line has room
    press(tmux, name, "Tab", "Tab", "Tab", "Tab")  # Export, Import, the form, then the name box
    time.sleep(0.3)
    clear_and_type(tmux, name, "my run")
    tmux.wait_for(name, "my run")
    press(tmux, name, "Escape")

    # Model: the embedded tiny model filled in (f4 finds the copy the fixture put in the home).
    press(tmux, name, "2")
    tmux.wait_for(name, "Load")
    time.sleep(0.5)
    press(tmux, name, "F4")
    tmux.wait_for(name, "qlw-tiny-llama", timeout=300)

    # Chat: a generation setting.
    press(tmux, name, "6")
    tmux.wait_for(name, "settings (f2)")
    time.sleep(0.5)
    press(tmux, name, "F2")  # the settings open with the cursor in one of them
    tmux.wait_for(name, "max_new_tokens")
    time.sleep(0.3)
    clear_and_type(tmux, name, "be brief")
    tmux.wait_for(name, "be brief")
    press(tmux, name, "Escape")  # the settings stay open
    time.sleep(0.5)

    press(tmux, name, "4")  # the tab last shown
    tmux.wait_for(name, "LoRA · peft LoraConfig")
    time.sleep(0.5)


def check_everything(tmux: Tmux, name: str) -> None:
    """Every value set by :func:`set_everything` is shown (the LoRA tab comes first)."""
    screen = tmux.wait_for(name, "my run", timeout=120)  # the tab last shown, with the name typed
    assert "LoRA · peft LoraConfig" in screen, screen
    # The dataset: opened again (a job, after a backend restart), named on the LoRA tab's data line.
    screen = tmux.wait_for(name, "mine.jsonl", timeout=120)
    assert "shipped sample" not in screen, screen
    assert _field(screen, "max_length") == "256" and _field(screen, "r") == "8", screen
    assert _field(screen, "lora_alpha") == "32", screen

    press(tmux, name, "3")
    tmux.wait_for(name, "mine.jsonl · 30 rows", timeout=120)
    press(tmux, name, "2")
    tmux.wait_for(name, "qlw-tiny-llama", timeout=30)
    press(tmux, name, "6")
    screen = tmux.wait_for(name, "max_new_tokens")  # the settings open, as they were left
    assert "be brief" in screen, screen
    press(tmux, name, "4")
    tmux.wait_for(name, "LoRA · peft LoraConfig")


def _field(screen: str, label: str) -> str:
    """The value shown right after ``label`` on the screen ("" when the label is not there)."""
    import re

    m = re.search(rf"(?:^|\s){re.escape(label)}\s+[▐▌▊▎│ ]*([^\s▐▌▊▎│]+)", screen, re.M)
    return m.group(1) if m else ""


def stop_backend(home) -> None:
    out = subprocess.run([sys.executable, "-m", "tui.cli", "stop"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, QLW_HOME=str(home), PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stdout + out.stderr


def quit_qlw(tmux: Tmux, name: str) -> None:
    press(tmux, name, "Escape", "q")
    budget = Budget(60)  # load-adjusted hang guard
    while name in tmux.tmux("list-sessions", "-F", "#{session_name}", check=False).split():
        assert not budget.spent(), tmux.screen(name)
        time.sleep(0.2)


def test_every_value_comes_back_after_q_and_after_a_backend_restart(tmux, tiny_seeded, tmp_path):
    qlw_home = tiny_seeded
    data_path = tmp_path / "mine.jsonl"
    data_path.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{2 * i}."}) + "\n"
                                 for i in range(30)))
    toml_path = tmp_path / "run.toml"
    toml_path.write_text(RUN_TOML)

    open_qlw(tmux, "a", qlw_home)
    set_everything(tmux, "a", data_path, toml_path)
    quit_qlw(tmux, "a")

    open_qlw(tmux, "b", qlw_home)
    check_everything(tmux, "b")
    quit_qlw(tmux, "b")

    stop_backend(qlw_home)
    open_qlw(tmux, "c", qlw_home)  # a new backend: it holds no dataset until the pane opens it again
    check_everything(tmux, "c")

    # A second terminal attached at the same time: the same values, and a change made in the first.
    open_qlw(tmux, "d", qlw_home)
    check_everything(tmux, "d")
    press(tmux, "c", "6")
    tmux.wait_for("c", "max_new_tokens")
    press(tmux, "c", "F2", "F2")  # closed, and open again with the cursor in the same setting
    tmux.wait_for("c", "max_new_tokens")
    clear_and_type(tmux, "c", "say more")
    tmux.wait_for("c", "say more")
    press(tmux, "d", "6")
    screen = tmux.wait_for("d", "say more", timeout=60)
    assert "be brief" not in screen, screen
