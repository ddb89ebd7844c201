"""Compiling tenant CUDA C off the worker's loop, so that graphs keep running meanwhile.

NVRTC takes from a tenth of a second to several seconds per library (and the signature probe as
much again).  Done inside the worker's command loop it stops every lane: the soak saw forty
libraries registered in a loop stall every tenant on a device for a minute.  So a ``load``
command for CUDA C first warms the on-disk compile cache (the CUBIN and the probe's lowered
names) in a thread; NVRTC releases the GIL while it compiles, and the loop goes on launching and
completing graphs.  When the thread is done the command is handled as usual, hitting the cache.
Whatever the thread hits (a compile error, a refused include) is left for that handling to
raise, with its message, as before.  A backend opts in with ``Backend.compile_arch``: the CPU
device and the CUDA backend both do.
"""

from __future__ import annotations

import threading

from .wire import WLoadLibrary

__all__ = ["Precompiler"]


class Precompiler:
    """Warms the compile cache for ``load`` commands in threads; hands each back when done."""

    def __init__(self, arch: str) -> None:
        self.arch = arch  # what the backend compiles CUDA C for ("" : it does not)
        self._busy: list[tuple[threading.Thread, WLoadLibrary]] = []

    def wants(self, cmd: WLoadLibrary) -> bool:
        return bool(self.arch) and cmd.format == "cuda"

    def start(self, cmd: WLoadLibrary) -> None:
        t = threading.Thread(target=self._warm, args=(cmd,), name=f"compile-{cmd.library[:8]}", daemon=True)
        t.start()
        self._busy.append((t, cmd))

    @property
    def pending(self) -> bool:
        return bool(self._busy)

    def finished(self) -> list[WLoadLibrary]:
        """The commands whose compiles are done, in the order they came."""
        done = [cmd for t, cmd in self._busy if not t.is_alive()]
        if done:
            self._busy = [(t, c) for t, c in self._busy if t.is_alive()]
        return done

    def _warm(self, cmd: WLoadLibrary) -> None:
        try:
            from . import signatures
            from .compiler import CompileCache, nvrtc_available

            if not nvrtc_available():
                return
            cache = CompileCache()
            cache.compile(bytes(cmd.data), self.arch, tuple(cmd.options))
            names = [k.name for k in cmd.kernels]
            if names:
                signatures.source_signatures(bytes(cmd.data), names, self.arch, tuple(cmd.options), cache,
                                             names=False)
        except Exception:  # the command's own handling raises it, typed, with its message
            pass
