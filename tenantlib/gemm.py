"""A BLAS-class GEMM for graphs: ``C = alpha * A @ B + beta * C`` in fp32 or fp16 (tensor cores).

    from tenantlib.gemm import Gemm
    gemm = Gemm(client, "float16")              # compiled once per client (Triton, no GPU needed)
    g = client.graph()
    gemm(g, g.input(a), g.input(b), g.output(c), alpha=1.0, beta=0.0)
    client.run(g)

A, B and C are row-major and contiguous, of shapes (M, K), (K, N) and (M, N); fp16 inputs
accumulate in fp32 and round once into C.  fp32 uses exact IEEE products by default
(``precision="tf32"`` trades accuracy for tensor cores).  It is Triton's tiled matrix product
(grouped tile order for L2 reuse) compiled through ``tenantlib.triton``: Triton is an extra
(``pip install 'kaas[triton]'``).  ``tenantlib.cutlass`` has CUTLASS's GEMMs; this one was the
faster fp16 GEMM on an H200 (``bench/RESULTS.md``).
"""

from __future__ import annotations

from typing import Any

from broker import errors

from . import triton as kt
from .graph import BufferRef, Graph

__all__ = ["Gemm"]

# Tiles per dtype: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).  The fp16 tile (Triton's
# tutorial choice for Hopper) takes over 96 KiB of shared memory with its three stages, above
# the 48 KiB a launch gets without opting in.
_TILES = {"float16": (128, 256, 64, 8, 3), "float32": (128, 128, 32, 8, 3)}
_TRITON = {"float16": "*fp16", "float32": "*fp32"}


def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def kaas_gemm(a, b, c, M, N, K, alpha, beta, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr, BETA_ZERO: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_n
        first_m = (pid // in_group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % size_m)
        pid_n = (pid % in_group) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        # Rows past M (columns past N) wrap around and are never stored.  A modulo, not a
        # select: with N a multiple of 16 Triton then knows runs of 16 columns are contiguous
        # and vectorises the loads (a select hides that: 16x slower on an H200).
        am = rm % M
        bn = rn % N
        a_ptrs = a + am[:, None] * K + rk[None, :]
        b_ptrs = b + rk[:, None] * N + bn[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            left = K - k * BLOCK_K
            x = tl.load(a_ptrs, mask=rk[None, :] < left, other=0.0)
            y = tl.load(b_ptrs, mask=rk[:, None] < left, other=0.0)
            acc = tl.dot(x, y, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * N
        c_ptrs = c + rm[:, None] * N + rn[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        acc = acc * alpha
        if not BETA_ZERO:
            acc += beta * tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(c_ptrs, acc.to(c.dtype.element_ty), mask=mask)

    return kaas_gemm


class Gemm:
    """``C = alpha * A @ B + beta * C`` as one kernel of a graph (see the module docstring).

    Each variant is compiled on first use: with ``beta == 0`` or not (C only written, or read
    too), and with M, N and K multiples of 16 or not (then Triton may assume aligned rows and
    pipelines the loads through shared memory: ~2-3x faster).
    """

    def __init__(self, client: Any, dtype: str = "float32", *, precision: str = "ieee") -> None:
        if dtype not in _TILES:
            raise errors.InvalidArgument(f"Gemm takes dtype float32 or float16, got {dtype!r}")
        if precision not in ("ieee", "tf32", "tf32x3"):
            raise errors.InvalidArgument(f"precision must be ieee, tf32 or tf32x3, got {precision!r}")
        self.client = client
        self.dtype = dtype
        self.precision = precision if dtype == "float32" else "tf32"
        self.tile = _TILES[dtype][:2]
        self._kernels: dict[tuple[bool, bool], kt.TritonKernel] = {}

    def kernel(self, beta_zero: bool, aligned: bool) -> kt.TritonKernel:
        """The compiled variant (see the class docstring)."""
        key = (beta_zero, aligned)
        k = self._kernels.get(key)
        if k is None:
            bm, bn, bk, warps, stages = _TILES[self.dtype]
            p = _TRITON[self.dtype]
            sig = {"a": p, "b": p, "c": p, "M": "i32", "N": "i32", "K": "i32", "alpha": "fp32", "beta": "fp32"}
            k = self._kernels[key] = kt.compile(
                self.client, _kernel(), sig, num_warps=warps, num_stages=stages,
                constexprs={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "PRECISION": self.precision,
                            "BETA_ZERO": beta_zero},
                access={"a": "in", "b": "in", "c": "out" if beta_zero else "inout"},
                divisible={"M": 16, "N": 16, "K": 16} if aligned else None)
        return k

    def __call__(self, graph: Graph, a: BufferRef, b: BufferRef, c: BufferRef, *, alpha: float = 1.0,
                 beta: float = 0.0) -> int:
        """Append the product to ``graph``; returns the kernel's index."""
        for name, ref in (("A", a), ("B", b), ("C", c)):
            if not isinstance(ref, BufferRef) or len(ref.shape) != 2:
                raise errors.ArgumentError(f"gemm: {name} must be a 2-D buffer of the graph")
            if ref.dtype != self.dtype:
                raise errors.DtypeMismatch(f"gemm: {name} is {ref.dtype}, this Gemm is {self.dtype}")
        (m, k), (k2, n), (m2, n2) = a.shape, b.shape, c.shape
        if k != k2 or m != m2 or n != n2:
            raise errors.ArgumentError(f"gemm: shapes A{a.shape} @ B{b.shape} -> C{c.shape} do not match")
        bm, bn = self.tile
        grid = (-(-m // bm) * -(-n // bn),)
        kernel = self.kernel(beta == 0, m % 16 == 0 and n % 16 == 0 and k % 16 == 0)
        return kernel[grid](graph, a, b, c, m, n, k, float(alpha), float(beta))
