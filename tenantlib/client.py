"""The synchronous client. ``tenantlib.connect()`` returns one.

Requests may be pipelined: ``submit()`` sends and returns a handle, ``result()`` waits.
A client is safe to share between threads (one lock guards the socket).
"""

from __future__ import annotations

import array
import os
import select
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from broker.protocol import (
    Admin,
    BrokerMessage,
    Error,
    FrameDecoder,
    Hello,
    OpenRings,
    Ping,
    Prefetch,
    ReleaseResident,
    RingsOpened,
    Status,
    StatusReply,
    Welcome,
    decode_broker,
    encode,
)

from . import errors
from ._core import (
    ClientCore,
    RunResult,
    closed_during_handshake,
    default_path,
    raise_if_error,
    read_welcome,
)
from .arena import Arena, close_fd, create_segment
from .graph import Graph, Library, Resident
from .kernel_specs import AccessArg, KernelsArg
from .rings import ClientRings

_RING = b"\0ring"  # what _recv returns when completions wait on the ring (never socket bytes)
_SOCKET_EVERY = 25e-6  # while spinning on the rings, how often the socket is looked at


class PendingRun:
    """A submitted graph. ``result()`` waits for it (pumping the socket)."""

    def __init__(self, client: Client, req: int, sent: float, limit: float | None) -> None:
        self._client = client
        self.req = req
        self._sent = sent
        self._limit = limit
        self._result: RunResult | None = None
        self._reply: BrokerMessage | None = None  # taken by done(), turned into a result by result()
        self._error: errors.KaasError | None = None  # the run's typed error, raised again on every result()
        self._received = 0.0

    def done(self, timeout: float = 0.0) -> bool:
        """Whether the reply is in, waiting up to ``timeout`` seconds for it (0: look and return).

        Open-loop senders use it to collect what finished without blocking on the oldest run;
        ``result()`` then returns at once (or raises the run's typed error).  Its round trip counts
        until the ``done()`` that saw the reply.  Not for use from several threads at once.
        """
        if self._result is None and self._reply is None and self._error is None:
            self._reply = self._client._take(self.req, time.monotonic() + max(timeout, 0.0), spin=timeout > 0)
            self._received = time.perf_counter()
        return self._result is not None or self._reply is not None or self._error is not None

    def result(self) -> RunResult:
        if self._error is not None:
            raise self._error
        if self._result is None:
            if self._reply is not None:
                reply, received, self._reply = self._reply, self._received, None
            else:
                reply = self._client._wait(self.req, self._limit)  # a RequestTimeout here is not the run's
                received = time.perf_counter()
            try:
                self._result = ClientCore.run_result(reply, self._sent, received)
            except errors.KaasError as exc:
                self._error = exc
                raise
        return self._result


