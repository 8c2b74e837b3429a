"""Training: the LoRA form, the run config and its sections, the run and its loss table
(backend/train/, tui/widgets/lora/, tui/widgets/train/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from backend.protocol.core import event, request, setting


# --------------------------------------------------------------------------------------------
# Training: the LoRA form, the run and its loss table (backend/train/, tui/widgets/lora/,
# tui/widgets/train/).
#
# A run is configured by a *run config*, plain data (:class:`RunConfig`, as a dict):
# ``{"version": 1, "name": ..., "model": ModelSettings, "data": PreparedData, "lora":
# LoraSettings, "training": TrainingSettings}`` (each section a dict). It is what ``train.validate``
# checks, ``train.start`` runs, the session records, and ``qlw train CONFIG.toml`` reads; field
# names are those of peft's ``LoraConfig``, trl's ``SFTConfig`` and bitsandbytes' config. Errors
# are keyed by dotted field path (``"lora.r"``, ``"training.learning_rate"``).

RUN_CONFIG_VERSION = 1
#: transformers' ``lr_scheduler_type`` values offered by the form.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup")
#: transformers' ``optim`` values offered by the form (bitsandbytes ones need it installed).
OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch",
              "adamw_torch_fused", "adafactor", "sgd")
#: ``training.speed``: how the run picks its speed levers (backend/speed.py).
SPEEDS = ("fast", "lean", "manual")
#: peft's ``bias``.
LORA_BIASES = ("none", "all", "lora_only")
#: Presets of ``train.presets``.
TRAIN_PRESETS = ("qlora-paper", "small-gpu")
#: Training methods (``RunConfig.method``), one module each in ``backend/methods/``: supervised
#: fine-tuning, and the preference methods DPO, ORPO and KTO (trl's trainers of those names).
TRAINING_METHODS = ("sft", "dpo", "orpo", "kto")
#: What a preference run does with a malformed pair (an empty side, identical sides, no prompt):
#: leave it out (each is reported by line) or refuse to train.
MALFORMED_PAIRS = ("skip", "refuse")
#: trl's ``DPOConfig.loss_type`` values offered (sigmoid: the DPO paper's loss).
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "bco_pair", "sppo_hard", "nca_pair",
                  "apo_zero", "apo_down", "sigmoid_norm")
#: trl's ``KTOConfig.loss_type`` values.
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
#: ``launch.strategy`` (issue 19): how several processes share the work. ``ddp``: each process
#: holds the whole (4-bit) model and trains on its share of each batch, gradients averaged
#: (torch DistributedDataParallel); ``fsdp``: the model's weights, gradients and optimizer states
#: are sharded across the processes (torch FSDP, with the FSDP-QLoRA settings of peft's guide).
LAUNCH_STRATEGIES = ("ddp", "fsdp")


@dataclass
class LoraSettings:
    """peft ``LoraConfig`` fields. ``target_modules``: ``"all-linear"`` or a list of module names
    (from ``model.inspect``'s ``linear_groups``)."""

    r: int = setting(16, help="LoRA rank: the width of the low-rank update (8-64 typical).", minimum=1)
    lora_alpha: int = setting(16, help="LoRA scaling numerator: the update is scaled by lora_alpha/r "
                              "(by lora_alpha/sqrt(r) with use_rslora).", minimum=1)
    lora_dropout: float = setting(0.05, help="Dropout on the LoRA input, 0 to below 1 (0.05 in QLoRA).",
                                  minimum=0, maximum=1, open_max=True,
                                  what="a probability from 0 up to (not including) 1")
    target_modules: list[str] | str = "all-linear"
    bias: str = setting("none", help="Which biases train: none, all, or those of the LoRA layers.",
                        choices=LORA_BIASES)
    use_rslora: bool = setting(False, help="Rank-stabilised LoRA: scale by lora_alpha/sqrt(r).")
    use_dora: bool = setting(False, help="DoRA: weight-decomposed LoRA (slower, sometimes better).")
    modules_to_save: list[str] = setting(help="Modules trained in full and saved with the adapter, "
                                         "comma-separated (e.g. lm_head, embed_tokens after adding tokens).",
                                         default_factory=list)


@dataclass
class TrainingSettings:
    """trl ``SFTConfig`` / transformers ``TrainingArguments`` fields (``max_length``, packing and
    the loss mask live in the prepared dataset: ``PreparedData.max_length`` / ``loss``).
    ``max_steps`` > 0 overrides ``num_train_epochs``. ``logging_steps``, ``eval_steps`` and
    ``save_steps`` are whole numbers of steps, or, below 1, a fraction of the run's steps as
    transformers reads them (0.05: every 5% of the run, rounded up to a whole step), so that
    by default they follow the run's length: a short run logs every step, a long one about 100
    rows. ``eval_steps``/``save_steps`` 0: only at the end (the last step is always logged,
    evaluated and saved). ``bf16``/``fp16`` ``None``: chosen from the model's compute dtype and
    the device. The run's length defaults are transformers' (3 epochs, no accumulation), so
    that the shipped sample gives a curve of about 20 steps on the embedded tiny model.
    The preference methods (DPO, ORPO, KTO) take these too (their trl configs are
    ``TrainingArguments``); ``packing`` is SFT's only.

    Speed and memory (bench/train_speed.py measures them against the plain trl recipe):
    ``packing`` puts several rows into one ``max_length`` sequence (trl's best-fit-decreasing
    packing, padding-free: no pad tokens are computed); rows never attend to each other, since
    transformers builds a block-diagonal mask from the position ids for sdpa and eager (and
    flash-attention reads the boundaries); ``per_device_train_batch_size`` then counts packed
    sequences. ``use_liger_kernel``: Liger's fused RMSNorm/SwiGLU/RoPE kernels (needs the
    liger-kernel package and a CUDA GPU; off otherwise, with a warning). ``activation_offloading``:
    the activations kept for the backward pass wait in CPU memory (less GPU memory, some speed).
    ``speed`` (backend/speed.py): ``fast`` takes the fastest levers whose memory estimate fits
    ``memory_budget`` (GiB; 0: 90% of what the device has for the run): compiled decoder layers,
    checkpointing off, a bf16 copy of 4-bit weights; ``lean`` the smallest footprint (compiled,
    checkpointing, one sequence per micro-step); ``manual`` the switches as set. None changes the
    math; on the CPU the switches are taken as set."""

    num_train_epochs: float = setting(3.0, help="Passes over the training rows (used when max_steps is -1).",
                                      minimum=0, low_open=True, what="a positive number of epochs")
    max_steps: int = setting(-1, help="Optimizer steps in all; -1: run num_train_epochs instead.",
                             minimum=1, also=-1, what="-1 (train num_train_epochs) or a positive number of steps")
    learning_rate: float = setting(2e-4, help="Peak learning rate (2e-4 in QLoRA; DPO usually 5e-7 to 5e-6 "
                                   "for a full model, 5e-6 to 5e-5 with LoRA).", minimum=0, low_open=True,
                                   maximum=1, open_max=True, what="a positive number below 1 (e.g. 2e-4)")
    lr_scheduler_type: str = setting("constant", help="How the learning rate moves after warmup.",
                                     choices=LR_SCHEDULERS)
    warmup_ratio: float = setting(0.03, help="Fraction of the steps spent warming up, 0 to below 1.",
                                  minimum=0, maximum=1, open_max=True,
                                  what="a fraction from 0 up to (not including) 1")
    warmup_steps: int = setting(0, help="Warmup in steps; overrides warmup_ratio when above 0.", minimum=0)
    per_device_train_batch_size: int = setting(4, help="Rows per forward pass (preference methods: pairs).",
                                               minimum=1)
    gradient_accumulation_steps: int = setting(1, help="Forward passes per optimizer step "
                                               "(effective batch = batch size × this).", minimum=1)
    auto_find_batch_size: bool = setting(False, help="Halve the batch size and retry on CUDA out-of-memory.")
    packing: bool = setting(True, help="Pack several short rows into one max_length sequence (SFT only).")
    gradient_checkpointing: bool = setting(True, help="Recompute activations in the backward pass: "
                                           "much less memory, about 30% slower (speed fast/lean decide it on a GPU).")
    optim: str = setting("paged_adamw_8bit", help="Optimizer; paged_adamw_8bit is QLoRA's (needs bitsandbytes).",
                         choices=OPTIMIZERS)
    weight_decay: float = setting(0.0, help="Decoupled weight decay (0 in QLoRA).", minimum=0, what="a number >= 0")
    max_grad_norm: float = setting(0.3, help="Gradient clipping norm (0.3 in QLoRA); 0: no clipping.", minimum=0,
                                   what="a number >= 0 (0: no clipping)")
    logging_steps: int | float = setting(0.01, help="A row of the loss table every this many steps; below 1: a "
                                         "fraction of the run (0.01: every 1% of the steps, every step on a short "
                                         "run).", minimum=1, kind="steps")
    eval_steps: int | float = setting(0.2, help="Validation loss every this many steps; below 1: a fraction of "
                                      "the run (0.2: five times); 0: only at the end.", minimum=0, kind="steps")
    save_steps: int | float = setting(0.25, help="A checkpoint every this many steps; below 1: a fraction of the "
                                      "run (0.25: four times); 0: only at the end.", minimum=0, kind="steps")
    save_total_limit: int = setting(3, help="Checkpoints kept (older ones are deleted); 0: keep every one.",
                                    minimum=0, what="0 (keep every checkpoint) or how many to keep")
    seed: int = setting(42, help="Seed of the run (shuffling, dropout, LoRA init).", minimum=0)
    bf16: bool | None = setting(None, help="bf16 mixed precision; auto: from the model's compute dtype "
                                "and the device.")
    fp16: bool | None = setting(None, help="fp16 mixed precision; auto: from the model's compute dtype "
                                "and the device.")
    use_liger_kernel: bool = setting(False, help="Liger's fused kernels (CUDA and the liger-kernel package).")
    activation_offloading: bool = setting(False, help="Keep the activations for the backward pass in CPU memory.")
    speed: str = setting("fast", help="fast: the fastest levers that fit memory_budget (compiled layers, "
                         "checkpointing off, a bf16 weight copy); lean: the smallest footprint; manual: the switches "
                         "as set. The same math either way; the CPU takes the switches as set.", choices=SPEEDS)
    memory_budget: float = setting(0.0, help="GiB the run may take on the GPU, for speed fast; 0: 90% of what the "
                                   "device has.", minimum=0, what="GiB for the run (0: 90% of what the device has)")
    # Issue 18: standard logs and the watch on unattended runs (backend/watch.py, backend/notify.py).
    report_to: list[str] = setting(default_factory=lambda: ["tensorboard"], kind="names",
                                   help="Where the run's logs also go, as transformers' report_to: tensorboard (event "
                                   "files in the run folder), wandb, mlflow; empty: none. W&B takes its key from "
                                   "WANDB_API_KEY or its login and honours WANDB_MODE=offline; no key is written.")
    stop_on_divergence: bool = setting(True, help="Stop the run when the training loss becomes NaN or infinite, or "
                                       "explodes (divergence_factor), before that step's update; checkpoints are kept.")
    divergence_factor: float = setting(4.0, help="An exploding loss: a step's loss above this many times the run's "
                                       "first step's; 0: only NaN/inf stop the run.", minimum=0,
                                       what="0 (only NaN/inf) or a factor such as 4")
    early_stopping_patience: int = setting(0, help="Stop when eval_loss has not improved for this many evaluations "
                                           "(0: off); needs validation rows and eval_steps; the best checkpoint "
                                           "becomes the adapter.", minimum=0)
    early_stopping_threshold: float = setting(0.0, help="How much eval_loss must fall to count as an improvement.",
                                              minimum=0, what="a number >= 0")
    stall_minutes: float = setting(30.0, help="A notice when the run makes no step for this many minutes; 0: off.",
                                   minimum=0, what="0 (off) or minutes")
    notify_url: str = setting("", help="Webhook told when the run finishes, fails or stalls (JSON POST with text and "
                              "content: Slack, Discord, ntfy); empty: $QLW_NOTIFY_URL. Stored with the run's "
                              "config: for a secret URL use the variable.")



@dataclass
class PreferenceSettings:
    """What every preference method shares: where it starts and what it does with bad pairs.
    ``start_adapter``: the adapter folder of an earlier (SFT) run to continue training (empty: a
    fresh LoRA adapter from the ``lora`` section); with ``ref_model=None`` trl then takes a frozen
    copy of that adapter as the reference (DPO, KTO), never a second copy of the model."""

    LOG_COLUMNS: ClassVar[tuple[str, ...]] = ()

    beta: float = setting(0.1, help="trl's beta: how far the tuned model may move from the reference "
                          "(higher: less).", minimum=0, low_open=True, what="a positive number (e.g. 0.1)")
    start_adapter: str = setting("", help="An SFT run's adapter folder to start from (empty: a fresh "
                                 "adapter); it is also the reference.")
    malformed: str = setting("skip", help="Pairs with an empty side, identical sides or no prompt: skip "
                             "them (each reported by line) or refuse to train.", choices=MALFORMED_PAIRS)


@dataclass
class DPOSettings(PreferenceSettings):
    """trl ``DPOConfig`` fields (the rest comes from ``TrainingSettings``; ``max_length`` is the
    prepared dataset's)."""

    LOG_COLUMNS: ClassVar[tuple[str, ...]] = ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                              "rewards/accuracies")

    loss_type: str = setting("sigmoid", help="trl's DPO loss (sigmoid: the DPO paper's; ipo, hinge, robust, ...).",
                             choices=DPO_LOSS_TYPES)
    label_smoothing: float = setting(0.0, help="Robust DPO's flip probability, 0 to below 0.5 (0: plain DPO).",
                                     minimum=0, maximum=0.5, open_max=True,
                                     what="a probability from 0 up to (not including) 0.5")


