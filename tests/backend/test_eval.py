"""Evaluation (backend/evaluate.py) and the chat benchmark's smoke run, on the tiny model on the
CPU: perplexity against exp of the mean token loss computed here with the model's own loss,
`qlw eval` printing its table, the exports, and `bench/chat.py --smoke`."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
import math
import subprocess
import sys

import pytest
import torch

from backend import chat, evaluate, models, protocol as P
from backend.holdings import HOLDINGS
from tests.conftest import ROOT
from tests.backend.test_merge import setup  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow

TEXT = ("Copper is a soft, malleable and ductile metal with very high thermal and electrical conductivity. "
        "Iron is the most common element on Earth by mass, forming much of its outer and inner core. ") * 12


@pytest.fixture
def clean_engine():
    chat.ENGINE.release()
    chat.ENGINE.last_base_settings = None
    models.release_base_model()
    yield chat.ENGINE
    chat.ENGINE.release()
    chat.ENGINE.last_base_settings = None
    chat.ENGINE.merged_precision = "saved"
    models.release_base_model()


def test_merged_rows_at_the_end_run_with_the_base_and_its_decode_copy_let_go(setup, tmp_path, clean_engine,
                                                                            monkeypatch):
    """So that the merged model has the memory and its peak is its own: nothing of the base
    (the 4-bit model, the fast path's decode copy) stays alive once only merged rows are left."""
    import gc
    import weakref

    from backend import merge

    monkeypatch.setenv(chat.FAST_ENV, "1")  # the fast path on the CPU too
    home, _base, adapter = setup
    merged = merge.run_merge({"adapter": str(adapter), "out": "eval-merged-2", "dtype": "fp32", "into": "dequantized",
                              "max_shard_size": "5GB", "verify": False}, home, chat.QuietContext())["out"]
    alive = {}

    def on_row(row):
        if row["target"] == "base":
            assert row["path"] == "fast" and "decode copy" in row["note"]
            alive["base"], alive["copy"] = weakref.ref(HOLDINGS.get("base")), weakref.ref(clean_engine.decode_copy())
        elif row["target"].startswith("merged:"):  # while the evaluation still runs
            gc.collect()
            alive["gone"] = alive["base"]() is None and alive["copy"]() is None
            alive["held"] = HOLDINGS.get("base") is None and HOLDINGS.get(chat.HOLD_MERGED) is not None

    rows = evaluate.evaluate([f"tuned:{adapter}", "base", f"merged:{merged}"], home, prompts=["Name a metal."], runs=1,
                             max_new_tokens=2, on_row=on_row)
    assert [r["target"].split(":")[0] for r in rows] == ["tuned", "base", "merged"]
    assert alive["gone"] and alive["held"]


def test_a_merged_folder_is_evaluated_as_saved_not_quantised_again(setup, tmp_path, clean_engine):
    """A bf16 merge into the dequantised 4-bit base scores as the tuned model does; loaded in
    4-bit again (the base's settings) it loses much of the adapter's change, which the row says."""
    from backend import merge

    home, _base, adapter = setup
    merged = merge.run_merge({"adapter": str(adapter), "out": "eval-merged", "dtype": "bf16", "into": "dequantized",
                              "max_shard_size": "5GB", "verify": False}, home, chat.QuietContext())["out"]
    assert chat.saved_precision(Path(merged)) == "bf16"
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    targets = [f"tuned:{adapter}", "base", f"merged:{merged}"]
    rows = evaluate.evaluate(targets, home, prompts=["Name a metal."], runs=1, max_new_tokens=2, text_path=str(text))
    tuned, base, as_saved = (r["perplexity"] for r in rows)
    assert "loaded in bf16, as saved" in rows[2]["note"]
    assert as_saved == pytest.approx(tuned, rel=2e-3) and abs(base - tuned) > 20 * abs(as_saved - tuned)
    clean_engine.merged_precision = "base"
    again = evaluate.evaluate([f"merged:{merged}"], home, prompts=["Name a metal."], runs=1, max_new_tokens=2,
                              text_path=str(text))[0]
    assert "loaded in 4-bit nf4 + double quant" in again["note"]
    assert abs(again["perplexity"] - tuned) > 5 * abs(as_saved - tuned)  # 748.7 tuned: 748.2 saved, 754.0 again


def test_perplexity_is_exp_of_the_mean_token_loss(tiny_folder, tmp_path, clean_engine):
    models.load_job(P.LoadModel(source=str(tiny_folder), precision="fp32", device="cpu"))(chat.QuietContext())
    base, tokenizer = HOLDINGS.get("base"), HOLDINGS.get("tokenizer")
    seqs = evaluate.text_sequences(tokenizer, TEXT, window=64)
    assert len(seqs) >= 3
    ppl, n = evaluate.perplexity(lambda ids: clean_engine.logits(chat.parse_target("base"), ids, last_only=False), seqs)
    # Independently: transformers' own loss (mean over each window's predicted tokens), weighted.
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, _mask in seqs:
            x = torch.tensor([ids])
            loss = base(input_ids=x, labels=x).loss
            total += float(loss) * (len(ids) - 1)
            count += len(ids) - 1
    assert n == count
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    # A mask leaves tokens out of the mean.
    ids = seqs[0][0]
    logits = clean_engine.logits(chat.parse_target("base"), ids, last_only=False)
    half = [0] * (len(ids) // 2) + [1] * (len(ids) - len(ids) // 2)
    _nll, counted = evaluate.token_nll(logits, ids, half)
    assert counted == sum(half[1:])


def test_qlw_eval_prints_the_table_and_exits_0(tiny_folder, tmp_path, capsys, clean_engine):
    from backend.__main__ import main

    models.load_job(P.LoadModel(source=str(tiny_folder), precision="fp32", device="cpu"))(chat.QuietContext())
    adapter = chat.make_random_adapter(HOLDINGS.get("base"), tmp_path / "adapter", r=4, lora_alpha=8)
    models.release_base_model()
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a metal.\n\nWhat is iron?\n", encoding="utf-8")
    out_csv, out_md = tmp_path / "rows.csv", tmp_path / "table.md"
    code = main(["eval", "--base", str(tiny_folder), "--adapter", str(adapter), "--precision", "fp32",
                 "--device", "cpu", "--prompts", str(prompts), "--runs", "2", "--max-new-tokens", "4",
                 "--text", str(text), "--home", str(tmp_path / "home"), "--csv", str(out_csv),
                 "--markdown", str(out_md)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    lines = stdout.splitlines()
    assert lines[0].startswith("| target | size | load s | gen s (mean) | gen s (std) | tokens/s | peak memory | "
                               "perplexity |")
    rows = [line for line in lines[2:] if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == ["| base", f"| tuned ({tmp_path.name})"]  # the run folder's name
    assert out_md.read_text(encoding="utf-8") == stdout
    table = list(csv.DictReader(io.StringIO(out_csv.read_text(encoding="utf-8"))))
    assert [r["target"] for r in table] == ["base", f"tuned:{adapter.resolve()}"]
    for r in table:
        assert float(r["perplexity"]) > 1 and int(r["ppl_tokens"]) > 100 and r["runs"] == "2"
        assert float(r["gen_mean_s"]) > 0 and float(r["tokens_per_s"]) > 0 and int(r["size_bytes"]) > 0
    assert table[0]["perplexity"] != table[1]["perplexity"]  # the adapter changes the model
    assert main(["eval", "--home", str(tmp_path / "home")]) == 2  # nothing named


def test_eval_tables_and_row_events():
    row = {"target": "base", "label": "base", "size_bytes": 3 * 1024**3, "load_s": 1.5, "gen_mean_s": 2.0,
           "gen_std_s": 0.1, "tokens_per_s": 31.0, "peak_bytes": 5 * 1024**3, "perplexity": 7.25, "ppl_tokens": 900,
           "runs": 3, "device": "cuda:0", "path": "fast", "note": "a | b"}
    P.build(P.EvalRow, row, "eval.row")
    md = evaluate.markdown_table([row])
    assert "| base | 3.00 GiB | 1.500 | 2.000 | 0.100 | 31.0 | 5.00 GiB | 7.250 | 900 | fast |" in md
    assert list(csv.DictReader(io.StringIO(evaluate.csv_text([row]))))[0]["perplexity"] == "7.25"


def test_bench_chat_smoke_runs_and_writes_its_figures(tiny_folder, tmp_path):
    out = tmp_path / "chat.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "chat.py"), "--smoke", "--model", str(tiny_folder),
                           "--tokens", "4", "--runs", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "qlw fast" in proc.stdout and "max|Δlogit|" in proc.stdout
    record = json.loads(out.read_text())
    assert set(record["rows"]) == {"bare/base", "bare/tuned", "qlw/base", "qlw/tuned"}
    for key in ("qlw/base", "qlw/tuned"):
        row = record["rows"][key]
        assert row["path"] == "fast" and row["tokens"] == [4] and row["max_logit_diff"] < 1e-4 and row["argmax_equal"]
        # On the CPU the copy computes in float32, so it is the float32 reference itself.
        assert row["fp32_max_logit_diff"] == 0.0 and row["fp32_argmax_equal"]
        assert row["greedy_tokens_equal_to_bare"] == 4 and row["greedy_tokens_equal_to_fp32"] == 4
    assert record["phases"]["reference"]["status"] == "done"
    assert record["rows"]["bare/tuned"]["fp32_max_logit_diff"] < 1e-4
    assert record["versions"]["transformers"] and record["device"].startswith("CPU")


def test_bench_chat_keeps_to_its_budget(tiny_folder, tmp_path):
    """Out of budget: every phase is skipped, said so in the table and the JSON (written anyway).
    And the timed runs stop before one that would pass the deadline, keeping at least one."""
    import importlib

    out = tmp_path / "chat.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "chat.py"), "--smoke", "--model", str(tiny_folder),
                           "--tokens", "4", "--runs", "1", "--budget", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("skipped: budget") == 4 and "INCOMPLETE" in proc.stdout
    record = json.loads(out.read_text())
    assert record["rows"] == {} and not record["complete"] and record["budget_s"] == 0
    assert [record["phases"][k]["status"] for k in ("qlw/base", "qlw/tuned", "bare/base", "bare/tuned")] == ["skipped"] * 4
    bench = importlib.import_module("bench.chat")
    clock = iter(range(100))
    calls = []

    def one():
        calls.append(1)
        return 10.0, 0.1, 4, None

    real = bench.time.perf_counter
    bench.time.perf_counter = lambda: float(next(clock))
    try:
        times, _, counts, _, cut = bench._timed(one, 3, deadline=5.0)  # 1 run, then 1 + 10 > 5: stop
    finally:
        bench.time.perf_counter = real
    assert times == [10.0] and counts == [4] and cut == 2 and len(calls) == 1
    assert bench._timed(one, 2, deadline=None)[4] == 0


def test_eval_job_scores_the_runs_validation_split(tiny_folder, tmp_path, clean_engine):
    """eval.run's job on a session's adapter: the base's settings and the validation rows come
    from the run's config.toml; the rows are eval.row events that fit the protocol, and the
    perplexity is exp of the mean loss over the loss-masked tokens of those rows."""
    from backend import data as D, train_config as TC
    from tests.backend.test_chat import Ctx

    home = tmp_path / "home"
    run = home / "runs" / "s1"
    cfg = TC.defaults()
    cfg["name"] = "s1"
    cfg["model"].update(source=str(tiny_folder), precision="fp32", device="cpu")
    cfg["data"]["max_length"] = 128
    run.mkdir(parents=True)
    (run / "config.toml").write_text(TC.dumps_toml(cfg), encoding="utf-8")
    models.load_job(P.LoadModel(source=str(tiny_folder), precision="fp32", device="cpu"))(chat.QuietContext())
    adapter = chat.make_random_adapter(HOLDINGS.get("base"), run / "adapter", r=4, lora_alpha=8)
    models.release_base_model()
    ctx = Ctx()
    params = P.EvalRun(targets=[f"tuned:{adapter}", "base"], prompts=["Name a metal."], runs=2, max_new_tokens=3)
    result = evaluate.eval_job(params, home)(ctx)
    rows = [p for k, p in ctx.events if k == "eval.row"]
    assert [r["target"] for r in rows] == [f"tuned:{adapter.resolve()}", "base"] == [r["target"] for r in result["rows"]]
    for row in rows:
        P.build(P.EvalRow, row, "eval.row")
        assert row["runs"] == 2 and row["gen_mean_s"] > 0 and "validation rows of run s1" in row["note"]
    # Independently: the validation rows as training tokenizes them, the loss on their masked tokens.
    tokenizer = HOLDINGS.get("tokenizer")
    from backend.train import data_settings

    prepared = D.load_prepared(data_settings(cfg["data"], home)[0], home)
    total, count = 0.0, 0
    for row in prepared.validation:
        ids, mask = D.tokenize_like_trl({k: v for k, v in row.items() if v is not None}, tokenizer, prepared.report["loss"])
        ids, mask = ids[:128], mask[:128]
        labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)]])
        n = sum(mask[1:])
        if not n:
            continue
        with torch.no_grad(), clean_engine.peft().disable_adapter():
            loss = clean_engine.peft()(input_ids=torch.tensor([ids]), labels=labels).loss
        total += float(loss) * n
        count += n
    assert rows[1]["ppl_tokens"] == count
    assert rows[1]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert rows[0]["perplexity"] != rows[1]["perplexity"]
    assert "| tuned (s1) |" in result["markdown"]


def test_a_merged_folder_decodes_on_the_fast_path_with_one_compile(setup, clean_engine, monkeypatch):
    """A merged folder gets the decode copy's fast path (a static cache and the compiled decode
    step, compiled while loading): greedy answers equal the plain path's token for token, and new
    prompts reuse the compiled step (on the CPU with dynamo's aot_eager backend)."""
    from torch._dynamo.utils import counters

    from backend import merge

    home, _base, adapter = setup
    merged = merge.run_merge({"adapter": str(adapter), "out": "eval-merged-fast", "dtype": "fp32", "into": "dequantized",
                              "max_shard_size": "5GB", "verify": False}, home, chat.QuietContext())["out"]
    monkeypatch.setenv(chat.FAST_ENV, "1")  # the fast path is for 16-bit weights on a GPU; allowed here
    monkeypatch.setattr(chat.decode_copy, "COMPILE_OVERRIDE", {"backend": "aot_eager", "mode": None})
    torch._dynamo.reset()
    counters.clear()
    target = chat.parse_target(f"merged:{merged}")
    ready = clean_engine.prepare(target, home)
    assert ready["fast_path"] == "on" and ready["path"] == "fast", ready
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # compiled by the warm-up, while loading
    tokenizer = clean_engine.tokenizer_for(target)
    greedy = P.ChatSettings(max_new_tokens=8, do_sample=False)
    for text in ("Name a metal.", "A much longer question about copper, iron, tin and the stars above them."):
        ids = tokenizer(text)["input_ids"]
        fast = clean_engine.answer(target, ids, greedy, extra={"min_new_tokens": 8})
        plain = clean_engine.answer(target, ids, greedy, fast=False, extra={"min_new_tokens": 8})
        assert fast["path"] == "fast" and plain["path"] == "plain"
        assert fast["output_ids"] == plain["output_ids"], text
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile
    monkeypatch.delenv(chat.FAST_ENV)
    assert "float32" in chat.merged_fast_allowed(chat.HOLDINGS.get(chat.HOLD_MERGED)["model"])  # plain without the override
    torch._dynamo.reset()
