"""Numba kernels on kaas: compile a ``@cuda.jit`` function here, run it through the broker.

    from numba import cuda
    from tenantlib import numba as kn

    @cuda.jit
    def axpy(a, x, y):
        i = cuda.grid(1)
        if i < x.size:
            y[i] = a * x[i] + y[i]

    k = kn.compile(client, axpy, "void(float32, float32[::1], float32[::1])", access={"x": "in"})
    g = client.graph()
    k[blocks, 256](g, 2.0, x, y)       # as Numba's kernel[grid, block](...), onto a graph
    client.run(g)

Compilation needs numba-cuda (``pip install 'kaas[numba]'``) and no GPU: Numba writes PTX for the
broker's architecture, nvJitLink turns it into a CUBIN (PTX newer than a driver knows would not
load; a CUBIN does), which is registered like any other.  Numba passes an array as ``5 + 2 x
ndim`` raw parameters (meminfo, parent, item count, item size, data pointer, shape, strides in
bytes); kaas writes that signature, and each launch passes the data pointer as a kaas buffer and
the rest as literals from the buffer's shape (C-contiguous; meminfo and parent are NULL, as
for any array handed to a kernel).  Scalars are ``int32``/``uint32``/``int64``/``uint64``/
``float32``/``float64``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from broker import errors
from broker.protocol import DTYPES, KernelSpec, Param
from broker.streams.compiler import link_ptx
from broker.streams.cubin import read_cubin
from broker.streams.signatures import check_binary

from .graph import BufferRef, Graph, Kernel
from .kernel_specs import parse_arch

__all__ = ["NumbaKernel", "build", "compile"]

if not hasattr(np, "row_stack"):
    # numba-cuda 0.30 registers an overload of np.row_stack when it is imported, and numpy 2.5
    # removed that alias of vstack: put the alias back (before numba is imported) or the import
    # fails with AttributeError.
    np.row_stack = np.vstack  # type: ignore[attr-defined]

_SCALARS = {"int32": "i32", "uint32": "u32", "int64": "i64", "uint64": "u64", "float32": "f32", "float64": "f64"}


@dataclass(frozen=True)
class NumbaKernel(Kernel):
    """A compiled and registered Numba kernel: ``kernel[grid, block](graph, *args)`` appends a launch."""

    arrays: tuple[tuple[int, str, int], ...] = ()  # (user argument position, dtype, ndim) of each array

    def __getitem__(self, config: tuple[Any, ...]) -> Callable[..., int]:
        if not isinstance(config, tuple) or len(config) not in (2, 3):
            raise errors.ArgumentError("a Numba kernel is launched as kernel[grid, block](graph, ...) "
                                       "or kernel[grid, block, shared_bytes](graph, ...)")
        grid, block = config[0], config[1]
        shared = int(config[2]) if len(config) == 3 else 0

        def launch(graph: Graph, *args: Any, after: Sequence[int] = ()) -> int:
            return self.launch(graph, grid, block, *args, shared=shared, after=after)
        return launch

    def user_count(self) -> int:
        return len(self.spec.params) - sum(4 + 2 * ndim for _, _, ndim in self.arrays)

    def launch(self, graph: Graph, grid: int | Sequence[int], block: int | Sequence[int], *args: Any,
               shared: int = 0, after: Sequence[int] = ()) -> int:
        """Append one launch to ``graph`` with the kernel's own arguments (arrays, numbers)."""
        if len(args) != self.user_count():
            raise errors.ArgumentError(f"Numba kernel {self.name!r} takes {self.user_count()} argument(s), "
                                       f"got {len(args)}")
        arrays = {pos: (dtype, ndim) for pos, dtype, ndim in self.arrays}
        flat: list[Any] = []
        for pos, a in enumerate(args):
            if pos not in arrays:
                flat.append(a)
                continue
            dtype, ndim = arrays[pos]
            shape = a.shape if isinstance(a, (BufferRef, np.ndarray)) else None
            if shape is None:
                raise errors.ArgumentError(f"argument {pos} of Numba kernel {self.name!r} is an array: pass a "
                                           f"buffer of the graph or a numpy array, got {type(a).__name__}")
            if len(shape) != ndim:
                raise errors.ArgumentError(f"argument {pos} of Numba kernel {self.name!r} is {ndim}-D, got a "
                                           f"{len(shape)}-D array")
            item = np.dtype(dtype).itemsize
            strides = [item * math.prod(shape[i + 1:]) for i in range(ndim)]
            flat += [0, 0, math.prod(shape), item, a, *shape, *strides]
        return graph.launch(self, grid, block, *flat, shared=shared, after=after)


def _numba_types(sig: str | Any) -> list[Any]:
    from numba.core import sigutils

    try:
        argtys, _ = sigutils.normalize_signature(sig)
    except Exception as exc:  # numba raises TypeError, NameError, ... for a bad signature string
        raise errors.ArgumentError(f"not a Numba signature: {sig!r} ({exc})") from None
    return list(argtys)


