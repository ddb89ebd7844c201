"""kaas-std (``tenantlib.kernels``): host implementations against plain numpy, the CUDA source
through NVRTC, and the agreement of signatures, CUDA source and host functions.

Random data comes from a fresh seed each run, printed with the test's output; set
``KAAS_TEST_SEED`` to repeat a run.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tenantlib.kernels as K
from broker.protocol import SCALAR_TYPES, KernelSpec
from broker.streams.compiler import compile_cuda, nvrtc_available
from tenantlib.kernels import host, testing

REPO = Path(__file__).resolve().parent.parent
SENTINEL = np.float32(-7.25)  # fills buffer tails that a kernel must not touch
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class FakeLaunch:
    """What the CPU device hands a host implementation."""

    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared: int = 0


def launch(pair: tuple[tuple[int, int, int], tuple[int, int, int]]) -> FakeLaunch:
    return FakeLaunch(*pair)


@pytest.fixture
def rng() -> np.random.Generator:
    seed = int(os.environ.get("KAAS_TEST_SEED") or np.random.SeedSequence().entropy % 2**63)  # type: ignore[operator]
    print(f"random seed {seed}: KAAS_TEST_SEED={seed} repeats this test's data")
    return np.random.default_rng(seed)


def rand(rng: np.random.Generator, *shape: int) -> F32:
    return rng.standard_normal(shape).astype(np.float32)


def with_tail(x: F32, extra: int) -> F32:
    """x flattened, followed by ``extra`` sentinels."""
    return np.concatenate([x.reshape(-1), np.full(extra, SENTINEL, np.float32)])


SIZES_1D = [0, 1, 15, 16, 17, 255, 256, 257, 1000, 4099, 70_001]


# -- (a) host implementations against independent references -------------------------------
def test_null_does_nothing() -> None:
    host.null(FakeLaunch((1, 1, 1), (1, 1, 1)))


@pytest.mark.parametrize("n", SIZES_1D)
def test_vadd(rng: np.random.Generator, n: int) -> None:
    a, b = rand(rng, n), rand(rng, n)
    c = np.full(n + 5, SENTINEL, np.float32)
    host.vadd(launch(K.launch_1d(n)), with_tail(a, 3), with_tail(b, 3), c, n)
    np.testing.assert_allclose(c[:n], a.astype(np.float64) + b.astype(np.float64), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(c[:n], a + b)  # float32 addition, correctly rounded on both sides
    assert (c[n:] == SENTINEL).all()


@pytest.mark.parametrize("n", SIZES_1D)
def test_axpy(rng: np.random.Generator, n: int) -> None:
    alpha = float(rng.uniform(-3, 3))
    x = rand(rng, n)
    y0 = with_tail(rand(rng, n), 4)
    y = y0.copy()
    host.axpy(launch(K.launch_1d(n, block=128)), alpha, with_tail(x, 2), y, n)
    expect = np.float64(np.float32(alpha)) * x.astype(np.float64) + y0[:n].astype(np.float64)
    np.testing.assert_allclose(y[:n], expect, rtol=1e-6, atol=1e-6)
    assert (y[n:] == SENTINEL).all()


def test_elementwise_on_2d_buffers_writes_in_place(rng: np.random.Generator) -> None:
    a, b = rand(rng, 7, 9), rand(rng, 7, 9)
    c = np.full((7, 9), SENTINEL, np.float32)
    host.vadd(launch(K.launch_1d(50)), a, b, c, 50)
    np.testing.assert_array_equal(c.reshape(-1)[:50], (a + b).reshape(-1)[:50])
    assert (c.reshape(-1)[50:] == SENTINEL).all()
    y = b.copy()
    host.axpy(launch(K.launch_1d(63)), 2.0, a, y, 63)
    np.testing.assert_allclose(y, 2.0 * a.astype(np.float64) + b, rtol=1e-6, atol=1e-6)


def sgemm_tolerance(A: F32, B: F32) -> npt.NDArray[np.float64]:
    """A float32 matrix product's worst-case error per element: about K rounding errors of |A| @ |B|."""
    K_ = A.shape[1]
    return (K_ + 2) * 2.0**-23 * (np.abs(A.astype(np.float64)) @ np.abs(B.astype(np.float64))) + 1e-30


