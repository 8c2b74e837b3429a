"""by_method: a request's typed parameters from its method name (``"chat.send"``), for the Chat,
evaluation, Merge and upload requests.

The panes name requests by their protocol method (fixed by the issue's contract) rather than by
the dataclass that backend/protocol/ registers for it, so they do not depend on what the
class is called. When the protocol does not know the method (an older backend checkout), the
parameters are still sent as a plain object; the backend then answers ``unknown_method``, which
the panes show as a refusal.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from backend import protocol as P


def by_method(method: str, **params: Any) -> Any:
    """The parameters object of request ``method`` (what ``BackendRequests.call`` sends).

    Fields the registered class does not have are dropped, so a pane may send the contract's
    optional fields to a backend that does not take them yet."""
    cls = P.REQUESTS.get(method)
    if cls is None:
        fields = [(name, Any, dataclasses.field(default=None)) for name in params]
        raw = dataclasses.make_dataclass(f"Raw_{method.replace('.', '_')}", fields)
        obj = raw(**params)
        obj.METHOD = method  # to_dict(obj) gives exactly ``params``
        return obj
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in params.items() if k in known})


def params_of(params: Any) -> dict[str, Any]:
    """The parameters as plain data (for tests and logs)."""
    return P.to_dict(params)

