"""The Data room (backend/data.py): sources of every kind and shape, bad input, the one formatter,
the loss mask compared with trl's own data preparation, statistics, the split, paging and the
filter, directly and through a real backend, and ``qlw data``.

Generated files live in a temporary folder; the tiny model's tokenizer is trained once per test
process and copied into each data home that needs it.
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.waits import Budget

from backend import data as D
from backend import protocol as P
from backend import tiny
from tests.conftest import ROOT, start_backend, stop_backend

HANGUL = re.compile("[\uac00-\ud7a3]")
KANA = re.compile("[\u3040-\u30ff]")
SAMPLE = str(tiny.sample_dataset_path())


# Helpers ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def tiny_tokenizer_dir() -> Path:
    """The tiny model's tokenizer (the same deterministic training as its build, 0.2 s instead of
    the model's ~10 s: the data room needs only the tokenizer), saved once per test process with
    the build marker, in a folder removed at exit."""
    folder = Path(tempfile.mkdtemp(prefix="qlw-tiny-tokenizer-")) / tiny.TINY_MODEL_ID
    atexit.register(shutil.rmtree, folder.parent, True)
    tokenizer = tiny._train_tokenizer(tiny._sample_rows())
    tokenizer.save_pretrained(folder)
    (folder / tiny.MARKER_NAME).write_text(json.dumps({"model_id": tiny.TINY_MODEL_ID, "tokenizer_only": True,
                                                       "build_version": tiny.BUILD_VERSION}))
    return folder


def install_tiny(home: Path) -> Path:
    """Put the tiny model's tokenizer where the tiny model lives in ``home`` (as if ctrl+t had
    built it there)."""
    target = tiny.tiny_model_path(home)
    if not target.exists():
        shutil.copytree(tiny_tokenizer_dir(), target)
    return target


def random_tiny_model(tokenizer):
    """A tiny Llama of the embedded model's shape with random weights: trl's data preparation,
    which the tests compare against, does not depend on the weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **tiny.MODEL_SHAPE)
    return LlamaForCausalLM(config)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def settings(opened: D.Opened, **changes) -> P.PreparedData:
    return dataclasses.replace(D.default_settings(opened.summary), **changes)


