"""Merge's constants, its fault seam (``QLW_MERGE_FAULT``), and its folders: where a merged model
goes (:func:`resolve_out`), whether an existing one may be replaced (:func:`replace_refusal`),
leftovers of a killed merge cleaned (:func:`clean_stale`), sizes and file lists.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

from backend.jobs import JobError


FAULT_ENV = "QLW_MERGE_FAULT"
MIB = 1024 * 1024
GIB = 1024 * MIB
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
#: Marks of this module's temporary folders beside a target: ``.<name>.qlw-merge-<pid>-<hex>``
#: (being written) and ``.<name>.qlw-old-<hex>`` (a replaced target being deleted).
TMP_MARK = ".qlw-merge-"
OLD_MARK = ".qlw-old-"
#: Prompts of the verification table when none are given: short, varied, English.
DEFAULT_PROMPTS = [
    "The capital of France is Paris, and the capital of Germany is",
    "To make a cup of tea, first boil the water, then",
    "Question: What is 12 times 7?\nAnswer:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def parse_fault(text: str | None) -> tuple[str, str] | None:
    """``"kill@saving"`` -> ``("kill", "saving")``; None for empty or malformed text."""
    m = re.fullmatch(r"\s*(kill|fail)\s*@\s*([a-z ]+?)\s*", text or "")
    return (m.group(1), m.group(2)) if m else None


def take_fault() -> tuple[str, str] | None:
    return parse_fault(os.environ.pop(FAULT_ENV, None))


def _fault_at(fault: tuple[str, str] | None, stage: str) -> None:
    if fault is None or fault[1] != stage:
        return
    if fault[0] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected failure at {stage} ({FAULT_ENV})")


# Paths -----------------------------------------------------------------------------------------------


def merged_home(home: Path) -> Path:
    return Path(home) / "merged"


def resolve_out(out: str, home: Path) -> Path:
    """The output folder: absolute as given, or relative to ``<home>/merged`` (which a relative
    path may not leave). JobError for an empty or unusable path."""
    text = (out or "").strip()
    if not text or "\0" in text:
        raise JobError("no output folder given", where="out", hint="name a folder, e.g. my-model (under the data "
                       "home's merged/) or an absolute path")
    path = Path(text).expanduser()
    if not path.is_absolute():
        base = merged_home(home).resolve()
        path = (base / path).resolve()
        if not path.is_relative_to(base) or path == base:
            raise JobError(f"{text} leads outside {base}", where=f"out = {text}",
                           hint="give a folder name under merged/, or an absolute path")
    else:
        path = Path(os.path.abspath(path))
    if path.name.startswith(".") and (TMP_MARK in path.name or OLD_MARK in path.name):
        raise JobError(f"{path.name} is a name qlw uses for its temporary folders", where=f"out = {text}",
                       hint="choose another name")
    if path.exists() and not path.is_dir():
        raise JobError(f"{path} exists and is a file, not a folder", where=f"out = {text}",
                       hint="choose another name")
    return path


#: Weight files that, beside a config.json, make a folder a model folder a merge may replace.
MODEL_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "model*.bin")


def _is_qlw_card(readme: Path) -> bool:
    """A README.md model card qlw wrote (its front matter tags it ``qlw`` and ``merged``)."""
    try:
        head = readme.read_text(encoding="utf-8", errors="replace")[:2000]
    except OSError:
        return False
    front = head.split("---", 2)[1] if head.startswith("---") and head.count("---") >= 2 else ""
    return "- qlw" in front and "- merged" in front


def replace_refusal(out: Path) -> str | None:
    """Why an existing ``out`` may not be replaced by a merge (None: it may be, or it does not
    exist). Only an empty folder or a model folder (config.json and weights, or a folder with
    qlw's model card) is replaced; anything else (a folder of the user's notes, the home, ~) is
    someone's files that a mistyped output folder must never delete."""
    out = Path(out)
    if out.is_symlink():
        return f"{out} is a link, not a folder qlw wrote"
    if not out.exists():
        return None
    if not out.is_dir():
        return f"{out} is a file, not a model folder"
    try:
        entries = sorted(out.iterdir(), key=lambda e: e.name)
    except OSError as exc:
        return f"{out} cannot be read ({exc.strerror or exc})"
    if not entries:
        return None
    names = {e.name for e in entries if e.is_file()}
    weights = any(e.is_file() and any(e.match(g) for g in MODEL_WEIGHTS) for e in entries)
    if "config.json" in names and weights:
        return None
    if "README.md" in names and _is_qlw_card(out / "README.md"):
        return None
    shown = [e.name + ("/" if e.is_dir() else "") for e in entries[:5]]
    more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
    return (f"{out} is not a model folder (no config.json with weights, no qlw model card): it holds "
            f"{', '.join(shown)}{more}, which replacing it would delete")


def write_refusal(out: Path) -> str | None:
    """Why the merged model could not be written at ``out`` (None: it can): the nearest existing
    folder on its way is probed by creating (and removing) a folder there, as the merge's
    temporary folder will be, so a read-only file system or a folder without permission is
    found before any model is loaded (a check of the mode bits would miss both as root)."""
    folder = Path(out).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        probe = tempfile.mkdtemp(prefix=".qlw-write-check-", dir=folder)
        os.rmdir(probe)
    except OSError as exc:
        return f"{folder} is not writable ({exc.strerror or exc})"
    return None


def check_replaceable(out: Path, text: str | None = None) -> None:
    """JobError when ``out`` exists and is not a folder a merge may replace."""
    why = replace_refusal(out)
    if why:
        raise JobError(why, where=f"out = {text or out}",
                       hint="pick another output folder (a new or empty one): qlw replaces only a model folder")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[str]:
    """Remove what killed merges left beside ``out``: temporary folders of processes that are
    gone, and replaced targets not yet deleted. Returns the names removed."""
    removed = []
    parent = out.parent
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        name = entry.name
        if not name.startswith(f".{out.name}"):
            continue
        rest = name[len(out.name) + 1:]
        stale = False
        if rest.startswith(TMP_MARK):
            m = re.match(r"(\d+)-", rest[len(TMP_MARK):])
            stale = m is None or int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))
            if m is not None and int(m.group(1)) == os.getpid():
                stale = False  # one of this process's own merges may still be writing it
        elif rest.startswith(OLD_MARK):
            stale = True
        if stale and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(name)
    return removed


def folder_bytes(folder: Path) -> int:
    total = 0
    for p in Path(folder).rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def list_files(folder: Path) -> list[dict[str, Any]]:
    """The folder's files (relative names) with their sizes, sorted by name."""
    folder = Path(folder)
    return [{"name": str(p.relative_to(folder)), "size_bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file()]

