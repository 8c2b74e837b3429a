"""Training: a method's trl trainer (:mod:`backend.methods`: SFT, DPO, ORPO, KTO) with a peft LoRA
adapter on the held base model, in the job thread.

One function, :func:`run_training` (``runs``), serves the ``train.start`` job and ``qlw train``; it adds
nothing to what trl computes (``tests/backend/test_train_equality.py`` and
``tests/backend/test_preference.py`` hold it to plain trl scripts, step for step):

- the run config is checked (:mod:`backend.train_config`) and adapted to the device (CPU: no
  paged/8-bit optimizer, fp32), errors keyed by field before anything heavy happens;
- the model is the one the backend holds when it is the one the config names, else it is loaded
  through :mod:`backend.models` (``model.source`` empty: the embedded tiny model, built first);
- the method (``method`` in the config) turns the prepared dataset into its trl rows, builds its
  trl config from the ``training`` section and its own section, and its trainer; everything else
  below is the same for every method;
- ``LoraConfig`` takes the ``lora`` section as peft names it;
- callbacks turn trl's logs into ``train.log`` rows (a step's training and evaluation logs merged:
  the training row first, the same step again when its ``eval_loss`` arrives), checkpoints into
  ``train.checkpoint``, and a stop request into a checkpoint and a clean end;
- a NaN or infinite loss is flagged on the step it appears (``train.alert``); CUDA out of memory
  ends the run cleanly (``train.alert`` kind ``oom`` with the step, the memory figures and what
  to change, ``train.finished`` status ``failed``), frees what the run allocated and keeps the
  base model and the backend.

Checkpoints go to ``<home>/runs/<session>/checkpoints/checkpoint-<step>`` (adapter, optimizer,
scheduler, RNG and trainer state: ``resume_from`` continues the same loss curve), the final
adapter to ``<home>/runs/<session>/adapter`` (safetensors, with the tokenizer), the config to
``<home>/runs/<session>/config.toml``.

A test seam: ``QLW_TRAIN_FAULT=oom@N`` (or ``nan@N``, ``inf@N``) makes the next run of this process
raise ``torch.OutOfMemoryError`` (or produce a NaN/inf loss) on step N; it is read once and
cleared, so a backend started with it fails one run and trains normally after.

The package's modules: ``checks`` (paths, the fault seam, the model and data resolved, the run
checked, checkpoints), ``validate`` (``train.validate``), ``report`` (trl's logs as events),
``runs`` (:func:`run_training`, :func:`train_job`) and ``cli`` (``qlw train`` and its printers); for a
run in several processes (issue 19: ``[launch] processes``), ``launch`` (the accelerate config qlw
writes, the checks, the global batch), ``multi`` (:func:`~backend.train.multi.run_launched`: starts
``accelerate launch`` in its own process group and supervises it) and ``worker`` (one rank).
A config's model section is resolved by :func:`backend.train_config.model_settings`, re-exported
here. Names are re-exported too; a test that replaces a function (``plan_speed``) does it in the
module that calls it (``runs``).

Nothing heavy is imported at module level: the server imports this package lazily, but cheaply.
"""

from __future__ import annotations

from backend.train_config import is_embedded_model, model_settings, tiny_path  # noqa: F401

from backend.train.checks import (  # noqa: F401
    FAULT_ENV, MIB, GIB, run_dir, parse_fault, take_fault, data_settings, resolve_device, bf16_supported, effective_config, preflight,
    check_resume, CheckedRun, check_run, checkpoint_info, partial_checkpoints, list_checkpoints,
)
from backend.train.report import (  # noqa: F401
    lora_config, stack_equal_rows, _num, Reporter, make_callback,
)
from backend.train.validate import (  # noqa: F401
    OPTIMIZER_STATE_BYTES, ACTIVATION_FACTOR, CHECKPOINTED_FACTOR, estimate_memory,
    count_trainable, unmatched_targets, train_rows, steps_for, hidden_table_warnings, validate_run,
)
from backend.train.runs import (  # noqa: F401
    oom_hint, plan_speed, run_training, train_job,
)
from backend.train.cli import (  # noqa: F401
    ROW_HEADER, METRIC_HEADINGS, row_header, format_row, LocalRun, add_cli_arguments, cli,
    _PlainPrinter, _RichPrinter,
)
from backend.train.handlers import (  # noqa: F401
    config_path, name_session, register,
)