DOLLY = [
    {"instruction": "What is the capital of Korea?", "context": "", "response": "Seoul.", "category": "open_qa"},
    {"instruction": "요약해 주세요.", "context": "서울은 한국의 수도입니다.", "response": "서울은 수도입니다.", "category": "summarization"},
    {"instruction": "日本の首都はどこですか？", "context": "", "response": "東京です。", "category": "open_qa"},
]
MESSAGES = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "user", "content": "안녕?"}, {"role": "assistant", "content": "안녕하세요."},
                  {"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "はい。"}]},
]
SHAREGPT = [
    {"id": "a", "conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]},
    {"id": "b", "conversations": [{"from": "system", "value": "Answer in Korean."}, {"from": "human", "value": "Colour?"},
                                  {"from": "gpt", "value": "파란색."}]},
]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One data home (Arrow caches, the tiny model) for the direct tests of this module."""
    h = tmp_path_factory.mktemp("data_home")
    install_tiny(h)
    return h


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A folder of generated files: one per shape and format."""
    import datasets
    import pyarrow as pa

    d = tmp_path_factory.mktemp("files")
    write_jsonl(d / "dolly.jsonl", DOLLY)
    (d / "alpaca.json").write_text(json.dumps([
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ]), encoding="utf-8")
    (d / "prompts.csv").write_text("prompt,id\nWrite a poem about the sea.,1\n바다에 대한 시를 써 주세요.,2\n", encoding="utf-8")
    write_jsonl(d / "chat.jsonl", MESSAGES)
    write_jsonl(d / "sharegpt.jsonl", SHAREGPT)
    datasets.Dataset.from_list([{"prompt": "2+2=", "completion": " 4"}, {"prompt": "3+3=", "completion": " 6"}]) \
        .to_parquet(str(d / "pc.parquet"))
    (d / "notes.txt").write_text("first line of text\n二行目のテキスト\nthird line\n", encoding="utf-8")
    (d / "qa.tsv").write_text("question\tanswer\nWhy?\tBecause.\n왜?\t그냥.\n", encoding="utf-8")
    table = pa.Table.from_pylist(DOLLY)
    with pa.OSFile(str(d / "dolly.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    folder = d / "splits"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", DOLLY * 4)
    write_jsonl(folder / "test.jsonl", DOLLY[:2])
    datasets.Dataset.from_list(DOLLY).save_to_disk(str(d / "saved"))
    return d


# Shapes and sources ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, shape, mapping, rows", [
    ("dolly.jsonl", "dolly", {"instruction": "instruction", "context": "context", "response": "response"}, 3),
    ("alpaca.json", "alpaca", {"instruction": "instruction", "context": "input", "response": "output"}, 2),
    ("prompts.csv", "prompt_only", {"instruction": "prompt"}, 2),
    ("chat.jsonl", "messages", {"messages": "messages"}, 2),
    ("sharegpt.jsonl", "sharegpt", {"messages": "conversations"}, 2),
    ("pc.parquet", "prompt_completion", {"instruction": "prompt", "response": "completion"}, 2),
    ("notes.txt", "text", {"text": "text"}, 3),
    ("qa.tsv", "instruction_response", {"instruction": "question", "response": "answer"}, 2),
    ("dolly.arrow", "dolly", {"instruction": "instruction", "response": "response"}, 3),
    ("splits", "dolly", {"instruction": "instruction"}, 12),
    ("saved", "dolly", {"instruction": "instruction"}, 3),
])
def test_every_source_and_shape_is_recognised(home, files, name, shape, mapping, rows):
    opened = D.open_source(str(files / name), home)
    s = opened.summary
    assert s["shape"] == shape, s
    assert {k: v for k, v in s["mapping"].items() if k in mapping} == mapping
    assert s["num_rows"] == rows
    assert all(c["type"] and c["nulls"] == 0 for c in s["columns"])
    # Every shape makes a training example with the chat template (the prompt-only CSV too);
    # plain text stays plain text.
    example = D.format_row(opened.raw_row(0), settings(opened))
    assert example["text"] if shape == "text" else example["messages"][-1]["content"]


def test_folder_splits_and_the_cache_stays_in_the_home(home, files):
    opened = D.open_source({"path": str(files / "splits"), "split": "test"}, home)
    assert opened.summary["splits"] == {"train": 12, "test": 2} and opened.num_rows == 2
    with pytest.raises(D.DataError, match="no split 'validation'") as err:
        D.open_source({"path": str(files / "splits"), "split": "validation"}, home)
    assert "train, test" in err.value.hint
    assert any((home / "datasets").iterdir())
    assert not (Path.cwd() / "datasets").exists()


def test_sharegpt_and_messages_become_standard_chat_rows(home, files):
    opened = D.open_source(str(files / "sharegpt.jsonl"), home)
    ex = D.format_row(opened.raw_row(1), settings(opened))
    assert ex == {"messages": [{"role": "system", "content": "Answer in Korean."},
                               {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "파란색."}]}
    opened = D.open_source(str(files / "chat.jsonl"), home)
    mistral = D.format_row(opened.raw_row(1), settings(opened, template="mistral"))
    assert mistral == {"prompt": "[INST] 안녕? [/INST] 안녕하세요.</s>[INST] こんにちは [/INST]", "completion": " はい。"}
    raw = D.format_row(opened.raw_row(0), settings(opened, template="raw"))
    assert raw == {"prompt": "Be brief.\n\nHi\n\n", "completion": "Hello!"}
    with pytest.raises(D.RowError, match="Alpaca has one instruction"):
        D.format_row(opened.raw_row(1), settings(opened, template="alpaca"))


