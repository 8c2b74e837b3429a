"""Preference rows (backend/methods/preference.py, backend/data.py's shape detection) and the run
config of the preference methods: shapes detected and mapped, pairs formatted as trl's rows,
malformed pairs reported by line and skipped or refused, the preview of both sides with the loss
on the answers only, the shipped sample, and the ``method`` and ``dpo``/``orpo``/``kto`` sections
checked, exported and overridden. No model is trained here (the tiny model's tokenizer only)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from backend import data as D, protocol as P, tiny, train_config as TC
from backend.methods import preference as PR
from tests.backend.test_data import install_tiny, write_jsonl

PAIRS = [
    {"prompt": "What is the capital of Korea?", "chosen": "Seoul.", "rejected": "I don't know."},
    {"prompt": "日本の首都はどこですか？", "chosen": "東京です。", "rejected": "わかりません。"},
    {"prompt": "Name a colour.", "chosen": "", "rejected": "Blue."},            # line 3: empty chosen
    {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": " Apple. "},    # line 4: identical sides
    {"prompt": "", "chosen": "Yes.", "rejected": "No."},                        # line 5: no prompt
    {"prompt": "수도는?", "chosen": "서울입니다.", "rejected": "모르겠습니다."},
]
HH = [{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
       "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]}]
ULTRA = [{"prompt": "Say hi", "chosen": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}],
          "rejected": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "No."}],
          "score_chosen": 8.0, "score_rejected": 2.0}]
KTO = [{"prompt": "2+2?", "completion": "4", "label": True}, {"prompt": "2+3?", "completion": "6", "label": False},
       {"prompt": "3+3?", "completion": "6", "label": "maybe"}]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    h = tmp_path_factory.mktemp("pref_home")
    install_tiny(h)
    return h


def opened_of(home: Path, tmp_path: Path, name: str, rows: list[dict]) -> D.Opened:
    return D.open_source(str(write_jsonl(tmp_path / name, rows)), home)


def settings_of(opened: D.Opened, **changes) -> P.PreparedData:
    return D.settings_from(dataclasses.replace(D.default_settings(opened.summary), **changes))


def test_preference_shapes_are_detected_and_mapped(home, tmp_path):
    pairs = opened_of(home, tmp_path, "pairs.jsonl", PAIRS)
    assert pairs.summary["shape"] == "preference"
    assert {k: v for k, v in pairs.summary["mapping"].items() if v} == {
        "instruction": "prompt", "chosen": "chosen", "rejected": "rejected"}
    hh = opened_of(home, tmp_path, "hh.jsonl", HH)
    assert hh.summary["shape"] == "preference_messages"
    assert {k: v for k, v in hh.summary["mapping"].items() if v} == {"chosen": "chosen", "rejected": "rejected"}
    ultra = opened_of(home, tmp_path, "ultra.jsonl", ULTRA)
    assert ultra.summary["shape"] == "preference_messages"
    kto = opened_of(home, tmp_path, "kto.jsonl", KTO)
    assert kto.summary["shape"] == "unpaired_preference"
    assert {k: v for k, v in kto.summary["mapping"].items() if v} == {
        "instruction": "prompt", "response": "completion", "label": "label"}


def test_pairs_become_trl_rows_in_every_template(home, tmp_path):
    pairs = opened_of(home, tmp_path, "pairs.jsonl", PAIRS)
    chat = settings_of(pairs, system_prompt="Be brief.")
    assert PR.format_pair(PAIRS[0], chat) == {
        "prompt": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "What is the capital of Korea?"}],
        "chosen": [{"role": "assistant", "content": "Seoul."}],
        "rejected": [{"role": "assistant", "content": "I don't know."}]}
    raw = settings_of(pairs, template="raw")
    assert PR.format_pair(PAIRS[0], raw) == {"prompt": "What is the capital of Korea?\n\n", "chosen": "Seoul.",
                                             "rejected": "I don't know."}
    mistral = settings_of(pairs, template="mistral")
    assert PR.format_pair(PAIRS[0], mistral)["prompt"] == "[INST] What is the capital of Korea? [/INST]"
    assert PR.format_pair(PAIRS[0], mistral)["chosen"] == " Seoul."
    # HH-RLHF: the shared messages are the prompt; UltraFeedback likewise (its prompt column unused).
    hh = opened_of(home, tmp_path, "hh.jsonl", HH)
    assert PR.format_pair(HH[0], settings_of(hh)) == {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello! How can I help?"}],
        "rejected": [{"role": "assistant", "content": "Go away."}]}
    ultra = opened_of(home, tmp_path, "ultra.jsonl", ULTRA)
    assert PR.format_pair(ULTRA[0], settings_of(ultra))["prompt"] == [{"role": "user", "content": "Say hi"}]
    kto = opened_of(home, tmp_path, "kto.jsonl", KTO)
    assert PR.format_unpaired(KTO[1], settings_of(kto, template="raw")) == [
        {"prompt": "2+3?\n\n", "completion": "6", "label": False}]
    with pytest.raises(PR.Malformed, match="neither true nor false"):
        PR.format_unpaired(KTO[2], settings_of(kto))


def test_malformed_pairs_are_reported_by_line_and_skipped_or_refused(home, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    data = {**TC.defaults()["data"], "source": {"path": str(path), "config": "", "split": ""},
            "mapping": {"instruction": "prompt", "chosen": "chosen", "rejected": "rejected"}, "split_mode": "none"}
    logged = []
    prepared = PR.load_pairs(data, home, unpaired=False, malformed="skip", log=lambda lvl, msg: logged.append((lvl, msg)))
    assert len(prepared.train) == 3 and prepared.report["malformed_count"] == 3
    assert [(b["line"], b["problem"]) for b in prepared.report["malformed"]] == [
        ("line 3", "empty chosen answer"), ("line 4", "identical chosen and rejected answers"),
        ("line 5", "missing prompt")]
    assert logged[0][0] == "warning" and "line 3: empty chosen answer" in logged[0][1]
    assert prepared.train[1]["chosen"] == [{"role": "assistant", "content": "東京です。"}]
    with pytest.raises(D.DataError) as refused:
        PR.load_pairs(data, home, unpaired=False, malformed="refuse")
    assert "3 malformed row(s) of 6" in str(refused.value) and refused.value.where == "data.source: line 3"
    # A mapping without the rejected side is refused at the role, before anything is read.
    with pytest.raises(D.DataError) as missing:
        PR.load_pairs({**data, "mapping": {"instruction": "prompt", "chosen": "chosen"}}, home, unpaired=False,
                      malformed="skip")
    assert missing.value.where == "mapping.rejected"


def test_the_preview_shows_both_sides_with_the_answers_in_the_loss(home, tmp_path):
    tok = D.load_tokenizer("", home)
    pairs = opened_of(home, tmp_path, "pairs.jsonl", PAIRS)
    pv = D.preview_row(pairs, settings_of(pairs), 0, tok)
    assert pv["error"] is None and set(pv["sides"]) == {"chosen", "rejected"}
    for name, answer in (("chosen", "Seoul."), ("rejected", "I don't know.")):
        side = pv["sides"][name]
        in_loss = "".join(s["text"] for s in side["segments"] if s["loss"])
        out_of_loss = "".join(s["text"] for s in side["segments"] if not s["loss"])
        assert answer in in_loss and "capital of Korea" in out_of_loss and "capital" not in in_loss
        assert 0 < side["loss_tokens"] < side["tokens"]
    bad = D.preview_row(pairs, settings_of(pairs), 3, tok)
    assert bad["error"]["message"] == "malformed pair: identical chosen and rejected answers"
    kto = opened_of(home, tmp_path, "kto.jsonl", KTO)
    pv = D.preview_row(kto, settings_of(kto), 1, tok)
    assert set(pv["sides"]) == {"completion"} and pv["label"] is False
    # SFT's token statistics would measure the prompts alone: refused, saying where to look.
    with pytest.raises(D.DataError, match="these are preference pairs"):
        D.token_stats(pairs, settings_of(pairs), tok)


def test_tokenized_sides_match_trls_dpo_preparation(home, tmp_path):
    """The preview's split of prompt and answer is trl's own: DPOTrainer._prepare_dataset's ids."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    tok = D.load_tokenizer("", home)
    pairs = opened_of(home, tmp_path, "pairs.jsonl", PAIRS)
    s = settings_of(pairs)
    rows = [PR.format_pair(PAIRS[i], s) for i in (0, 1, 5)]
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer._tokenizer = tok
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_length=None, report_to="none", use_cpu=True)
    theirs = DPOTrainer._prepare_dataset(trainer, datasets.Dataset.from_list(rows), tok, args, "train")
    for row, t in zip(rows, theirs):
        ids, mask = PR.tokenize_side(tok, row["prompt"], row["chosen"])
        start = mask.index(1)
        assert ids[:start] == t["prompt_ids"] and ids[start:] == t["chosen_ids"]


