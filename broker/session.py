"""One tenant connection: the handshake, the session's handles, and one reply per request.

Ids a tenant sees are the session's own (arenas) or its tenant's (libraries, residents);
they are translated to the engine's global ids here and nowhere else.  A request id
may not be reused while its request is in flight.  Closing a session cancels its queued
graphs, lets running ones finish, and then unmaps its arenas.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
import os
from collections.abc import Callable
from typing import Any

import structlog

from . import errors
from .engine import ArenaRecord, Engine, GraphResult, TenantState
from .graph import ArenaRef, Limits, Resolved, resolve
from .protocol import (
    PROTOCOL_VERSION,
    Admin,
    ArenaRegistered,
    Done,
    Error,
    GraphDone,
    GraphSpec,
    Hello,
    LibraryRegistered,
    Ping,
    Pong,
    PutResident,
    RegisterArena,
    RegisterLibrary,
    ReleaseArena,
    ReleaseResident,
    ResidentRegistered,
    RunGraph,
    Status,
    StatusReply,
    TenantMessage,
    Welcome,
    decode_tenant,
    encode,
    error_frame,
)
from .tenants import Peer, Tenant, TenantDirectory

log = structlog.get_logger("kaas.session")
_RESOLVED_CACHE = 256  # validated graphs remembered per session
_session_ids = itertools.count(1)


class Session:
    """Protocol state of one connection. ``send`` writes a frame; ``close`` ends the connection."""

    def __init__(self, engine: Engine, directory: TenantDirectory, peer: Peer,
                 send: Callable[[bytes], None], close: Callable[[], None], *, limits: Limits = Limits()) -> None:
        self.engine = engine
        self.directory = directory
        self.peer = peer
        self.id = next(_session_ids)
        self._send = send
        self._close = close
        self.limits = limits
        self.tenant: Tenant | None = None
        self.state: TenantState | None = None
        self.arenas: dict[int, ArenaRecord] = {}
        self._arena_refs: dict[int, ArenaRef] = {}  # what validation reads, in step with ``arenas``
        self._gen = 0  # changes with ``_arena_refs``: part of the resolved-graph cache key
        self._resolved: dict[GraphSpec, tuple[tuple[int, int], Resolved]] = {}
        self._arena_ids = itertools.count(1)
        self.fds: list[int] = []       # received fds not yet claimed by a RegisterArena
        self.inflight: set[int] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._graphs: set[int] = set()  # requests whose graphs the engine holds
        self._graphs_idle = asyncio.Event()
        self._graphs_idle.set()
        self.closed = False
        self.recv_stamp = 0.0  # when the bytes being handled were read (for traced requests)
        self.log = log.bind(session=self.id, pid=peer.pid, uid=peer.uid)

    # -- input -----------------------------------------------------------------------------
    def frame_received(self, body: bytes) -> None:
        try:
            msg = decode_tenant(body)
        except errors.ProtocolError as exc:
            self.reply_error(int(exc.detail.pop("req", 0)), exc)
            if self.tenant is None:
                self.close()
            return
        if self.tenant is None:
            self._handshake(msg)
            return
        req = getattr(msg, "req", 0)
        if isinstance(msg, Hello):
            self.reply_error(0, errors.ProtocolError("handshake already done"))
            return
        if req <= 0:
            self.reply_error(0, errors.InvalidArgument(f"request id must be positive, got {req}"))
            if isinstance(msg, RegisterArena):
                self._drop_fd()
            return
        if req in self.inflight:
            self.reply_error(req, errors.InvalidArgument(f"request id {req} is already in flight"))
            if isinstance(msg, RegisterArena):
                self._drop_fd()
            return
        if len(self.inflight) >= self.engine.config.max_inflight:
            self.reply_error(req, errors.TooManyRequests(
                f"session has {len(self.inflight)} requests in flight (limit {self.engine.config.max_inflight})"))
            if isinstance(msg, RegisterArena):
                self._drop_fd()
            return
        self.inflight.add(req)
        try:
            self._dispatch(req, msg)
        except errors.KaasError as exc:
            self._finish_error(req, exc)
        except Exception as exc:
            self.log.exception("request_failed", req=req)
            self._finish_error(req, errors.InternalError(f"broker error: {type(exc).__name__}"))

    def fds_received(self, fds: list[int]) -> None:
        self.fds.extend(fds)
        while len(self.fds) > self.engine.config.max_fds_queued:
            os.close(self.fds.pop(0))

    def _drop_fd(self) -> None:
        if self.fds:
            os.close(self.fds.pop(0))

    def _handshake(self, msg: TenantMessage) -> None:
        if not isinstance(msg, Hello):
            self.reply_error(getattr(msg, "req", 0), errors.HandshakeRequired(
                f"the first message must be hello, got {type(msg).__name__}"))
            self.close()
            return
        if msg.version != PROTOCOL_VERSION:
            self.reply_error(0, errors.VersionMismatch(
                f"protocol version {msg.version} is not supported (broker speaks {PROTOCOL_VERSION})",
                detail={"supported": [PROTOCOL_VERSION]}))
            self.close()
            return
        try:
            tenant = self.directory.resolve(self.peer)
        except errors.KaasError as exc:
            self.reply_error(0, exc)
            self.close()
            return
        self.tenant = tenant
        self.state = self.engine.tenant_open(tenant.name, tenant.policy)
        self.log = self.log.bind(tenant=tenant.name)
        self.log.info("session_open", client=msg.client)
        self._send(encode(Welcome(PROTOCOL_VERSION, self.id, tenant.name, self.engine.config.max_frame,
                                  tuple(self.engine.devices), round(self.engine.client_spin * 1e6))))

    def _dispatch(self, req: int, msg: TenantMessage) -> None:
        if isinstance(msg, RunGraph):
            self._run(req, msg)
        elif isinstance(msg, RegisterArena):
            if not self.fds:
                raise errors.ProtocolError("register-arena frame arrived without a file descriptor")
            fd = self.fds.pop(0)
            if len(self.arenas) >= self.engine.config.max_arenas:
                os.close(fd)
                raise errors.TooManyRequests(f"session already holds {len(self.arenas)} arenas "
                                             f"(limit {self.engine.config.max_arenas})")
            self._spawn(req, self._register_arena(req, fd, msg.size))
        elif isinstance(msg, ReleaseArena):
            rec = self._arena(msg.arena)
            rec.closed = True  # graphs sent after this request may not use it
            self._set_arena_ref(msg.arena, ArenaRef(rec.gid, rec.size, closed=True))
            self._spawn(req, self._release_arena(req, msg.arena, rec))
        elif isinstance(msg, RegisterLibrary):
            self._spawn(req, self._register_library(req, msg))
        elif isinstance(msg, PutResident):
            self._spawn(req, self._put_resident(req, msg))
        elif isinstance(msg, ReleaseResident):
            assert self.state is not None
            res = self.state.residents.get(msg.resident)
            if res is None:
                raise errors.UnknownResident(f"resident {msg.resident[:16]!r} is not registered by this tenant")
            self.engine.release_resident(self.state, res)
            self._finish(req, Done(req))
        elif isinstance(msg, Ping):
            self._finish(req, Pong(req))
        elif isinstance(msg, Status):
            self._finish(req, StatusReply(req, self.status()))
        elif isinstance(msg, Admin):
            if not self.directory.is_admin(self.peer):
                raise errors.PermissionDenied("admin commands are for root and the broker's admin group")
            self._spawn(req, self._admin(req, msg))
        else:  # pragma: no cover - decode_tenant admits only the types above
            raise errors.UnknownMessage(f"unexpected message {type(msg).__name__}")

    def _arena(self, local: int) -> ArenaRecord:
        rec = self.arenas.get(local)
        if rec is None:
            raise errors.UnknownArena(f"arena {local} is not registered in this session", detail={"arena": local})
        if rec.closed:
            raise errors.ArenaClosed(f"arena {local} is closed", detail={"arena": local})
        return rec

    # -- requests ----------------------------------------------------------------------------
    def _set_arena_ref(self, local: int, ref: ArenaRef | None) -> None:
        if ref is None:
            self._arena_refs.pop(local, None)
        else:
            self._arena_refs[local] = ref
        self._gen += 1

    def _run(self, req: int, msg: RunGraph) -> None:
        assert self.state is not None and self.tenant is not None
        # A tenant resubmitting a graph it already sent skips validation while nothing it
        # depends on (the session's arenas, the tenant's libraries and residents) has changed.
        gens = (self._gen, self.state.gen)
        hit = self._resolved.get(msg.graph)
        if hit is not None and hit[0] == gens:
            resolved = hit[1]
        else:
            resolved = resolve(msg.graph, arenas=self._arena_refs, residents=self.state.resident_refs,
                               libraries=self.state.library_sigs, limits=self.limits)
            if len(self._resolved) >= _RESOLVED_CACHE:
                self._resolved.clear()
            self._resolved[msg.graph] = (gens, resolved)
        self.engine.check_quarantine(self.tenant.name, resolved)
        if not math.isfinite(msg.timeout) or msg.timeout < 0:
            raise errors.InvalidArgument(f"timeout must be a finite number of seconds >= 0 (0: none), got {msg.timeout}")
        self.engine.submit(tenant=self.tenant.name, session=self.id, resolved=resolved, timeout=msg.timeout,
                           on_done=functools.partial(self._graph_done, req),
                           trace_from=self.recv_stamp if msg.trace else 0.0)
        self._graphs.add(req)
        self._graphs_idle.clear()

    def _graph_done(self, req: int, outcome: GraphResult | errors.KaasError) -> None:
        self._graphs.discard(req)
        if not self._graphs:
            self._graphs_idle.set()
        if isinstance(outcome, errors.KaasError):
            self._finish_error(req, outcome)
        else:
            self._finish(req, GraphDone(req, outcome.device, outcome.timings, outcome.trace))

    async def _register_arena(self, req: int, fd: int, size: int) -> None:
        assert self.tenant is not None
        rec = await self.engine.register_arena(self.id, self.peer.uid, fd, size, self.state)
        if self.closed:
            await self.engine.release_arena(rec)
            return
        local = next(self._arena_ids)
        self.arenas[local] = rec
        self._set_arena_ref(local, ArenaRef(rec.gid, rec.size))
        self._finish(req, ArenaRegistered(req, local))

    async def _release_arena(self, req: int, local: int, rec: ArenaRecord) -> None:
        await self.engine.release_arena(rec)
        self.arenas.pop(local, None)
        self._set_arena_ref(local, None)
        self._finish(req, Done(req))

    async def _register_library(self, req: int, msg: RegisterLibrary) -> None:
        assert self.state is not None
        digest, cached, clog = await self.engine.register_library(self.state, msg.format, msg.data, msg.kernels,
                                                                  msg.options)
        self._finish(req, LibraryRegistered(req, digest, cached, clog))

    async def _put_resident(self, req: int, msg: PutResident) -> None:
        assert self.state is not None
        rec = self._arena(msg.arena)
        if len(msg.digest) != 32:
            raise errors.InvalidArgument("resident digest must be 32 bytes (blake2b-256)")
        if msg.nbytes <= 0 or msg.offset < 0 or msg.offset + msg.nbytes > rec.size:
            raise errors.OutOfBounds(f"resident bytes [{msg.offset}, {msg.offset + msg.nbytes}) lie outside "
                                     f"arena {msg.arena} of {rec.size} bytes")
        res, cached = await self.engine.put_resident(self.state, rec, msg.offset, msg.nbytes, msg.digest)
        self._finish(req, ResidentRegistered(req, res.digest, cached))

    async def _admin(self, req: int, msg: Admin) -> None:
        from . import admin

        self.log.info("admin_command", command=msg.command)
        result = await admin.run(self.engine, msg.command, dict(msg.args))
        self._finish(req, StatusReply(req, {"result": result}))

    def _spawn(self, req: int, coro: Any) -> None:
        async def runner() -> None:
            try:
                await coro
            except errors.KaasError as exc:
                self._finish_error(req, exc)
            except asyncio.CancelledError:
                self._finish_error(req, errors.SessionClosed("session closed"))
                raise
            except Exception as exc:
                self.log.exception("request_failed", req=req)
                self._finish_error(req, errors.InternalError(f"broker error: {type(exc).__name__}: {exc}"))

        task = asyncio.get_running_loop().create_task(runner())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- output ------------------------------------------------------------------------------
    def _finish(self, req: int, msg: Any) -> None:
        self.inflight.discard(req)
        if not self.closed:
            self._send(encode(msg))

    def _finish_error(self, req: int, exc: errors.KaasError) -> None:
        self.inflight.discard(req)
        self.reply_error(req, exc)

    def reply_error(self, req: int, exc: errors.KaasError) -> None:
        if not self.closed:
            self.log.info("request_refused", req=req, code=exc.code)
            self.engine.metrics.tenant(self.tenant.name if self.tenant else "(handshake)").error(exc.code)
            self._send(error_frame(req, exc))

    def status(self) -> dict[str, Any]:
        return {"session": self.id, "tenant": self.tenant.name if self.tenant else None,
                "devices": self.engine.device_info(), "queued": self.engine.queued,
                "arenas": len(self.arenas), "inflight": len(self.inflight), "stats": dict(self.engine.stats)}

    # -- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop reading and writing; resources go in ``connection_lost``."""
        self._close()

    async def connection_lost(self) -> None:
        """Release everything the session held; safe against cancellation."""
        if self.closed:
            return
        self.closed = True
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        dropped = self.engine.cancel_session(self.id)
        # Requests already accepted run to their end (their replies go nowhere); then arenas go.
        pending: list[asyncio.Future[Any]] = [t for t in self._tasks if not t.done()]
        if self._graphs:
            pending.append(asyncio.ensure_future(self._graphs_idle.wait()))
        try:
            if pending:
                await asyncio.shield(asyncio.wait(pending))
            await asyncio.shield(asyncio.gather(*(self.engine.release_arena(r) for r in self.arenas.values()),
                                                return_exceptions=True))
        finally:
            self.arenas.clear()
            if self.state is not None:
                self.engine.tenant_close(self.state)
                self.state = None
        self.log.info("session_closed", dropped=dropped)

    def __repr__(self) -> str:
        return f"<Session {self.id} tenant={self.tenant.name if self.tenant else None}>"


__all__ = ["Session", "Error"]
