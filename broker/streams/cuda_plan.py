"""The plan of a graph on the CUDA device (its *shape*) and the addresses of one run of it.

A shape is everything that does not depend on addresses, built once: one block of device
memory holds every ``in``/``inout``/``out``/``temp`` buffer (``in``/``inout`` first, then the
zeroed ones, so that one memset scrubs them all), the copies in and out, and the packed
launches.  A run (``Run``) resolves only the addresses: host pointers into pinned arenas, from
the graph's buffers (``resolve``, for ``submit``) or from a prepared graph's bindings
(``resolve_slices``, for ``run``), and the residents' device pointers.

A prepared graph's shape also knows where its bound literals go (``Literal``: a launch and
the byte offset of an 8-byte slot of its argument block); a run carries its values packed
the same way, and ``write_literals`` copies the ones that changed into the blocks.
"""

from __future__ import annotations

import ctypes
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import errors
from ..protocol import Lit
from .cuda_memory import ALIGN, Arena, Resident, round_up
from .cuda_modules import Launch, Library, literal_packer, pack_launch
from .wire import ExecBuffer, ExecGraph, ExecKernel

if TYPE_CHECKING:
    from .cuda_lanes import Lane
    from .cuda_replay import Replay

__all__ = ["AUTO_MIN_KERNELS", "Literal", "bind", "Prepared", "Run", "Shape", "cached_shape", "changed_launches", "new_shape", "pack_pointers", "plan_literals",
           "resolve", "resolve_residents", "write_literals"]

_Q = struct.Struct("<Q")

# "auto" replays a shape whose arena slices (or bound literals) moved only from this many
# kernels on: see cuda_replay for the measurements behind it.
AUTO_MIN_KERNELS = 2


@dataclass(eq=False, slots=True)
class Literal:
    """Where bound literal ``j`` of a prepared graph goes: an 8-byte slot of a launch's argument block."""

    launch: Launch
    offset: int  # byte offset of the slot in ``launch.args``
    kind: str  # the parameter's scalar type


@dataclass(eq=False, slots=True)
class Shape:
    """Everything of a graph's plan that does not depend on addresses, built once and reused.

    ``submit`` keys it by the graph's kernels (function, grid, block, shared memory, literal and
    buffer arguments) and the kind and size of each buffer; a prepared graph owns its own.
    Arenas, offsets and residents, i.e. the addresses, are resolved at every run (``Run``).
    """

    kernels: tuple[ExecKernel, ...]
    size: int  # bytes of the graph's one device allocation
    offsets: tuple[int, ...]  # per buffer: offset in the allocation (-1: a resident)
    arena_buffers: tuple[int, ...]  # the in/inout/out buffers, in order: one host pointer each per run
    resident_buffers: tuple[int, ...]
    copy_in: tuple[tuple[int, int, int], ...]  # (position in arena_buffers, device offset, bytes)
    copy_out: tuple[tuple[int, int, int], ...]  # (position in arena_buffers, device offset, bytes)
    zero: tuple[int, int]  # (device offset, bytes) scrubbed before the kernels run
    launches: tuple[Launch, ...]
    # Stage events recorded (lane.events[i]): 0 always; 1 only after a copy-in or scrub; 2 only
    # after kernels; 3 only after a copy-out.  A stage without its event reports 0.0 seconds.
    pre: bool  # event 1 is recorded
    end: int  # the last event recorded: poll asks it
    auto: bool  # "auto" re-points moved memcpy nodes and literals of this shape (AUTO_MIN_KERNELS)
    starts: int = 0  # runs started (any lane): the _CAPTURE_AT-th and later may be captured
    used: int = 0  # clock of the last submission, for the shape cache's LRU order
    refused: bool = False  # a capture or a run of it failed: launched directly from now on
    update_failures: int = 0  # replays that would not take new addresses (two: refused)
    replays: dict[int, Replay] = field(default_factory=dict)  # by lane index
    # The pointers the launches' buffer slots hold (base of the allocation, resident pointers).
    packed_base: int = -1
    packed_residents: tuple[int, ...] = ()
    # Bound literals (prepared graphs only), the values their slots hold now (packed by
    # ``lit_packer``, one 8-byte slot each), and what packs a run's values the same way.
    literals: tuple[Literal, ...] = ()
    packed_lits: bytes = b""
    lit_packer: struct.Struct | None = None
    users: int = 0  # runs queued or on a lane, not finished
    retired: bool = False  # its prepared graph was released or replaced: graphs go once users is 0


