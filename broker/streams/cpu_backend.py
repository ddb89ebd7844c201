"""The CPU device: runs each kernel's host implementation (numpy) in the worker process.

It is the embedded default where no GPU exists and what CI tests the whole system on,
so it keeps every promise of ``Backend``: copies in, runs on private "device" arrays,
and writes outputs back to arenas only after every kernel succeeded.
"""

from __future__ import annotations

import collections
import importlib
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import errors
from ..protocol import KernelSpec, Lit, Timings
from .backend import Backend, Completion
from .wire import ExecGraph

HostFn = Callable[..., None]


@dataclass(frozen=True, slots=True)
class Launch:
    """What a host implementation is told about its launch (mirrors the CUDA launch)."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared: int


def resolve_host(ref: str, allowed: tuple[str, ...]) -> HostFn:
    """Import ``module:function`` if ``module`` is allowed by the broker's config.

    Allowed entries are module names; ``pkg`` allows ``pkg`` and every ``pkg.sub``.
    Tenants name functions; they never ship code.
    """
    module, sep, func = ref.partition(":")
    if not sep or not module or not func:
        raise errors.HostImplementationError(f"host implementation {ref!r} is not of the form 'module:function'")
    if not any(module == a or module.startswith(a + ".") for a in allowed):
        raise errors.HostImplementationError(
            f"host implementation module {module!r} is not allowed by the broker's config "
            f"(allowed: {', '.join(allowed) or 'none'})")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise errors.HostImplementationError(f"host implementation module {module!r} cannot be imported: {exc}") from None
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise errors.HostImplementationError(f"{module!r} has no function {func!r}")
    return fn  # type: ignore[no-any-return]


class CpuBackend(Backend):
    kind = "cpu"

    def __init__(self, index: int = 0, *, host_modules: tuple[str, ...] = ("tenantlib.kernels.host",),
                 compile_check: str = "sm_90") -> None:
        self.index = index
        self.host_modules = host_modules
        self.compile_check = compile_check  # arch to check CUDA C source against; "" disables
        # arena -> (fd, size). Arenas are read and written with preadv/pwritev, never through a
        # mapping: a tenant may shrink its segment at any moment, and a mapped page past the end
        # is SIGBUS, while a read past the end is just short.
        self._arenas: dict[int, tuple[int, int]] = {}
        self._residents: dict[int, np.ndarray] = {}
        self._kernels: dict[tuple[str, str], tuple[KernelSpec, HostFn]] = {}
        self._libraries: set[str] = set()
        self._queue: collections.deque[tuple[int, ExecGraph, float]] = collections.deque()
        self._cache: Any = None

    def info(self) -> dict[str, Any]:
        return {"name": f"cpu:{self.index}", "kind": "cpu", "index": self.index,
                "memory": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                "arch": "host", "cores": os.cpu_count() or 1}

    def usage(self) -> dict[str, int]:
        return {"residents": len(self._residents), "resident_bytes": sum(a.nbytes for a in self._residents.values()),
                "libraries": len(self._libraries)}

    def load_library(self, library: str, fmt: str, data: bytes, kernels: tuple[KernelSpec, ...],
                     options: tuple[str, ...]) -> str:
        if library in self._libraries:
            return ""
        log = ""
        if fmt in ("cuda", "cubin") and self.compile_check:
            log = self._check_library(library, fmt, data, kernels, options)
        resolved: dict[tuple[str, str], tuple[KernelSpec, HostFn]] = {}
        for spec in kernels:
            if not spec.host:
                raise errors.HostImplementationError(
                    f"kernel {spec.name!r} has no host implementation, and the CPU device runs only "
                    "host implementations", detail={"kernel": spec.name})
            resolved[(library, spec.name)] = (spec, resolve_host(spec.host, self.host_modules))
        self._kernels.update(resolved)
        self._libraries.add(library)
        return log

    def _check_library(self, library: str, fmt: str, data: bytes, kernels: tuple[KernelSpec, ...],
                       options: tuple[str, ...]) -> str:
        """Compile CUDA C with NVRTC (when installed) so tenants see compile errors on CPU too, and
        hold the signatures against the source and the CUBIN as a GPU worker does."""
        from . import compiler, signatures

        if fmt == "cubin":
            signatures.check_library(fmt, data, data, kernels, self.compile_check, options, library=library)
            return ""
        if not compiler.nvrtc_available():
            return ""
        if self._cache is None:
            self._cache = compiler.CompileCache()
        image, log = self._cache.compile(data, self.compile_check, options)
        signatures.check_library(fmt, data, image, kernels, self.compile_check, options, self._cache, library)
        return str(log)

    @property
    def compile_arch(self) -> str:
        return self.compile_check

    def unload_library(self, library: str) -> None:
        self._libraries.discard(library)
        for key in [k for k in self._kernels if k[0] == library]:
            del self._kernels[key]

    def pin_arena(self, arena: int, fd: int, size: int) -> None:
        if arena in self._arenas:  # pinned already (a respawn replays pins): idempotent
            os.close(fd)
            return
        self._arenas[arena] = (fd, size)

    def unpin_arena(self, arena: int) -> None:
        entry = self._arenas.pop(arena, None)
        if entry is not None:
            os.close(entry[0])

    def put_resident(self, resident: int, fd: int, size: int) -> None:
        try:
            with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
                arr = np.frombuffer(mm, dtype=np.uint8, count=size).copy()
        finally:
            os.close(fd)
        arr.flags.writeable = False
        self._residents[resident] = arr

    def evict_resident(self, resident: int) -> None:
        self._residents.pop(resident, None)

    def submit(self, token: int, graph: ExecGraph, deadline: float, priority: int) -> None:
        self._queue.append((token, graph, time.perf_counter()))

    @property
    def busy(self) -> bool:
        return bool(self._queue)

    def poll(self) -> list[Completion]:
        """Run one queued graph, so the worker reads commands between graphs."""
        if not self._queue:
            return []
        token, graph, _ = self._queue.popleft()
        try:
            return [Completion(token, timings=self._run(graph))]
        except errors.KaasError as exc:
            return [Completion(token, error=exc)]
        except MemoryError:
            return [Completion(token, error=errors.DeviceError("the CPU device ran out of memory for this graph"))]
        except Exception as exc:  # a bug here fails one graph, not the worker
            return [Completion(token, error=errors.InternalError(f"CPU device: {type(exc).__name__}: {exc}"))]

    def _fd(self, arena: int, offset: int, nbytes: int) -> int:
        entry = self._arenas.get(arena)
        if entry is None:
            raise errors.InternalError(f"arena {arena} is not pinned on {self.info()['name']}")
        fd, size = entry
        if offset + nbytes > size:
            raise errors.InternalError(f"arena {arena} slice {offset}+{nbytes} exceeds its {size} bytes")
        return fd

    def _read(self, arena: int, dtype: np.dtype[Any], shape: tuple[int, ...], offset: int, nbytes: int) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        got = os.preadv(self._fd(arena, offset, nbytes), [out.reshape(-1).view(np.uint8).data], offset)
        if got != nbytes:
            raise errors.InvalidArena(f"the arena's segment shrank under the broker: read {got} of {nbytes} bytes "
                                      f"at offset {offset}", detail={"offset": offset, "nbytes": nbytes, "read": got})
        return out

    def _write(self, arena: int, arr: np.ndarray, offset: int) -> None:
        data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        os.pwritev(self._fd(arena, offset, data.nbytes), [data.data], offset)

    def _run(self, graph: ExecGraph) -> Timings:
        t0 = time.perf_counter()
        arrays: list[np.ndarray] = []
        for b in graph.buffers:
            dt = np.dtype(b.dtype)
            if b.kind in ("in", "inout"):
                arrays.append(self._read(b.arena, dt, b.shape, b.offset, b.nbytes))
            elif b.kind in ("out", "temp"):
                arrays.append(np.zeros(b.shape, dtype=dt))
            elif b.kind == "resident":
                res = self._residents.get(b.resident)
                if res is None:
                    raise errors.InternalError(f"resident {b.resident} is not on this device")
                arrays.append(res[:b.nbytes].view(dt).reshape(b.shape))
            else:
                raise errors.InternalError(f"unknown buffer kind {b.kind!r}")
        t1 = time.perf_counter()
        for i, k in enumerate(graph.kernels):
            entry = self._kernels.get((k.library, k.kernel))
            if entry is None:
                raise errors.InternalError(f"kernel {k.kernel!r} of library {k.library[:12]} is not loaded")
            _, fn = entry
            args = [a.value if isinstance(a, Lit) else arrays[a.index] for a in k.args]
            try:
                fn(Launch(k.grid, k.block, k.shared), *args)
            except Exception as exc:  # the host implementation is the "kernel": its failure is a fault
                raise errors.KernelFault(
                    f"kernel {k.kernel!r} (#{i}) failed on the CPU device: {type(exc).__name__}: {exc}",
                    detail={"kernel": k.kernel, "index": i, "exception": type(exc).__name__}) from None
        t2 = time.perf_counter()
        for b, arr in zip(graph.buffers, arrays, strict=True):
            if b.kind in ("out", "inout"):
                self._write(b.arena, arr, b.offset)
        t3 = time.perf_counter()
        return Timings(copy_in=t1 - t0, kernels=t2 - t1, copy_out=t3 - t2, total=t3 - t0)

    def close(self) -> None:
        for a in list(self._arenas):
            self.unpin_arena(a)
        self._residents.clear()
        self._queue.clear()
