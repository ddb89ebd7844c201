"""CUDA graph replay in the CUDA backend: replayed graphs against numpy and direct launches.

A shape submitted again is captured on its lane and then replayed with its addresses
updated; every test here feeds fresh random data at each submission and moves the arena
slices between submissions, so that a replay reading stale addresses or stale data fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from broker import errors
from broker.protocol import Buf, KernelSpec, Lit, Param
from broker.streams.wire import ExecBuffer, ExecGraph, ExecKernel
from tests.gpu.test_cuda_backend import (
    KERNELS,
    LIB,
    SOURCE,
    Arena,
    _in_subprocess,
    _no_cuda_reason,
    kernel,
    ok,
    run,
    wait,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_no_cuda_reason()), reason=_no_cuda_reason() or "-")]

# A kernel that faults only when its input says so: a graph can be captured and replayed
# first, and fault later.
POKE_SOURCE = rb"""
extern "C" __global__ void g_poke_if(float* out, const unsigned long long* p) {
    out[threadIdx.x] = 1.0f;
    __threadfence();
    if (p[0]) *(volatile float*)p[0] = 1.0f;
}
"""
POKE_LIB = "test-graphs-poke-v1"
POKE_KERNELS = (KernelSpec("g_poke_if", (Param("out", "buf"), Param("p", "buf"))),)


def _backend(**kw: Any) -> Any:
    from broker.streams.cuda_backend import CudaBackend

    b = CudaBackend(0, **kw)
    b.load_library(LIB, "cuda", SOURCE, KERNELS, ())
    return b


@pytest.fixture(scope="module", params=["lane-slab", "pool-only"])
def replaying(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Replay on for every shape: device memory from the lane slabs, or from the pool (moving bases)."""
    b = _backend(cuda_graphs=True, lane_slab=0 if request.param == "pool-only" else 4 * 2**20)
    yield b
    b.close()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng()


def _delta(b: Any, before: dict[str, int]) -> dict[str, int]:
    return {k: v - before[k] for k, v in b.graph_stats.items()}


def _multi_kernel_case(arena: Arena, rng: np.random.Generator, n: int) -> tuple[ExecGraph, Any]:
    """in x, in w, inout y, temp, out z: y = y * (2.5 x) through the temp; z comes back zeroed."""
    ox, x = arena.place(rng.standard_normal(n, dtype=np.float32))
    ow, w = arena.place(rng.standard_normal(n, dtype=np.float32))
    oy, y = arena.place(rng.standard_normal(n, dtype=np.float32))
    oz, z = arena.place(np.full(n, 7.0, np.float32))
    want = y * (np.float32(2.5) * x)
    g = ExecGraph(
        (arena.buffer("in", ox, x), arena.buffer("in", ow, w), arena.buffer("inout", oy, y),
         ExecBuffer("temp", "float32", (n,), 4 * n), arena.buffer("out", oz, z)),
        (kernel("t_scale_acc", 64, 256, Buf(0), Buf(3), Lit("f32", 2.5), Lit("i32", n)),
         kernel("t_mul", 64, 256, Buf(2), Buf(3), Buf(2), Lit("i32", n)),
         kernel("t_noop", 1, 1, Buf(4))))

    def check() -> None:
        np.testing.assert_array_equal(y, want)
        assert not z.any(), "an out buffer no kernel wrote must come back zeroed"
    return g, check


def _chain(arena: Arena, rng: np.random.Generator, n: int, length: int) -> tuple[ExecGraph, Any]:
    """c = a + b, then c = c + b (length - 1) times: each kernel reads what the previous wrote."""
    oa, a = arena.place(rng.standard_normal(n, dtype=np.float32))
    ob, b = arena.place(rng.standard_normal(n, dtype=np.float32))
    oc, c = arena.place(np.full(n, np.nan, np.float32))
    want = a + b
    for _ in range(length - 1):
        want = want + b
    g = ExecGraph((arena.buffer("in", oa, a), arena.buffer("in", ob, b), arena.buffer("out", oc, c)),
                  (kernel("t_vadd", 16, 256, Buf(0), Buf(1), Buf(2), Lit("i32", n)),)
                  + (kernel("t_vadd", 16, 256, Buf(2), Buf(1), Buf(2), Lit("i32", n)),) * (length - 1))

    def check() -> None:
        np.testing.assert_array_equal(c, want)
    return g, check


