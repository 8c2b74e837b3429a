"""The embedded default: a tiny Llama built locally and the sample dataset that ships with qlw.

With no GPU and no network, qlw still runs the whole loop (load, train, chat, merge) on
``qlw-tiny-llama``, built on first use into ``<home>/models/qlw-tiny-llama``:

- a byte-level BPE tokenizer (3,072 tokens: lossless for any text, Korean and Japanese included)
  trained with ``tokenizers`` on the sample dataset, wrapped as a ``PreTrainedTokenizerFast`` with
  ``<s>``/``</s>``/``<pad>`` and a chat template whose assistant turns are marked with
  ``{% generation %}`` so that trl's ``assistant_only_loss=True`` works;
- a 2-layer ``LlamaForCausalLM`` (hidden 128, tied embeddings, 688,768 parameters, 2.8 MB of
  fp32 safetensors) from a fixed seed, pre-trained for a few seconds on the sample's plain text
  (contexts and responses, never the chat format: 160 AdamW steps of 8 x 128 tokens over a
  21.6k-token corpus; mean loss 8.06 -> 3.73), so it writes word-like text and fine-tuning on
  instructions visibly changes its answers.

Measured on 2 CPU cores (torch 2.13 CPU): the build takes 9.5-11.5 s in a fresh process (imports
2.5-3 s, tokenizer 0.1 s, pre-training 7-8 s, save 0.05 s); more when other processes share the
cores. ``qlw-tiny.json`` records the figures of each build. The result is byte-identical from run
to run on one machine (fixed seeds, a private RNG state). The build writes into a temporary folder
beside the target and renames it into place when complete, under an ``fcntl`` lock, so a killed
build never leaves a half model under the final name and concurrent callers build once.

This module is imported by the backend server at start: the ML stack is imported only inside the
functions that need it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - for annotations only
    import datasets

TINY_MODEL_ID = "qlw-tiny-llama"
#: Bump when the recipe changes: folders with another version are rebuilt on next use.
BUILD_VERSION = 1
MARKER_NAME = "qlw-tiny.json"
SEED = 20261123

VOCAB_SIZE = 3072
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)  # ids 0..6, in this order

#: A simple role-tagged format. The assistant reply and its ``</s>`` sit inside
#: ``{% generation %}`` so that ``return_assistant_tokens_mask`` (and with it trl's
#: ``assistant_only_loss``) marks exactly the tokens the model must learn to produce.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\\n' -}}"
    "{% generation %}{{- message['content'] + eos_token -}}{% endgeneration %}"
    "{{- '\\n' -}}"
    "{%- elif message['role'] in ['system', 'user'] -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' -}}"
    "{%- else -%}"
    "{{- raise_exception('qlw-tiny-llama knows the roles system, user and assistant, not ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

# Model shape and pre-training recipe (measured on 2 CPU cores: ~45 ms per step).
MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)
BLOCK_SIZE = 128
BATCH_SIZE = 8
PRETRAIN_STEPS = 160
LEARNING_RATE = 6e-3
WARMUP_STEPS = 16
EVAL_CHUNK = 32


class TinyBuildCancelled(Exception):
    """The build was cancelled through ``cancelled()``; nothing was left behind."""


# The sample dataset ---------------------------------------------------------------------------


def sample_dataset_path() -> Path:
    """The shipped sample dataset: dolly-15k-shaped JSONL (instruction, context, response,
    category), English with Korean and Japanese rows."""
    return Path(__file__).resolve().parent / "samples" / "dolly_sample.jsonl"


def preference_sample_path() -> Path:
    """The shipped preference pairs (prompt, chosen, rejected; English with Korean and Japanese),
    made from the sample dataset by ``backend/samples/make_preference_sample.py``: the default
    data of a DPO, ORPO or KTO run."""
    return Path(__file__).resolve().parent / "samples" / "preference_sample.jsonl"


def sample_for(method: str) -> Path:
    """The shipped sample a run of ``method`` trains on when no data is chosen."""
    return sample_dataset_path() if method == "sft" else preference_sample_path()


def load_sample_dataset(split: str = "train") -> datasets.Dataset:
    """The sample dataset as a ``datasets.Dataset``, loaded the way real local data is
    (``load_dataset("json", data_files=...)``; it caches under ``HF_HOME``)."""
    import datasets

    return datasets.load_dataset("json", data_files=str(sample_dataset_path()), split=split)


def _sample_rows() -> list[dict[str, str]]:
    with sample_dataset_path().open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# The model folder -----------------------------------------------------------------------------


def tiny_model_path(home: Path) -> Path:
    """Where the tiny model lives: ``<home>/models/qlw-tiny-llama``."""
    return Path(home) / "models" / TINY_MODEL_ID


def _is_current(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("build_version") == BUILD_VERSION


def ensure_tiny_model(
    home: Path,
    progress: Callable[[str, int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Path:
    """Return the tiny model's folder, building it first if it is missing or outdated.

    ``progress(stage, done, total)`` is called from this thread with the stages ``"wait"``
    (another process is building), ``"tokenizer"``, ``"pretrain"`` (steps) and ``"save"``.
    ``cancelled()`` is polled between steps; when it returns true the build stops, removes its
    temporary folder and raises :class:`TinyBuildCancelled`. A current folder is returned at once,
    without importing anything heavy.
    """
    target = tiny_model_path(home)
    if _is_current(target):
        return target
    report = progress or (lambda stage, done, total: None)
    is_cancelled = cancelled or (lambda: False)
    models_dir = target.parent
    models_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(models_dir / f".{TINY_MODEL_ID}.lock", report, is_cancelled):
        if _is_current(target):  # another process built it while we waited
            return target
        _remove_leftovers(models_dir)
        tmp = models_dir / f".{TINY_MODEL_ID}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _build(tmp, report, is_cancelled)
            _swap_into_place(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _build_lock(path: Path, report: Callable[[str, int, int], None], is_cancelled: Callable[[], bool]) -> Iterator[None]:
    with open(path, "a+") as f:
        waited = False
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    report("wait", 0, 0)
                    waited = True
                if is_cancelled():
                    raise TinyBuildCancelled("cancelled while waiting for another build") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(models_dir: Path) -> None:
    """Remove temporary folders of killed builds (safe: called holding the lock)."""
    for stale in models_dir.glob(f".{TINY_MODEL_ID}.*-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _swap_into_place(tmp: Path, target: Path) -> None:
    if target.exists():  # an outdated build: move it aside first, then drop it
        old = target.with_name(f".{TINY_MODEL_ID}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    _fsync_dir(target.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The build ------------------------------------------------------------------------------------


def _build(out: Path, report: Callable[[str, int, int], None], is_cancelled: Callable[[], bool]) -> None:
    started = time.perf_counter()
    import torch
    import transformers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    seconds = {"imports": time.perf_counter() - started}
    rows = _sample_rows()
    report("tokenizer", 0, 1)
    tick = time.perf_counter()
    tokenizer = _train_tokenizer(rows)
    seconds["tokenizer"] = time.perf_counter() - tick
    report("tokenizer", 1, 1)
    if is_cancelled():
        raise TinyBuildCancelled("cancelled after the tokenizer was trained")

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    blocks = _pretraining_blocks(tokenizer, rows)
    # A private RNG state: building must not disturb the caller's torch seed, and the caller's
    # seed must not change the build.
    tick = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
        stats = _pretrain(model, blocks, report, is_cancelled)
    seconds["pretrain"] = time.perf_counter() - tick
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    report("save", 0, 1)
    tick = time.perf_counter()
    out.mkdir(parents=True)
    with _no_progress_bars():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker = {
        "model_id": TINY_MODEL_ID,
        "build_version": BUILD_VERSION,
        "seed": SEED,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "pretrain": stats,
        "build_seconds": round(time.perf_counter() - started, 2),
        "seconds": {k: round(v, 2) for k, v in {**seconds, "save": time.perf_counter() - tick}.items()},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    (out / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    for file in out.iterdir():  # the rename must not publish files still in the page cache only
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    report("save", 1, 1)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Keep transformers' tqdm bars out of the backend's log while saving."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _train_tokenizer(rows: list[dict[str, str]]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=UNK))
    # Byte-level: every string maps to tokens and back unchanged; no prefix space, so that
    # decode(encode(text)) == text.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [text for row in rows for text in (row["instruction"], row["context"], row["response"]) if text]
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        add_bos_token=True,  # like Llama: plain text starts with <s>; the chat template adds its own
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )


def _pretraining_blocks(tokenizer: Any, rows: list[dict[str, str]]) -> Any:
    """Plain text (contexts and responses as separate documents), packed into fixed blocks."""
    import torch

    docs = [text for row in rows for text in (row["context"], row["response"]) if text]
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *enc, tokenizer.eos_token_id]
    n = len(ids) // BLOCK_SIZE
    return torch.tensor(ids[: n * BLOCK_SIZE], dtype=torch.long).view(n, BLOCK_SIZE)


def _pretrain(model: Any, blocks: Any, report: Callable[[str, int, int], None], is_cancelled: Callable[[], bool]) -> dict[str, Any]:
    """A short causal-LM loop with AdamW, warm-up and cosine decay; returns the losses."""
    import torch

    def eval_loss() -> float:  # mean loss over the whole corpus, in chunks
        model.eval()
        with torch.no_grad():
            total = sum(model(input_ids=chunk, labels=chunk).loss.item() * len(chunk) for chunk in blocks.split(EVAL_CHUNK))
        model.train()
        return round(total / len(blocks), 4)

    loss_before = eval_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    report("pretrain", 0, PRETRAIN_STEPS)
    for step in range(PRETRAIN_STEPS):
        if is_cancelled():
            raise TinyBuildCancelled(f"cancelled at pre-training step {step} of {PRETRAIN_STEPS}")
        warmup = min(1.0, (step + 1) / WARMUP_STEPS)
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / PRETRAIN_STEPS))
        for group in optimizer.param_groups:
            group["lr"] = LEARNING_RATE * warmup * cosine
        batch = blocks[torch.randint(0, blocks.shape[0], (BATCH_SIZE,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 10 == 0 or step + 1 == PRETRAIN_STEPS:
            report("pretrain", step + 1, PRETRAIN_STEPS)
    model.eval()
    return {
        "steps": PRETRAIN_STEPS,
        "batch_size": BATCH_SIZE,
        "block_size": BLOCK_SIZE,
        "tokens_seen": PRETRAIN_STEPS * BATCH_SIZE * BLOCK_SIZE,
        "corpus_tokens": int(blocks.numel()),
        "loss_before": loss_before,
        "loss_after": eval_loss(),
    }