@dataclass
class ORPOSettings(PreferenceSettings):
    """trl ``ORPOConfig`` fields (``trl.experimental.orpo``): ``beta`` is the paper's lambda, the
    weight of the odds-ratio term beside the chosen side's NLL. ORPO has no reference model."""

    LOG_COLUMNS: ClassVar[tuple[str, ...]] = ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                              "rewards/accuracies", "nll_loss", "log_odds_ratio")


@dataclass
class KTOSettings(PreferenceSettings):
    """trl ``KTOConfig`` fields: unpaired rows (prompt, completion, label true/false)."""

    LOG_COLUMNS: ClassVar[tuple[str, ...]] = ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl")

    loss_type: str = setting("kto", help="trl's KTO loss (kto, or apo_zero_unpaired).", choices=KTO_LOSS_TYPES)
    desirable_weight: float = setting(1.0, help="Weight of desirable (label true) rows' losses.", minimum=0,
                                      low_open=True, what="a positive number")
    undesirable_weight: float = setting(1.0, help="Weight of undesirable (label false) rows' losses.", minimum=0,
                                        low_open=True, what="a positive number")


@dataclass
class LaunchSettings:
    """How many processes train the run (issue 19), and how they share it. With ``processes`` above
    1 the backend starts ``accelerate launch`` (the accelerate CLI, in its own process group,
    supervised by the backend: backend/train/multi.py); each process trains on its share of every
    batch. The batch fields keep transformers' meaning: ``per_device_train_batch_size`` rows per
    process and micro-step, so the *global batch* (what one optimizer step sees) is
    ``per_device_train_batch_size x gradient_accumulation_steps x processes``; ``train.validate``
    and ``qlw train --check`` show it. To keep a one-process run's math on N processes, divide
    ``per_device_train_batch_size`` (or ``gradient_accumulation_steps``) by N: the same rows then
    make each step, in the same order (accelerate deals the sampler's batches out to the
    processes in turn), and the training losses are the same (tests/backend/test_multi.py). The
    validation loss is transformers' mean of per-batch losses, and an evaluation batch is
    ``per_device_train_batch_size`` rows per process: it comes close (within 1% on the tiny
    model), not equal. LoRA dropout draws its masks in each process: leave it at 0 to compare
    runs step by step."""

    processes: int = setting(1, help="Processes (one per GPU) that train the run; above 1 the run is "
                             "launched with accelerate (global batch = batch size x accumulation x this).", minimum=1)
    strategy: str = setting("ddp", help="ddp: every process holds the whole model (fastest when it fits one GPU); "
                            "fsdp: weights, gradients and optimizer states sharded across the GPUs (FSDP-QLoRA: "
                            "a model too big for one GPU).", choices=LAUNCH_STRATEGIES)


