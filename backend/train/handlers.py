"""The server's side of training: train.presets, train.validate, train.start, train.checkpoints,
train.export and train.import; :func:`register` adds them to the server. Checks, listings and files
are answered off the loop; train.start is a job, refused with the field errors when invalid.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from backend import protocol as P, train_config
from backend.jobs import JobError
from backend.train.checks import check_run, list_checkpoints, run_dir
from backend.train.runs import train_job
from backend.train.validate import validate_run


def name_session(server, session: str, name: str) -> None:
    """The session holds this run: a session made before it (by another job) without a name
    takes the run's name, so that Sessions lists the run by it."""
    if not name or server.store is None:
        return
    info = server.store.get_session(session)
    if info is None or (info.name and info.name != info.id):
        return
    try:
        server.store.set_name(session, name)
    except Exception as exc:  # disk full: the run still starts
        server._store_failed(exc)
        return
    server.publish(session, "session.renamed", {"session": session, "name": name})


def config_path(home: Path, text: str) -> Path:
    """A run config's path: absolute (a file the user named) or relative to
    ``<home>/configs``, which a relative path may not leave ("../../x")."""
    if not text.strip() or "\0" in text:
        raise ValueError("no path given")
    path = Path(text).expanduser()
    if path.is_absolute():
        return path
    base = (home / "configs").resolve()
    path = (base / path).resolve()
    if not path.is_relative_to(base):
        raise ValueError(f"{text} leads outside {base}: give an absolute path to write elsewhere")
    return path


def register(server) -> None:
    """Add the train.* requests to ``server``."""

    async def presets(client, params: P.TrainPresets) -> P.Reply:
        return P.Reply("", "ok", train_config.presets())

    async def validate(client, params: P.ValidateRun) -> P.Reply:
        return P.Reply("", "ok", await asyncio.to_thread(validate_run, params.config, server.home))

    async def start(client, params: P.StartTraining) -> P.Reply:
        # Checked once, here: the job gets the checked, device-adapted config.
        try:
            checked = await asyncio.to_thread(check_run, params.config, server.home, params.resume_from)
        except train_config.ConfigError as exc:
            errors = exc.errors
            first = next(iter(errors.items()))
            return P.Reply("", "refused", {"errors": errors},
                           reason=f"the run config has {len(errors)} error(s): {first[0]}: {first[1]}")
        config = checked.config
        if server.jobs.current is None and server.current_session is not None \
                and run_dir(server.home, server.current_session).exists():
            # One training run per session: its folder, config and artifacts stay its own.
            server._create_session(config["name"])
        session = server.ensure_session(config["name"])
        name_session(server, session, config["name"])
        return server._start_job("train.start", params, train_job(params, server.home, server.store, checked))

    async def checkpoints(client, params: P.ListCheckpoints) -> P.Reply:
        try:
            found = await asyncio.to_thread(list_checkpoints, server.home, params.session)
        except JobError as exc:
            return P.Reply("", "refused", reason=f"{exc}: {exc.hint}", code=P.BAD_MESSAGE)
        return P.Reply("", "ok", {"checkpoints": found})

    async def export(client, params: P.ExportRunConfig) -> P.Reply:
        config, errors = train_config.normalise(params.config)
        try:
            path = config_path(server.home, params.path)
        except ValueError as exc:
            return P.Reply("", "refused", reason=str(exc), code=P.BAD_MESSAGE)
        if path.suffix.lower() != ".toml":
            # Never another kind of file (the store, a model's weights, a shell profile).
            return P.Reply("", "refused", {"path": str(path)}, code=P.BAD_MESSAGE,
                           reason=f"{path} is not a .toml file: a run config is written as name.toml")
        if path.exists() and not params.overwrite:
            return P.Reply("", "refused", {"path": str(path)}, reason=f"{path} exists: confirm to overwrite it",
                           code=P.CONFIRM)
        try:
            text = train_config.dumps_toml(config)
            path.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(path.write_text, text, "utf-8")
        except (OSError, TypeError, ValueError) as exc:
            return P.Reply("", "error", {"path": str(path)}, reason=f"cannot write {path}: {exc}", code=P.FAILED)
        return P.Reply("", "ok", {"path": str(path), "errors": errors})

    async def import_(client, params: P.ImportRunConfig) -> P.Reply:
        try:
            path = config_path(server.home, params.path)
        except ValueError as exc:
            return P.Reply("", "refused", reason=str(exc), code=P.BAD_MESSAGE)
        config, errors = await asyncio.to_thread(train_config.read_toml, path)
        if "file" in errors:
            return P.Reply("", "error", {"config": None, "errors": errors}, reason=errors["file"], code=P.FAILED)
        return P.Reply("", "ok", {"config": config, "errors": errors, "path": str(path)})

    server.handlers.update({
        "train.presets": presets,
        "train.validate": validate,
        "train.start": start,
        "train.checkpoints": checkpoints,
        "train.export": export,
        "train.import": import_,
    })
