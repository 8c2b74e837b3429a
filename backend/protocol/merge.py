"""Merge and upload (backend/merge/, backend/hub.py, tui/widgets/merge/).
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from backend.protocol.core import event, request


# --------------------------------------------------------------------------------------------
# Merge and upload (backend/merge/, backend/hub.py, tui/widgets/merge/).
#
# An adapter (a session's final adapter or a checkpoint, see backend/adapters.py) is merged into
# its base model in a precision (never 4-bit) and saved as a plain transformers folder; the folder
# can be checked against the model as trained and uploaded to the Hugging Face Hub. The Hub token
# is read where huggingface_hub keeps it and never appears in any message.

MERGE_DTYPES = ("bf16", "fp16", "fp32")
#: "dequantized": the base as the adapter saw it in QLoRA training (its 4-bit weights dequantised
#: to the merge dtype), the default for an adapter trained on a 4-bit base; "original": the base's
#: full-precision weights from its folder.
MERGE_INTO = ("dequantized", "original")


@request("merge.adapters")
class MergeAdapters:
    """Adapters to merge: ``{"adapters": [...]}``, each as ``backend.adapters.list_adapters``
    gives it (``path``, ``session``, ``kind`` adapter/checkpoint, ``step``, ``base_model``, ``r``,
    ``lora_alpha``, ``target_modules``, ``size_bytes``, ``mtime``, ``run_config`` (the run's
    config.toml path), ``method`` (its training method; "sft" when unknown), ``final_loss``), newest first."""


@request("merge.plan")
class MergePlan:
    """What a merge will take, without loading anything: ``{"adapter": inspect_adapter dict,
    "base": {"source", "precision" (as trained), "precision_label", "path", "parameters"},
    "into_default", "device" ("cuda:0" or "cpu": the GPU when the merged model fits), "memory":
    {"need_bytes", "free_bytes", "verdict"}, "disk": {"need_bytes", "free_bytes"}, "out" (absolute:
    a relative ``out`` is under the data home's merged/), "out_exists", "warnings": [str]}``."""

    adapter: str
    out: str
    dtype: str = "bf16"
    into: str = "dequantized"
    max_shard_size: str = "5GB"


@request("merge.start")
class StartMerge:
    """Job: load the base again (``into``, ``dtype``), merge the adapter, save to ``out`` through a
    temporary folder renamed into place when complete (safetensors in shards of
    ``max_shard_size``, tokenizer and chat template, generation config, README.md model card),
    then verify (``verify``) on ``prompts`` (built-in ones when empty). Refused with code
    ``confirm`` when ``out`` exists and ``overwrite`` is false. Progress stages: ``loading base``,
    ``attaching adapter``, ``merging`` (layers), ``saving`` (bytes), ``model card``,
    ``verifying``. Result: ``{"out", "files": [{"name", "size_bytes"}], "size_bytes", "merge_s",
    "save_s", "verify": merge.verified payload or None}``."""

    adapter: str
    out: str
    dtype: str = "bf16"
    into: str = "dequantized"
    max_shard_size: str = "5GB"
    verify: bool = True
    overwrite: bool = False
    prompts: list[str] = field(default_factory=list)


@request("merge.verify")
class VerifyMerge:
    """Job: the verification table of a merged folder ``out`` against ``adapter`` (its base as
    trained + adapter, and the full-precision base + adapter), computed in ``dtype``; ends with
    ``merge.verified``."""

    out: str
    adapter: str
    dtype: str = "fp32"
    prompts: list[str] = field(default_factory=list)


@request("hub.status")
class HubStatus:
    """``{"offline", "endpoint", "token_source": "HF_TOKEN" | "login" | None, "user": str | None}``;
    never the token itself."""


@request("hub.push")
class HubPush:
    """Job: upload ``folder`` (a merged model; with ``adapter_only``, an adapter folder or the
    adapter files only) to the Hub repository ``repo_id`` (created if missing, private unless
    ``private`` is false); ``dry_run`` lists exactly what would be uploaded, sending nothing.
    Progress by bytes. Result: ``{"repo_id", "url", "private", "files": [{"path", "size_bytes"}],
    "dry_run"}``. Refused offline (HF_HUB_OFFLINE=1: local export only) and without a token (how
    to log in)."""

    folder: str
    repo_id: str
    private: bool = True
    adapter_only: bool = False
    dry_run: bool = False
    commit_message: str = ""


@event("merge.saved")
class MergeSaved:
    """The merged model is complete in ``out``: its files, total size, and the merge and save
    times."""

    out: str
    files: list[dict[str, Any]]
    size_bytes: int
    merge_s: float
    save_s: float
    dtype: str
    into: str
    device: str = ""
    how: str = ""


@event("merge.verified")
class MergeVerified:
    """The verification table: ``rows`` of ``{"model": "merged" | "trained (4-bit base + adapter)"
    | "full-precision base + adapter", "max_abs_logit_diff" (vs the model as trained; None for it),
    "max_abs_logit_diff_vs_full", "perplexity", "size_bytes", "load_s"}``; ``noise_floor``: max
    |logit diff| of the same base in the merge dtype vs fp32; ``prompts``: how many."""

    out: str
    dtype: str
    rows: list[dict[str, Any]]
    noise_floor: float
    prompts: int
    merge_dtype: str = ""
    device: str = ""


@event("hub.pushed")
class HubPushed:
    """An upload finished (or, with ``dry_run``, what it would have sent)."""

    repo_id: str
    url: str
    private: bool
    files: list[dict[str, Any]]
    dry_run: bool = False
    size_bytes: int = 0
    commit_url: str = ""
    offline: bool = False
    token_source: str | None = None

