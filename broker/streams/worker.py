"""The device worker process: one per device, driven by the broker over a socketpair.

    python -m broker.streams.worker --fd N --device cpu:0 [--host-modules a,b]

It owns its device (for CUDA, the context) and nothing else: no tenant state, no
policy.  Commands are handled in arrival order, so the broker may send ``put`` and then
``run`` without waiting in between.  The worker exits when the broker goes away
(EOF, or the parent-death signal) and after a sticky device fault, which leaves the
context unusable: the broker then respawns it.
"""

from __future__ import annotations

import argparse
import array
import ctypes
import math
import os
import select
import signal
import socket
import sys
import time
from typing import Any

from .. import errors
from ..protocol import DEFAULT_MAX_FRAME, FrameDecoder, encode
from ..records import TRACE, decode_run, decode_values, encode_done, values_struct
from ..ring import RECHECK_INTERVAL, Consumer, Producer, RingCorrupt, RingGeometry, drain, map_segment, wake
from .backend import Backend, Completion
from .direct import DIRECT_TOKEN, DirectRuns
from .precompile import Precompiler
from .wire import (
    WEvictResident,
    WInfo,
    WLease,
    WLeaseAdd,
    WLoadLibrary,
    WorkerCommand,
    WPinArena,
    WPoisoned,
    WPrepare,
    WPutResident,
    WReady,
    WRelease,
    WReply,
    WRevoke,
    WRun,
    WShutdown,
    WUnloadLibrary,
    WUnpinArena,
    command_decoder,
)

EXIT_POISONED = 3
_SELECT_EVERY = 50e-6  # while busy-polling, how often the socket is looked at
_MAX_FDS = 16
_PR_SET_PDEATHSIG = 1
_FD_SETSIZE = 1024  # select() takes no fd at or above this: poll() then (its timeout is in ms)


def _readable(fds: list[int], timeout: float | None) -> list[int]:
    """The fds of ``fds`` that are readable within ``timeout`` seconds (None: no limit).

    ``select`` while every fd is below FD_SETSIZE (it waits to the microsecond), ``poll`` beyond:
    a worker started by a broker holding thousands of fds may get fd numbers past 1024."""
    if max(fds) < _FD_SETSIZE:
        return select.select(fds, [], [], timeout)[0]
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    ms = None if timeout is None else math.ceil(timeout * 1000)
    return [fd for fd, _ in poller.poll(ms)]


def _low_fd(fd: int) -> int:
    """``fd`` moved to the lowest free number (inherited fds keep the broker's numbers)."""
    if fd < 0:
        return fd
    low = os.dup(fd)
    if low < fd:
        os.close(fd)
        return low
    os.close(low)
    return fd


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def make_backend(device: str, host_modules: tuple[str, ...], compile_check: str) -> Backend:
    kind, _, idx = device.partition(":")
    index = int(idx or 0)
    if kind == "cpu":
        from .cpu_backend import CpuBackend

        return CpuBackend(index, host_modules=host_modules, compile_check=compile_check)
    if kind == "cuda":
        from .cuda_backend import CudaBackend

        return CudaBackend(index)
    raise SystemExit(f"unknown device {device!r}")


class WorkerRings:
    """The worker's ends of its rings: runs in (ring 0), completions out (ring 1)."""

    def __init__(self, fd: int, geom: RingGeometry, wake_fd: int, notify_fd: int) -> None:
        self.mm = map_segment(fd, geom)
        os.close(fd)
        self.runs = Consumer(self.mm, geom, 0)
        self.completions = Producer(self.mm, geom, 1)
        self.wake_fd = wake_fd      # the broker writes it when this worker sleeps
        self.notify_fd = notify_fd  # written when the broker sleeps on completions
        self.max_payload = geom.max_payload