# -- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [True, False, "auto", "1", "0", "AUTO"])
def test_mode_from_argument_and_environment(value: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cr = pytest.importorskip("broker.streams.cuda_replay")
    monkeypatch.delenv("KAAS_CUDA_GRAPHS", raising=False)
    expect = {True: "on", "1": "on", False: "off", "0": "off", "auto": "auto", "AUTO": "auto"}[value]
    assert cr.MODE_NAMES[cr.graph_mode(value)] == expect
    for env, mode in (("0", "off"), ("1", "on"), ("auto", "auto")):
        monkeypatch.setenv("KAAS_CUDA_GRAPHS", env)
        assert cr.MODE_NAMES[cr.graph_mode("auto")] == mode  # the variable replaces the default
        assert cr.MODE_NAMES[cr.graph_mode(True)] == "on"  # an explicit argument wins
    monkeypatch.setenv("KAAS_CUDA_GRAPHS", "sometimes")
    with pytest.raises(errors.InternalError, match="KAAS_CUDA_GRAPHS"):
        cr.graph_mode("auto")
    with pytest.raises(errors.InternalError, match="cuda_graphs"):
        cr.graph_mode("maybe")


def test_replay_matches_numpy_on_fresh_data_and_moving_arenas(replaying: Any, rng: np.random.Generator) -> None:
    """One shape, submitted 10 times: two arenas in turn, a different slice each time."""
    n = 100_000
    arenas = [Arena(replaying, 8 * 2**20) for _ in range(2)]
    before = dict(replaying.graph_stats)
    for i in range(10):
        arena = arenas[i % 2]
        arena._next = 4096 * (i // 2)  # the same shape at another offset, in another arena
        g, check = _multi_kernel_case(arena, rng, n)
        ok(run(replaying, g))
        check()
    d = _delta(replaying, before)
    assert d["captures"] >= 1 and d["replays"] >= 7, d
    assert d["node_updates"] + d["exec_updates"] >= 7, d  # every replay had moved
    assert d["update_failures"] == 0 and d["capture_failures"] == 0, d
    for arena in arenas:
        arena.close()
    assert not any(rp.arenas for rp in replaying._replays), "a CUDA graph outlived the arena it copies to"


def test_replay_with_many_graphs_in_flight(replaying: Any, rng: np.random.Generator) -> None:
    """More graphs of one shape than lanes, both priorities: each lane replays its own graph."""
    n, count = 20_000, 60
    arena = Arena(replaying, count * 3 * (4 * n + 256))
    cases = {}
    for i in range(count):
        g, check = _chain(arena, rng, n, 3)
        cases[5000 + i] = (g, check)
    for token, (g, _) in cases.items():
        replaying.submit(token, g, 0.0, int(token % 3 == 0))
    done = wait(replaying, set(cases))
    for token, (_, check) in cases.items():
        ok(done[token])
        check()
    assert not replaying.busy
    arena.close()


def test_replay_follows_a_resident_put_again(replaying: Any, rng: np.random.Generator) -> None:
    import mmap

    n = 50_000
    arena = Arena(replaying, 4 * 2**20)
    for round_ in range(3):
        weights = rng.standard_normal(n, dtype=np.float32)
        fd = os.memfd_create("kaas-test-resident")
        os.ftruncate(fd, weights.nbytes)
        with mmap.mmap(fd, weights.nbytes) as m:
            np.frombuffer(m, np.float32)[:] = weights
        rid = 900_000 + round_
        replaying.put_resident(rid, fd, weights.nbytes)
        res = ExecBuffer("resident", "float32", (n,), weights.nbytes, resident=rid)
        for _ in range(3):
            arena._next = 0
            ox, x = arena.place(rng.standard_normal(n, dtype=np.float32))
            oo, out = arena.place(np.zeros(n, np.float32))
            ok(run(replaying, ExecGraph((arena.buffer("in", ox, x), res, arena.buffer("out", oo, out)),
                                        (kernel("t_mul", 64, 256, Buf(0), Buf(1), Buf(2), Lit("i32", n)),
                                         kernel("t_noop", 1, 1, Buf(2))))))
            np.testing.assert_array_equal(out, x * weights)
        replaying.evict_resident(rid)
    arena.close()


def test_graph_and_shape_caches_are_bounded(rng: np.random.Generator) -> None:
    b = _backend(cuda_graphs=True, graph_cache=3, lanes=2, high_lanes=0)
    try:
        arena = Arena(b, 2**20)
        n = 4096
        oa, a = arena.place(np.zeros(n, np.float32))
        ob, bb = arena.place(np.zeros(n, np.float32))
        oc, c = arena.place(np.zeros(n, np.float32))

        def check(m: int) -> None:  # shape m: the literal n differs
            k = n - 64 * m
            a[:] = rng.standard_normal(n, dtype=np.float32)
            bb[:] = rng.standard_normal(n, dtype=np.float32)
            c[:] = np.nan
            ok(run(b, ExecGraph((arena.buffer("in", oa, a), arena.buffer("in", ob, bb), arena.buffer("out", oc, c)),
                                (kernel("t_vadd", 4, 256, Buf(0), Buf(1), Buf(2), Lit("i32", k)),
                                 kernel("t_vadd", 4, 256, Buf(2), Buf(1), Buf(2), Lit("i32", k))))))
            np.testing.assert_array_equal(c[:k], a[:k] + bb[:k] + bb[:k])
            assert (c[k:] == 0).all()  # an out buffer is scrubbed, past what the kernels wrote too
            assert len(b._replays) <= b.graph_cache
            assert sum(len(s.replays) for s in b._shapes.values()) == len(b._replays)
            assert len(b._shapes) <= b.shape_cache

        for _ in range(4):
            for m in range(8):  # eight shapes in turn through a cache of three graphs
                check(m)
        assert b.graph_stats["evicted"] > 0 and b.graph_stats["captures"] > 3, b.graph_stats
        replays = b.graph_stats["replays"]
        for _ in range(5):
            check(0)  # a hot shape is captured again once, then replayed
        assert b.graph_stats["replays"] - replays >= 4, b.graph_stats
        b.shape_cache = 5
        for m in range(8, 20):
            check(m)
            check(m)
        assert len(b._shapes) <= 5
        arena.close()
    finally:
        b.close()


@pytest.mark.parametrize("mode", [True, False, "auto"])
def test_twenty_kernel_chain(mode: Any, rng: np.random.Generator) -> None:
    b = _backend(cuda_graphs=mode)
    try:
        arena = Arena(b, 8 * 2**20)
        for i in range(6):
            arena._next = 8192 * (i % 2)
            g, check = _chain(arena, rng, 50_000, 20)
            done = run(b, g)
            ok(done)
            check()
            t = done.timings
            assert t is not None and t.kernels > 0 and t.copy_in > 0 and t.copy_out > 0
        if mode is not False:  # "auto" re-points the moved copies of a 20-kernel graph too
            assert b.graph_stats["replays"] >= 4, b.graph_stats
        if mode is False:
            assert b.graph_stats["replays"] == 0 and b.graph_stats["captures"] == 0
        arena.close()
    finally:
        b.close()


def test_auto_replays_one_kernel_only_where_its_addresses_hold(rng: np.random.Generator) -> None:
    b = _backend(cuda_graphs="auto")
    try:
        arenas = [Arena(b, 2**20) for _ in range(2)]
        for moving in (False, True):
            before = dict(b.graph_stats)
            for i in range(6):
                arena = arenas[i % 2 if moving else 0]
                arena._next = 4096 * (1 + i) if moving else 0  # moving: a slice never used before
                g, check = _chain(arena, rng, 4096, 1)
                ok(run(b, g))
                check()
            d = _delta(b, before)
            if moving:  # one kernel does not pay for re-pointing its copies: direct launches
                assert d["replays"] == 0 and d["node_updates"] == 0 and d["direct"] == 6, d
            else:
                assert d["captures"] == 1 and d["replays"] == 4, d
        for arena in arenas:
            arena.close()
    finally:
        b.close()


def test_a_replayed_graph_is_pending_until_it_is_done(replaying: Any) -> None:
    """poll must not see a replayed graph finished before its kernels ran (its last event)."""
    g = ExecGraph((), (ExecKernel(LIB, "t_spin", (1, 1, 1), (1, 1, 1), 0, (Lit("u64", 30_000_000),)),
                       ExecKernel(LIB, "t_spin", (1, 1, 1), (1, 1, 1), 0, (Lit("u64", 1_000),))))
    before = dict(replaying.graph_stats)
    for token in (71, 72, 73, 74):
        replaying.submit(token, g, 0.0, 0)
        assert replaying.poll() == [], "a 30 ms graph reported done at once"
        done = wait(replaying, {token})[token]
        ok(done)
        assert done.timings is not None and done.timings.kernels >= 0.029
        assert done.timings.copy_in == 0.0 and done.timings.copy_out == 0.0
    assert _delta(replaying, before)["replays"] >= 2


def test_bad_launch_in_replay_mode_stays_a_typed_error(replaying: Any) -> None:
    n = 1024
    arena = Arena(replaying, 3 * 4096)
    oa, a = arena.place(np.ones(n, np.float32))
    oc, c = arena.place(np.full(n, 5.0, np.float32))
    g = ExecGraph((arena.buffer("in", oa, a), arena.buffer("out", oc, c)),
                  (kernel("t_noop", 1, 1, Buf(1)), kernel("t_vadd", 4, 2048, Buf(0), Buf(0), Buf(1), Lit("i32", n))))
    for _ in range(3):  # the shape would be captured from the second run on
        done = run(replaying, g)
        assert isinstance(done.error, errors.KernelFault), done
        assert done.error.detail["index"] == 1 and done.error.detail["kernel"] == "t_vadd"
        assert (c == 5.0).all(), "a failed graph must leave its outputs untouched"
    assert not replaying.poisoned
    arena.close()


def test_fault_in_a_replayed_graph_is_a_kernel_fault() -> None:
    result = _in_subprocess("""
        from tests.gpu.test_cuda_graphs import POKE_SOURCE, POKE_KERNELS, POKE_LIB
        b.cuda_graphs = True
        b.load_library(POKE_LIB, "cuda", POKE_SOURCE, POKE_KERNELS, ())
        p = np.frombuffer(mm, np.uint64, 1, 4096)
        g = ExecGraph((ExecBuffer("out", "float32", (256,), 1024, 1, 0), ExecBuffer("in", "uint64", (1,), 8, 1, 4096)),
                      (ExecKernel(POKE_LIB, "g_poke_if", (1, 1, 1), (256, 1, 1), 0, (Buf(0), Buf(1))),))
        for token in (1, 2, 3):
            p[0] = 0
            b.submit(token, g, 0.0, 0)
            c = wait(token)
            assert c.error is None, c.error
        replays = b.graph_stats["replays"]
        out[:] = 42.0
        p[0] = 0xDEAD0000000
        b.submit(4, g, 0.0, 0)
        c = wait(4)
        print(json.dumps({"error": type(c.error).__name__, "detail": c.error.detail, "poisoned": b.poisoned,
                          "untouched": bool((out == 42.0).all()), "replays": replays,
                          "replayed": b.graph_stats["replays"] - replays}))
        b.close()
        os._exit(0)
    """)
    assert result["replays"] >= 1 and result["replayed"] == 1, result
    assert result["error"] == "KernelFault", result
    assert result["detail"]["cuda_error"] in ("CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_LAUNCH_FAILED"), result
    assert result["detail"]["kernel"] == "g_poke_if"
    assert result["poisoned"] is True
    assert result["untouched"] is True, "a faulted graph must not write its outputs back"
