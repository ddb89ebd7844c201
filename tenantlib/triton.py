"""Triton kernels on kaas: compile a ``@triton.jit`` function here, run it through the broker.

    import triton, triton.language as tl
    from tenantlib import triton as kt

    @triton.jit
    def add(x, y, out, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + offs, tl.load(x + offs, mask=offs < n) + tl.load(y + offs, mask=offs < n), mask=offs < n)

    k = kt.compile(client, add, {"x": "*fp32", "y": "*fp32", "out": "*fp32", "n": "i32"},
                   constexprs={"BLOCK": 1024}, access={"out": "out"})
    g = client.graph()
    k[(n + 1023) // 1024,](g, x, y, z, n)     # as Triton's kernel[grid](...), onto a graph
    client.run(g)

Compilation needs Triton (``pip install kaas[triton]``) and no GPU: the CUBIN is built for the
broker's GPU architecture (from its welcome; ``sm_90`` when it has none) and registered like any
CUBIN, with a signature kaas writes from Triton's: ``*fp32`` is a float32 buffer (read and
written unless ``access=`` narrows it), ``i32`` an i32 literal, and so on.  What Triton's own
launcher adds is handled here: the block is ``32 x num_warps`` threads, dynamic shared memory is
what the compiler reports (above 48 KiB too), and the two hidden pointer parameters (global and
profile scratch) get a per-launch temporary buffer of the size the compiler asks for, or NULL.
Every pointer parameter is compiled as 16-byte aligned (Triton's ``tt.divisibility``), which
kaas keeps: each buffer on a GPU starts at a multiple of 256 bytes.  ``divisible={"n": 16}``
promises the same of an integer argument, and each launch checks it.  Multi-CTA (cluster),
cooperative, PDL and tensor-descriptor (TMA) kernels are refused, naming the feature.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker import errors
from broker.protocol import KernelSpec, Param
from broker.streams.cubin import read_cubin
from broker.streams.signatures import check_binary

from .graph import BufferRef, Graph, Kernel, Library
from .kernel_specs import parse_arch

__all__ = ["TritonKernel", "compile", "kernel_spec"]

_POINTEE = {"fp32": "float32", "fp16": "float16", "fp64": "float64", "i8": "int8", "i16": "int16", "i32": "int32",
            "i64": "int64", "u8": "uint8", "u16": "uint16", "u32": "uint32", "u64": "uint64", "i1": "uint8",
            "bf16": "", "fp8e4nv": "", "fp8e5": ""}
_SCALAR = {"i32": "i32", "u32": "u32", "i64": "i64", "u64": "u64", "fp32": "f32", "fp64": "f64"}
_HIDDEN = ("global_scratch", "profile_scratch")


def kernel_spec(name: str, signature: Mapping[str, str], access: Mapping[str, str] | None = None,
                host: str = "", scratch: Sequence[int] = (0, 0)) -> KernelSpec:
    """The kaas signature of a Triton kernel with this (non-constexpr) Triton signature, and its
    hidden scratch pointers last (Triton 3.9 has two: global and profile scratch; ``scratch``
    gives each one's bytes per program): a byte buffer where the compiler asked for scratch,
    else a u64 that is always 0 (NULL)."""
    access = dict(access or {})
    params: list[Param] = []
    for pname, ty in signature.items():
        where = f"parameter {pname!r} of Triton kernel {name!r}"
        if ty.startswith("*"):
            base = ty[1:].removeprefix("k")  # "*k" marks a const pointer in some Triton versions
            if base not in _POINTEE:
                raise errors.UnsupportedFeature(f"{where} points to {base}, which kaas does not know",
                                                detail={"kernel": name, "param": pname, "feature": "parameter type"})
            mode = access.pop(pname, "inout")
            if mode not in ("in", "out", "inout"):
                raise errors.InvalidArgument(f"access of {pname!r} must be in, out or inout, got {mode!r}")
            params.append(Param(pname, "buf", mode, _POINTEE[base]))
        elif ty in _SCALAR:
            params.append(Param(pname, _SCALAR[ty]))
        elif ty == "constexpr":
            continue
        else:
            raise errors.UnsupportedFeature(
                f"{where} is a {ty} scalar; kaas passes i32, u32, i64, u64, fp32 and fp64 scalars (make it "
                "a constexpr or one of those)", detail={"kernel": name, "param": pname, "feature": "parameter type"})
    if access:
        raise errors.SignatureMismatch(f"access= names {sorted(access)[0]!r}, which is not a pointer parameter of "
                                       f"Triton kernel {name!r}", detail={"kernel": name, "param": sorted(access)[0]})
    if len(scratch) > len(_HIDDEN):
        raise errors.CompileError(f"Triton kernel {name!r} has {len(scratch)} hidden parameters; this tenantlib "
                                  f"knows {len(_HIDDEN)} ({', '.join(_HIDDEN)})", detail={"log": ""})
    params += [Param(h, "buf", "inout", "uint8") if size else Param(h, "u64")
               for h, size in zip(_HIDDEN, scratch, strict=False)]
    return KernelSpec(name, tuple(params), host)


@dataclass(frozen=True)
class TritonKernel(Kernel):
    """A compiled and registered Triton kernel: ``kernel[grid](graph, *args)`` appends a launch."""

    block: int = 0
    shared: int = 0
    scratch: tuple[tuple[int, int], ...] = ()  # (bytes per program, alignment) per hidden pointer
    divisible: Mapping[str, int] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def __getitem__(self, grid: int | Sequence[int]) -> Callable[..., int]:
        def launch(graph: Graph, *args: Any, after: Sequence[int] = ()) -> int:
            return self.launch(graph, grid, *args, after=after)
        return launch

    def launch(self, graph: Graph, grid: int | Sequence[int], *args: Any, after: Sequence[int] = ()) -> int:
        """Append one launch of this kernel to ``graph`` (the tenant's arguments only)."""
        user = self.spec.params[:len(self.spec.params) - len(self.scratch)]
        if len(args) != len(user):
            raise errors.ArgumentError(f"{self.signature()} takes {len(user)} argument(s), got {len(args)}")
        for p, a in zip(user, args, strict=True):
            d = self.divisible.get(p.name)
            if d and isinstance(a, (int, np.integer)) and int(a) % d:
                raise errors.ArgumentError(f"argument {p.name!r} of Triton kernel {self.name!r} was compiled as a "
                                           f"multiple of {d}; {a} is not")
        dims = (grid,) if isinstance(grid, int) else tuple(grid)
        programs = math.prod(int(x) for x in dims)
        hidden: list[BufferRef | int] = []
        for per, align in self.scratch:  # a temp buffer starts at a multiple of 256 bytes: aligned enough
            if per and align > 256:
                raise errors.UnsupportedFeature(f"Triton kernel {self.name!r} asks for scratch aligned to {align} bytes")
            hidden.append(graph.temp((programs * per,), np.uint8) if per else 0)
        return graph.launch(self, dims, self.block, *args, *hidden, shared=self.shared, after=after)


def compile(client: Any, fn: Any, signature: Mapping[str, str], *, constexprs: Mapping[str, Any] | None = None,
            num_warps: int = 4, num_stages: int = 3, access: Mapping[str, str] | None = None,
            divisible: Mapping[str, int] | None = None, arch: str = "", host: str = "",
            options: Mapping[str, Any] | None = None) -> TritonKernel:
    """Compile ``fn`` (a ``@triton.jit`` function) for the broker's GPUs and register it.

    ``signature`` gives each non-constexpr parameter's Triton type (``*fp32``, ``i32``, ...),
    ``constexprs`` the compile-time values.  ``access`` narrows pointer parameters to ``in`` or
    ``out``; ``divisible`` promises integer arguments are multiples of 16 (Triton's
    specialisation, checked at each launch); ``host`` names a host implementation for the CPU
    device; ``options`` go to ``triton.compile`` as they are (floating-point contraction is on,
    Triton's default up to 3.9, unless ``options={"enable_fp_fusion": False}``).
    """
    spec, meta = build(fn, signature, constexprs=constexprs, num_warps=num_warps, num_stages=num_stages,
                            access=access, divisible=divisible, arch=arch or getattr(client, "arch", ""),
                            host=host, options=options)
    registered = client.library(meta.pop("cubin"), kernels=[spec], format="cubin", name=f"triton:{spec.name}")
    return _kernel(registered, spec, meta, divisible)


def build(fn: Any, signature: Mapping[str, str], *, constexprs: Mapping[str, Any] | None = None,
          num_warps: int = 4, num_stages: int = 3, access: Mapping[str, str] | None = None,
          divisible: Mapping[str, int] | None = None, arch: str = "", host: str = "",
          options: Mapping[str, Any] | None = None) -> tuple[KernelSpec, dict[str, Any]]:
    """Compile without registering: the kaas signature, and Triton's metadata with the ``cubin``."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        raise errors.CompileError(f"tenantlib.triton needs Triton (pip install 'kaas[triton]'): {exc}",
                                  detail={"log": str(exc)}) from None
    names = list(getattr(fn, "arg_names", ()))
    if not names:
        raise errors.InvalidArgument("compile takes a @triton.jit function")
    constexprs = dict(constexprs or {})
    divisible = dict(divisible or {})
    full: dict[str, str] = {}
    for n in names:
        if n in constexprs:
            full[n] = "constexpr"
        elif n in signature:
            full[n] = signature[n]
        else:
            raise errors.ArgumentError(f"parameter {n!r} of {fn.__name__} has no type in signature= and no value "
                                       "in constexprs=")
    extra = set(signature) - set(names) or set(constexprs) - set(names) or set(divisible) - set(names)
    if extra:
        raise errors.ArgumentError(f"{fn.__name__} has no parameter {sorted(extra)[0]!r} (it has: {', '.join(names)})")
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, n in enumerate(names):
        ty = full[n]
        if ty.startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]  # every kaas buffer starts at a multiple of 256 bytes
        elif n in divisible:
            if divisible[n] != 16 or ty not in ("i32", "i64", "u32", "u64"):
                raise errors.ArgumentError(f"divisible= takes 16 for integer parameters (Triton's only "
                                           f"specialisation), got {n}={divisible[n]} for a {ty}")
            attrs[(i,)] = [["tt.divisibility", 16]]
    kernel_spec(fn.__name__, {n: full[n] for n in names if full[n] != "constexpr"}, access, host)  # refuse early
    major, minor = parse_arch(arch or "sm_90")
    target = GPUTarget("cuda", 10 * major + minor, 32)
    try:
        compiled = triton.compile(ASTSource(fn, full, constexprs, attrs), target=target,
                                  options={"num_warps": num_warps, "num_stages": num_stages,
                                           "enable_fp_fusion": True, **dict(options or {})})
    except Exception as exc:  # Triton's compile errors are of many types; the tenant gets one
        raise errors.CompileError(f"Triton could not compile {fn.__name__} for {target}: {exc}",
                                  detail={"log": str(exc)}) from None
    md = compiled.metadata
    meta = {k: getattr(md, k) for k in ("name", "num_warps", "num_ctas", "shared", "global_scratch_size",
                                         "global_scratch_align", "profile_scratch_size", "profile_scratch_align",
                                         "launch_cooperative_grid", "launch_pdl", "tensordesc_meta")
            if hasattr(md, k)}
    _refuse_features(fn.__name__, meta)
    cubin = bytes(compiled.asm["cubin"])
    entries = read_cubin(cubin)
    entry = entries.get(str(meta["name"]))
    if entry is None:
        raise errors.CompileError(f"Triton's CUBIN has no kernel {meta['name']!r}", detail={"log": ""})
    user = {n: full[n] for n in names if full[n] != "constexpr"}
    sizes = [int(meta.get("global_scratch_size", 0)), int(meta.get("profile_scratch_size", 0))]
    hidden = len(entry.params) - len(user)  # Triton 3.9 appends two; older versions fewer
    if not 0 <= hidden <= len(sizes):
        raise errors.CompileError(f"Triton's {meta['name']} takes {len(entry.params)} parameters for {len(user)} "
                                  "declared ones: this Triton lays out parameters in a way tenantlib does not know",
                                  detail={"log": ""})
    meta["hidden"] = hidden
    spec = kernel_spec(str(meta["name"]), user, access, host, sizes[:hidden])
    check_binary(spec, entry)  # sizes agree, hidden parameters included
    meta["cubin"] = cubin
    return spec, meta


def _refuse_features(name: str, meta: Mapping[str, Any]) -> None:
    for key, feature in (("launch_cooperative_grid", "cooperative launches"),
                         ("launch_pdl", "programmatic dependent launch (PDL)"),
                         ("tensordesc_meta", "tensor descriptors (TMA)")):
        if meta.get(key):
            raise errors.UnsupportedFeature(f"Triton kernel {name!r} needs {feature}, which kaas does not support yet",
                                            detail={"kernel": name, "feature": feature})
    if int(meta.get("num_ctas", 1)) != 1:
        raise errors.UnsupportedFeature(f"Triton kernel {name!r} was compiled with num_ctas={meta['num_ctas']} "
                                        "(thread-block clusters), which kaas does not support yet",
                                        detail={"kernel": name, "feature": "thread-block clusters"})


def _kernel(lib: Library, spec: KernelSpec, meta: dict[str, Any], divisible: Mapping[str, int] | None) -> TritonKernel:
    return TritonKernel(lib, lib[spec.name], block=32 * int(meta["num_warps"]), shared=int(meta.get("shared", 0)),
                        scratch=((int(meta.get("global_scratch_size", 0)), int(meta.get("global_scratch_align", 1))),
                                 (int(meta.get("profile_scratch_size", 0)),
                                  int(meta.get("profile_scratch_align", 1))))[:int(meta["hidden"])],
                        divisible=dict(divisible or {}), metadata=meta)
