"""The CUTLASS front end without a GPU: NVRTC builds both GEMMs from the PyPI headers, the launch
description comes from the CUBIN, a CPU broker holds the signature against it."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import tenantlib
from broker import errors
from broker.protocol import KernelSpec
from broker.streams.cubin import read_cubin, read_symbol

pytestmark = pytest.mark.skipif(importlib.util.find_spec("cutlass_library") is None,
                                reason="the CUTLASS headers are not installed (pip install 'kaas[cutlass]')")


@pytest.mark.parametrize(("dtype", "threads"), [("float32", 256), ("float16", 128)])
def test_build_reads_the_launch_from_the_cubin(dtype: str, threads: int) -> None:
    from tenantlib import cutlass

    built = cutlass.build(dtype)
    assert built.threads == threads and built.tile == (128, 128)
    assert 0 < built.shared <= 227 * 1024
    entry = read_cubin(built.cubin)[built.spec.name]
    assert entry.max_threads[0] == threads  # __launch_bounds__(kThreadCount)
    assert [p.size for p in entry.params] == [8, 8, 8, 4, 4, 4, 4, 4]
    with pytest.raises(errors.CompileError, match="no symbol"):
        read_symbol(built.cubin, "nope")


def test_a_cutlass_gemm_registers_and_checks_shapes(client: tenantlib.Client) -> None:
    from tenantlib import cutlass

    built = cutlass.build("float16")
    gemm = cutlass.CutlassGemm(client, "float16", host="tenantlib.kernels.host:null")  # never run on the CPU
    g = client.graph()
    a, b, c = client.array((100, 64), np.float16), client.array((64, 200), np.float16), client.array((100, 200))
    gemm(g, g.input(a), g.input(b), g.output(c))
    node = g.spec(client.locate).kernels[0]
    assert node.grid == (1, 2, 1) and node.block == (128,) and node.shared == built.shared
    client.prepare(g)
    with pytest.raises(errors.ArgumentError, match="multiples of 8"):
        g2 = client.graph()
        gemm(g2, g2.input(client.array((4, 6), np.float16)), g2.input(client.array((6, 8), np.float16)),
             g2.output(client.array((4, 8))))
    wrong = KernelSpec(built.spec.name, built.spec.params[:-1], "tenantlib.kernels.host:null")
    with pytest.raises(errors.SignatureMismatch, match="takes 8 parameter"):  # the worker reads the CUBIN
        client.library(built.cubin, kernels=[wrong])
    with pytest.raises(errors.DtypeMismatch, match="expected float32"):
        g3 = client.graph()
        gemm(g3, g3.input(a), g3.input(b), g3.output(client.array((100, 200), np.float16)))