def test_the_shipped_preference_sample_is_whole_and_reproducible():
    from backend.samples import make_preference_sample

    assert make_preference_sample.main(["--check"]) == 0
    rows = [json.loads(line) for line in tiny.preference_sample_path().read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 300
    assert all(r["prompt"] and r["chosen"] and r["rejected"] and r["chosen"] != r["rejected"] for r in rows)
    text = " ".join(r["prompt"] for r in rows)
    assert re.search("[\uac00-\ud7a3]", text) and re.search("[\u3040-\u30ff]", text)
    assert tiny.sample_for("dpo") == tiny.preference_sample_path() and tiny.sample_for("sft") == tiny.sample_dataset_path()


def test_the_method_and_its_section_in_the_run_config(tmp_path):
    config = TC.defaults()
    assert config["method"] == "sft" and set(P.METHOD_SETTINGS) <= set(config)
    config.update(method="dpo")
    config["dpo"].update(beta=0.05, loss_type="ipo")
    text = TC.dumps_toml(config)
    assert 'method = "dpo"' in text and "[dpo]" in text and "[kto]" not in text
    back, errors = TC.loads_toml(text)
    assert errors == {} and back["method"] == "dpo" and back["dpo"]["beta"] == 0.05 and back["dpo"]["loss_type"] == "ipo"
    bad, errors = TC.normalise({"method": "ppo", "dpo": {"beta": 0, "loss_type": "sigmoidd"},
                                "kto": {"desirable_weight": -1}})
    assert errors["method"].startswith("must be one of sft, dpo, orpo, kto, got 'ppo'")
    assert errors["dpo.beta"] == "must be a positive number (e.g. 0.1), got 0"
    assert "did you mean 'sigmoid'" in errors["dpo.loss_type"]
    assert errors["kto.desirable_weight"] == "must be a positive number, got -1"
    _, errors = TC.normalise({"method": "kto", "training": {"per_device_train_batch_size": 1}})
    assert "batch of 2 or more" in errors["training.per_device_train_batch_size"]
    raw, env_errors = TC.apply_env({"method": "dpo"}, {"QLW_DPO__BETA": "0.2", "QLW_ORPO__BETAA": "1"})
    assert raw["dpo"]["beta"] == 0.2 and "orpo.betaa" in env_errors
    assert TC.warnings_for(TC.checked({"method": "orpo"}))["training.packing"].startswith("packing is SFT's")


def test_every_catalogued_setting_has_help_and_a_check():
    """One catalogue: each setting's help, range and choices are on the protocol dataclass, and
    the backend's rules are made from them (a new method's settings need nothing else)."""
    for section, cls in TC.SECTIONS.items():
        if section in ("model", "data"):
            continue
        for name, f in P.settings_catalogue(cls).items():
            assert f.metadata["help"].strip(), (section, name)
            assert name in TC.RULES[section]
    rule = TC.RULES["training"]["learning_rate"]
    assert rule(0)[1] == "must be a positive number below 1 (e.g. 2e-4), got 0" and rule(1e-4) == (1e-4, None)
    assert TC.RULES["training"]["max_steps"](-1) == (-1, None)


def test_validate_counts_the_steps_of_a_preference_run(tmp_path):
    """train.validate's step count: pairs for DPO (packing is SFT's, so it does not hide the
    count), twice the pairs for KTO on paired data (unpaired)."""
    from backend import train

    home = tmp_path / "home"
    config = TC.defaults()
    config["model"].update(device="cpu", precision="fp32")
    config["training"].update(per_device_train_batch_size=4, gradient_accumulation_steps=1, num_train_epochs=1)
    config["method"] = "dpo"
    n = len(tiny.preference_sample_path().read_text(encoding="utf-8").splitlines())
    train_rows = n - -(-n // 10)  # validation_ratio 0.1, rounded up
    assert train.validate_run(config, home)["total_steps"] == -(-train_rows // 4)
    config["method"] = "kto"
    assert train.validate_run(config, home)["total_steps"] == -(-(2 * train_rows) // 4)
