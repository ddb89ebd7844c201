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
import time
from collections.abc import Callable
from typing import Any

import structlog

from . import errors
from .engine import ArenaRecord, Engine, GraphResult, PreparedRecord, TenantState
from .graph import ArenaRef, Limits, bind, prepare, spec_bindings
from .protocol import (
    PROTOCOL_VERSION,
    Admin,
    ArenaRegistered,
    Done,
    Error,
    GraphDone,
    GraphPrepared,
    GraphSpec,
    Hello,
    LibraryRegistered,
    OpenRings,
    Ping,
    Pong,
    Prefetch,
    Prefetched,
    PrepareGraph,
    PutResident,
    RegisterArena,
    RegisterLibrary,
    ReleaseArena,
    ReleaseGraph,
    ReleaseResident,
    ResidentRegistered,
    RingsOpened,
    RunGraph,
    RunPrepared,
    Status,
    StatusReply,
    TenantMessage,
    Timings,
    Welcome,
    decode_tenant,
    encode,
    error_frame,
)
from .records import DEDICATED, TRACE, decode_run, decode_values, encode_done
from .ring import RingCorrupt
from .session_rings import SessionRings
from .tenants import Peer, Tenant, TenantDirectory

log = structlog.get_logger("kaas.session")
_IMPLICIT_CACHE = 256  # graphs sent whole (RunGraph) kept prepared per session
_session_ids = itertools.count(1)


