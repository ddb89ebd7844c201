"""Hostile tenants: every bad input gets one typed error, and nobody else notices.

Each test keeps a second, healthy ``tenantlib`` client open on the same broker and runs
a real vadd graph with it after the bad input: the broker must keep serving other
tenants.  Leak checks compare the broker's open fds, its child processes and /dev/shm
with a baseline, polling with a generous deadline (never a timed assertion).

Raw tests speak frames by hand (``RawConnection``) to send what tenantlib refuses to
build; their shared-memory segments are memfds owned by root, the peer's uid.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
import resource
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import tenantlib
from broker import errors
from broker import protocol as P
from tenantlib import kernels as K
from tests import conftest
from tests.conftest import RawConnection, broker_pid, children, open_fds, shm_entries
from tools.broker_process import BrokerProcess

T = TypeVar("T")

DEADLINE = 30.0   # seconds to wait for a condition before the test fails; generous on purpose
N = 1024          # elements of each vadd operand in raw tests
SLOT = N * 4      # bytes of one float32 operand; operands sit at 0, SLOT, 2*SLOT
ARENA = 3 * SLOT


# -- helpers ----------------------------------------------------------------------------------
def wait_for(probe: Callable[[], T], ok: Callable[[T], bool], what: str, deadline: float = DEADLINE) -> T:
    return conftest.wait_for(probe, ok, what, deadline)


def memfd(size: int) -> int:
    fd = os.memfd_create("kaas-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def is_known(code: str) -> bool:
    return errors.error_class(code) is not errors.KaasError


class Healthy:
    """A well-behaved tenant on the same broker: ``check()`` runs a vadd and verifies it."""

    def __init__(self, client: tenantlib.Client) -> None:
        self.client = client
        self.lib = K.library(client)
        self.n = 4099
        self.x, self.y, self.z = (client.array(self.n) for _ in range(3))
        g = client.graph()
        grid, block = K.launch_1d(self.n)
        g.kernel(self.lib, "vadd", grid=grid, block=block,
                 args=[g.input(self.x), g.input(self.y), g.output(self.z), self.n])
        self.graph = g
        self.rng = np.random.default_rng(1234)
        self.runs = 0

    def check(self) -> None:
        self.x[:] = self.rng.standard_normal(self.n, dtype=np.float32)
        self.y[:] = self.rng.standard_normal(self.n, dtype=np.float32)
        self.z[:] = np.float32(-7.25)
        self.client.run(self.graph, timeout=30)
        np.testing.assert_array_equal(self.z, self.x + self.y)
        self.runs += 1


@pytest.fixture
def healthy(client: tenantlib.Client) -> Iterator[Healthy]:
    h = Healthy(client)
    h.check()
    yield h


class RawTenant:
    """A raw session holding kaas-std and one vadd-shaped arena (memfd) of ARENA bytes."""

    def __init__(self, conn: RawConnection) -> None:
        self.conn = conn
        self._req = 1000
        self.fds: list[int] = []
        reply = self.request(P.RegisterLibrary(self.next_req(), "cuda", K.SOURCE.encode(), K.KERNELS, K.NAME))
        assert isinstance(reply, P.LibraryRegistered), reply
        self.lib = reply.library
        self.arena, self.data = self.new_arena()

    def next_req(self) -> int:
        """A fresh request id; hand-picked ids in tests stay below 1000."""
        self._req += 1
        return self._req

    def request(self, msg: Any, fd: int | None = None) -> P.BrokerMessage:
        self.conn.send(msg, fd)
        reply = self.conn.recv()
        assert getattr(reply, "req", None) == msg.req, f"reply {reply!r} does not answer request {msg.req}"
        return reply

    def expect_error(self, msg: Any, code: str, *fragments: str, fd: int | None = None) -> P.Error:
        reply = self.request(msg, fd)
        assert isinstance(reply, P.Error), f"expected error {code!r}, got {reply!r}"
        assert reply.code == code, reply
        for frag in fragments:
            assert frag in reply.message, f"{frag!r} not in {reply.message!r}"
        return reply

    def new_arena(self, size: int = ARENA) -> tuple[int, np.ndarray]:
        fd = memfd(size)
        self.fds.append(fd)
        reply = self.request(P.RegisterArena(self.next_req(), size), fd)
        assert isinstance(reply, P.ArenaRegistered), reply
        return reply.arena, np.frombuffer(mmap.mmap(fd, size), dtype=np.float32)

    def ping(self) -> None:
        req = self.next_req()
        assert self.request(P.Ping(req)) == P.Pong(req)

    def run_vadd(self, arena: int | None = None, data: np.ndarray | None = None) -> None:
        """A correct vadd on one of this session's arenas; checks the result."""
        arena = self.arena if arena is None else arena
        data = self.data if data is None else data
        data[:N] = np.arange(N, dtype=np.float32)
        data[N:2 * N] = 0.5
        data[2 * N:] = -1
        reply = self.request(P.RunGraph(self.next_req(), vadd_spec(self.lib, arena)))
        assert isinstance(reply, P.GraphDone), reply
        np.testing.assert_array_equal(data[2 * N:3 * N], np.arange(N, dtype=np.float32) + np.float32(0.5))

    def close(self) -> None:
        self.conn.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


