"""Prepared graphs on the CUDA backend: prepare once, run by handle with bindings, release.

Every run binds fresh random data at a new arena slice and new literal values, so that a run
reading stale addresses, stale data or stale literals (a replayed CUDA graph still holding
the values it was captured with) fails against numpy.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from broker import errors
from broker.protocol import Buf, Lit
from broker.streams.wire import ExecBuffer, ExecGraph, ExecKernel
from tests.gpu.test_cuda_backend import KERNELS, LIB, SOURCE, Arena, _no_cuda_reason, kernel, ok, wait

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_no_cuda_reason()), reason=_no_cuda_reason() or "-")]

_tokens = itertools.count(700_000)
_handles = itertools.count(1)
N = 4096


def _backend(**kw: Any) -> Any:
    from broker.streams.cuda_backend import CudaBackend

    b = CudaBackend(0, **kw)
    b.load_library(LIB, "cuda", SOURCE, KERNELS, ())
    return b


@pytest.fixture(scope="module", params=["lane-slab", "pool-only", "cuda-graphs"])
def backend(request: pytest.FixtureRequest) -> Iterator[Any]:
    kw: dict[str, Any] = {"lane-slab": {}, "pool-only": {"lane_slab": 0}, "cuda-graphs": {"cuda_graphs": "on"}}[
        request.param]
    b = _backend(**kw)
    yield b
    b.close()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng()


def _template() -> tuple[ExecGraph, tuple[tuple[int, int], ...]]:
    """in x, temp t, out y: t = s * x, then y = t + t over the first m items; s and m are bound."""
    g = ExecGraph((ExecBuffer("in", "float32", (N,), 4 * N), ExecBuffer("temp", "float32", (N,), 4 * N),
                   ExecBuffer("out", "float32", (N,), 4 * N)),
                  (kernel("t_scale_acc", 8, 256, Buf(0), Buf(1), Lit("f32", 1.0), Lit("i32", N)),
                   kernel("t_vadd", 8, 256, Buf(1), Buf(1), Buf(2), Lit("i32", N))))
    return g, ((0, 2), (1, 3))


def _run(b: Any, handle: int, slices: tuple[int, ...], values: tuple[int | float, ...]) -> Any:
    token = next(_tokens)
    b.run(token, handle, slices, values, 0.0, 0)
    c = wait(b, {token})[token]
    assert not b.busy
    return c


def _case(b: Any, handle: int, arena: Arena, at: int, rng: np.random.Generator, s: float, m: int) -> None:
    """One run bound at offset ``at`` of ``arena``, checked against numpy."""
    x = arena.view(at, N)
    y = arena.view(at + 4 * N, N)
    x[:] = rng.standard_normal(N, dtype=np.float32)
    y[:] = np.nan
    ok(_run(b, handle, (arena.id, at, arena.id, at + 4 * N), (s, m)))
    want = np.zeros(N, np.float32)
    want[:m] = (np.float32(s) * x[:m]) * np.float32(2)
    np.testing.assert_array_equal(y, want)


def test_bindings_move_between_arena_slices(backend: Any, rng: np.random.Generator) -> None:
    arenas = [Arena(backend, 1 << 20) for _ in range(2)]
    handle = next(_handles)
    backend.prepare(handle, *_template())
    for i in range(8):
        _case(backend, handle, arenas[i % 2], 8 * N * (i // 2), rng, 1.5, N)
    backend.release(handle)
    for arena in arenas:
        arena.close()


def test_a_literal_changing_every_call_still_replays(rng: np.random.Generator) -> None:
    b = _backend(cuda_graphs="on")
    try:
        arena = Arena(b, 1 << 20)
        handle = next(_handles)
        b.prepare(handle, *_template())
        before = dict(b.graph_stats)
        runs = 12
        for i in range(runs):
            _case(b, handle, arena, 8 * N * (i % 3), rng, 0.25 + i, N - 37 * i)  # a step counter, a shrinking m
        d = {k: v - before[k] for k, v in b.graph_stats.items()}
        assert d["captures"] <= 2, d
        assert d["replays"] >= runs - 3, d
        assert d["kernel_updates"] >= runs - 3, d
        assert d["update_failures"] == 0 and d["capture_failures"] == 0, d
        b.release(handle)
        arena.close()
    finally:
        b.close()


def test_prepare_again_replaces_the_handle(backend: Any, rng: np.random.Generator) -> None:
    arena = Arena(backend, 1 << 20)
    handle = next(_handles)
    backend.prepare(handle, *_template())
    for i in range(3):
        _case(backend, handle, arena, 0, rng, 2.0, N - i)
    old = backend._prepared[handle].shape
    # The same handle, now a product of two inputs, with no bound literals.
    g = ExecGraph((ExecBuffer("in", "float32", (N,), 4 * N), ExecBuffer("in", "float32", (N,), 4 * N),
                   ExecBuffer("out", "float32", (N,), 4 * N)),
                  (kernel("t_mul", 8, 256, Buf(0), Buf(1), Buf(2), Lit("i32", N)),))
    backend.prepare(handle, g, ())
    assert not old.replays, "a replaced prepared graph kept its CUDA graphs"
    assert all(rp.shape is not old for rp in backend._replays)
    for _ in range(3):
        a, bb, c = (arena.view(4 * N * k, N) for k in range(3))
        a[:] = rng.standard_normal(N, dtype=np.float32)
        bb[:] = rng.standard_normal(N, dtype=np.float32)
        ok(_run(backend, handle, (arena.id, 0, arena.id, 4 * N, arena.id, 8 * N), ()))
        np.testing.assert_array_equal(c, a * bb)
    with pytest.raises(errors.InternalError):  # the old template's literals are gone with it
        backend.run(next(_tokens), handle, (arena.id, 0, arena.id, 4 * N, arena.id, 8 * N), (1.0, 5), 0.0, 0)
    backend.release(handle)
    arena.close()


def test_release_and_unknown_handles(backend: Any, rng: np.random.Generator) -> None:
    arena = Arena(backend, 1 << 20)
    handle = next(_handles)
    backend.prepare(handle, *_template())
    for _ in range(3):
        _case(backend, handle, arena, 0, rng, 3.0, N)
    shape = backend._prepared[handle].shape
    backend.release(handle)
    backend.release(handle)  # absent: a no-op
    assert not shape.replays and all(rp.shape is not shape for rp in backend._replays)
    with pytest.raises(errors.InternalError, match=str(handle)):
        backend.run(next(_tokens), handle, (arena.id, 0, arena.id, 4 * N), (1.0, N), 0.0, 0)
    with pytest.raises(errors.InternalError):
        backend.run(next(_tokens), 987_654_321, (), (), 0.0, 0)
    assert not backend.busy
    arena.close()


def test_a_release_waits_for_the_runs_in_flight(rng: np.random.Generator) -> None:
    b = _backend(cuda_graphs="on")
    try:
        handle = next(_handles)
        g = ExecGraph((), (ExecKernel(LIB, "t_spin", (1, 1, 1), (1, 1, 1), 0, (Lit("u64", 1000),)),
                           ExecKernel(LIB, "t_spin", (1, 1, 1), (1, 1, 1), 0, (Lit("u64", 1000),))))
        b.prepare(handle, g, ((0, 0),))
        for _ in range(3):
            ok(_run(b, handle, (), (1000,)))
        shape = b._prepared[handle].shape
        assert shape.replays
        token = next(_tokens)
        b.run(token, handle, (), (30_000_000,), 0.0, 0)  # 30 ms, replayed with a new literal
        b.release(handle)
        assert shape.replays, "the graph of a run in flight went before the run"
        done = wait(b, {token})[token]
        ok(done)
        assert done.timings is not None and done.timings.kernels >= 0.029
        assert not shape.replays and all(rp.shape is not shape for rp in b._replays)
    finally:
        b.close()


def test_bad_bindings_are_refused_up_front(backend: Any) -> None:
    arena = Arena(backend, 1 << 16)
    handle = next(_handles)
    backend.prepare(handle, *_template())
    for slices in ((arena.id, (1 << 16) - 4 * N + 4, arena.id, 0),  # x runs past the arena's end
                   (arena.id, 0, arena.id, -4),  # a negative offset
                   (10**9, 0, arena.id, 4 * N),  # an arena not pinned
                   (arena.id, 0)):  # too few bindings
        with pytest.raises(errors.InternalError):
            backend.run(next(_tokens), handle, slices, (1.0, N), 0.0, 0)
    for values in ((1.0, 2**40), (1e39, N), ("x", N)):  # values that do not fit i32 / f32
        with pytest.raises(errors.ArgumentError):
            backend.run(next(_tokens), handle, (arena.id, 0, arena.id, 4 * N), values, 0.0, 0)
    with pytest.raises(errors.ArgumentError):  # a bound literal must name a literal argument
        backend.prepare(next(_handles), _template()[0], ((0, 0),))
    assert not backend.busy
    assert backend._arenas[arena.id].users == 0, "a refused run left its arena in use"
    backend.release(handle)
    arena.close()


def test_occupancy_charges_add_up_with_several_lanes_busy() -> None:
    b = _backend(cuda_graphs="on", lanes=4, high_lanes=0)
    try:
        handle = next(_handles)
        g = ExecGraph((), (ExecKernel(LIB, "t_spin", (1, 1, 1), (1, 1, 1), 0, (Lit("u64", 2_000_000),)),))
        b.prepare(handle, g, ((0, 0),))
        tokens = {next(_tokens) for _ in range(16)}
        t0 = time.perf_counter()
        for i, token in enumerate(tokens):
            b.run(token, handle, (), (1_000_000 + 100_000 * i,), 0.0, 0)
        done = wait(b, set(tokens))
        wall = time.perf_counter() - t0
        charges = []
        for c in done.values():
            ok(c)
            assert c.timings is not None and c.timings.kernels > 0
            charges.append(c.timings.kernels)
        assert 0 < sum(charges) <= wall, (sum(charges), wall)
        b.release(handle)
    finally:
        b.close()
