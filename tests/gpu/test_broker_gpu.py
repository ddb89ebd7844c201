"""The whole request path on CUDA: a broker with --device cuda, tenants, numpy as the judge."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import tenantlib
from tenantlib import kernels
from tests.conftest import ROOT
from tests.gpu.test_cuda_backend import _no_cuda_reason
from tools.broker_process import BrokerProcess

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_no_cuda_reason()), reason=_no_cuda_reason() or "-")]


def fresh(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    a[...] = rng.standard_normal(a.shape, dtype=np.float32)
    return a


def test_every_shipped_kernel_on_the_gpu_matches_numpy(gclient: tenantlib.Client) -> None:
    rng = np.random.default_rng()
    c = gclient
    lib = kernels.library(c)
    for n in (1, 1000, 1 << 20):
        x, y, z = fresh(c.array(n), rng), fresh(c.array(n), rng), c.array(n)
        z[...] = np.nan
        g = c.graph()
        grid, block = kernels.launch_1d(n)
        g.kernel(lib, "vadd", grid=grid, block=block, args=[g.input(x), g.input(y), g.output(z), n])
        r = c.run(g, timeout=30)
        assert r.device.startswith("cuda:")
        np.testing.assert_array_equal(z, kernels.ref_vadd(x, y))
        y0 = y.copy()
        g = c.graph()
        g.kernel(lib, "axpy", grid=grid, block=block, args=[-1.5, g.input(x), g.inout(y), n])
        c.run(g)
        np.testing.assert_allclose(y, kernels.ref_axpy(-1.5, x, y0), rtol=1e-6, atol=1e-6)
        out = c.array(1)
        g = c.graph()
        rgrid, rblock = kernels.reduce_launch(n)
        part = g.temp(rgrid[0])
        g.kernel(lib, "reduce_partial", grid=rgrid, block=rblock, args=[g.input(x), part, n])
        fg, fb = kernels.reduce_final_launch()
        g.kernel(lib, "reduce_final", grid=fg, block=fb, args=[part, g.output(out), rgrid[0]])
        c.run(g)
        assert out[0] == pytest.approx(kernels.ref_sum(x), rel=1e-4, abs=1e-2)
    for M, N, K in ((1, 1, 1), (70, 33, 45), (1024, 1024, 1024)):
        A, B, C = fresh(c.array((M, K)), rng), fresh(c.array((K, N)), rng), c.array((M, N))
        C[...] = np.nan
        g = c.graph()
        grid, block = kernels.sgemm_launch(M, N)
        g.kernel(lib, "sgemm", grid=grid, block=block, args=[g.input(A), g.input(B), g.output(C), M, N, K])
        c.run(g)
        ref = kernels.ref_sgemm(A, B)
        assert np.linalg.norm(C - ref) / max(np.linalg.norm(ref), 1e-30) < 1e-5
    u, v = fresh(c.array((300, 257)), rng), c.array((300, 257))
    g = c.graph()
    grid, block = kernels.jacobi_launch(257, 300)
    src = g.input(u)
    t = [g.temp((300, 257)), g.temp((300, 257))]
    for i in range(5):
        dst = g.output(v) if i == 4 else t[i % 2]
        g.kernel(lib, "jacobi2d", grid=grid, block=block, args=[src, dst, 257, 300])
        src = dst
    c.run(g)
    ref = u
    for _ in range(5):
        ref = kernels.ref_jacobi(ref)
    np.testing.assert_allclose(v, ref, rtol=1e-6, atol=1e-6)  # float64 reference, rounded once


def test_resident_reuse_copies_nothing_the_second_time(gclient: tenantlib.Client) -> None:
    rng = np.random.default_rng()
    c = gclient
    lib = kernels.library(c)
    n = 1 << 16
    w = fresh(c.array(n), rng)
    res = c.resident(w)
    x, out = fresh(c.array(n), rng), c.array(n)
    g = c.graph()
    grid, block = kernels.launch_1d(n)
    g.kernel(lib, "vadd", grid=grid, block=block, args=[g.resident(res), g.input(x), g.output(out), n])
    puts = []
    for _ in range(3):
        c.run(g)
        np.testing.assert_array_equal(out, kernels.ref_vadd(w, x))
        puts.append(c.status()["stats"]["resident_puts"])
    assert puts[1] == puts[0] == puts[2]  # put once, on first use; later graphs copy no resident bytes


def test_several_tenants_at_once(gpu_broker: BrokerProcess) -> None:
    code = ("import sys, numpy as np, tenantlib\nfrom tenantlib import kernels\nfrom tools.workloads import make\n"
            "rng = np.random.default_rng()\n"
            "with tenantlib.connect(sys.argv[1]) as c:\n"
            "    w = make(c, kernels.library(c), sys.argv[2], 512)\n"
            "    ok = 0\n"
            "    for _ in range(50):\n"
            "        w.refresh(rng); r = c.run(w.graph); ok += w.check() and r.device.startswith('cuda')\n"
            "print(ok)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, gpu_broker.socket, w], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT) for w in ("sgemm", "jacobi", "vadd", "sgemm", "jacobi", "vadd")]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0] * 6
    assert outs == ["50"] * 6


def test_one_gib_arena_round_trip(gclient: tenantlib.Client) -> None:
    c = gclient
    lib = kernels.library(c)
    n = (1 << 30) // 4
    x = c.array(n)
    x[...] = np.arange(n, dtype=np.float32)
    x0 = x[:: 1 << 16].copy()
    g = c.graph()
    g.inout(x)
    g.kernel(lib, "null", grid=1, block=1, args=[])
    r = c.run(g, timeout=60)
    np.testing.assert_array_equal(x[:: 1 << 16], x0)
    gb = (1 << 30) / 1e9
    print(f"1 GiB: copy in {gb / r.timings.copy_in:.1f} GB/s, copy out {gb / r.timings.copy_out:.1f} GB/s")


def test_memory_view_sets_the_accounting_beside_the_worker_and_the_device(gclient: tenantlib.Client) -> None:
    c = gclient
    lib = kernels.library(c)
    n = 256
    A, B, C = c.array((n, n)), c.array((n, n)), c.array((n, n))
    A[...], B[...] = 2.0, 1.0
    ra = c.resident(A)
    g = c.graph()
    grid, block = kernels.sgemm_launch(n, n)
    g.kernel(lib, "sgemm", grid=grid, block=block, args=[g.resident(ra), g.input(B), g.output(C), n, n, n])
    c.run(g)
    np.testing.assert_allclose(C, np.full((n, n), 2.0 * n, dtype=np.float32))
    [m] = c.admin("memory")
    w = m["worker"]
    # The resident lives on the GPU: the broker and the worker count the same bytes of it.
    assert m["accounted_residents"] >= A.nbytes and w["resident_bytes"] == m["accounted_residents"], m
    assert w["device_total"] > w["device_used"] >= w["resident_bytes"] + w["pool_reserved"]
    assert w["pool_reserved"] >= w["pool_used"] >= w["lane_slabs"] > 0  # the lane that ran holds its slab
