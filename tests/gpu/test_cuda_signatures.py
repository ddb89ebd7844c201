"""Kernels whose signatures nobody wrote, on CUDA: read from source, checked by the worker, launched
with ``Graph.launch``; dynamic shared memory above 48 KiB; refusals of what kaas cannot launch."""

from __future__ import annotations

import numpy as np
import pytest

import tenantlib
from broker import errors
from broker.protocol import KernelSpec, Param
from tests.gpu.test_cuda_backend import _no_cuda_reason

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_no_cuda_reason()), reason=_no_cuda_reason() or "-")]

_SOURCE = r"""
extern "C" __global__ void affine(const double* __restrict__ x, float* y, double a, float b,
                                  unsigned long long n) {
  unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
  if (i < n) y[i] = (float)(a * x[i]) + b;
}
// Each block stages 16384 floats (64 KiB) of x in dynamic shared memory, then writes them reversed.
extern "C" __global__ void reverse_tiles(const float* x, float* y, int n) {
  extern __shared__ float tile[];
  const int per = 16384;
  int base = blockIdx.x * per;
  for (int i = threadIdx.x; i < per; i += blockDim.x) tile[i] = base + i < n ? x[base + i] : 0.0f;
  __syncthreads();
  for (int i = threadIdx.x; i < per; i += blockDim.x)
    if (base + i < n) y[base + i] = tile[per - 1 - i];
}
"""


def test_the_welcome_names_the_gpu_architecture(gclient: tenantlib.Client) -> None:
    assert gclient.arch.startswith("sm_")


def test_a_library_without_signatures_runs_on_the_gpu(gclient: tenantlib.Client) -> None:
    c = gclient
    lib = c.library(_SOURCE, access={"affine": {"y": "out"}, "reverse_tiles": {"y": "out"}})
    assert lib["affine"].params == (Param("x", "buf", "in", "float64"), Param("y", "buf", "out", "float32"),
                                    Param("a", "f64"), Param("b", "f32"), Param("n", "u64"))
    rng = np.random.default_rng()
    n = 100_003
    x = c.arena(n * 8).array((n,), np.float64)
    x[...] = rng.standard_normal(n)
    y = c.array(n)
    a, b = float(rng.standard_normal()), float(np.float32(rng.standard_normal()))
    g = c.graph()
    g.launch(lib.affine, (n + 255) // 256, 256, x, y, a, b, np.uint64(n))
    c.run(g, timeout=30)
    np.testing.assert_array_equal(y, (a * x).astype(np.float32) + np.float32(b))


def test_dynamic_shared_memory_above_48_kib(gclient: tenantlib.Client) -> None:
    c = gclient
    lib = c.library(_SOURCE, access={"affine": {"y": "out"}, "reverse_tiles": {"y": "out"}})
    rng = np.random.default_rng()
    per = 16384
    n = 3 * per + 1000
    x, y = c.array(n), c.array(n)
    x[...] = rng.standard_normal(n, dtype=np.float32)
    g = c.graph()
    g.launch(lib.reverse_tiles, (n + per - 1) // per, 256, x, y, n, shared=per * 4)
    c.run(g, timeout=30)
    padded = np.zeros(4 * per, np.float32)
    padded[:n] = x
    want = padded.reshape(4, per)[:, ::-1].reshape(-1)[:n]
    np.testing.assert_array_equal(y, want)


def test_the_gpu_worker_refuses_wrong_signatures_and_cluster_kernels(gclient: tenantlib.Client) -> None:
    c = gclient
    wrong = KernelSpec("affine", (Param("x", "buf", "in", "float32"), Param("y", "buf", "out", "float32"),
                                  Param("a", "f64"), Param("b", "f32"), Param("n", "u64")))
    with pytest.raises(errors.SignatureMismatch, match=r"parameter 0 \('x'\) points to float64 in the source"):
        c.library(_SOURCE, kernels=[wrong])
    cluster = 'extern "C" __global__ void __cluster_dims__(2, 1, 1) k(float* x) { x[0] = 1; }'
    with pytest.raises(errors.UnsupportedFeature, match="thread-block clusters"):
        c.library(cluster)  # refused where the signature is read
    with pytest.raises(errors.UnsupportedFeature, match="thread-block clusters"):
        c.library(cluster, kernels=[KernelSpec("k", (Param("x", "buf", "out"),))])  # and by the worker
    assert c.ping() > 0
