"""Waits for tests that hold under load (issue 15): time counts as the share of the CPU this
machine could give a process, so a wait that allows 10 s on a quiet machine allows 40 s while
the load average is four times the number of cores. A test fails when nothing happens for long,
not because other work slowed it down. No test asserts how long something took: that is the
benchmarks' job (bench/)."""

from __future__ import annotations

import os
import time


class Budget:
    """``timeout`` seconds of a quiet machine's time; ``spent`` says when they are used up."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.used = 0.0
        self._last = time.monotonic()
        self._cpus = os.cpu_count() or 1

    def spent(self) -> bool:
        now = time.monotonic()
        try:
            load = os.getloadavg()[0]
        except OSError:  # no load average on this platform: wall time
            load = 0.0
        share = min(1.0, self._cpus / load) if load > self._cpus else 1.0
        self.used += (now - self._last) * share
        self._last = now
        return self.used > self.timeout