def test_templates_of_an_instruction_row(home, files):
    opened = D.open_source(str(files / "dolly.jsonl"), home)
    row = opened.raw_row(1)
    assert D.format_row(row, settings(opened)) == {"messages": [
        {"role": "user", "content": "요약해 주세요.\n\n서울은 한국의 수도입니다."},
        {"role": "assistant", "content": "서울은 수도입니다."}]}
    assert D.format_row(row, settings(opened, system_prompt="Be kind."))["messages"][0] == {"role": "system", "content": "Be kind."}
    alpaca = D.format_row(row, settings(opened, template="alpaca"))
    assert alpaca["prompt"].endswith("### Instruction:\n요약해 주세요.\n\n### Input:\n서울은 한국의 수도입니다.\n\n### Response:\n")
    assert alpaca["completion"] == "서울은 수도입니다."
    assert D.format_row(row, settings(opened, template="mistral")) == {
        "prompt": "[INST] 요약해 주세요.\n\n서울은 한국의 수도입니다. [/INST]", "completion": " 서울은 수도입니다."}
    # The user corrects the mapping: the category becomes the response.
    fixed = settings(opened, mapping={**opened.summary["mapping"], "response": "category", "context": ""})
    assert D.format_row(row, fixed)["messages"][-1] == {"role": "assistant", "content": "summarization"}
    # No response mapped: prompt-only rows are plain text for the non-chat templates, trained on all tokens.
    prompts = settings(opened, template="alpaca", mapping={**opened.summary["mapping"], "response": ""})
    assert set(D.format_row(row, prompts)) == {"text"} and D.effective_loss(prompts) == "all"
    with pytest.raises(D.DataError, match="assistant-only loss needs conversational rows"):
        D.effective_loss(settings(opened, template="raw", loss="assistant_only"))
    with pytest.raises(D.DataError, match="completion-only loss needs prompt/completion rows"):
        D.effective_loss(settings(opened, loss="completion_only"))
    assert D.sft_config_kwargs(settings(opened, template="mistral", max_length=256)) == {
        "max_length": 256, "truncation_mode": "keep_start", "assistant_only_loss": False,
        "completion_only_loss": True, "dataset_text_field": "text"}


# Bad input ----------------------------------------------------------------------------------


def test_bad_files_say_what_and_where(home, tmp_path):
    def fails(name: str, content: bytes, match: str, where: str | None = None) -> D.DataError:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(D.DataError, match=match) as err:
            D.open_source(str(path), home)
        assert err.value.where == (where or str(path)).format(path=path)
        return err.value

    fails("empty.jsonl", b"", "empty.jsonl is empty")
    fails("blank.jsonl", b"\n  \n\n", "has no rows")
    err = fails("bad.jsonl", b'{"a": "x"}\n{"a": "y"}\n{"a": oops}\n{"a": "z"}\n',
                r"line 3 of bad.jsonl is not valid JSON", "{path}:3")
    assert "oops" in str(err)
    fails("latin.jsonl", '{"a": "ok"}\n{"a": "caf\xe9"}\n'.encode("latin-1"),
          r"line 2 of latin.jsonl is not UTF-8: byte 0xe9 at column 11", "{path}:2")
    fails("latin.csv", "prompt\nok\ncaf\xe9\n".encode("latin-1"), r"line 3 of latin.csv is not UTF-8", "{path}:3")
    fails("ragged.csv", b"a,b\n1,2\n3,4,5\n", r"line 3 of ragged.csv has 3 fields; the header has 2", "{path}:3")
    (tmp_path / "object.json").write_bytes(b'{"data": [{"a": 1}], "version": 2}')
    obj = D.open_source(str(tmp_path / "object.json"), home)  # one row: datasets' reading
    assert obj.summary["shape"] == "unknown" and "the list under 'data'" in obj.summary["notes"][0]
    fails("broken.json", b'[{"a": 1},\n {"a": 2\n]', r"broken.json is not valid JSON: .* at line 3", "{path}:3")
    fails("data.xlsx", b"PK\x03\x04", r"unknown file type \.xlsx")
    with pytest.raises(D.DataError, match="no such file or folder"):
        D.open_source(str(tmp_path / "missing.jsonl"), home)
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(D.DataError, match="no data files"):
        D.open_source(str(empty_dir), home)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text('{"a": 1}\n')
    (mixed / "b.csv").write_text("a\n1\n")
    with pytest.raises(D.DataError, match=r"mixes file types \(CSV, JSON Lines\)"):
        D.open_source(str(mixed), home)


