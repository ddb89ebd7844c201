"""Host (numpy) implementations of kaas-std, run by the CPU device in place of the CUDA kernels.

Each function takes the launch (``grid``, ``block``, ``shared``) and then the kernel's
arguments in order: buffers as numpy arrays of the dtype and shape the graph declared (written
in place for ``out``/``inout``), scalars as Python numbers. Each computes what the CUDA kernel
of the same name computes under the same launch, with the same float32 rounding, except
``sgemm`` whose summation order differs (see ``tenantlib.kernels``). Nothing past the
kernel's index range is touched. The broker validated the graph; these only refuse what would
read or write past a buffer (ValueError).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["LaunchInfo", "axpy", "bias_relu", "jacobi2d", "null", "reduce_final", "reduce_partial", "sgemm", "vadd"]

_TILE = 16
_REDUCE_BLOCK = 256

F32 = npt.NDArray[np.float32]


class LaunchInfo(Protocol):
    """The launch of one kernel node, as the CPU device hands it over."""

    @property
    def grid(self) -> tuple[int, ...]: ...

    @property
    def block(self) -> tuple[int, ...]: ...

    @property
    def shared(self) -> int: ...


def _dim3(dims: tuple[int, ...]) -> tuple[int, int, int]:
    d = tuple(int(x) for x in dims) + (1, 1, 1)
    return d[0], d[1], d[2]


def _flat(kernel: str, name: str, arr: npt.NDArray[np.float32], need: int, what: str) -> F32:
    """A 1-D view of ``arr`` (never a copy) with at least ``need`` elements."""
    if not arr.flags.c_contiguous:
        raise ValueError(f"{kernel}: buffer {name!r} must be C-contiguous")
    flat = arr.reshape(-1)
    if need > flat.size:
        raise ValueError(f"{kernel}: {what} = {need} exceeds buffer {name!r} ({flat.size} elements)")
    return flat


def null(launch: LaunchInfo) -> None:
    """Does nothing, like the CUDA kernel."""


def vadd(launch: LaunchInfo, a: F32, b: F32, c: F32, n: int) -> None:
    """c[i] = a[i] + b[i] for i < n."""
    n = max(int(n), 0)
    af, bf, cf = (_flat("vadd", k, v, n, "n") for k, v in (("a", a), ("b", b), ("c", c)))
    np.add(af[:n], bf[:n], out=cf[:n])


def axpy(launch: LaunchInfo, alpha: float, x: F32, y: F32, n: int) -> None:
    """y[i] = alpha * x[i] + y[i] for i < n, the product rounded to float32 before the sum."""
    n = max(int(n), 0)
    xf = _flat("axpy", "x", x, n, "n")
    yf = _flat("axpy", "y", y, n, "n")
    np.add(np.multiply(np.float32(alpha), xf[:n], dtype=np.float32), yf[:n], out=yf[:n])


def sgemm(launch: LaunchInfo, A: F32, B: F32, C: F32, M: int, N: int, K: int) -> None:
    """Row-major C[M x N] = A[M x K] @ B[K x N] in float32; needs block (16, 16, 1) as the kernel does."""
    block = _dim3(launch.block)
    if block != (_TILE, _TILE, 1):
        raise ValueError(f"sgemm: block must be ({_TILE}, {_TILE}, 1), got {block}")
    M, N, K = int(M), int(N), int(K)
    if M <= 0 or N <= 0:
        return
    Kp = max(K, 0)
    Af = _flat("sgemm", "A", A, M * Kp, "M*K")
    Bf = _flat("sgemm", "B", B, Kp * N, "K*N")
    C2 = _flat("sgemm", "C", C, M * N, "M*N")[: M * N].reshape(M, N)
    if Kp == 0:
        C2[...] = 0.0
    else:
        np.matmul(Af[: M * K].reshape(M, K), Bf[: K * N].reshape(K, N), out=C2)


def _block_sums(xf: F32, n: int, blocks: int) -> F32:
    """What ``kaas_block_sum`` gives for each of ``blocks`` blocks over the flat xf[0..n), in its order."""
    stride = blocks * _REDUCE_BLOCK
    acc = np.zeros(stride, dtype=np.float32)  # acc[b*256 + t]: thread t of block b
    for start in range(0, n, stride):
        chunk = xf[start:min(n, start + stride)]
        acc[: chunk.size] += chunk
    tree = acc.reshape(blocks, _REDUCE_BLOCK)
    h = _REDUCE_BLOCK // 2
    while h:
        tree[:, :h] += tree[:, h:2 * h]
        h //= 2
    return tree[:, 0]


def _check_reduce_block(kernel: str, launch: LaunchInfo) -> None:
    block = _dim3(launch.block)
    if block != (_REDUCE_BLOCK, 1, 1):
        raise ValueError(f"{kernel}: block must be ({_REDUCE_BLOCK}, 1, 1), got {block}")


def reduce_partial(launch: LaunchInfo, x: F32, partial: F32, n: int) -> None:
    """partial[b] = the sum of block b's grid-stride slice of x[0..n), for b < grid[0]."""
    _check_reduce_block("reduce_partial", launch)
    blocks = _dim3(launch.grid)[0]
    n = max(int(n), 0)
    xf = _flat("reduce_partial", "x", x, n, "n")
    pf = _flat("reduce_partial", "partial", partial, blocks, "grid[0]")
    # Blocks with blockIdx.y or .z != 0 return at once on the GPU: only grid[0] matters.
    pf[:blocks] = _block_sums(xf, n, blocks)


