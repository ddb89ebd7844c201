"""CUTLASS GEMMs through the broker on CUDA, against numpy on fresh random data."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import tenantlib
from tests.gpu.test_cuda_backend import _no_cuda_reason

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_no_cuda_reason()), reason=_no_cuda_reason() or "-"),
              pytest.mark.skipif(importlib.util.find_spec("cutlass_library") is None,
                                 reason="the CUTLASS headers are not installed (pip install 'kaas[cutlass]')")]


@pytest.mark.parametrize(("dtype", "shape", "rtol"), [
    ("float32", (300, 200, 130), 1e-5), ("float16", (1000, 520, 264), 1e-5),
])
def test_cutlass_gemm_matches_numpy(gclient: tenantlib.Client, dtype: str, shape: tuple[int, int, int],
                                    rtol: float) -> None:
    from tenantlib.cutlass import CutlassGemm

    c = gclient
    m, n, k = shape
    gemm = CutlassGemm(c, dtype)
    rng = np.random.default_rng()
    a, b = c.array((m, k), dtype), c.array((k, n), dtype)
    out = c.array((m, n))
    a[...] = rng.standard_normal((m, k)).astype(dtype)
    b[...] = rng.standard_normal((k, n)).astype(dtype)
    out[...] = rng.standard_normal((m, n), dtype=np.float32)
    before = out.astype(np.float64)
    g = c.graph()
    gemm(g, g.input(a), g.input(b), g.inout(out), alpha=1.5, beta=0.25)
    c.run(g, timeout=120)
    exact = a.astype(np.float64) @ b.astype(np.float64)  # fp16 products are exact in fp32
    want = 1.5 * exact + 0.25 * before
    scale = 1.5 * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))) + 0.25 * np.abs(before)
    assert np.all(np.abs(out - want) <= rtol * scale + 1e-6)
