"""End to end: the whole fine-tuning loop in the real `qlw`, driven in tmux with keys only.

On the embedded default (the tiny model and the shipped sample data), as a newcomer would: load
the model, browse the data, set the run, train 20 steps watching the loss table fill, and (in
the second test) close the terminal in the middle of training and attach a fresh `qlw` that
shows every row. Asserts on what the screen shows.
"""

from __future__ import annotations

import re
import shutil
import time

import pytest

from tests.e2e.tmux import Tmux, qlw_command

pytestmark = [pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
              pytest.mark.slow]

RUN_TOML = """version = 1
name = "e2e loop"
[model]
source = ""
[training]
max_steps = {steps}
logging_steps = 5
eval_steps = 10
save_steps = 5
per_device_train_batch_size = 4
gradient_accumulation_steps = 1
learning_rate = 0.002
"""


@pytest.fixture
def tmux():
    t = Tmux()
    yield t
    t.close()


def open_qlw(tmux: Tmux, name: str, home, size) -> None:
    tmux.open(name, qlw_command(home), size)
    tmux.wait_for(name, "connected", timeout=60)


def load_tiny_model(tmux: Tmux, name: str) -> None:
    tmux.keys(name, "2")
    tmux.wait_for(name, "Load")
    tmux.keys(name, "F4")  # the tiny model: built on first use
    tmux.wait_for(name, "qlw-tiny-llama", timeout=300)
    tmux.keys(name, "F5")
    screen = tmux.wait_for(name, "loaded on cpu", timeout=120)
    assert "LlamaForCausalLM" in screen and "q_proj" in screen


def browse_sample_data(tmux: Tmux, name: str) -> None:
    tmux.keys(name, "3")
    tmux.wait_for(name, "No dataset open")
    tmux.keys(name, "Enter")  # the Open button has the focus; an empty path is the shipped sample
    screen = tmux.wait_for(name, "585 rows", timeout=60)
    assert "instruction" in screen and "boron" in screen


def set_run(tmux: Tmux, name: str, toml_path, steps: int) -> None:
    toml_path.write_text(RUN_TOML.format(steps=steps))
    tmux.keys(name, "4")
    tmux.wait_for(name, "LoRA · peft LoraConfig")
    time.sleep(1)  # the tab's focus settles (the first preset button)
    tmux.keys(name, "Tab", "Tab")  # presets, then the run config file's path box
    time.sleep(0.5)
    tmux.keys(name, str(toml_path))
    tmux.wait_for(name, toml_path.name)
    tmux.keys(name, "C-o")
    screen = tmux.wait_for(name, f"· {steps} steps", timeout=30)
    assert "trainable params: 65,536" in screen and "fits" in screen


def test_the_loop_in_a_real_terminal_at_80x24(tmux, qlw_home, tmp_path):
    open_qlw(tmux, "t", qlw_home, (80, 24))
    load_tiny_model(tmux, "t")
    browse_sample_data(tmux, "t")
    set_run(tmux, "t", tmp_path / "run.toml", steps=20)
    tmux.keys("t", "F5")
    tmux.keys("t", "5")
    tmux.wait_for("t", "finished at step 20/20", timeout=180)
    # The table follows the newest row (at 80x24 it shows the last few).
    screen, _ = tmux.wait_match("t", r"^\s+20\s+\d+\.\d{4}\s+\d+\.\d{4}", timeout=10, flags=re.M)
    rows = [int(s) for s in re.findall(r"^\s+(\d+)\s+\d+\.\d{4}", screen, re.M)]
    assert rows == list(range(rows[0], 21, 5)) and len(rows) >= 2, screen
    assert "Validation Loss" in screen and "adapter:" in screen


def test_a_terminal_closed_mid_training_and_a_new_one_attached_at_200x50(tmux, qlw_home, tmp_path):
    open_qlw(tmux, "first", qlw_home, (80, 24))
    load_tiny_model(tmux, "first")
    set_run(tmux, "first", tmp_path / "run.toml", steps=60)
    tmux.keys("first", "F5")
    tmux.keys("first", "5")
    tmux.wait_for("first", "step 5/60", timeout=120)  # rows are arriving
    tmux.kill("first")  # the SSH connection drops

    open_qlw(tmux, "second", qlw_home, (200, 50))
    tmux.keys("second", "5")
    tmux.wait_for("second", "finished at step 60/60", timeout=300)
    screen, _ = tmux.wait_match("second", r"^\s+60\s+\d+\.\d{4}", timeout=10, flags=re.M)
    steps = [int(s) for s in re.findall(r"^\s+(\d+)\s+\d+\.\d{4}", screen, re.M)]
    # Every logged step once (training and validation logs of a step merged into one row).
    assert steps == list(range(5, 61, 5)), screen