class Client(ClientCore):
    """A session with the broker. Use as a context manager, or call ``close()``."""

    def __init__(self, sock: socket.socket, welcome: Welcome, decoder: FrameDecoder, timeout: float | None,
                 spin_us: int | None = None) -> None:
        super().__init__(welcome)
        sock.setblocking(False)  # waits go through poll(), after an optional spin
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._decoder = decoder
        self._replies: dict[int, BrokerMessage] = {}
        self._session_error: errors.KaasError | None = None
        self._lock = threading.RLock()
        self.timeout = timeout
        env = os.environ.get("KAAS_SPIN_US")
        us = spin_us if spin_us is not None else int(env) if env else welcome.spin_us
        self.spin = max(0, us) / 1e6  # seconds to busy-poll for a reply before sleeping
        # Unless the caller chose the spin, the broker's advice in the ring header can shorten it.
        self._spin_chosen = spin_us is not None or bool(env)
        self._rings: ClientRings | None = None
        self._want_rings = False
        self._lost: errors.KaasError | None = None  # the broker went away; the next call reconnects
        self._loss: errors.KaasError | None = None  # the last such loss: the answer for its old requests

    # -- transport ---------------------------------------------------------------------------
    def _send(self, msg: Any, fd: int | None = None) -> None:
        self._check_open()
        if self._lost is not None:
            raise self._lost
        view = memoryview(encode(msg))
        with self._lock:
            try:
                if fd is not None:
                    while True:
                        try:
                            n = self._sock.sendmsg([view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                             array.array("i", [fd]).tobytes())])
                            break
                        except BlockingIOError:
                            select.select([], [self._sock], [])
                    view = view[n:]
                while view:
                    try:
                        view = view[self._sock.send(view):]
                    except BlockingIOError:
                        select.select([], [self._sock], [])
            except OSError as exc:
                self._broken(exc)

    def _broken(self, exc: BaseException) -> None:
        if not self.reconnect:
            self.closed = True
            raise errors.SessionClosed(f"connection to the broker was lost: {exc}") from None
        self._lose(exc)
        assert self._lost is not None
        raise self._lost

    def _lose(self, exc: BaseException) -> None:
        """With reconnect: the session is gone; its requests still unanswered get a retryable error."""
        if self._lost is None:
            self._lost = self._loss = errors.BrokerUnavailable(
                f"the connection to the broker was lost ({exc}); a request in flight may or may not have run "
                "(its outputs are not to be trusted); the client connects again on its next call",
                detail={"retryable": True})
            self._old_reqs = self._req  # every request up to here belongs to the lost session
            self._drop_transport()

    def _drop_transport(self) -> None:
        if self._rings is not None:
            self._poll.unregister(self._rings.wake_tenant)
            self._rings.close()
            self._rings = None
        try:
            self._sock.close()
        except OSError:
            pass

    def _recv(self, deadline: float | None, spin: bool = True) -> bytes | None:
        """Bytes from the broker, or ``_RING`` when completions wait on the ring: spin for
        ``self.spin`` (unless not ``spin``), then sleep in poll() on the socket and the ring's
        eventfd; None at the deadline."""
        sock = self._sock
        rings = self._rings
        clock = time.perf_counter
        spin_s = self.spin if spin else 0.0
        if rings is not None and spin_s and not self._spin_chosen:
            spin_s = min(spin_s, rings.spin_hint())
        spin_end = clock() + spin_s
        every = _SOCKET_EVERY if rings is not None else 0.0
        next_sock = 0.0
        while True:
            # While spinning the ring is looked at on every pass, the socket (errors, replies to
            # registrations) every _SOCKET_EVERY: a recv that finds nothing costs a system call.
            if rings is not None and rings.ready():
                return _RING
            now = clock()
            if now >= next_sock:
                try:
                    return sock.recv(1 << 20)
                except BlockingIOError:
                    pass
                next_sock = now + every
            if now < spin_end:
                continue
            if rings is not None and not rings.prepare_sleep():
                return _RING
            try:
                if deadline is None:
                    self._poll.poll()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self._poll.poll(max(1, int(left * 1000)))
            finally:
                if rings is not None:
                    rings.end_sleep()
            next_sock = 0.0

    def _wait(self, req: int, limit: float | None) -> BrokerMessage:
        reply = self._take(req, None if limit is None else time.monotonic() + limit)
        if reply is None:
            raise errors.RequestTimeout(f"no reply to request {req} within {limit:.3g} s")
        return reply

    def _take(self, req: int, deadline: float | None, spin: bool = True) -> BrokerMessage | None:
        """The reply to ``req``, reading the socket and the ring until it comes; None at ``deadline``."""
        with self._lock:
            while req not in self._replies:
                if req <= self._old_reqs and self._loss is not None:  # sent to a session that is gone
                    raise self._loss
                if self._session_error is not None:  # the broker is closing us: no reply will come
                    if self.reconnect:
                        self._lose(ConnectionResetError(f"the broker closed the session: {self._session_error}"))
                        continue
                    raise self._session_error
                self._check_open()
                if self._lost is not None:
                    raise self._lost
                try:
                    data = self._recv(deadline, spin)
                except OSError as exc:
                    self._broken(exc)
                if data is None:
                    return None
                if data is _RING:
                    assert self._rings is not None
                    for done in self._rings.take():
                        self._replies[done.req] = done
                    continue
                if not data:
                    self._broken(ConnectionResetError("broker closed the connection"))
                self._absorb(data)
            return self._replies.pop(req)

    def _absorb(self, data: bytes) -> None:
        """File the frames in ``data``: replies by request id, a session-wide error aside."""
        for body in self._decoder.feed(data):
            msg = decode_broker(body)
            r = getattr(msg, "req", 0)
            if r == 0 and isinstance(msg, Error):
                # About the session, not a request (the broker is closing it). Replies that
                # came before it still count: raise it only for requests left unanswered.
                self._session_error = errors.from_wire(msg.code, msg.message, msg.detail)
                continue
            if r in self._ignored:
                self._ignored.discard(r)
                continue
            self._replies[r] = msg

    def _request(self, msg: Any, fd: int | None = None) -> BrokerMessage:
        with self._lock:
            self._send(msg, fd)
            return self._wait(msg.req, self.timeout)

    # -- arenas ------------------------------------------------------------------------------
    def arena(self, size: int) -> Arena:
        """A new shared-memory arena of ``size`` bytes, registered with the broker."""
        self._check_open()
        with self._lock:
            self._revive()
            fd, mm = create_segment(size)
            try:
                reply = self._request(self.register_arena_msg(size), fd)
                arena = Arena(self.arena_id(reply), size, mm, self._release_arena)
            except BaseException:
                mm.close()
                close_fd(fd)
                raise
            if self.reconnect:
                self._arena_fds[id(arena)] = fd  # to hand the same memory to a restarted broker
            else:
                close_fd(fd)
            self._arenas.append(arena)
        return arena

    def array(self, shape: int | tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        """A numpy array in a fresh arena of its own."""
        dt = np.dtype(dtype)
        shape_t = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = max(1, int(np.prod(shape_t, dtype=np.int64)) * dt.itemsize)
        return self.arena(nbytes).array(shape_t, dt)

    def _release_arena(self, arena: Arena) -> None:
        with self._lock:
            fd = self._arena_fds.pop(id(arena), None)
            if fd is not None:
                close_fd(fd)
            if not self.closed:
                if self._lost is not None:  # nothing to tell a broker that is gone; not registered again
                    self.release_arena_msg(arena)
                    return
                raise_if_error(self._request(self.release_arena_msg(arena)))

    # -- libraries and residents -------------------------------------------------------------
    def library(self, code: str | bytes, *, kernels: KernelsArg = None, format: str | None = None,
                name: str = "", options: Sequence[str] = (), access: AccessArg = None,
                hosts: Mapping[str, str] | None = None) -> Library:
        """Register CUDA C source (str), CUBIN, PTX or fatbin.

        Without ``kernels=``, CUDA C's signatures are read from the source by NVRTC, here
        (``tenantlib.kernel_specs``): ``access={"vadd": {"c": "out"}}`` narrows a read-write
        pointer, ``hosts={"vadd": "module:function"}`` names host implementations for the CPU
        device.  ``kernels=`` takes ``KernelSpec``s, or each kernel's C parameter list (for a
        binary).  The broker checks every signature against the binary (a CUBIN's parameter
        table; PTX and fatbin by the sizes a GPU's driver reports) and CUDA C's against its source.
        """
        msg = self.library_msg(code, kernels, format, name, options, access, hosts)
        with self._lock:
            self._revive()
            lib = self.library_result(msg, self._request(msg))
            self.remember_library(lib, msg)
        return lib

    def resident(self, arr: np.ndarray) -> Resident:
        """Make ``arr``'s current contents a device-resident buffer (cached by content)."""
        with self._lock:
            self._revive()
            msg = self.resident_msg(arr)
            res = self.resident_result(arr, self._request(msg))
            self.remember_resident(res, arr, msg)
        return res

    def release_resident(self, res: Resident) -> None:
        with self._lock:
            self._revive()
            self._resident_arrays.pop(res.digest, None)
            raise_if_error(self._request(ReleaseResident(self.next_req(), res.digest)))
        self.forget_prepared()  # graphs that named it must be checked again

    def prefetch(self, res: Resident, device: str = "") -> str:
        """Put ``res`` on ``device`` (default: the broker's choice) before a graph uses it; returns
        the device.  It is then resident like any other (evicted when room is needed)."""
        with self._lock:
            self._revive()
            return self.prefetched(self._request(Prefetch(self.next_req(), res.digest, device)))

    # -- graphs ------------------------------------------------------------------------------
    def graph(self) -> Graph:
        return Graph()

    def submit(self, graph: Graph, *, timeout: float | None = None, trace: bool = False) -> PendingRun:
        """Send ``graph`` without waiting; ``timeout`` bounds its run in the broker.

        ``trace=True`` asks every hop to stamp the request (``RunResult.hops``).
        """
        with self._lock:
            self._revive()
            handle = self.prepared_handle(graph)
            if handle is None:  # first run, or the graph changed: validate its structure once
                version = graph.version
                handle = self.prepared(graph, version, self._request(self.prepare_msg(graph)))
            for rel in self.release_msgs():
                self._send(rel)
            rings = self._rings
            if rings is not None:
                rec = self.run_record(graph, handle, timeout, trace, rings.max_payload)
                if rec is not None:
                    t0 = time.perf_counter()
                    if rings.send(rec[1]):
                        return PendingRun(self, rec[0], t0, self.wait_limit(timeout, self.timeout))
            msg = self.run_prepared_msg(graph, handle, timeout, trace)
            t0 = time.perf_counter()
            self._send(msg)
        return PendingRun(self, msg.req, t0, self.wait_limit(timeout, self.timeout))

    def prepare(self, graph: Graph) -> int:
        """Validate ``graph`` with the broker now (``run`` does it on first use); returns its handle."""
        with self._lock:
            self._revive()
            handle = self.prepared_handle(graph)
            if handle is None:
                handle = self.prepared(graph, graph.version, self._request(self.prepare_msg(graph)))
            return handle

    def run(self, graph: Graph, *, timeout: float | None = None, trace: bool = False) -> RunResult:
        """Run ``graph`` and wait: outputs are in their arrays when this returns."""
        return self.submit(graph, timeout=timeout, trace=trace).result()

    # -- misc --------------------------------------------------------------------------------
    def ping(self) -> float:
        with self._lock:
            self._revive()
            t0 = time.perf_counter()
            raise_if_error(self._request(Ping(self.next_req())))
            return time.perf_counter() - t0

    def status(self) -> dict[str, Any]:
        with self._lock:
            self._revive()
            reply = self._request(Status(self.next_req()))
        raise_if_error(reply)
        assert isinstance(reply, StatusReply)
        return reply.info

    def admin(self, command: str, **args: Any) -> Any:
        """An administrator's command (root or the broker's admin group); see ``kaasctl``."""
        with self._lock:
            self._revive()
            reply = self._request(Admin(self.next_req(), command, args))
        raise_if_error(reply)
        assert isinstance(reply, StatusReply)
        return reply.info["result"]

    def _open_rings(self) -> None:
        """Ask for the session's rings; a broker that has none leaves the client on frames."""
        msg = OpenRings(self.next_req())
        self._send(msg)
        fds = array.array("i")
        deadline = time.monotonic() + (self.timeout or 60.0)
        bodies: list[bytes] = []
        with self._lock:
            while not bodies:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._sock], [], [], left)[0]:
                    raise errors.RequestTimeout("no answer to the request for rings")
                try:
                    data, anc, _, _ = self._sock.recvmsg(1 << 16, socket.CMSG_SPACE(8 * fds.itemsize))
                except BlockingIOError:
                    continue
                if not data:
                    self._broken(ConnectionResetError("broker closed the connection"))
                for level, typ, cdata in anc:
                    if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                        fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
                bodies = self._decoder.feed(data)
            reply = decode_broker(bodies[0])
            for extra in bodies[1:]:
                m = decode_broker(extra)
                self._replies[getattr(m, "req", 0)] = m
        if isinstance(reply, Error):
            for fd in fds:
                os.close(fd)
            return
        if not isinstance(reply, RingsOpened) or reply.req != msg.req:
            for fd in fds:
                os.close(fd)
            raise errors.ProtocolError(f"expected the rings, got {type(reply).__name__}")
        self._rings = ClientRings(reply, list(fds), self.devices, self.tenant)
        self._poll.register(self._rings.wake_tenant, select.POLLIN)

    def close(self) -> None:
        """End the session; the broker releases every arena. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._rings is not None:
            self._poll.unregister(self._rings.wake_tenant)
            self._rings.close()
            self._rings = None
        for a in self._arenas:
            a.closed = True
        self._arenas.clear()
        for fd in self._arena_fds.values():
            close_fd(fd)
        self._arena_fds.clear()
        try:
            self._sock.close()
        except OSError:
            pass

    # -- reconnecting --------------------------------------------------------------------------
    def _revive(self) -> None:
        """After the broker went away (with ``reconnect``): connect again, with back-off, and
        register this client's arenas, libraries and residents on the new session."""
        self._check_open()
        if not self.reconnect:
            return
        if self._lost is None:  # a broker that stopped meanwhile: its goodbye waits on the socket
            try:
                data = self._sock.recv(1 << 20)
                if data:
                    self._absorb(data)
                if not data or isinstance(self._session_error, (errors.ShuttingDown, errors.SessionClosed)):
                    self._lose(ConnectionResetError("the broker closed the session"))
            except BlockingIOError:
                pass
            except OSError as exc:
                self._lose(exc)
        if self._lost is None:
            return
        deadline = time.monotonic() + (self.timeout or 60.0)
        pause = 0.05
        while True:
            try:
                sock, welcome, decoder, extra = _handshake(self._path, self._hello, self.timeout)
                break
            except (errors.BrokerUnavailable, OSError):
                if time.monotonic() + pause > deadline:
                    raise self._lost from None
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
        sock.setblocking(False)
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._decoder = decoder
        self._session_error = None
        self.new_session(welcome)
        self._lost = None
        for body in extra:
            m = decode_broker(body)
            self._replies[getattr(m, "req", 0)] = m
        self._restore()  # a connection lost meanwhile marks the client lost again: the next call retries

    def _restore(self) -> None:
        """Register again what the lost session held; what cannot be is dropped (its use says so)."""
        for arena in list(self._arenas):
            fd = self._arena_fds.get(id(arena))
            if fd is None or arena.closed:
                continue
            reply = self._request(self.register_arena_msg(arena.size), fd)
            if isinstance(reply, Error):  # refused by the new broker: its arrays say "closed" from now on
                self.release_arena_msg(arena)
                arena.closed = True
                close_fd(self._arena_fds.pop(id(arena)))
                continue
            arena.id = self.arena_id(reply)
        self._arena_gen += 1  # located bindings name the old ids
        for digest, msg in self.libraries_again():
            if isinstance(self._request(msg), Error):
                del self._library_msgs[digest]  # its graphs get unknown_library
        for key, put in self.residents_again():
            if put is None or isinstance(self._request(put), Error):
                del self._resident_arrays[key]  # its graphs get unknown_resident
        if self._want_rings:
            self._open_rings()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            self.close()


