"""The hot path over shared-memory rings (CPU device): runs and completions as ring records.

Everything a tenant writes into its rings is untrusted input, like a frame: forged handles,
out-of-bounds bindings, malformed records and scribbled ring indices each get a typed answer,
and the healthy tenant beside them keeps getting correct results.
"""

from __future__ import annotations

import array
import mmap
import os
import signal
import socket
import struct

import numpy as np
import pytest

import tenantlib
from broker import protocol as P
from broker import records
from broker.ring import Consumer, Producer, RingGeometry, map_segment, wake
from tenantlib import kernels as K
from tests.conftest import BrokerFactory, RawConnection, broker_pid, children, wait_for
from tools.broker_process import BrokerProcess

N = 256
SLOT = N * 4


def ring_runs(c: tenantlib.Client) -> int:
    return int(c.status()["stats"]["ring_runs"])


def vadd(c: tenantlib.Client, n: int = N) -> tuple[tenantlib.Graph, np.ndarray, np.ndarray, np.ndarray]:
    lib = K.library(c)
    x, y, z = c.array(n), c.array(n), c.array(n)
    g = c.graph()
    grid, block = K.launch_1d(n)
    g.kernel(lib, "vadd", grid=grid, block=block, args=[g.input(x), g.input(y), g.output(z), n])
    return g, x, y, z


def test_tenantlib_runs_travel_on_the_rings_and_come_back_correct(client: tenantlib.Client) -> None:
    assert client._rings is not None, "tenantlib opens rings by default"
    g, x, y, z = vadd(client)
    rng = np.random.default_rng(3)
    before = ring_runs(client)
    for _ in range(20):
        x[...] = rng.standard_normal(N, dtype=np.float32)
        y[...] = rng.standard_normal(N, dtype=np.float32)
        z[...] = np.nan
        r = client.run(g)
        np.testing.assert_array_equal(z, x + y)
        assert r.device == client.devices[0]
    assert ring_runs(client) >= before + 19  # the first run may go while preparing
    traced = client.run(g, trace=True)
    assert set(traced.hops) == set(P.HOPS) and all(v >= 0 for v in traced.hops.values())


def test_pipelined_runs_past_the_rings_capacity_all_come_back(client: tenantlib.Client) -> None:
    g, x, y, z = vadd(client, 16)
    x[...] = 1.0
    y[...] = 2.0
    pending = [client.submit(g) for _ in range(700)]  # more than a ring holds, unread meanwhile
    for p in pending:
        p.result()
    np.testing.assert_array_equal(z, np.full(16, 3.0, dtype=np.float32))


def test_a_run_too_big_for_a_slot_goes_as_a_frame(client: tenantlib.Client) -> None:
    lib = K.library(client)
    n = 8
    arrays = [client.array(n) for _ in range(41)]
    g = client.graph()
    grid, block = K.launch_1d(n)
    for i in range(40):  # 40 arena buffers: 40 slices of 16 bytes do not fit a 512-byte slot
        g.kernel(lib, "axpy", grid=grid, block=block, args=[1.0, g.input(arrays[i]), g.inout(arrays[40]), n])
    for a in arrays[:40]:
        a[...] = 1.0
    arrays[40][...] = 0.0
    before = ring_runs(client)
    client.run(g)
    client.run(g)
    np.testing.assert_array_equal(arrays[40], np.full(n, 80.0, dtype=np.float32))
    assert ring_runs(client) == before


