"""Triton kernels through the broker on CUDA, against numpy on fresh random data: an elementwise
kernel, and the BLAS-class GEMM (fp32 IEEE, fp16 on tensor cores with 96 KiB of shared memory)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import tenantlib
from tests.gpu.test_cuda_backend import _no_cuda_reason

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_no_cuda_reason()), reason=_no_cuda_reason() or "-"),
              pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="Triton is not installed (pip install 'kaas[triton]')")]


def test_a_triton_kernel_runs_through_the_broker(gclient: tenantlib.Client) -> None:
    import triton
    import triton.language as tl

    from tenantlib import triton as kt

    @triton.jit
    def kaas_axpby(x, y, out, a, b, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(out + offs, a * tl.load(x + offs, mask=m) + b * tl.load(y + offs, mask=m), mask=m)

    c = gclient
    k = kt.compile(c, kaas_axpby, {"x": "*fp32", "y": "*fp32", "out": "*fp32", "a": "fp32", "b": "fp32", "n": "i32"},
                   constexprs={"BLOCK": 1024}, access={"x": "in", "y": "in", "out": "out"},
                   options={"enable_fp_fusion": False})
    rng = np.random.default_rng()
    n = 1_000_003
    x, y, z = c.array(n), c.array(n), c.array(n)
    x[...] = rng.standard_normal(n, dtype=np.float32)
    y[...] = rng.standard_normal(n, dtype=np.float32)
    a, b = np.float32(rng.standard_normal()), np.float32(rng.standard_normal())
    g = c.graph()
    k[(n + 1023) // 1024,](g, x, y, z, float(a), float(b), n)
    r = c.run(g, timeout=60)
    assert r.device.startswith("cuda:")
    np.testing.assert_array_equal(z, a * x + b * y)


@pytest.mark.parametrize(("dtype", "shape", "rtol"), [
    ("float32", (257, 130, 77), 1e-5), ("float32", (512, 512, 512), 1e-5), ("float16", (1024, 512, 256), 2e-2),
])
def test_gemm_matches_numpy(gclient: tenantlib.Client, dtype: str, shape: tuple[int, int, int], rtol: float) -> None:
    from tenantlib.gemm import Gemm

    c = gclient
    m, n, kk = shape
    gemm = Gemm(c, dtype)
    rng = np.random.default_rng()
    a = c.array((m, kk), dtype)
    b = c.array((kk, n), dtype)
    out = c.array((m, n), dtype)
    a[...] = rng.standard_normal((m, kk)).astype(dtype)
    b[...] = rng.standard_normal((kk, n)).astype(dtype)
    out[...] = rng.standard_normal((m, n)).astype(dtype)
    before = out.astype(np.float64)
    g = c.graph()
    gemm(g, g.input(a), g.input(b), g.inout(out), alpha=0.5, beta=-2.0)
    c.run(g, timeout=120)
    want = 0.5 * (a.astype(np.float64) @ b.astype(np.float64)) - 2.0 * before
    scale = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)) * 0.5 + 2.0 * np.abs(before)
    assert np.all(np.abs(out.astype(np.float64) - want) <= rtol * scale + 1e-6)
    g = c.graph()
    gemm(g, g.input(a), g.input(b), g.output(out))  # beta = 0: C is only written
    c.run(g, timeout=120)
    want = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))
    assert np.all(np.abs(out.astype(np.float64) - want) <= rtol * scale + 1e-6)
