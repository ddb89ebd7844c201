"""The Triton front end without a GPU: signatures, compilation to CUBIN, hidden parameters, refusals,
registration with a CPU broker (which holds the signature against the CUBIN)."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

import tenantlib
from broker import errors
from broker.protocol import Buf, KernelSpec, Lit, Param
from broker.streams.cubin import read_cubin
from tenantlib import triton as kt

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed (pip install 'kaas[triton]')")
_HOST = "tenantlib.kernels.host:null"  # the CPU device needs one to register; these tests never run it there


def test_kernel_spec_maps_triton_types() -> None:
    spec = kt.kernel_spec("k", {"x": "*fp32", "h": "*fp16", "b": "*bf16", "n": "i32", "m": "u64", "s": "fp32"},
                          access={"x": "in"}, scratch=(64, 0))
    assert spec.params == (
        Param("x", "buf", "in", "float32"), Param("h", "buf", "inout", "float16"), Param("b", "buf", "inout", ""),
        Param("n", "i32"), Param("m", "u64"), Param("s", "f32"),
        Param("global_scratch", "buf", "inout", "uint8"), Param("profile_scratch", "u64"))


@pytest.mark.parametrize(("sig", "access", "error", "message"), [
    ({"x": "i8"}, None, errors.UnsupportedFeature, "i8 scalar"),
    ({"x": "*weird"}, None, errors.UnsupportedFeature, "points to weird"),
    ({"x": "*fp32"}, {"y": "in"}, errors.SignatureMismatch, "not a pointer parameter"),
    ({"x": "*fp32"}, {"x": "both"}, errors.InvalidArgument, "must be in, out or inout"),
])
def test_kernel_spec_refusals(sig: dict[str, str], access: dict[str, str] | None, error: type[Exception],
                              message: str) -> None:
    with pytest.raises(error, match=message):
        kt.kernel_spec("k", sig, access)


@pytest.mark.parametrize(("meta", "message"), [
    ({"num_ctas": 2}, "num_ctas=2"), ({"launch_cooperative_grid": True}, "cooperative"),
    ({"launch_pdl": True}, "PDL"), ({"tensordesc_meta": [{"x": 1}]}, "TMA"),
])
def test_launch_features_kaas_lacks_are_refused(meta: dict[str, Any], message: str) -> None:
    with pytest.raises(errors.UnsupportedFeature, match=message):
        kt._refuse_features("k", meta)


def _fake_kernel(scratch: tuple[tuple[int, int], ...], divisible: dict[str, int] | None = None) -> kt.TritonKernel:
    spec = kt.kernel_spec("k", {"x": "*fp32", "n": "i32"}, scratch=(scratch[0][0], scratch[1][0]))
    lib = tenantlib.Library("e" * 64, "t", {"k": spec})
    return kt.TritonKernel(lib, spec, block=128, shared=70_000, scratch=scratch, divisible=divisible or {})


def test_a_launch_appends_hidden_arguments_block_and_shared() -> None:
    g = tenantlib.Graph()
    x = np.zeros(16, np.float32)
    _fake_kernel(((0, 1), (0, 1)))[(3, 2)](g, x, 16)
    node = g.spec(lambda a: (1, 0)).kernels[0]
    assert node.grid == (3, 2) and node.block == (128,) and node.shared == 70_000
    assert node.args == (Buf(0), Lit("i32", 16), Lit("u64", 0), Lit("u64", 0))
    g2 = tenantlib.Graph()
    _fake_kernel(((100, 16), (0, 1)))[(3, 2)](g2, x, 16)
    spec = g2.spec(lambda a: (1, 0))
    temp = next(i for i, b in enumerate(spec.buffers) if b.kind == "temp")
    assert spec.buffers[temp].shape == (600,) and spec.buffers[temp].dtype == "uint8"  # 100 bytes x 6 programs
    assert spec.kernels[0].args[2] == Buf(temp)


def test_divisibility_promises_are_checked_at_launch() -> None:
    k = _fake_kernel(((0, 1), (0, 1)), {"n": 16})
    k[1](tenantlib.Graph(), np.zeros(32, np.float32), 32)
    with pytest.raises(errors.ArgumentError, match="multiple of 16; 33 is not"):
        k[1](tenantlib.Graph(), np.zeros(33, np.float32), 33)
    with pytest.raises(errors.ArgumentError, match="takes 2 argument"):
        k[1](tenantlib.Graph(), np.zeros(33, np.float32))


def _add_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def kaas_add(x, y, out, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(out + offs, tl.load(x + offs, mask=m) + tl.load(y + offs, mask=m), mask=m)

    return kaas_add


_SIG = {"x": "*fp32", "y": "*fp32", "out": "*fp32", "n": "i32"}


@needs_triton
def test_build_compiles_to_a_cubin_with_the_hidden_parameters_where_expected() -> None:
    spec, meta = kt.build(_add_kernel(), _SIG, constexprs={"BLOCK": 256}, access={"x": "in", "y": "in", "out": "out"},
                          divisible={"n": 16}, num_warps=2)
    assert spec.name == "kaas_add" and meta["num_warps"] == 2
    entry = read_cubin(meta["cubin"])["kaas_add"]
    assert len(entry.params) == 6 and [p.size for p in entry.params] == [8, 8, 8, 4, 8, 8]
    assert [p.name for p in spec.params][-2:] == ["global_scratch", "profile_scratch"]


@needs_triton
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"signature": {"x": "*fp32"}}, "has no type in signature"),
    ({"constexprs": {"BLOCK": 256, "NOPE": 1}}, "no parameter 'NOPE'"),
    ({"divisible": {"n": 8}}, "divisible= takes 16"),
])
def test_build_refuses_bad_requests(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"signature": _SIG, "constexprs": {"BLOCK": 256}, **kwargs}
    with pytest.raises(errors.ArgumentError, match=message):
        kt.build(_add_kernel(), args.pop("signature"), **args)


@needs_triton
def test_a_triton_kernel_registers_with_the_broker(client: tenantlib.Client) -> None:
    k = kt.compile(client, _add_kernel(), _SIG, constexprs={"BLOCK": 256}, access={"x": "in", "y": "in", "out": "out"},
                   host=_HOST)
    assert k.block == 128 and k.library.kernels["kaas_add"].params[-1] == Param("profile_scratch", "u64")
    g = client.graph()
    x, y, z = (client.array(1000) for _ in range(3))
    k[(4,)](g, x, y, z, 1000)
    client.prepare(g)  # the broker validates the graph's structure against the signature
    # The worker holds a declared signature against the CUBIN: one parameter short is refused.
    spec, meta = kt.build(_add_kernel(), _SIG, constexprs={"BLOCK": 256})
    short = KernelSpec(spec.name, spec.params[:-1], _HOST)
    with pytest.raises(errors.SignatureMismatch, match="takes 6 parameter"):
        client.library(meta["cubin"], kernels=[short])


@needs_triton
def test_the_fp16_gemm_compiles_here_and_needs_more_than_48_kib_of_shared_memory() -> None:
    from tenantlib import gemm

    bm, bn, bk, warps, stages = gemm._TILES["float16"]
    sig = {"a": "*fp16", "b": "*fp16", "c": "*fp16", "M": "i32", "N": "i32", "K": "i32", "alpha": "fp32",
           "beta": "fp32"}
    spec, meta = kt.build(gemm._kernel(), sig, constexprs={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                                                           "PRECISION": "tf32", "BETA_ZERO": True},
                          num_warps=warps, num_stages=stages, access={"a": "in", "b": "in", "c": "out"},
                          divisible={"M": 16, "N": 16, "K": 16})
    assert meta["shared"] > 48 * 1024
    assert [p.kind for p in spec.params[:8]] == ["buf"] * 3 + ["i32"] * 3 + ["f32"] * 2


def test_gemm_refuses_bad_shapes_before_compiling() -> None:
    from tenantlib.gemm import Gemm

    with pytest.raises(errors.InvalidArgument, match="float32 or float16"):
        Gemm(None, "float64")


@needs_triton
def test_a_divisibility_promise_must_name_a_parameter() -> None:
    with pytest.raises(errors.ArgumentError, match="no parameter 'm'"):
        kt.build(_add_kernel(), _SIG, constexprs={"BLOCK": 256}, divisible={"m": 16})