#: The settings section of each method (SFT has none beyond ``training``); its name in the run
#: config is the method's.
METHOD_SETTINGS: dict[str, type] = {"dpo": DPOSettings, "orpo": ORPOSettings, "kto": KTOSettings}
#: What each method's ``train.log`` rows carry beside loss, eval_loss, learning_rate, grad_norm
#: and tokens_per_s (trl's log names, in ``TrainLog.metrics``).
METHOD_LOG_COLUMNS: dict[str, tuple[str, ...]] = {"sft": (), **{m: c.LOG_COLUMNS for m, c in METHOD_SETTINGS.items()}}


@dataclass
class RunConfig:
    """A whole run, as plain data (sections are dicts of the classes above). ``method``: one of
    ``TRAINING_METHODS``; the preference methods' settings are in the section of their name
    (``dpo``: :class:`DPOSettings`, ``orpo``, ``kto``)."""

    model: dict[str, Any]
    data: dict[str, Any]
    lora: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    version: int = RUN_CONFIG_VERSION
    method: str = "sft"
    dpo: dict[str, Any] = field(default_factory=dict)
    orpo: dict[str, Any] = field(default_factory=dict)
    kto: dict[str, Any] = field(default_factory=dict)
    #: :class:`LaunchSettings` (issue 19: several processes).
    launch: dict[str, Any] = field(default_factory=dict)


