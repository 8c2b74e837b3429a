"""bench/train_speed.py --smoke: every variant runs on the CPU with the tiny model, and the
variants that compute the same thing agree on the loss.

- ``fixed`` (every row max_length long): packing puts one row in each packed sequence, so the
  plain recipe (A), qlw's defaults (B, packed), every speed option (C) and the low-memory
  setting (L: half the micro-batch, twice the accumulation) train on the same rows per step and
  log the same losses.
- ``mix``: B, C and the served B (S: a real backend process, an attached client) pack the same
  way and log the same losses; A pads instead, so its batches differ: its loss is only checked
  to be finite and near the others.
- ``big``: B packs 8 sequences a step. M (speed fast within A's peak) and N (speed lean) take no
  lever on the CPU, so they log A's losses too; U (Unsloth) needs its own site and a GPU: it is
  skipped, and the skip is said.
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
    spec = importlib.util.spec_from_file_location("train_speed_bench", ROOT / "bench" / "train_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_runs_every_variant_and_the_same_computations_agree(tiny_folder, tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "train_speed.json"
    code = bench.main(["--smoke", "--in-process", "--passes", "1", "--model", str(tiny_folder), "--out", str(out),
                       "--variants", "A,U,B,M,N,C,L,S", "--unsloth-site", str(tmp_path / "no-site")])
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text(encoding="utf-8"))
    rows = {(r["variant"], r["dataset"]): r for r in doc["rows"]}
    assert code == 0, printed
    assert set(rows) == {("A", "fixed"), ("B", "fixed"), ("C", "fixed"), ("L", "fixed"), ("M", "fixed"),
                         ("N", "fixed"), ("A", "mix"), ("B", "mix"), ("C", "mix"), ("S", "mix"), ("B", "big")}, printed
    assert any(s.startswith("U pass 1: no Unsloth site") for s in doc["skipped"]), doc["skipped"]
    assert rows[("B", "big")]["settings"]["batch"] == 8 and rows[("B", "big")]["speed_plan"]["speed"] == "fast"
    for row in rows.values():
        assert not row.get("error"), row
        for key in ("useful_tokens_per_s", "s_per_step", "final_loss", "device", "versions", "date"):
            assert row.get(key) is not None, (key, row)
        assert math.isfinite(row["final_loss"])
    # The table and the targets are printed; the effective settings of each run too.
    assert "tok/s" in printed and "targets" in printed and "packing=True" in printed
    assert rows[("B", "mix")]["settings"]["packing"] is True  # qlw's default
    assert rows[("L", "fixed")]["settings"]["batch"] * 2 == rows[("A", "fixed")]["settings"]["batch"]
    # The same computations, the same losses, step by step.
    for name in ("B", "C", "L", "M", "N"):
        assert rows[(name, "fixed")]["losses"] == pytest.approx(rows[("A", "fixed")]["losses"], abs=1e-3), name
    for name in ("C", "S"):
        assert rows[(name, "mix")]["losses"] == pytest.approx(rows[("B", "mix")]["losses"], abs=1e-4), name
    assert rows[("A", "mix")]["final_loss"] == pytest.approx(rows[("B", "mix")]["final_loss"], rel=0.05)
    # The packed runs take about the tokens per optimizer step the plain recipe takes.
    a, b = rows[("A", "mix")]["tokens_per_step"], rows[("B", "mix")]["tokens_per_step"]
    assert 0.5 < b / a < 2, (a, b)
    # The served run was measured from its events (the GPU sampler runs beside it; on a machine
    # without NVML it publishes nothing, so the count is only recorded here).
    assert rows[("S", "mix")]["event_tokens_per_s"] and rows[("B", "mix")]["event_tokens_per_s"]
    assert rows[("S", "mix")]["gpu_samples"] >= 0
