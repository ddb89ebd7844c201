"""The graph builder: buffers and kernels, turned into a GraphSpec for the broker.

    g = Graph()
    a, b = g.input(x), g.input(y)
    c = g.output(z)
    g.kernel(lib, "vadd", grid=launch.grid, block=launch.block, args=[a, b, c, n])

Dependencies are added for you from each kernel's parameter access modes (read after
write, write after read, write after write); ``after=`` adds explicit ones.
"""

from __future__ import annotations

import math
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

    def kernel(self, name: str) -> Kernel:
        """Kernel ``name``, for ``Graph.launch``; ``lib.vadd`` is the same."""
        return Kernel(self, self[name])

    def __getattr__(self, name: str) -> Kernel:
        if name.startswith("__") or name not in self.__dict__.get("kernels", {}):
            raise AttributeError(f"library {self.__dict__.get('name') or self.__dict__.get('digest', '')[:12]!s} "
                                 f"has no kernel or attribute {name!r}")
        return Kernel(self, self.kernels[name])


_F32_MAX = float(np.finfo(np.float32).max)
_DTYPE_OF = {"i32": "int32", "u32": "uint32", "i64": "int64", "u64": "uint64", "f32": "float32", "f64": "float64"}
_RANGE = {"i32": (-(1 << 31), (1 << 31) - 1), "u32": (0, (1 << 32) - 1), "i64": (-(1 << 63), (1 << 63) - 1),
          "u64": (0, (1 << 64) - 1)}


@dataclass(frozen=True)
class Kernel:
    """One kernel of a registered library, as ``Graph.launch`` takes it."""

    library: Library = field(repr=False)
    spec: KernelSpec

    @property
    def name(self) -> str:
        return self.spec.name

    def signature(self) -> str:
        """The parameters as C reads them, e.g. ``vadd(in float32* a, out float32* c, i32 n)``."""
        parts = [f"{p.access} {p.dtype or 'void'}* {p.name}" if p.kind == "buf" else f"{p.kind} {p.name}"
                 for p in self.spec.params]
        return f"{self.spec.name}({', '.join(parts)})"


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
        self._param_names: dict[int, tuple[str, ...]] = {}
        self._last_writer: dict[int, int] = {}
        self._readers: dict[int, list[int]] = {}
        self._spec: GraphSpec | None = None
        self._spec_key: tuple[int, ...] = ()
        # What a prepared run sends: bumped on every change of structure (a new buffer or
        # kernel), so a client prepares the graph again; literals and bound arrays are not structure.
        self.version = 0
        self._values: tuple[int | float, ...] | None = None
        self._slices: tuple[int, ...] = ()
        self._slices_key: object = None

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
        self.version += 1
        self._slices_key = None
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
        self._param_names[idx] = tuple(p.name for p in sig.params)
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
        self._values = None
        self.version += 1
        return idx

    def launch(self, kernel: Kernel, grid: int | Sequence[int], block: int | Sequence[int], *args: Any,
               shared: int = 0, after: Sequence[int] = ()) -> int:
        """Append a launch of ``kernel`` with positional arguments, as CuPy's ``kernel(grid, block, args)``.

        A buffer argument is a buffer of this graph, or a numpy array in an arena, which becomes
        an input, output or inout buffer by the parameter's access mode; its dtype must be the
        one the parameter points to.  A number is converted to the parameter's exact type: an
        int must fit it, a float is refused for an integer parameter, and a numpy scalar must
        already have that type (nothing is widened or narrowed silently).  Returns the kernel's
        index (for ``after=``).
        """
        if not isinstance(kernel, Kernel):
            raise errors.ArgumentError(f"launch takes a kernel (library.kernel(name) or library.NAME), "
                                       f"got {type(kernel).__name__}")
        sig = kernel.spec
        if len(args) != len(sig.params):
            raise errors.ArgumentError(f"{kernel.signature()} takes {len(sig.params)} argument(s), got {len(args)}")
        wire: list[Any] = []
        for i, (p, a) in enumerate(zip(sig.params, args, strict=True)):
            where = f"argument {i} ({p.name!r}) of {kernel.signature()}"
            if p.kind == "buf":
                ref = self._launch_buffer(where, p.access, a)
                if p.dtype and ref.dtype != p.dtype:
                    raise errors.DtypeMismatch(f"{where} points to {p.dtype}, got a {ref.dtype} buffer")
                wire.append(ref)
            else:
                wire.append(_exact(where, p.kind, a))
        return self.kernel(kernel.library, sig.name, grid=grid, block=block, args=wire, shared=shared, after=after)

    def _launch_buffer(self, where: str, access: str, a: Any) -> BufferRef:
        if isinstance(a, BufferRef):
            if a.graph is not self:
                raise errors.ArgumentError(f"{where} is a buffer of another graph")
            return a
        if isinstance(a, np.ndarray):
            kind = {"in": "in", "out": "out"}.get(access, "inout")
            addr = int(a.__array_interface__["data"][0])
            other = next((k for (at, n, k) in self._refs if at == addr and n == a.nbytes and k != kind), None)
            if other is not None:
                raise errors.ArgumentError(f"{where}: this array is already a {other} buffer of the graph; "
                                           "pass the same buffer (g.inout(array)) to every kernel that uses it")
            return self._arena_buffer(kind, a)
        raise errors.ArgumentError(f"{where} must be a buffer of this graph or a numpy array, "
                                   f"got {type(a).__name__}")

    def set_literal(self, kernel: int, arg: int | str, value: Any) -> None:
        """Change a literal argument of kernel ``kernel`` (by position or parameter name).

        The graph stays prepared: the next run sends the new value with its bindings, and a
        GPU replays its captured CUDA graph with the kernel's argument updated in place.
        """
        if not 0 <= kernel < len(self._kernels):
            raise errors.ArgumentError(f"graph has no kernel {kernel} (it has {len(self._kernels)})")
        node = self._kernels[kernel]
        args = list(node.args)
        if isinstance(arg, str):
            names = self._param_names.get(kernel, ())
            if arg not in names:
                raise errors.ArgumentError(f"kernel {node.kernel!r} has no parameter {arg!r} "
                                           f"(it has: {', '.join(names)})")
            pos = names.index(arg)
        else:
            pos = arg
        if not 0 <= pos < len(args) or not isinstance(args[pos], Lit):
            raise errors.ArgumentError(f"argument {arg!r} of kernel {node.kernel!r} is not a literal")
        old = args[pos]
        assert isinstance(old, Lit)
        args[pos] = Lit(old.dtype, _scalar(node.kernel, str(arg), old.dtype, value))
        self._kernels[kernel] = KernelNode(node.library, node.kernel, node.grid, node.block, tuple(args),
                                           node.shared, node.deps)
        self._spec = None
        self._values = None

    def bind(self, ref: BufferRef, arr: np.ndarray) -> None:
        """Point arena buffer ``ref`` at another array of the same dtype and shape (no new prepare)."""
        if ref.graph is not self or not 0 <= ref.index < len(self._buffers):
            raise errors.ArgumentError("buffer is not of this graph")
        b = self._buffers[ref.index]
        if b.array is None:
            raise errors.ArgumentError(f"buffer {ref.index} is a {b.kind} buffer: only arena buffers are bound")
        if not isinstance(arr, np.ndarray) or arr.dtype.name != b.dtype or tuple(arr.shape) != b.shape:
            got = f"{arr.dtype.name}{tuple(arr.shape)}" if isinstance(arr, np.ndarray) else type(arr).__name__
            raise errors.ArgumentError(f"buffer {ref.index} is {b.dtype}{b.shape}; cannot bind {got}")
        if not arr.flags.c_contiguous:
            raise errors.InvalidArgument(f"{b.kind} buffer must be C-contiguous")
        b.array = arr
        self._spec = None
        self._slices_key = None

    def bindings(self, locate: Locator, key: object) -> tuple[tuple[int, ...], tuple[int | float, ...]]:
        """A prepared run's bindings: (arena, offset) per arena buffer, and the literal values.

        ``key`` names the caller's arenas as they are now: located slices are reused while it holds.
        """
        if key != self._slices_key or self._slices_key is None:
            self._slices = tuple(x for b in self._buffers if b.array is not None for x in locate(b.array))
            self._slices_key = key
        if self._values is None:
            self._values = tuple(a.value for k in self._kernels for a in k.args if isinstance(a, Lit))
        return self._slices, self._values

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


