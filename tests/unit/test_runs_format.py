"""The Runs tab's formatting, sorting and filter (tui/widgets/sessions/runs_format.py): plain
functions over runs.list records, no Textual."""

from __future__ import annotations

from tui.widgets.sessions import runs_format as F


def rec(rid: str, name: str, **extra) -> dict:
    base = {"id": rid, "name": name, "method": "sft", "base_model": "/models/mistral-7b-v0.3",
            "dataset": "/data/dolly.jsonl", "status": "finished", "step": 10, "total_steps": 10,
            "best_eval_loss": 1.5, "last_eval_loss": 1.6, "tokens_per_s": 1200.0, "duration_s": 75.0,
            "adapter_bytes": 3 * 2**20, "merged": False, "exported": False, "uploaded": False}
    return {**base, **extra}


RUNS = [rec("c", "gamma", best_eval_loss=None, status="failed", step=2),
        rec("b", "beta", best_eval_loss=1.2, merged=True, tokens_per_s=5000.0),
        rec("a", "a", best_eval_loss=1.9, method="dpo")]  # named after its id: unnamed


def names(records):
    return [F.run_name(r) for r in records]


def test_cells():
    gamma, beta, a = RUNS
    assert F.cell("name", a) == "(unnamed)" and F.cell("name", beta) == "beta"
    assert F.cell("steps", gamma) == "2/10" and F.cell("best_eval_loss", gamma) == "—"
    assert F.cell("tokens_per_s", beta) == "5,000" and F.cell("duration_s", beta) == "1:15"
    assert F.cell("adapter_bytes", beta) == "3.0 MiB" and F.size(812_000) == "793 KiB" and F.size(None) == "—"
    assert F.cell("flags", beta) == "M··"
    assert F.short("/a/very/long/path/to/some/model/folder/here", 20) == "…e/model/folder/here"


def test_sort_keeps_runs_without_the_figure_last():
    assert names(F.sort_records(RUNS, None)) == ["gamma", "beta", "(unnamed)"]
    assert names(F.sort_records(RUNS, "best_eval_loss")) == ["beta", "(unnamed)", "gamma"]
    assert names(F.sort_records(RUNS, "best_eval_loss", reverse=True)) == ["(unnamed)", "beta", "gamma"]
    assert names(F.sort_records(RUNS, "tokens_per_s", reverse=True))[0] == "beta"
    assert names(F.sort_records(RUNS, "status")) == ["gamma", "beta", "(unnamed)"]  # failed < finished


def test_filter_terms():
    def hits(query):
        return [r["id"] for r in RUNS if F.matches(query, r)]

    assert hits("") == ["c", "b", "a"]
    assert hits("status:failed") == ["c"]
    assert hits("best:<1.5") == ["b"] and hits("best:>=1.2") == ["b", "a"]
    assert hits("merged:yes") == ["b"] and hits("merged:no") == ["c", "a"]
    assert hits("method:dpo") == ["a"] and hits("meth:dpo") == ["a"]  # a unique start of a column's name
    assert hits("mistral") == ["c", "b", "a"] and hits("model:mistral beta") == ["b"]
    assert hits("dolly.jsonl") == ["c", "b", "a"]  # the full path, though the cell is shortened
    assert hits("nosuch:thing") == []  # an unknown column: the term is plain text
    assert F.column_named("best val") == "best_eval_loss" and F.column_named("s") is None  # ambiguous


def test_delete_question_lists_paths_and_size():
    question, detail = F.delete_question({"run": "a1", "name": "lr 0.001", "paths": ["/h/runs/a1", "/h/merged/x"],
                                          "bytes": 5 * 2**20, "kept": ["/elsewhere/adapter"]})
    assert "'lr 0.001' (a1)" in question and "cannot be undone" in question
    assert detail.splitlines() == ["2 path(s), 5.0 MiB:", "  /h/runs/a1", "  /h/merged/x",
                                   "Kept (outside the data home): /elsewhere/adapter"]
