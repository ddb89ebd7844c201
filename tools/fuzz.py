"""Hostile-input fuzzing of a live broker: ``kaas-bench fuzz --cases N``.

Each case is one frame on a raw tenant connection: random graph descriptions (valid-ish
specs with every field drawn from edge cases), mutations of valid frames (bit flips,
truncation, wrong lengths, field swaps), unknown message types and random bytes.
The broker must answer every frame it can parse with a typed ``error`` (a code it
defines) or a success, close the connection after frames it cannot resynchronise on,
and keep serving: a healthy tenant runs a real graph every ``--check-every`` cases.
"""

from __future__ import annotations

import collections
import os
import random
import socket
import struct
import sys
import time
from typing import Any

import msgspec
import numpy as np

from broker import errors
from broker import protocol as P

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

    def close(self) -> None:
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

    # -- running ---------------------------------------------------------------------------
    def case(self) -> None:
        r = self.rng.random()
        frame = (self._near_valid_frame() if r < 0.4 else self._graph_frame() if r < 0.6
                 else self._mutated_frame() if r < 0.85 else self._other_frame())
        self.conn.send_bytes(frame)
        reply = self.conn.recv()
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