def sgemm_reference(A: F32, B: F32) -> npt.NDArray[np.float64]:
    """Row by column dot products in float64, nothing clever."""
    M, Kd = A.shape
    N = B.shape[1]
    C = np.zeros((M, N))
    for i in range(M):
        for j in range(N):
            C[i, j] = sum(float(A[i, k]) * float(B[k, j]) for k in range(Kd))
    return C


@pytest.mark.parametrize("M,N,Kd", [(1, 1, 1), (16, 16, 16), (17, 15, 33), (31, 64, 7), (5, 40, 1), (33, 2, 17)])
def test_sgemm(rng: np.random.Generator, M: int, N: int, Kd: int) -> None:
    A, B = rand(rng, M, Kd), rand(rng, Kd, N)
    C = np.full(M * N + 9, SENTINEL, np.float32)
    host.sgemm(launch(K.sgemm_launch(M, N)), with_tail(A, 1), with_tail(B, 2), C, M, N, Kd)
    got = C[: M * N].reshape(M, N)
    assert (np.abs(got - sgemm_reference(A, B)) <= sgemm_tolerance(A, B)).all()
    assert (C[M * N:] == SENTINEL).all()


def test_sgemm_on_2d_buffers_and_degenerate_sizes(rng: np.random.Generator) -> None:
    A, B = rand(rng, 20, 30), rand(rng, 30, 18)
    C = np.full((20, 18), SENTINEL, np.float32)
    host.sgemm(launch(K.sgemm_launch(20, 18)), A, B, C, 20, 18, 30)
    assert (np.abs(C - A.astype(np.float64) @ B) <= sgemm_tolerance(A, B)).all()
    # K = 0: an empty sum, so C is zero; M or N = 0: nothing is written.
    host.sgemm(launch(K.sgemm_launch(20, 18)), A, B, C, 4, 5, 0)
    assert (C.reshape(-1)[:20] == 0).all() and (C.reshape(-1)[20:] != 0).all()
    before = C.copy()
    host.sgemm(launch(K.sgemm_launch(0, 18)), A, B, C, 0, 18, 30)
    host.sgemm(launch(K.sgemm_launch(20, 0)), A, B, C, 20, 0, 30)
    np.testing.assert_array_equal(C, before)


def test_sgemm_result_does_not_depend_on_grid(rng: np.random.Generator) -> None:
    A, B = rand(rng, 50, 20), rand(rng, 20, 35)
    C1, C2 = np.zeros(50 * 35, np.float32), np.zeros(50 * 35, np.float32)
    host.sgemm(launch(K.sgemm_launch(50, 35)), A, B, C1, 50, 35, 20)
    host.sgemm(FakeLaunch((1, 2, 1), (16, 16, 1)), A, B, C2, 50, 35, 20)
    np.testing.assert_array_equal(C1, C2)


def simulate_block_sums(x: F32, n: int, blocks: int) -> list[np.float32]:
    """The CUDA reduction step by step in float32 scalars: per-thread grid-stride sums, then the tree."""
    out = []
    for b in range(blocks):
        s = []
        for t in range(256):
            acc = np.float32(0)
            for i in range(b * 256 + t, n, blocks * 256):
                acc = np.float32(acc + x[i])
            s.append(acc)
        h = 128
        while h:
            for t in range(h):
                s[t] = np.float32(s[t] + s[t + h])
            h //= 2
        out.append(s[0])
    return out


@pytest.mark.parametrize("n,max_blocks", [(0, 1024), (1, 1024), (255, 1024), (257, 1024), (3000, 4), (5000, 1)])
def test_reduce_partial_matches_the_kernels_order_bit_for_bit(rng: np.random.Generator, n: int,
                                                              max_blocks: int) -> None:
    x = with_tail(rand(rng, n), 7)
    grid, block = K.reduce_launch(n, max_blocks=max_blocks)
    G = grid[0]
    partial = np.full(G + 3, SENTINEL, np.float32)
    host.reduce_partial(FakeLaunch(grid, block), x, partial, n)
    np.testing.assert_array_equal(partial[:G], np.array(simulate_block_sums(x, n, G), np.float32))
    assert (partial[G:] == SENTINEL).all()