def _handshake(path: str, hello: Hello, timeout: float | None) -> tuple[socket.socket, Welcome, FrameDecoder,
                                                                      list[bytes]]:
    """Connect to ``path`` and say hello: the socket, the broker's welcome, and frames after it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise errors.BrokerUnavailable(f"cannot connect to the kaas broker at {path}: {exc.strerror or exc}") from None
    decoder = FrameDecoder()
    try:
        sock.sendall(encode(hello))
        bodies: list[bytes] = []
        while not bodies:
            data = sock.recv(1 << 16)
            if not data:
                raise closed_during_handshake(path)
            bodies = decoder.feed(data)
        msg = read_welcome(bodies, decoder)
    except BaseException:
        sock.close()
        raise
    return sock, msg, decoder, bodies[1:]


def connect(path: str | None = None, *, client: str = "tenantlib", timeout: float | None = 60.0,
            spin_us: int | None = None, rings: bool | None = None, reconnect: bool = False,
            token: str | None = None) -> Client:
    """Connect to the broker at ``path`` (default ``$KAAS_SOCKET``, else /run/kaas/broker.sock).

    ``timeout`` bounds each request's wait (None waits forever); graphs with their own
    ``timeout=`` wait that long plus a grace period for the broker's verdict.  ``spin_us``:
    how long to busy-poll for a reply before sleeping (default ``$KAAS_SPIN_US``, else what
    the broker suggests: non-zero only where it drives GPUs).  ``rings``: runs and completions
    travel through shared-memory rings (default, unless ``$KAAS_RINGS=0``), else as frames.

    ``reconnect=True``: when the broker goes away (a restart, an upgrade, a crash), each request
    in flight fails with ``BrokerUnavailable`` (``detail["retryable"]``: it may or may not have
    run, so the tenant decides whether to run it again), and the next call connects again with
    back-off (up to ``timeout``), registers this client's arenas, libraries and (unchanged)
    residents on the new session, and prepares graphs again as they run.  It keeps each arena's
    file descriptor open to do so.  Off by default: a tenant must be written to treat that error
    as "unknown outcome", which a plain ``SessionClosed`` never asked of it.

    ``token`` (default ``$KAAS_TOKEN``): the job's identity where many jobs share one uid (Ray
    workers); the broker's config maps its SHA-256 to a tenant (``kaasctl token``).
    """
    path = default_path(path)
    hello = ClientCore.hello(client, token)
    sock, msg, decoder, extra = _handshake(path, hello, timeout)
    c = Client(sock, msg, decoder, timeout, spin_us)
    c.reconnect, c._path, c._hello = reconnect, path, hello
    for body in extra:
        reply = decode_broker(body)
        c._replies[getattr(reply, "req", 0)] = reply
    if rings if rings is not None else os.environ.get("KAAS_RINGS", "1") != "0":
        c._want_rings = True
        try:
            c._open_rings()
        except BaseException:
            c.close()
            raise
    return c
