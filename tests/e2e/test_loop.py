"""End to end: the whole fine-tuning loop in the real `qlw`, driven in tmux with keys only.

On the embedded default (the tiny model and the shipped sample data), as a newcomer would: load
the model, browse the data, set the run, train 10 steps of QLoRA (4-bit) watching the loss table fill, chat with
the base and then base and tuned side by side, export the transcript, free the memory, merge the
adapter and verify the merged folder, and list what an upload would send; and (in the second
test) close the terminal in the middle of training and attach a fresh `qlw` that shows every
row. Asserts on what the screen shows (and that the files it says it wrote exist).
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
source = ""{model}
[data]
max_length = 256
[training]
max_steps = {steps}
logging_steps = 5
eval_steps = 10
save_steps = 5
per_device_train_batch_size = 4
gradient_accumulation_steps = 1
learning_rate = 0.002{training}
"""
#: The run in fp32 without checkpointing (1.1 s a step at the default length on this CPU, against
#: 1.6 s in 4-bit with checkpointing), for a test whose subject is the terminal, not the
#: quantization (the 80x24 loop keeps 4-bit to the merge). Rows of 256 tokens at most, in both.
FP32 = dict(model='\nprecision = "fp32"', training="\ngradient_checkpointing = false")


@pytest.fixture
def tmux(qlw_home):
    t = Tmux(qlw_home)
    yield t
    t.close()


def open_qlw(tmux: Tmux, name: str, home, size) -> None:
    tmux.open(name, qlw_command(home), size)
    tmux.wait_for(name, "connected", timeout=60)


def load_tiny_model(tmux: Tmux, name: str) -> None:
    tmux.keys(name, "2")
    tmux.wait_for(name, "Load")
    tmux.keys(name, "F4")  # the tiny model: built on first use (the tiny_seeded tests have it)
    tmux.wait_for(name, "qlw-tiny-llama", timeout=300)
    tmux.keys(name, "F5")
    screen = tmux.wait_for(name, "loaded on cpu", timeout=120)
    assert "LlamaForCausalLM" in screen and "q_proj" in screen


def browse_sample_data(tmux: Tmux, name: str) -> None:
    tmux.keys(name, "3")
    tmux.wait_for(name, "No dataset open")
    tmux.keys(name, "Enter")  # the Open button has the focus; an empty path is the shipped sample
    tmux.wait_for(name, "585 rows", timeout=60)
    screen = tmux.wait_for(name, "boron", timeout=30)  # the first page of rows
    assert "instruction" in screen


def set_run(tmux: Tmux, name: str, toml_path, steps: int, fp32: bool = False) -> None:
    toml_path.write_text(RUN_TOML.format(steps=steps, **(FP32 if fp32 else dict(model="", training=""))))
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


def send_message(tmux: Tmux, name: str, text: str) -> None:
    """`m` into the message box, then the message once the box has the focus, then enter once the
    text shows in the box. Sent at once after `m`, the text reached whatever had the focus before
    (a two-worker run lost a whole message that way: nothing moved for 180 s)."""
    tmux.keys(name, "m")
    # The box's first cell is its placeholder's "›", under the blinking cursor once it has the focus.
    tmux.wait_until(name, lambda _: tmux.focused(name, r"^\s*(?=› message)"), "the message box never took the focus")
    tmux.keys(name, text)
    tmux.wait_for(name, text)
    tmux.keys(name, "Enter")


def chat_with_base_then_compare(tmux: Tmux, name: str) -> None:
    tmux.keys(name, "6")
    tmux.wait_for(name, "Load")
    time.sleep(0.5)
    tmux.keys(name, "F5")  # the base target: the model loaded in the Model tab
    tmux.wait_for(name, "loaded base", timeout=60)
    send_message(tmux, name, "What is the capital of Norway?")
    tmux.wait_match(name, r"\d+ tokens · first token [\d.]+ s", timeout=120)
    tmux.keys(name, "Escape", "F3")  # compare: the newest adapter beside the base
    tmux.wait_for(name, "compare: base | tuned")
    send_message(tmux, name, "Name the capital city of Norway.")

    def both_answered(screen: str) -> bool:  # two sets of figures below the compare header
        tail = screen[screen.rfind("▏ tuned"):] if "▏ tuned" in screen else ""
        return tail.count("tokens/s") >= 2 or tail.count("path") >= 2

    screen = tmux.wait_until(name, both_answered, "the compare answers never both arrived", timeout=120)
    assert "▏ base" in screen


def export_transcript(tmux: Tmux, name: str, home) -> None:
    tmux.keys(name, "Escape")  # out of the message box
    time.sleep(0.3)
    tmux.keys(name, "C-s")
    tmux.wait_for(name, "Export the conversation")
    tmux.keys(name, "Enter")
    tmux.wait_until(name, lambda _: list((home / "exports").glob("*.md")), "no transcript in exports/")
    text = next((home / "exports").glob("*.md")).read_text()
    assert "What is the capital of Norway?" in text and "Name the capital city of Norway." in text