def _spec_params(fn_name: str, names: list[str], types: list[Any],
                 access: Mapping[str, str]) -> tuple[list[Param], list[tuple[int, str, int]]]:
    from numba.core import types as nt

    params: list[Param] = []
    arrays: list[tuple[int, str, int]] = []
    access = dict(access)
    for pos, (name, t) in enumerate(zip(names, types, strict=True)):
        where = f"parameter {name!r} of Numba kernel {fn_name!r}"
        if isinstance(t, nt.Array):
            dtype = str(t.dtype)
            if dtype not in DTYPES:
                raise errors.UnsupportedFeature(f"{where} is an array of {dtype}, which kaas does not know",
                                                detail={"param": name, "feature": "parameter type"})
            if t.layout not in ("C", "A"):
                raise errors.UnsupportedFeature(f"{where} has layout {t.layout!r}: kaas buffers are C-contiguous",
                                                detail={"param": name, "feature": "array layout"})
            mode = access.pop(name, "inout")
            if mode not in ("in", "out", "inout"):
                raise errors.InvalidArgument(f"access of {name!r} must be in, out or inout, got {mode!r}")
            arrays.append((pos, dtype, t.ndim))
            params += [Param(f"{name}.meminfo", "u64"), Param(f"{name}.parent", "u64"),
                       Param(f"{name}.nitems", "i64"), Param(f"{name}.itemsize", "i64"),
                       Param(name, "buf", mode, dtype)]
            params += [Param(f"{name}.shape{i}", "i64") for i in range(t.ndim)]
            params += [Param(f"{name}.stride{i}", "i64") for i in range(t.ndim)]
        elif str(t) in _SCALARS:
            params.append(Param(name, _SCALARS[str(t)]))
        else:
            raise errors.UnsupportedFeature(f"{where} has Numba type {t}; kaas passes arrays and int32, uint32, "
                                            "int64, uint64, float32 and float64 scalars",
                                            detail={"param": name, "feature": "parameter type"})
    if access:
        raise errors.SignatureMismatch(f"access= names {sorted(access)[0]!r}, which is not an array parameter of "
                                       f"Numba kernel {fn_name!r}", detail={"param": sorted(access)[0]})
    return params, arrays


def build(fn: Any, signature: str | Any, *, arch: str = "", access: Mapping[str, str] | None = None,
          host: str = "", fastmath: bool = False) -> tuple[KernelSpec, tuple[tuple[int, str, int], ...], bytes]:
    """Compile without registering: the kaas signature, the array arguments, and the CUBIN."""
    try:
        import numba.cuda
    except ImportError as exc:
        raise errors.CompileError(f"tenantlib.numba needs numba-cuda (pip install 'kaas[numba]'): {exc}",
                                  detail={"log": str(exc)}) from None
    pyfunc = getattr(fn, "py_func", fn)
    if not callable(pyfunc):
        raise errors.InvalidArgument("compile takes a Python function or a @cuda.jit kernel")
    cc = parse_arch(arch or "sm_90")
    names = list(inspect.signature(pyfunc).parameters)
    types = _numba_types(signature)
    if len(types) != len(names):
        raise errors.ArgumentError(f"{pyfunc.__name__} takes {len(names)} parameter(s), the signature gives "
                                   f"{len(types)}")
    params, arrays = _spec_params(pyfunc.__name__, names, types, access or {})
    try:
        ptx, _ = numba.cuda.compile(pyfunc, signature, device=False, cc=cc, abi="numba", output="ptx",
                                    fastmath=fastmath)
    except Exception as exc:  # Numba's typing and lowering errors are of many types; the tenant gets one
        raise errors.CompileError(f"Numba could not compile {pyfunc.__name__}: {exc}", detail={"log": str(exc)}) from None
    cubin = link_ptx(ptx.encode(), f"sm_{cc[0]}{cc[1]}", "numba.ptx")
    entries = read_cubin(cubin)
    if len(entries) != 1:
        raise errors.CompileError(f"expected one kernel in Numba's CUBIN, found {len(entries)}", detail={"log": ""})
    (mangled,) = entries
    spec = KernelSpec(mangled, tuple(params), host)
    check_binary(spec, entries[mangled])  # the array ABI laid out as expected
    return spec, tuple(arrays), cubin


def compile(client: Any, fn: Any, signature: str | Any, *, access: Mapping[str, str] | None = None,
            arch: str = "", host: str = "", fastmath: bool = False) -> NumbaKernel:
    """Compile ``fn`` (a ``@cuda.jit`` kernel or its Python function) for the broker's GPUs and
    register it.  ``signature`` is Numba's (``"void(float32, float32[::1])"``); ``access``
    narrows array parameters to ``in`` or ``out``; ``host`` names a host implementation for the
    CPU device."""
    spec, arrays, cubin = build(fn, signature, arch=arch or getattr(client, "arch", ""), access=access, host=host,
                                fastmath=fastmath)
    name = getattr(getattr(fn, "py_func", fn), "__name__", "kernel")
    lib = client.library(cubin, kernels=[spec], format="cubin", name=f"numba:{name}")
    return NumbaKernel(lib, lib[spec.name], arrays=arrays)