@request("train.presets")
class TrainPresets:
    """``{"presets": {name: {"lora": ..., "training": ..., "model": {precision fields}}, ...},
    "defaults": RunConfig-like dict}``: the QLoRA paper's recipe (nf4, double quant, bf16
    compute, r=16, lora_alpha=16, dropout 0.05, lr 2e-4, paged_adamw_8bit) and a fast
    small-GPU preset."""


@request("train.validate")
class ValidateRun:
    """Check a run config without starting it: ``{"ok": bool, "errors": {"lora.r": "...", ...},
    "warnings": {...}, "config": normalised config, "trainable_params", "total_params",
    "trainable_percent" (as peft counts them, for the held base model or from config.json),
    "memory": {"total_bytes", "free_bytes", "verdict", "parts": {...}}, "total_steps"}``."""

    config: dict[str, Any]


@request("train.start")
class StartTraining:
    """Job: train ``config`` (a :class:`RunConfig` dict) with its method's trl trainer (``SFTTrainer``,
    ``DPOTrainer``, ``ORPOTrainer`` or ``KTOTrainer``: ``backend/methods/``) and peft on
    the held base model (loaded first if it is not the one the config names) and the prepared
    dataset. ``resume_from``: a checkpoint folder of this or an earlier session. Refused with
    the field errors (result ``{"errors": {...}}``) when the config is invalid. The job's
    cancel is a graceful stop: a checkpoint is saved first."""

    config: dict[str, Any]
    resume_from: str = ""