# -- raw tenants with rings -----------------------------------------------------------------
class RingTenant:
    """A raw session with its rings open, one arena and a prepared vadd."""

    def __init__(self, path: str) -> None:
        self.conn = RawConnection(path)
        self.conn.send(P.RegisterLibrary(1, "cuda", K.SOURCE.encode(), K.KERNELS, K.NAME))
        lib = self.conn.recv()
        assert isinstance(lib, P.LibraryRegistered), lib
        fd = os.memfd_create("kaas-test")
        os.ftruncate(fd, 3 * SLOT)
        self.conn.send(P.RegisterArena(2, 3 * SLOT), fd)
        self.data = np.frombuffer(mmap.mmap(fd, 3 * SLOT), dtype=np.float32)
        os.close(fd)
        arena = self.conn.recv()
        assert isinstance(arena, P.ArenaRegistered), arena
        self.arena = arena.arena
        bufs = (P.BufferSpec("in", "float32", (N,), self.arena, 0), P.BufferSpec("in", "float32", (N,), self.arena, SLOT),
                P.BufferSpec("out", "float32", (N,), self.arena, 2 * SLOT))
        node = P.KernelNode(lib.library, "vadd", (1,), (N,), (P.Buf(0), P.Buf(1), P.Buf(2), P.Lit("i32", N)))
        self.conn.send(P.PrepareGraph(3, P.GraphSpec(bufs, (node,))))
        prepared = self.conn.recv()
        assert isinstance(prepared, P.GraphPrepared), prepared
        self.handle = prepared.handle
        self.st = records.run_struct(3, prepared.literals)
        self.conn.send(P.OpenRings(4))
        fds = array.array("i")
        data, anc, _, _ = self.conn.sock.recvmsg(1 << 16, socket.CMSG_SPACE(3 * fds.itemsize))
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(cdata)
        (body,) = self.conn.decoder.feed(data)
        opened = P.decode_broker(body)
        assert isinstance(opened, P.RingsOpened) and len(fds) == 3, opened
        self.geom = RingGeometry(opened.slots, opened.slot_size, opened.rings)
        self.seg_fd, self.wake_broker, self.wake_tenant = fds
        self.mm = map_segment(self.seg_fd, self.geom)
        self.runs = Producer(self.mm, self.geom, 0)
        self.done = Consumer(self.mm, self.geom, 1)

    def slices(self) -> tuple[int, ...]:
        return (self.arena, 0, self.arena, SLOT, self.arena, 2 * SLOT)

    def push(self, rec: bytes) -> None:
        assert self.runs.push(rec)
        wake(self.wake_broker)

    def run(self, req: int, slices: tuple[int, ...] | None = None, handle: int | None = None) -> bytes:
        self.push(records.encode_run(self.st, req, self.handle if handle is None else handle,
                                     self.slices() if slices is None else slices, (N,), 0.0))
        return self.completion(req)

    def completion(self, req: int) -> bytes:
        while True:
            rec = self.done.pop()
            if rec is not None:
                return rec
            self.done.prepare_sleep()
            import select

            select.select([self.wake_tenant, self.conn.sock], [], [], 1.0)
            self.done.end_sleep()
            if self.conn._pending or self._socket_has_data():
                raise AssertionError(f"a frame came instead of the completion of {req}: {self.conn.recv()!r}")

    def _socket_has_data(self) -> bool:
        self.conn.sock.setblocking(False)
        try:
            data = self.conn.sock.recv(1 << 16)
        except BlockingIOError:
            return False
        finally:
            self.conn.sock.setblocking(True)
        self.conn._pending.extend(self.conn.decoder.feed(data))
        return True

    def close(self) -> None:
        self.runs.close()
        self.done.close()
        self.mm.close()
        for fd in (self.seg_fd, self.wake_broker, self.wake_tenant):
            os.close(fd)
        self.conn.close()


@pytest.fixture
def ring_tenant(broker: BrokerProcess) -> RingTenant:
    t = RingTenant(broker.socket)
    yield t  # type: ignore[misc]
    t.close()


def test_a_raw_ring_run_completes_on_the_ring(ring_tenant: RingTenant) -> None:
    t = ring_tenant
    t.data[:N] = np.arange(N)
    t.data[N:2 * N] = 1.0
    kind, req, *_ = records.decode_done(t.run(10))
    assert (kind, req) == (records.DONE, 10)
    np.testing.assert_array_equal(t.data[2 * N:], np.arange(N, dtype=np.float32) + 1)


