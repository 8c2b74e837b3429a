"""Saving a merged model: paths of the base scrubbed from its files (:func:`scrub_paths`),
progress while ``save_pretrained`` writes, and the README.md model card (:func:`model_card`).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable


# Saving ---------------------------------------------------------------------------------------------------


def _strip_paths(value: Any, paths: list[str], replacement: str) -> tuple[Any, int]:
    """``value`` with every string that names one of ``paths`` replaced; and how many were."""
    if isinstance(value, str):
        for p in paths:
            if p and p in value:
                return (replacement if value.strip() == p else value.replace(p, replacement)), 1
        return value, 0
    if isinstance(value, dict):
        n = 0
        out = {}
        for k, v in value.items():
            out[k], c = _strip_paths(v, paths, replacement)
            n += c
        return out, n
    if isinstance(value, list):
        n = 0
        items = []
        for v in value:
            v2, c = _strip_paths(v, paths, replacement)
            items.append(v2)
            n += c
        return items, n
    return value, 0


def scrub_paths(folder: Path, paths: list[str], replacement: str) -> list[str]:
    """Rewrite the folder's JSON files so none names a path of the base (transformers writes
    ``_name_or_path`` and tokenizers ``name_or_path``; peft stores the absolute base path).
    Returns the files changed."""
    changed = []
    paths = sorted({p for p in paths if p and len(p) > 1}, key=len, reverse=True)
    for f in sorted(Path(folder).glob("*.json")):
        if f.name.endswith(".index.json"):
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        clean, n = _strip_paths(data, paths, replacement)
        for key in ("_name_or_path", "name_or_path"):
            if isinstance(clean, dict) and isinstance(clean.get(key), str) and clean[key].startswith("/"):
                clean[key] = replacement
                n += 1
        if n:
            f.write_text(json.dumps(clean, indent=2, sort_keys=False) + "\n", encoding="utf-8")
            changed.append(f.name)
    return changed


class _SaveWatcher:
    """Reports the bytes written into a folder while ``save_pretrained`` writes it (progress by
    file, from another thread: save_pretrained has no callback)."""

    def __init__(self, folder: Path, total: int, report: Callable[..., None], interval: float = 0.25):
        self.folder, self.total, self.report, self.interval = folder, total, report, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qlw-merge-save-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        sizes = {}
        for p in self.folder.glob("*.safetensors"):
            try:
                st = p.stat()
            except OSError:  # renamed or removed while we looked
                continue
            sizes[p.name] = (st.st_size, st.st_mtime)
        done = sum(size for size, _ in sizes.values())
        newest = max(sizes, key=lambda name: sizes[name][1], default="")
        self.report("saving", min(done, self.total), self.total, "bytes", f"{len(sizes)} file(s), {newest}")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(2)


def _read_run_config(info: dict[str, Any]) -> dict[str, Any]:
    path = info.get("run_config")
    if not path:
        return {}
    try:
        from backend import train_config as TC

        config, errors = TC.read_toml(Path(path))
        return config if "file" not in errors else {}
    except Exception:
        return {}


def _losses_from_store(home: Path, session: str) -> tuple[float | None, float | None]:
    """The final training and validation loss the session store recorded (train.finished)."""
    db = Path(home) / "sessions.db"
    if not session or not db.is_file():
        return None, None
    try:
        from sessions.store import Store

        store = Store(db)
        try:
            rows = [e for e in store.read_events(session) if e.kind == "train.finished"]
        finally:
            store.close()
    except Exception:
        return None, None
    if not rows:
        return None, None
    last = rows[-1].payload
    return last.get("final_loss"), last.get("final_eval_loss")


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "—"
    return str(value)


def model_card(*, name: str, base: str, base_is_hub: bool, info: dict[str, Any], run: dict[str, Any],
               losses: tuple[float | None, float | None], dtype: str, into: str, how: str) -> str:
    """README.md of the merged folder: the base, the data, the LoRA and training settings, the
    final losses, how it was merged and how to load it."""
    data = (run.get("data") or {})
    source = (data.get("source") or {})
    dataset = source.get("path") or "—"
    if source.get("split"):
        dataset += f" (split {source['split']})"
    lora_rows = [("r", info.get("r")), ("lora_alpha", info.get("lora_alpha")),
                 ("lora_dropout", info.get("lora_dropout")), ("target_modules", info.get("target_modules")),
                 ("use_rslora", info.get("use_rslora")), ("use_dora", info.get("use_dora"))]
    for key, value in (run.get("lora") or {}).items():
        if key not in dict(lora_rows) and key != "target_modules":
            lora_rows.append((key, value))
    training = run.get("training") or {}
    keys = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
            "gradient_accumulation_steps", "lr_scheduler_type", "warmup_ratio", "optim", "weight_decay",
            "gradient_checkpointing", "seed")
    train_rows = [(k, training[k]) for k in keys if k in training]
    model = run.get("model") or {}
    trained_on = model.get("precision", "?")
    if trained_on == "4bit":
        trained_on = (f"4-bit {model.get('quant_type', 'nf4')}{' + double quant' if model.get('double_quant') else ''}, "
                      f"compute {model.get('compute_dtype', 'bf16')}")
    front = ["---", "library_name: transformers", "tags:", "- qlw", "- lora", "- merged"]
    if base_is_hub:
        front.append(f"base_model: {base}")
    front.append("---")
    loss, eval_loss = losses
    lines = [
        *front, "",
        f"# {name}", "",
        f"A LoRA adapter merged into its base model with qlw. Weights in {dtype} (safetensors).", "",
        "| | |", "|---|---|",
        f"| base model | {base} |",
        f"| base as trained | {trained_on} |",
        f"| merged into | {into}: {how} |",
        f"| dataset | {dataset} |",
        f"| data template | {_fmt(data.get('template'))}, max_length {_fmt(data.get('max_length'))} |",
        f"| final training loss | {_fmt(loss)} |",
        f"| final validation loss | {_fmt(eval_loss)} |",
        f"| adapter | {info.get('kind', 'adapter')}{' at step ' + str(info['step']) if info.get('step') else ''} |",
        "",
        "## LoRA settings", "", "| setting | value |", "|---|---|",
        *(f"| {k} | {_fmt(v)} |" for k, v in lora_rows), "",
        "## Training settings", "",
    ]
    if train_rows:
        lines += ["| setting | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in train_rows), ""]
    else:
        lines += ["Not recorded (the adapter has no run config beside it).", ""]
    lines += [
        "## How to load it", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("path/to/{name}", dtype="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("path/to/{name}")',
        'messages = [{"role": "user", "content": "Hello!"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,",
        '                                       return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))",
        "```", "",
        "No adapter or peft is needed: the LoRA weights are part of the model's weights.", "",
    ]
    return "\n".join(lines)