@pytest.fixture
def tenant(raw: Callable[..., RawConnection]) -> Iterator[RawTenant]:
    t = RawTenant(raw())
    yield t
    t.close()


def buf(kind: str, arena: int, offset: int, dtype: str = "float32", shape: tuple[int, ...] = (N,)) -> P.BufferSpec:
    return P.BufferSpec(kind, dtype, shape, arena, offset)


def vadd_bufs(arena: int) -> tuple[P.BufferSpec, ...]:
    return buf("in", arena, 0), buf("in", arena, SLOT), buf("out", arena, 2 * SLOT)


VADD_ARGS = (P.Buf(0), P.Buf(1), P.Buf(2), P.Lit("i32", N))


def vadd_node(lib: str, *, kernel: str = "vadd", args: tuple[P.Arg, ...] = VADD_ARGS,
              deps: tuple[int, ...] = (), grid: tuple[int, ...] = (4,)) -> P.KernelNode:
    return P.KernelNode(lib, kernel, grid, (256,), args, 0, deps)


def vadd_spec(lib: str, arena: int) -> P.GraphSpec:
    return P.GraphSpec(vadd_bufs(arena), (vadd_node(lib),))


def shape_of(err: P.Error, ident: object) -> tuple[str, str, tuple[tuple[str, object], ...]]:
    """An error with the offending id blanked out: two refusals of the same shape compare equal."""
    text = str(ident)
    msg = re.sub(rf"(?<![0-9a-f]){re.escape(text)}(?![0-9a-f])", "<ID>", err.message)
    detail = tuple(sorted((k, "<ID>" if v == ident else v) for k, v in err.detail.items()))
    return err.code, msg, detail


# -- framing -------------------------------------------------------------------------------------
def test_malformed_frame_is_refused_and_session_survives(raw: Callable[..., RawConnection],
                                                         healthy: Healthy) -> None:
    r = raw()
    for body in (b"\xc1\xc1 not msgpack", b"", b"\x92\xa4ping", msgspec.msgpack.encode({"ping": 1})):
        r.send_body(body)
        reply = r.recv()
        assert isinstance(reply, P.Error) and reply.code == "malformed_frame", (body, reply)
        assert reply.req == 0
        assert "malformed frame" in reply.message
    # A known tag with bad fields: still malformed, but answered under the readable request id.
    r.send_body(msgspec.msgpack.encode(["run", 41, "not a graph"]))
    reply = r.recv()
    assert isinstance(reply, P.Error) and reply.code == "malformed_frame" and reply.req == 41, reply
    r.send(P.Ping(1))
    assert r.recv() == P.Pong(1)
    healthy.check()


def test_deeply_nested_body_is_answered(raw: Callable[..., RawConnection], healthy: Healthy) -> None:
    """Regression: msgspec raises RecursionError on absurd nesting; it must still be malformed_frame,
    and the frames that arrived in the same read must still be answered."""
    r = raw(timeout=5.0)
    deep = b"\x91" * 5000 + b"\xc0"  # [[[...[nil]...]]]: 5000 levels
    r.send_bytes(P.HEADER.pack(len(deep)) + deep + P.encode(P.Ping(2)))
    time.sleep(0.2)  # keeps Ping(3) out of the first read, so a lost reply shows as missing, not a hang
    r.send(P.Ping(3))
    healthy.check()
    replies: list[P.BrokerMessage] = []
    while not replies or replies[-1] != P.Pong(3):
        replies.append(r.recv())
    assert [type(m).__name__ for m in replies] == ["Error", "Pong", "Pong"], replies
    err = replies[0]
    assert isinstance(err, P.Error) and err.code == "malformed_frame", err
    assert replies[1:] == [P.Pong(2), P.Pong(3)]


def test_truncated_frame_then_close_leaks_nothing(broker: BrokerProcess, raw: Callable[..., RawConnection],
                                                  healthy: Healthy) -> None:
    pid = broker_pid(broker)
    base = open_fds(pid)
    # After the handshake: a frame announcing 1000 bytes, 11 sent, with a segment riding along.
    r = raw()
    fd = memfd(4096)
    try:
        r.send_bytes(P.HEADER.pack(1000) + b"\x93\xa5arena" + b"\x00" * 4, fd=fd)
    finally:
        os.close(fd)
    r.close()
    # Before the handshake: a truncated hello.
    r2 = raw(hello=False)
    hello = P.encode(P.Hello(P.PROTOCOL_VERSION, "truncated"))
    r2.send_bytes(hello[: len(hello) - 3])
    r2.close()
    wait_for(lambda: open_fds(pid), lambda n: n == base, "broker open fds after truncated frames")
    healthy.check()


