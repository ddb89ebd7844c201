"""Prepared graphs: validated once, run by handle with only their bindings (CPU device)."""

from __future__ import annotations

import gc
import os
import signal

import numpy as np
import pytest

import tenantlib
from broker import protocol
from broker.protocol import Buf, BufferSpec, GraphSpec, KernelNode, Lit
from tenantlib import errors, kernels
from tests.conftest import BrokerFactory, RawConnection, broker_pid, children, wait_for
from tools.broker_process import BrokerProcess

RNG = np.random.default_rng(7)


def stats(c: tenantlib.Client) -> dict[str, int]:
    return c.status()["stats"]  # type: ignore[no-any-return]


def axpy_graph(c: tenantlib.Client, lib: tenantlib.Library, x: np.ndarray, y: np.ndarray,
               a: float) -> tuple[tenantlib.Graph, int]:
    g = c.graph()
    grid, block = kernels.launch_1d(x.size)
    k = g.kernel(lib, "axpy", grid=grid, block=block, args=[a, g.input(x), g.inout(y), x.size])
    return g, k


def test_a_graph_is_prepared_once_and_rerun_with_new_data_literals_and_arrays(client: tenantlib.Client) -> None:
    lib = kernels.library(client)
    n = 1000
    x, y = client.array(n), client.array(n)
    x2, y2 = client.array(n), client.array(n)
    g, k = axpy_graph(client, lib, x, y, 2.0)
    before = stats(client)["prepared"]
    for step in range(6):
        # new data in the same arrays, a literal that changes every call, arrays rebound
        if step == 3:
            g.bind(g._refs[(int(x.__array_interface__["data"][0]), x.nbytes, "in")], x2)
            g.bind(g._refs[(int(y.__array_interface__["data"][0]), y.nbytes, "inout")], y2)
        xs, ys = (x, y) if step < 3 else (x2, y2)
        xs[...] = RNG.standard_normal(n, dtype=np.float32)
        ys[...] = RNG.standard_normal(n, dtype=np.float32)
        y0 = ys.copy()
        g.set_literal(k, "alpha", float(step))
        client.run(g)
        np.testing.assert_allclose(ys, kernels.ref_axpy(float(step), xs, y0), rtol=1e-6, atol=1e-6)
    assert stats(client)["prepared"] == before + 1, "rebinding and new literals must not prepare again"
    z = client.array(n)
    g.kernel(lib, "vadd", grid=kernels.launch_1d(n)[0], block=kernels.launch_1d(n)[1],
             args=[g.input(x2), g.input(x2), g.output(z), n])
    client.run(g)
    np.testing.assert_allclose(z, x2 + x2, rtol=1e-6)
    assert stats(client)["prepared"] == before + 2, "a changed structure is prepared again"


def test_set_literal_and_bind_refuse_bad_input(client: tenantlib.Client) -> None:
    lib = kernels.library(client)
    x, y = client.array(16), client.array(16)
    g, k = axpy_graph(client, lib, x, y, 1.0)
    with pytest.raises(errors.ArgumentError, match="no parameter 'b'"):
        g.set_literal(k, "b", 1.0)
    with pytest.raises(errors.ArgumentError, match="not a literal"):
        g.set_literal(k, 1, 1.0)
    with pytest.raises(errors.ArgumentError, match="must be an integer"):
        g.set_literal(k, "n", 1.5)
    ref = next(iter(g._refs.values()))
    with pytest.raises(errors.ArgumentError, match="cannot bind"):
        g.bind(ref, client.array(17))


def prepared_null(raw: RawConnection, lib: str, req: int = 1) -> protocol.GraphPrepared:
    raw.send(protocol.PrepareGraph(req, GraphSpec((), (KernelNode(lib, "null", (1,), (1,), ()),))))
    msg = raw.recv()
    assert isinstance(msg, protocol.GraphPrepared), msg
    return msg


def raw_arena(raw: RawConnection, size: int = 4096) -> protocol.ArenaRegistered:
    fd = os.memfd_create("t")
    os.ftruncate(fd, size)
    raw.send(protocol.RegisterArena(2, size), fd)
    os.close(fd)
    arena = raw.recv()
    assert isinstance(arena, protocol.ArenaRegistered), arena
    return arena


def null_library(raw: RawConnection) -> str:
    k = kernels.KERNELS
    raw.send(protocol.RegisterLibrary(100, "cuda", kernels.SOURCE.encode(), k))
    msg = raw.recv()
    assert isinstance(msg, protocol.LibraryRegistered), msg
    return msg.library


