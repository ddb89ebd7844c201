"""Messages between the broker and a device worker. Pure (msgspec), no CUDA.

The broker resolves a validated tenant graph into an ``ExecGraph``: global arena and
resident ids, concrete sizes, kernels in execution order.  A worker never sees tenant
ids, so it cannot confuse one tenant's handles with another's.  A graph reaches a worker
once, as a template (``WPrepare``), before its first run there; runs (``WRun``) carry only
bindings and travel as ring records (``broker.records``) or, when the ring is full, as
frames.  A ring run names the last socket command it must follow (its ``barrier``).

Every command carries ``seq`` and is answered by exactly one ``WReply`` with that seq
(a successful run: a completion record on the worker's ring, or a ``WReply``).
File descriptors (arena segments, resident host copies) ride on the frame of the
command that consumes them (SCM_RIGHTS), one fd per ``WPinArena`` / ``WPutResident``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import msgspec

from ..protocol import Arg, KernelSpec, Lit, Timings


class ExecBuffer(msgspec.Struct, array_like=True, frozen=True):
    """One buffer of an ExecGraph. ``arena``/``resident`` are broker-global ids (0: none)."""

    kind: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    arena: int = 0
    offset: int = 0
    resident: int = 0


class ExecKernel(msgspec.Struct, array_like=True, frozen=True):
    library: str
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared: int
    args: tuple[Arg, ...]


class ExecGraph(msgspec.Struct, array_like=True, frozen=True):
    """A validated graph: kernels in a dependency-respecting execution order."""

    buffers: tuple[ExecBuffer, ...]
    kernels: tuple[ExecKernel, ...]


def bind_graph(graph: ExecGraph, arena_buffers: Sequence[int], literals: Sequence[tuple[int, int]],
               slices: Sequence[int], values: Sequence[int | float]) -> ExecGraph:
    """The ExecGraph of one run of a template: ``slices`` (arena, offset) for the buffers at
    ``arena_buffers``, ``values`` for the literal arguments at ``literals`` (kernel, argument)."""
    bufs = list(graph.buffers)
    for j, i in enumerate(arena_buffers):
        b = bufs[i]
        bufs[i] = ExecBuffer(b.kind, b.dtype, b.shape, b.nbytes, int(slices[2 * j]), int(slices[2 * j + 1]))
    kernels = graph.kernels
    if values:
        args = [list(k.args) for k in kernels]
        for (pos, ai), v in zip(literals, values, strict=True):
            old = args[pos][ai]
            args[pos][ai] = Lit(old.dtype if isinstance(old, Lit) else "f64", v)
        kernels = tuple(ExecKernel(k.library, k.kernel, k.grid, k.block, k.shared, tuple(a))
                        for k, a in zip(kernels, args, strict=True))
    return ExecGraph(tuple(bufs), kernels)


class _W(msgspec.Struct, array_like=True, tag=True, frozen=True):
    pass


class WLoadLibrary(_W, tag="load", frozen=True):
    seq: int
    library: str
    format: str
    data: bytes
    kernels: tuple[KernelSpec, ...]
    options: tuple[str, ...] = ()


class WUnloadLibrary(_W, tag="unload", frozen=True):
    """Forget ``library``: the broker sends it once no prepared graph uses it (a bounded cache)."""

    seq: int
    library: str


class WPinArena(_W, tag="pin", frozen=True):
    seq: int
    arena: int
    size: int


class WUnpinArena(_W, tag="unpin", frozen=True):
    seq: int
    arena: int


class WPutResident(_W, tag="put", frozen=True):
    seq: int
    resident: int
    size: int


class WEvictResident(_W, tag="evict", frozen=True):
    seq: int
    resident: int


class WPrepare(_W, tag="prepare", frozen=True):
    """Keep ``graph`` (a template: arena buffers unbound) as prepared graph ``handle``.

    ``literals[j] = (kernel position in graph.kernels, argument position)`` of run value ``j``.
    """

    seq: int
    handle: int
    graph: ExecGraph
    literals: tuple[tuple[int, int], ...] = ()


class WRelease(_W, tag="release", frozen=True):
    seq: int
    handle: int


class WRun(_W, tag="prun", frozen=True):
    """Run prepared graph ``handle`` with its bindings (see ``Backend.run``)."""

    seq: int
    handle: int
    slices: tuple[int, ...] = ()
    values: tuple[int | float, ...] = ()
    deadline: float = 0.0
    priority: int = 0
    trace: bool = False


class LeaseHandle(msgspec.Struct, array_like=True, frozen=True):
    """A session's prepared graph as a lease knows it: its handle, the broker's ``gid``, and what a
    run's bindings are checked against: ``(nbytes, itemsize)`` per arena buffer, literal kinds."""

    handle: int
    gid: int
    buffers: tuple[tuple[int, int], ...]
    kinds: tuple[str, ...]
    values: tuple[int | float, ...]  # the literals' values at prepare time (a run that repeats them skips checks)


