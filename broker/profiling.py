"""Opt-in profiling of the broker and its workers, for finding where a request's time goes.

``KAAS_PROFILE=DIR`` makes the broker and every device worker it starts run under cProfile
and write ``DIR/broker-PID.prof`` / ``DIR/worker-DEVICE-PID.prof`` when they exit (read them
with ``python -m pstats`` or ``bench/profile_hotpath.py``).  Profiling slows every call down
by about a microsecond: use it to see proportions, never to measure latency.
"""

from __future__ import annotations

import cProfile
import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def profiled(name: str, fn: Callable[[], T]) -> T:
    """``fn()``, under cProfile when ``$KAAS_PROFILE`` names a directory."""
    where = os.environ.get("KAAS_PROFILE", "")
    if not where:
        return fn()
    os.makedirs(where, exist_ok=True)
    prof = cProfile.Profile()
    try:
        return prof.runcall(fn)
    finally:
        prof.dump_stats(os.path.join(where, f"{name.replace(':', '')}-{os.getpid()}.prof"))
