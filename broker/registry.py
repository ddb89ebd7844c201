"""The engine's registry: what tenants handed over, kept so that a worker's death loses nothing.

Arenas (their fds, checked once: a memory-backed segment the tenant owns, writable, not
sealed), libraries (their bytes, content-addressed), residents (a host copy in a broker-owned
memfd, put on devices when a graph needs it), prepared graphs (sent to a worker on their first
run there) and tenants (capabilities, policy, backpressure counters).  Tenant-facing ids never
reach here: sessions translate them to these global ids.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import fcntl
import functools
import hashlib
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from . import errors
from .config import TenantPolicy
from .engine_base import EngineBase
from .graph import ResidentRef, Template
from .protocol import DTYPES, SCALAR_TYPES, KernelSpec
from .records import run_struct, values_struct
from .streams.wire import (
    WEvictResident,
    WLoadLibrary,
    WPinArena,
    WRelease,
    WReply,
    WUnloadLibrary,
    WUnpinArena,
)
from .workers import WorkerHandle

if TYPE_CHECKING:
    from .dispatch import _Pending

log = structlog.get_logger("kaas.engine")

LIBRARY_FORMATS = ("cuda", "cubin", "ptx", "fatbin")
MAX_LIBRARY_BYTES = 32 * 1024 * 1024
_F_GET_SEALS, _F_SEAL_WRITE, _F_SEAL_FUTURE_WRITE = 1034, 0x0008, 0x0010  # linux/fcntl.h
_IDENT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_SHM_FILESYSTEMS = (0x01021994, 0x958458F6)  # TMPFS_MAGIC (shm_open, memfd), HUGETLBFS_MAGIC
_libc = ctypes.CDLL(None, use_errno=True)


def _raise_unless_lost(outcomes: list[Any]) -> None:
    """Re-raise the first failure of a broadcast, except a worker's death: its respawn restores it."""
    for r in outcomes:
        if isinstance(r, BaseException) and not isinstance(r, errors.WorkerLost):
            raise r

def _ignore(_: object) -> None:
    pass


def _unloaded(device: str, digest: str, outcome: object) -> None:
    """A worker's answer to an unload: a refusal leaves the module loaded there; say so."""
    code = outcome.code if isinstance(outcome, WReply) else ""
    if isinstance(outcome, errors.KaasError) and not isinstance(outcome, errors.WorkerLost):
        code = outcome.code
    if code:
        log.warning("library_unload_failed", device=device, library=digest[:16], code=code)

@dataclass(eq=False, slots=True)
class ArenaRecord:
    """A tenant's shared-memory segment, mapped in every worker. The broker keeps the fd."""

    gid: int
    fd: int
    size: int
    session: int
    inflight: int = 0      # graphs queued or running that use it
    closed: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    tenant: TenantState | None = None

@dataclass(eq=False, slots=True)
class LibraryRecord:
    digest: str
    format: str
    data: bytes
    kernels: dict[str, KernelSpec]
    options: tuple[str, ...]
    log: str = ""
    ready: asyncio.Future[None] | None = None
    holders: set[str] = field(default_factory=set)  # tenants that registered (or are registering) it and hold it
    refs: int = 0  # live prepared graphs (of any tenant) that use it: never evicted while > 0

@dataclass(eq=False, slots=True)
class ResidentRecord:
    """Immutable content held by the broker (memfd) and put on devices when a graph needs it."""

    gid: int
    tenant: str
    digest: str
    nbytes: int
    fd: int
    devices: set[str] = field(default_factory=set)
    inflight: int = 0
    released: bool = False