class Worker:
    def __init__(self, sock: socket.socket, backend: Backend, spin: float = 0.0,
                 rings: WorkerRings | None = None) -> None:
        self.sock = sock
        self.backend = backend
        self.rings = rings
        self.sock_seq = 0  # the last command read from the socket: ring runs name the one they follow
        self.vstructs: dict[int, Any] = {}  # prepared graph -> layout of its literal values
        self.decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        self.fds: list[int] = []
        self.traced: dict[int, list[float]] = {}  # seq -> stamps, for runs that asked for a trace
        # Prepared graphs the backend refused: their runs fail with the same error.
        self.refused: dict[int, errors.KaasError] = {}
        self.running = True
        self.spin = spin  # seconds to busy-poll after the last command or completion
        self.compiles = Precompiler(backend.compile_arch)  # CUDA C compiled off this loop
        self.direct = DirectRuns(backend, self.send, self._sync)  # sessions' runs taken under a lease
        self.direct.on_gid_idle = self._release_deferred
        self.deferred: dict[int, WRelease] = {}  # releases waiting for a graph's direct runs to end
        self.unloads: list[WUnloadLibrary] = []  # library unloads waiting for the direct runs on the device

    def _release_deferred(self, gid: int) -> None:
        cmd = self.deferred.pop(gid, None)
        if cmd is not None:
            self.handle(cmd)
        if self.unloads and not self.direct.busy:
            unloads, self.unloads = self.unloads, []
            for u in unloads:
                self.handle(u)

    def _sync(self) -> None:
        """Handle whatever the broker has sent by now (without waiting for more)."""
        for _ in range(16):
            if not _readable([self.sock.fileno()], 0.0) or not self._recv():
                return

    def send(self, msg: Any) -> None:
        self.sock.sendall(encode(msg))

    def _recv(self) -> bool:
        fds = array.array("i")
        try:
            data, anc, flags, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(_MAX_FDS * fds.itemsize))
        except InterruptedError:
            return True
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
        self.fds.extend(fds)
        if not data:
            return False
        for body in self.decoder.feed(data):
            cmd = command_decoder.decode(body)
            self.sock_seq = max(self.sock_seq, cmd.seq)
            self.handle(cmd)
        return True

    def _ring_runs(self) -> bool:
        """Start the runs waiting on the ring; False when the broker went away meanwhile."""
        assert self.rings is not None
        for rec in self.rings.runs.pop_many(64):
            seq, handle, flags, priority, barrier, deadline, slices, nvalues, at = decode_run(rec)
            while self.sock_seq < barrier:  # it follows a command still on the socket (its prepare)
                if not self._recv():
                    return False
            t = time.perf_counter() if flags & TRACE else 0.0
            try:
                refused = self.refused.get(handle)
                if refused is not None:
                    raise refused
                vs = self.vstructs.get(handle)
                if vs is None:
                    raise errors.InternalError(f"prepared graph {handle} is not held by this worker")
                self.backend.run(seq, handle, slices, decode_values(rec, at, nvalues, vs), deadline, priority)
            except errors.KaasError as exc:
                self.send(WReply(seq, exc.code, exc.message, exc.detail))
                continue
            except Exception as exc:
                self.send(WReply(seq, errors.InternalError.code, f"worker: {type(exc).__name__}: {exc}"))
                continue
            if t:
                self.traced[seq] = [t, time.perf_counter()]
        return True

    def _take_fd(self) -> int:
        if not self.fds:
            raise errors.InternalError("command expected a file descriptor and none arrived")
        return self.fds.pop(0)

    def handle(self, cmd: WorkerCommand, compiled: bool = False) -> None:
        """Carry out one command from the broker and answer it (a run answers when it completes).

        A ``load`` of CUDA C is compiled in a thread first (``Precompiler``) and handled once that
        is done (``compiled``): the broker waits for its reply before anything uses the library.
        """
        if isinstance(cmd, WLoadLibrary) and self.unloads:  # loaded again before a deferred unload ran
            for u in [u for u in self.unloads if u.library == cmd.library]:
                self.unloads.remove(u)
                self.send(WReply(u.seq))
        if isinstance(cmd, WLoadLibrary) and not compiled and self.compiles.wants(cmd):
            self.compiles.start(cmd)
            return
        try:
            if isinstance(cmd, WRun):
                t = time.perf_counter() if cmd.trace else 0.0
                refused = self.refused.get(cmd.handle)
                if refused is not None:
                    raise refused
                self.backend.run(cmd.seq, cmd.handle, cmd.slices, cmd.values, cmd.deadline, cmd.priority)
                if cmd.trace:
                    self.traced[cmd.seq] = [t, time.perf_counter()]
                return
            if isinstance(cmd, WPrepare):
                self.refused.pop(cmd.handle, None)
                try:
                    self.backend.prepare(cmd.handle, cmd.graph, cmd.literals)
                except errors.KaasError as exc:
                    self.refused[cmd.handle] = exc
                    raise
                g = cmd.graph
                self.vstructs[cmd.handle] = values_struct(tuple(
                    getattr(g.kernels[k].args[a], "dtype", "f64") for k, a in cmd.literals))
                self.send(WReply(cmd.seq))
                return
            if isinstance(cmd, WLease):
                fds = [self._take_fd() for _ in range(4)]
                self.direct.install(cmd, fds)
                self.send(WReply(cmd.seq))
                return
            if isinstance(cmd, WLeaseAdd):
                self.direct.add(cmd)
                self.send(WReply(cmd.seq))
                return
            if isinstance(cmd, WRevoke):
                self.direct.revoke(cmd)  # answers once the lease's runs have ended
                return
            if isinstance(cmd, WRelease):
                if self.direct.running(cmd.handle):  # a direct run of it is on the device: after it
                    self.deferred[cmd.handle] = cmd
                    return
                self.refused.pop(cmd.handle, None)
                self.vstructs.pop(cmd.handle, None)
                self.backend.release(cmd.handle)
                self.send(WReply(cmd.seq))
                return
            if isinstance(cmd, WUnloadLibrary) and self.direct.busy:  # a direct run may use it: after them
                self.unloads.append(cmd)
                return
            info: dict[str, Any] = {}
            if isinstance(cmd, WLoadLibrary):
                info["log"] = self.backend.load_library(cmd.library, cmd.format, cmd.data, cmd.kernels, cmd.options)
            elif isinstance(cmd, WUnloadLibrary):
                self.backend.unload_library(cmd.library)
            elif isinstance(cmd, WPinArena):
                self.backend.pin_arena(cmd.arena, self._take_fd(), cmd.size)
            elif isinstance(cmd, WUnpinArena):
                self.backend.unpin_arena(cmd.arena)
            elif isinstance(cmd, WPutResident):
                self.backend.put_resident(cmd.resident, self._take_fd(), cmd.size)
            elif isinstance(cmd, WEvictResident):
                self.backend.evict_resident(cmd.resident)
            elif isinstance(cmd, WInfo):
                info = {**self.backend.info(), "usage": self.backend.usage()}
            elif isinstance(cmd, WShutdown):
                self.running = False
            self.send(WReply(cmd.seq, info=info))
        except errors.KaasError as exc:
            self.send(WReply(cmd.seq, exc.code, exc.message, exc.detail))
        except Exception as exc:  # a bug here must still answer the command
            self.send(WReply(cmd.seq, errors.InternalError.code, f"worker: {type(exc).__name__}: {exc}"))

    def _complete(self, done: list[Completion]) -> None:
        direct = self.direct
        if direct.leases or direct.busy:
            mine = [c for c in done if c.token >= DIRECT_TOKEN]
            if mine:
                direct.complete(mine)
                if len(mine) == len(done):
                    return
                done = [c for c in done if c.token < DIRECT_TOKEN]
        now = time.perf_counter()
        rings = self.rings
        posted = False
        for c in done:
            stamps = self.traced.pop(c.token, None)
            trace = (*stamps, now) if stamps is not None else ()
            if c.error is not None:
                self.send(WReply(c.token, c.error.code, c.error.message, c.error.detail))
                continue
            t = c.timings
            if rings is not None and t is not None and rings.completions.push(
                    encode_done(c.token, (t.queued, t.copy_in, t.kernels, t.copy_out, t.total), trace)):
                posted = True
            else:  # no ring, or it is full: the socket carries it
                self.send(WReply(c.token, timings=t, trace=trace))
        if posted and rings is not None and rings.completions.consumer_sleeping():
            wake(rings.notify_fd)

    def run(self) -> int:
        self.send(WReady(self.backend.info()))
        backend = self.backend
        rings = self.rings
        sfd = self.sock.fileno()
        clock = time.perf_counter
        last = clock()  # the last command or completion
        next_select = 0.0
        direct = self.direct
        while self.running:
            now = clock()
            idle = now - last
            busy = backend.busy
            spin = direct.spin_s if direct.spin_s > self.spin else self.spin
            if idle < (spin if not busy or spin > 0.0002 else 0.0002):
                # Busy-polling: the rings and the device on every pass, the socket (registration,
                # prepares: a ring run waits for the one it follows) only every _SELECT_EVERY.
                if rings is not None and rings.runs.ready():
                    if not self._ring_runs():
                        break
                    last = clock()
                if direct.leases and direct.ready():
                    direct.take()
                    last = clock()
                if now >= next_select:
                    next_select = now + _SELECT_EVERY
                    if _readable([sfd], 0.0):
                        if not self._recv():
                            break
                        last = clock()
            else:
                timeout = min(0.001, idle / 4) if busy else None  # long device work: back off, up to 1 ms
                if self.compiles.pending:
                    timeout = 0.005 if timeout is None else min(timeout, 0.005)  # look in on the compiles
                fds = [sfd]
                if rings is not None:
                    if not rings.runs.prepare_sleep():
                        timeout = 0.0  # a run arrived while announcing the sleep
                    fds.append(rings.wake_fd)
                if direct.leases:
                    if not direct.prepare_sleep():
                        timeout = 0.0
                    fds += direct.wake_fds()
                    timeout = RECHECK_INTERVAL if timeout is None else min(timeout, RECHECK_INTERVAL)
                r = _readable(fds, timeout)
                if rings is not None:
                    rings.runs.end_sleep()
                    if rings.wake_fd in r:
                        drain(rings.wake_fd)
                if direct.leases:
                    direct.end_sleep()
                    for fd in r:
                        if fd != sfd and (rings is None or fd != rings.wake_fd):
                            drain(fd)
                if sfd in r:
                    if not self._recv():
                        break
                    last = clock()
                if rings is not None and rings.runs.ready():
                    if not self._ring_runs():
                        break
                    last = clock()
                if direct.leases and direct.ready():
                    direct.take()
                    last = clock()
            if self.compiles.pending:
                for cmd in self.compiles.finished():
                    self.handle(cmd, compiled=True)
                    last = clock()
            done = backend.poll()
            if backend.poisoned:
                # First the warning (nothing more goes to a dying worker), then the fault's replies.
                self.send(WPoisoned("a sticky device fault: the context is unusable"))
                self._complete(done)
                return EXIT_POISONED
            if done:
                self._complete(done)
                last = clock()
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kaas-worker", description="kaas device worker (started by the broker)")
    p.add_argument("--fd", type=int, required=True, help="inherited socket to the broker")
    p.add_argument("--device", required=True, help="cpu:N or cuda:N")
    p.add_argument("--host-modules", default="tenantlib.kernels.host")
    p.add_argument("--compile-check", default="sm_90", help="arch the CPU device checks CUDA C against ('' off)")
    p.add_argument("--spin-us", type=int, default=0, help="busy-poll this long after activity")
    p.add_argument("--ring-fd", type=int, default=-1, help="inherited ring segment (runs in, completions out)")
    p.add_argument("--ring-slots", type=int, default=0)
    p.add_argument("--ring-slot-size", type=int, default=0)
    p.add_argument("--wake-fd", type=int, default=-1, help="eventfd the broker writes when this worker sleeps")
    p.add_argument("--notify-fd", type=int, default=-1, help="eventfd to write when the broker sleeps")
    args = p.parse_args(argv)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the broker decides when we stop
    args.fd, args.ring_fd, args.wake_fd, args.notify_fd = (
        _low_fd(fd) for fd in (args.fd, args.ring_fd, args.wake_fd, args.notify_fd))
    sock = socket.socket(fileno=args.fd)
    sock.setblocking(True)
    backend = make_backend(args.device, tuple(m for m in args.host_modules.split(",") if m), args.compile_check)
    rings = None
    if args.ring_fd >= 0:
        rings = WorkerRings(args.ring_fd, RingGeometry(args.ring_slots, args.ring_slot_size), args.wake_fd,
                            args.notify_fd)
    try:
        from ..profiling import profiled

        rc = profiled(f"worker-{args.device}", Worker(sock, backend, args.spin_us / 1e6, rings).run)
    except (BrokenPipeError, ConnectionResetError):
        rc = 0
    except RingCorrupt as exc:  # the broker is trusted: this is a bug; exiting makes it respawn us
        print(f"kaas worker: {exc}", file=sys.stderr)
        rc = 1
    if rc == EXIT_POISONED:
        os._exit(rc)  # tearing down a poisoned context only delays the respawn; exiting frees it
    backend.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