def test_oversized_frame_is_refused_and_connection_closed(broker: BrokerProcess,
                                                          raw: Callable[..., RawConnection],
                                                          healthy: Healthy) -> None:
    pid = broker_pid(broker)
    base = open_fds(pid)
    for announce in ("max+1", 0xFFFFFFFF):
        r = raw()
        assert r.welcome is not None
        size = r.welcome.max_frame + 1 if announce == "max+1" else 0xFFFFFFFF
        r.send_bytes(P.HEADER.pack(size) + b"\x00" * 64)
        reply = r.recv()  # within the socket timeout: the broker refuses on the header alone
        assert isinstance(reply, P.Error) and reply.code == "frame_too_large", reply
        assert reply.req == 0
        assert str(size) in reply.message and str(r.welcome.max_frame) in reply.message, reply.message
        assert r.closed_by_peer()
        r.close()
    # Before the handshake too.
    r = raw(hello=False)
    r.send_bytes(P.HEADER.pack(0xFFFFFFFF))
    reply = r.recv()
    assert isinstance(reply, P.Error) and reply.code == "frame_too_large", reply
    assert r.closed_by_peer()
    r.close()
    wait_for(lambda: open_fds(pid), lambda n: n == base, "broker open fds after oversized frames")
    healthy.check()


def test_unknown_message_type(raw: Callable[..., RawConnection], healthy: Healthy) -> None:
    r = raw()
    r.send_body(msgspec.msgpack.encode(["bogus", 7]))
    reply = r.recv()
    assert isinstance(reply, P.Error) and reply.code == "unknown_message", reply
    assert reply.req == 7
    assert "'bogus'" in reply.message
    r.send_body(msgspec.msgpack.encode([12, 8]))  # a tag that is not even a string
    reply = r.recv()
    assert isinstance(reply, P.Error) and reply.code == "unknown_message" and reply.req == 8, reply
    r.send(P.Ping(9))
    assert r.recv() == P.Pong(9)
    healthy.check()


def test_wrong_protocol_version(raw: Callable[..., RawConnection], healthy: Healthy) -> None:
    r = raw(hello=False)
    r.send(P.Hello(P.PROTOCOL_VERSION + 41, "from the future"))
    reply = r.recv()
    assert isinstance(reply, P.Error) and reply.code == "version_mismatch", reply
    assert str(P.PROTOCOL_VERSION + 41) in reply.message
    assert reply.detail.get("supported") == [P.PROTOCOL_VERSION]
    assert r.closed_by_peer()
    healthy.check()


def test_first_message_must_be_hello(broker: BrokerProcess, raw: Callable[..., RawConnection],
                                     healthy: Healthy) -> None:
    pid = broker_pid(broker)
    base = open_fds(pid)
    r = raw(hello=False)
    r.send(P.Ping(3))
    reply = r.recv()
    assert isinstance(reply, P.Error) and reply.code == "handshake_required", reply
    assert reply.req == 3 and "hello" in reply.message and "Ping" in reply.message
    assert r.closed_by_peer()
    r.close()
    # A register-arena with its segment before the handshake: refused, and the fd is not kept.
    r = raw(hello=False)
    fd = memfd(4096)
    try:
        r.send(P.RegisterArena(4, 4096), fd=fd)
    finally:
        os.close(fd)
    reply = r.recv()
    assert isinstance(reply, P.Error) and reply.code == "handshake_required" and reply.req == 4, reply
    assert r.closed_by_peer()
    r.close()
    # Garbage before the handshake: malformed, and the connection goes.
    r = raw(hello=False)
    r.send_body(b"\xc1")
    reply = r.recv()
    assert isinstance(reply, P.Error) and reply.code == "malformed_frame", reply
    assert r.closed_by_peer()
    r.close()
    wait_for(lambda: open_fds(pid), lambda n: n == base, "broker open fds after refused handshakes")
    healthy.check()


def test_second_hello_is_refused(tenant: RawTenant, healthy: Healthy) -> None:
    tenant.conn.send(P.Hello(P.PROTOCOL_VERSION, "again"))
    reply = tenant.conn.recv()
    assert isinstance(reply, P.Error) and reply.code == "protocol_error" and "handshake" in reply.message, reply
    tenant.ping()
    tenant.run_vadd()
    healthy.check()


# -- graph validation ----------------------------------------------------------------------------
GraphCase = Callable[[RawTenant], P.GraphSpec]


def _graph(bufs: tuple[P.BufferSpec, ...] | None = None, *nodes: P.KernelNode) -> GraphCase:
    def build(t: RawTenant) -> P.GraphSpec:
        return P.GraphSpec(bufs if bufs is not None else vadd_bufs(t.arena), tuple(nodes) or (vadd_node(t.lib),))
    return build


def _with_bufs(make: Callable[[int], tuple[P.BufferSpec, ...]]) -> GraphCase:
    return lambda t: P.GraphSpec(make(t.arena), (vadd_node(t.lib),))


def _with_node(make: Callable[[str], tuple[P.KernelNode, ...]]) -> GraphCase:
    return lambda t: P.GraphSpec(vadd_bufs(t.arena), make(t.lib))


