"""The device backend interface a worker process drives: CPU and CUDA implement it.

A backend owns one device inside one worker process.  The worker loop
(``broker.streams.worker``) feeds it commands and polls it for finished graphs; the
backend raises ``broker.errors`` exceptions, which the loop sends back typed.

Promises every backend keeps:
- ``submit`` never blocks on device work; ``poll`` returns finished graphs.
- Outputs (``out``/``inout`` buffers) reach their arenas only when every kernel of the
  graph succeeded: a failed graph leaves the tenant's arenas untouched.
- ``temp`` buffers start zeroed: memory never carries data from another request.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InternalError, KaasError
from ..protocol import KernelSpec, Timings
from .wire import ExecGraph, bind_graph


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished graph: ``timings`` on success, ``error`` on failure (exactly one is set)."""

    token: int
    timings: Timings | None = None
    error: KaasError | None = None


class Backend(abc.ABC):
    """One device, driven from one thread of a worker process."""

    kind: str  # "cpu" | "cuda"
    poisoned = False  # a sticky fault: the worker must exit (CUDA sets it)

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """Device description: at least ``name``, ``kind``, ``index``, ``memory`` (bytes)."""

    def usage(self) -> dict[str, int]:
        """What this device holds now, by the backend's own count (``kaasctl memory`` sets it beside
        the broker's accounting): at least ``residents``, ``resident_bytes`` and ``libraries``."""
        return {"residents": 0, "resident_bytes": 0, "libraries": 0}

    @abc.abstractmethod
    def load_library(self, library: str, fmt: str, data: bytes, kernels: tuple[KernelSpec, ...],
                     options: tuple[str, ...]) -> str:
        """Make ``library`` (content digest) runnable here; returns the compile log.

        Raises CompileError (with ``detail['log']``), HostImplementationError, UnknownKernel.
        """

    @property
    def compile_arch(self) -> str:
        """The architecture this backend compiles CUDA C for ('' when it does not compile)."""
        return ""

    @abc.abstractmethod
    def unload_library(self, library: str) -> None:
        """Forget ``library`` (a no-op when absent); the broker asks only once no prepared graph
        and no graph in flight uses it."""

    @abc.abstractmethod
    def pin_arena(self, arena: int, fd: int, size: int) -> None:
        """Map (and, on CUDA, page-lock) the shared-memory segment ``fd``; the backend owns ``fd``."""

    @abc.abstractmethod
    def unpin_arena(self, arena: int) -> None:
        """Forget ``arena``; the broker only asks once no graph using it is in flight."""

    @abc.abstractmethod
    def put_resident(self, resident: int, fd: int, size: int) -> None:
        """Copy ``size`` bytes of the broker's host copy ``fd`` into device memory, keyed by ``resident``."""

    @abc.abstractmethod
    def evict_resident(self, resident: int) -> None:
        """Free the device copy of ``resident`` (a no-op when absent)."""

    @abc.abstractmethod
    def submit(self, token: int, graph: ExecGraph, deadline: float, priority: int) -> None:
        """Start ``graph``; its completion comes out of ``poll`` under ``token``."""

    # -- prepared graphs: the hot path ---------------------------------------------------------
    # The defaults build each run's ExecGraph and ``submit`` it: correct for any backend; a
    # backend with a faster way (CUDA: packed launches, CUDA graphs updated in place) overrides.
    def prepare(self, handle: int, graph: ExecGraph, literals: tuple[tuple[int, int], ...]) -> None:
        """Keep the template ``graph`` under ``handle`` and build what launching it needs.

        In a template the ``arena``/``offset`` of ``in``/``out``/``inout`` buffers are
        placeholders (each run binds them) and literal arguments hold their prepare-time
        values.  ``literals[j] = (k, a)``: value ``j`` of a run goes to argument ``a`` of
        ``graph.kernels[k]``.  Raises typed errors (UnknownLibrary, UnknownKernel,
        ArgumentError) up front.  Preparing a handle already held replaces it.
        """
        arena_buffers = tuple(i for i, b in enumerate(graph.buffers) if b.kind in ("in", "out", "inout"))
        self._templates()[handle] = (graph, arena_buffers, literals)

    def release(self, handle: int) -> None:
        """Forget prepared graph ``handle`` (a no-op when absent); runs already started finish."""
        self._templates().pop(handle, None)

    def run(self, token: int, handle: int, slices: Sequence[int], values: Sequence[int | float],
            deadline: float, priority: int) -> None:
        """Start prepared graph ``handle``; its completion comes out of ``poll`` under ``token``.

        ``slices`` is flat: ``(arena, offset)`` for each ``in``/``out``/``inout`` buffer of the
        template, in buffer order (arena: broker-global id).  ``values``: the literal values, in
        the order of ``prepare``'s ``literals``, already type- and range-checked by the broker.
        Raises like ``submit`` when refused up front (an unknown handle is an InternalError).
        """
        entry = self._templates().get(handle)
        if entry is None:
            raise InternalError(f"prepared graph {handle} is not held by this worker")
        graph, arena_buffers, literals = entry
        if len(slices) != 2 * len(arena_buffers) or len(values) != len(literals):
            raise InternalError(f"prepared graph {handle}: the bindings do not match its buffers and literals")
        self.submit(token, bind_graph(graph, arena_buffers, literals, slices, values), deadline, priority)

    # Prepared templates of the default implementation, created on first use (subclasses need not
    # call an __init__ here): handle -> (template, its arena buffers, literal slots).
    _prepared_templates: dict[int, tuple[ExecGraph, tuple[int, ...], tuple[tuple[int, int], ...]]] | None = None

    def _templates(self) -> dict[int, tuple[ExecGraph, tuple[int, ...], tuple[tuple[int, int], ...]]]:
        if self._prepared_templates is None:
            self._prepared_templates = {}
        return self._prepared_templates

    @abc.abstractmethod
    def poll(self) -> list[Completion]:
        """Finished graphs since the last call (may do work, never waits for new work)."""

    @property
    @abc.abstractmethod
    def busy(self) -> bool:
        """True while graphs are submitted and not yet returned by ``poll``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the device; idempotent."""