@pytest.mark.parametrize("change, code", [
    ({"handle": 999}, "unknown_graph"),
    ({"slices": (1, 0, 1, SLOT, 1, 3 * SLOT)}, "out_of_bounds"),
    ({"slices": (1, 0, 1, SLOT, 1, 2)}, "misaligned"),
    ({"slices": (77, 0, 1, SLOT, 1, 2 * SLOT)}, "unknown_arena"),
])
def test_bad_ring_runs_get_typed_errors_and_the_session_goes_on(ring_tenant: RingTenant, change: dict[str, object],
                                                               code: str) -> None:
    t = ring_tenant
    slices = change.get("slices")
    if slices is not None:
        slices = tuple(t.arena if v == 1 and i % 2 == 0 else v for i, v in enumerate(slices))  # type: ignore[union-attr]
    handle = change.get("handle")
    t.push(records.encode_run(t.st, 20, t.handle if handle is None else int(handle),  # type: ignore[arg-type]
                              slices or t.slices(), (N,), 0.0))
    err = t.conn.recv()
    assert isinstance(err, P.Error) and err.code == code and err.req == 20, err
    kind, req, *_ = records.decode_done(t.run(21))
    assert (kind, req) == (records.DONE, 21)


def test_malformed_ring_records_are_refused(ring_tenant: RingTenant) -> None:
    t = ring_tenant
    good = records.encode_run(t.st, 30, t.handle, t.slices(), (N,), 0.0)
    for bad in (good[:-3], good + b"\0" * 8, b"\x07" + good[1:], b"\1"):
        t.push(bad)
        err = t.conn.recv()
        assert isinstance(err, P.Error) and err.code == "malformed_frame", err
    # the same request id twice in flight: the second is refused
    kind, req, *_ = records.decode_done(t.run(31))
    assert (kind, req) == (records.DONE, 31)


def test_a_tenant_scribbling_over_its_rings_loses_only_its_session(broker: BrokerProcess,
                                                                    client: tenantlib.Client) -> None:
    t = RingTenant(broker.socket)
    try:
        g, x, y, z = vadd(client)
        head_at = t.geom.offset(0) + 64
        struct.pack_into("<Q", t.mm, head_at, 10**9)  # a head far past anything the ring holds
        wake(t.wake_broker)
        err = t.conn.recv()
        assert isinstance(err, P.Error) and err.code == "ring_corrupt", err
        assert t.conn.closed_by_peer()
        x[...] = 1.0
        y[...] = 2.0
        client.run(g)
        np.testing.assert_array_equal(z, np.full(N, 3.0, dtype=np.float32))
    finally:
        t.close()


def test_garbage_in_the_run_slots_never_hurts_the_broker(broker: BrokerProcess, client: tenantlib.Client) -> None:
    t = RingTenant(broker.socket)
    try:
        rng = np.random.default_rng(11)
        for i in range(200):
            rec = bytes(rng.integers(0, 256, int(rng.integers(1, t.geom.max_payload)), dtype=np.uint8))
            if i % 2:
                rec = records.RUN_HEAD.pack(1, 0, int(rng.integers(0, 4)), int(rng.integers(0, 4)), 0,
                                            int(rng.integers(0, 2**32)), 100 + i, 0, 0.0) + rec[:64]
            t.push(rec)
        answered = 0
        t.conn.sock.settimeout(10)
        while answered < 200:
            msg = t.conn.recv()
            assert isinstance(msg, P.Error) and msg.code in ("malformed_frame", "unknown_graph", "argument_error",
                                                              "unknown_arena", "invalid_argument"), msg
            answered += 1
        g, x, y, z = vadd(client)
        x[...] = 2.0
        y[...] = 2.0
        client.run(g)
        np.testing.assert_array_equal(z, np.full(N, 4.0, dtype=np.float32))
    finally:
        t.close()


def test_a_worker_killed_with_runs_on_its_rings_loses_no_innocent_graph(broker_factory: BrokerFactory) -> None:
    b = broker_factory()
    with tenantlib.connect(b.socket) as c:
        g, x, y, z = vadd(c, 4096)
        x[...] = 1.0
        y[...] = 5.0
        c.run(g)
        (worker,) = children(broker_pid(b))
        pending = [c.submit(g) for _ in range(300)]
        os.kill(worker, signal.SIGKILL)
        for p in pending:
            p.result()  # replayed on the respawned worker where they had not finished
        np.testing.assert_array_equal(z, np.full(4096, 6.0, dtype=np.float32))
        wait_for(lambda: children(broker_pid(b)), lambda s: len(s) == 1 and worker not in s, "a new worker")
