"""Graph validation: a tenant's GraphSpec in, an ExecGraph out, or a typed error. Pure.

Everything a worker will touch is checked here, before anything is queued: every
arena slice against the arena's size, alignment to the dtype, dtypes and access modes
against kernel signatures, argument counts and literal ranges, launch dimensions,
dependencies and cycles.  An id the session does not hold is refused exactly like an
id that never existed: no hint that another session's handle exists.

Execution order: any order consistent with ``deps``; among ready kernels the lowest
index first, so a graph without deps runs in the order its kernels were listed.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import errors
from .protocol import DTYPES, SCALAR_TYPES, Buf, GraphSpec, KernelSpec, Lit
from .streams.wire import ExecBuffer, ExecGraph, ExecKernel, bind_graph

_RANGES: dict[str, tuple[int, int]] = {
    "i32": (-(2**31), 2**31 - 1), "i64": (-(2**63), 2**63 - 1),
    "u32": (0, 2**32 - 1), "u64": (0, 2**64 - 1),
}
_ITEMSIZE = {d: np.dtype(d).itemsize for d in DTYPES}
_F32_MAX = float(np.finfo(np.float32).max)
_WRITES = ("out", "inout")


@dataclass(frozen=True, slots=True)
class Limits:
    max_buffers: int = 1024
    max_kernels: int = 4096
    max_dims: int = 8
    max_buffer_bytes: int = 1 << 40
    max_graph_bytes: int = 1 << 40   # all of a graph's device memory (the engine lowers it to the device's)
    max_shared: int = 227 * 1024
    max_threads_per_block: int = 1024


@dataclass(frozen=True, slots=True)
class ArenaRef:
    """What validation needs of a session's arena."""

    global_id: int
    size: int
    closed: bool = False


@dataclass(frozen=True, slots=True)
class ResidentRef:
    global_id: int
    nbytes: int


@dataclass(slots=True)
class Template:
    """A prepared graph: its structure validated once, run many times with new bindings.

    ``graph`` is the ExecGraph with arena buffers unbound (arena 0, offset 0) and literals at
    their prepare-time values.  A run supplies ``(arena, offset)`` for each buffer listed in
    ``arena_buffers`` and a value for each literal of ``literal_kinds``, in the tenant's order
    (``literal_slots`` says where each lands in ``graph``).
    """

    graph: ExecGraph
    arena_buffers: tuple[tuple[int, int, int], ...]  # (buffer index, nbytes, itemsize) per arena buffer
    literal_kinds: tuple[str, ...]                  # scalar type of each literal, tenant order
    literal_slots: tuple[tuple[int, int], ...]      # (position in graph.kernels, argument position)
    literal_values: tuple[int | float, ...]         # the prepare-time values (the graph's own)
    residents: frozenset[int]
    resident_digests: frozenset[str]
    libraries: frozenset[str]
    input_bytes: int = 0
    output_bytes: int = 0
    temp_bytes: int = 0
    order: tuple[int, ...] = ()
    device_bytes: int = 0  # per-request device memory: temps and device copies of arena buffers
    kernel_keys: frozenset[tuple[str, str]] = frozenset()  # (library, kernel) pairs, for quarantine


@dataclass(slots=True)
class Resolved:
    """A validated graph plus the global handles it uses (for in-flight reference counts)."""

    graph: ExecGraph
    arenas: frozenset[int]
    residents: frozenset[int]
    libraries: frozenset[str]
    input_bytes: int = 0
    output_bytes: int = 0
    temp_bytes: int = 0
    order: tuple[int, ...] = field(default=())
    device_bytes: int = 0  # per-request device memory: temps and device copies of arena buffers


def _dims(what: str, dims: tuple[int, ...], hi: tuple[int, int, int]) -> tuple[int, int, int]:
    if not 1 <= len(dims) <= 3:
        raise errors.ArgumentError(f"{what} must have 1 to 3 dimensions, got {len(dims)}")
    d = tuple(dims) + (1,) * (3 - len(dims))
    for axis, (v, m) in enumerate(zip(d, hi, strict=True)):
        if not 1 <= v <= m:
            raise errors.ArgumentError(f"{what}[{axis}] = {v} is outside 1..{m}")
    return d[0], d[1], d[2]


