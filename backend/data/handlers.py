"""The server's side of the Data room: :class:`DataRoom` answers the data.* requests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backend import protocol as P
from backend.jobs import JobError
from backend.data.sources import DataError, NotOpen
from backend.data.browse import find_open, open_source, require_open
from backend.data.shape import settings_from
from backend.data.tokens import load_tokenizer, preview_row, token_stats


# The server's side ----------------------------------------------------------------------------


class DataRoom:
    """The Data requests of one backend: quick ones (pages, rows, previews) run in a thread on
    an open dataset; opening and statistics are jobs with progress."""

    def __init__(self, home: Path):
        self.home = Path(home)

    def summary_if_open(self, params: P.OpenData) -> dict[str, Any] | None:
        """The summary when ``params.source`` is open and unchanged (and no reload is asked)."""
        if params.reload:
            return None
        try:
            opened = find_open(params.source, check_files=True)
        except DataError:
            return None  # the job reports it, with its where and hint
        return opened.summary if opened is not None else None

    def open_job(self, params: P.OpenData):
        def run(ctx) -> dict[str, Any]:
            ctx.progress("opening", 0, 0)
            opened = open_source(params.source, self.home, progress=lambda st, d, t: ctx.progress(st, d, t, "rows"),
                                 cancelled=lambda: ctx.cancelled, reload=params.reload)
            # The preview comes next: load the default tokenizer now (transformers' import and
            # the load take ~2.5 s once per backend), so the first preview is not the slow one.
            try:
                ctx.progress("loading the tokenizer", 0, 0)
                load_tokenizer("", self.home)
            except DataError:
                pass  # the tiny model is not built yet: the preview says how to build it
            return {"dataset": opened.summary}

        return run

    def stats_job(self, params: P.DataStats):
        def run(ctx) -> dict[str, Any]:
            s = settings_from(params.settings)
            opened = open_source(s.source, self.home, progress=lambda st, d, t: ctx.progress(st, d, t, "rows"),
                                 cancelled=lambda: ctx.cancelled)
            tokenizer = load_tokenizer(params.tokenizer, self.home, build=True,
                                       progress=lambda st, d, t: ctx.progress(st, d, t),
                                       cancelled=lambda: ctx.cancelled)
            stats = token_stats(opened, s, tokenizer, params.bins, params.limit,
                                progress=lambda st, d, t: ctx.progress(st, d, t, "rows"),
                                cancelled=lambda: ctx.cancelled, tokenizer_name=params.tokenizer)
            return {"stats": stats, "settings": P.to_dict(s)}

        return run

    def handle(self, params: Any) -> dict[str, Any]:
        """Answer a quick request (page, row, preview). Raises NotOpen or DataError."""
        if isinstance(params, P.DataPage):
            return require_open(params.source).page(params.start, params.count, params.filter, params.cell_chars)
        if isinstance(params, P.DataRow):
            return require_open(params.source).row(params.index, params.max_chars)
        if isinstance(params, P.DataPreview):
            s = params.settings
            opened = require_open(s.get("source", {}) if isinstance(s, dict) else {})
            tokenizer = load_tokenizer(params.tokenizer, self.home)
            return preview_row(opened, s, params.index, tokenizer, params.tokenizer)
        raise TypeError(f"not a quick data request: {type(params).__name__}")


def error_result(exc: JobError) -> dict[str, Any]:
    """A DataError as the ``error`` object of a reply's result."""
    return {"error": {"message": str(exc), "where": exc.where, "hint": exc.hint}}


def register(server) -> DataRoom:
    """Add the data.* requests to ``server``: opening may be a job (the first read builds the Arrow
    cache); pages, rows and previews are quick requests run in a thread; data.stats is a job."""
    import asyncio

    room = DataRoom(server.home)
    server.data = room

    async def data_open(client, params: P.OpenData) -> P.Reply:
        summary = await asyncio.to_thread(room.summary_if_open, params)
        if summary is not None:
            return P.Reply("", "ok", {"dataset": summary})
        return server._start_job("data.open", params, room.open_job(params))

    async def data_request(client, params: Any) -> P.Reply:
        try:
            result = await asyncio.to_thread(room.handle, params)
        except NotOpen as exc:
            return P.Reply("", "refused", reason=str(exc), code=P.NOT_OPEN)
        except DataError as exc:
            reason = f"{exc} ({exc.where})" if exc.where else str(exc)
            return P.Reply("", "error", error_result(exc), reason=reason, code=P.FAILED)
        return P.Reply("", "ok", result)

    server.handlers.update({
        "data.open": data_open,
        "data.page": data_request,
        "data.row": data_request,
        "data.preview": data_request,
    })
    server.job_factories["data.stats"] = room.stats_job
    return room
