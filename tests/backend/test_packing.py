"""Packing is correct: a packed batch computes exactly what its rows compute one by one.

The check runs inside qlw's real training run (``backend.train.run_training`` with
``training.packing = true``, the default data settings and the model's attention as configured),
in a TrainerCallback that takes the first batch of the trainer's own dataloader: trl's
best-fit-decreasing packing and its padding-free collator (several rows flattened into one
sequence, position ids restarting at each row, no attention mask), fed to the model the way the
trainer feeds it. For that batch:

- every row's logits equal those of the row run alone (so no token attends across a row
  boundary; fp32, 2e-5);
- the batch's loss equals the token-weighted mean of the rows' own losses;
- a control: the same packed tokens under a plain causal mask (rows may attend to earlier rows)
  give different logits, so the check would see cross-contamination.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from backend import train, train_config as TC
from backend.methods import sft
from sessions.store import Store

pytestmark = pytest.mark.slow


def _loss(logits, labels):
    """Summed next-token cross-entropy over labelled tokens, and their count."""
    import torch

    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    mask = shift_labels != -100
    total = torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum")
    return float(total), int(mask.sum())


def packing_check():
    """A callback that checks the first packed batch and stops the run."""
    import torch
    from transformers import TrainerCallback

    found: dict = {}

    class Check(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            batch = next(iter(train_dataloader))
            found["keys"] = sorted(batch)
            ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
            starts = (pos[0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
            found["rows"] = len(starts) - 1
            found["attn"] = model.config._attn_implementation
            was_training = model.training
            model.eval()
            with torch.no_grad():
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                packed = model(**inputs, use_cache=False).logits
                packed_sum, packed_n = _loss(packed, labels)
                diffs, sums, ns = [], 0.0, 0
                for a, b in zip(starts, starts[1:]):
                    alone = model(input_ids=ids[:, a:b], use_cache=False).logits
                    diffs.append(float((packed[:, a:b] - alone).abs().max()))
                    row_labels = labels[:, a:b].clone()
                    s, n = _loss(alone, row_labels)
                    sums, ns = sums + s, ns + n
                # The control: one causal mask over the whole packed sequence, same position ids.
                mixed = model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids),
                              use_cache=False).logits
            model.train(was_training)
            later = slice(starts[1], starts[-1])
            found.update(max_diff=max(diffs), packed_loss=packed_sum / packed_n, rows_loss=sums / ns,
                         packed_tokens=packed_n, rows_tokens=ns,
                         control_diff=float((mixed[:, later] - packed[:, later]).abs().max()))
            control.should_training_stop = True
            return control

    return Check(), found


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_batch_is_its_rows_one_by_one(tiny_folder, attention):
    home = Path(tempfile.mkdtemp(prefix="qlw-pack-", dir="/tmp"))
    try:
        config = TC.defaults()
        config["model"].update(source=str(tiny_folder), precision="fp32", device="cpu", attn_implementation=attention)
        config["data"].update(max_length=256, split_mode="none")
        config["training"].update(packing=True, max_steps=1, per_device_train_batch_size=2,
                                  gradient_accumulation_steps=1, logging_steps=1, save_steps=0)
        assert not TC.warnings_for(TC.checked(config)).get("training.packing")
        store = Store(home / "sessions.db")
        run = train.LocalRun(store, store.create_session("pack").id, lambda kind, payload: None)
        check, found = packing_check()
        train.run_training(config, home, run, callbacks=[check])
        store.close()
    finally:
        shutil.rmtree(home, ignore_errors=True)
        from backend import models

        models.release_base_model()
    print(attention, found)  # shown with -s, and on failure
    assert found["attn"] == attention
    assert "attention_mask" not in found["keys"] and "position_ids" in found["keys"], found["keys"]
    assert found["rows"] >= 4, "the batch should hold several packed rows"
    assert found["max_diff"] < 2e-5, found
    assert found["packed_tokens"] == found["rows_tokens"] > 0
    assert found["packed_loss"] == pytest.approx(found["rows_loss"], abs=1e-5), found
    assert found["control_diff"] > 1e-3, "the control should show rows attending across boundaries"


def test_equal_length_rows_go_to_the_model_stacked_with_the_same_loss(tiny_folder):
    """A packed batch whose rows all have one length (rows that fill max_length) is handed to the
    model as a plain batch of those rows: sdpa's causal kernel instead of a dense block mask.
    The logits, the loss and trl's count of useful tokens stay the same."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(str(tiny_folder), dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(5, 3000, (12,), generator=g).tolist() for _ in range(3)]
    flat = collate([{"input_ids": r} for r in rows])
    stacked = train.stack_equal_rows(flat)
    assert stacked["input_ids"].shape == (3, 12) and int(stacked["attention_mask"].sum()) == flat["input_ids"].shape[1]
    assert not set(sft._VARLEN_KEYS) & set(stacked)
    with torch.no_grad():
        a = model(**{k: v for k, v in flat.items()}, use_cache=False)
        b = model(**stacked, use_cache=False)
    assert float((a.logits.view(3, 12, -1) - b.logits).abs().max()) < 2e-5
    assert float(a.loss) == pytest.approx(float(b.loss), abs=1e-6)
    # Two rows of 6 in one pack are rows of equal length too; rows of different lengths stay packed.
    half = collate([{"input_ids": rows[0][:6] + rows[1][:6], "seq_lengths": [6, 6]}])
    assert train.stack_equal_rows(half)["input_ids"].shape == (2, 6)
    mixed = collate([{"input_ids": rows[0]}, {"input_ids": rows[1][:7]}])
    assert train.stack_equal_rows(mixed) is mixed
    padded = {"input_ids": flat["input_ids"], "attention_mask": torch.ones_like(flat["input_ids"])}
    assert train.stack_equal_rows(padded) is padded