@pytest.mark.parametrize("n,max_blocks", [(1, 1024), (256, 1024), (257, 2), (10_000, 1024), (100_003, 7),
                                          (1_000_001, 1024)])
def test_reduce_partial_and_final_sum(rng: np.random.Generator, n: int, max_blocks: int) -> None:
    x = rand(rng, n)
    grid, block = K.reduce_launch(n, max_blocks=max_blocks)
    G = grid[0]
    partial = np.full(G, SENTINEL, np.float32)
    host.reduce_partial(FakeLaunch(grid, block), x, partial, n)
    # Block b holds the items whose chunk of 256 is b modulo G.
    owner = (np.arange(n) // 256) % G
    expect = np.bincount(owner, weights=x.astype(np.float64), minlength=G)
    scale = np.bincount(owner, weights=np.abs(x).astype(np.float64), minlength=G)
    counts = np.bincount(owner, minlength=G)
    assert (np.abs(partial - expect) <= (counts + 8) * 2.0**-23 * scale + 1e-30).all()

    out = np.full(2, SENTINEL, np.float32)
    host.reduce_final(FakeLaunch(*K.reduce_final_launch()), partial, out, G)
    total = float(np.sum(x, dtype=np.float64))
    assert abs(float(out[0]) - total) <= (n + 8) * 2.0**-23 * float(np.abs(x).sum(dtype=np.float64)) + 1e-30
    assert out[1] == SENTINEL
    np.testing.assert_array_equal(out[:1], np.array(simulate_block_sums(partial, G, 1), np.float32))


@pytest.mark.parametrize("m", [0, 1, 255, 256, 257, 1024, 3001])
def test_reduce_final(rng: np.random.Generator, m: int) -> None:
    p = with_tail(rand(rng, m), 5)
    out = np.full(1, SENTINEL, np.float32)
    host.reduce_final(FakeLaunch((3, 1, 1), (256, 1, 1)), p, out, m)  # blocks past the first do nothing
    exact = float(np.sum(p[:m], dtype=np.float64))
    assert abs(float(out[0]) - exact) <= (m + 8) * 2.0**-23 * float(np.abs(p[:m]).sum(dtype=np.float64)) + 1e-30
    np.testing.assert_array_equal(out, np.array(simulate_block_sums(p, m, 1), np.float32))


def test_reduce_is_deterministic(rng: np.random.Generator) -> None:
    x = rand(rng, 300_000)
    grid, block = K.reduce_launch(x.size, max_blocks=64)
    runs = []
    for _ in range(2):
        partial = np.zeros(grid[0], np.float32)
        out = np.zeros(1, np.float32)
        host.reduce_partial(FakeLaunch(grid, block), x, partial, x.size)
        host.reduce_final(FakeLaunch(*K.reduce_final_launch()), partial, out, grid[0])
        runs.append(out.tobytes())
    assert runs[0] == runs[1]


def jacobi_reference(u: F32) -> npt.NDArray[np.float64]:
    """Point by point, in float64."""
    ny, nx = u.shape
    v = u.astype(np.float64)
    for i in range(1, ny - 1):
        for j in range(1, nx - 1):
            v[i, j] = 0.25 * (float(u[i - 1, j]) + float(u[i + 1, j]) + float(u[i, j - 1]) + float(u[i, j + 1]))
    return v


@pytest.mark.parametrize("ny,nx", [(1, 1), (1, 9), (2, 5), (3, 3), (16, 16), (17, 33), (40, 23), (2, 2)])
def test_jacobi2d(rng: np.random.Generator, ny: int, nx: int) -> None:
    u = rand(rng, ny, nx)
    v = np.full(ny * nx + 6, SENTINEL, np.float32)
    host.jacobi2d(launch(K.jacobi_launch(nx, ny)), with_tail(u, 2), v, nx, ny)
    got = v[: nx * ny].reshape(ny, nx)
    expect = jacobi_reference(u)
    np.testing.assert_allclose(got, expect, rtol=2e-6, atol=1e-6)
    boundary = np.ones((ny, nx), bool)
    boundary[1:-1, 1:-1] = False
    np.testing.assert_array_equal(got[boundary], u[boundary])
    assert (v[nx * ny:] == SENTINEL).all()


def test_jacobi2d_on_2d_buffers(rng: np.random.Generator) -> None:
    u = rand(rng, 19, 21)
    v = np.zeros((19, 21), np.float32)
    host.jacobi2d(FakeLaunch((1, 1, 1), (16, 16, 1)), u, v, 21, 19)
    np.testing.assert_allclose(v, jacobi_reference(u), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 9), (3, 1), (16, 16), (17, 33), (40, 23), (5, 1000)])
