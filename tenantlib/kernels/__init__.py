"""kaas-std: the standard kernel library every tenant can use without writing CUDA.

One CUDA C source (``SOURCE``, compiled by the broker's NVRTC for each device) with the
signature of each kernel (``KERNELS``); each kernel names a numpy host implementation in
``tenantlib.kernels.host`` that the CPU device runs and that computes the same function.

=================  ==============================================================  =====================
kernel             parameters                                                      launch
=================  ==============================================================  =====================
``null``           (none)                                                          ``(1,1,1), (1,1,1)``
``vadd``           ``a`` in f32, ``b`` in f32, ``c`` out f32, ``n`` i32            ``launch_1d(n)``
``axpy``           ``alpha`` f32, ``x`` in f32, ``y`` inout f32, ``n`` i32         ``launch_1d(n)``
``sgemm``          ``A`` in, ``B`` in, ``C`` out (f32), ``M``, ``N``, ``K`` i32    ``sgemm_launch(M, N)``
``reduce_partial`` ``x`` in f32, ``partial`` out f32, ``n`` i32                    ``reduce_launch(n)``
``reduce_final``   ``partial`` in f32, ``out`` out f32, ``m`` i32                  ``reduce_final_launch()``
``jacobi2d``       ``u`` in f32, ``v`` out f32, ``nx``, ``ny`` i32                 ``jacobi_launch(nx, ny)``
``bias_relu``      ``x`` in, ``bias`` in, ``y`` out (f32), ``rows``, ``cols`` i32  ``launch_1d(rows * cols)``
=================  ==============================================================  =====================

What each kernel promises about its launch:

- ``vadd``, ``axpy``, ``jacobi2d``, ``bias_relu`` cover their whole index range exactly once
  whatever grid and block they get (grid-stride loops); the helpers only pick a good shape.
- ``sgemm`` needs block ``(16, 16, 1)`` and covers all of ``C`` with any grid (it strides over
  tiles). ``reduce_partial`` and ``reduce_final`` need block ``(256, 1, 1)``: their shared
  memory is sized for it. With another block the CUDA kernel traps (a kernel fault, so the
  request fails) and the host implementation raises ValueError.
- The sum is deterministic: ``reduce_partial`` with grid ``(G, 1, 1)`` writes ``partial[0:G]``,
  thread ``t`` of block ``b`` adding ``x[i]`` for ``i = b*256 + t + k*G*256`` in order of ``k``,
  then a fixed shared-memory tree; ``reduce_final`` does the same with one block into
  ``out[0]``. The same grid gives the same bits on every run, on CPU and GPU alike.
- ``vadd``, ``axpy``, the sum, ``jacobi2d`` and ``bias_relu`` round exactly as the numpy host implementations
  do (no FMA contraction), so CPU and GPU results are equal; ``sgemm`` agrees up to float32
  rounding (its summation order differs from BLAS).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from broker.protocol import KernelSpec, Param

__all__ = [
    "KERNELS",
    "NAME",
    "REDUCE_BLOCK",
    "SOURCE",
    "TILE",
    "Dim3",
    "Launch",
    "jacobi_launch",
    "launch_1d",
    "library",
    "reduce_final_launch",
    "reduce_launch",
    "ref_axpy",
    "ref_bias_relu",
    "ref_jacobi",
    "ref_sgemm",
    "ref_sum",
    "ref_vadd",
    "sgemm_launch",
]

NAME = "kaas-std"
TILE = 16  # sgemm's shared-memory tile edge, and its block is TILE x TILE
REDUCE_BLOCK = 256  # the block size reduce_partial and reduce_final are written for
_MAX_GRID_X = 2**31 - 1
_MAX_GRID_YZ = 65535

Dim3 = tuple[int, int, int]
Launch = tuple[Dim3, Dim3]

SOURCE = r"""
// kaas-std: the standard kernel library of kaas (tenantlib.kernels).
// Every kernel is extern "C" so its symbol in the CUBIN is its plain name.

#define KAAS_TILE 16
#define KAAS_REDUCE_BLOCK 256

