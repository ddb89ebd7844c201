"""Graph validation (pure): every refusal typed, every accepted graph resolved correctly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import errors
from broker.graph import ArenaRef, ResidentRef, resolve
from broker.protocol import Buf, BufferSpec, GraphSpec, KernelNode, KernelSpec, Lit, Param

LIB = "a" * 64
SIGS = {
    "vadd": KernelSpec("vadd", (Param("a", "buf", "in", "float32"), Param("b", "buf", "in", "float32"),
                                Param("c", "buf", "out", "float32"), Param("n", "i32"))),
    "scale": KernelSpec("scale", (Param("x", "buf", "inout", ""), Param("s", "f32"))),
    "null": KernelSpec("null", ()),
    "u": KernelSpec("u", (Param("v", "u32"),)),
}
ARENAS = {1: ArenaRef(101, 4096), 2: ArenaRef(102, 64), 3: ArenaRef(103, 4096, closed=True)}
RESIDENTS = {"r" * 64: ResidentRef(201, 256)}


def buf(kind: str = "in", shape: tuple[int, ...] = (16,), arena: int = 1, offset: int = 0, dtype: str = "float32",
        resident: str = "") -> BufferSpec:
    return BufferSpec(kind, dtype, shape, arena, offset, resident)


def vadd(a: int = 0, b: int = 1, c: int = 2, n: object = None, deps: tuple[int, ...] = ()) -> KernelNode:
    return KernelNode(LIB, "vadd", (1,), (16,), (Buf(a), Buf(b), Buf(c), n if n is not None else Lit("i32", 16)),
                      0, deps)


def run(buffers: list[BufferSpec], kernels: list[KernelNode]):  # type: ignore[no-untyped-def]
    return resolve(GraphSpec(tuple(buffers), tuple(kernels)), arenas=ARENAS, residents=RESIDENTS,
                   libraries={LIB: SIGS})


def three() -> list[BufferSpec]:
    return [buf("in", offset=0), buf("in", offset=64), buf("out", offset=128)]


def test_valid_graph_resolves_to_global_ids() -> None:
    r = run(three() + [buf("temp", arena=0), buf("resident", arena=0, resident="r" * 64)], [vadd()])
    assert [b.arena for b in r.graph.buffers] == [101, 101, 101, 0, 0]
    assert r.graph.buffers[4].resident == 201
    assert r.arenas == {101} and r.residents == {201}
    assert r.graph.kernels[0].grid == (1, 1, 1) and r.graph.kernels[0].block == (16, 1, 1)
    assert r.input_bytes == 128 and r.output_bytes == 64


@pytest.mark.parametrize("bad, exc, words", [
    (buf(offset=4096 - 32), errors.OutOfBounds, "outside arena 1"),
    (buf(offset=-4), errors.OutOfBounds, "outside"),
    (buf(arena=2, shape=(17,)), errors.OutOfBounds, "64 bytes"),
    (buf(offset=2), errors.Misaligned, "offset 2"),
    (buf(arena=9), errors.UnknownArena, "arena 9"),
    (buf(arena=3), errors.ArenaClosed, "closed"),
    (buf(dtype="complex64"), errors.DtypeMismatch, "complex64"),
    (buf(shape=(0,)), errors.InvalidGraph, "shape"),
    (buf(kind="weird"), errors.InvalidGraph, "weird"),
    (buf(kind="resident", arena=0, resident="x" * 64), errors.UnknownResident, "resident"),
    (buf(kind="resident", arena=0, resident="r" * 64, shape=(1000,)), errors.OutOfBounds, "exceeds resident"),
    (buf(kind="temp", arena=1), errors.InvalidGraph, "temp"),
])
def test_bad_buffer(bad: BufferSpec, exc: type[errors.KaasError], words: str) -> None:
    with pytest.raises(exc, match=words):
        run([bad, buf(offset=64), buf("out", offset=128)], [vadd()])


@pytest.mark.parametrize("kernel, exc, words", [
    (KernelNode("b" * 64, "vadd", (1,), (1,), ()), errors.UnknownLibrary, "library"),
    (KernelNode(LIB, "nope", (1,), (1,), ()), errors.UnknownKernel, "no kernel 'nope'"),
    (KernelNode(LIB, "vadd", (1,), (1,), (Buf(0), Buf(1), Buf(2))), errors.ArgumentError, "takes 4 arguments"),
    (vadd(n=Buf(0)), errors.ArgumentError, "must be a i32 literal"),
    (KernelNode(LIB, "vadd", (1,), (1,), (Lit("i32", 1), Buf(1), Buf(2), Lit("i32", 1))), errors.ArgumentError,
     "must be a buffer"),
    (vadd(n=Lit("i64", 3)), errors.ArgumentError, "must be i32"),
    (vadd(n=Lit("i32", 2**31)), errors.ArgumentError, "not a i32"),
    (vadd(n=Lit("i32", 1.5)), errors.ArgumentError, "not a i32"),
    (KernelNode(LIB, "u", (1,), (1,), (Lit("u32", -1),)), errors.ArgumentError, "not a u32"),
    (vadd(c=7), errors.ArgumentError, "out of range"),
    (vadd(c=0), errors.AccessError, "read-only"),
    (KernelNode(LIB, "vadd", (0,), (1,), ()), errors.ArgumentError, "grid"),
    (KernelNode(LIB, "vadd", (1,), (32, 64), ()), errors.ArgumentError, "2048 threads"),
    (KernelNode(LIB, "vadd", (1, 1, 1, 1), (1,), ()), errors.ArgumentError, "1 to 3"),
    (KernelNode(LIB, "null", (1,), (1,), (), 10**7), errors.ArgumentError, "shared memory"),
    (vadd(deps=(5,)), errors.InvalidGraph, "dependency 5"),
    (vadd(deps=(0,)), errors.InvalidGraph, "dependency 0"),
])
def test_bad_kernel(kernel: KernelNode, exc: type[errors.KaasError], words: str) -> None:
    with pytest.raises(exc, match=words):
        run(three(), [kernel])


def test_dtype_of_buffer_must_match_signature() -> None:
    with pytest.raises(errors.DtypeMismatch, match="expects float32"):
        run([buf(dtype="int32"), buf(offset=64), buf("out", offset=128)], [vadd()])


def test_untyped_buffer_param_accepts_any_dtype() -> None:
    k = KernelNode(LIB, "scale", (1,), (1,), (Buf(0), Lit("f32", 2)))
    run([buf("inout", dtype="float64")], [k])
    run([buf("inout", dtype="int8")], [KernelNode(LIB, "scale", (1,), (1,), (Buf(0), Lit("f32", 2)))])


def test_resident_is_read_only() -> None:
    with pytest.raises(errors.AccessError):
        run([buf("resident", arena=0, resident="r" * 64)], [KernelNode(LIB, "scale", (1,), (1,),
                                                                        (Buf(0), Lit("f32", 1)))])


def test_empty_graph_is_refused() -> None:
    with pytest.raises(errors.InvalidGraph, match="no kernels"):
        run([], [])


def test_cycle_is_refused_and_named() -> None:
    ks = [vadd(deps=(2,)), vadd(deps=(0,)), vadd(deps=(1,)), vadd()]
    with pytest.raises(errors.CycleError) as ei:
        run(three(), ks)
    assert ei.value.detail["kernels"] == [0, 1, 2]


def test_order_respects_deps_and_keeps_listed_order_otherwise() -> None:
    null = KernelNode(LIB, "null", (1,), (1,), ())
    ks = [KernelNode(LIB, "null", (1,), (1,), (), 0, (2,)), null, KernelNode(LIB, "null", (1,), (1,), (), 0, (1,)),
          null]
    assert run([], ks).order == (1, 2, 0, 3)


@given(st.lists(st.lists(st.integers(0, 7), max_size=3), min_size=1, max_size=8))
@settings(max_examples=200, deadline=None)
def test_toposort_property(deps: list[list[int]]) -> None:
    n = len(deps)
    ks = [KernelNode(LIB, "null", (1,), (1,), (), 0, tuple(d for d in ds if d < n and d != i))
          for i, ds in enumerate(deps)]
    try:
        order = run([], ks).order
    except errors.CycleError:
        return
    pos = {k: i for i, k in enumerate(order)}
    assert sorted(order) == list(range(n))
    for i, k in enumerate(ks):
        assert all(pos[d] < pos[i] for d in k.deps)
