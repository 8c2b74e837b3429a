"""End to end: SFT, then DPO from that adapter, in the real `qlw`, driven in tmux with keys only.

Issue 16's loop on the embedded default: load the tiny model, train a few SFT steps on the shipped
instruction sample, open the shipped preference sample (the Data tab detects its
prompt/chosen/rejected shape), choose method dpo in the LoRA form and the SFT run's adapter as the
start adapter (offered as the input's completion), train a few DPO steps and watch DPO's columns
(rewards, margin, accuracy) fill the Train table, chat with the base beside the DPO-tuned adapter,
then merge the DPO adapter and verify it. Asserts on what the screen shows and on the files the
run says it wrote.
"""

from __future__ import annotations

import re
import shutil
import time

import pytest

from tests.e2e.test_loop import chat_with_base_then_compare, free_memory, load_tiny_model, merge_and_verify, open_qlw
from tests.e2e.tmux import ROOT, Tmux

pytestmark = [pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
              pytest.mark.slow]

SIZE = (120, 40)
STEPS = 4
RUN_TOML = """version = 1
name = "{name}"
[model]
source = ""
[training]
max_steps = {steps}
logging_steps = 2
eval_steps = {steps}
save_steps = {steps}
per_device_train_batch_size = 2
gradient_accumulation_steps = 1
learning_rate = 0.002
"""
PREFERENCE_SAMPLE = ROOT / "backend" / "samples" / "preference_sample.jsonl"
#: A Train table row: the step, then numbers (losses, rewards, ...).
ROW = r"^\s+{step}\s+-?\d+\.\d{{4}}"


@pytest.fixture
def tmux(qlw_home):
    t = Tmux(qlw_home)
    yield t
    t.close()


def tab(tmux: Tmux, name: str, times: int) -> None:
    for _ in range(times):  # one key at a time, as typed: each moves the focus once
        tmux.keys(name, "Tab")
        time.sleep(0.15)


def tab_to(tmux: Tmux, name: str, times: int, label: str, what: str) -> None:
    """Tab ``times`` and wait until the control after ``label`` (a regular expression) has the
    focus: a key sent before that could still reach the control the focus left."""
    tab(tmux, name, times)
    tmux.wait_until(name, lambda _: tmux.focused(name, label), f"{what} never took the focus")


def clear_field(tmux: Tmux, name: str) -> None:
    """ctrl+u empties the text field that has the focus (on its own: text sent in the same burst
    can be lost with it)."""
    tmux.keys(name, "C-u")
    time.sleep(0.3)


def import_run(tmux: Tmux, name: str, toml_path, run_name: str) -> None:
    """LoRA tab, run config file box, ctrl+o: the form takes the file's steps and batch."""
    toml_path.write_text(RUN_TOML.format(name=run_name, steps=STEPS))
    tmux.keys(name, "4")
    tmux.wait_for(name, "LoRA · peft LoraConfig")
    tmux.wait_for(name, "^o Import")  # the footer has the pane's keys: the focus is on its first button
    tab_to(tmux, name, 2, r"^ preset .*small-gpu", "the run config file's path box")  # past the presets
    clear_field(tmux, name)
    tmux.keys(name, str(toml_path))
    tmux.wait_for(name, toml_path.name)
    tmux.keys(name, "C-o")
    tmux.wait_for(name, f"imported {toml_path.name}", timeout=30)
    screen = tmux.wait_for(name, f"· {STEPS} steps", timeout=60)
    assert run_name in screen
    tmux.wait_until(name, checked, "the imported settings were never checked", timeout=60)


def checked(screen: str) -> bool:
    """The LoRA tab's check line holds the backend's answer for the settings as they are now."""
    result = re.search(r"^ (⧗ )?memory .*fits", screen, re.M)  # ⧗: the previous settings' result
    return bool(result and not result.group(1) and "✖" not in screen)


def train(tmux: Tmux, name: str, run_name: str) -> tuple[str, str]:
    """Start (f5; the Train tab follows the run) and wait for the end; (the screen, the adapter
    folder). The focus is still in a text field of the form: no number key while it may be."""
    header = f"{run_name} · trainable"  # this run's header: the last run's lines are gone
    for attempt in range(3):
        tmux.keys(name, "F5")
        screen = tmux.wait_until(name, lambda s: header in s or "Cannot start" in s,
                                 "the run never started", timeout=120)
        if header in screen:
            break
        # Start said no (as a notice): "yet" while something still runs or is being checked
        # (a user presses f5 again once it is done); anything else is a failure.
        assert "Cannot start yet" in screen and attempt < 2, screen
        tmux.wait_until(name, lambda s: "Cannot start" not in s and checked(s),
                        "the settings were never checked after Start said no", timeout=60)
    tmux.wait_for(name, f"finished at step {STEPS}/{STEPS}", timeout=300)
    screen, _ = tmux.wait_match(name, ROW.format(step=STEPS), timeout=30, flags=re.M)
    adapter = re.search(r"adapter: (\S+)", screen)
    assert adapter, screen
    return screen, adapter.group(1)


def logged_steps(screen: str) -> list[int]:
    return [int(s) for s in re.findall(ROW.format(step=r"(\d+)"), screen, re.M)]