def test_bias_relu(rng: np.random.Generator, rows: int, cols: int) -> None:
    x, b = rand(rng, rows, cols), rand(rng, cols)
    y = np.full(rows * cols + 4, SENTINEL, np.float32)
    host.bias_relu(launch(K.launch_1d(rows * cols)), with_tail(x, 2), with_tail(b, 3), y, rows, cols)
    got = y[: rows * cols].reshape(rows, cols)
    expect = np.maximum(x.astype(np.float64) + b.astype(np.float64), 0.0)
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got, np.maximum(x + b, np.float32(0)))  # one float32 rounding, like the kernel
    assert (y[rows * cols:] == SENTINEL).all()


def test_bias_relu_on_2d_buffers_degenerate_sizes_and_nan(rng: np.random.Generator) -> None:
    x, b = rand(rng, 6, 4), rand(rng, 4)
    y = np.full((6, 4), SENTINEL, np.float32)
    host.bias_relu(FakeLaunch((1, 1, 1), (32, 1, 1)), x, b, y, 6, 4)
    np.testing.assert_array_equal(y, K.ref_bias_relu(x, b))
    before = y.copy()
    host.bias_relu(launch(K.launch_1d(0)), x, b, y, 0, 4)
    host.bias_relu(launch(K.launch_1d(0)), x, b, y, 6, 0)
    np.testing.assert_array_equal(y, before)
    x[0, 0] = np.nan  # fmaxf(NaN, 0) is 0 on the GPU; fmax matches it
    host.bias_relu(launch(K.launch_1d(24)), x, b, y, 6, 4)
    assert y[0, 0] == 0.0


def test_numpy_references_agree(rng: np.random.Generator) -> None:
    a, b = rand(rng, 40), rand(rng, 40)
    np.testing.assert_allclose(K.ref_vadd(a, b), a.astype(np.float64) + b, rtol=1e-6)
    np.testing.assert_allclose(K.ref_axpy(1.5, a, b), 1.5 * a.astype(np.float64) + b, rtol=1e-6, atol=1e-6)
    A, B = rand(rng, 6, 5), rand(rng, 5, 4)
    np.testing.assert_allclose(K.ref_sgemm(A, B), sgemm_reference(A, B), rtol=1e-5, atol=1e-5)
    assert K.ref_sum(a) == pytest.approx(float(a.astype(np.float64).sum()))
    u = rand(rng, 9, 7)
    np.testing.assert_allclose(K.ref_jacobi(u), jacobi_reference(u), rtol=1e-6, atol=1e-6)
    x, bias = rand(rng, 3, 5), rand(rng, 5)
    np.testing.assert_array_equal(K.ref_bias_relu(x, bias),
                                  np.maximum(x.astype(np.float64) + bias, 0.0).astype(np.float32))


