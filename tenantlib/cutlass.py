"""CUTLASS GEMMs for graphs, compiled here by NVRTC from the CUTLASS headers on PyPI.

    from tenantlib.cutlass import CutlassGemm
    gemm = CutlassGemm(client, "float16")     # fp16 inputs, fp32 accumulate and fp32 C
    g = client.graph()
    gemm(g, g.input(a), g.input(b), g.output(c), alpha=1.0, beta=0.0)
    client.run(g)

Each GEMM is a CUTLASS 2.x kernel-level GEMM (``cutlass::gemm::kernel::DefaultGemm``, row-major
A, B and C) behind an ``extern "C"`` wrapper that takes plain pointers and scalars and builds the
kernel's parameters on the device, so kaas launches it like any kernel: fp32 on the SIMT cores
(128x128x8 tiles, 256 threads) and fp16 on the tensor cores (128x128x32 tiles, 3 stages, 128
threads; K and N must be multiples of 8).  The block size and the shared memory a launch needs
are read from the compiled CUBIN (``__constant__`` values the wrapper exports).

Needs ``pip install 'kaas[cutlass]'``: ``nvidia-cutlass`` 4.2 (its headers) and the CUDA headers
it includes, of which CCCL must be 13.0 (``nvidia-cuda-cccl==13.0.*``): the CUTLASS 4.2 headers do
not build against newer CCCL (seen with CCCL 3.5, from nvidia-cuda-cccl 13.3.5).  Compiling takes ~5 s per kernel on
a CPU and is cached on disk.  Hopper TMA (CUTLASS 3.x) GEMMs need host-encoded tensor maps and
are not offered.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker import errors
from broker.protocol import KernelSpec, Param
from broker.streams.cubin import read_cubin, read_symbol
from broker.streams.signatures import check_binary

from .graph import BufferRef, Graph, Kernel, Library

__all__ = ["CutlassGemm", "build", "include_dirs"]

_CCCL_WANT = (3, 0)  # CCCL of CUDA 13.0, what CUTLASS 4.2's headers build with

_SOURCE = r"""
#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"
#include "cutlass/gemm/kernel/default_gemm.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cutlass/epilogue/thread/linear_combination.h"

using RowMajor = cutlass::layout::RowMajor;
using Swizzle = cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<1>;
using Epilogue = cutlass::epilogue::thread::LinearCombination<float, @EPI_VEC@, float, float>;
using Tile = cutlass::gemm::GemmShape<@TILE@>;
using GemmKernel = typename cutlass::gemm::kernel::DefaultGemm<
    @IN@, RowMajor, @ALIGN@, @IN@, RowMajor, @ALIGN@, float, RowMajor, float,
    cutlass::arch::@CLASS@, cutlass::arch::Sm80, Tile, cutlass::gemm::GemmShape<@WARP@>,
    cutlass::gemm::GemmShape<@INST@>, Epilogue, Swizzle, @STAGES@, false, cutlass::arch::OpMultiplyAdd>::GemmKernel;

extern "C" __global__ void __launch_bounds__(GemmKernel::kThreadCount)
@NAME@(const @IN@* A, const @IN@* B, float* C, int M, int N, int K, float alpha, float beta) {
  extern __shared__ __align__(16) char smem[];
  cutlass::gemm::GemmCoord problem(M, N, K);
  cutlass::gemm::GemmCoord tiled = Swizzle().get_tiled_shape(problem, {Tile::kM, Tile::kN, Tile::kK}, 1);
  typename GemmKernel::Params params(problem, tiled, {const_cast<@IN@*>(A), RowMajor(K)},
                                     {const_cast<@IN@*>(B), RowMajor(N)}, {C, RowMajor(N)}, {C, RowMajor(N)},
                                     typename Epilogue::Params(alpha, beta), nullptr);
  GemmKernel op;
  op(params, *reinterpret_cast<typename GemmKernel::SharedStorage*>(smem));
}
extern "C" __constant__ int @NAME@_shared_bytes = int(sizeof(typename GemmKernel::SharedStorage));
extern "C" __constant__ int @NAME@_threads = GemmKernel::kThreadCount;
extern "C" __constant__ int @NAME@_tile_m = Tile::kM;
extern "C" __constant__ int @NAME@_tile_n = Tile::kN;
"""

# dtype -> template values and the kernel's A/B element alignment (elements)
_VARIANTS = {
    "float32": {"NAME": "kaas_cutlass_sgemm", "IN": "float", "ALIGN": "1", "EPI_VEC": "1", "TILE": "128, 128, 8",
                "WARP": "32, 64, 8", "INST": "1, 1, 1", "CLASS": "OpClassSimt", "STAGES": "2"},
    "float16": {"NAME": "kaas_cutlass_hgemm", "IN": "cutlass::half_t", "ALIGN": "8", "EPI_VEC": "4",
                "TILE": "128, 128, 32", "WARP": "64, 64, 32", "INST": "16, 8, 16", "CLASS": "OpClassTensorOp",
                "STAGES": "3"},
}


def _cccl_version(include: Path) -> tuple[int, int] | None:
    try:
        text = (include / "cccl" / "cuda" / "std" / "__cccl" / "version.h").read_text()
    except OSError:
        return None
    m = re.search(r"#define\s+CCCL_VERSION\s+(\d+)", text)
    if m is None:
        return None
    v = int(m.group(1))
    return v // 1_000_000, (v // 1000) % 1000


def include_dirs() -> tuple[tuple[str, ...], str]:
    """(the -I directories CUTLASS needs, a key naming their versions); a clear error when absent."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or spec.origin is None:
        raise errors.CompileError("tenantlib.cutlass needs the CUTLASS headers: pip install 'kaas[cutlass]'",
                                  detail={"log": ""})
    cutlass = Path(spec.origin).parent / "source" / "include"
    if not (cutlass / "cutlass" / "cutlass.h").is_file():
        raise errors.CompileError(f"no CUTLASS headers under {cutlass}", detail={"log": ""})
    nvidia = importlib.util.find_spec("nvidia")
    roots = [Path(p) / "cu13" / "include" for p in (nvidia.submodule_search_locations or [])] if nvidia else []
    found = {r: _cccl_version(r) for r in roots if r.is_dir()}
    cccl = next((r for r, v in found.items() if v == _CCCL_WANT), None)
    if cccl is None:
        seen = ", ".join(f"{'.'.join(map(str, v))} in {r}" for r, v in found.items() if v) or "none"
        raise errors.CompileError(
            "the CUTLASS 4.2 headers build only with CCCL 3.0 (CUDA 13.0's): pip install 'nvidia-cuda-cccl==13.0.*' "
            f"(CCCL found: {seen})", detail={"log": ""})
    runtime = next((r for r in roots if (r / "cuda_fp16.h").is_file() and (r / "crt").is_dir()), None)
    if runtime is None:
        raise errors.CompileError("CUTLASS needs the CUDA headers cuda_fp16.h and crt/: pip install "
                                  "nvidia-cuda-runtime nvidia-cuda-crt", detail={"log": ""})
    dirs = [str(cccl), str(cccl / "cccl"), str(cutlass)]
    if runtime != cccl:
        dirs.append(str(runtime))
    from importlib.metadata import version

    key = f"cutlass={version('nvidia-cutlass')};cccl={'.'.join(map(str, _CCCL_WANT))};dirs={os.pathsep.join(dirs)}"
    return tuple(dirs), key


