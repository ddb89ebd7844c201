"""The CUDA backend driven in-process, checked against numpy on fresh random data.

Every test needs a CUDA device and is skipped (with the reason) where none can be opened.
The tests that poison the process (an illegal address, a missed deadline) run in a
subprocess: after a sticky fault no CUDA call of that process works again.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker import errors
from broker.protocol import Buf, KernelSpec, Lit, Param
from broker.streams.backend import Backend, Completion
from broker.streams.wire import ExecBuffer, ExecGraph, ExecKernel

ROOT = Path(__file__).resolve().parents[2]


@lru_cache(maxsize=1)
def _no_cuda_reason() -> str:
    """'' when a CUDA device can be opened here, else why not."""
    try:
        from cuda.bindings import driver
    except ImportError as exc:
        return f"no CUDA device: cuda-bindings not installed ({exc})"
    try:
        (err,) = driver.cuInit(0)
        if err:
            return f"no CUDA device: cuInit failed with {err.name}"
        err, count = driver.cuDeviceGetCount()
        if err or count < 1:
            return f"no CUDA device: cuDeviceGetCount gave {count} ({err.name})"
    except Exception as exc:  # no driver library at all raises instead of returning an error
        return f"no CUDA device: {type(exc).__name__}: {exc}"
    return ""


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_no_cuda_reason()), reason=_no_cuda_reason() or "-")]

SOURCE = rb"""
extern "C" __global__ void t_vadd(const float* a, const float* b, float* c, int n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        c[i] = a[i] + b[i];
}
// tmp += s * x: tmp is a temp buffer, so this also checks that it starts zeroed.
extern "C" __global__ void t_scale_acc(const float* x, float* tmp, float s, int n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        tmp[i] = __fadd_rn(tmp[i], __fmul_rn(s, x[i]));
}
extern "C" __global__ void t_mul(const float* a, const float* b, float* c, int n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        c[i] = __fmul_rn(a[i], b[i]);
}
extern "C" __global__ void t_noop(float* out) {}
extern "C" __global__ void t_inc(unsigned int* x, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        x[i] += 1u;
}
// Every scalar type once, to check the argument packing.
extern "C" __global__ void t_scalars(double* out, int a, unsigned int b, long long c, unsigned long long d,
                                     float e, double f) {
    out[0] = a; out[1] = b; out[2] = (double)c; out[3] = (double)d; out[4] = e; out[5] = f;
}
// Writes its output, then stores through a bogus pointer: an illegal address.
extern "C" __global__ void t_poke(float* out, unsigned long long p) {
    out[threadIdx.x] = 1.0f;
    __threadfence();
    *(volatile float*)p = 1.0f;
}
// Runs for ns nanoseconds of wall time.
extern "C" __global__ void t_spin(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
"""


def _buf(name: str) -> Param:
    return Param(name, "buf")


def _i32(name: str) -> Param:
    return Param(name, "i32")


KERNELS = (
    KernelSpec("t_vadd", (_buf("a"), _buf("b"), _buf("c"), _i32("n"))),
    KernelSpec("t_scale_acc", (_buf("x"), _buf("tmp"), Param("s", "f32"), _i32("n"))),
    KernelSpec("t_mul", (_buf("a"), _buf("b"), _buf("c"), _i32("n"))),
    KernelSpec("t_noop", (_buf("out"),)),
    KernelSpec("t_inc", (_buf("x"), Param("n", "u64"))),
    KernelSpec("t_scalars", (_buf("out"), _i32("a"), Param("b", "u32"), Param("c", "i64"), Param("d", "u64"),
                             Param("e", "f32"), Param("f", "f64"))),
    KernelSpec("t_poke", (_buf("out"), Param("p", "u64"))),
    KernelSpec("t_spin", (Param("ns", "u64"),)),
)
LIB = "test-kernels-v1"
_ids = itertools.count(1)


# -- helpers -------------------------------------------------------------------------------
class Arena:
    """A memfd segment, mapped here (numpy views) and pinned on a backend under ``id``."""

    def __init__(self, backend: Backend, size: int) -> None:
        self.id = next(_ids)
        self.size = size
        fd = os.memfd_create(f"kaas-test-{self.id}")
        try:
            os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size)
            backend.pin_arena(self.id, os.dup(fd), size)
        finally:
            os.close(fd)
        self.backend = backend
        self._next = 0

    def view(self, offset: int, count: int, dtype: Any = np.float32) -> np.ndarray:
        return np.frombuffer(self.mm, dtype=dtype, count=count, offset=offset)

    def place(self, data: np.ndarray) -> tuple[int, np.ndarray]:
        """Copy ``data`` to the next free 256-byte-aligned offset; returns (offset, view)."""
        offset = self._next
        self._next = (offset + data.nbytes + 255) // 256 * 256
        assert self._next <= self.size
        v = self.view(offset, data.size, data.dtype)
        v[:] = data.reshape(-1)
        return offset, v

    def buffer(self, kind: str, offset: int, arr: np.ndarray) -> ExecBuffer:
        return ExecBuffer(kind, str(arr.dtype), (arr.size,), arr.nbytes, self.id, offset)

    def close(self) -> None:
        self.backend.unpin_arena(self.id)
        try:
            self.mm.close()
        except BufferError:  # numpy views still alive; the mapping goes with them
            pass


def wait(backend: Backend, tokens: set[int], timeout: float = 60.0) -> dict[int, Completion]:
    done: dict[int, Completion] = {}
    end = time.monotonic() + timeout
    while tokens - done.keys():
        for c in backend.poll():
            assert c.token not in done, f"token {c.token} completed twice"
            done[c.token] = c
        assert time.monotonic() < end, f"graphs {sorted(tokens - done.keys())} did not finish in {timeout} s"
    return done


def run(backend: Backend, graph: ExecGraph, *, deadline: float = 0.0, priority: int = 0) -> Completion:
    token = next(_ids)
    backend.submit(token, graph, deadline, priority)
    c = wait(backend, {token})[token]
    assert not backend.busy
    return c


def ok(c: Completion) -> None:
    if c.error is not None:
        raise c.error
    assert c.timings is not None


def kernel(name: str, grid: int, block: int, *args: Any, shared: int = 0) -> ExecKernel:
    return ExecKernel(LIB, name, (grid, 1, 1), (block, 1, 1), shared, tuple(args))


@pytest.fixture(scope="module", params=["lane-slab", "pool-only", "cuda-graphs"])
def backend(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The backend as configured by default, with every graph's memory from the pool, and
    with every shape submitted twice replayed from a CUDA graph (tests/gpu/test_cuda_graphs.py)."""
    from broker.streams.cuda_backend import CudaBackend

    kw: dict[str, Any] = {"lane-slab": {}, "pool-only": {"lane_slab": 0}, "cuda-graphs": {"cuda_graphs": True}}[
        request.param]
    b = CudaBackend(0, **kw)
    b.load_library(LIB, "cuda", SOURCE, KERNELS, ())
    yield b
    b.close()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng()


# -- tests -----------------------------------------------------------------------------------
def test_info(backend: Any) -> None:
    info = backend.info()
    assert info["kind"] == "cuda" and info["index"] == 0
    assert info["arch"].startswith("sm_") and info["memory"] > 2**30 and info["driver_version"] > 0
    assert info["name"]


def test_vadd(backend: Any, rng: np.random.Generator) -> None:
    n = 1_000_003
    arena = Arena(backend, 16 * 2**20)
    oa, a = arena.place(rng.standard_normal(n, dtype=np.float32))
    ob, b = arena.place(rng.standard_normal(n, dtype=np.float32))
    oc, c = arena.place(np.full(n, np.nan, np.float32))
    g = ExecGraph((arena.buffer("in", oa, a), arena.buffer("in", ob, b), arena.buffer("out", oc, c)),
                  (kernel("t_vadd", 512, 256, Buf(0), Buf(1), Buf(2), Lit("i32", n)),))
    done = run(backend, g)
    ok(done)
    np.testing.assert_array_equal(c, a + b)
    t = done.timings
    assert t is not None and t.copy_in > 0 and t.kernels > 0 and t.copy_out > 0
    assert t.total > t.copy_in + t.copy_out  # the event-measured span: copies and the kernel stage
    arena.close()


def test_multi_kernel_graph_with_temp(backend: Any, rng: np.random.Generator) -> None:
    n = 300_000
    arena = Arena(backend, 8 * 2**20)
    ox, x = arena.place(rng.standard_normal(n, dtype=np.float32))
    ow, w = arena.place(rng.standard_normal(n, dtype=np.float32))
    oy, y = arena.place(rng.standard_normal(n, dtype=np.float32))  # inout: y = y * (2.5 x) (temp)
    oz, z = arena.place(np.full(n, 7.0, np.float32))  # out never written by a kernel: comes back zeroed
    y0 = y.copy()
    g = ExecGraph(
        (arena.buffer("in", ox, x), arena.buffer("in", ow, w), arena.buffer("inout", oy, y),
         ExecBuffer("temp", "float32", (n,), 4 * n), arena.buffer("out", oz, z)),
        (kernel("t_scale_acc", 256, 256, Buf(0), Buf(3), Lit("f32", 2.5), Lit("i32", n)),
         kernel("t_mul", 256, 256, Buf(2), Buf(3), Buf(2), Lit("i32", n)),
         kernel("t_noop", 1, 1, Buf(4))))
    ok(run(backend, g))
    np.testing.assert_array_equal(y, y0 * (np.float32(2.5) * x))
    assert not z.any(), "an out buffer no kernel wrote must come back zeroed, not with stale device memory"
    assert w.size == n
    arena.close()


def test_timings_of_stages_a_graph_does_not_have_are_zero(backend: Any) -> None:
    """A stage the graph lacks reports exactly 0.0 (no event is spent on it); the others are timed.

    ``kernels`` is the occupancy charge (any graph on a lane is charged); the event-measured
    kernel stage is what ``total`` (the graph's span on its lane) holds beyond the copies.
    """
    arena = Arena(backend, 3 * 4096)
    o, x = arena.place(np.ones(256, np.float32))
    spin = ExecKernel(LIB, "t_spin", (1, 1, 1), (1, 1, 1), 0, (Lit("u64", 2000),))
    cases = {  # graph: copy_in, kernels, copy_out as "0" (absent), "+" (timed, > 0) or "s" (a scrub only)
        ExecGraph((), (spin,)): "0+0",
        ExecGraph((arena.buffer("in", o, x),), (spin,)): "++0",
        ExecGraph((arena.buffer("out", o, x),), (spin,)): "s++",
        ExecGraph((arena.buffer("inout", o, x),), ()): "+0+",
    }
    for graph, expect in cases.items():
        for _ in range(3):  # direct, then (with CUDA graphs on) captured and replayed
            done = run(backend, graph)
            ok(done)
            t = done.timings
            assert t is not None
            kernel_stage = t.total - t.copy_in - t.copy_out
            for stage, want in zip((t.copy_in, kernel_stage, t.copy_out), expect, strict=True):
                if want == "0":
                    assert abs(stage) < 1e-12, (graph, t)
                else:
                    assert stage > 0 if want == "+" else stage >= 0, (graph, t)
            assert t.kernels > 0, (graph, t)  # charged for its time on the device, kernels or not
    arena.close()


def test_scalar_packing(backend: Any) -> None:
    arena = Arena(backend, 4096)
    o, out = arena.place(np.zeros(6, np.float64))
    args = (Lit("i32", -7), Lit("u32", 4_000_000_000), Lit("i64", -(2**40)), Lit("u64", 2**63 + 2048),
            Lit("f32", 1.5), Lit("f64", -2.25))
    ok(run(backend, ExecGraph((arena.buffer("out", o, out),), (kernel("t_scalars", 1, 1, Buf(0), *args),))))
    np.testing.assert_array_equal(out, [-7, 4_000_000_000, -(2**40), float(2**63 + 2048), 1.5, -2.25])
    arena.close()


def test_resident_reused_across_graphs(backend: Any, rng: np.random.Generator) -> None:
    n = 200_000
    weights = rng.standard_normal(n, dtype=np.float32)
    fd = os.memfd_create("kaas-test-resident")
    os.ftruncate(fd, weights.nbytes)
    with mmap.mmap(fd, weights.nbytes) as m:
        np.frombuffer(m, np.float32)[:] = weights
    rid = next(_ids)
    backend.put_resident(rid, os.dup(fd), weights.nbytes)
    backend.put_resident(rid, fd, weights.nbytes)  # the same content again: a no-op that closes fd
    arena = Arena(backend, 4 * 2**20)
    res = ExecBuffer("resident", "float32", (n,), weights.nbytes, resident=rid)
    for _ in range(2):
        ox, x = arena.place(rng.standard_normal(n, dtype=np.float32))
        oo, out = arena.place(np.zeros(n, np.float32))
        ok(run(backend, ExecGraph((arena.buffer("in", ox, x), res, arena.buffer("out", oo, out)),
                                  (kernel("t_mul", 128, 256, Buf(0), Buf(1), Buf(2), Lit("i32", n)),))))
        np.testing.assert_array_equal(out, x * weights)
    backend.evict_resident(rid)
    backend.evict_resident(rid)  # absent: a no-op
    with pytest.raises(errors.UnknownResident):
        backend.submit(next(_ids), ExecGraph((res,), ()), 0.0, 0)
    arena.close()


def test_many_graphs_share_the_lanes(backend: Any, rng: np.random.Generator) -> None:
    """More graphs than lanes, both priorities: each lands exactly once, with its own result."""
    n, count = 50_000, 40
    arena = Arena(backend, count * 3 * (4 * n + 256))
    cases = []
    for i in range(count):
        oa, a = arena.place(rng.standard_normal(n, dtype=np.float32))
        ob, b = arena.place(rng.standard_normal(n, dtype=np.float32))
        oc, c = arena.place(np.zeros(n, np.float32))
        g = ExecGraph((arena.buffer("in", oa, a), arena.buffer("in", ob, b), arena.buffer("out", oc, c)),
                      (kernel("t_vadd", 64, 256, Buf(0), Buf(1), Buf(2), Lit("i32", n)),))
        cases.append((1000 + i, g, a, b, c))
    for token, g, *_ in cases:
        backend.submit(token, g, 0.0, int(token % 3 == 0))
    done = wait(backend, {t for t, *_ in cases})
    for token, _, a, b, c in cases:
        ok(done[token])
        np.testing.assert_array_equal(c, a + b)
    assert not backend.busy
    arena.close()


@pytest.mark.parametrize(("block", "shared"), [(2048, 0), (256, 1 << 20)])
def test_bad_launch_config_is_a_typed_error(backend: Any, block: int, shared: int) -> None:
    n = 1024
    arena = Arena(backend, 3 * 4096)
    oa, a = arena.place(np.ones(n, np.float32))
    oc, c = arena.place(np.full(n, 5.0, np.float32))
    g = ExecGraph((arena.buffer("in", oa, a), arena.buffer("out", oc, c)),
                  (kernel("t_noop", 1, 1, Buf(1)),
                   kernel("t_vadd", 4, block, Buf(0), Buf(0), Buf(1), Lit("i32", n), shared=shared)))
    done = run(backend, g)
    assert isinstance(done.error, errors.KernelFault), done
    assert done.error.detail["kernel"] == "t_vadd" and done.error.detail["index"] == 1
    assert done.error.detail["cuda_error"].startswith("CUDA_ERROR_")
    assert "t_vadd" in str(done.error)
    assert (c == 5.0).all(), "a failed graph must leave its outputs untouched"
    assert not backend.poisoned
    # The backend carries on.
    ok(run(backend, ExecGraph(g.buffers, (kernel("t_vadd", 4, 256, Buf(0), Buf(0), Buf(1), Lit("i32", n)),))))
    assert (c == 2.0).all()
    arena.close()


def test_library_errors_and_cache(backend: Any) -> None:
    from broker.streams.compiler import compile_cuda

    assert backend.load_library(LIB, "cuda", SOURCE, KERNELS, ()) == ""  # cached by digest
    with pytest.raises(errors.UnknownKernel, match="t_missing"):
        backend.load_library("lib-missing", "cuda", SOURCE, (KernelSpec("t_missing", ()),), ())
    with pytest.raises(errors.CompileError) as info:
        backend.load_library("lib-bad", "cuda", b'extern "C" __global__ void f() { nonsense; }', (), ())
    assert "nonsense" in info.value.detail["log"]
    with pytest.raises(errors.SignatureMismatch, match="takes 4 parameter"):  # spec declares 3, kernel has 4
        backend.load_library("lib-mismatch", "cuda", SOURCE, (KernelSpec("t_vadd", KERNELS[0].params[:3]),), ())
    with pytest.raises(errors.CompileError):
        backend.load_library("lib-garbage", "cubin", b"\x7fELF not really", (), ())
    cubin, _ = compile_cuda(SOURCE, backend.arch)
    backend.load_library("lib-cubin", "cubin", cubin, KERNELS[:1], ())
    arena = Arena(backend, 4096)
    o, c = arena.place(np.ones(8, np.float32))
    ok(run(backend, ExecGraph((arena.buffer("inout", o, c),),
                              (ExecKernel("lib-cubin", "t_vadd", (1, 1, 1), (8, 1, 1), 0,
                                          (Buf(0), Buf(0), Buf(0), Lit("i32", 8))),))))
    assert (c == 2.0).all()
    arena.close()


def test_one_gib_arena_round_trip(backend: Any, rng: np.random.Generator) -> None:
    size = 2**30
    arena = Arena(backend, size)
    x = arena.view(0, size // 4, np.uint32)
    x[:] = rng.integers(0, 2**32, size=x.size, dtype=np.uint32)
    expect = x + np.uint32(1)
    done = run(backend, ExecGraph((ExecBuffer("inout", "uint32", (x.size,), size, arena.id, 0),),
                                  (kernel("t_inc", 4096, 256, Buf(0), Lit("u64", x.size)),)))
    ok(done)
    np.testing.assert_array_equal(x, expect)
    assert done.timings is not None
    print(f"1 GiB: copy_in {done.timings.copy_in * 1e3:.1f} ms ({size / done.timings.copy_in / 1e9:.1f} GB/s), "
          f"copy_out {done.timings.copy_out * 1e3:.1f} ms ({size / done.timings.copy_out / 1e9:.1f} GB/s)")
    arena.close()


# -- faults: each in a subprocess, since they poison the process ---------------------------
_FAULT_PRELUDE = """
import json, mmap, os, time
import numpy as np
from broker import errors
from broker.protocol import Buf, Lit
from broker.streams.cuda_backend import CudaBackend
from broker.streams.wire import ExecBuffer, ExecGraph, ExecKernel
from tests.gpu.test_cuda_backend import SOURCE, KERNELS, LIB
b = CudaBackend(0)
b.load_library(LIB, "cuda", SOURCE, KERNELS, ())
fd = os.memfd_create("a"); os.ftruncate(fd, 1 << 20)
mm = mmap.mmap(fd, 1 << 20); b.pin_arena(1, os.dup(fd), 1 << 20); os.close(fd)
out = np.frombuffer(mm, np.float32, 256)
out[:] = 42.0
def wait(token, limit=30.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        for c in b.poll():
            return c
    raise SystemExit("no completion")
"""


def _in_subprocess(body: str) -> dict[str, Any]:
    code = _FAULT_PRELUDE + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=ROOT, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"subprocess failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def test_illegal_address_is_a_kernel_fault_and_poisons() -> None:
    result = _in_subprocess("""
        g = ExecGraph((ExecBuffer("out", "float32", (256,), 1024, 1, 0),),
                      (ExecKernel(LIB, "t_poke", (1, 1, 1), (256, 1, 1), 0, (Buf(0), Lit("u64", 0xDEAD0000000))),))
        b.submit(7, g, 0.0, 0)
        c = wait(7)
        refused = ""
        try:
            b.submit(8, g, 0.0, 0)
        except errors.DeviceError as exc:
            refused = type(exc).__name__
        b.close(); b.close()
        print(json.dumps({"token": c.token, "error": type(c.error).__name__, "detail": c.error.detail,
                          "message": str(c.error), "poisoned": b.poisoned, "untouched": bool((out == 42.0).all()),
                          "refused": refused}))
    """)
    assert result["token"] == 7
    assert result["error"] == "KernelFault", result
    assert result["detail"]["cuda_error"] in ("CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_LAUNCH_FAILED"), result
    assert result["detail"]["kernel"] == "t_poke"
    assert result["poisoned"] is True
    assert result["untouched"] is True, "a faulted graph must not write its outputs back"
    assert result["refused"] == "DeviceError"


def test_missed_deadline_poisons() -> None:
    result = _in_subprocess("""
        g = ExecGraph((), (ExecKernel(LIB, "t_spin", (1, 1, 1), (1, 1, 1), 0, (Lit("u64", 3_000_000_000),)),))
        t0 = time.monotonic()
        b.submit(9, g, 0.2, 0)
        c = wait(9)
        print(json.dumps({"error": type(c.error).__name__, "after": time.monotonic() - t0, "poisoned": b.poisoned,
                          "busy": b.busy}))
        b.close()
        os._exit(0)
    """)
    assert result["error"] == "DeadlineExceeded", result
    assert 0.2 <= result["after"] < 2.5
    assert result["poisoned"] is True


# -- kaas-std: every kernel of tenantlib.kernels against its host implementation -----------
def _std() -> Any:
    try:
        import tenantlib.kernels as std
        import tenantlib.kernels.host  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"tenantlib.kernels not importable: {exc}")
    return std


def _std_cases(std: Any, rng: np.random.Generator) -> dict[str, tuple[list[tuple[str, np.ndarray]], list[Any]]]:
    """Per kernel: buffers (kind, initial data) and kernel nodes (name, grid, block, args)."""
    f32 = np.float32
    n = 100_003
    M, N, K = 70, 50, 40
    nx, ny = 67, 45
    (rg, rb), (fg, fb) = std.reduce_launch(n), std.reduce_final_launch()
    g1, b1 = std.launch_1d(n)
    return {
        "null": ([], [("null", (1, 1, 1), (1, 1, 1), ())]),
        "vadd": ([("in", rng.standard_normal(n, f32)), ("in", rng.standard_normal(n, f32)), ("out", np.zeros(n, f32))],
                 [("vadd", g1, b1, (Buf(0), Buf(1), Buf(2), Lit("i32", n)))]),
        "axpy": ([("in", rng.standard_normal(n, f32)), ("inout", rng.standard_normal(n, f32))],
                 [("axpy", g1, b1, (Lit("f32", 1.75), Buf(0), Buf(1), Lit("i32", n)))]),
        "sgemm": ([("in", rng.standard_normal((M, K), f32)), ("in", rng.standard_normal((K, N), f32)),
                   ("out", np.zeros((M, N), f32))],
                  [("sgemm", *std.sgemm_launch(M, N), (Buf(0), Buf(1), Buf(2), Lit("i32", M), Lit("i32", N),
                                                       Lit("i32", K)))]),
        "reduce_partial": ([("in", rng.standard_normal(n, f32)), ("temp", np.zeros(rg[0], f32)), ("out", np.zeros(1, f32))],
                           [("reduce_partial", rg, rb, (Buf(0), Buf(1), Lit("i32", n))),
                            ("reduce_final", fg, fb, (Buf(1), Buf(2), Lit("i32", rg[0])))]),
        "jacobi2d": ([("in", rng.standard_normal((ny, nx), f32)), ("out", np.zeros((ny, nx), f32))],
                     [("jacobi2d", *std.jacobi_launch(nx, ny), (Buf(0), Buf(1), Lit("i32", nx), Lit("i32", ny)))]),
        "bias_relu": ([("in", rng.standard_normal((M, N), f32)), ("in", rng.standard_normal(N, f32)),
                       ("out", np.full((M, N), np.nan, f32))],
                      [("bias_relu", *std.launch_1d(M * N), (Buf(0), Buf(1), Buf(2), Lit("i32", M), Lit("i32", N)))]),
    }


def _run_std(backend: Backend, library: str, buffers: list[tuple[str, np.ndarray]],
             nodes: list[Any]) -> list[np.ndarray]:
    total = sum(arr.nbytes + 256 for _, arr in buffers) + 4096
    arena = Arena(backend, total)
    specs, views = [], []
    for kind, data in buffers:
        if kind == "temp":
            specs.append(ExecBuffer("temp", str(data.dtype), data.shape, data.nbytes))
            views.append(data)
            continue
        offset, v = arena.place(data)
        specs.append(ExecBuffer(kind, str(data.dtype), data.shape, data.nbytes, arena.id, offset))
        views.append(v.reshape(data.shape))
    graph = ExecGraph(tuple(specs), tuple(ExecKernel(library, name, tuple(g), tuple(b), 0, args)
                                          for name, g, b, args in nodes))
    ok(run(backend, graph))
    result = [v.copy() for v in views]
    arena.close()
    return result


def test_kaas_std_kernels_match_their_host_implementations(backend: Any, rng: np.random.Generator) -> None:
    from broker.streams.cpu_backend import CpuBackend

    std = _std()
    cpu = CpuBackend(0, host_modules=("tenantlib.kernels",), compile_check="")
    library = "kaas-std-under-test"
    backend.load_library(library, "cuda", std.SOURCE.encode(), std.KERNELS, ())
    cpu.load_library(library, "cuda", std.SOURCE.encode(), std.KERNELS, ())
    cases = _std_cases(std, rng)
    covered = {name for _, nodes in cases.values() for name, *_ in nodes}
    missing = {k.name for k in std.KERNELS} - covered
    assert not missing, f"kaas-std kernels without a GPU test case: {sorted(missing)}"
    for name, (buffers, nodes) in cases.items():
        gpu_out = _run_std(backend, library, buffers, nodes)
        cpu_out = _run_std(cpu, library, buffers, nodes)
        for (kind, _), g, c in zip(buffers, gpu_out, cpu_out, strict=True):
            if kind in ("out", "inout"):
                rtol = 1e-4 if name in ("sgemm",) else 1e-6
                np.testing.assert_allclose(g, c, rtol=rtol, atol=1e-5, err_msg=f"kaas-std {name}")
    cpu.close()


def test_unload_library_frees_the_module_and_its_cached_graphs(backend: Any) -> None:
    backend.load_library("lib-unload", "cuda", SOURCE, KERNELS, ())
    arena = Arena(backend, 4096)
    o, c = arena.place(np.ones(8, np.float32))
    graph = ExecGraph((arena.buffer("inout", o, c),),
                      (ExecKernel("lib-unload", "t_vadd", (1, 1, 1), (8, 1, 1), 0, (Buf(0), Buf(0), Buf(0), Lit("i32", 8))),))
    for _ in range(3):  # cached as a shape (and, with cuda_graphs, captured)
        ok(run(backend, graph))
    backend.unload_library("lib-unload")
    backend.unload_library("lib-unload")  # a no-op the second time
    with pytest.raises(errors.UnknownLibrary):
        run(backend, graph)
    arena.close()
