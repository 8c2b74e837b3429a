"""bench/train_dpo.py --smoke: SFT (S), DPO through qlw (D, ``ref_model=None``) and the same DPO
in plain trl with a second copy of the model as the reference (R) run on the CPU with the tiny
model, each produce a row, and D and R compute the same thing.

D's reference is the policy with its adapter switched off; R's is a second copy of the base
model: the same weights, so at every step the losses and rewards agree. The LoRA dropout stays at
the bench's 0.05: trl's ``disable_dropout`` (on by default) sets every dropout of the policy and
of the reference to 0 in both runs, and the adapter starts at B = 0, so step 1's margin is 0.
(In fp32 only: in 4-bit on a CPU, bitsandbytes packs the weights of a module in eval mode into
its bf16 inference format, so R's reference differs from D's by its rounding; on the GPU no such
path exists.)
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("train_dpo_bench", ROOT / "bench" / "train_dpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(900)  # a guard for two loaded cores; ~40 s on a quiet machine
def test_smoke_runs_sft_dpo_and_dpo_with_a_reference_copy_and_d_equals_r(tiny_folder, tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "train_dpo.json"
    code = bench.main(["--smoke", "--in-process", "--model", str(tiny_folder), "--out", str(out),
                       "--variants", "S,D,R"])
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text(encoding="utf-8"))
    rows = {r["variant"]: r for r in doc["rows"]}
    assert code == 0, printed
    assert set(rows) == {"S", "D", "R"}, printed
    steps = doc["warmup_steps"] + doc["timed_steps"]
    for name, row in rows.items():
        assert not row.get("error"), row
        for key in ("tokens_per_s", "pairs_per_s", "s_per_step", "tokens_per_step", "final_loss", "device", "versions"):
            assert row.get(key) is not None, (name, key, row)
        assert len(row["losses"]) == steps and all(math.isfinite(x) for x in row["losses"]), (name, row["losses"])
    # The pairs have the lengths asked for, and the steps processed exactly their tokens.
    data = doc["data"]
    assert data["exact"], data
    batch = data["batch"] * data["ga"]
    assert rows["S"]["tokens_per_step"] == batch * (data["prompt"] + data["response"])
    for name in ("D", "R"):
        assert rows[name]["tokens_per_step"] == batch * (2 * data["prompt"] + 2 * data["response"]), name
    assert rows["R"]["tokens_counted_per_step"] == rows["R"]["tokens_per_step"]  # trl's count, from the batches
    # DPO logs rewards at every step; SFT none.
    assert rows["S"]["rewards"] == [] and rows["S"]["final_margin"] is None
    names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    for name in ("D", "R"):
        assert [r["step"] for r in rows[name]["rewards"]] == list(range(1, steps + 1)), name
        assert math.isfinite(rows[name]["final_margin"])
    assert rows["D"]["rewards"][0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # the adapter starts at B = 0
    # D (ref_model=None, through qlw) and R (plain trl, a second model as the reference): the same, step by step.
    assert rows["D"]["losses"] == pytest.approx(rows["R"]["losses"], abs=1e-5)
    for d, r in zip(rows["D"]["rewards"], rows["R"]["rewards"]):
        for name in names:
            assert d[name] == pytest.approx(r[name], abs=1e-5), (d["step"], name)
    assert rows["D"]["losses"] != rows["S"]["losses"]
    assert doc["compare"]["d_equals_r"]["max_abs_loss_diff"] <= 1e-5
    # The table and the comparisons are printed.
    assert "tok/s" in printed and "ref_model=None saves (R - D)" in printed and "DPO beside SFT" in printed