def test_hub_id_offline_is_a_clear_error(home):
    with pytest.raises(D.DataError, match="could not load nobody/no-such-dataset") as err:
        D.open_source({"path": "nobody/no-such-dataset", "config": "x", "split": "train"}, home)
    assert "HF_HUB_OFFLINE" in err.value.hint


def test_a_bom_is_not_data(home, tmp_path):
    bom = b"\xef\xbb\xbf"
    write = lambda name, text: (tmp_path / name).write_bytes(bom + text.encode())  # noqa: E731
    write("bom.jsonl", '{"prompt": "p1", "completion": "c1"}\n')
    write("bom.csv", "prompt,completion\np1,c1\n")
    write("bom.txt", "first line\nsecond\n")
    for name in ("bom.jsonl", "bom.csv"):
        opened = D.open_source(str(tmp_path / name), home)
        assert opened.columns == ["prompt", "completion"] and opened.summary["shape"] == "prompt_completion"
    opened = D.open_source(str(tmp_path / "bom.txt"), home)
    assert opened.raw_row(0) == {"text": "first line"}


def test_unknown_shape_missing_column_and_nulls(home, tmp_path):
    tok = D.load_tokenizer("", home)
    odd = D.open_source(str(write_jsonl(tmp_path / "odd.jsonl", [{"x": 1, "y": 2.5}, {"x": 2, "y": None}])), home)
    assert odd.summary["shape"] == "unknown" and "map the roles by hand" in odd.summary["notes"][0]
    assert [c["nulls"] for c in odd.summary["columns"]] == [0, 1]
    pv = D.preview_row(odd, settings(odd), 0, tok)
    assert pv["error"]["message"].startswith("nothing is mapped") and pv["error"]["where"] == "mapping"
    with pytest.raises(D.DataError, match="nothing is mapped"):
        D.token_stats(odd, settings(odd), tok)

    rows = [{"instruction": "q0", "response": "a0"}, {"instruction": "q1", "response": None},
            {"instruction": None, "response": "a2"}, {"instruction": "q3", "response": "a3"}]
    nulls = D.open_source(str(write_jsonl(tmp_path / "nulls.jsonl", rows)), home)
    assert [c["nulls"] for c in nulls.summary["columns"]] == [1, 1]
    pv = D.preview_row(nulls, settings(nulls), 1, tok)
    assert pv["error"] == {"message": "the response column 'response' is empty (null)",
                           "where": "row 1, column response", "hint": pv["error"]["hint"]}
    st = D.token_stats(nulls, settings(nulls), tok)
    assert st["rows"] == 2 and st["skipped"] == 2 and [e["index"] for e in st["errors"]] == [1, 2]
    prepared = D.load_prepared(settings(nulls, split_mode="none"), home)
    assert len(prepared.train) == 2 and prepared.report["train_skipped"] == 2

    plain = copy.deepcopy(tok)  # a tokenizer without a chat template (GPT-2 style)
    plain.chat_template = None
    pv = D.preview_row(nulls, settings(nulls), 0, plain)
    assert "has no chat template" in pv["error"]["message"] and "Alpaca" in pv["error"]["hint"]
    assert D.preview_row(nulls, settings(nulls, template="alpaca"), 0, plain)["error"] is None

    missing = settings(nulls, mapping={**nulls.summary["mapping"], "response": "answer"})
    pv = D.preview_row(nulls, missing, 0, tok)
    assert "mapped to column 'answer', which this dataset does not have" in pv["error"]["message"]
    assert pv["error"]["where"] == "mapping.response" and "instruction, response" in pv["error"]["hint"]
    with pytest.raises(D.DataError, match="'answer'"):
        D.load_prepared(missing, home)


