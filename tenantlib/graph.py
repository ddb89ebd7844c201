"""The graph builder: buffers and kernels, turned into a GraphSpec for the broker.

    g = Graph()
    a, b = g.input(x), g.input(y)
    c = g.output(z)
    g.kernel(lib, "vadd", grid=launch.grid, block=launch.block, args=[a, b, c, n])

Dependencies are added for you from each kernel's parameter access modes (read after
write, write after read, write after write); ``after=`` adds explicit ones.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker.protocol import SCALAR_TYPES, Buf, BufferSpec, GraphSpec, KernelNode, KernelSpec, Lit

from . import errors


@dataclass(frozen=True)
class Library:
    """A registered library: its content digest and kernel signatures."""

    digest: str
    name: str
    kernels: dict[str, KernelSpec]
    cached: bool = False
    log: str = ""

    def __getitem__(self, name: str) -> KernelSpec:
        try:
            return self.kernels[name]
        except KeyError:
            raise errors.UnknownKernel(f"library {self.name or self.digest[:12]} has no kernel {name!r} "
                                       f"(it has: {', '.join(sorted(self.kernels))})") from None


@dataclass(frozen=True)
class Resident:
    """A device-resident, immutable buffer of this tenant, named by its content digest."""

    digest: str
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    cached: bool = False


@dataclass(frozen=True)
class BufferRef:
    graph: Graph = field(repr=False)
    index: int
    kind: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class _Buffer:
    kind: str
    dtype: str
    shape: tuple[int, ...]
    array: np.ndarray | None = None
    resident: str = ""


_INT_TYPES = {"i32", "i64", "u32", "u64"}
Locator = Callable[[np.ndarray], tuple[int, int]]


class Graph:
    """An ordered DAG of kernels over named buffers; reusable across runs."""

    def __init__(self) -> None:
        self._buffers: list[_Buffer] = []
        self._refs: dict[tuple[int, int, str], BufferRef] = {}
        self._kernels: list[KernelNode] = []
        self._last_writer: dict[int, int] = {}
        self._readers: dict[int, list[int]] = {}
        self._spec: GraphSpec | None = None
        self._spec_key: tuple[int, ...] = ()

    # -- buffers ---------------------------------------------------------------------------
    def _arena_buffer(self, kind: str, arr: np.ndarray) -> BufferRef:
        if not isinstance(arr, np.ndarray):
            raise errors.InvalidArgument(f"{kind} buffer must be a numpy array in an arena, got {type(arr).__name__}")
        if not arr.flags.c_contiguous:
            raise errors.InvalidArgument(f"{kind} buffer must be C-contiguous")
        key = (int(arr.__array_interface__["data"][0]), arr.nbytes, kind)
        ref = self._refs.get(key)
        if ref is None:
            ref = self._add(_Buffer(kind, arr.dtype.name, tuple(arr.shape), array=arr))
            self._refs[key] = ref
        return ref

    def _add(self, buf: _Buffer) -> BufferRef:
        self._buffers.append(buf)
        self._spec = None
        return BufferRef(self, len(self._buffers) - 1, buf.kind, buf.dtype, buf.shape)

    def input(self, arr: np.ndarray) -> BufferRef:
        """Copied to the device before the first kernel; read-only for kernels."""
        return self._arena_buffer("in", arr)

    def output(self, arr: np.ndarray) -> BufferRef:
        """Starts zeroed on the device; written back to ``arr`` after every kernel succeeded."""
        return self._arena_buffer("out", arr)

    def inout(self, arr: np.ndarray) -> BufferRef:
        return self._arena_buffer("inout", arr)

    def temp(self, shape: int | tuple[int, ...], dtype: Any = np.float32) -> BufferRef:
        """Device-only scratch for one run, zeroed."""
        shape_t = (shape,) if isinstance(shape, int) else tuple(shape)
        return self._add(_Buffer("temp", np.dtype(dtype).name, shape_t))

    def resident(self, res: Resident, *, dtype: Any = None, shape: tuple[int, ...] | None = None) -> BufferRef:
        """A resident buffer (read-only), optionally viewed with another dtype/shape."""
        dt = np.dtype(dtype).name if dtype is not None else res.dtype
        return self._add(_Buffer("resident", dt, tuple(shape) if shape is not None else res.shape,
                                 resident=res.digest))

    # -- kernels ---------------------------------------------------------------------------
    def kernel(self, library: Library, name: str, *, grid: int | Sequence[int], block: int | Sequence[int],
               args: Sequence[Any], shared: int = 0, after: Sequence[int] = ()) -> int:
        """Append a kernel launch; returns its index (for ``after=``)."""
        sig = library[name]
        if len(args) != len(sig.params):
            raise errors.ArgumentError(f"kernel {name!r} takes {len(sig.params)} arguments "
                                       f"({', '.join(p.name for p in sig.params)}), got {len(args)}")
        wire: list[Buf | Lit] = []
        reads: set[int] = set()
        writes: set[int] = set()
        for p, a in zip(sig.params, args, strict=True):
            if p.kind == "buf":
                if not isinstance(a, BufferRef) or a.graph is not self:
                    raise errors.ArgumentError(f"kernel {name!r} argument {p.name!r} must be a buffer of this graph")
                wire.append(Buf(a.index))
                if p.access in ("in", "inout"):
                    reads.add(a.index)
                if p.access in ("out", "inout"):
                    writes.add(a.index)
            elif p.kind in SCALAR_TYPES:
                wire.append(Lit(p.kind, _scalar(name, p.name, p.kind, a)))
            else:
                raise errors.ArgumentError(f"kernel {name!r} parameter {p.name!r} has unknown kind {p.kind!r}")
        idx = len(self._kernels)
        deps = set(after)
        for b in reads | writes:
            if b in self._last_writer:
                deps.add(self._last_writer[b])
        for b in writes:
            deps.update(self._readers.get(b, ()))
        deps.discard(idx)
        for b in reads:
            self._readers.setdefault(b, []).append(idx)
        for b in writes:
            self._last_writer[b] = idx
            self._readers[b] = []
        self._kernels.append(KernelNode(library.digest, name, _dims(grid), _dims(block), tuple(wire), shared,
                                        tuple(sorted(deps))))
        self._spec = None
        return idx

    def __len__(self) -> int:
        return len(self._kernels)

    def spec(self, locate: Locator) -> GraphSpec:
        """The wire form; ``locate(array)`` gives (arena id, offset). Cached while arenas stay put."""
        placed = [locate(b.array) if b.array is not None else (0, 0) for b in self._buffers]
        key = tuple(x for p in placed for x in p)
        if self._spec is not None and key == self._spec_key:
            return self._spec
        bufs = tuple(BufferSpec(b.kind, b.dtype, b.shape, arena, off, b.resident)
                     for b, (arena, off) in zip(self._buffers, placed, strict=True))
        self._spec = GraphSpec(bufs, tuple(self._kernels))
        self._spec_key = key
        return self._spec


def _dims(v: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(v, Sequence):
        return tuple(int(x) for x in v)
    return (int(v),)


def _scalar(kernel: str, param: str, kind: str, value: Any) -> int | float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.generic)):
        raise errors.ArgumentError(f"kernel {kernel!r} argument {param!r} must be a {kind} number, "
                                   f"got {type(value).__name__}")
    if kind in _INT_TYPES:
        if isinstance(value, numbers.Integral):
            return int(value)
        raise errors.ArgumentError(f"kernel {kernel!r} argument {param!r} must be an integer ({kind}), got {value!r}")
    return float(value)