@dataclass(eq=False, slots=True)
class TenantState:
    """A tenant's capabilities. ``gen`` changes whenever libraries or residents do (cache key)."""

    name: str
    sessions: int = 0
    libraries: dict[str, None] = field(default_factory=dict)  # the digests it holds, least recently used first
    library_refs: dict[str, int] = field(default_factory=dict)  # digest -> its live prepared graphs using it
    library_bytes: int = 0
    prepared: int = 0  # live prepared graphs over all its sessions
    residents_pending: int = 0  # resident registrations under way (counted against its limit)
    residents: dict[str, ResidentRecord] = field(default_factory=dict)
    # What validation reads, kept in step with the two above:
    library_sigs: dict[str, dict[str, KernelSpec]] = field(default_factory=dict)
    resident_refs: dict[str, ResidentRef] = field(default_factory=dict)
    gen: int = 0
    arenas: int = 0  # arenas its sessions hold
    policy: TenantPolicy = TenantPolicy()
    graphs: int = 0              # graphs it ran to completion
    device_seconds: float = 0.0  # device time charged to it
    # Backpressure. Invariants: in_sched = its graphs in the scheduler (queued or running), at most
    # policy.max_inflight; parked = graphs beyond that, in arrival order; waiting = those not yet
    # dispatched (parked or queued), at most policy.max_queued.
    in_sched: int = 0
    parked: collections.deque[_Pending] = field(default_factory=collections.deque)
    waiting: int = 0

@dataclass(eq=False, slots=True)
class PreparedRecord:
    """A prepared graph: validated once, sent to a worker the first time it runs there.

    Workers hold it under ``gid`` (``WorkerHandle.prepared``); a respawned worker is sent it
    again on its first run.  Released when its session lets go and no run uses it.
    """

    gid: int
    template: Template
    tenant: str
    inflight: int = 0
    released: bool = False
    residents: tuple[ResidentRecord, ...] = ()
    vstruct: struct.Struct = struct.Struct("<")  # how its literal values travel in ring records
    run_st: struct.Struct = struct.Struct("<")   # its whole run record to a worker
    # What it holds a reference on (the objects, not names: a tenant or library of the same
    # name or digest may be a new one by the time this graph is forgotten).
    state: TenantState | None = None
    libs: tuple[LibraryRecord, ...] = ()

