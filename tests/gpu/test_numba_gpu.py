"""Numba kernels through the broker on CUDA, against numpy on fresh random data."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import tenantlib
from tenantlib import numba as kn  # imported before numba: it mends numba-cuda 0.30's import under numpy 2.5
from tests.gpu.test_cuda_backend import _no_cuda_reason

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_no_cuda_reason()), reason=_no_cuda_reason() or "-"),
              pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                 reason="numba-cuda is not installed (pip install 'kaas[numba]')")]


def test_numba_kernels_run_through_the_broker(gclient: tenantlib.Client) -> None:
    from numba import cuda

    @cuda.jit
    def axpy(a, x, y):  # type: ignore[no-untyped-def]
        i = cuda.grid(1)
        if i < x.size:
            y[i] = a * x[i] + y[i]

    @cuda.jit
    def scale2d(m, out, s):  # type: ignore[no-untyped-def]
        i, j = cuda.grid(2)
        if i < m.shape[0] and j < m.shape[1]:
            out[i, j] = m[i, j] * s + i - j

    c = gclient
    rng = np.random.default_rng()
    k = kn.compile(c, axpy, "void(float32, float32[::1], float32[::1])", access={"x": "in"})
    n = 100_001
    x, y = c.array(n), c.array(n)
    x[...] = rng.standard_normal(n, dtype=np.float32)
    y[...] = rng.standard_normal(n, dtype=np.float32)
    a = np.float32(rng.standard_normal())
    want = a * x + y
    g = c.graph()
    k[(n + 255) // 256, 256](g, float(a), x, y)
    r = c.run(g, timeout=60)
    assert r.device.startswith("cuda:")
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)  # Numba may contract a*x+y into an FMA

    k2 = kn.compile(c, scale2d, "void(float64[:, ::1], float64[:, ::1], float64)", access={"m": "in", "out": "out"})
    m = c.array((300, 70), np.float64)
    out = c.array((300, 70), np.float64)
    m[...] = rng.standard_normal((300, 70))
    g = c.graph()
    k2[(19, 5), (16, 16)](g, m, out, 3.0)
    c.run(g, timeout=60)
    i, j = np.indices((300, 70))
    # An FMA (m * s + i in one rounding) moves a result near 0 by an ulp of the sum: an absolute tolerance
    np.testing.assert_allclose(out, m * 3.0 + i - j, rtol=1e-12, atol=1e-12)
