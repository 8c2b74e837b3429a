"""Generate ``preference_sample.jsonl``: the preference pairs that ship with qlw (for DPO and ORPO;
KTO unpairs them).

Each row is ``{"prompt", "chosen", "rejected", "category"}``, built from the shipped instruction
sample (``dolly_sample.jsonl``, English with Korean and Japanese rows): ``chosen`` is the sample's
own answer, correct by construction; ``rejected`` is, by a seeded choice, an answer to another
question of the same language (off topic), a curt non-answer in the row's language, or the
answer cut to its first few words. Rows whose rejected side would equal the chosen one are left
out. The fixed seed makes the file reproducible:

    python -m backend.samples.make_preference_sample          # rewrites preference_sample.jsonl
    python -m backend.samples.make_preference_sample --check  # fails if the committed file is stale
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

SEED = 20261207
SOURCE = Path(__file__).with_name("dolly_sample.jsonl")
OUT = Path(__file__).with_name("preference_sample.jsonl")

NON_ANSWERS = {
    "en": ("I don't know.", "That is not something I can answer.", "Look it up yourself.", "No idea, sorry."),
    "ko": ("모르겠습니다.", "그건 대답할 수 없어요.", "직접 찾아보세요."),
    "ja": ("わかりません。", "それには答えられません。", "自分で調べてください。"),
}


def language(text: str) -> str:
    """``ko`` for Hangul, ``ja`` for kana or CJK ideographs, else ``en``."""
    if re.search(r"[\uac00-\ud7a3]", text):
        return "ko"
    if re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", text):
        return "ja"
    return "en"


def cut(text: str, lang: str) -> str:
    """The answer's first few words (characters for Japanese), an unfinished answer."""
    if lang == "ja":
        return text[: max(4, len(text) // 4)]
    words = text.split()
    return " ".join(words[: max(2, len(words) // 4)])


def build_rows() -> list[dict[str, str]]:
    rng = random.Random(SEED)
    source = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_lang: dict[str, list[dict[str, str]]] = {}
    for r in source:
        by_lang.setdefault(language(r["instruction"]), []).append(r)
    rows = []
    for r in source:
        if not r["response"].strip():
            continue
        lang = language(r["instruction"])
        prompt = r["instruction"] + ("\n\n" + r["context"] if r["context"] else "")
        kind = rng.choice(("other", "other", "non_answer", "cut"))
        if kind == "other":
            others = [o for o in by_lang[lang] if o["instruction"] != r["instruction"] and o["response"] != r["response"]]
            rejected = rng.choice(others)["response"]
        elif kind == "non_answer":
            rejected = rng.choice(NON_ANSWERS[lang])
        else:
            rejected = cut(r["response"], lang)
        if rejected.strip() == r["response"].strip():
            continue
        rows.append({"prompt": prompt, "chosen": r["response"], "rejected": rejected, "category": r["category"]})
    return rows


def render(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed file differs")
    args = parser.parse_args(argv)
    text = render(build_rows())
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is stale: run python -m backend.samples.make_preference_sample", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {len(text.splitlines())} rows to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