def open_preference_sample(tmux: Tmux, name: str) -> None:
    tmux.keys(name, "3")
    tmux.wait_for(name, "dolly_sample.jsonl · 585 rows")
    tmux.wait_for(name, "^o Open")  # the footer has the pane's keys: the focus is on the Open button
    time.sleep(0.5)  # the tab's focus settles
    # ctrl+o would open the path already in the box (the instruction sample) again: tab to it.
    tab_to(tmux, name, 1, r"^\s*Open\b", "the path box")
    tmux.keys(name, "End")
    time.sleep(0.3)
    clear_field(tmux, name)
    tmux.keys(name, "-l", str(PREFERENCE_SAMPLE))
    # The path box holds the new path (typed elsewhere, its letters would have switched sub-tabs).
    tmux.wait_match(name, rf"Open\s+{re.escape(str(PREFERENCE_SAMPLE))}", flags=re.M)
    tmux.keys(name, "Enter")
    screen = tmux.wait_for(name, "preference_sample.jsonl · 585 rows", timeout=60)
    screen = tmux.wait_for(name, "prompt/chosen/rejected", timeout=10)  # the detected shape
    assert "chosen" in screen and "rejected" in screen
    tmux.keys(name, "Escape")  # out of the path box: the number keys switch tabs again
    # Wait until the path box has let the focus go: a number sent sooner reaches the box (under
    # load, esc and the next key can also be read together, as alt+key, which the box types).
    tmux.wait_until(name, lambda _: not tmux.focused(name, r"^\s*Open\b"), "the path box kept the focus after esc")
    time.sleep(0.5)  # and the next key is not read with the esc


def choose_dpo_from(tmux: Tmux, name: str, sft_adapter: str) -> None:
    """From the path box: Export, Import, the form, its name, then the method Select."""
    tab_to(tmux, name, 5, r"^ method\b", "the method")
    tmux.keys(name, "Enter")  # open the method's choices
    tmux.wait_for(name, "orpo")
    tmux.keys(name, "Down")
    time.sleep(0.2)
    tmux.keys(name, "Enter")  # dpo: its own settings appear
    screen = tmux.wait_for(name, "label_smoothing")
    assert re.search(r"method\s+dpo", screen) and "beta" in screen
    # The finished SFT run's adapter is offered as the start: its path completes the input.
    assert sft_adapter in screen, screen
    time.sleep(1)  # the focus settles back on the Select as its list closes
    # beta, malformed, loss_type, label_smoothing, start_adapter
    tab_to(tmux, name, 5, r"^ start_adapter\b", "the start adapter box")
    tmux.keys(name, "/")
    # The box takes the "/" (its placeholder goes) and completes it to the SFT adapter.
    tmux.wait_match(name, rf"^ start_adapter\s+{re.escape(sft_adapter)}(\s|$)", timeout=30, flags=re.M)
    tmux.keys(name, "Right")  # take the completion
    # The backend checked the DPO run from that adapter ("/" alone would be refused: ✖).
    tmux.wait_until(name, checked, "the start adapter was never taken and checked", timeout=60)


def test_sft_then_dpo_from_its_adapter_chat_and_merge(tmux, tiny_seeded, tmp_path):
    qlw_home = tiny_seeded
    open_qlw(tmux, "t", qlw_home, SIZE)
    load_tiny_model(tmux, "t")

    # SFT on the shipped instruction sample.
    tmux.keys("t", "3")
    tmux.wait_for("t", "No dataset open")
    tmux.keys("t", "Enter")  # the Open button has the focus; an empty path is the shipped sample
    tmux.wait_for("t", "dolly_sample.jsonl · 585 rows", timeout=60)
    import_run(tmux, "t", tmp_path / "sft.toml", "e2e sft")
    screen, sft_adapter = train(tmux, "t", "e2e sft")
    assert "Validation Loss" in screen and "Rewards" not in screen
    assert logged_steps(screen) == list(range(2, STEPS + 1, 2)), screen

    # DPO from that adapter on the shipped preference sample.
    open_preference_sample(tmux, "t")
    import_run(tmux, "t", tmp_path / "dpo.toml", "e2e dpo")
    choose_dpo_from(tmux, "t", sft_adapter)
    screen, dpo_adapter = train(tmux, "t", "e2e dpo")
    assert dpo_adapter != sft_adapter
    for column in ("Training Loss", "Validation Loss", "Rewards/chosen", "Rewards/rejected", "Margin", "Accuracy"):
        assert column in screen, (column, screen)
    assert logged_steps(screen) == list(range(2, STEPS + 1, 2)), screen
    run_config = (qlw_home / "runs" / dpo_adapter.split("/")[-2] / "config.toml").read_text()
    assert 'method = "dpo"' in run_config and f'start_adapter = "{sft_adapter}"' in run_config, (
        dpo_adapter, sft_adapter, run_config, screen)

    # Chat: the base, then the base beside the newest adapter (the DPO run's).
    chat_with_base_then_compare(tmux, "t")
    dpo_session = dpo_adapter.split("/")[-2]
    assert f"tuned {dpo_session[-6:]}/adapter" in tmux.screen("t")
    tmux.keys("t", "Escape")  # out of the message box, so that the number keys switch tabs
    time.sleep(0.5)  # a key right after esc would read as alt+key
    free_memory(tmux, "t")
    time.sleep(0.5)

    # Merge the newest adapter (DPO's) and verify it against the model as trained.
    merge_and_verify(tmux, "t", qlw_home)
    merged = [p for p in (qlw_home / "merged").iterdir() if (p / "config.json").exists()]
    card = (merged[0] / "README.md").read_text()
    # The merged model is the DPO run's: its card names the preference data it was trained on.
    assert len(merged) == 1 and f"| dataset | {PREFERENCE_SAMPLE}" in card, (merged, card)