def test_one_enormous_row(home, tmp_path, monkeypatch):
    huge = "가나다라마바사 the quick brown fox " * 20_000  # 640,000 characters in one JSON line
    monkeypatch.setattr(D.tokens, "PREVIEW_MAX_CHARS", 500_000)  # the live preview's limit (1 M), scaled for speed
    path = write_jsonl(tmp_path / "huge.jsonl", [DOLLY[0], {"instruction": "Summarise.", "context": huge,
                                                            "response": "Long.", "category": "x"}, DOLLY[2]])
    opened = D.open_source(str(path), home)
    assert opened.num_rows == 3
    page = opened.page(0, 10, cell_chars=100)
    assert len(page["rows"][1]["cells"][1]) == 100 and page["rows"][1]["cells"][1].endswith("…")
    row = opened.row(1)
    assert row["cut"] == {"context": len(huge)} and len(row["values"]["context"]) == 200_000
    assert len(json.dumps(row, ensure_ascii=False).encode()) < P.MAX_MESSAGE_BYTES
    tok = D.load_tokenizer("", home)
    pv = D.preview_row(opened, settings(opened), 1, tok)
    assert "too long for a live preview" in pv["error"]["message"]
    st = D.token_stats(opened, settings(opened, max_length=64), tok)
    assert st["rows"] == 3 and st["max"] > 100_000 and st["truncated"] == 1


# The loss mask, as trl computes it -----------------------------------------------------------


def test_preview_mask_matches_trl_sft_trainer(home, tmp_path):
    """The prepared dataset goes through trl's own SFTTrainer data preparation; its input_ids and
    labels (after truncation, fully masked rows dropped) equal the preview's, row by row."""
    from trl import SFTConfig, SFTTrainer

    opened = D.open_source(SAMPLE, home)
    tok = D.load_tokenizer("", home)
    model = random_tiny_model(tok)
    texts = [json.dumps(opened.raw_row(i), ensure_ascii=False) for i in range(opened.num_rows)]
    korean = [i for i, t in enumerate(texts) if HANGUL.search(t)][:6]
    japanese = [i for i, t in enumerate(texts) if KANA.search(t)][:6]
    picked = sorted(set(range(12)) | set(korean) | set(japanese) | {opened.num_rows - 1})
    assert korean and japanese
    plain = D.open_source(str(write_jsonl(tmp_path / "plain.jsonl", [{"text": opened.raw_row(i)["response"]} for i in picked])), home)
    cases = [
        (opened, dict(template="chat"), 40),          # assistant-only loss, {% generation %} masks
        (opened, dict(template="chat", loss="all"), 40),
        (opened, dict(template="mistral"), 40),       # completion-only, prompt masked
        (opened, dict(template="alpaca"), 80),        # long prompts: some rows left without loss tokens
        (opened, dict(template="raw", loss="all"), 30),
        (plain, dict(template="chat"), 16),           # plain text
        (opened, dict(template="chat"), None),        # no truncation
    ]
    for source, changes, max_length in cases:
        s = settings(source, split_mode="none", max_length=max_length or 1024, **changes)
        prepared = D.load_prepared(s, home)
        rows = list(range(len(prepared.train))) if source is plain else picked
        subset = prepared.train.select(rows).add_column("row", rows)
        config = {**prepared.sft_config, "max_length": max_length}
        trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=subset,
                             args=SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, **config))
        kept = {r["row"]: r for r in trainer.train_dataset}
        what = f"{changes} max_length={max_length}"
        for i in rows:
            pv = D.preview_row(source, s, i, tok)
            assert pv["error"] is None, (what, pv["error"])
            assert pv["example"] == {k: v for k, v in prepared.train[i].items()}, what
            if pv["dropped"]:
                assert i not in kept, f"{what}: trl kept row {i}, which the preview says it drops"
                continue
            assert i in kept, f"{what}: trl dropped row {i}"
            ids, mask = D.tokenize_like_trl(pv["example"], tok, pv["loss"])
            ids, labels, _ = D.labels_like_trl(ids, mask, max_length)
            assert ids == kept[i]["input_ids"], what
            assert labels == kept[i]["labels"], what
            assert pv["loss_tokens"] == sum(label != -100 for label in labels)
            # The segments are the same tokens: their text is the decoded training text.
            assert sum(seg["tokens"] for seg in pv["segments"]) == pv["tokens"]
            assert "".join(seg["text"] for seg in pv["segments"] if not seg["cut"]) == tok.decode(ids)
        if changes.get("template") == "alpaca":
            assert any(not D.preview_row(source, s, i, tok)["dropped"] for i in rows)
            assert any(D.preview_row(source, s, i, tok)["dropped"] for i in rows)

    # Token statistics count what trl counts: compare over the whole sample, untruncated.
    s = settings(opened, split_mode="none", max_length=64)
    prepared = D.load_prepared(s, home)
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=prepared.train,
                         args=SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                                        **{**prepared.sft_config, "max_length": None}))
    lengths = sorted(len(ids) for ids in trainer.train_dataset["input_ids"])
    st = D.token_stats(opened, s, tok)
    assert st["rows"] == len(lengths) == opened.num_rows
    assert (st["total_tokens"], st["max"], st["min"]) == (sum(lengths), lengths[-1], lengths[0])
    assert st["truncated"] == sum(n > 64 for n in lengths)
    assert sum(st["histogram"]["counts"]) == opened.num_rows
    truncated = SFTTrainer(model=model, processing_class=tok, train_dataset=prepared.train,
                           args=SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                                          **{**prepared.sft_config, "max_length": 24}))
    st24 = D.token_stats(opened, dataclasses.replace(s, max_length=24), tok)
    assert st24["dropped"] == opened.num_rows - len(truncated.train_dataset) > 0


