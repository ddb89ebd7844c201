"""Hostile-input fuzzing of a live broker: ``kaas-bench fuzz --cases N``.

Each case is one frame on a raw tenant connection, or one record on its run ring: random
graph descriptions (valid-ish specs with every field drawn from edge cases), mutations of
valid frames (bit flips, truncation, wrong lengths, field swaps), unknown message types and
random bytes; prepared graphs (prepare frames, runs by real and forged handles with edge-case
bindings and literal values, releases); ring records near-valid and random.
The broker must answer every frame it can parse with a typed ``error`` (a code it
defines) or a success, close the connection after frames it cannot resynchronise on,
and keep serving: a healthy tenant runs a real graph every ``--check-every`` cases.
"""

from __future__ import annotations

import array
import collections
import os
import random
import select
import socket
import struct
import sys
import time
from typing import Any

import msgspec
import numpy as np

from broker import errors, records
from broker import protocol as P
from broker.ring import Consumer, Producer, RingGeometry, map_segment, wake

_EDGE_INTS = [0, 1, -1, 2, 3, 4, 7, 15, 16, 255, 256, 4095, 4096, 65535, 65536, 2**31 - 1, 2**31, -(2**31),
              2**32 - 1, 2**32, 2**63 - 1, -(2**63)]
_EDGE_FLOATS = [0.0, -0.0, 1.5, -1.0, 1e300, -1e300, float("inf"), float("-inf"), float("nan"), 3.4e38, 1e-45]
_KINDS = ["in", "out", "inout", "temp", "resident", "", "weird"]
_DTYPES = [*P.DTYPES, "complex64", "", "float32 "]
_SCALARS = [*P.SCALAR_TYPES, "f16", ""]


class _Conn:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.dec = P.FrameDecoder()
        self.pending: list[bytes] = []
        self.send(P.Hello(P.PROTOCOL_VERSION, "fuzz"))
        w = self.recv()
        assert isinstance(w, P.Welcome), w

    def send(self, msg: msgspec.Struct, fd: int | None = None) -> None:
        self.send_bytes(P.encode(msg), fd)

    def send_bytes(self, data: bytes, fd: int | None = None) -> None:
        if fd is None:
            self.sock.sendall(data)
        else:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])

    def recv(self) -> P.BrokerMessage | None:
        """The next message, or None once the broker has closed the connection."""
        while not self.pending:
            data = self.sock.recv(1 << 20)
            if not data:
                return None
            self.pending.extend(self.dec.feed(data))
        return P.decode_broker(self.pending.pop(0))

    def open_rings(self, req: int) -> None:
        """The session's rings: run records out, completion records in."""
        self.send(P.OpenRings(req))
        fds = array.array("i")
        data, anc, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(3 * fds.itemsize))
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(cdata)
        self.pending.extend(self.dec.feed(data))
        opened = P.decode_broker(self.pending.pop(0))
        assert isinstance(opened, P.RingsOpened) and len(fds) == 3, opened
        seg, self.wake_broker, self.wake_tenant = fds
        self.geom = RingGeometry(opened.slots, opened.slot_size)
        self.mm = map_segment(seg, self.geom)
        os.close(seg)
        self.runs = Producer(self.mm, self.geom, 0)
        self.done = Consumer(self.mm, self.geom, 1)

    def recv_any(self) -> P.BrokerMessage | bytes | None:
        """The next frame or completion record (whichever comes first); None once closed."""
        while True:
            rec = self.done.pop()
            if rec is not None:
                return rec
            if self.pending:
                return P.decode_broker(self.pending.pop(0))
            if select.select([self.sock], [], [], 0.001)[0]:
                data = self.sock.recv(1 << 20)
                if not data:
                    return None
                self.pending.extend(self.dec.feed(data))

    def close(self) -> None:
        self.runs.close()
        self.done.close()
        self.mm.close()
        os.close(self.wake_broker)
        os.close(self.wake_tenant)
        self.sock.close()