def test_out_of_range_sizes_are_refused() -> None:
    small = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match=r"vadd: n = 11 exceeds buffer 'c' \(10 elements\)"):
        host.vadd(launch(K.launch_1d(11)), np.zeros(11, np.float32), np.zeros(11, np.float32), small, 11)
    with pytest.raises(ValueError, match="axpy: n = 11 exceeds buffer 'x'"):
        host.axpy(launch(K.launch_1d(11)), 1.0, small, np.zeros(11, np.float32), 11)
    with pytest.raises(ValueError, match="sgemm: M\\*K = 12 exceeds buffer 'A'"):
        host.sgemm(launch(K.sgemm_launch(3, 3)), small, small, small, 3, 3, 4)
    with pytest.raises(ValueError, match="sgemm: block must be"):
        host.sgemm(FakeLaunch((1, 1, 1), (32, 32, 1)), small, small, small, 1, 1, 1)
    with pytest.raises(ValueError, match="reduce_partial: grid\\[0\\] = 11 exceeds buffer 'partial'"):
        host.reduce_partial(FakeLaunch((11, 1, 1), (256, 1, 1)), small, small, 10)
    with pytest.raises(ValueError, match="reduce_partial: block must be"):
        host.reduce_partial(FakeLaunch((1, 1, 1), (128, 1, 1)), small, small, 10)
    with pytest.raises(ValueError, match="reduce_final: m = 11 exceeds buffer 'partial'"):
        host.reduce_final(FakeLaunch((1, 1, 1), (256, 1, 1)), small, small, 11)
    with pytest.raises(ValueError, match="jacobi2d: nx\\*ny = 12 exceeds buffer 'u'"):
        host.jacobi2d(launch(K.jacobi_launch(4, 3)), small, np.zeros(12, np.float32), 4, 3)
    with pytest.raises(ValueError, match="bias_relu: cols = 11 exceeds buffer 'bias'"):
        host.bias_relu(launch(K.launch_1d(11)), np.zeros(11, np.float32), small, np.zeros(11, np.float32), 1, 11)
    with pytest.raises(ValueError, match=r"bias_relu: rows\*cols = 12 exceeds buffer 'y'"):
        host.bias_relu(launch(K.launch_1d(12)), np.zeros(12, np.float32), small, small, 3, 4)


def test_launch_helpers() -> None:
    assert K.launch_1d(0) == ((1, 1, 1), (256, 1, 1))
    assert K.launch_1d(1000) == ((4, 1, 1), (256, 1, 1))
    assert K.launch_1d(1000, block=100) == ((10, 1, 1), (100, 1, 1))
    assert K.sgemm_launch(M=33, N=17) == ((2, 3, 1), (16, 16, 1))
    assert K.sgemm_launch(16, 16) == ((1, 1, 1), (16, 16, 1))
    assert K.jacobi_launch(nx=33, ny=17) == ((3, 2, 1), (16, 16, 1))
    assert K.jacobi_launch(nx=10, ny=10**7)[0][1] == 65535  # CUDA's limit; the kernel strides over the rest
    assert K.reduce_launch(300) == ((2, 1, 1), (256, 1, 1))
    assert K.reduce_launch(10**9) == ((1024, 1, 1), (256, 1, 1))
    assert K.reduce_launch(10**9, max_blocks=8) == ((8, 1, 1), (256, 1, 1))
    assert K.reduce_final_launch() == ((1, 1, 1), (256, 1, 1))
    with pytest.raises(ValueError, match="block"):
        K.launch_1d(10, block=2048)
    with pytest.raises(ValueError, match="max_blocks"):
        K.reduce_launch(10, max_blocks=0)


def test_library_registers_the_source_and_signatures() -> None:
    calls = []

    class Client:
        def library(self, code: str, *, kernels: tuple[KernelSpec, ...], format: str | None = None,
                    name: str = "", options: tuple[str, ...] = ()) -> str:
            calls.append((code, kernels, format, name, options))
            return "handle"

    assert K.library(Client(), options=("--use_fast_math",)) == "handle"
    assert calls == [(K.SOURCE, K.KERNELS, None, "kaas-std", ("--use_fast_math",))]


# -- (b) the CUDA source compiles, and every kernel is an unmangled symbol -----------------
def elf_global_functions(image: bytes) -> set[str]:
    """Names of the global function symbols of a 64-bit little-endian ELF (a CUBIN)."""
    assert image[:4] == b"\x7fELF" and image[4] == 2 and image[5] == 1, "not a 64-bit little-endian ELF"
    (shoff,) = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", image, 0x3A)
    # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
    sections = [struct.unpack_from("<IIQQQQIIQQ", image, shoff + k * shentsize) for k in range(shnum)]
    names = set()
    for sec in sections:
        if sec[1] != 2:  # SHT_SYMTAB
            continue
        strtab_offset = sections[sec[6]][4]
        for entry in range(sec[4], sec[4] + sec[5], 24):
            st_name, st_info = struct.unpack_from("<IB", image, entry)
            if st_info & 0xF == 2 and st_info >> 4 == 1:  # STT_FUNC, STB_GLOBAL
                start = strtab_offset + st_name
                names.add(image[start:image.index(b"\0", start)].decode())
    return names