def test_split_by_ratio_seed_or_existing_split(home, files):
    opened = D.open_source(SAMPLE, home)
    s = settings(opened, validation_ratio=0.2, seed=7)
    a, b = D.load_prepared(s, home), D.load_prepared(s, home)
    assert D.split_counts(opened, s) == {"train": 468, "validation": 117}
    assert (len(a.train), len(a.validation)) == (468, 117)
    assert a.train["messages"][:5] == b.train["messages"][:5]
    c = D.load_prepared(dataclasses.replace(s, seed=8), home)
    assert c.train["messages"][:5] != a.train["messages"][:5]
    folder = settings(D.open_source(str(files / "splits"), home), split_mode="split", validation_split="test")
    prepared = D.load_prepared(folder, home)
    assert (len(prepared.train), len(prepared.validation)) == (12, 2)
    with pytest.raises(D.DataError, match="no split 'dev'"):
        D.load_prepared(dataclasses.replace(folder, validation_split="dev"), home)
    # A save_to_disk folder is the user's: what the split and the formatting derive goes to the home.
    saved = files / "saved"
    before = sorted(p.name for p in saved.rglob("*"))
    prepared = D.load_prepared(settings(D.open_source(str(saved), home), validation_ratio=0.34), home)
    assert (len(prepared.train), len(prepared.validation)) == (1, 2)
    assert sorted(p.name for p in saved.rglob("*")) == before
    assert any((home / "datasets" / "prepared").iterdir())
    with pytest.raises(D.DataError, match="validation_ratio must be between 0 and 1"):
        D.settings_from({**P.to_dict(s), "validation_ratio": 1.5})


