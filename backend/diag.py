"""Diagnostic jobs for the channel itself: a steady event producer and a CPU-bound burner.

They exercise the real job runner and event path (store, broadcast, replay), so tests and
``bench/channel.py`` measure what users' jobs go through.
"""

from __future__ import annotations

import time

from backend import protocol as P
from backend.jobs import JobContext


def ticker_job(params: P.DiagTicker):
    """``count`` ``diag.tick`` events at ``rate`` per second (0: as fast as possible)."""
    if params.count < 0 or params.count > 10_000_000:
        raise ValueError("count must be between 0 and 10,000,000")

    def run(ctx: JobContext) -> dict:
        interval = 1.0 / params.rate if params.rate > 0 else 0.0
        t0 = time.monotonic()
        for n in range(1, params.count + 1):
            if ctx.cancelled:
                return {"sent": n - 1}
            if interval:
                delay = t0 + (n - 1) * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            ctx.emit("diag.tick", {"job_id": ctx.job_id, "n": n, "total": params.count, "sent": time.time()})
        return {"sent": params.count, "elapsed_s": round(time.monotonic() - t0, 3)}

    return run


def burn_job(params: P.DiagBurn):
    """Hold one core in pure Python (the GIL held in ~5 ms slices) for ``seconds``."""
    if not 0 <= params.seconds <= 3600:
        raise ValueError("seconds must be between 0 and 3600")

    def run(ctx: JobContext) -> dict:
        end = time.monotonic() + params.seconds
        loops = 0
        while time.monotonic() < end:
            if ctx.cancelled:
                break
            x = 0
            for i in range(20_000):
                x += i * i
            loops += 1
        return {"loops": loops}

    return run