BAD_GRAPHS: list[tuple[str, str, tuple[str, ...], GraphCase]] = [
    ("out_of_bounds", "out_of_bounds", ("buffer 2", "outside arena", str(ARENA)),
     _with_bufs(lambda a: (buf("in", a, 0), buf("in", a, SLOT), buf("out", a, ARENA - 100)))),
    ("negative_offset", "out_of_bounds", ("buffer 0", "outside arena"),
     _with_bufs(lambda a: (buf("in", a, -SLOT), buf("in", a, SLOT), buf("out", a, 2 * SLOT)))),
    ("huge_shape", "invalid_graph", ("buffer 0", "limit"),
     _with_bufs(lambda a: (buf("in", a, 0, shape=(2**40, 2**20)), buf("in", a, SLOT), buf("out", a, 2 * SLOT)))),
    ("misaligned", "misaligned", ("buffer 1", "offset 2", "float32"),
     _with_bufs(lambda a: (buf("in", a, 0), buf("in", a, 2, shape=(N - 1,)), buf("out", a, 2 * SLOT)))),
    ("made_up_arena", "unknown_arena", ("buffer 0", "arena 999", "not registered"),
     _with_bufs(lambda a: (buf("in", 999, 0), buf("in", a, SLOT), buf("out", a, 2 * SLOT)))),
    ("unknown_kernel", "unknown_kernel", ("'vsub'",), _with_node(lambda lib: (vadd_node(lib, kernel="vsub"),))),
    ("unknown_library", "unknown_library", ("abababababababab", "not registered"),
     _with_node(lambda lib: (vadd_node("ab" * 32),))),
    ("too_few_args", "argument_error", ("takes 4 arguments", "got 3"),
     _with_node(lambda lib: (vadd_node(lib, args=VADD_ARGS[:3]),))),
    ("too_many_args", "argument_error", ("takes 4 arguments", "got 5"),
     _with_node(lambda lib: (vadd_node(lib, args=(*VADD_ARGS, P.Lit("i32", 1))),))),
    ("literal_for_buffer", "argument_error", ("argument 0 (a)", "must be a buffer"),
     _with_node(lambda lib: (vadd_node(lib, args=(P.Lit("f32", 1.0), *VADD_ARGS[1:])),))),
    ("buffer_for_literal", "argument_error", ("argument 3 (n)", "must be a i32 literal"),
     _with_node(lambda lib: (vadd_node(lib, args=(*VADD_ARGS[:3], P.Buf(0))),))),
    ("i32_too_big", "argument_error", ("argument 3 (n)", "2147483648", "i32"),
     _with_node(lambda lib: (vadd_node(lib, args=(*VADD_ARGS[:3], P.Lit("i32", 2**31))),))),
    ("i32_too_small", "argument_error", ("argument 3 (n)", str(-(2**31) - 1)),
     _with_node(lambda lib: (vadd_node(lib, args=(*VADD_ARGS[:3], P.Lit("i32", -(2**31) - 1))),))),
    ("i32_given_float", "argument_error", ("argument 3 (n)", "1.5"),
     _with_node(lambda lib: (vadd_node(lib, args=(*VADD_ARGS[:3], P.Lit("i32", 1.5))),))),
    ("literal_of_wrong_type", "argument_error", ("argument 3 (n)", "must be i32", "f32"),
     _with_node(lambda lib: (vadd_node(lib, args=(*VADD_ARGS[:3], P.Lit("f32", 4.0))),))),
    ("buffer_index_out_of_range", "argument_error", ("buffer index 7",),
     _with_node(lambda lib: (vadd_node(lib, args=(P.Buf(7), *VADD_ARGS[1:])),))),
    ("dtype_mismatch", "dtype_mismatch", ("argument 1 (b)", "expects float32", "float64"),
     _with_bufs(lambda a: (buf("in", a, 0), buf("in", a, SLOT, "float64", (N // 2,)), buf("out", a, 2 * SLOT)))),
    ("unsupported_dtype", "dtype_mismatch", ("buffer 0", "'complex64'"),
     _with_bufs(lambda a: (buf("in", a, 0, "complex64", (N // 2,)), buf("in", a, SLOT), buf("out", a, 2 * SLOT)))),
    ("write_to_in_buffer", "access_error", ("argument 2 (c)", "read-only"),
     _with_bufs(lambda a: (buf("in", a, 0), buf("in", a, SLOT), buf("in", a, 2 * SLOT)))),
    ("cycle", "cycle", ("cycle",),
     _with_node(lambda lib: (vadd_node(lib, deps=(1,)), vadd_node(lib, deps=(0,))))),
    ("self_dependency", "invalid_graph", ("dependency 0",), _with_node(lambda lib: (vadd_node(lib, deps=(0,)),))),
    ("zero_grid", "argument_error", ("grid[0] = 0",), _with_node(lambda lib: (vadd_node(lib, grid=(0,)),))),
    ("no_kernels", "invalid_graph", ("no kernels",), lambda t: P.GraphSpec(vadd_bufs(t.arena), ())),
    ("unknown_buffer_kind", "invalid_graph", ("'scratch'",),
     _with_bufs(lambda a: (buf("scratch", a, 0), buf("in", a, SLOT), buf("out", a, 2 * SLOT)))),
    ("made_up_resident", "unknown_resident", ("cdcdcdcdcdcdcdcd", "not registered"),
     _with_bufs(lambda a: (P.BufferSpec("resident", "float32", (N,), resident="cd" * 32), buf("in", a, SLOT),
                           buf("out", a, 2 * SLOT)))),
]


@pytest.mark.parametrize(("code", "fragments", "build"), [c[1:] for c in BAD_GRAPHS], ids=[c[0] for c in BAD_GRAPHS])
def test_bad_graph_is_refused(tenant: RawTenant, healthy: Healthy, code: str, fragments: tuple[str, ...],
                              build: GraphCase) -> None:
    tenant.expect_error(P.RunGraph(tenant.next_req(), build(tenant)), code, *fragments)
    tenant.ping()
    tenant.run_vadd()  # the refused graph left the session and its arena usable
    healthy.check()


def test_negative_timeout_is_refused(tenant: RawTenant, healthy: Healthy) -> None:
    tenant.expect_error(P.RunGraph(tenant.next_req(), vadd_spec(tenant.lib, tenant.arena), -1.0),
                        "invalid_argument", "timeout")
    healthy.check()



def test_nan_timeout_is_refused(tenant: RawTenant, healthy: Healthy) -> None:
    healthy.check()
    tenant.expect_error(P.RunGraph(tenant.next_req(), vadd_spec(tenant.lib, tenant.arena), float("nan")),
                        "invalid_argument", "timeout")

def test_f32_literal_out_of_range_is_refused(tenant: RawTenant, healthy: Healthy) -> None:
    """Regression: only integer literals were range-checked; 1e300 as f32 ran as inf on the CPU device
    (and would raise OverflowError, an internal_error, in the CUDA backend's struct packing)."""
    axpy = P.KernelNode(tenant.lib, "axpy", (4,), (256,), (P.Lit("f32", 1e300), P.Buf(0), P.Buf(1), P.Lit("i32", N)))
    spec = P.GraphSpec((buf("in", tenant.arena, 0), buf("inout", tenant.arena, SLOT)), (axpy,))
    healthy.check()
    tenant.expect_error(P.RunGraph(tenant.next_req(), spec), "argument_error", "argument 0 (alpha)", "1e+300")
    tenant.run_vadd()


def test_huge_temp_buffers_fail_only_their_tenant(broker_factory: Callable[..., BrokerProcess]) -> None:
    """Regression: temp buffers were bounded only per buffer (1 TiB); the CPU worker's MemoryError
    escaped CpuBackend.poll, killed the worker, and left the device down for every tenant."""
    b = broker_factory()  # its own broker: a regression takes the device down
    with tenantlib.connect(b.socket, timeout=30) as c:
        other = Healthy(c)
        other.check()
        t = RawTenant(RawConnection(b.socket))
        try:
            temps = tuple(P.BufferSpec("temp", "float32", (2**38,)) for _ in range(8))  # 8 x 1 TiB
            spec = P.GraphSpec((*temps, buf("in", t.arena, SLOT), buf("out", t.arena, 2 * SLOT)),
                               (vadd_node(t.lib, args=(P.Buf(0), P.Buf(8), P.Buf(9), P.Lit("i32", N))),))
            reply = t.request(P.RunGraph(t.next_req(), spec))
            assert isinstance(reply, P.Error), reply
            assert issubclass(errors.error_class(reply.code), (errors.TenantError, errors.QuotaError)), reply
        finally:
            t.close()
        other.check()


def test_other_sessions_arena_is_unknown_like_a_made_up_id(raw: Callable[..., RawConnection],
                                                           healthy: Healthy) -> None:
    a = RawTenant(raw())
    b = RawTenant(raw())
    try:
        extra = [a.new_arena() for _ in range(3)]
        foreign, foreign_data = extra[-1]
        assert foreign not in (a.arena, b.arena)  # an id session B never had
        made_up = 7777

        def refusals(arena: int) -> list[P.Error]:
            spec = P.GraphSpec((buf("in", arena, 0), buf("in", b.arena, SLOT), buf("out", b.arena, 2 * SLOT)),
                               (vadd_node(b.lib),))
            digest = bytes(32)
            return [
                b.expect_error(P.RunGraph(b.next_req(), spec), "unknown_arena", f"arena {arena}"),
                b.expect_error(P.ReleaseArena(b.next_req(), arena), "unknown_arena", f"arena {arena}"),
                b.expect_error(P.PutResident(b.next_req(), arena, 0, SLOT, digest), "unknown_arena",
                               f"arena {arena}"),
            ]

        for theirs, invented in zip(refusals(foreign), refusals(made_up), strict=True):
            assert shape_of(theirs, foreign) == shape_of(invented, made_up)
        # B's attempts touched nothing of A's: A still runs on that arena.
        a.run_vadd(foreign, foreign_data)
        b.run_vadd()
    finally:
        a.close()
        b.close()
    healthy.check()


def test_released_arena_cannot_be_used(tenant: RawTenant, healthy: Healthy) -> None:
    arena, data = tenant.new_arena()
    tenant.run_vadd(arena, data)
    req = tenant.next_req()
    assert tenant.request(P.ReleaseArena(req, arena)) == P.Done(req)
    spec = vadd_spec(tenant.lib, arena)
    for msg in (P.RunGraph(tenant.next_req(), spec), P.ReleaseArena(tenant.next_req(), arena),
                P.PutResident(tenant.next_req(), arena, 0, SLOT, bytes(32))):
        reply = tenant.request(msg)
        assert isinstance(reply, P.Error) and reply.code in ("arena_closed", "unknown_arena"), reply
        assert f"arena {arena}" in reply.message
    tenant.run_vadd()
    healthy.check()


def test_duplicate_inflight_request_id(broker: BrokerProcess, tenant: RawTenant, healthy: Healthy) -> None:
    tenant.data[: 2 * N] = 1.0
    run = P.RunGraph(50, vadd_spec(tenant.lib, tenant.arena))
    tenant.conn.send_bytes(P.encode(run) + P.encode(run))  # one read: the first is surely in flight
    replies = [tenant.conn.recv(), tenant.conn.recv()]
    errs = [m for m in replies if isinstance(m, P.Error)]
    done = [m for m in replies if isinstance(m, P.GraphDone)]
    assert len(errs) == 1 and len(done) == 1, replies
    assert errs[0].req == 50 and errs[0].code == "invalid_argument", errs[0]
    assert "50" in errs[0].message and "already in flight" in errs[0].message
    assert done[0].req == 50
    # A register-arena reusing an in-flight id, its segment in the same read: refused, fd not kept.
    pid = broker_pid(broker)
    base = open_fds(pid)
    fd = memfd(ARENA)
    try:
        tenant.conn.send_bytes(P.encode(P.RunGraph(60, vadd_spec(tenant.lib, tenant.arena)))
                               + P.encode(P.RegisterArena(60, ARENA)), fd=fd)
    finally:
        os.close(fd)
    replies = [tenant.conn.recv(), tenant.conn.recv()]
    assert sorted(type(m).__name__ for m in replies) == ["Error", "GraphDone"], replies
    err = next(m for m in replies if isinstance(m, P.Error))
    assert err.req == 60 and err.code == "invalid_argument" and "already in flight" in err.message, err
    wait_for(lambda: open_fds(pid), lambda n: n == base, "broker open fds after a refused register-arena")
    tenant.run_vadd()
    healthy.check()


# -- arenas ------------------------------------------------------------------------------------
def test_register_arena_without_fd(tenant: RawTenant, healthy: Healthy) -> None:
    tenant.expect_error(P.RegisterArena(tenant.next_req(), ARENA), "protocol_error", "without a file descriptor")
    tenant.ping()
    arena, data = tenant.new_arena()  # the fd queue is not out of step afterwards
    tenant.run_vadd(arena, data)
    healthy.check()


def test_register_arena_rejects_bad_segments(broker: BrokerProcess, tenant: RawTenant, healthy: Healthy) -> None:
    pid = broker_pid(broker)
    base = open_fds(pid)
    rp, wp = os.pipe()
    try:
        tenant.expect_error(P.RegisterArena(tenant.next_req(), ARENA), "invalid_arena", "not a shared-memory segment",
                            fd=rp)
    finally:
        os.close(rp)
        os.close(wp)
    fd = memfd(ARENA)
    try:
        err = tenant.expect_error(P.RegisterArena(tenant.next_req(), 2 * ARENA), "invalid_arena",
                                  str(2 * ARENA), str(ARENA), fd=fd)
        assert err.detail == {"size": 2 * ARENA, "segment_size": ARENA}
        tenant.expect_error(P.RegisterArena(tenant.next_req(), 0), "invalid_arena", "declared size 0", fd=fd)
        tenant.expect_error(P.RegisterArena(tenant.next_req(), -5), "invalid_arena", "declared size -5", fd=fd)
    finally:
        os.close(fd)
    # A segment the broker cannot map writable (sealed against writes): refused, not half-registered.
    sealed = os.memfd_create("kaas-sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(sealed, ARENA)
        fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        tenant.expect_error(P.RegisterArena(tenant.next_req(), ARENA), "invalid_arena", "map", fd=sealed)
    finally:
        os.close(sealed)
    wait_for(lambda: open_fds(pid), lambda n: n == base, "broker open fds after refused segments")
    tenant.run_vadd()
    healthy.check()


def test_too_many_fds_in_one_message(broker: BrokerProcess, raw: Callable[..., RawConnection],
                                     healthy: Healthy) -> None:
    pid = broker_pid(broker)
    base = open_fds(pid)
    r = raw()
    fds = [memfd(4096) for _ in range(20)]
    try:
        r.sock.sendmsg([P.encode(P.RegisterArena(1, 4096))],
                       [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
    finally:
        for fd in fds:
            os.close(fd)
    reply = r.recv()
    assert isinstance(reply, P.Error) and reply.code == "protocol_error", reply
    assert "file descriptors" in reply.message
    assert r.closed_by_peer()
    r.close()
    wait_for(lambda: open_fds(pid), lambda n: n == base, "broker open fds after an fd flood")
    healthy.check()


def test_shrunk_segment_fails_only_its_tenant(broker_factory: Callable[..., BrokerProcess]) -> None:
    """Regression: a segment shrunk after registration made the CPU worker die of SIGBUS."""
    b = broker_factory()  # its own broker: a regression takes the device down
    with tenantlib.connect(b.socket, timeout=30) as c:
        other = Healthy(c)
        other.check()
        t = RawTenant(RawConnection(b.socket))
        try:
            t.run_vadd()
            os.ftruncate(t.fds[0], 0)
            t.expect_error(P.RunGraph(t.next_req(), vadd_spec(t.lib, t.arena)), "invalid_arena", "shrank")
        finally:
            t.close()
        other.check()


def test_segment_shrinking_during_copies_fails_only_its_tenant(broker_factory: Callable[..., BrokerProcess]) -> None:
    """Regression: a size check (fstat) before copying through the mapping left a window; a tenant
    truncating its segment concurrently still killed the worker with SIGBUS."""
    b = broker_factory()  # its own broker: a regression takes the device down
    n = 4 << 20  # 16 MiB per operand: each copy is a window of a few milliseconds
    with tenantlib.connect(b.socket, timeout=30) as c:
        other = Healthy(c)
        other.check()
        t = RawTenant(RawConnection(b.socket, timeout=30))
        arena, _ = t.new_arena(3 * 4 * n)
        fd = t.fds[-1]
        spec = P.GraphSpec((buf("in", arena, 0, shape=(n,)), buf("in", arena, 4 * n, shape=(n,)),
                            buf("out", arena, 8 * n, shape=(n,))),
                           (vadd_node(t.lib, args=(P.Buf(0), P.Buf(1), P.Buf(2), P.Lit("i32", n))),))
        stop = threading.Event()

        def flap() -> None:  # the hostile tenant: its segment keeps vanishing and coming back
            while not stop.is_set():
                os.ftruncate(fd, 0)
                os.ftruncate(fd, 3 * 4 * n)

        flapper = threading.Thread(target=flap)
        flapper.start()
        replies: list[P.BrokerMessage] = []
        try:
            for _ in range(150):  # the window is hit within ~30 graphs here; stop at the first loss
                replies.append(t.request(P.RunGraph(t.next_req(), spec)))
                if isinstance(replies[-1], P.Error) and replies[-1].code in ("worker_lost", "no_device"):
                    break
        finally:
            stop.set()
            flapper.join()
            t.close()
        for reply in replies:  # each graph either ran or was refused as the tenant's fault
            assert isinstance(reply, P.GraphDone) or (isinstance(reply, P.Error) and reply.code == "invalid_arena"), \
                reply
        other.check()


@contextlib.contextmanager
def fd_soft_limit(n: int) -> Iterator[None]:
    """Processes started inside inherit a soft RLIMIT_NOFILE of ``n`` (1024 is a common default)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def flood_arenas(t: RawTenant, most: int) -> P.Error | None:
    """Register small arenas until the broker refuses one (returned) or ``most`` were registered."""
    for _ in range(most):
        fd = memfd(4096)
        try:
            reply = t.request(P.RegisterArena(t.next_req(), 4096), fd)
        finally:
            os.close(fd)
        if isinstance(reply, P.Error):
            return reply
    return None


def test_arena_flood_does_not_starve_other_tenants(broker_factory: Callable[..., BrokerProcess]) -> None:
    """Regression: arenas were capped per session only, not against the broker's fd limit; one
    session's arenas exhausted the broker's fds, other sessions' register-arena then failed with
    internal_error (EMFILE in os.dup) and accept() failed.  (Across tenants: test_identity.)"""
    with fd_soft_limit(512):
        b = broker_factory()  # its own broker, with a small (but real) fd limit
    with tenantlib.connect(b.socket, timeout=30) as c:
        other = Healthy(c)
        other.check()
        t = RawTenant(RawConnection(b.socket))
        try:
            refused = flood_arenas(t, 5000)
            # The greedy tenant is refused as such (a quota), not with the broker's own failure ...
            assert refused is not None
            assert issubclass(errors.error_class(refused.code), (errors.QuotaError, errors.TenantError)), refused
            # ... and everybody else still gets arenas.
            a = c.arena(4096)
            a.close()
            other.check()
        finally:
            t.close()


# -- disconnects -------------------------------------------------------------------------------
def test_disconnect_mid_request_releases_everything(broker: BrokerProcess, healthy: Healthy) -> None:
    pid = broker_pid(broker)
    base_fds, base_children, base_shm = open_fds(pid), children(pid), shm_entries()
    assert base_children, "the broker should have a device worker"
    c = tenantlib.connect(broker.socket, timeout=60)
    lib = K.library(c)
    m = 512
    pending = []
    for _ in range(8):
        A, B, C = c.array((m, m)), c.array((m, m)), c.array((m, m))
        A[:] = 1.0
        B[:] = 2.0
        g = c.graph()
        grid, block = K.sgemm_launch(m, m)
        g.kernel(lib, "sgemm", grid=grid, block=block, args=[g.input(A), g.input(B), g.output(C), m, m, m])
        pending.append(c.submit(g, timeout=60))
    assert open_fds(pid) > base_fds  # the broker holds the 24 arenas now
    c._sock.close()  # abrupt: no reply read, nothing released by the client
    c.close()
    healthy.check()  # served while the dead session's graphs drain
    wait_for(lambda: open_fds(pid), lambda n: n == base_fds, "broker open fds after a tenant vanished")
    wait_for(lambda: children(pid), lambda s: s == base_children, "broker child processes")
    wait_for(lambda: shm_entries() - base_shm, lambda s: not s, "new /dev/shm entries")
    wait_for(lambda: healthy.client.status()["queued"], lambda q: q == 0, "graphs queued in the broker")
    healthy.check()


# -- fuzzing -------------------------------------------------------------------------------------
def _valid_bodies() -> list[bytes]:
    spec = P.GraphSpec((buf("in", 1, 0), buf("in", 1, SLOT), buf("out", 1, 2 * SLOT)), (vadd_node("ab" * 32),))
    msgs: list[msgspec.Struct] = [
        P.Hello(P.PROTOCOL_VERSION, "fuzz"), P.Ping(5), P.Status(6), P.RegisterArena(7, 4096),
        P.ReleaseArena(8, 1), P.RunGraph(9, spec, 1.5), P.PutResident(10, 1, 0, 64, bytes(32)),
        P.ReleaseResident(11, "ab" * 32),
        P.RegisterLibrary(12, "cuda", b"extern \"C\" __global__ void k() {}", (K.KERNELS[0],), "x", ("-O3",)),
    ]
    return [P.encode(m)[P.HEADER_SIZE:] for m in msgs]


VALID_BODIES = _valid_bodies()
_prefixes = st.sampled_from(VALID_BODIES).flatmap(lambda b: st.integers(0, len(b) - 1).map(lambda k: b[:k]))


def _mutate(body: bytes, pos: int, byte: int) -> bytes:
    pos %= len(body)
    return body[:pos] + bytes([byte]) + body[pos + 1:]


_mutants = st.builds(_mutate, st.sampled_from(VALID_BODIES), st.integers(0, 10_000), st.integers(0, 255))
FUZZ_BODIES = st.one_of(st.binary(max_size=300), _prefixes, _mutants)


def _decodes(body: bytes) -> bool:
    try:
        P.decode_tenant(body)
    except errors.ProtocolError:
        return False
    except Exception:
        return False
    return True


def test_fuzzed_frame_bodies_get_typed_errors(broker: BrokerProcess, healthy: Healthy) -> None:
    conn = [RawConnection(broker.socket)]
    seen: set[str] = set()
    sent = [0]

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(body=FUZZ_BODIES)
    def fuzz(body: bytes) -> None:
        assume(not _decodes(body))  # a body that happens to be a valid message gets a real answer
        r = conn[0]
        r.send_body(body)
        sent[0] += 1
        reply = r.recv()
        assert isinstance(reply, P.Error), (body, reply)
        assert is_known(reply.code), (body, reply)
        seen.add(reply.code)
        if reply.code == "frame_too_large":
            assert r.closed_by_peer()
            r.close()
            conn[0] = RawConnection(broker.socket)

    try:
        fuzz()
        r = conn[0]
        r.send(P.Ping(1))
        assert r.recv() == P.Pong(1)  # the fuzzed session itself is still usable
    finally:
        conn[0].close()
    assert sent[0] >= 100, f"only {sent[0]} fuzzed bodies were sent"
    assert seen <= {"malformed_frame", "unknown_message", "frame_too_large"}, seen
    print(f"{sent[0]} fuzzed bodies, error codes {sorted(seen)}")
    healthy.check()


def test_disconnect_with_registrations_in_flight(broker: BrokerProcess, raw: Callable[..., RawConnection],
                                                 healthy: Healthy) -> None:
    pid = broker_pid(broker)
    base_fds, base_children = open_fds(pid), children(pid)
    for _ in range(5):
        t = RawTenant(raw())
        spec = vadd_spec(t.lib, t.arena)
        req = 100
        for _ in range(8):
            fd = memfd(ARENA)
            try:
                t.conn.send(P.RegisterArena(req, ARENA), fd=fd)
            finally:
                os.close(fd)
            t.conn.send(P.RunGraph(req + 1, spec))
            req += 2
        t.conn.send(P.ReleaseArena(req, t.arena))
        t.close()  # gone with ~17 requests unanswered
    healthy.check()
    wait_for(lambda: open_fds(pid), lambda n: n == base_fds, "broker open fds after tenants vanished")
    wait_for(lambda: children(pid), lambda s: s == base_children, "broker child processes")
    healthy.check()


def test_arena_on_a_disk_filesystem_is_refused(tenant: RawTenant, healthy: Healthy, tmp_path: Path) -> None:
    """Only memory-backed files: one on a filesystem a tenant could serve (FUSE) might block a worker."""
    path = tmp_path / "not-shm"
    path.write_bytes(b"\0" * ARENA)
    fd = os.open(path, os.O_RDWR)
    try:
        if _is_tmpfs(fd):
            pytest.skip("the test's temporary directory is itself on tmpfs")
        tenant.expect_error(P.RegisterArena(tenant.next_req(), ARENA), "invalid_arena", "tmpfs", fd=fd)
    finally:
        os.close(fd)
    healthy.check()


def _is_tmpfs(fd: int) -> bool:
    from broker.registry import _SHM_FILESYSTEMS, _fs_type

    return _fs_type(fd) in _SHM_FILESYSTEMS
