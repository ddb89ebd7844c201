"""The broker's handle on one device worker process: spawn, command channel, death.

Commands go over a socketpair as frames (``broker.protocol`` framing, ``wire`` messages);
file descriptors ride on the command that consumes them.  Every command gets one
``WReply``; when the worker dies, every pending command fails with ``WorkerLost``.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from . import errors
from .protocol import DEFAULT_MAX_FRAME, FrameDecoder, Timings, encode
from .records import decode_done, encode_run
from .ring import Consumer, Producer, RingCorrupt, RingGeometry, create_segment, drain, make_eventfd, wake
from .streams.wire import WorkerCommand, WPoisoned, WReady, WReply, WRun, WShutdown, event_decoder

RING_GEOMETRY = RingGeometry(slots=1024, slot_size=512)
_RING_PASS = 64

log = structlog.get_logger("kaas.workers")


class WorkerHandle:
    """One device worker. ``call()`` sends a command and awaits its reply."""

    def __init__(self, device: str, *, host_modules: tuple[str, ...], compile_check: str, spin_us: int = 0,
                 on_exit: Callable[[WorkerHandle, int | None], None] | None = None, physical: str = "",
                 tenant: str = "", hub: Any = None) -> None:
        self.device = device            # the broker's name for this worker ("cuda:0", or "cuda:0#tenant")
        self.physical = physical or device  # the device it opens
        self.tenant = tenant            # "" for shared workers; the owner of a dedicated one
        self.host_modules = host_modules
        self.compile_check = compile_check
        self.spin_us = spin_us
        self.on_exit = on_exit
        self.info: dict[str, Any] = {}
        self.pinned: set[int] = set()  # arenas this worker was asked to map (marked before sending)
        self.prepared: set[int] = set()  # prepared graphs sent to it (marked before sending)
        self.libraries: set[str] = set()  # libraries it loaded (a respawn loads only what a tenant holds)
        self.poisoned = False  # it said a sticky fault ended it: what it does not answer never ran
        self.on_poisoned: Callable[[WorkerHandle], None] | None = None
        self.on_event: Callable[[WorkerHandle, Any], None] | None = None  # the direct path's events
        self.proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        # seq -> what to do with its reply; called synchronously as the reply is decoded (no extra
        # event-loop trip on the request path), or with WorkerLost when the worker dies.
        self._pending: dict[int, Callable[[WReply | errors.KaasError], None]] = {}
        self._seq = 0
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._out = bytearray()
        self._out_fds: list[tuple[int, list[int]]] = []  # (offset in _out where fds ride, fds)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.alive = False
        # The hot path: runs go out on ring 0 of a shared segment, completions come back on
        # ring 1 (``broker.ring``); everything else, and every failure, uses the socket.
        self.hub = hub  # broker.session_rings.RingHub: polls our completions while the broker spins
        self._ring_mm: Any = None
        self._runs: Producer | None = None
        self._completions: Consumer | None = None
        self._wake_worker = -1   # written when the worker sleeps on its runs
        self._wake_broker = -1   # the worker writes it when we sleep on completions
        self._sock_seq = 0       # the last command sent on the socket: a ring run must follow it

    async def start(self, timeout: float = 120.0) -> dict[str, Any]:
        loop = self._loop = asyncio.get_running_loop()
        geom = RING_GEOMETRY
        made: list[Any] = []  # what exists so far, closed again if the next step fails (out of fds)
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            made += [ours, theirs]
            seg, self._ring_mm = create_segment(geom)
            made.append(seg)
            self._wake_worker = make_eventfd()
            made.append(self._wake_worker)
            self._wake_broker = make_eventfd()
        except BaseException:
            for x in made:
                with contextlib.suppress(OSError):
                    if isinstance(x, socket.socket):
                        x.close()
                    else:
                        os.close(x)
            if self._ring_mm is not None:
                self._ring_mm.close()
                self._ring_mm = None
            self._wake_worker = self._wake_broker = -1  # closed above: _close_rings must not again
            raise
        self._runs = Producer(self._ring_mm, geom, 0)
        self._completions = Consumer(self._ring_mm, geom, 1)
        try:
            cmd = [sys.executable, "-m", "broker.streams.worker", "--fd", str(theirs.fileno()),
                   "--device", self.physical, "--host-modules", ",".join(self.host_modules),
                   "--compile-check", self.compile_check, "--spin-us", str(self.spin_us),
                   "--ring-fd", str(seg), "--ring-slots", str(geom.slots), "--ring-slot-size", str(geom.slot_size),
                   "--wake-fd", str(self._wake_worker), "--notify-fd", str(self._wake_broker)]
            self.proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno(), seg, self._wake_worker, self._wake_broker],
                                         stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            self._close_rings()
            raise
        finally:
            theirs.close()
            os.close(seg)
        ours.setblocking(False)
        self._sock = ours
        self._ready = loop.create_future()
        self.alive = True
        loop.add_reader(ours.fileno(), self._on_readable)
        loop.add_reader(self._wake_broker, self._on_ring_wake)
        self._completions.prepare_sleep()
        if self.hub is not None:
            self.hub.members.add(self)
        try:
            self.info = await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except (Exception, asyncio.CancelledError):
            self.kill()
            raise
        log.info("worker_ready", device=self.device, pid=self.proc.pid, name=self.info.get("name"))
        return self.info

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def send(self, cmd: WorkerCommand, fd: int | list[int] | None = None) -> asyncio.Future[WReply]:
        """Queue ``cmd`` (and ``fd``, or several, duplicated) and return the future of its reply."""
        assert self._loop is not None
        fut: asyncio.Future[WReply] = self._loop.create_future()

        def settle(r: WReply | errors.KaasError) -> None:
            if not fut.done():
                if isinstance(r, errors.KaasError):
                    fut.set_exception(r)
                else:
                    fut.set_result(r)

        self.send_cb(cmd, settle, fd)
        return fut

    def send_cb(self, cmd: WorkerCommand, on_reply: Callable[[WReply | errors.KaasError], None],
                fd: int | list[int] | None = None) -> None:
        """Queue ``cmd``; ``on_reply`` gets its WReply (or WorkerLost) as soon as it is read."""
        assert self._loop is not None
        if not self.alive or self._sock is None:
            self._loop.call_soon(on_reply, errors.WorkerLost(f"worker {self.device} is not running"))
            return
        self._pending[cmd.seq] = on_reply
        self._sock_seq = cmd.seq
        frame = encode(cmd)
        if fd is not None:
            self._out_fds.append((len(self._out), [os.dup(f) for f in ([fd] if isinstance(fd, int) else fd)]))
        self._out += frame
        self._flush()

    def send_run(self, cmd: WRun, st: Any, on_reply: Callable[[WReply | errors.KaasError], None]) -> None:
        """Send a run of a prepared graph on the ring (``st``: its ``records.run_struct``); the socket
        carries it when the ring is full or the record too big."""
        runs = self._runs
        if runs is None or not self.alive or st.size > runs.max_payload:
            self.send_cb(cmd, on_reply)
            return
        rec = encode_run(st, cmd.seq, cmd.handle, cmd.slices, cmd.values, cmd.deadline, trace=cmd.trace,
                         barrier=self._sock_seq, priority=cmd.priority)
        self._pending[cmd.seq] = on_reply
        if not runs.push(rec):
            del self._pending[cmd.seq]
            self.send_cb(cmd, on_reply)
            return
        if runs.consumer_sleeping():
            wake(self._wake_worker)

    # -- completions on the ring (a RingHub member) -----------------------------------------
    def ready(self) -> bool:
        c = self._completions
        return c is not None and c.ready()

    def poll(self, limit: int) -> int:
        c = self._completions
        if c is None:
            return 0
        try:
            records = c.pop_many(limit)
        except RingCorrupt as exc:
            c.close()  # its views go before the mapping does
            self._completions = None
            self.kill(f"its completion ring is corrupt: {exc}")
            return 0
        pending = self._pending
        for rec in records:
            _, seq, _, _, t, trace = decode_done(rec)
            cb = pending.pop(seq, None)
            if cb is not None:
                cb(WReply(seq, timings=Timings(*t), trace=trace))
        return len(records)

    def sleep(self) -> bool:
        c = self._completions
        return True if c is None else c.prepare_sleep()

    def _on_ring_wake(self) -> None:
        drain(self._wake_broker)
        if self._completions is not None:
            self._completions.end_sleep()
        if self.hub is not None:
            self.hub.woken(self)
        else:
            while self.poll(_RING_PASS) or not self.sleep():
                pass

    async def call(self, cmd: WorkerCommand, fd: int | list[int] | None = None) -> WReply:
        reply = await self.send(cmd, fd)
        if reply.code:
            raise errors.from_wire(reply.code, reply.message, reply.detail)
        return reply

    def _flush(self) -> None:
        sock = self._sock
        assert sock is not None and self._loop is not None
        while self._out:
            try:
                if self._out_fds and self._out_fds[0][0] == 0:
                    _, fds = self._out_fds[0]
                    limit = self._out_fds[1][0] if len(self._out_fds) > 1 else len(self._out)
                    n = sock.sendmsg([memoryview(self._out)[:limit]],
                                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
                    self._out_fds.pop(0)
                    for f in fds:
                        os.close(f)
                else:
                    limit = self._out_fds[0][0] if self._out_fds else len(self._out)
                    n = sock.send(memoryview(self._out)[:limit])
            except BlockingIOError:
                self._loop.add_writer(sock.fileno(), self._on_writable)
                return
            except OSError as exc:
                self._lost(f"send failed: {exc}")
                return
            del self._out[:n]
            self._out_fds = [(off - n, fds) for off, fds in self._out_fds]
        self._loop.remove_writer(sock.fileno())

    def _on_writable(self) -> None:
        self._flush()

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(f"receive failed: {exc}")
            return
        if not data:
            self._lost("worker closed its channel")
            return
        self.poll(1 << 30)  # completions first: a fault's replies follow what finished before it
        self._events(data)

    def _events(self, data: bytes) -> None:
        for body in self._decoder.feed(data):
            ev = event_decoder.decode(body)
            if isinstance(ev, WReply):
                cb = self._pending.pop(ev.seq, None)
                if cb is not None:
                    cb(ev)
            elif isinstance(ev, WPoisoned):
                self.poisoned = True
                log.warning("worker_poisoned", device=self.device, reason=ev.reason)
                if self.on_poisoned is not None:
                    self.on_poisoned(self)
            elif isinstance(ev, WReady):
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(ev.info)
            elif self.on_event is not None:
                self.on_event(self, ev)

    def _lost(self, why: str) -> None:
        if not self.alive:
            return
        # What the worker published before it died is a result: take it before failing the rest.
        self.poll(1 << 30)
        self.alive = False
        self._drain()
        code = None
        if self.proc is not None:
            # Never wait on the event loop: a process leaving a CUDA context takes 100+ ms to die.
            # One that closed its channel is exiting; a moment usually gives its exit status.
            for _ in range(20):
                code = self.proc.poll()
                if code is not None:
                    break
                time.sleep(0.0005)
            if code is None:
                self.proc.kill()
                threading.Thread(target=self.proc.wait, name=f"reap-{self.device}", daemon=True).start()
        self._close_sock()
        err = errors.WorkerLost(f"device worker {self.device} exited ({why}, exit code {code})",
                                detail={"device": self.device, "exit_code": code})
        log.warning("worker_lost", device=self.device, why=why, exit_code=code)
        if self.on_exit is not None:  # first: the owner decides what the failed commands mean
            self.on_exit(self, code)
        pending, self._pending = self._pending, {}
        for cb in pending.values():
            cb(err)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(err)
            self._ready.exception()  # a start() cancelled at shutdown no longer waits for it

    def _drain(self) -> None:
        """Read what the worker wrote before it went (a killed worker's last frames are still in the
        socket): replies are results, and the direct path's hand-overs must reach the broker."""
        sock = self._sock
        if sock is None:
            return
        for _ in range(256):
            try:
                data = sock.recv(1 << 20)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            try:
                self._events(data)
            except Exception as exc:  # a torn last frame of a dying worker: what came before counts
                log.warning("worker_last_frames_unreadable", device=self.device, error=repr(exc))
                return

    def _close_rings(self) -> None:
        if self.hub is not None:
            self.hub.members.discard(self)
        if self._loop is not None and self._wake_broker >= 0:
            self._loop.remove_reader(self._wake_broker)
        for end in (self._runs, self._completions):
            if end is not None:
                end.close()
        self._runs = self._completions = None
        if self._ring_mm is not None:
            self._ring_mm.close()
            self._ring_mm = None
        for fd in (self._wake_worker, self._wake_broker):
            if fd >= 0:
                os.close(fd)
        self._wake_worker = self._wake_broker = -1

    def _close_sock(self) -> None:
        self._close_rings()
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._loop.remove_writer(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for _, fds in self._out_fds:
            for f in fds:
                os.close(f)
        self._out_fds.clear()
        self._out.clear()

    async def stop(self, timeout: float = 5.0) -> None:
        """Graceful: ask the worker to exit, then kill it if it does not."""
        if self.alive:
            try:
                await asyncio.wait_for(self.call(WShutdown(self.next_seq())), timeout)
                # It answered and is on its way out (closing its device): give it a moment.
                end = time.monotonic() + min(timeout, 2.0)
                while self.proc is not None and self.proc.poll() is None and time.monotonic() < end:
                    await asyncio.sleep(0.01)
            except (TimeoutError, errors.KaasError):
                pass
        self.kill()

    def kill(self, why: str = "stopped by the broker") -> None:
        """Immediate: kill the process and fail what is pending (``on_exit`` is told)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self._lost(why)
        self._close_sock()
