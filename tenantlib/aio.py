"""The asyncio client: many requests in flight, one future per request id.

    async with await tenantlib.connect_async() as client:
        result = await client.run(graph)
"""

from __future__ import annotations

import array
import asyncio
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from broker.protocol import (
    BrokerMessage,
    Error,
    FrameDecoder,
    Hello,
    Ping,
    Prefetch,
    ReleaseResident,
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


class AsyncClient(ClientCore):
    def __init__(self, sock: socket.socket, welcome: Welcome, decoder: FrameDecoder,
                 loop: asyncio.AbstractEventLoop, timeout: float | None) -> None:
        super().__init__(welcome)
        self._loop = loop
        self._waiters: dict[int, asyncio.Future[BrokerMessage]] = {}
        self.timeout = timeout
        self._loss: errors.KaasError | None = None  # with reconnect: the lost session's error, until back
        self._reviving: asyncio.Lock | None = None
        self._attach(sock, decoder)

    def _attach(self, sock: socket.socket, decoder: FrameDecoder) -> None:
        self._sock = sock
        self._decoder = decoder
        self._out = bytearray()
        self._drained: asyncio.Event = asyncio.Event()
        self._drained.set()
        self._loop.add_reader(sock.fileno(), self._on_readable)

    # -- transport ---------------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        if not data:
            self._lost(ConnectionResetError("broker closed the connection"))
            return
        for body in self._decoder.feed(data):
            msg = decode_broker(body)
            req = getattr(msg, "req", 0)
            fut = self._waiters.pop(req, None)
            if req in self._ignored:
                self._ignored.discard(req)
            elif fut is not None and not fut.done():
                fut.set_result(msg)
            elif req == 0 and isinstance(msg, BrokerMessage.__args__):  # type: ignore[attr-defined]
                self._lost(RuntimeError(getattr(msg, "message", "broker error")))

    def _lost(self, exc: BaseException) -> None:
        if self.closed or self._loss is not None:
            return
        self._teardown()
        if self.reconnect:  # the next call connects again; what was in flight may or may not have run
            err: errors.KaasError = errors.BrokerUnavailable(
                f"the connection to the broker was lost ({exc}); a request in flight may or may not have run "
                "(its outputs are not to be trusted); the client connects again on its next call",
                detail={"retryable": True})
            self._loss, self._old_reqs = err, self._req
        else:
            self.closed = True
            err = errors.SessionClosed(f"connection to the broker was lost: {exc}")
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(err)
        self._waiters.clear()

    def _teardown(self) -> None:
        try:
            self._loop.remove_reader(self._sock.fileno())
            self._loop.remove_writer(self._sock.fileno())
        except (ValueError, OSError):
            pass
        self._sock.close()
        self._drained.set()

    def _on_writable(self) -> None:
        try:
            n = self._sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        del self._out[:n]
        if not self._out:
            self._loop.remove_writer(self._sock.fileno())
            self._drained.set()

    async def _send(self, msg: Any, fd: int | None = None) -> asyncio.Future[BrokerMessage]:
        self._check_open()
        if self._loss is not None:
            raise self._loss
        fut: asyncio.Future[BrokerMessage] = self._loop.create_future()
        self._waiters[msg.req] = fut
        frame = encode(msg)
        if fd is not None:
            await self._drained.wait()  # the fd must ride on this frame's first byte
            while True:
                try:
                    n = self._sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                      array.array("i", [fd]).tobytes())])
                    break
                except (BlockingIOError, InterruptedError):
                    w: asyncio.Future[None] = self._loop.create_future()
                    self._loop.add_writer(self._sock.fileno(), w.set_result, None)
                    try:
                        await w
                    finally:
                        self._loop.remove_writer(self._sock.fileno())
            frame = frame[n:]
        if frame:
            if not self._out:
                try:
                    n = self._sock.send(frame)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError as exc:
                    self._lost(exc)
                    return fut
                frame = frame[n:]
            if frame:
                self._out += frame
                if self._drained.is_set():
                    self._drained.clear()
                    self._loop.add_writer(self._sock.fileno(), self._on_writable)
        return fut

    async def _revive(self) -> None:
        """After the broker went away (with ``reconnect``): connect again with back-off, for up to the
        client's timeout, and register this client's arenas, libraries and residents again."""
        self._check_open()
        if self._loss is None or not self.reconnect:
            return
        if self._reviving is None:
            self._reviving = asyncio.Lock()
        async with self._reviving:
            if self._loss is None:
                return
            deadline = time.monotonic() + (self.timeout or 60.0)
            pause = 0.05
            while True:
                try:
                    sock, welcome, decoder = await _handshake(self._loop, self._path, self._hello, self.timeout)
                    break
                except (errors.BrokerUnavailable, OSError):
                    if time.monotonic() + pause > deadline:
                        raise self._loss from None
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 1.0)
            self.new_session(welcome)
            self._attach(sock, decoder)
            self._loss = None
            await self._restore()

    async def _restore(self) -> None:
        """Register again what the lost session held; what cannot be is dropped (its use says so)."""
        for arena in list(self._arenas):
            fd = self._arena_fds.get(id(arena))
            if fd is None or arena.closed:
                continue
            reply = await self._request(self.register_arena_msg(arena.size), fd)
            if isinstance(reply, Error):
                arena.closed = True
                close_fd(self._arena_fds.pop(id(arena)))
                continue
            arena.id = self.arena_id(reply)
        self._arena_gen += 1
        for digest, msg in self.libraries_again():
            if isinstance(await self._request(msg), Error):
                del self._library_msgs[digest]  # its graphs get unknown_library
        for key, put in self.residents_again():
            if put is None or isinstance(await self._request(put), Error):
                del self._resident_arrays[key]  # its graphs get unknown_resident

    async def _request(self, msg: Any, fd: int | None = None, limit: float | None = None) -> BrokerMessage:
        fut = await self._send(msg, fd)
        limit = self.timeout if limit is None else limit
        try:
            return await asyncio.wait_for(fut, limit)
        except TimeoutError:
            self._waiters.pop(msg.req, None)
            raise errors.RequestTimeout(f"no reply to request {msg.req} within {limit:.3g} s") from None

    # -- API (mirrors tenantlib.Client) ----------------------------------------------------------
    async def arena(self, size: int) -> Arena:
        await self._revive()
        fd, mm = create_segment(size)
        keep = False
        try:
            reply = await self._request(self.register_arena_msg(size), fd)
            arena = Arena(self.arena_id(reply), size, mm, self._release_arena)
            if self.reconnect:  # to hand the same memory to a restarted broker
                self._arena_fds[id(arena)] = fd
                keep = True
        except BaseException:
            mm.close()
            raise
        finally:
            if not keep:
                close_fd(fd)
        self._arenas.append(arena)
        return arena

    async def array(self, shape: int | tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        dt = np.dtype(dtype)
        shape_t = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = max(1, int(np.prod(shape_t, dtype=np.int64)) * dt.itemsize)
        return (await self.arena(nbytes)).array(shape_t, dt)

    def _release_arena(self, arena: Arena) -> None:
        fd = self._arena_fds.pop(id(arena), None)
        if fd is not None:
            close_fd(fd)
        if not self.closed and self._loss is None:
            msg = self.release_arena_msg(arena)
            task = self._loop.create_task(self._send(msg))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a loss meanwhile: nothing to do

    async def release_arena(self, arena: Arena) -> None:
        """Release ``arena`` and wait until the broker has unmapped it."""
        await self._revive()
        arena.closed = True
        fd = self._arena_fds.pop(id(arena), None)
        if fd is not None:
            close_fd(fd)
        raise_if_error(await self._request(self.release_arena_msg(arena)))

    async def library(self, code: str | bytes, *, kernels: KernelsArg = None, format: str | None = None,
                      name: str = "", options: Sequence[str] = (), access: AccessArg = None,
                      hosts: Mapping[str, str] | None = None) -> Library:
        """See ``Client.library``."""
        await self._revive()
        msg = await asyncio.to_thread(self.library_msg, code, kernels, format, name, options, access, hosts)
        lib = self.library_result(msg, await self._request(msg))
        self.remember_library(lib, msg)
        return lib

    async def resident(self, arr: np.ndarray) -> Resident:
        await self._revive()
        msg = self.resident_msg(arr)
        res = self.resident_result(arr, await self._request(msg))
        self.remember_resident(res, arr, msg)
        return res

    async def release_resident(self, res: Resident) -> None:
        await self._revive()
        self._resident_arrays.pop(res.digest, None)
        raise_if_error(await self._request(ReleaseResident(self.next_req(), res.digest)))
        self.forget_prepared()

    async def prefetch(self, res: Resident, device: str = "") -> str:
        """See ``Client.prefetch``."""
        await self._revive()
        return self.prefetched(await self._request(Prefetch(self.next_req(), res.digest, device)))

    def graph(self) -> Graph:
        return Graph()

    async def prepare(self, graph: Graph) -> int:
        """Validate ``graph`` with the broker now (``run`` does it on first use); returns its handle."""
        await self._revive()
        handle = self.prepared_handle(graph)
        if handle is None:
            version = graph.version
            handle = self.prepared(graph, version, await self._request(self.prepare_msg(graph)))
        return handle

    async def run(self, graph: Graph, *, timeout: float | None = None, trace: bool = False) -> RunResult:
        handle = await self.prepare(graph)
        for rel in self.release_msgs():
            await self._send(rel)
        msg = self.run_prepared_msg(graph, handle, timeout, trace)
        t0 = time.perf_counter()
        reply = await self._request(msg, limit=self.wait_limit(timeout, self.timeout))
        return self.run_result(reply, t0, time.perf_counter())

    async def ping(self) -> float:
        await self._revive()
        t0 = time.perf_counter()
        raise_if_error(await self._request(Ping(self.next_req())))
        return time.perf_counter() - t0

    async def status(self) -> dict[str, Any]:
        await self._revive()
        reply = await self._request(Status(self.next_req()))
        raise_if_error(reply)
        assert isinstance(reply, StatusReply)
        return reply.info

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in self._arena_fds.values():
            close_fd(fd)
        self._arena_fds.clear()
        for a in self._arenas:
            a.closed = True
        self._arenas.clear()
        self._teardown()
        err = errors.SessionClosed("client closed")
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(err)
        self._waiters.clear()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def connect_async(path: str | None = None, *, client: str = "tenantlib-aio",
                        timeout: float | None = 60.0, token: str | None = None,
                        reconnect: bool = False) -> AsyncClient:
    """The asyncio twin of ``tenantlib.connect`` (``token`` and ``reconnect``: as there)."""
    loop = asyncio.get_running_loop()
    path = default_path(path)
    hello = ClientCore.hello(client, token)
    sock, msg, decoder = await _handshake(loop, path, hello, timeout)
    c = AsyncClient(sock, msg, decoder, loop, timeout)
    c.reconnect, c._path, c._hello = reconnect, path, hello
    return c


async def _handshake(loop: asyncio.AbstractEventLoop, path: str, hello: Hello,
                     timeout: float | None) -> tuple[socket.socket, Welcome, FrameDecoder]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, path), timeout)
    except (TimeoutError, OSError) as exc:
        sock.close()
        raise errors.BrokerUnavailable(f"cannot connect to the kaas broker at {path}: {exc}") from None
    decoder = FrameDecoder()
    try:
        await loop.sock_sendall(sock, encode(hello))
        bodies: list[bytes] = []
        while not bodies:
            data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), timeout)
            if not data:
                raise closed_during_handshake(path)
            bodies = decoder.feed(data)
        msg = read_welcome(bodies, decoder)
    except BaseException:
        sock.close()
        raise
    return sock, msg, decoder