def reduce_final(launch: LaunchInfo, partial: F32, out: F32, m: int) -> None:
    """out[0] = the sum of partial[0..m) in the order of one 256-thread block."""
    _check_reduce_block("reduce_final", launch)
    m = max(int(m), 0)
    pf = _flat("reduce_final", "partial", partial, m, "m")
    of = _flat("reduce_final", "out", out, 1, "1")
    of[0] = _block_sums(pf, m, 1)[0]


def jacobi2d(launch: LaunchInfo, u: F32, v: F32, nx: int, ny: int) -> None:
    """One Jacobi step on the row-major ny x nx grid u into v: interior averaged, boundary copied."""
    nx, ny = int(nx), int(ny)
    if nx <= 0 or ny <= 0:
        return
    U = _flat("jacobi2d", "u", u, nx * ny, "nx*ny")[: nx * ny].reshape(ny, nx)
    V = _flat("jacobi2d", "v", v, nx * ny, "nx*ny")[: nx * ny].reshape(ny, nx)
    if nx <= 2 or ny <= 2:
        V[...] = U
        return
    V[0, :] = U[0, :]
    V[-1, :] = U[-1, :]
    V[1:-1, 0] = U[1:-1, 0]
    V[1:-1, -1] = U[1:-1, -1]
    # Same order of additions as the kernel: ((up + down) + left) + right.
    V[1:-1, 1:-1] = np.float32(0.25) * (((U[:-2, 1:-1] + U[2:, 1:-1]) + U[1:-1, :-2]) + U[1:-1, 2:])


def bias_relu(launch: LaunchInfo, x: F32, bias: F32, y: F32, rows: int, cols: int) -> None:
    """y[r][c] = max(x[r][c] + bias[c], 0) over the row-major rows x cols prefix; fmax as the kernel's fmaxf."""
    rows, cols = int(rows), int(cols)
    if rows <= 0 or cols <= 0:
        return
    n = rows * cols
    X = _flat("bias_relu", "x", x, n, "rows*cols")[:n].reshape(rows, cols)
    b = _flat("bias_relu", "bias", bias, cols, "cols")[:cols]
    Y = _flat("bias_relu", "y", y, n, "rows*cols")[:n].reshape(rows, cols)
    np.fmax(np.add(X, b, dtype=np.float32), np.float32(0), out=Y)
