"""The embedded default: the shipped sample dataset and the locally built tiny Llama."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from backend import tiny
from backend.samples import make_sample

HANGUL = re.compile("[\uac00-\ud7a3]")
KANA = re.compile("[\u3040-\u30ff]")
DOLLY_KEYS = {"instruction", "context", "response", "category"}
DOLLY_CATEGORIES = {
    "open_qa", "closed_qa", "classification", "information_extraction",
    "summarization", "brainstorming", "creative_writing", "general_qa",
}
REPO = Path(__file__).resolve().parents[2]


def _rows() -> list[dict]:
    with tiny.sample_dataset_path().open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No Hub, and every cache in a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        yield


@pytest.fixture(scope="module")
def built(offline, tmp_path_factory):
    """Build the tiny model once for this module; record progress and the time it took."""
    home = tmp_path_factory.mktemp("qlw_home")
    calls: list[tuple[str, int, int]] = []
    started = time.perf_counter()
    folder = tiny.ensure_tiny_model(home, progress=lambda *a: calls.append(a))
    return {"home": home, "folder": folder, "calls": calls, "seconds": time.perf_counter() - started}


@pytest.fixture(scope="module")
def loaded(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(built["folder"])
    tokenizer = AutoTokenizer.from_pretrained(built["folder"])
    return model, tokenizer


# The sample dataset ---------------------------------------------------------------------------


def test_sample_rows_have_the_dolly_shape():
    rows = _rows()
    assert len(rows) >= 300
    assert all(set(r) == DOLLY_KEYS for r in rows)
    assert all(isinstance(v, str) for r in rows for v in r.values())
    assert {r["category"] for r in rows} == DOLLY_CATEGORIES
    for r in rows:
        assert r["instruction"].strip() and r["response"].strip(), r
        if r["category"] in ("closed_qa", "information_extraction", "summarization"):
            assert r["context"].strip(), r
        if r["category"] in ("open_qa", "brainstorming", "creative_writing"):
            assert r["context"] == "", r
    pairs = [(r["instruction"], r["context"]) for r in rows]
    assert len(set(pairs)) == len(pairs), "duplicate instruction/context pairs"


def test_sample_has_korean_and_japanese_rows():
    rows = _rows()
    korean = [r for r in rows if HANGUL.search(r["instruction"]) and HANGUL.search(r["response"])]
    japanese = [r for r in rows if KANA.search(r["instruction"]) and KANA.search(r["response"])]
    assert len(korean) >= 30
    assert len(japanese) >= 30
    # Spread over several kinds of task, not one template.
    assert len({r["category"] for r in korean}) >= 5
    assert len({r["category"] for r in japanese}) >= 5


def test_sample_answers_are_computed_correctly():
    rows = {r["instruction"]: r["response"] for r in _rows() if not r["context"]}
    capitals = 0
    for country, capital, *_ in make_sample.COUNTRIES:
        for instruction, response in rows.items():
            if instruction.endswith(f"capital of {country}?") or instruction == f"Name the capital city of {country}.":
                assert capital in response, (instruction, response)
                capitals += 1
    assert capitals >= len(make_sample.COUNTRIES)
    for instruction, response in rows.items():
        m = re.fullmatch(r"What is (-?\d+) degrees Celsius in Fahrenheit\?", instruction)
        if m:
            c = int(m.group(1))
            assert f"is {c * 9 // 5 + 32} degrees Fahrenheit" in response
        m = re.fullmatch(r"How many (\w+) are in (\d) (\w+)\?", instruction)
        if m:
            factor = {u[0]: u[3] for u in make_sample.UNITS}[m.group(3)]
            assert f"There are {int(m.group(2)) * factor:,} {m.group(1)}" in response


def test_sample_file_matches_its_generator():
    assert make_sample.render(make_sample.build_rows()) == tiny.sample_dataset_path().read_text(encoding="utf-8")


def test_sample_loads_through_datasets(offline):
    ds = tiny.load_sample_dataset()
    assert len(ds) == len(_rows())
    assert set(ds.column_names) == DOLLY_KEYS
    assert ds[0] == _rows()[0]


# The tiny model -------------------------------------------------------------------------------


def test_build_writes_a_complete_folder(built):
    folder = built["folder"]
    assert folder == tiny.tiny_model_path(built["home"]) == built["home"] / "models" / "qlw-tiny-llama"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", tiny.MARKER_NAME):
        assert (folder / name).is_file(), name
    marker = json.loads((folder / tiny.MARKER_NAME).read_text())
    assert marker["build_version"] == tiny.BUILD_VERSION
    assert marker["model_id"] == tiny.TINY_MODEL_ID
    # Nothing but the model and the lock file beside it: no temporary folder survives.
    assert sorted(p.name for p in folder.parent.iterdir()) == [f".{tiny.TINY_MODEL_ID}.lock", tiny.TINY_MODEL_ID]
    stages = [c[0] for c in built["calls"]]
    assert stages[0] == "tokenizer" and stages[-1] == "save"
    assert ("pretrain", tiny.PRETRAIN_STEPS, tiny.PRETRAIN_STEPS) in built["calls"]
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 10 * 1024 * 1024


def test_folder_reloads_through_auto_classes(built, loaded):
    model, tokenizer = loaded
    marker = json.loads((built["folder"] / tiny.MARKER_NAME).read_text())
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 2
    assert sum(p.numel() for p in model.parameters()) == marker["parameters"]
    assert model.config.vocab_size == len(tokenizer) == marker["vocab_size"]
    assert 2000 <= len(tokenizer) <= 4000
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_tokenizer_special_tokens_and_lossless_round_trip(loaded):
    _, tok = loaded
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    texts = [
        "한국의 수도는 서울입니다. 맛있는 김치찌개를 먹었어요!",
        "日本の首都は東京です。ひらがな、カタカナ、漢字を混ぜて書きます。",
        "Plain English, with  double spaces,\ttabs\nand new lines.",
        "  leading spaces, emoji 🚀, accents: Bogotá, Brasília, złoty; math: 2 × 3 ÷ 4 − 1",
    ]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids
    ids = tok("Hello")["input_ids"]
    assert ids[0] == tok.bos_token_id  # plain text starts with <s>, as with Llama


def test_chat_template_masks_exactly_the_assistant_replies(loaded):
    _, tok = loaded
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "日本の首都はどこですか？"},
        {"role": "assistant", "content": "日本の首都は東京です。"},
    ]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    masked = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(masked) == "The capital of France is Paris.</s>日本の首都は東京です。</s>"
    # Two contiguous spans, each ending with </s>; nothing of the prompt is marked.
    spans = [(i, m) for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])]
    assert len(spans) == 2
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "Answer briefly." in unmasked and "What is the capital of France?" in unmasked
    assert "Paris" not in unmasked and "東京" not in unmasked

    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages[:3], tokenize=False)
    assert prompt.endswith("<|assistant|>\n")
    assert full.startswith(prompt)  # prompt/completion splits line up (trl relies on this)
    with pytest.raises(Exception, match="roles"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_generation_works_offline(loaded):
    import torch

    model, tok = loaded
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Peru?"}],
        add_generation_prompt=True, return_dict=True, return_tensors="pt",
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=24, min_new_tokens=4, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1]:]
    text = tok.decode(new, skip_special_tokens=True)
    assert len(new) >= 4
    assert re.search(r"[A-Za-z]{2,}", text), text

    plain = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**plain, max_new_tokens=12, min_new_tokens=4, do_sample=False)
    assert tok.decode(out[0, plain["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_second_call_is_cached(built):
    folder = built["folder"]
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    calls = []
    again = tiny.ensure_tiny_model(built["home"], progress=lambda *a: calls.append(a))  # no build: no progress
    assert again == folder
    assert calls == []
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()} == before


def test_pretraining_clearly_lowers_the_loss(built, loaded):
    import torch
    from transformers import AutoModelForCausalLM

    model, tok = loaded
    texts = [r["response"] for r in _rows()[:64]]
    enc = tok([t + tok.eos_token for t in texts], padding=True, return_tensors="pt", add_special_tokens=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)

    def loss(m) -> float:
        m.eval()
        with torch.no_grad():
            return m(**enc, labels=labels).loss.item()

    torch.manual_seed(0)
    untrained = AutoModelForCausalLM.from_config(model.config)
    before, after = loss(untrained), loss(model)
    assert before > 7.0  # about ln(vocab): random guessing
    assert after < before - 3.0, (before, after)
    marker = json.loads((built["folder"] / tiny.MARKER_NAME).read_text())
    assert marker["pretrain"]["loss_after"] < marker["pretrain"]["loss_before"] - 3.0


def test_cancel_stops_the_build_and_leaves_nothing(offline, tmp_path):
    stop = threading.Event()

    def progress(stage, done, total):
        if stage == "pretrain" and done >= 10:
            stop.set()

    with pytest.raises(tiny.TinyBuildCancelled):
        tiny.ensure_tiny_model(tmp_path, progress=progress, cancelled=stop.is_set)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [f".{tiny.TINY_MODEL_ID}.lock"]


# Folder handling, with a fake (instant) build -------------------------------------------------


def _fake_build(counter: list[int], delay: float = 0.0):
    def build(out: Path, report, is_cancelled) -> None:
        counter.append(1)
        time.sleep(delay)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / tiny.MARKER_NAME).write_text(json.dumps({"build_version": tiny.BUILD_VERSION}))

    return build


def test_stale_temp_folders_are_cleaned_and_old_versions_rebuilt(tmp_path, monkeypatch):
    builds: list[int] = []
    monkeypatch.setattr(tiny, "_build", _fake_build(builds))
    models = tmp_path / "models"
    stale = models / f".{tiny.TINY_MODEL_ID}.tmp-999-deadbeef"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    old = models / tiny.TINY_MODEL_ID
    old.mkdir()
    (old / tiny.MARKER_NAME).write_text(json.dumps({"build_version": tiny.BUILD_VERSION - 1}))
    (old / "from-old-build").write_text("x")

    folder = tiny.ensure_tiny_model(tmp_path)
    assert builds == [1]
    assert not stale.exists()
    assert not (folder / "from-old-build").exists()
    assert json.loads((folder / tiny.MARKER_NAME).read_text())["build_version"] == tiny.BUILD_VERSION
    assert sorted(p.name for p in models.iterdir()) == [f".{tiny.TINY_MODEL_ID}.lock", tiny.TINY_MODEL_ID]


def test_a_folder_without_marker_is_not_trusted(tmp_path, monkeypatch):
    builds: list[int] = []
    monkeypatch.setattr(tiny, "_build", _fake_build(builds))
    (tmp_path / "models" / tiny.TINY_MODEL_ID).mkdir(parents=True)
    tiny.ensure_tiny_model(tmp_path)
    assert builds == [1]


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    builds: list[int] = []
    monkeypatch.setattr(tiny, "_build", _fake_build(builds, delay=0.5))
    results, stages = [], []
    threads = [
        threading.Thread(target=lambda: results.append(
            tiny.ensure_tiny_model(tmp_path, progress=lambda *a: stages.append(a[0]))))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert builds == [1]
    assert results == [tiny.tiny_model_path(tmp_path)] * 3
    assert "wait" in stages


def test_importing_tiny_is_cheap():
    code = "import sys, backend.tiny; print(sorted(m for m in ('torch', 'transformers', 'tokenizers', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"
