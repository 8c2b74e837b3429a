"""SFT: trl's ``SFTTrainer`` on the prepared dataset's rows (``backend.data.load_prepared``, the
one formatter), with ``SFTConfig``'s ``max_length``, truncation, completion-only / assistant-only
loss and packing. ``tests/backend/test_train_equality.py`` holds it to a plain trl script."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backend.methods.base import TrainingMethod, lora_config, training_kwargs, watched

#: What trl's padding-free collator adds for varlen kernels; a stacked batch does not need it.
_VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def stack_equal_rows(inputs: dict[str, Any]) -> dict[str, Any]:
    """A padding-free batch (trl's packing: rows flattened into one sequence, position ids
    restarting at each row) whose rows all have the same length, as a plain batch of those rows
    with an all-ones attention mask. The same computation (each row attends to itself only), but
    sdpa runs its causal kernel instead of a dense block-diagonal mask, which costs ~8x the
    attention work on rows that fill max_length. Other batches are returned as they are."""
    pos = inputs.get("position_ids")
    if pos is None or "attention_mask" in inputs or pos.dim() != 2 or pos.shape[0] != 1:
        return inputs
    import torch

    total = pos.shape[1]
    starts = (pos[0] == 0).nonzero().flatten()
    k = starts.numel()
    if k < 2 or total % k:
        return inputs
    n = total // k
    row = torch.arange(n, device=pos.device, dtype=pos.dtype)
    if not torch.equal(pos[0].view(k, n), row.expand(k, n)):
        return inputs
    out = {key: value for key, value in inputs.items() if key not in _VARLEN_KEYS}
    for key in ("input_ids", "labels", "position_ids"):
        if key in out:
            out[key] = out[key].reshape(k, n)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out


class SFT(TrainingMethod):
    """Supervised fine-tuning: instruction/response, prompt/completion, conversations or text."""

    name = "sft"
    settings_class = None
    roles = (("instruction",), ("messages",), ("text",))
    log_columns = ()

    def prepare(self, data: dict[str, Any], eff: dict[str, Any], home: Path, progress=None, cancelled=None, log=None):
        from backend import data as D

        return D.load_prepared(data, home, progress, cancelled)

    def trl_config(self, eff: dict[str, Any], prepared, output_dir: Path, device: str, has_eval: bool):
        from trl import SFTConfig

        kwargs = training_kwargs(eff, SFTConfig, output_dir, device, has_eval)
        return SFTConfig(**kwargs, packing=eff["training"]["packing"], **prepared.sft_config)

    def build_trainer(self, model, tokenizer, eff: dict[str, Any], prepared, args, callbacks: list, log=None):
        from trl import SFTTrainer

        has_eval = prepared.validation is not None and len(prepared.validation) > 0
        return watched(SFTTrainer, stack_equal_rows)(
            model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.validation if has_eval else None,
            processing_class=tokenizer, peft_config=lora_config(eff["lora"]), callbacks=callbacks)