def library_digest(fmt: str, data: bytes, kernels: Iterable[KernelSpec], options: Iterable[str]) -> str:
    h = hashlib.blake2b(digest_size=32)
    for part in (fmt.encode(), data, msgspec.msgpack.encode(tuple(kernels)), "\0".join(options).encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()

def check_kernel_specs(kernels: tuple[KernelSpec, ...]) -> dict[str, KernelSpec]:
    """Signatures must be well formed before anything is compiled or loaded."""
    if not kernels:
        raise errors.InvalidArgument("a library must declare at least one kernel")
    out: dict[str, KernelSpec] = {}
    for k in kernels:
        if not k.name or not set(k.name) <= _IDENT or k.name[0].isdigit():
            raise errors.InvalidArgument(f"kernel name {k.name!r} is not a C identifier")
        if k.name in out:
            raise errors.InvalidArgument(f"kernel {k.name!r} is declared twice")
        for p in k.params:
            if p.kind == "buf":
                if p.access not in ("in", "out", "inout"):
                    raise errors.InvalidArgument(f"kernel {k.name!r} parameter {p.name!r}: access must be "
                                                 f"in, out or inout, not {p.access!r}")
                if p.dtype and p.dtype not in DTYPES:
                    raise errors.InvalidArgument(f"kernel {k.name!r} parameter {p.name!r}: unknown dtype {p.dtype!r}")
            elif p.kind not in SCALAR_TYPES:
                raise errors.InvalidArgument(f"kernel {k.name!r} parameter {p.name!r}: kind must be 'buf' or one "
                                             f"of {', '.join(SCALAR_TYPES)}, not {p.kind!r}")
        if k.host and k.host.count(":") != 1:
            raise errors.InvalidArgument(f"kernel {k.name!r}: host implementation must be 'module:function'")
        out[k.name] = k
    return out


def _fs_type(fd: int) -> int:
    """``f_type`` of the filesystem holding ``fd`` (fstatfs), or -1 when it cannot be read."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first field (a long)
    if _libc.fstatfs(fd, buf) != 0:
        return -1
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF

def _copy_range(src: int, dst: int, nbytes: int, offset: int) -> int:
    """Copy from a tenant's segment by file I/O: a truncated segment reads short, never SIGBUS."""
    done = 0
    while done < nbytes:
        chunk = os.pread(src, min(nbytes - done, 8 << 20), offset + done)
        if not chunk:
            break
        os.pwrite(dst, chunk, done)
        done += len(chunk)
    return done


class Registry(EngineBase):
    """Registration: arenas, libraries, residents, prepared graphs, tenants."""

    # -- tenants ---------------------------------------------------------------------------
    def tenant_open(self, name: str, policy: TenantPolicy | None = None) -> TenantState:
        st = self.tenants.get(name)
        if st is None:
            st = self.tenants[name] = TenantState(name)
            self.metrics.tenant_back(name)
            if policy is not None and policy.isolation == "dedicated":
                st.policy = policy
                self._open_dedicated(st)
        st.sessions += 1
        if policy is not None:
            self.set_policy(st, policy)
        return st

    def set_policy(self, st: TenantState, policy: TenantPolicy) -> None:
        """Apply (new) limits to a tenant: weight and class for its next graphs, quotas at once."""
        st.policy = policy
        self.pool.set_tenant(st.name, policy.weight, policy.device_memory or None, policy.total_memory or None)
        if self._unpark(st):
            self._pump()

    def tenant_close(self, st: TenantState) -> None:
        st.sessions -= 1
        if st.sessions == 0:
            for rec in list(st.residents.values()):
                self.release_resident(st, rec)
            for digest in st.libraries:  # they stay cached (bounded) for whoever registers them again
                lib = self.libraries.get(digest)
                if lib is not None:
                    lib.holders.discard(st.name)
            del self.tenants[st.name]
            self.metrics.tenant_left(st.name)
            if st.name in self.dedicated and not self._stopping:
                task = asyncio.get_running_loop().create_task(self._close_dedicated(st.name))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # -- arenas ----------------------------------------------------------------------------
    async def register_arena(self, session: int, uid: int, fd: int, size: int,
                             tenant: TenantState | None = None) -> ArenaRecord:
        """Check and map a tenant's segment on every device. Takes ownership of ``fd``."""
        try:
            if tenant is not None and tenant.arenas >= self.tenant_arena_limit:
                raise errors.QuotaExceeded(f"tenant holds {tenant.arenas} arenas (limit {self.tenant_arena_limit})",
                                           detail={"limit": self.tenant_arena_limit})
            if len(self.arenas) + len(self.residents) >= self.fd_budget:
                # Says nothing of how many others hold: that is other tenants' business.
                raise errors.QuotaExceeded("the broker cannot take more arenas now; try again later")
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or _fs_type(fd) not in _SHM_FILESYSTEMS:
                # Only memory-backed files: a file on a filesystem the tenant serves (FUSE, NFS)
                # could block a worker's reads forever.
                raise errors.InvalidArena("the file descriptor is not a shared-memory segment (tmpfs or hugetlbfs)")
            if st.st_uid != uid:
                raise errors.InvalidArena(f"the segment is owned by uid {st.st_uid}, not by the tenant (uid {uid})")
            if size <= 0 or st.st_size < size:
                raise errors.InvalidArena(f"declared size {size} does not fit the segment's {st.st_size} bytes",
                                          detail={"size": size, "segment_size": st.st_size})
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
                raise errors.InvalidArena("the segment's descriptor is not open for reading and writing, so the "
                                          "broker could not map it to write outputs")
            try:
                seals = fcntl.fcntl(fd, _F_GET_SEALS)
            except OSError:  # not a memfd: no seals
                seals = 0
            if seals & (_F_SEAL_WRITE | _F_SEAL_FUTURE_WRITE):
                raise errors.InvalidArena("the segment is sealed against writes, so the broker could not map it "
                                          "to write outputs")
        except BaseException:
            os.close(fd)
            raise
        rec = ArenaRecord(next(self._ids), fd, size, session, tenant=tenant)
        rec.idle.set()
        self.arenas[rec.gid] = rec
        if tenant is not None:
            tenant.arenas += 1
        try:
            _raise_unless_lost(await asyncio.gather(
                *(self._pin_on(w, rec) for w in list(self.workers.values()) if w.alive and self._serves(w, tenant)),
                return_exceptions=True))
        except (Exception, asyncio.CancelledError):
            self._forget_arena(rec)
            raise
        return rec

    async def _pin_on(self, w: WorkerHandle, rec: ArenaRecord) -> None:
        """Map ``rec`` in ``w`` once: registration and a respawn's replay may race for it."""
        if rec.gid in w.pinned:
            return
        w.pinned.add(rec.gid)
        await w.call(WPinArena(w.next_seq(), rec.gid, rec.size), rec.fd)

    async def release_arena(self, rec: ArenaRecord) -> None:
        """Close ``rec`` for new graphs; unmap it once graphs using it are done."""
        rec.closed = True
        await rec.idle.wait()
        if rec.gid in self.arenas:
            await asyncio.shield(self._unpin(rec))

    async def _unpin(self, rec: ArenaRecord) -> None:
        try:
            await asyncio.gather(*(w.call(WUnpinArena(w.next_seq(), rec.gid))
                                   for w in list(self.workers.values()) if w.alive and rec.gid in w.pinned))
            for w in self.workers.values():
                w.pinned.discard(rec.gid)
        except errors.KaasError as exc:
            log.warning("unpin_failed", arena=rec.gid, error=str(exc))
        finally:
            self._forget_arena(rec)

    def _forget_arena(self, rec: ArenaRecord) -> None:
        if self.arenas.pop(rec.gid, None) is not None:
            os.close(rec.fd)
            if rec.tenant is not None:
                rec.tenant.arenas -= 1

    # -- libraries -------------------------------------------------------------------------
    async def register_library(self, tenant: TenantState, fmt: str, data: bytes,
                               kernels: tuple[KernelSpec, ...], options: tuple[str, ...]) -> tuple[str, bool, str]:
        """Load a library on every device; the same bytes twice cost nothing. Returns (digest, cached, log)."""
        if fmt not in LIBRARY_FORMATS:
            raise errors.InvalidArgument(f"library format {fmt!r} is not one of {', '.join(LIBRARY_FORMATS)}")
        if not data:
            raise errors.InvalidArgument("library is empty")
        if len(data) > MAX_LIBRARY_BYTES:
            raise errors.InvalidArgument(f"library of {len(data)} bytes exceeds {MAX_LIBRARY_BYTES} bytes")
        specs = check_kernel_specs(kernels)
        digest = library_digest(fmt, data, kernels, options)
        allowed = tenant.policy.libraries
        if allowed and digest not in allowed:
            raise errors.PermissionDenied(
                f"library {digest[:16]}... is not on this tenant's list of vetted libraries",
                detail={"library": digest})
        rec = self.libraries.get(digest)
        cached = digest in tenant.libraries  # never reveal what other tenants registered
        if not cached:
            self._make_room(tenant, len(data), new_in_cache=rec is None)
            # Reserved before any await: concurrent registrations of this tenant see it counted,
            # and a record a tenant holds is never dropped from the cache.
            tenant.libraries[digest] = None
            tenant.library_bytes += len(data)
            if rec is not None:
                rec.holders.add(tenant.name)
        try:
            return await self._load_library(tenant, digest, rec, fmt, data, kernels, specs, options, cached)
        except BaseException:
            if not cached and digest in tenant.libraries and digest not in tenant.library_sigs:
                del tenant.libraries[digest]  # the reservation of a registration that failed
                tenant.library_bytes -= len(data)
                lib = self.libraries.get(digest)
                if lib is not None:
                    lib.holders.discard(tenant.name)
            raise

    async def _load_library(self, tenant: TenantState, digest: str, rec: LibraryRecord | None, fmt: str,
                            data: bytes, kernels: tuple[KernelSpec, ...], specs: dict[str, KernelSpec],
                            options: tuple[str, ...], cached: bool) -> tuple[str, bool, str]:
        if rec is None:
            rec = LibraryRecord(digest, fmt, data, specs, tuple(options))
            rec.holders.add(tenant.name)
            rec.ready = asyncio.get_running_loop().create_future()
            self.libraries[digest] = rec
            try:
                targets = [w for w in self.workers.values() if w.alive]
                outcomes = await asyncio.gather(*(
                    w.call(WLoadLibrary(w.next_seq(), digest, fmt, data, kernels, tuple(options)))
                    for w in targets), return_exceptions=True)
                _raise_unless_lost(outcomes)
                for w, r in zip(targets, outcomes, strict=True):
                    if isinstance(r, WReply):
                        w.libraries.add(digest)
                rec.log = "\n".join(str(r.info.get("log", "")) for r in outcomes
                                    if isinstance(r, WReply) and r.info.get("log"))
                self.stats["library_loads"] += 1
                rec.ready.set_result(None)
            except (Exception, asyncio.CancelledError) as exc:
                del self.libraries[digest]
                rec.ready.set_exception(exc)
                rec.ready.exception()  # retrieved: later waiters re-raise it themselves
                raise
        else:
            assert rec.ready is not None
            await asyncio.shield(rec.ready)
            for _ in range(3):  # dropped from the cache while it loaded (no holder meanwhile): keep it again
                await self._load_where_missing(rec)
                if self.libraries.get(digest) is rec:
                    break
                self.libraries[digest] = rec
                for w in self.workers.values():
                    w.libraries.discard(digest)  # its unload was sent: load it again
            else:
                raise errors.InternalError(f"library {digest[:16]} kept leaving the cache while it was registered")
        if self.libraries.get(digest) is rec:  # held while loading, so never dropped meanwhile
            self.libraries[digest] = self.libraries.pop(digest)  # most recently used last
        if digest not in tenant.library_sigs:
            tenant.library_sigs[digest] = rec.kernels
            tenant.gen += 1
        if digest in tenant.libraries:
            tenant.libraries[digest] = tenant.libraries.pop(digest)
        else:  # let go of while this registration waited: held again
            tenant.libraries[digest] = None
            tenant.library_bytes += len(rec.data)
        rec.holders.add(tenant.name)
        return digest, cached, rec.log

    # -- the bounded library cache ---------------------------------------------------------------
    def _make_room(self, tenant: TenantState, nbytes: int, *, new_in_cache: bool) -> None:
        """Room for one more library of ``nbytes``: within ``tenant``'s limits by letting go of its
        least recently used libraries that none of its prepared graphs uses, and (``new_in_cache``)
        within the broker's by dropping least recently used ones no tenant holds or uses.  Planned
        whole first: a registration that cannot fit is refused, naming the limit, and costs nothing."""
        cfg = self.config
        victims: list[str] = []
        count, held = len(tenant.libraries), tenant.library_bytes
        if nbytes > cfg.tenant_max_library_bytes:
            raise self._over("tenant_max_library_bytes", cfg.tenant_max_library_bytes,
                             f"a library of {nbytes} bytes is larger than a tenant may hold")
        candidates = iter([d for d in tenant.libraries if not tenant.library_refs.get(d)
                           and d in tenant.library_sigs])  # not a reservation under way
        while count + 1 > cfg.tenant_max_libraries or held + nbytes > cfg.tenant_max_library_bytes:
            d = next(candidates, None)
            if d is None:
                name, limit = (("tenant_max_libraries", cfg.tenant_max_libraries)
                               if count + 1 > cfg.tenant_max_libraries
                               else ("tenant_max_library_bytes", cfg.tenant_max_library_bytes))
                raise self._over(name, limit, f"tenant holds {len(tenant.libraries)} libraries of "
                                              f"{tenant.library_bytes} bytes, each used by a prepared graph "
                                              "or still being registered: no room for one more")
            victims.append(d)
            count -= 1
            rec = self.libraries.get(d)
            held -= len(rec.data) if rec is not None else 0
        drops: list[LibraryRecord] = []
        if new_in_cache:
            if nbytes > cfg.max_library_bytes:
                raise self._over("max_library_bytes", cfg.max_library_bytes,
                                 f"a library of {nbytes} bytes is larger than the broker's library cache",
                                 "ask for a higher limit")
            lost = set(victims)
            total = sum(len(r.data) for r in self.libraries.values())
            entries = len(self.libraries)
            pool = iter([r for r in self.libraries.values()
                         if not r.refs and r.ready is not None and r.ready.done()
                         and (not r.holders or (r.holders == {tenant.name} and r.digest in lost))])
            while entries + 1 > cfg.max_libraries or total + nbytes > cfg.max_library_bytes:
                r = next(pool, None)
                if r is None:
                    name, limit = (("max_libraries", cfg.max_libraries) if entries + 1 > cfg.max_libraries
                                   else ("max_library_bytes", cfg.max_library_bytes))
                    raise self._over(name, limit, "the broker's library cache is full", "try again later")
                drops.append(r)
                entries -= 1
                total -= len(r.data)
        for d in victims:
            self._let_go(tenant, d)
        for r in drops:
            self._drop_library(r)

    @staticmethod
    def _over(name: str, limit: int, what: str, then: str = "release graphs, or ask for a higher limit"
              ) -> errors.QuotaExceeded:
        return errors.QuotaExceeded(f"{what} ({name} = {limit}); {then}", detail={"limit": name, "value": limit})

    def _let_go(self, tenant: TenantState, digest: str) -> None:
        """``tenant`` no longer holds library ``digest`` (its graphs must register it again)."""
        del tenant.libraries[digest]
        tenant.library_sigs.pop(digest, None)
        tenant.library_refs.pop(digest, None)
        tenant.gen += 1
        rec = self.libraries.get(digest)
        if rec is not None:
            tenant.library_bytes -= len(rec.data)
            rec.holders.discard(tenant.name)
        self.stats["library_evictions"] += 1

    async def _load_where_missing(self, rec: LibraryRecord) -> None:
        """Load a cached library on the workers that lack it: a respawned worker loads only the
        libraries some tenant holds (``Supervision._restore``), so one nobody held comes back here,
        when a tenant registers it again."""
        targets = [w for w in self.workers.values() if w.alive and rec.digest not in w.libraries]
        if not targets:
            return
        outcomes = await asyncio.gather(*(
            w.call(WLoadLibrary(w.next_seq(), rec.digest, rec.format, rec.data, tuple(rec.kernels.values()),
                                rec.options)) for w in targets), return_exceptions=True)
        _raise_unless_lost(outcomes)
        for w, r in zip(targets, outcomes, strict=True):
            if isinstance(r, WReply):
                w.libraries.add(rec.digest)

    def _drop_library(self, rec: LibraryRecord) -> None:
        """Forget a library no one holds or uses, in the broker and on every device."""
        del self.libraries[rec.digest]
        for w in self.workers.values():
            w.libraries.discard(rec.digest)
            if w.alive:
                w.send_cb(WUnloadLibrary(w.next_seq(), rec.digest), functools.partial(_unloaded, w.device, rec.digest))
        self.stats["library_drops"] += 1

    # -- residents -------------------------------------------------------------------------
    async def put_resident(self, tenant: TenantState, arena: ArenaRecord, offset: int, nbytes: int,
                           digest: bytes) -> tuple[ResidentRecord, bool]:
        key = digest.hex()
        rec = tenant.residents.get(key)
        if rec is not None:
            return rec, True
        limit = self.config.tenant_max_residents
        if len(tenant.residents) + tenant.residents_pending >= limit:
            raise errors.QuotaExceeded(f"tenant holds {len(tenant.residents)} resident buffers "
                                       f"(tenant_max_residents = {limit})",
                                       detail={"limit": "tenant_max_residents", "value": limit})
        tenant.residents_pending += 1  # counted while this registration awaits its copy
        try:
            return await self._put_resident(tenant, arena, offset, nbytes, digest, key)
        finally:
            tenant.residents_pending -= 1

    async def _put_resident(self, tenant: TenantState, arena: ArenaRecord, offset: int, nbytes: int,
                            digest: bytes, key: str) -> tuple[ResidentRecord, bool]:
        if len(self.arenas) + len(self.residents) >= self.fd_budget:
            raise errors.QuotaExceeded("the broker cannot take more resident buffers now; try again later")
        fd = os.memfd_create("kaas-resident", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            arena.inflight += 1
            arena.idle.clear()
            try:
                copied = await asyncio.to_thread(_copy_range, arena.fd, fd, nbytes, offset)
            finally:
                self._arena_done(arena)
            if copied != nbytes:
                raise errors.InvalidArena(f"arena shrank under the broker: read {copied} of {nbytes} bytes")
        except BaseException:
            os.close(fd)
            raise
        rec = tenant.residents.get(key)  # another request of this tenant may have won the race
        if rec is not None:
            os.close(fd)
            return rec, True
        rec = ResidentRecord(next(self._ids), tenant.name, key, nbytes, fd)
        self.residents[rec.gid] = rec
        tenant.residents[key] = rec
        tenant.resident_refs[key] = ResidentRef(rec.gid, nbytes)
        tenant.gen += 1
        return rec, False

    def release_resident(self, tenant: TenantState, rec: ResidentRecord) -> None:
        tenant.residents.pop(rec.digest, None)
        tenant.resident_refs.pop(rec.digest, None)
        tenant.gen += 1
        rec.released = True
        if rec.inflight == 0:
            self._forget_resident(rec)

    def _forget_resident(self, rec: ResidentRecord) -> None:
        if self.residents.pop(rec.gid, None) is None:
            return
        for d in rec.devices:
            self.pool.remove(d, rec.gid)
            w = self.workers[d]
            if w.alive:
                w.send_cb(WEvictResident(w.next_seq(), rec.gid), _ignore)
        rec.devices.clear()
        os.close(rec.fd)

    # -- graphs ----------------------------------------------------------------------------
    # -- prepared graphs ---------------------------------------------------------------------
    def prepare(self, tenant: TenantState, template: Template) -> PreparedRecord:
        """Keep a validated graph for runs by handle (workers get it on its first run there)."""
        if tenant.prepared >= self.config.tenant_max_prepared:
            raise errors.QuotaExceeded(
                f"tenant holds {tenant.prepared} prepared graphs (tenant_max_prepared = {self.config.tenant_max_prepared})",
                detail={"limit": "tenant_max_prepared", "value": self.config.tenant_max_prepared})
        residents = tuple(self.residents[r] for r in template.residents)
        tenant.prepared += 1
        libs = []
        for d in template.libraries:  # in use: not evicted while this graph lives; and recently used
            tenant.library_refs[d] = tenant.library_refs.get(d, 0) + 1
            if d in tenant.libraries:
                tenant.libraries[d] = tenant.libraries.pop(d)
            rec = self.libraries.get(d)
            if rec is not None:
                rec.refs += 1
                libs.append(rec)
                self.libraries[d] = self.libraries.pop(d)
        self.stats["prepared"] += 1
        self.stats["prepared_live"] += 1
        kinds = template.literal_kinds
        return PreparedRecord(next(self._ids), template, tenant.name, residents=residents,
                              vstruct=values_struct(kinds), run_st=run_struct(len(template.arena_buffers), kinds),
                              state=tenant, libs=tuple(libs))

    def release_prepared(self, rec: PreparedRecord) -> None:
        """Its session let go: workers forget it once no run uses it."""
        if rec.released:
            return
        rec.released = True
        if rec.inflight == 0:
            self._forget_prepared(rec)

    def _forget_prepared(self, rec: PreparedRecord) -> None:
        self.stats["prepared_live"] -= 1
        st = rec.state
        if st is not None:
            st.prepared -= 1
            for d in rec.template.libraries:
                if st.library_refs.get(d):
                    st.library_refs[d] -= 1
        for lib in rec.libs:
            lib.refs -= 1
        for w in self.workers.values():
            if rec.gid in w.prepared:
                w.prepared.discard(rec.gid)
                if w.alive:
                    w.send_cb(WRelease(w.next_seq(), rec.gid), _ignore)

    def _arena_done(self, a: ArenaRecord) -> None:
        a.inflight -= 1
        if a.inflight == 0:
            a.idle.set()