@dataclass(eq=False, slots=True)
class Prepared:
    """A prepared graph: its template (arena slices unbound) and the shape it owns."""

    handle: int
    graph: ExecGraph
    shape: Shape
    nbytes: tuple[int, ...]  # per arena buffer of the shape: the bytes a bound slice must hold


@dataclass(eq=False, slots=True)
class Run:
    """A submitted graph: its shape, resolved addresses and, once started, its lane and memory."""

    token: int
    shape: Shape
    deadline: float
    high: bool
    submitted: float
    hosts: list[int]  # host pointer per arena buffer of the shape
    resident_ptrs: tuple[int, ...]  # device pointer per resident buffer of the shape
    arenas: list[Arena]
    residents: list[Resident]
    lits: bytes = b""  # bound literal values, packed as ``shape.packed_lits`` (b"": the shape's own)
    started: float = 0.0
    lane: Lane | None = None
    base: int = 0  # a pool allocation to free once the graph is enqueued (0: none)
    mark: float = -1.0  # the occupancy clock when it started (-1: not on a lane)

    def names(self) -> dict[str, Any]:
        """The kernel name(s), for an error's detail."""
        names = [k.kernel for k in self.shape.kernels]
        return {"kernel": names[0]} if len(names) == 1 else {"kernels": names}


def new_shape(graph: ExecGraph, libraries: Mapping[str, Library], device: str) -> Shape:
    """Lay out the buffers of ``graph`` in one allocation and pack its launches."""
    n = len(graph.buffers)
    offsets = [0] * n
    arena_buffers: list[int] = []
    resident_buffers: list[int] = []
    copy_in: list[tuple[int, int, int]] = []
    copy_out: list[tuple[int, int, int]] = []
    offset = 0
    pending_zero: list[tuple[int, int]] = []  # (buffer, position in arena_buffers or -1)
    for i, b in enumerate(graph.buffers):
        if b.nbytes < 0:
            raise errors.InternalError(f"buffer {i} has a negative size")
        kind = b.kind
        if kind == "resident":
            resident_buffers.append(i)
            offsets[i] = -1
        elif kind in ("in", "inout", "out"):
            pos = len(arena_buffers)
            arena_buffers.append(i)
            if kind == "out":
                pending_zero.append((i, pos))
                continue
            offsets[i] = offset
            if b.nbytes:
                copy_in.append((pos, offset, b.nbytes))
                if kind == "inout":
                    copy_out.append((pos, offset, b.nbytes))
            offset += round_up(b.nbytes, ALIGN)
        elif kind == "temp":
            pending_zero.append((i, -1))
        else:
            raise errors.InternalError(f"buffer {i} has unknown kind {kind!r}")
    # Everything zeroed lies after the copied-in buffers: one memset scrubs it all.
    zero_start = offset
    for i, pos in pending_zero:
        nbytes = graph.buffers[i].nbytes
        offsets[i] = offset
        if pos >= 0 and nbytes:
            copy_out.append((pos, offset, nbytes))
        offset += round_up(nbytes, ALIGN)
    launches = tuple(pack_launch(i, k, n, libraries, device) for i, k in enumerate(graph.kernels))
    zero = (zero_start, offset - zero_start)
    pre = bool(copy_in or zero[1])
    end = 3 if copy_out else 2 if launches else 1 if pre else 0
    return Shape(graph.kernels, offset, tuple(offsets), tuple(arena_buffers), tuple(resident_buffers),
                 tuple(copy_in), tuple(copy_out), zero, launches, pre, end,
                 auto=len(launches) >= AUTO_MIN_KERNELS)