def test_pages_and_filters(home, files):
    opened = D.open_source(SAMPLE, home)
    first = opened.page(0, 100)
    assert [r["index"] for r in first["rows"]] == list(range(100)) and first["total"] == 585
    last = opened.page(580, 100)
    assert [r["index"] for r in last["rows"]] == list(range(580, 585))
    korean = opened.page(0, 1000, filter="수도")
    assert korean["total"] > 0 and all("수도" in json.dumps(opened.raw_row(r["index"]), ensure_ascii=False)
                                       for r in korean["rows"])
    only_response = opened.page(0, 1000, filter="response:수도")
    assert 0 < only_response["total"] <= korean["total"]
    assert opened.page(0, 10, filter="OPEN_QA")["total"] == opened.page(0, 10, filter="open_qa")["total"] > 0
    assert opened.page(0, 10, filter="no such text anywhere")["rows"] == []
    chat = D.open_source(str(files / "chat.jsonl"), home)
    assert [r["index"] for r in chat.page(0, 10, filter="こんにちは")["rows"]] == [1]  # inside nested messages
    with pytest.raises(D.DataError, match="there is no row 585"):
        opened.row(585)


# Through a real backend -------------------------------------------------------------------------


def test_paging_preview_and_stats_through_the_backend(qlw_home, tmp_path):
    from tui.client import Connection

    install_tiny(qlw_home)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": 2}\n{"a": 3,}\n', encoding="utf-8")
    proc = start_backend(qlw_home)
    try:
        async def body():
            events: list[P.Event] = []
            conn = await Connection.open(P.socket_path(qlw_home), "test-data", events.append)
            await conn.call(P.Attach())

            async def finished(job_id: str) -> P.Event:
                budget = Budget(60)  # load-adjusted hang guard
                while True:
                    for e in events:
                        if e.kind == "job.finished" and e.payload["job_id"] == job_id:
                            return e
                    assert not budget.spent(), f"job {job_id} did not finish"
                    await asyncio.sleep(0.02)

            source = {"path": SAMPLE}
            refused = await conn.request(P.DataPage(source=source))
            assert refused.status == "refused" and refused.code == P.NOT_OPEN
            reply = await conn.request(P.OpenData(source=source))
            assert reply.status == "accepted"
            done = await finished(reply.result["job_id"])
            assert done.payload["status"] == "done"
            summary = done.payload["result"]["dataset"]
            assert summary["shape"] == "dolly" and summary["num_rows"] == 585
            again = await conn.request(P.OpenData(source=source))  # open already: answered at once
            assert again.status == "ok" and again.result["dataset"]["num_rows"] == 585

            for start in range(0, 585, 100):  # how fast a page comes: bench/browse.py
                page = await conn.call(P.DataPage(source=source, start=start, count=100, cell_chars=40))
                assert page["rows"][0]["index"] == start and page["total"] == 585
            found = await conn.call(P.DataPage(source=source, filter="東京"))
            row = await conn.call(P.DataRow(source=source, index=found["rows"][0]["index"]))
            assert any("東京" in str(v) for v in row["values"].values())

            s = P.to_dict(settings(D.open_source(SAMPLE, qlw_home)))
            pv = await conn.call(P.DataPreview(settings=s, index=1))
            assert pv["error"] is None and pv["loss"] == "assistant_only" and HANGUL.search(pv["text"])
            assert [seg["loss"] for seg in pv["segments"]] == [False, True, False]
            broken = await conn.call(P.DataPreview(settings={**s, "mapping": {**s["mapping"], "response": "answer"}}))
            assert "answer" in broken["error"]["message"]

            reply = await conn.request(P.DataStats(settings=s, bins=20))
            assert reply.status == "accepted"
            done = await finished(reply.result["job_id"])
            stats = done.payload["result"]["stats"]
            assert stats["rows"] == 585 and len(stats["histogram"]["counts"]) == 20
            assert stats["p50"] <= stats["p95"] <= stats["max"]
            progress = [e.payload for e in events if e.kind == "job.progress" and e.payload["job_id"] == reply.result["job_id"]]
            assert progress and progress[-1]["stage"] == "tokenizing" and progress[-1]["done"] == 585

            reply = await conn.request(P.OpenData(source={"path": str(bad)}))
            done = await finished(reply.result["job_id"])
            assert done.payload["status"] == "failed"
            assert done.payload["error"]["where"] == f"{bad}:3"
            assert "line 3 of bad.jsonl is not valid JSON" in done.payload["error"]["message"]
            assert (await conn.call(P.Ping("still here")))["payload"] == "still here"
            await conn.close()

        asyncio.run(asyncio.wait_for(body(), 120))
    finally:
        stop_backend(proc)


