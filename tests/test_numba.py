"""The Numba front end without a GPU: the array ABI as a kaas signature, PTX to CUBIN, launches,
refusals, registration with a CPU broker."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

import tenantlib
from broker import errors
from broker.protocol import Buf, KernelSpec, Lit, Param
from broker.streams.cubin import read_cubin
from tenantlib import numba as kn  # imported before numba: it mends numba-cuda 0.30's import under numpy 2.5


def _have_numba_cuda() -> bool:
    if importlib.util.find_spec("numba_cuda") is not None:
        return True
    try:  # find_spec of a submodule imports its parent, and raises when that is missing
        return importlib.util.find_spec("numba.cuda") is not None
    except ModuleNotFoundError:
        return False


pytestmark = pytest.mark.skipif(not _have_numba_cuda(), reason="numba-cuda is not installed (pip install 'kaas[numba]')")
_HOST = "tenantlib.kernels.host:null"  # the CPU device needs one to register; never run here


def _kernels() -> tuple[Any, Any]:
    from numba import cuda

    def axpy(a, x, y):  # type: ignore[no-untyped-def]
        i = cuda.grid(1)
        if i < x.size:
            y[i] = a * x[i] + y[i]

    def scale2d(m, out, s):  # type: ignore[no-untyped-def]
        i, j = cuda.grid(2)
        if i < m.shape[0] and j < m.shape[1]:
            out[i, j] = m[i, j] * s

    return axpy, scale2d


def test_build_lays_out_arrays_as_numba_passes_them() -> None:
    axpy, scale2d = _kernels()
    spec, arrays, cubin = kn.build(axpy, "void(float32, float32[::1], float32[::1])", access={"x": "in"})
    assert [p.name for p in spec.params] == [
        "a", "x.meminfo", "x.parent", "x.nitems", "x.itemsize", "x", "x.shape0", "x.stride0",
        "y.meminfo", "y.parent", "y.nitems", "y.itemsize", "y", "y.shape0", "y.stride0"]
    assert spec.params[5] == Param("x", "buf", "in", "float32") and spec.params[12].access == "inout"
    assert arrays == ((1, "float32", 1), (2, "float32", 1))
    assert list(read_cubin(cubin)) == [spec.name]
    spec2, arrays2, _ = kn.build(scale2d, "void(float64[:, ::1], float64[:, ::1], float64)", access={"out": "out"})
    assert len(spec2.params) == 2 * (5 + 4) + 1 and arrays2 == ((0, "float64", 2), (1, "float64", 2))


@pytest.mark.parametrize(("sig", "access", "error", "message"), [
    ("void(float32, float32[::1])", None, errors.ArgumentError, "takes 3 parameter"),
    ("void(float32, complex64[::1], float32[::1])", None, errors.UnsupportedFeature, "array of complex64"),
    ("void(float32, float32[::1, :], float32[::1])", None, errors.UnsupportedFeature, "layout 'F'"),
    ("void(boolean, float32[::1], float32[::1])", None, errors.UnsupportedFeature, "Numba type bool"),
    ("void(float32, float32[::1], float32[::1])", {"a": "in"}, errors.SignatureMismatch, "not an array parameter"),
    ("not a signature(", None, errors.ArgumentError, "not a Numba signature"),
])
def test_build_refusals(sig: str, access: dict[str, str] | None, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        kn.build(_kernels()[0], sig, access=access)


def test_a_launch_passes_shape_and_strides_as_literals(client: tenantlib.Client) -> None:
    _, scale2d = _kernels()
    k = kn.compile(client, scale2d, "void(float64[:, ::1], float64[:, ::1], float64)", access={"m": "in", "out": "out"},
                   host=_HOST)
    g = client.graph()
    m, out = client.array((3, 5), np.float64), client.array((3, 5), np.float64)
    k[(1, 1), (4, 8)](g, m, out, 2.0)
    args = g.spec(client.locate).kernels[0].args
    assert args[:9] == (Lit("u64", 0), Lit("u64", 0), Lit("i64", 15), Lit("i64", 8), Buf(0), Lit("i64", 3),
                        Lit("i64", 5), Lit("i64", 40), Lit("i64", 8))
    assert args[-1] == Lit("f64", 2.0)
    client.prepare(g)
    with pytest.raises(errors.ArgumentError, match="is 2-D, got a 1-D array"):
        k[1, 1](client.graph(), client.array(3, np.float64), out, 2.0)
    with pytest.raises(errors.ArgumentError, match="kernel\\[grid, block\\]"):
        k[1](client.graph(), m, out, 2.0)
    # The worker checks a declared signature against the CUBIN (Numba names each compile anew).
    spec, _, cubin = kn.build(scale2d, "void(float64[:, ::1], float64[:, ::1], float64)")
    wrong = KernelSpec(spec.name, spec.params[:-1], _HOST)
    with pytest.raises(errors.SignatureMismatch, match="takes 19 parameter"):
        client.library(cubin, kernels=[wrong])