def cached_shape(cache: dict[Any, Shape], graph: ExecGraph, clock: int, limit: int,
                 libraries: Mapping[str, Library], device: str) -> tuple[Shape, list[Shape]]:
    """The shape of a submitted graph from ``cache`` (planned and added when new), and the shapes
    evicted to keep at most ``limit`` (the least recently used quarter goes at once)."""
    key = (graph.kernels, tuple([(b.kind, b.nbytes) for b in graph.buffers]))
    shape = cache.get(key)
    evicted: list[Shape] = []
    if shape is None:
        shape = new_shape(graph, libraries, device)
        shape.used = clock  # the newest: never among those evicted here
        cache[key] = shape
        if len(cache) > limit:
            by_age = sorted(cache.items(), key=lambda kv: kv[1].used)
            for old, s in by_age[: len(by_age) - limit * 3 // 4]:
                del cache[old]
                evicted.append(s)
    shape.used = clock
    return shape, evicted


def plan_literals(shape: Shape, literals: tuple[tuple[int, int], ...], libraries: Mapping[str, Library]) -> None:
    """Give ``shape`` the slots of a prepared graph's bound literals (``literals[j] = (kernel, arg)``)."""
    found: list[Literal] = []
    seen: set[tuple[int, int]] = set()
    values: list[int | float] = []
    for j, (k, a) in enumerate(literals):
        kernel = shape.kernels[k] if 0 <= k < len(shape.kernels) else None
        arg = kernel.args[a] if kernel is not None and 0 <= a < len(kernel.args) else None
        if kernel is None or not isinstance(arg, Lit) or (k, a) in seen:
            raise errors.ArgumentError(
                f"bound literal {j} names argument {a} of kernel {k}, which is not a literal"
                + (" (or is named twice)" if (k, a) in seen else ""), detail={"literal": j, "index": k})
        seen.add((k, a))
        kind = libraries[kernel.library].specs[kernel.kernel].params[a].kind
        found.append(Literal(shape.launches[k], 8 * a, kind))
        values.append(arg.value)
    shape.literals = tuple(found)
    shape.lit_packer = literal_packer(tuple(lit.kind for lit in found))
    shape.packed_lits = shape.lit_packer.pack(*values)  # what pack_launch put into the blocks


def resolve(token: int, graph: ExecGraph, shape: Shape, deadline: float, high: bool,
            pinned: Mapping[int, Arena], residents: Mapping[int, Resident], device: str) -> Run:
    """The addresses of this submission of ``shape``: host pointers into arenas, residents."""
    buffers = graph.buffers
    hosts: list[int] = []
    arenas: list[Arena] = []
    for i in shape.arena_buffers:
        b = buffers[i]
        a = pinned.get(b.arena)
        if a is None:
            raise errors.InternalError(f"arena {b.arena} is not pinned on {device}")
        if b.offset < 0 or b.offset + b.nbytes > a.size:
            raise errors.InternalError(
                f"buffer {i}: arena {b.arena} slice {b.offset}+{b.nbytes} exceeds its {a.size} bytes")
        arenas.append(a)
        hosts.append(a.ptr + b.offset)
    used, ptrs = resolve_residents(buffers, shape, residents, device)
    return Run(token, shape, deadline, high, time.perf_counter(), hosts, ptrs, arenas, used)


def bind(token: int, p: Prepared, slices: Sequence[int], values: Sequence[int | float], deadline: float,
         high: bool, pinned: Mapping[int, Arena], residents: Mapping[int, Resident], device: str) -> Run:
    """A run of prepared graph ``p`` with its bindings: ``(arena, offset)`` per arena buffer, literal values.

    A binding outside its arena or a wrong count is an InternalError (the broker checks them);
    a value that does not fit its parameter's type is an ArgumentError.
    """
    shape = p.shape
    lits = b""
    if len(values) != len(shape.literals):
        raise errors.InternalError(
            f"prepared graph {p.handle} binds {len(shape.literals)} literal(s), got {len(values)}")
    if shape.literals:
        assert shape.lit_packer is not None
        try:
            lits = shape.lit_packer.pack(*values)
        except (struct.error, OverflowError, TypeError):
            raise _bad_value(shape, values) from None
    nbytes = p.nbytes
    if len(slices) != 2 * len(nbytes):
        raise errors.InternalError(
            f"prepared graph {p.handle} binds {len(nbytes)} arena slice(s), got {len(slices) / 2:g}")
    hosts: list[int] = []
    arenas: list[Arena] = []
    for pos, size in enumerate(nbytes):
        gid = slices[2 * pos]
        offset = slices[2 * pos + 1]
        a = pinned.get(gid)
        if a is None:
            raise errors.InternalError(f"arena {gid} is not pinned on {device}")
        if offset < 0 or offset + size > a.size:
            raise errors.InternalError(
                f"binding {pos}: arena {gid} slice {offset}+{size} exceeds its {a.size} bytes")
        arenas.append(a)
        hosts.append(a.ptr + offset)
    used, ptrs = resolve_residents(p.graph.buffers, shape, residents, device)
    return Run(token, shape, deadline, high, time.perf_counter(), hosts, ptrs, arenas, used, lits)


def _bad_value(shape: Shape, values: Sequence[int | float]) -> errors.ArgumentError:
    for j, (lit, value) in enumerate(zip(shape.literals, values, strict=True)):
        try:
            literal_packer((lit.kind,)).pack(value)
        except (struct.error, OverflowError, TypeError) as exc:
            return errors.ArgumentError(
                f"bound literal {j} (argument {lit.offset // 8} of kernel {lit.launch.index}, {lit.launch.name!r}): "
                f"{value!r} does not fit {lit.kind}: {exc}",
                detail={"literal": j, "kernel": lit.launch.name, "index": lit.launch.index})
    return errors.ArgumentError("a bound literal does not fit its parameter type")


def resolve_residents(buffers: Sequence[ExecBuffer], shape: Shape, residents: Mapping[int, Resident],
                      device: str) -> tuple[list[Resident], tuple[int, ...]]:
    used: list[Resident] = []
    if not shape.resident_buffers:
        return used, ()
    for i in shape.resident_buffers:
        b = buffers[i]
        r = residents.get(b.resident)
        if r is None:
            raise errors.UnknownResident(f"resident {b.resident} is not on {device}", detail={"resident": b.resident})
        if b.nbytes > r.size:
            raise errors.InternalError(f"buffer {i} reads {b.nbytes} bytes of a {r.size}-byte resident")
        used.append(r)
    return used, tuple(r.ptr for r in used)


def pack_pointers(shape: Shape, base: int, resident_ptrs: tuple[int, ...]) -> None:
    """Write the buffer pointers of allocation ``base`` into the shape's argument blocks."""
    ptrs = [base + o for o in shape.offsets]
    for i, p in zip(shape.resident_buffers, resident_ptrs, strict=True):
        ptrs[i] = p
    pack = _Q.pack_into
    for ln in shape.launches:
        args = ln.args
        for off, b in ln.buffers:
            pack(args, off, ptrs[b])
    shape.packed_base = base
    shape.packed_residents = resident_ptrs


def write_literals(shape: Shape, lits: bytes) -> None:
    """Copy the bound literal values ``lits`` that differ from those the blocks hold into them."""
    old = shape.packed_lits
    for j, lit in enumerate(shape.literals):
        at = 8 * j
        new = lits[at:at + 8]
        if new != old[at:at + 8]:
            ctypes.memmove(ctypes.addressof(lit.launch.args) + lit.offset, new, 8)
    shape.packed_lits = lits


def changed_launches(shape: Shape, old: bytes, new: bytes) -> list[int]:
    """Positions (in ``shape.launches``) of the launches whose bound literals differ between two packings."""
    changed: list[int] = []
    for j, lit in enumerate(shape.literals):
        at = 8 * j
        if new[at:at + 8] != old[at:at + 8] and lit.launch.index not in changed:
            changed.append(lit.launch.index)
    return changed