class WLease(_W, tag="lease", frozen=True):
    """Take session runs straight from the session's ring: the direct path (``streams.direct``).

    Four fds ride on it: the session's ring segment (``slots`` x ``slot_size``, ``rings`` rings), the
    eventfd the tenant writes when the run ring's consumer sleeps, the tenant's own eventfd, and
    the lease page (``streams.direct.LeasePage``).  Runs are read from ring 0 at ``run_tail``;
    completions go to ring 2 from ``done_head``.  ``arenas``: ``(session id, global id, size)``.
    """

    seq: int
    lease: int
    slots: int
    slot_size: int
    rings: int
    run_tail: int
    done_head: int
    device: int
    flags: int
    priority: int
    max_inflight: int
    max_seconds: float   # the policy's cap on a run's time (0: none)
    limit_seconds: float  # the broker's cap (config.max_graph_seconds)
    arenas: tuple[tuple[int, int, int], ...]
    handles: tuple[LeaseHandle, ...]
    spin_us: int = 0  # busy-poll this long after activity while leased (the broker's spin moves here)
    flow: str = ""    # the tenant: its leases share one fair-share flow on this worker
    weight: float = 1.0
    device_inflight: int = 0  # direct runs on the device at once, over every lease (0: no bound)


class WLeaseAdd(_W, tag="lease_add", frozen=True):
    """The lease's session changed: arenas and prepared graphs registered since it was granted,
    and handles it released (``drop``: runs that name them go to the broker from now on)."""

    seq: int
    lease: int
    arenas: tuple[tuple[int, int, int], ...] = ()
    handles: tuple[LeaseHandle, ...] = ()
    drop: tuple[int, ...] = ()


class WRevoke(_W, tag="revoke", frozen=True):
    """End a lease: take nothing more, and answer once its runs have finished, with
    ``info = {"taken": ring 0 position, "done_head": ring 2 position}``."""

    seq: int
    lease: int


class WInfo(_W, tag="info", frozen=True):
    seq: int


class WShutdown(_W, tag="shutdown", frozen=True):
    seq: int


WorkerCommand = Union[
    WLoadLibrary, WUnloadLibrary, WPinArena, WUnpinArena, WPutResident, WEvictResident, WPrepare, WRelease,
    WRun, WInfo, WShutdown, WLease, WLeaseAdd, WRevoke,
]


class WReply(_W, tag="reply", frozen=True):
    """The one answer to command ``seq``: success when ``code`` is empty."""

    seq: int
    code: str = ""
    message: str = ""
    detail: dict[str, Any] = {}
    timings: Timings | None = None
    info: dict[str, Any] = {}
    trace: tuple[float, ...] = ()  # worker_recv, worker_launched, worker_done (traced runs)


class WReady(_W, tag="ready", frozen=True):
    """The first frame a worker sends once its device is open."""

    info: dict[str, Any]


class WPoisoned(_W, tag="poisoned", frozen=True):
    """Sent before the replies of a sticky fault: the worker runs nothing more and exits after them.

    Everything the broker sent it that these replies do not answer never ran: it is innocent.
    """

    reason: str


class WEscalate(_W, tag="escalate", frozen=True):
    """A run of a lease that the direct path does not finish itself: the broker takes it over.

    ``code`` empty and ``timings`` set: it succeeded, but its completion could not be posted
    (deliver it).  ``code`` empty, no timings: it was not started (the broker runs it its own way,
    which also gives any error its full text).  Otherwise it failed on the device with that error
    (``KernelFault`` with ``ambiguous``, ``WorkerLost``: replay it as a suspect).  ``record`` is the
    run record as the tenant wrote it; ``position`` its place on the ring.
    """

    lease: int
    position: int
    record: bytes
    code: str = ""
    message: str = ""
    detail: dict[str, Any] = {}
    timings: Timings | None = None


class WLeaseBroken(_W, tag="lease_broken", frozen=True):
    """The session's ring broke its invariants: the lease is gone (the broker ends the session)."""

    lease: int
    reason: str


WorkerEvent = Union[WReply, WReady, WPoisoned, WEscalate, WLeaseBroken]

command_decoder = msgspec.msgpack.Decoder(WorkerCommand)
event_decoder = msgspec.msgpack.Decoder(WorkerEvent)