class Session:
    """Protocol state of one connection. ``send`` writes a frame; ``close`` ends the connection."""

    def __init__(self, engine: Engine, directory: TenantDirectory, peer: Peer,
                 send: Callable[[bytes], None], close: Callable[[], None], *, limits: Limits = Limits(),
                 send_fds: Callable[[bytes, list[int]], None] | None = None) -> None:
        self.engine = engine
        self.directory = directory
        self.peer = peer
        self.id = next(_session_ids)
        self._send = send
        self._close = close
        self._send_fds = send_fds
        self.limits = limits
        self.tenant: Tenant | None = None
        self.state: TenantState | None = None
        self.arenas: dict[int, ArenaRecord] = {}
        self._arena_refs: dict[int, ArenaRef] = {}  # what validation reads, in step with ``arenas``
        self.prepared: dict[int, PreparedRecord] = {}  # the session's handles
        self._prepared_ids = itertools.count(1)
        # Graphs sent whole, prepared behind the tenant's back: (tenant gen, record) by spec.
        self._implicit: dict[GraphSpec, tuple[int, PreparedRecord]] = {}
        self._arena_ids = itertools.count(1)
        self.fds: list[int] = []       # received fds not yet claimed by a RegisterArena
        self.inflight: set[int] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._graphs: set[int] = set()  # requests whose graphs the engine holds
        self._graphs_idle = asyncio.Event()
        self._graphs_idle.set()
        self.rings: SessionRings | None = None
        self._releasing = 0  # releases waiting for the session's lease to end (none is granted meanwhile)
        self._device_index: dict[str, tuple[int, int]] = {}
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
        if not self._admit(req):
            if isinstance(msg, RegisterArena):
                self._drop_fd()
            return
        self._answering(req, self._dispatch, req, msg)

    def _answering(self, req: int, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)`` for request ``req``: whatever it raises becomes the request's one reply."""
        try:
            fn(*args)
        except errors.KaasError as exc:
            self._finish_error(req, exc)
        except Exception as exc:
            self.log.exception("request_failed", req=req)
            self._finish_error(req, errors.InternalError(f"broker error: {type(exc).__name__}"))

    def _admit(self, req: int) -> bool:
        """Take request id ``req`` in flight, or refuse it (a reply is sent) and return False."""
        if req <= 0:
            self.reply_error(0, errors.InvalidArgument(f"request id must be positive, got {req}"))
            return False
        if req in self.inflight:
            self.reply_error(req, errors.InvalidArgument(f"request id {req} is already in flight"))
            return False
        if len(self.inflight) >= self.engine.config.max_inflight:
            self.reply_error(req, errors.TooManyRequests(
                f"session has {len(self.inflight)} requests in flight (limit {self.engine.config.max_inflight})"))
            return False
        self.inflight.add(req)
        return True

    # -- the rings ---------------------------------------------------------------------------
    def _open_rings(self, req: int) -> None:
        if self.rings is not None:
            raise errors.InvalidArgument("this session's rings are open already")
        if self._send_fds is None:
            raise errors.InvalidArgument("this connection cannot carry file descriptors")
        rings = SessionRings(asyncio.get_running_loop(), self.engine.hub, self._ring_record, self._ring_corrupt)
        # Counted, and its spin advice written, before the tenant can read the header.
        self.rings = rings
        self.engine.lease_hosts[self.id] = self
        self.engine.advise_spin()
        rings.completions.set_spin_hint(self.engine.spin_hint)
        try:
            self.inflight.discard(req)
            self._send_fds(encode(RingsOpened(req, rings.geom.slots, rings.geom.slot_size, rings.geom.rings)),
                           rings.handover())
        except BaseException:
            self.rings = None
            self.engine.lease_hosts.pop(self.id, None)
            self.engine.advise_spin()
            rings.close()
            raise

    def _ring_record(self, rec: bytes, replay: str = "") -> None:
        """One run record from the tenant's ring: the same checks and reply as a RunPrepared frame.

        ``replay``: it comes back from a device worker on the direct path (``broker/leases.py``)."""
        self.recv_stamp = time.perf_counter()
        try:
            req, handle, flags, _, _, timeout, slices, nvalues, at = decode_run(rec)
        except errors.ProtocolError as exc:
            self.reply_error(int(exc.detail.pop("req", 0)), exc)
            return
        if not self._admit(req):
            return
        self.engine.stats["ring_runs"] += 1

        def run() -> None:
            prepared = self._held(handle)
            values = decode_values(rec, at, nvalues, prepared.vstruct)
            self._submit(req, prepared, slices, values, timeout, bool(flags & TRACE), ring=True, replay=replay)

        self._answering(req, run)

    # -- the direct path (broker/leases.py: this session as a LeaseHost) ---------------------------
    def lease_tables(self) -> tuple[str, tuple[tuple[int, ArenaRecord], ...],
                                    tuple[tuple[int, PreparedRecord], ...]] | None:
        """What a worker needs to take this session's runs: None if some graph must stay with the broker."""
        if self.tenant is None or self.closed or self._releasing or self.tenant.name in self.engine.dedicated:
            return None
        try:
            for rec in self.prepared.values():
                if rec.released or any(r.released for r in rec.residents):
                    return None
                self.engine.check_quarantine(self.tenant.name, rec.template)
        except errors.Quarantined:
            return None
        arenas = tuple((local, a) for local, a in self.arenas.items() if not a.closed)
        return self.tenant.name, arenas, tuple(self.prepared.items())

    def run_escalated(self, rec: bytes, replay: str) -> None:
        """A run the worker handed back (or took and could not finish): the broker's path runs it."""
        if not self.closed:  # (a closed session's runs have no one to answer)
            self._ring_record(rec, replay)

    def _direct_req(self, rec: bytes) -> tuple[int, int] | None:
        try:
            req, handle, *_ = decode_run(rec)
        except errors.KaasError:
            return None
        if not self._admit(req):
            return None
        return req, handle

    def deliver_direct(self, rec: bytes, device: str, timings: Timings) -> None:
        """A direct run succeeded but its completion did not reach ring 2: the broker posts it."""
        got = self._direct_req(rec)
        if got is not None:
            if self.tenant is not None:
                self.engine.direct_delivered(self.tenant.name, device, timings)
            self._graphs.add(got[0])
            self._graphs_idle.clear()
            self._ring_done(got[0], GraphResult(device, timings))

    def fail_direct(self, rec: bytes, err: errors.KaasError) -> None:
        """A direct run failed on the device (a fault, a deadline): the tenant hears why."""
        got = self._direct_req(rec)
        if got is None:
            return
        req, handle = got
        prepared = self.prepared.get(handle)
        if prepared is not None and self.tenant is not None:
            err = self.engine.direct_failed(self.tenant.name, prepared.template, err)
        self._finish_error(req, err)

    def rings_broken(self, reason: str) -> None:
        self._ring_corrupt(RingCorrupt(f"the session's run ring is corrupt: {reason}"))

    def _lease_then(self, req: int, fn: Callable[[], None]) -> None:
        """Do ``fn`` (a release) once this session's lease, if any, has ended."""
        if self.id not in self.engine.leases:
            fn()
            return

        async def later() -> None:
            self._releasing += 1  # no new lease until it is done
            try:
                await self.engine.end_lease(self.id)
                self._answering(req, fn)
            finally:
                self._releasing -= 1

        self._spawn(req, later())

    def _ring_corrupt(self, exc: errors.KaasError) -> None:
        self.log.warning("ring_corrupt", error=str(exc))
        self.reply_error(0, exc)
        self.close()

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
            if len(msg.token) > 1024:
                raise errors.InvalidArgument(f"a token of {len(msg.token)} characters is longer than 1024")
            tenant = self.directory.resolve(self.peer, msg.token)
        except errors.KaasError as exc:
            self.reply_error(0, exc)
            self.close()
            return
        self.tenant = tenant
        self.state = self.engine.tenant_open(tenant.name, tenant.policy)
        self.log = self.log.bind(tenant=tenant.name)
        self.log.info("session_open", client=msg.client)
        self._send(encode(Welcome(PROTOCOL_VERSION, self.id, tenant.name, self.engine.config.max_frame,
                                  tuple(self.engine.devices), round(self.engine.client_spin * 1e6),
                                  self.engine.device_archs())))

    def _dispatch(self, req: int, msg: TenantMessage) -> None:
        if isinstance(msg, RunPrepared):
            self._run_prepared(req, msg)
        elif isinstance(msg, RunGraph):
            self._run(req, msg)
        elif isinstance(msg, PrepareGraph):
            self._prepare(req, msg)
        elif isinstance(msg, OpenRings):
            self._open_rings(req)
        elif isinstance(msg, ReleaseGraph):
            held = self._held(msg.handle)
            self.engine.lease_released(self.id, msg.handle)  # (a worker holds off releasing it while it runs)
            self.engine.release_prepared(held)
            del self.prepared[msg.handle]
            self._finish(req, Done(req))
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
            held_res = res

            def release_resident() -> None:
                if self.state is not None and self.state.residents.get(msg.resident) is held_res:
                    self.engine.release_resident(self.state, held_res)
                self._finish(req, Done(req))

            self._lease_then(req, release_resident)
        elif isinstance(msg, Prefetch):
            assert self.state is not None and self.tenant is not None
            res = self.state.residents.get(msg.resident)
            if res is None:
                raise errors.UnknownResident(f"resident {msg.resident[:16]!r} is not registered by this tenant")
            self._finish(req, Prefetched(req, self.engine.prefetch(self.tenant.name, res, msg.device)))
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

    def _template(self, graph: GraphSpec) -> PreparedRecord:
        assert self.state is not None
        t = prepare(graph, residents=self.state.resident_refs, libraries=self.state.library_sigs, limits=self.limits)
        return self.engine.prepare(self.state, t)

    def _prepare(self, req: int, msg: PrepareGraph) -> None:
        limit = self.engine.config.max_prepared
        if len(self.prepared) >= limit:
            raise errors.TooManyRequests(f"session holds {len(self.prepared)} prepared graphs (limit {limit}); "
                                         "release some with release_graph", detail={"limit": limit})
        rec = self._template(msg.graph)
        handle = next(self._prepared_ids)
        self.prepared[handle] = rec
        self.engine.lease_prepared(self.id, handle, rec)  # before the tenant can run it
        t = rec.template
        self._finish(req, GraphPrepared(req, handle, 2 * len(t.arena_buffers), t.literal_kinds))

    def _held(self, handle: int) -> PreparedRecord:
        rec = self.prepared.get(handle)
        if rec is None:
            raise errors.UnknownGraph(f"graph {handle} is not prepared in this session", detail={"handle": handle})
        return rec

    def _run_prepared(self, req: int, msg: RunPrepared) -> None:
        self._submit(req, self._held(msg.handle), msg.slices, msg.values, msg.timeout, msg.trace)

    def _run(self, req: int, msg: RunGraph) -> None:
        assert self.state is not None
        # A graph sent whole is prepared once and then run by its bindings, while the tenant's
        # libraries and residents (what its structure was checked against) stay as they were.
        hit = self._implicit.get(msg.graph)
        if hit is not None and hit[0] == self.state.gen:
            rec = hit[1]
        else:
            rec = self._template(msg.graph)
            if hit is not None:
                self.engine.release_prepared(hit[1])
            if len(self._implicit) >= _IMPLICIT_CACHE:
                for _, old in self._implicit.values():
                    self.engine.release_prepared(old)
                self._implicit.clear()
            self._implicit[msg.graph] = (self.state.gen, rec)
        slices, values = spec_bindings(msg.graph)
        self._submit(req, rec, slices, values, msg.timeout, msg.trace)

    def _submit(self, req: int, rec: PreparedRecord, slices: tuple[int, ...], values: tuple[int | float, ...],
                timeout: float, trace: bool, ring: bool = False, replay: str = "") -> None:
        assert self.tenant is not None
        bound, vals, arenas = bind(rec.template, slices, values, self._arena_refs)
        self.engine.check_quarantine(self.tenant.name, rec.template)
        if not math.isfinite(timeout) or timeout < 0:
            raise errors.InvalidArgument(f"timeout must be a finite number of seconds >= 0 (0: none), got {timeout}")
        self.engine.submit(tenant=self.tenant.name, session=self.id, prepared=rec, slices=bound, values=vals,
                           arenas=arenas, timeout=timeout,
                           on_done=functools.partial(self._ring_done if ring else self._graph_done, req),
                           trace_from=self.recv_stamp if trace else 0.0, replay=replay)
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

    def _ring_done(self, req: int, outcome: GraphResult | errors.KaasError) -> None:
        """A ring run's reply: a completion record, or a frame when it failed or the ring is full."""
        rings = self.rings
        if rings is not None and not isinstance(outcome, errors.KaasError) and not self.closed:
            idx = self._device_index.get(outcome.device)
            if idx is None:
                physical, dedicated, _ = outcome.device.partition("#")
                idx = self._device_index[outcome.device] = (self.engine.devices.index(physical),
                                                            DEDICATED if dedicated else 0)
            t = outcome.timings
            if rings.post(encode_done(req, (t.queued, t.copy_in, t.kernels, t.copy_out, t.total), outcome.trace,
                                      device=idx[0], flags=idx[1])):
                self._graphs.discard(req)
                if not self._graphs:
                    self._graphs_idle.set()
                self.inflight.discard(req)
                return
        self._graph_done(req, outcome)

    async def _register_arena(self, req: int, fd: int, size: int) -> None:
        assert self.tenant is not None
        rec = await self.engine.register_arena(self.id, self.peer.uid, fd, size, self.state)
        if self.closed:
            await self.engine.release_arena(rec)
            return
        local = next(self._arena_ids)
        self.arenas[local] = rec
        self._set_arena_ref(local, ArenaRef(rec.gid, rec.size))
        self.engine.lease_arena(self.id, local, rec)  # a leased session's worker learns of it first
        self._finish(req, ArenaRegistered(req, local))

    async def _release_arena(self, req: int, local: int, rec: ArenaRecord) -> None:
        self._releasing += 1  # no new lease until it is done
        try:
            await self.engine.end_lease(self.id)  # the worker lets go of the session's runs first
            await self.engine.release_arena(rec)
        finally:
            self._releasing -= 1
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
        """This session's view of the broker: who it is, its devices (with the memory free on each),
        the queue, and this tenant's own residents with the devices holding them (what a client
        placing work across brokers needs; nothing of other tenants' buffers)."""
        eng = self.engine
        devices = eng.device_info()
        for d in devices:
            name = d["device"]
            if "#" not in name:  # a shared device (a dedicated one belongs to its tenant)
                d["memory_free"] = max(0, eng.pool.capacity(name) - eng.pool.used(name))
        mine = self.state.residents.values() if self.state is not None else ()
        serving = [w for w in eng.workers.values() if eng._serves(w, self.state)]  # this tenant's devices
        return {"session": self.id, "tenant": self.tenant.name if self.tenant else None, "broker": eng.identity,
                "devices": devices, "queued": eng.queued, "healthy": all(w.alive for w in serving),
                "residents": [{"digest": r.digest, "bytes": r.nbytes, "devices": sorted(r.devices)} for r in mine],
                "arenas": len(self.arenas), "inflight": len(self.inflight), "stats": dict(eng.stats)}

    # -- teardown ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop reading and writing; resources go in ``connection_lost``."""
        self._close()

    async def connection_lost(self) -> None:
        """Release everything the session held; safe against cancellation."""
        if self.closed:
            return
        self.closed = True
        self.engine.session_gone(self.id)
        if self.engine.lease_hosts.pop(self.id, None) is not None:
            self.engine.advise_spin()
        if self.id in self.engine.leases:
            try:  # its runs on the device finish before its arenas go
                await asyncio.shield(self.engine.end_lease(self.id))
            except asyncio.CancelledError:
                pass
        if self.rings is not None:
            self.rings.close()
            self.rings = None
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
            for rec in self.prepared.values():
                self.engine.release_prepared(rec)
            for _, rec in self._implicit.values():
                self.engine.release_prepared(rec)
            self.prepared.clear()
            self._implicit.clear()
            if self.state is not None:
                self.engine.tenant_close(self.state)
                self.state = None
        self.log.info("session_closed", dropped=dropped)

    def __repr__(self) -> str:
        return f"<Session {self.id} tenant={self.tenant.name if self.tenant else None}>"


__all__ = ["Session", "Error"]
