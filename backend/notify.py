"""Webhook notices (issue 18): a JSON POST that Slack, Discord and ntfy-style receivers all read.

The body has ``text`` (Slack's field) and ``content`` (Discord's), ``title`` and ``message``
(ntfy's JSON publishing), the same human line in each, plus structured fields for scripts:
``source`` ("qlw"), ``run``, ``session``, ``status``, ``step``, ``total_steps``, ``loss``,
``eval_loss``, ``best_eval_loss``, ``idle_s`` and ``error`` (``{"message", "where", "hint"}`` or
null). Figures that are not finite (a NaN loss) are sent as null, so strict JSON parsers accept
the body; the text still says ``nan``.

The URL comes from the run config's ``training.notify_url`` or, when that is empty, from
``QLW_NOTIFY_URL`` (never written anywhere). A notice that cannot be delivered is reported, never
fatal: a run does not fail because a chat service is down. Errors name the URL's scheme and host
only, since a webhook URL's path is often its secret. Pure stdlib.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

ENV = "QLW_NOTIFY_URL"
TIMEOUT_S = 10.0
#: Discord refuses ``content`` over 2,000 characters.
MAX_TEXT = 1900


def url_for(config_url: str, environ) -> str:
    """The webhook of a run: its config's, else ``$QLW_NOTIFY_URL``, else ""."""
    return (config_url or "").strip() or (environ.get(ENV) or "").strip()


def where(url: str) -> str:
    """``https://hooks.slack.com`` for any URL of that host: what errors may show."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "the webhook URL"
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "") if parts.hostname else "the webhook URL"


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def body(notice: dict[str, Any]) -> dict[str, Any]:
    """The JSON body for a ``run.notice`` payload."""
    text = notice.get("text", "")[:MAX_TEXT]
    error = None
    if notice.get("message") and notice.get("status") in ("failed", "stalled"):
        error = {"message": notice.get("message", ""), "where": notice.get("where", ""), "hint": notice.get("hint", "")}
    return _plain({
        "text": text, "content": text, "title": f"qlw: {notice.get('run', '')} {notice.get('status', '')}",
        "message": text, "source": "qlw", "run": notice.get("run", ""), "session": notice.get("session", ""),
        "status": notice.get("status", ""), "step": notice.get("step", 0), "total_steps": notice.get("total_steps", 0),
        "loss": notice.get("loss"), "eval_loss": notice.get("eval_loss"),
        "best_eval_loss": notice.get("best_eval_loss"), "idle_s": notice.get("idle_s"), "error": error,
    })


def post(url: str, payload: dict[str, Any], timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    """POST ``payload`` as JSON to ``url``: ``(True, "")`` on a 2xx answer, else ``(False, why)``."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        return False, f"{where(url)}: only http and https webhook URLs are used"
    data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "qlw"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the user's own URL
            code = resp.status
    except urllib.error.HTTPError as exc:
        return False, f"{where(url)} answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"{where(url)} could not be reached: {reason}"
    return (True, "") if 200 <= code < 300 else (False, f"{where(url)} answered HTTP {code}")