def free_memory(tmux: Tmux, name: str) -> None:
    tmux.keys(name, "C-f")
    tmux.wait_for(name, "memory freed", timeout=60)
    screen = tmux.wait_for(name, "Dropped:", timeout=60)
    # The dropped base model is named by its kind and source (after the dataset the Data tab opened).
    assert re.search(r"Dropped:.*\bmodel\b", screen, re.S), screen
    def closed(screen: str) -> bool:  # close the result (esc), once it has the focus
        if "memory freed" in screen:
            time.sleep(0.3)
            tmux.keys(name, "Escape")
            return False
        return True

    tmux.wait_until(name, closed, "the free-memory result never closed")


def merge_and_verify(tmux: Tmux, name: str, home) -> None:
    def on_merge(screen: str) -> bool:  # the tab key may land while the previous dialog is still closing
        if "Final loss" in screen:
            return True
        tmux.keys(name, "7")
        time.sleep(0.5)
        return False

    tmux.wait_until(name, on_merge, "the Merge tab never showed")
    time.sleep(0.5)
    tmux.keys(name, "Enter")  # the newest adapter
    tmux.wait_for(name, "fits", timeout=60)  # the plan: memory and disk
    tmux.keys(name, "C-n")
    tmux.wait_for(name, "Merge ▶")
    tmux.keys(name, "F5")
    # The verdict and the table's rows paint in separate frames: wait for all of them.
    tmux.wait_until(name, lambda s: all(t in s for t in ("within the noise floor", "merged",
                                                         "trained (4-bit base + adapter)")),
                    "the merge's verification never showed its verdict and rows", timeout=240)
    assert [p for p in (home / "merged").iterdir() if (p / "config.json").exists()]
    tmux.keys(name, "C-n")  # the upload step: offline, a dry run lists the files
    tmux.wait_for(name, "local export only")
    tmux.keys(name, "qlw-tests/e2e-loop-adapter")  # the repository field has the focus; the placeholder is no name
    tmux.wait_for(name, "qlw-tests/e2e-loop-adapter")
    tmux.keys(name, "F5")
    tmux.wait_for(name, "model.safetensors", timeout=60)


def test_the_loop_in_a_real_terminal_at_80x24(tmux, tiny_seeded, tmp_path):
    qlw_home = tiny_seeded
    open_qlw(tmux, "t", qlw_home, (80, 24))
    load_tiny_model(tmux, "t")
    browse_sample_data(tmux, "t")
    set_run(tmux, "t", tmp_path / "run.toml", steps=10)
    tmux.keys("t", "F5")
    tmux.keys("t", "5")
    tmux.wait_for("t", "finished at step 10/10", timeout=180)
    # The table follows the newest row (at 80x24 it shows the last few).
    screen, _ = tmux.wait_match("t", r"^\s+10\s+\d+\.\d{4}\s+\d+\.\d{4}", timeout=10, flags=re.M)
    rows = [int(s) for s in re.findall(r"^\s+(\d+)\s+\d+\.\d{4}", screen, re.M)]
    assert rows == [5, 10], screen
    assert "Validation Loss" in screen and "adapter:" in screen
    chat_with_base_then_compare(tmux, "t")
    export_transcript(tmux, "t", qlw_home)
    free_memory(tmux, "t")
    merge_and_verify(tmux, "t", qlw_home)


def test_a_terminal_closed_mid_training_and_a_new_one_attached_at_200x50(tmux, tiny_seeded, tmp_path):
    qlw_home = tiny_seeded
    open_qlw(tmux, "first", qlw_home, (80, 24))
    load_tiny_model(tmux, "first")
    set_run(tmux, "first", tmp_path / "run.toml", steps=40, fp32=True)
    tmux.keys("first", "F5")
    tmux.keys("first", "5")
    tmux.wait_for("first", "step 5/40", timeout=120)  # rows are arriving
    tmux.kill("first")  # the SSH connection drops

    open_qlw(tmux, "second", qlw_home, (200, 50))
    size = tmux.tmux("display", "-p", "-t", "second", "#{window_width}x#{window_height}").strip()
    header = tmux.screen("second").splitlines()[0]
    assert size == "200x50" and len(header.rstrip()) > 150, (size, header)
    tmux.keys("second", "5")
    tmux.wait_for("second", "finished at step 40/40", timeout=300)
    screen, _ = tmux.wait_match("second", r"^\s+40\s+\d+\.\d{4}", timeout=10, flags=re.M)
    steps = [int(s) for s in re.findall(r"^\s+(\d+)\s+\d+\.\d{4}", screen, re.M)]
    # Every logged step once (training and validation logs of a step merged into one row).
    assert steps == list(range(5, 41, 5)), screen