@pytest.mark.skipif(not nvrtc_available(), reason="NVRTC (cuda-bindings' nvrtc) cannot be loaded here")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_source_compiles_to_cubin_with_every_kernel(arch: str) -> None:
    cubin, log = compile_cuda(K.SOURCE.encode(), arch, name="kaas-std.cu")
    assert "warning" not in log.lower(), log
    for spec in K.KERNELS:
        assert spec.name.encode() in cubin, f"{spec.name} is not in the {arch} CUBIN"
    assert elf_global_functions(cubin) == {spec.name for spec in K.KERNELS}


# -- (c) signatures, CUDA source and host functions agree ----------------------------------
CUDA_TYPES = {"const float*": ("buf", ("in",)), "float*": ("buf", ("out", "inout")), "int": ("i32", ("",)),
              "float": ("f32", ("",))}


def cuda_signatures() -> dict[str, list[tuple[str, str]]]:
    """kernel name -> [(CUDA type, parameter name)] from the extern "C" __global__ lines of SOURCE."""
    found: dict[str, list[tuple[str, str]]] = {}
    for name, params in re.findall(r'extern "C" __global__ void (\w+)\(([^)]*)\)', K.SOURCE):
        assert name not in found, f"kernel {name} defined twice"
        args = [p.strip() for p in params.split(",") if p.strip() not in ("", "void")]
        found[name] = [(m.group(1).replace(" *", "*"), m.group(2))
                       for m in (re.fullmatch(r"(.*?\*?)\s*(\w+)", a) for a in args) if m]
    return found


def resolve(spec: KernelSpec) -> object:
    module, _, function = spec.host.partition(":")
    return getattr(importlib.import_module(module), function)


@pytest.mark.parametrize("spec", K.KERNELS + testing.KERNELS, ids=lambda s: s.name)
def test_host_function_resolves_and_takes_launch_then_params(spec: KernelSpec) -> None:
    fn = resolve(spec)
    assert callable(fn)
    params = list(inspect.signature(fn).parameters)
    assert len(params) == len(spec.params) + 1
    assert params == ["launch", *(p.name for p in spec.params)]


def test_specs_match_the_cuda_source() -> None:
    cuda = cuda_signatures()
    assert set(cuda) == {spec.name for spec in K.KERNELS}
    assert len({spec.name for spec in K.KERNELS}) == len(K.KERNELS)
    for spec in K.KERNELS:
        assert spec.host.startswith("tenantlib.kernels.host:")
        assert [name for _, name in cuda[spec.name]] == [p.name for p in spec.params], spec.name
        for (ctype, _), p in zip(cuda[spec.name], spec.params, strict=True):
            kind, accesses = CUDA_TYPES[ctype]
            assert p.kind == kind and p.access in accesses, (spec.name, p)
            if p.kind == "buf":
                assert p.dtype == "float32"
            else:
                assert p.kind in SCALAR_TYPES and p.dtype == ""


def test_source_needs_no_includes() -> None:
    assert "#include" not in K.SOURCE


# -- (d) sgemm, property-based ---------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(M=st.integers(1, 40), N=st.integers(1, 40), Kd=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_sgemm_property(M: int, N: int, Kd: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    A, B = rand(rng, M, Kd), rand(rng, Kd, N)
    C = np.full(M * N + 1, SENTINEL, np.float32)
    host.sgemm(launch(K.sgemm_launch(M, N)), A, B, C, M, N, Kd)
    err = np.abs(C[:-1].reshape(M, N) - A.astype(np.float64) @ B.astype(np.float64))
    assert (err <= sgemm_tolerance(A, B)).all()
    assert C[-1] == SENTINEL


# -- the deliberately bad host implementations ---------------------------------------------
def run_in_child(function: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    code = f"from tenantlib.kernels import testing; testing.{function}(None)"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def test_crash_ends_its_process_with_status_70() -> None:
    proc = run_in_child("crash")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == testing.CRASH_EXIT_CODE == 70, err.decode()


def test_hang_does_not_return() -> None:
    proc = run_in_child("hang")
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)
    finally:
        proc.kill()
        proc.wait()
