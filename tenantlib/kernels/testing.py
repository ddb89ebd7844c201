"""Deliberately bad host implementations, for fault tests only. Never use them for real work.

They stand in, on the CPU device, for a kernel that faults (``crash``: the worker process
dies, as a CUDA fault makes it unusable) and for a kernel that never ends (``hang``: only
killing the worker stops it). There are no CUDA kernels behind them; ``CRASH`` and
``HANG`` are their signatures, to register in a test library.
"""

from __future__ import annotations

import os
import time
from typing import NoReturn

from broker.protocol import KernelSpec, Param

from .host import LaunchInfo

__all__ = ["CRASH", "CRASH_EXIT_CODE", "HANG", "KERNELS", "SLOW", "crash", "hang", "slow"]

CRASH_EXIT_CODE = 70

CRASH = KernelSpec("crash", (), host="tenantlib.kernels.testing:crash")
HANG = KernelSpec("hang", (), host="tenantlib.kernels.testing:hang")
SLOW = KernelSpec("slow", (Param("ms", "i32"),), host="tenantlib.kernels.testing:slow")
KERNELS: tuple[KernelSpec, ...] = (CRASH, HANG, SLOW)


def crash(launch: LaunchInfo) -> NoReturn:
    """Test only: end the calling process at once with exit status 70, no cleanup, no exception."""
    os._exit(CRASH_EXIT_CODE)


def hang(launch: LaunchInfo) -> NoReturn:
    """Test only: never return (sleeping, so a hung worker costs no CPU); only a kill ends it."""
    while True:
        time.sleep(0.05)


def slow(launch: LaunchInfo, ms: int) -> None:
    """Test only: take ``ms`` milliseconds (sleeping), so a test knows what is still running."""
    time.sleep(ms / 1000)