def test_handles_are_per_session_and_forged_or_released_ones_are_unknown(broker: BrokerProcess) -> None:
    a, b = RawConnection(broker.socket), RawConnection(broker.socket)
    try:
        lib = null_library(a)
        null_library(b)
        h = prepared_null(a, lib).handle
        a.send(protocol.RunPrepared(2, h))
        assert isinstance(a.recv(), protocol.GraphDone)
        for forged in (h, h + 1000, 0, -1):
            b.send(protocol.RunPrepared(3, forged))
            err = b.recv()
            assert isinstance(err, protocol.Error) and err.code in ("unknown_graph", "invalid_argument"), err
        b.send(protocol.RunPrepared(4, h))
        err = b.recv()
        assert isinstance(err, protocol.Error) and err.code == "unknown_graph" and err.req == 4
        a.send(protocol.ReleaseGraph(5, h))
        assert isinstance(a.recv(), protocol.Done)
        a.send(protocol.RunPrepared(6, h))
        err = a.recv()
        assert isinstance(err, protocol.Error) and err.code == "unknown_graph"
        a.send(protocol.ReleaseGraph(7, h))
        err = a.recv()
        assert isinstance(err, protocol.Error) and err.code == "unknown_graph"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("slices, values, code", [
    ((1, 4096), (), "out_of_bounds"),        # past the arena's end
    ((1, -4), (), "out_of_bounds"),
    ((1, 2), (), "misaligned"),
    ((99, 0), (), "unknown_arena"),
    ((1,), (), "argument_error"),            # half a slice
    ((1, 0, 1, 0), (), "argument_error"),    # one slice too many
    ((1, 0), (1.0,), "argument_error"),      # a literal the graph does not have
])
def test_bindings_are_checked_on_every_run(broker: BrokerProcess, slices: tuple[int, ...],
                                           values: tuple[float, ...], code: str) -> None:
    raw = RawConnection(broker.socket)
    try:
        lib = null_library(raw)
        arena = raw_arena(raw)
        # one out buffer of 16 floats, written by vadd-free "null": the graph needs no kernel args
        spec = GraphSpec((BufferSpec("out", "float32", (16,), arena.arena, 0),),
                         (KernelNode(lib, "null", (1,), (1,), ()),))
        raw.send(protocol.PrepareGraph(3, spec))
        prepared = raw.recv()
        assert isinstance(prepared, protocol.GraphPrepared) and prepared.slices == 2
        raw.send(protocol.RunPrepared(4, prepared.handle, (arena.arena, 0)))
        assert isinstance(raw.recv(), protocol.GraphDone)
        bad = tuple(arena.arena if s == 1 else s for s in slices)
        raw.send(protocol.RunPrepared(5, prepared.handle, bad, values))
        err = raw.recv()
        assert isinstance(err, protocol.Error) and err.code == code and err.req == 5, err
    finally:
        raw.close()


@pytest.mark.parametrize("value, code", [(1.5, "argument_error"), (2**31, "argument_error"),
                                         ("x", "malformed_frame"), (True, "malformed_frame")])
def test_literal_values_are_type_and_range_checked(broker: BrokerProcess, value: object, code: str) -> None:
    raw = RawConnection(broker.socket)
    try:
        lib = null_library(raw)
        arena = raw_arena(raw)
        spec = GraphSpec((BufferSpec("in", "float32", (16,), arena.arena), BufferSpec("inout", "float32", (16,),
                                                                                   arena.arena, 64)),
                         (KernelNode(lib, "axpy", (1,), (16,), (Lit("f32", 1.0), Buf(0), Buf(1), Lit("i32", 16))),))
        raw.send(protocol.PrepareGraph(3, spec))
        prepared = raw.recv()
        assert isinstance(prepared, protocol.GraphPrepared) and prepared.literals == ("f32", "i32")
        run = protocol.RunPrepared(4, prepared.handle, (arena.arena, 0, arena.arena, 64), (2.0, 16))
        raw.send(run)
        assert isinstance(raw.recv(), protocol.GraphDone)
        body = list(protocol.msgspec.msgpack.decode(protocol.encode(run)[4:]))
        body[1] = 5
        body[4] = [2.0, value]
        raw.send_body(protocol.msgspec.msgpack.encode(body))
        err = raw.recv()
        assert isinstance(err, protocol.Error) and err.code == code, err
    finally:
        raw.close()


def test_prepared_graphs_are_limited_per_session_and_released_at_close(broker_factory: BrokerFactory) -> None:
    b = broker_factory("max_prepared = 3\n")
    with tenantlib.connect(b.socket) as admin:
        base = stats(admin)["prepared_live"]
        raw = RawConnection(b.socket)
        lib = null_library(raw)
        for req in range(1, 4):
            prepared_null(raw, lib, req)
        raw.send(protocol.PrepareGraph(9, GraphSpec((), (KernelNode(lib, "null", (1,), (1,), ()),))))
        err = raw.recv()
        assert isinstance(err, protocol.Error) and err.code == "too_many_requests" and "limit 3" in err.message
        assert stats(admin)["prepared_live"] == base + 3
        raw.close()
        wait_for(lambda: stats(admin)["prepared_live"], lambda v: v == base, "prepared graphs after close")


def test_a_collected_graph_releases_its_handle(client: tenantlib.Client) -> None:
    lib = kernels.library(client)
    x, y = client.array(8), client.array(8)
    g, _ = axpy_graph(client, lib, x, y, 1.0)
    client.run(g)
    live = stats(client)["prepared_live"]
    del g
    gc.collect()  # buffer refs point back at their graph: a cycle
    client.ping()  # the release rides on the next request
    g2, _ = axpy_graph(client, lib, x, y, 1.0)
    client.run(g2)
    assert stats(client)["prepared_live"] == live


def test_a_respawned_worker_is_given_prepared_graphs_again(broker_factory: BrokerFactory) -> None:
    b = broker_factory()
    with tenantlib.connect(b.socket) as c:
        lib = kernels.library(c)
        n = 64
        x, y = c.array(n), c.array(n)
        g, k = axpy_graph(c, lib, x, y, 3.0)
        x[...] = 1.0
        y[...] = 1.0
        c.run(g)
        (worker,) = children(broker_pid(b))
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: children(broker_pid(b)), lambda s: len(s) == 1 and worker not in s, "a new worker")
        wait_for(lambda: all(d["alive"] for d in c.status()["devices"]), bool, "the worker is up")
        y[...] = 1.0
        g.set_literal(k, "alpha", 5.0)
        c.run(g)
        np.testing.assert_array_equal(y, np.full(n, 6.0, dtype=np.float32))