# qlw data -----------------------------------------------------------------------------------------


def test_qlw_data_prints_what_the_pane_shows(qlw_home, tmp_path):
    install_tiny(qlw_home)
    env = dict(os.environ, PYTHONPATH=str(ROOT), QLW_HOME=str(qlw_home))
    ok = subprocess.run([sys.executable, "-m", "tui.cli", "data", SAMPLE, "--template", "mistral", "--row", "1"],
                        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert ok.returncode == 0, ok.stderr
    out = ok.stdout
    assert "shape     dolly: instruction/context/response (databricks-dolly)" in out
    assert "rows      585 in split train" in out
    assert "mapping   instruction <- instruction, context <- context, response <- response" in out
    assert re.search(r"instruction\s+string\s+0\s+What is the chemical symbol for boron\?", out)
    assert "token lengths (qlw-tiny-llama, 585 rows)" in out and "p95" in out
    assert "split     train 526, validation 59 (seed 42)" in out
    assert "[INST] 수소의 원자 번호는 몇 번인가요? [/INST]⟦ 수소의 원자 번호는 1번입니다." in out
    assert not (tmp_path / "datasets").exists()  # nothing written to the current folder

    bad = tmp_path / "bad.csv"
    bad.write_bytes("instruction,response\nok,fine\ncaf\xe9,x\n".encode("latin-1"))
    err = subprocess.run([sys.executable, "-m", "backend", "data", str(bad), "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert err.returncode == 1
    assert f"where: {bad}:3" in err.stderr and "line 3 of bad.csv is not UTF-8" in err.stderr
    assert json.loads(err.stdout)["error"]["where"] == f"{bad}:3"


def test_qlw_data_exit_status_describes_the_file(qlw_home, tmp_path):
    """Issue 15: a null on row 0 exited 1 only because row 0 is the preview row (on row 1: 0);
    messages named 0-based rows; a binary file's bytes reached the terminal; --help said
    `python -m backend data`."""
    install_tiny(qlw_home)
    env = dict(os.environ, PYTHONPATH=str(ROOT), QLW_HOME=str(qlw_home))

    def qlw_data(*args):
        return subprocess.run([sys.executable, "-m", "tui.cli", "data", *args, "--stats-rows", "0"],
                              capture_output=True, text=True, env=env, cwd=str(tmp_path))

    good = '{"instruction": "b", "response": "c"}\n'
    null = '{"instruction": null, "response": "a"}\n'
    for name, text, line in (("first.jsonl", null + good, 1), ("second.jsonl", good + "\n" + null, 3)):
        (tmp_path / name).write_text(text)
        out = qlw_data(str(tmp_path / name))
        assert out.returncode == 1, (name, out.stderr)
        assert (f"1 of 2 rows cannot be formatted (training skips them); first: line {line} of {name}"
                in out.stderr), out.stderr
    (tmp_path / "fine.jsonl").write_text(good + good)
    assert qlw_data(str(tmp_path / "fine.jsonl")).returncode == 0

    binary = tmp_path / "model.jsonl"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x1b[2J\x1b]0;pwned\x07" + bytes(range(256)) * 4)
    out = qlw_data(str(binary))
    assert out.returncode == 1 and "model.jsonl is a binary file (a NUL byte at offset 7)" in out.stderr
    assert "\x1b" not in out.stdout + out.stderr and "\x07" not in out.stdout + out.stderr

    usage = subprocess.run([sys.executable, "-m", "tui.cli", "data", "--help"], capture_output=True, text=True, env=env)
    assert usage.stdout.startswith("usage: qlw data ")
