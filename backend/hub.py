"""Uploading a merged model (or an adapter) to the Hugging Face Hub (issue 7, step 5).

The token is huggingface_hub's own: ``HF_TOKEN`` or what ``hf auth login`` stored
(``huggingface_hub.get_token()``). It is handed to ``HfApi`` and nothing else: never to an event,
a log line, the session store or the screen; :func:`status` says only where it comes from.

:func:`push` creates the repository (private unless asked otherwise), sends the large files
first one by one (``preupload_lfs_files``: progress by bytes), then one commit with every file.
A dry run lists exactly what would be sent (paths and sizes) and sends nothing. Offline
(``HF_HUB_OFFLINE=1``) there is no upload: the merged folder is the local export.

Errors for people: a refused token (401/403), a bad repository name (``HFValidationError``), the
network, each with what to do next.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from backend.jobs import JobCancelled, JobError

_TRUE = {"1", "true", "yes", "on"}
#: Files of an adapter folder worth publishing (a checkpoint also holds optimizer and RNG state).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "tokenizer.model",
                 "generation_config.json")
OFFLINE_REASON = "offline (HF_HUB_OFFLINE=1): local export only"
LOGIN_HINT = ("log in with `hf auth login` (huggingface_hub's CLI), or set HF_TOKEN to a token with write "
              "access (https://huggingface.co/settings/tokens)")


def offline() -> bool:
    """True when the Hub must not be asked (read now, not when huggingface_hub was imported)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def endpoint() -> str:
    env = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    if env:
        return env
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def token_source() -> str | None:
    """Where the token would come from: ``"HF_TOKEN"``, ``"login"`` (stored by ``hf auth
    login``), or None."""
    if (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or "").strip():
        return "HF_TOKEN"
    from huggingface_hub import get_token

    return "login" if get_token() else None


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def status(ask_user: bool = True) -> dict[str, Any]:
    """``hub.status``: offline, endpoint, where the token comes from and whose it is (the Hub is
    asked only online and with a token). Never the token."""
    result = {"offline": offline(), "endpoint": endpoint(), "token_source": token_source(), "user": None}
    if ask_user and not result["offline"] and result["token_source"]:
        try:
            from huggingface_hub import HfApi

            result["user"] = HfApi(endpoint=result["endpoint"]).whoami(token=_token()).get("name")
        except Exception as exc:  # a status must answer: say why there is no user
            result["user_error"] = _describe(exc, "")[0]
    return result


def upload_list(folder: str | Path, adapter_only: bool = False) -> list[dict[str, Any]]:
    """Exactly what an upload of ``folder`` sends: ``[{"path", "size_bytes", "local"}]``.
    Hidden files and qlw's temporary folders are left out; ``adapter_only`` keeps the adapter's
    files (not a checkpoint's optimizer or trainer state)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise JobError(f"no folder at {root}", where=f"folder = {folder}", hint="merge first, or pick a folder")
    if adapter_only:
        if not (root / "adapter_config.json").is_file():
            raise JobError(f"{root} holds no adapter (adapter_config.json)", where=f"folder = {folder}",
                           hint="pick an adapter folder (a session's adapter/ or a checkpoint) for an adapter-only upload")
        paths = [root / name for name in ADAPTER_FILES if (root / name).is_file()]
    else:
        if not (root / "config.json").is_file() and not (root / "adapter_config.json").is_file():
            raise JobError(f"{root} is neither a model folder (config.json) nor an adapter", where=f"folder = {folder}",
                           hint="pick the merged model's folder")
        paths = [p for p in sorted(root.rglob("*")) if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return [{"path": p.relative_to(root).as_posix(), "size_bytes": p.stat().st_size, "local": str(p)} for p in paths]


def _adapter_config_bytes(path: Path) -> bytes | None:
    """adapter_config.json without the local path peft stores for the base (its folder name
    instead); None when it names no local path."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base.startswith(("/", "~", ".")):
        return None
    config["base_model_name_or_path"] = Path(base).name
    return (json.dumps(config, indent=2) + "\n").encode("utf-8")