def check_literal(what: str, kind: str, value: object) -> int | float:
    """``value`` as a ``kind`` literal, or ArgumentError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise errors.ArgumentError(f"{what} must be a {kind} number, got {type(value).__name__}")
    rng = _RANGES.get(kind)
    if rng is not None:
        if isinstance(value, float) or not rng[0] <= value <= rng[1]:
            raise errors.ArgumentError(f"{what}: {value!r} is not a {kind} in [{rng[0]}, {rng[1]}]")
        return value
    if kind == "f32" and math.isfinite(value) and abs(value) > _F32_MAX:
        raise errors.ArgumentError(f"{what}: {value!r} is outside the f32 range (±{_F32_MAX:.7g})")
    return float(value)


def prepare(spec: GraphSpec, *, residents: Mapping[str, ResidentRef],
            libraries: Mapping[str, Mapping[str, KernelSpec]], limits: Limits = Limits()) -> Template:
    """Validate the structure of ``spec`` (everything but its arena slices) into a Template."""
    if not spec.kernels:
        raise errors.InvalidGraph("graph has no kernels")
    if len(spec.buffers) > limits.max_buffers:
        raise errors.InvalidGraph(f"graph has {len(spec.buffers)} buffers; the limit is {limits.max_buffers}")
    if len(spec.kernels) > limits.max_kernels:
        raise errors.InvalidGraph(f"graph has {len(spec.kernels)} kernels; the limit is {limits.max_kernels}")

    buffers: list[ExecBuffer] = []
    arena_buffers: list[tuple[int, int, int]] = []
    used_res: set[int] = set()
    digests: set[str] = set()
    nin = nout = ntemp = 0
    for i, b in enumerate(spec.buffers):
        where = f"buffer {i}"
        if b.dtype not in _ITEMSIZE:
            raise errors.DtypeMismatch(f"{where}: unsupported dtype {b.dtype!r} (supported: {', '.join(DTYPES)})")
        if len(b.shape) > limits.max_dims or any(d < 1 for d in b.shape):
            raise errors.InvalidGraph(f"{where}: shape {tuple(b.shape)} must have 0..{limits.max_dims} positive dims")
        nbytes = math.prod(b.shape) * _ITEMSIZE[b.dtype]
        if nbytes > limits.max_buffer_bytes:
            raise errors.InvalidGraph(f"{where}: {nbytes} bytes exceeds the {limits.max_buffer_bytes}-byte limit")
        if b.kind in ("in", "out", "inout"):
            if b.resident:
                raise errors.InvalidGraph(f"{where}: an arena buffer cannot name a resident")
            arena_buffers.append((i, nbytes, _ITEMSIZE[b.dtype]))
            buffers.append(ExecBuffer(b.kind, b.dtype, tuple(b.shape), nbytes))
            if b.kind != "out":
                nin += nbytes
            if b.kind != "in":
                nout += nbytes
        elif b.kind == "temp":
            if b.arena or b.offset or b.resident:
                raise errors.InvalidGraph(f"{where}: a temp buffer has no arena, offset or resident")
            buffers.append(ExecBuffer("temp", b.dtype, tuple(b.shape), nbytes))
            ntemp += nbytes
        elif b.kind == "resident":
            res = residents.get(b.resident)
            if res is None:
                raise errors.UnknownResident(f"{where}: resident {b.resident[:16]!r} is not registered by this tenant",
                                             detail={"resident": b.resident})
            if nbytes > res.nbytes:
                raise errors.OutOfBounds(f"{where}: view of {nbytes} bytes exceeds resident of {res.nbytes} bytes",
                                         detail={"nbytes": nbytes, "resident_size": res.nbytes})
            if b.arena or b.offset:
                raise errors.InvalidGraph(f"{where}: a resident buffer has no arena or offset")
            used_res.add(res.global_id)
            digests.add(b.resident)
            buffers.append(ExecBuffer("resident", b.dtype, tuple(b.shape), nbytes, resident=res.global_id))
        else:
            raise errors.InvalidGraph(f"{where}: unknown buffer kind {b.kind!r} "
                                      "(expected in, out, inout, temp or resident)")

    footprint = sum(b.nbytes for b in buffers if b.kind != "resident")
    if footprint > limits.max_graph_bytes:
        raise errors.QuotaExceeded(
            f"graph needs {footprint} bytes of device memory; at most {limits.max_graph_bytes} fit",
            detail={"needed": footprint, "limit": limits.max_graph_bytes})
    n = len(spec.kernels)
    kernels: list[ExecKernel] = []
    used_libs: set[str] = set()
    lits: list[tuple[int, int, str, int | float]] = []  # (tenant kernel index, arg position, kind, value)
    for ki, k in enumerate(spec.kernels):
        where = f"kernel {ki} ({k.kernel!r})"
        lib = libraries.get(k.library)
        if lib is None:
            raise errors.UnknownLibrary(f"{where}: library {k.library[:16]!r} is not registered by this tenant",
                                        detail={"library": k.library})
        sig = lib.get(k.kernel)
        if sig is None:
            raise errors.UnknownKernel(f"{where}: library has no kernel {k.kernel!r} "
                                       f"(it has: {', '.join(sorted(lib)) or 'none'})", detail={"kernel": k.kernel})
        grid = _dims(f"{where}: grid", k.grid, (2**31 - 1, 65535, 65535))
        block = _dims(f"{where}: block", k.block, (1024, 1024, 64))
        if math.prod(block) > limits.max_threads_per_block:
            raise errors.ArgumentError(f"{where}: block of {math.prod(block)} threads exceeds "
                                       f"{limits.max_threads_per_block}")
        if not 0 <= k.shared <= limits.max_shared:
            raise errors.ArgumentError(f"{where}: shared memory {k.shared} is outside 0..{limits.max_shared}")
        if len(k.args) != len(sig.params):
            names = ", ".join(p.name for p in sig.params)
            raise errors.ArgumentError(f"{where}: takes {len(sig.params)} arguments ({names}), got {len(k.args)}")
        for ai, (arg, p) in enumerate(zip(k.args, sig.params, strict=True)):
            aw = f"{where}: argument {ai} ({p.name})"
            if p.kind == "buf":
                if not isinstance(arg, Buf):
                    raise errors.ArgumentError(f"{aw} must be a buffer, got a {arg.dtype} literal")
                if not 0 <= arg.index < len(buffers):
                    raise errors.ArgumentError(f"{aw}: buffer index {arg.index} out of range 0..{len(buffers) - 1}")
                buf = buffers[arg.index]
                if p.dtype and p.dtype != buf.dtype:
                    raise errors.DtypeMismatch(f"{aw} expects {p.dtype}, buffer {arg.index} is {buf.dtype}")
                if p.access in _WRITES and buf.kind in ("in", "resident"):
                    raise errors.AccessError(f"{aw} writes its buffer, but buffer {arg.index} is "
                                             f"{buf.kind} (read-only)")
            elif p.kind in SCALAR_TYPES:
                if not isinstance(arg, Lit):
                    raise errors.ArgumentError(f"{aw} must be a {p.kind} literal, got a buffer")
                if arg.dtype != p.kind:
                    raise errors.ArgumentError(f"{aw} must be {p.kind}, got {arg.dtype}")
                lits.append((ki, ai, p.kind, check_literal(aw, p.kind, arg.value)))
            else:
                raise errors.ArgumentError(f"{aw}: the kernel signature has unknown parameter kind {p.kind!r}")
        for d in k.deps:
            if not 0 <= d < n or d == ki:
                raise errors.InvalidGraph(f"{where}: dependency {d} is not another kernel of this graph (0..{n - 1})")
        used_libs.add(k.library)
        kernels.append(ExecKernel(k.library, k.kernel, grid, block, k.shared, tuple(k.args)))

    order = _toposort([k.deps for k in spec.kernels])
    position = {ki: pos for pos, ki in enumerate(order)}
    graph = ExecGraph(tuple(buffers), tuple(kernels[i] for i in order))
    return Template(graph, tuple(arena_buffers), tuple(kind for *_, kind, _ in lits),
                    tuple((position[ki], ai) for ki, ai, _, _ in lits), tuple(v for *_, v in lits),
                    frozenset(used_res), frozenset(digests), frozenset(used_libs), nin, nout, ntemp, tuple(order),
                    footprint, frozenset((k.library, k.kernel) for k in spec.kernels))


def bind(t: Template, slices: Sequence[int], values: Sequence[object],
         arenas: Mapping[int, ArenaRef]) -> tuple[tuple[int, ...], tuple[int | float, ...], tuple[int, ...]]:
    """Check one run's bindings against the session's arenas: O(buffers + literals).

    ``slices`` holds ``(arena, offset)`` for each of the template's arena buffers.  Returns
    the slices with global arena ids, the literal values, and the global arena id of each
    arena buffer (for in-flight counts).
    """
    nb = len(t.arena_buffers)
    if len(slices) != 2 * nb:
        raise errors.ArgumentError(f"the graph has {nb} arena buffer(s): expected {2 * nb} slice numbers "
                                   f"(arena, offset per buffer), got {len(slices)}")
    if len(values) != len(t.literal_kinds):
        raise errors.ArgumentError(f"the graph has {len(t.literal_kinds)} literal argument(s), got {len(values)} value(s)")
    out: list[int] = []
    gids: list[int] = []
    for j, (i, nbytes, itemsize) in enumerate(t.arena_buffers):
        arena = slices[2 * j]
        offset = slices[2 * j + 1]
        where = f"buffer {i}"
        ref = arenas.get(arena)
        if ref is None:
            raise errors.UnknownArena(f"{where}: arena {arena} is not registered in this session",
                                      detail={"arena": arena})
        if ref.closed:
            raise errors.ArenaClosed(f"{where}: arena {arena} is closed", detail={"arena": arena})
        if offset < 0 or offset + nbytes > ref.size:
            raise errors.OutOfBounds(
                f"{where}: bytes [{offset}, {offset + nbytes}) lie outside arena {arena} of {ref.size} bytes",
                detail={"arena": arena, "offset": offset, "nbytes": nbytes, "arena_size": ref.size})
        if offset % itemsize:
            raise errors.Misaligned(f"{where}: offset {offset} is not a multiple of {t.graph.buffers[i].dtype}'s "
                                    f"{itemsize} bytes", detail={"offset": offset})
        out.append(ref.global_id)
        out.append(offset)
        gids.append(ref.global_id)
    if values == t.literal_values:
        vals: tuple[int | float, ...] = t.literal_values
    else:
        vals = tuple(check_literal(f"literal {j}", kind, v) for j, (kind, v) in enumerate(
            zip(t.literal_kinds, values, strict=True)))
    return tuple(out), vals, tuple(gids)


def spec_bindings(spec: GraphSpec) -> tuple[tuple[int, ...], tuple[int | float, ...]]:
    """The bindings a whole GraphSpec carries: its arena slices and literal values."""
    slices = tuple(x for b in spec.buffers if b.kind in ("in", "out", "inout") for x in (b.arena, b.offset))
    values = tuple(a.value for k in spec.kernels for a in k.args if isinstance(a, Lit))
    return slices, values


def instantiate(t: Template, slices: Sequence[int], values: Sequence[int | float]) -> ExecGraph:
    """The ExecGraph of one run (for backends without prepared graphs, and tests)."""
    return bind_graph(t.graph, [i for i, _, _ in t.arena_buffers], t.literal_slots, slices,
                      () if values == t.literal_values else values)


def resolve(spec: GraphSpec, *, arenas: Mapping[int, ArenaRef], residents: Mapping[str, ResidentRef],
            libraries: Mapping[str, Mapping[str, KernelSpec]], limits: Limits = Limits()) -> Resolved:
    """Validate a whole ``spec`` (structure and bindings) and return its ExecGraph."""
    t = prepare(spec, residents=residents, libraries=libraries, limits=limits)
    slices, values = spec_bindings(spec)
    bound, vals, gids = bind(t, slices, values, arenas)
    return Resolved(instantiate(t, bound, vals), frozenset(gids), t.residents, t.libraries, t.input_bytes,
                    t.output_bytes, t.temp_bytes, t.order, t.device_bytes)


def _toposort(deps: list[tuple[int, ...]]) -> list[int]:
    n = len(deps)
    indeg = [0] * n
    users: list[list[int]] = [[] for _ in range(n)]
    for k, ds in enumerate(deps):
        for d in set(ds):
            indeg[k] += 1
            users[d].append(k)
    ready = [k for k in range(n) if indeg[k] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for u in users[k]:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != n:
        stuck = sorted(set(range(n)) - set(order))
        raise errors.CycleError(f"kernels {stuck} depend on each other in a cycle", detail={"kernels": stuck})
    return order