class Fuzzer:
    def __init__(self, path: str, seed: int) -> None:
        self.path = path
        self.rng = random.Random(seed)
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.req = 1000
        self._open()

    def _open(self) -> None:
        self.conn = _Conn(self.path)
        fd = os.memfd_create("kaas-fuzz")
        os.ftruncate(fd, 1 << 16)
        self.conn.send(P.RegisterArena(1, 1 << 16), fd)
        os.close(fd)
        arena = self.conn.recv()
        assert isinstance(arena, P.ArenaRegistered), arena
        self.arena = arena.arena
        from tenantlib import kernels

        self.conn.send(P.RegisterLibrary(2, "cuda", kernels.SOURCE.encode(), kernels.KERNELS))
        lib = self.conn.recv()
        assert isinstance(lib, P.LibraryRegistered), lib
        self.lib = lib.library
        self.kernels = {k.name: k for k in kernels.KERNELS}
        self.conn.open_rings(3)
        # (handle, its spec's own slices and literal values, literal kinds) of graphs prepared
        self.handles: list[tuple[int, tuple[int, ...], tuple[int | float, ...], tuple[str, ...]]] = []
        self._preparing: dict[int, P.GraphSpec] = {}

    # -- generators ------------------------------------------------------------------------
    def _int(self) -> int:
        r = self.rng
        return r.choice(_EDGE_INTS) if r.random() < 0.5 else r.randint(-8, 70000)

    def _lit(self) -> P.Lit:
        r = self.rng
        kind = r.choice(_SCALARS)
        value: int | float = r.choice(_EDGE_FLOATS) if kind.startswith("f") and r.random() < 0.7 else self._int()
        return P.Lit(kind, value)

    def _buffer(self) -> P.BufferSpec:
        r = self.rng
        shape = tuple(r.choice([1, 2, 16, 64, 1000, 0, -1, 2**40]) for _ in range(r.choice([0, 1, 1, 2, 3, 9])))
        return P.BufferSpec(r.choice(_KINDS), r.choice(_DTYPES), shape,
                            r.choice([self.arena, self.arena, 0, 99, -1]),
                            r.choice([0, 0, 64, 2, 4096, 1 << 16, -4, self._int()]),
                            r.choice(["", "", "ab" * 32, "zz"]))

    def _kernel(self, nbuf: int, nkern: int) -> P.KernelNode:
        r = self.rng
        name = r.choice([*self.kernels, "nope", ""])
        spec = self.kernels.get(name)
        nargs = len(spec.params) if spec and r.random() < 0.8 else r.randint(0, 8)
        args: list[P.Buf | P.Lit] = []
        for i in range(nargs):
            want_buf = spec is not None and i < len(spec.params) and spec.params[i].kind == "buf"
            if (want_buf and r.random() < 0.85) or (not want_buf and r.random() < 0.1):
                args.append(P.Buf(r.choice([0, 1, 2, nbuf - 1, nbuf, -1, self._int()])))
            else:
                args.append(self._lit())
        dims = lambda: tuple(r.choice([1, 1, 4, 16, 256, 1024, 0, -1, 65536, 2**31]) for _ in range(r.choice([1, 2, 3, 0, 4])))  # noqa: E731
        deps = tuple(r.randint(-1, nkern) for _ in range(r.choice([0, 0, 1, 2])))
        return P.KernelNode(r.choice([self.lib, self.lib, "0" * 64, ""]), name, dims(), dims(), tuple(args),
                            r.choice([0, 0, 1024, 10**7, -1]), deps)

    def _graph_frame(self) -> bytes:
        r = self.rng
        nbuf, nkern = r.randint(0, 6), r.randint(0, 4)
        spec = P.GraphSpec(tuple(self._buffer() for _ in range(nbuf)),
                           tuple(self._kernel(nbuf, nkern) for _ in range(nkern)))
        self.req += 1
        return P.encode(P.RunGraph(self.req, spec, r.choice([0.0, 1.0, 5.0, -1.0, float("nan"), 1e9])))

    def _valid_spec(self) -> P.GraphSpec:
        r = self.rng
        n = r.choice([1, 16, 100, 1000])
        bufs = (P.BufferSpec("in", "float32", (n,), self.arena, 0), P.BufferSpec("in", "float32", (n,), self.arena, 4096),
                P.BufferSpec("out", "float32", (n,), self.arena, 8192), P.BufferSpec("temp", "float32", (n,)))
        vadd = P.KernelNode(self.lib, "vadd", (4,), (256,), (P.Buf(0), P.Buf(1), P.Buf(3), P.Lit("i32", n)))
        axpy = P.KernelNode(self.lib, "axpy", (4,), (256,), (P.Lit("f32", 2.0), P.Buf(3), P.Buf(2), P.Lit("i32", n)),
                            0, (0,))
        return P.GraphSpec(bufs, (vadd, axpy))

    def _near_valid_frame(self) -> bytes:
        """A valid two-kernel graph with one field perturbed: reaches the deep checks and the device."""
        r = self.rng
        spec = self._valid_spec()
        bufs, kernels = list(spec.buffers), list(spec.kernels)
        what = r.randrange(8)
        if what == 0:
            i = r.randrange(len(bufs))
            bufs[i] = msgspec.structs.replace(bufs[i], offset=r.choice([2, -4, 1 << 16, 65532, self._int()]))
        elif what == 1:
            i = r.randrange(len(bufs))
            bufs[i] = msgspec.structs.replace(bufs[i], dtype=r.choice(_DTYPES), kind=r.choice(_KINDS))
        elif what == 2:
            k = r.randrange(2)
            args = list(kernels[k].args)
            new: P.Buf | P.Lit = self._lit() if r.random() < 0.5 else P.Buf(r.randint(-1, 5))
            args[r.randrange(len(args))] = new
            kernels[k] = msgspec.structs.replace(kernels[k], args=tuple(args))
        elif what == 3:
            kernels[0] = msgspec.structs.replace(kernels[0], deps=(1,))  # a cycle with kernel 1's dep on 0
        elif what == 4:
            k = r.randrange(2)
            kernels[k] = msgspec.structs.replace(kernels[k], grid=(r.choice([0, 2**31, 70000]),),
                                                 block=(r.choice([1, 1025, 0]),), shared=r.choice([0, 10**6]))
        elif what == 5:
            k = r.randrange(2)
            kernels[k] = msgspec.structs.replace(kernels[k], kernel=r.choice([*self.kernels, "x"]))
        elif what == 6:
            bufs[2] = msgspec.structs.replace(bufs[2], kind="in")  # axpy now writes a read-only buffer
        # what == 7: the valid graph itself, which must run
        self.req += 1
        return P.encode(P.RunGraph(self.req, P.GraphSpec(tuple(bufs), tuple(kernels)), r.choice([0.0, 10.0])))

    def _mutated_frame(self) -> bytes:
        r = self.rng
        frame = bytearray(self._graph_frame())
        for _ in range(r.randint(1, 4)):
            op = r.random()
            if op < 0.5 and len(frame) > 4:
                frame[r.randrange(4, len(frame))] = r.randrange(256)
            elif op < 0.7 and len(frame) > 5:
                del frame[r.randrange(5, len(frame)):]
            else:
                frame[4:4] = bytes(r.randrange(256) for _ in range(r.randint(1, 8)))
        struct.pack_into("<I", frame, 0, len(frame) - 4)  # keep the stream in sync
        return bytes(frame)

    def _other_frame(self) -> bytes:
        r = self.rng
        self.req += 1
        choice = r.random()
        if choice < 0.3:
            body = msgspec.msgpack.encode([r.choice(["bogus", "welcome", "", "run", 7, None]), self.req,
                                           *[self._int() for _ in range(r.randint(0, 4))]])
        elif choice < 0.6:
            body = bytes(r.randrange(256) for _ in range(r.randint(0, 64)))
        elif choice < 0.8:
            body = msgspec.msgpack.encode(P.PutResident(self.req, r.choice([self.arena, 5]), self._int(), self._int(),
                                                        bytes(r.randrange(256) for _ in range(r.choice([32, 31, 0])))))
        else:
            body = msgspec.msgpack.encode(P.ReleaseResident(self.req, r.choice(["", "ab" * 32, "x"])))
        return struct.pack("<I", len(body)) + body

    # -- prepared graphs and ring records -----------------------------------------------------
    def _prepare_frame(self) -> bytes:
        r = self.rng
        self.req += 1
        if r.random() < 0.6:
            spec = self._valid_spec()
        else:
            nbuf, nkern = r.randint(0, 6), r.randint(0, 4)
            spec = P.GraphSpec(tuple(self._buffer() for _ in range(nbuf)),
                               tuple(self._kernel(nbuf, nkern) for _ in range(nkern)))
        self._preparing = {self.req: spec}
        return P.encode(P.PrepareGraph(self.req, spec))

    def _bindings(self) -> tuple[int, tuple[int, ...], tuple[int | float, ...], tuple[str, ...]]:
        """A run's handle and bindings: a prepared graph's own, one of them perturbed, or made up."""
        r = self.rng
        if self.handles and r.random() < 0.8:
            handle, own, vals, kinds = r.choice(self.handles)
        else:
            handle, own, vals, kinds = r.choice([0, 999, 2**31, r.randint(1, 50)]), (self.arena, 0), (16,), ("i32",)
        slices, values = list(own), list(vals)
        what = r.randrange(5)
        if what == 0 and slices:
            slices[r.randrange(len(slices))] = r.choice([99, 0, -1, 2, -4, 1 << 16, 65532, self._int()])
        elif what == 1:
            slices += [self.arena] if r.random() < 0.5 else [self.arena, 0]
        elif what == 2 and values:
            values[r.randrange(len(values))] = self._lit().value
        elif what == 3:
            values.append(self._int())
        return handle, tuple(slices), tuple(values), kinds

    def _run_prepared_frame(self) -> bytes:
        r = self.rng
        handle, slices, values, _ = self._bindings()
        self.req += 1
        if r.random() < 0.1 and self.handles:
            h = self.handles.pop(r.randrange(len(self.handles)))[0]
            return P.encode(P.ReleaseGraph(self.req, r.choice([h, h, 777])))
        return P.encode(P.RunPrepared(self.req, handle, slices, values, r.choice([0.0, 5.0, -1.0, float("nan")])))

    def _ring_record(self) -> bytes:
        r = self.rng
        self.req += 1
        handle, slices, values, kinds = self._bindings()
        if len(kinds) != len(values):
            kinds = tuple("f64" for _ in values)
        try:
            st = records.run_struct(len(slices) // 2, kinds)
            rec = records.encode_run(st, self.req, handle, slices[: 2 * (len(slices) // 2)], values,
                                     r.choice([0.0, 5.0]))
        except struct.error:
            rec = bytes(r.randrange(256) for _ in range(40))
        if r.random() < 0.3:  # mangle it: the broker copies, checks lengths and counts
            b = bytearray(rec)
            for _ in range(r.randint(1, 4)):
                b[r.randrange(len(b))] = r.randrange(256)
            rec = bytes(b[: r.randint(1, len(b))]) if r.random() < 0.3 else bytes(b)
        return rec[: self.conn.geom.max_payload] or b"\0"

    # -- running ---------------------------------------------------------------------------
    def case(self) -> None:
        r = self.rng.random()
        if r < 0.15:
            if not self.conn.runs.push(self._ring_record()):
                raise AssertionError("the run ring is full although every record was answered")
            wake(self.conn.wake_broker)
            self._outcome(self.conn.recv_any(), b"")
            return
        frame = (self._near_valid_frame() if r < 0.4 else self._graph_frame() if r < 0.5
                 else self._prepare_frame() if r < 0.6 else self._run_prepared_frame() if r < 0.7
                 else self._mutated_frame() if r < 0.88 else self._other_frame())
        self.conn.send_bytes(frame)
        self._outcome(self.conn.recv(), frame)

    def _outcome(self, reply: P.BrokerMessage | bytes | None, frame: bytes) -> None:
        if isinstance(reply, bytes):
            kind, *_ = records.decode_done(reply)
            self.outcomes["ring completion" if kind == records.DONE else "ring failure"] += 1
            return
        if isinstance(reply, P.GraphPrepared):
            spec = self._preparing.get(reply.req)
            if spec is not None and len(self.handles) < 64:
                from broker.graph import spec_bindings

                self.handles.append((reply.handle, *spec_bindings(spec), reply.literals))
        if reply is None:
            self.outcomes["closed by broker"] += 1
            self.conn.close()
            self._open()
            return
        if isinstance(reply, P.Error):
            if errors.error_class(reply.code) is errors.KaasError:
                raise AssertionError(f"untyped error code {reply.code!r}: {reply.message}")
            if reply.code == "internal_error":
                raise AssertionError(f"internal error (a broker bug) for frame {frame[:200]!r}: {reply.message}")
            self.outcomes[reply.code] += 1
        else:
            self.outcomes[type(reply).__name__] += 1

    def close(self) -> None:
        self.conn.close()


def healthy_check(path: str) -> None:
    import tenantlib
    from tenantlib import kernels

    with tenantlib.connect(path, timeout=30) as c:
        lib = kernels.library(c)
        x, y, z = (c.array(256) for _ in range(3))
        x[...] = np.arange(256)
        y[...] = 1
        g = c.graph()
        g.kernel(lib, "vadd", grid=1, block=256, args=[g.input(x), g.input(y), g.output(z), 256])
        c.run(g)
        if not np.array_equal(z, x + y):
            raise AssertionError("the healthy tenant got a wrong result")


def run(path: str, cases: int, seed: int, check_every: int, out: Any = sys.stderr) -> dict[str, Any]:
    fz = Fuzzer(path, seed)
    t0 = time.monotonic()
    try:
        for i in range(1, cases + 1):
            fz.case()
            if i % check_every == 0 or i == cases:
                healthy_check(path)
                rate = i / (time.monotonic() - t0)
                print(f"  {i}/{cases} cases, {rate:.0f}/s, broker healthy", file=out, flush=True)
    finally:
        fz.close()
    return {"cases": cases, "seed": seed, "seconds": time.monotonic() - t0, "outcomes": dict(fz.outcomes)}