def _describe(exc: BaseException, repo_id: str) -> tuple[str, str]:
    """(message, hint) for an upload failure; never includes the token."""
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError

    if isinstance(exc, HFValidationError):
        return (f"{repo_id!r} is not a valid repository name: {exc}",
                "use namespace/name with letters, digits, '-', '_' and '.' (at most 96 characters), e.g. alice/my-model")
    if isinstance(exc, HfHubHTTPError):
        code = getattr(getattr(exc, "response", None), "status_code", None)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if code in (401, 403):
            return (f"the Hub refused the token ({code}) for {repo_id or 'this request'}: {first}",
                    "the token may be invalid, expired or read-only, or the namespace is not yours: " + LOGIN_HINT)
        if code == 404:
            return (f"the Hub has no repository {repo_id} ({first})", "check the namespace and name")
        return (f"the Hub answered {code}: {first}", "try again later; the message above says what the Hub objected to")
    # huggingface_hub's HTTP client (httpx, or its fork httpx2) raises TransportError subclasses.
    transport = {"TransportError", "NetworkError", "ConnectError", "TimeoutException", "ProxyError"}
    if isinstance(exc, (OSError, ConnectionError)) or transport & {c.__name__ for c in type(exc).__mro__}:
        return (f"cannot reach the Hub at {endpoint()}: {type(exc).__name__}: {exc}",
                "check the network (or HF_ENDPOINT); set HF_HUB_OFFLINE=1 to work locally only")
    return (f"{type(exc).__name__}: {exc}", "")


def push(folder: str, repo_id: str, ctx, private: bool = True, adapter_only: bool = False, dry_run: bool = False,
         commit_message: str = "") -> dict[str, Any]:
    """The ``hub.push`` job. Emits ``hub.pushed``; returns the same."""
    from huggingface_hub.utils import validate_repo_id
    from huggingface_hub.errors import HFValidationError

    files = upload_list(folder, adapter_only)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        message, hint = _describe(exc, repo_id)
        raise JobError(message, where=f"repo_id = {repo_id}", hint=hint) from None
    listed = [{"path": f["path"], "size_bytes": f["size_bytes"]} for f in files]
    total = sum(f["size_bytes"] for f in files)
    base = endpoint()
    if dry_run:
        result = {"repo_id": repo_id, "url": f"{base}/{repo_id}", "private": private, "files": listed,
                  "dry_run": True, "size_bytes": total, "offline": offline(), "token_source": token_source()}
        ctx.emit("hub.pushed", result)
        return result
    if offline():
        raise JobError(OFFLINE_REASON, where="HF_HUB_OFFLINE",
                       hint=f"the merged folder {folder} is the export; unset HF_HUB_OFFLINE to upload")
    token = _token()
    if not token:
        raise JobError("no Hugging Face token", where="HF_TOKEN", hint=LOGIN_HINT)
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()  # the job's own progress says it; tqdm bars would land in logs
    try:
        return _push(files, listed, total, base, token, repo_id, ctx, private, adapter_only, commit_message)
    finally:
        if not was_disabled:
            enable_progress_bars()


def _push(files, listed, total, base, token, repo_id, ctx, private, adapter_only, commit_message) -> dict[str, Any]:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=base, token=token)
    sent = 0
    ctx.progress("uploading", 0, total, "bytes", "creating the repository")
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        ops = []
        for f in files:
            data = _adapter_config_bytes(Path(f["local"])) if f["path"] == "adapter_config.json" else None
            ops.append(CommitOperationAdd(path_in_repo=f["path"], path_or_fileobj=data if data is not None else f["local"]))
        for f, op in zip(files, ops):
            ctx.check_cancelled()
            # Large files go first, one at a time, so the progress moves by bytes.
            api.preupload_lfs_files(repo_id, additions=[op], repo_type="model")
            sent += f["size_bytes"]
            ctx.progress("uploading", sent, total, "bytes", f["path"])
        ctx.check_cancelled()
        ctx.progress("uploading", total, total, "bytes", "commit")
        info = api.create_commit(repo_id, operations=ops, repo_type="model",
                                 commit_message=commit_message or ("Upload adapter with qlw" if adapter_only
                                                                   else "Upload merged model with qlw"))
    except JobCancelled:
        raise
    except Exception as exc:
        message, hint = _describe(exc, repo_id)
        raise JobError(message, where=f"repo_id = {repo_id}", hint=hint) from None
    result = {"repo_id": getattr(url, "repo_id", None) or repo_id, "url": str(url), "private": private,
              "files": listed, "dry_run": False, "size_bytes": total,
              "commit_url": getattr(info, "commit_url", "")}
    ctx.emit("hub.pushed", result)
    return result


def push_job(params):
    """The job of a ``hub.push`` request (checked by the handler already)."""

    def run(ctx) -> dict[str, Any]:
        return push(params.folder, params.repo_id, ctx, private=params.private, adapter_only=params.adapter_only,
                    dry_run=params.dry_run, commit_message=params.commit_message)

    return run