def _exact(where: str, kind: str, value: Any) -> int | float:
    """``value`` as parameter type ``kind``, refusing any conversion that is not exact (see Graph.launch)."""
    if isinstance(value, (bool, np.bool_)):
        raise errors.ArgumentError(f"{where} is {kind}; got a bool")
    if isinstance(value, np.generic):
        if value.dtype.name != _DTYPE_OF[kind]:
            raise errors.ArgumentError(f"{where} is {kind} ({_DTYPE_OF[kind]}); got a numpy {value.dtype.name}: "
                                       "convert it explicitly")
        return value.item()  # type: ignore[no-any-return]
    if kind in _RANGE:
        if not isinstance(value, numbers.Integral):
            raise errors.ArgumentError(f"{where} is {kind}; got {type(value).__name__} {value!r}")
        lo, hi = _RANGE[kind]
        if not lo <= int(value) <= hi:
            raise errors.ArgumentError(f"{where} is {kind}; {value} is outside {lo}..{hi}")
        return int(value)
    if not isinstance(value, numbers.Real):
        raise errors.ArgumentError(f"{where} is {kind}; got {type(value).__name__}")
    try:
        as_float = float(value)
    except OverflowError:
        raise errors.ArgumentError(f"{where} is {kind}; {value} is out of its range") from None
    if kind == "f32" and math.isfinite(as_float) and abs(as_float) > _F32_MAX:
        raise errors.ArgumentError(f"{where} is f32; {value!r} is out of its range (it would become infinite)")
    if isinstance(value, numbers.Integral):
        exact = float(np.float32(as_float)) if kind == "f32" else as_float
        if exact != value:
            raise errors.ArgumentError(f"{where} is {kind}; the int {value} is not exactly a {kind}")
        return exact
    return as_float


def _scalar(kernel: str, param: str, kind: str, value: Any) -> int | float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.generic)):
        raise errors.ArgumentError(f"kernel {kernel!r} argument {param!r} must be a {kind} number, "
                                   f"got {type(value).__name__}")
    if kind in _INT_TYPES:
        if isinstance(value, numbers.Integral):
            return int(value)
        raise errors.ArgumentError(f"kernel {kernel!r} argument {param!r} must be an integer ({kind}), got {value!r}")
    return float(value)