@request("train.checkpoints")
class ListCheckpoints:
    """Checkpoints to resume from: ``{"checkpoints": [{"session", "step", "path", "created",
    "loss"}, ...]}``, newest first (all sessions when ``session`` is empty)."""

    session: str = ""


@request("train.export")
class ExportRunConfig:
    """Write ``config`` as TOML to ``path`` (a file the user named; an existing one only with
    ``overwrite``): ``{"path": ...}``."""

    config: dict[str, Any]
    path: str
    overwrite: bool = False


@request("train.import")
class ImportRunConfig:
    """Read a TOML run config: ``{"config": ..., "errors": {...}}`` (errors keyed by field,
    with the file's line where known)."""

    path: str


@event("train.started")
class TrainStarted:
    """A run began: its config, the step count, and the trainable parameters as peft counts."""

    job_id: str
    config: dict[str, Any]
    total_steps: int
    trainable_params: int
    total_params: int
    output_dir: str
    resumed_from: str = ""
    start_step: int = 0
    #: Processes training the run (issue 19: ``launch.processes``; 1 for a run in the backend).
    processes: int = 1
    #: Rows an optimizer step sees: per-device batch x accumulation x processes (0: not told).
    global_batch: int = 0


@event("train.log")
class TrainLog:
    """One row of the loss table: one per logging step, training and evaluation logs of the same
    step merged (a later ``train.log`` of the same step completes the row). ``tokens_per_s``
    counts non-padding tokens."""

    job_id: str
    step: int
    total_steps: int
    epoch: float
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    #: Non-padding training tokens seen so far in this run (issue 18: curves by tokens).
    tokens_seen: float | None = None
    #: The method's own columns (``METHOD_LOG_COLUMNS``, trl's names: ``rewards/margins``), and
    #: their validation values as ``eval_<name>``.
    metrics: dict[str, Any] = field(default_factory=dict)


@event("train.checkpoint")
class TrainCheckpoint:
    """A checkpoint was saved (adapter, optimizer, scheduler, trainer state)."""

    job_id: str
    step: int
    path: str


@event("train.alert")
class TrainAlert:
    """Something the user must see at once: ``kind`` ``nan``/``inf`` (the loss), ``oom`` (CUDA out
    of memory: the run stopped cleanly), with what happened, at which step, and what to change."""

    job_id: str
    kind: str
    step: int
    message: str
    hint: str = ""
    memory: dict[str, Any] = field(default_factory=dict)


@event("train.finished")
class TrainFinished:
    """A run ended: ``status`` done/stopped/failed, the final losses, the adapter folder
    (safetensors), the last checkpoint, peak memory and throughput."""

    job_id: str
    status: str
    step: int
    total_steps: int
    final_loss: float | None = None
    final_eval_loss: float | None = None
    adapter_path: str = ""
    checkpoint_path: str = ""
    elapsed_s: float = 0.0
    tokens_per_s: float | None = None
    peak_memory: dict[str, Any] = field(default_factory=dict)