@dataclass(frozen=True)
class _Built:
    spec: KernelSpec
    cubin: bytes
    threads: int
    shared: int
    tile: tuple[int, int]


def build(dtype: str, arch: str = "sm_90") -> _Built:
    """Compile the GEMM for ``dtype`` ("float32" or "float16") without registering it."""
    from broker.streams.compiler import CompileCache, nvrtc_available

    if dtype not in _VARIANTS:
        raise errors.InvalidArgument(f"CutlassGemm takes dtype float32 or float16, got {dtype!r}")
    if not nvrtc_available():
        raise errors.CompileError("tenantlib.cutlass needs NVRTC (pip install nvidia-cuda-nvrtc)", detail={"log": ""})
    values = _VARIANTS[dtype]
    source = _SOURCE
    for k, v in values.items():
        source = source.replace(f"@{k}@", v)
    dirs, key = include_dirs()
    cubin, _ = CompileCache().compile(source.encode(), arch, ("-std=c++17",), "cutlass_gemm.cu", dirs, key)
    name = values["NAME"]

    def const(what: str) -> int:
        return int.from_bytes(read_symbol(cubin, f"{name}_{what}")[:4], "little", signed=True)

    ab = "float16" if dtype == "float16" else "float32"
    spec = KernelSpec(name, (Param("A", "buf", "in", ab), Param("B", "buf", "in", ab),
                             Param("C", "buf", "inout", "float32"), Param("M", "i32"), Param("N", "i32"),
                             Param("K", "i32"), Param("alpha", "f32"), Param("beta", "f32")))
    check_binary(spec, read_cubin(cubin)[name])
    return _Built(spec, cubin, const("threads"), const("shared_bytes"), (const("tile_m"), const("tile_n")))


class CutlassGemm:
    """``C = alpha * A @ B + beta * C`` (C in fp32) as one CUTLASS kernel of a graph."""

    def __init__(self, client: Any, dtype: str = "float32", *, host: str = "") -> None:
        """Compile (cached) and register the GEMM; ``host`` names a host implementation for the CPU device."""
        built = build(dtype, getattr(client, "arch", "") or "sm_90")
        self.dtype = dtype
        self.block = built.threads
        self.shared = built.shared
        self.tile = built.tile
        spec = KernelSpec(built.spec.name, built.spec.params, host)
        lib: Library = client.library(built.cubin, kernels=[spec], format="cubin", name=f"cutlass:{dtype}")
        self.kernel = Kernel(lib, lib[spec.name])

    def __call__(self, graph: Graph, a: BufferRef, b: BufferRef, c: BufferRef, *, alpha: float = 1.0,
                 beta: float = 0.0) -> int:
        """Append the product to ``graph``; returns the kernel's index."""
        for name, ref, dt in (("A", a, self.dtype), ("B", b, self.dtype), ("C", c, "float32")):
            if not isinstance(ref, BufferRef) or len(ref.shape) != 2:
                raise errors.ArgumentError(f"cutlass gemm: {name} must be a 2-D buffer of the graph")
            if ref.dtype != dt:
                raise errors.DtypeMismatch(f"cutlass gemm: {name} is {ref.dtype}, expected {dt}")
        (m, k), (k2, n), (m2, n2) = a.shape, b.shape, c.shape
        if k != k2 or m != m2 or n != n2:
            raise errors.ArgumentError(f"cutlass gemm: shapes A{a.shape} @ B{b.shape} -> C{c.shape} do not match")
        if self.dtype == "float16" and (k % 8 or n % 8):
            raise errors.ArgumentError(f"cutlass fp16 gemm: K ({k}) and N ({n}) must be multiples of 8")
        tm, tn = self.tile
        grid = (-(-m // tm), -(-n // tn), 1)
        return graph.launch(self.kernel, grid, self.block, a, b, c, m, n, k, float(alpha), float(beta),
                            shared=self.shared)