// The rank of this thread among all threads of the launch, and their number: lets the
// elementwise kernels cover [0, n) exactly once whatever grid and block they are given.
__device__ __forceinline__ long long kaas_rank() {
    long long blk = ((long long)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    long long thr = ((long long)threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    return blk * ((long long)blockDim.x * blockDim.y * blockDim.z) + thr;
}

__device__ __forceinline__ long long kaas_nthreads() {
    return (long long)gridDim.x * gridDim.y * gridDim.z * blockDim.x * blockDim.y * blockDim.z;
}

// Does nothing: the floor of launch latency.
extern "C" __global__ void null(void) {}

// c[i] = a[i] + b[i] for i < n.
extern "C" __global__ void vadd(const float* a, const float* b, float* c, int n) {
    const long long stride = kaas_nthreads();
    for (long long i = kaas_rank(); i < n; i += stride) c[i] = a[i] + b[i];
}

// y[i] = alpha * x[i] + y[i] for i < n, rounded twice (no FMA) like numpy.
extern "C" __global__ void axpy(float alpha, const float* x, float* y, int n) {
    const long long stride = kaas_nthreads();
    for (long long i = kaas_rank(); i < n; i += stride) y[i] = __fadd_rn(__fmul_rn(alpha, x[i]), y[i]);
}

// Row-major C[M x N] = A[M x K] @ B[K x N] through 16x16 shared-memory tiles.
// Block (16, 16, 1) only; any grid covers C, (ceil(N/16), ceil(M/16)) gives one tile per block.
extern "C" __global__ void sgemm(const float* A, const float* B, float* C, int M, int N, int K) {
    if (blockDim.x != KAAS_TILE || blockDim.y != KAAS_TILE || blockDim.z != 1) __trap();
    if (blockIdx.z != 0) return;
    __shared__ float As[KAAS_TILE][KAAS_TILE];
    __shared__ float Bs[KAAS_TILE][KAAS_TILE];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const long long tiles_m = ((long long)M + KAAS_TILE - 1) / KAAS_TILE;
    const long long tiles_n = ((long long)N + KAAS_TILE - 1) / KAAS_TILE;
    for (long long tm = blockIdx.y; tm < tiles_m; tm += gridDim.y) {
        for (long long tn = blockIdx.x; tn < tiles_n; tn += gridDim.x) {
            const long long row = tm * KAAS_TILE + ty, col = tn * KAAS_TILE + tx;
            float acc = 0.0f;
            for (long long k0 = 0; k0 < K; k0 += KAAS_TILE) {
                As[ty][tx] = (row < M && k0 + tx < K) ? A[row * K + k0 + tx] : 0.0f;
                Bs[ty][tx] = (k0 + ty < K && col < N) ? B[(k0 + ty) * N + col] : 0.0f;
                __syncthreads();
#pragma unroll
                for (int k = 0; k < KAAS_TILE; ++k) acc += As[ty][k] * Bs[k][tx];
                __syncthreads();
            }
            if (row < M && col < N) C[row * N + col] = acc;
        }
    }
}

// Sum of x[0..n) in one block: thread t adds x[first + t + k*stride] in order of k, then a
// fixed tree over shared memory. Fixed order, so the same launch always gives the same bits.
__device__ __forceinline__ float kaas_block_sum(const float* x, long long n, long long first, long long stride) {
    __shared__ float s[KAAS_REDUCE_BLOCK];
    const unsigned t = threadIdx.x;
    float acc = 0.0f;
    for (long long i = first + t; i < n; i += stride) acc += x[i];
    s[t] = acc;
    __syncthreads();
    for (unsigned h = KAAS_REDUCE_BLOCK / 2; h > 0; h >>= 1) {
        if (t < h) s[t] += s[t + h];
        __syncthreads();
    }
    return s[0];
}

// partial[b] = sum of x[i], i < n, over the grid-stride slice of block b (block 256 only).
extern "C" __global__ void reduce_partial(const float* x, float* partial, int n) {
    if (blockDim.x != KAAS_REDUCE_BLOCK || blockDim.y != 1 || blockDim.z != 1) __trap();
    if (blockIdx.y != 0 || blockIdx.z != 0) return;
    const float total = kaas_block_sum(x, n, (long long)blockIdx.x * KAAS_REDUCE_BLOCK,
                                       (long long)gridDim.x * KAAS_REDUCE_BLOCK);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// out[0] = sum of partial[0..m), by the first block alone (block 256 only).
extern "C" __global__ void reduce_final(const float* partial, float* out, int m) {
    if (blockDim.x != KAAS_REDUCE_BLOCK || blockDim.y != 1 || blockDim.z != 1) __trap();
    if (blockIdx.x != 0 || blockIdx.y != 0 || blockIdx.z != 0) return;
    const float total = kaas_block_sum(partial, m, 0, KAAS_REDUCE_BLOCK);
    if (threadIdx.x == 0) out[0] = total;
}

// One Jacobi step on a row-major ny x nx grid: interior points average their four neighbours,
// boundary points are copied. Any grid and block cover the whole grid.
extern "C" __global__ void jacobi2d(const float* u, float* v, int nx, int ny) {
    if (blockIdx.z != 0 || threadIdx.z != 0) return;
    const long long sx = (long long)gridDim.x * blockDim.x, sy = (long long)gridDim.y * blockDim.y;
    for (long long j = (long long)blockIdx.y * blockDim.y + threadIdx.y; j < ny; j += sy) {
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < nx; i += sx) {
            const long long p = j * nx + i;
            if (i == 0 || j == 0 || i == nx - 1 || j == ny - 1) {
                v[p] = u[p];
            } else {
                v[p] = 0.25f * (((u[p - nx] + u[p + nx]) + u[p - 1]) + u[p + 1]);
            }
        }
    }
}

// y[r][c] = max(x[r][c] + bias[c], 0) over a row-major rows x cols matrix: one layer's bias and
// ReLU after an sgemm. fmaxf, so a NaN sum gives 0 as numpy's fmax does.
extern "C" __global__ void bias_relu(const float* x, const float* bias, float* y, int rows, int cols) {
    if (rows <= 0 || cols <= 0) return;
    const long long n = (long long)rows * cols, stride = kaas_nthreads();
    for (long long i = kaas_rank(); i < n; i += stride) y[i] = fmaxf(x[i] + bias[i % cols], 0.0f);
}
"""


def _buf(name: str, access: str) -> Param:
    return Param(name, "buf", access, "float32")


def _host(function: str) -> str:
    return f"tenantlib.kernels.host:{function}"


KERNELS: tuple[KernelSpec, ...] = (
    KernelSpec("null", (), host=_host("null")),
    KernelSpec("vadd", (_buf("a", "in"), _buf("b", "in"), _buf("c", "out"), Param("n", "i32")),
               host=_host("vadd")),
    KernelSpec("axpy", (Param("alpha", "f32"), _buf("x", "in"), _buf("y", "inout"), Param("n", "i32")),
               host=_host("axpy")),
    KernelSpec("sgemm", (_buf("A", "in"), _buf("B", "in"), _buf("C", "out"),
                         Param("M", "i32"), Param("N", "i32"), Param("K", "i32")),
               host=_host("sgemm")),
    KernelSpec("reduce_partial", (_buf("x", "in"), _buf("partial", "out"), Param("n", "i32")),
               host=_host("reduce_partial")),
    KernelSpec("reduce_final", (_buf("partial", "in"), _buf("out", "out"), Param("m", "i32")),
               host=_host("reduce_final")),
    KernelSpec("jacobi2d", (_buf("u", "in"), _buf("v", "out"), Param("nx", "i32"), Param("ny", "i32")),
               host=_host("jacobi2d")),
    KernelSpec("bias_relu", (_buf("x", "in"), _buf("bias", "in"), _buf("y", "out"),
                             Param("rows", "i32"), Param("cols", "i32")),
               host=_host("bias_relu")),
)


# -- launch shapes ------------------------------------------------------------------------
def _blocks(n: int, per_block: int, limit: int) -> int:
    return min(limit, max(1, math.ceil(n / per_block)))


def launch_1d(n: int, block: int = 256) -> Launch:
    """(grid, block) for an elementwise kernel over ``n`` items: one thread per item."""
    if not 1 <= block <= 1024:
        raise ValueError(f"block must be 1..1024 threads, got {block}")
    return (_blocks(n, block, _MAX_GRID_X), 1, 1), (block, 1, 1)


def sgemm_launch(M: int, N: int) -> Launch:
    """(grid, block) for ``sgemm`` of an M x N result: one 16x16 block per tile of C."""
    return (_blocks(N, TILE, _MAX_GRID_X), _blocks(M, TILE, _MAX_GRID_YZ), 1), (TILE, TILE, 1)


def jacobi_launch(nx: int, ny: int) -> Launch:
    """(grid, block) for ``jacobi2d`` on an ny x nx grid: 16x16 blocks, one thread per point."""
    return (_blocks(nx, TILE, _MAX_GRID_X), _blocks(ny, TILE, _MAX_GRID_YZ), 1), (TILE, TILE, 1)


def reduce_launch(n: int, max_blocks: int = 1024) -> Launch:
    """(grid, block) for ``reduce_partial`` over ``n`` items: block 256, at most ``max_blocks`` blocks.

    The grid's first dimension is the number of partial sums, the ``m`` to give ``reduce_final``
    and the least size of the ``partial`` buffer.
    """
    if max_blocks < 1:
        raise ValueError(f"max_blocks must be at least 1, got {max_blocks}")
    return (_blocks(n, REDUCE_BLOCK, min(max_blocks, _MAX_GRID_X)), 1, 1), (REDUCE_BLOCK, 1, 1)


def reduce_final_launch() -> Launch:
    """(grid, block) for ``reduce_final``: one block of 256 threads."""
    return (1, 1, 1), (REDUCE_BLOCK, 1, 1)


def library(client: Any, **kw: Any) -> Any:
    """Register kaas-std with ``client`` (a ``tenantlib.Client``); returns its library handle.

    Keywords go to ``client.library`` (``options``, say). The broker caches by content, so
    calling this from many processes compiles once per device.
    """
    return client.library(SOURCE, kernels=KERNELS, name=NAME, **kw)


# -- numpy references (for tests and demos) -------------------------------------------------
# Straightforward float64 computations rounded to float32 at the end: compare kernel results
# with them under a tolerance.
def _f64(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    return np.asarray(x, dtype=np.float64)


def ref_vadd(a: npt.ArrayLike, b: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """a + b."""
    return (_f64(a) + _f64(b)).astype(np.float32)


def ref_axpy(alpha: float, x: npt.ArrayLike, y: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """alpha * x + y."""
    return (float(alpha) * _f64(x) + _f64(y)).astype(np.float32)


def ref_sgemm(A: npt.ArrayLike, B: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """The matrix product A @ B of 2-D arrays."""
    return (_f64(A) @ _f64(B)).astype(np.float32)


def ref_sum(x: npt.ArrayLike) -> float:
    """The sum of all of x, in float64."""
    return float(_f64(x).sum())


def ref_jacobi(u: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """One Jacobi step of the 2-D array u: interior points average their neighbours, the boundary stays."""
    u64 = _f64(u)
    if u64.ndim != 2:
        raise ValueError(f"ref_jacobi needs a 2-D array, got shape {u64.shape}")
    v = u64.copy()
    if u64.shape[0] > 2 and u64.shape[1] > 2:
        v[1:-1, 1:-1] = 0.25 * (u64[:-2, 1:-1] + u64[2:, 1:-1] + u64[1:-1, :-2] + u64[1:-1, 2:])
    return v.astype(np.float32)


def ref_bias_relu(x: npt.ArrayLike, bias: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """max(x + bias, 0) of a 2-D x, bias broadcast along its rows."""
    return np.maximum(_f64(x) + _f64(bias), 0.0).astype(np.float32)
