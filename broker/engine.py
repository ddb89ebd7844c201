"""The engine: the one loop that ties sessions, the scheduler, residency and device workers.

It keeps every piece of state needed to carry on when a worker dies: arenas (their
fds), libraries (their bytes), residents (a host copy in a broker-owned memfd), and
which graphs are queued or in flight.  Workers hold only what can be replayed.

Tenant-facing ids never reach here: sessions translate them to the global ids below.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import fcntl
import functools
import hashlib
import itertools
import os
import resource
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog

from . import errors
from .config import Config, TenantPolicy
from .graph import ResidentRef, Template
from .metrics import Metrics
from .pool.residency import Admission, Pool
from .protocol import DTYPES, SCALAR_TYPES, KernelSpec, Timings
from .records import run_struct, values_struct
from .scheduler import LATENCY, Job, Scheduler
from .session_rings import RingHub
from .streams.wire import (
    WEvictResident,
    WLoadLibrary,
    WPinArena,
    WPrepare,
    WPutResident,
    WRelease,
    WReply,
    WRun,
    WUnpinArena,
)
from .workers import WorkerHandle

log = structlog.get_logger("kaas.engine")

LIBRARY_FORMATS = ("cuda", "cubin", "ptx", "fatbin")
MAX_LIBRARY_BYTES = 32 * 1024 * 1024
_DEADLINE_GRACE = 0.5  # seconds past a graph's deadline before the broker kills its worker
_SWEEP_EVERY = 0.1     # how often graphs on devices are checked against their deadlines
_NO_TIMINGS = Timings()


def _raise_unless_lost(outcomes: list[Any]) -> None:
    """Re-raise the first failure of a broadcast, except a worker's death: its respawn restores it."""
    for r in outcomes:
        if isinstance(r, BaseException) and not isinstance(r, errors.WorkerLost):
            raise r


def _ignore(_: object) -> None:
    pass


def _kernel_names(p: _Pending) -> str:
    names = sorted({k for _, k in p.prepared.template.kernel_keys})
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


_F_GET_SEALS, _F_SEAL_WRITE, _F_SEAL_FUTURE_WRITE = 1034, 0x0008, 0x0010  # linux/fcntl.h
_IDENT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


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
    libraries: set[str] = field(default_factory=set)
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


@dataclass(frozen=True, slots=True)
class GraphResult:
    device: str
    timings: Timings
    trace: tuple[float, ...] = ()


@dataclass(eq=False, slots=True)
class _Pending:
    job: Job
    prepared: PreparedRecord
    slices: tuple[int, ...]          # (global arena id, offset) per arena buffer
    values: tuple[int | float, ...]  # literal values
    on_done: Callable[[GraphResult | errors.KaasError], None]
    submitted: float
    deadline: float
    arenas: tuple[ArenaRecord, ...]
    residents: tuple[ResidentRecord, ...]
    dispatched: float = 0.0
    trace: list[float] | None = None
    worker: WorkerHandle | None = None     # the worker running this attempt
    limit: float = 0.0                     # this attempt's deadline, seconds after ``dispatched``
    admission: Admission | None = None     # its device memory, from the pool, while dispatched
    in_sched: bool = False                 # counted in its tenant's in_sched (handed to the scheduler)
    verdict: str = ""                      # after its worker died: culprit | suspect | innocent
    culprit: errors.KaasError | None = None  # what a culprit is told
    attempts: int = 0                      # replays so far


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


_SHM_FILESYSTEMS = (0x01021994, 0x958458F6)  # TMPFS_MAGIC (shm_open, memfd), HUGETLBFS_MAGIC
_libc = ctypes.CDLL(None, use_errno=True)


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


class Engine:
    def __init__(self, config: Config, devices: list[str], metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.devices = list(devices)
        lanes = {d: (config.lanes_cuda if d.startswith("cuda") else config.lanes_cpu) for d in devices}
        # The hot path's rings (sessions', workers'): polled while spinning, drained in batches.
        self.hub = RingHub()
        self.hub.spinning = lambda: self._spinning
        self.hub.batch = self._batched
        self._batching = False
        self._pump_due = False
        self._spinning = False
        self.workers: dict[str, WorkerHandle] = {d: self._new_worker(d) for d in devices}
        self._respawns: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self.accepting = True  # False once shutting down: new graphs are refused
        self._idle = asyncio.Event()
        self._idle.set()
        self.reload_hook: Callable[[], Awaitable[str]] | None = None  # set by the daemon: re-read the config
        self.scheduler = Scheduler(lanes, config.policy)     # the shared workers
        self.dedicated: dict[str, Scheduler] = {}           # tenant -> its own workers' scheduler
        self.pool = Pool({d: 1 << 40 for d in devices})  # real capacities once the workers report them
        self.arenas: dict[int, ArenaRecord] = {}
        self.libraries: dict[str, LibraryRecord] = {}
        self.residents: dict[int, ResidentRecord] = {}
        self.tenants: dict[str, TenantState] = {}
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self.stats: dict[str, int] = {"graphs": 0, "graph_errors": 0, "resident_puts": 0, "library_loads": 0,
                                      "worker_restarts": 0, "replays": 0, "deadline_kills": 0, "evictions": 0,
                                      "prepared": 0, "prepared_live": 0, "ring_runs": 0}
        self.strikes: dict[tuple[str, str, str], int] = {}    # (tenant, library, kernel) -> faults
        self.quarantined: dict[tuple[str, str, str], float] = {}  # -> since (time.time())
        self.spin = config.spin("spin_us", devices)
        self.client_spin = config.spin("client_spin_us", devices)
        self._spin_until = 0.0
        self._spinning = False
        # Graphs on devices (at most lanes x devices), for the deadline sweep: one timer for all
        # of them instead of one per graph on the request path.
        self._running: dict[int, _Pending] = {}
        self._sweeping = False
        # Every arena and resident holds an fd here and in each worker; a reserve stays free for
        # sockets, logs and name lookups, so one tenant's arenas can never starve the broker.
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fd_budget = max(16, nofile - min(1024, nofile // 4))
        # No tenant may take more than half of it, whatever max_tenant_arenas says.
        self.tenant_arena_limit = min(config.max_tenant_arenas, max(8, self.fd_budget // 2))

    # -- lifecycle -----------------------------------------------------------------------
    def _new_worker(self, device: str) -> WorkerHandle:
        physical, _, tenant = device.partition("#")
        w = WorkerHandle(device, host_modules=self.config.host_modules, compile_check=self.config.compile_check,
                         spin_us=round(self.config.spin("worker_spin_us", self.devices) * 1e6),
                         on_exit=self._worker_exit, physical=physical, tenant=tenant, hub=self.hub)
        w.on_poisoned = self._worker_poisoned
        return w

    def _worker_poisoned(self, worker: WorkerHandle) -> None:
        """A worker announced a sticky fault: place nothing more on it (its replies follow)."""
        if self.workers.get(worker.device) is worker:
            self._sched_of(worker.device).set_down(worker.device, True)

    # -- pools of workers: the shared one, and one per dedicated tenant --------------------
    def _sched_for(self, tenant: str) -> Scheduler:
        return self.dedicated.get(tenant, self.scheduler)

    def _sched_of(self, device: str) -> Scheduler:
        _, _, tenant = device.partition("#")
        return self.dedicated[tenant] if tenant else self.scheduler

    @property
    def queued(self) -> int:
        """Graphs waiting for a device, parked ones included."""
        return sum(s.queued for s in self.schedulers) + sum(len(st.parked) for st in self.tenants.values())

    @property
    def schedulers(self) -> list[Scheduler]:
        return [self.scheduler, *self.dedicated.values()]

    def _serves(self, w: WorkerHandle, tenant: TenantState | None) -> bool:
        """Whether ``w`` may hold ``tenant``'s memory: its own workers if dedicated, else the shared ones."""
        name = tenant.name if tenant is not None else ""
        return w.tenant == (name if name in self.dedicated else "")

    def _open_dedicated(self, st: TenantState) -> None:
        """Give a dedicated tenant its own worker (its own context) on every device; lazily started."""
        if st.name in self.dedicated:  # reopened before its workers were retired: keep them
            return
        lanes = {f"{d}#{st.name}": (self.config.lanes_cuda if d.startswith("cuda") else self.config.lanes_cpu)
                 for d in self.devices}
        sched = self.dedicated[st.name] = Scheduler(lanes, self.config.policy)
        for key in lanes:
            sched.set_down(key, True)  # until its worker is up
            self.workers[key] = self._new_worker(key)
            self.pool.add_device(key, self.pool.capacity(key.partition("#")[0]))
            task = asyncio.get_running_loop().create_task(self._respawn(key, first=True))
            self._respawns[key] = task
            task.add_done_callback(functools.partial(self._respawn_done, key))

    async def _close_dedicated(self, name: str) -> None:
        """Retire a dedicated tenant's workers once it has no session and nothing queued or running."""
        sched = self.dedicated.get(name)
        if sched is None or name in self.tenants or any(sched.running.values()) or sched.queued:
            return
        # Detach everything before the first await: a session opening meanwhile starts afresh.
        del self.dedicated[name]
        keys = [k for k in self.workers if k.partition("#")[2] == name]
        retired = []
        for k in keys:
            t = self._respawns.pop(k, None)
            if t is not None:
                t.cancel()
            w = self.workers.pop(k)
            w.on_exit = None
            self.pool.remove_device(k)
            retired.append(w)
        await asyncio.gather(*(w.stop() for w in retired), return_exceptions=True)
        log.info("dedicated_workers_stopped", tenant=name, workers=len(retired))

    async def start(self) -> None:
        await asyncio.gather(*(w.start() for w in self.workers.values()))
        self.pool = Pool({d: self._capacity(w) for d, w in self.workers.items()},
                         on_evict=lambda e: self.metrics.tenant(e.tenant).evicted(e.device))

    @staticmethod
    def _capacity(w: WorkerHandle) -> int:
        """Device memory the broker hands out on ``w``'s device: most of a GPU; a quarter of host RAM."""
        mem = int(w.info.get("memory", 0)) or 1 << 40
        return int(mem * (0.9 if w.device.startswith("cuda") else 0.25))

    async def stop(self) -> None:
        self._stopping = True
        for t in self._respawns.values():
            t.cancel()
        err = errors.ShuttingDown("broker is shutting down")
        pending, self._pending = self._pending, {}
        self._running.clear()
        for p in pending.values():
            p.on_done(err)
        await asyncio.gather(*(w.stop() for w in self.workers.values()), return_exceptions=True)
        for a in list(self.arenas.values()):
            self._forget_arena(a)
        for r in list(self.residents.values()):
            self._forget_resident(r)

    def _worker_exit(self, worker: WorkerHandle, code: int | None) -> None:
        """A worker died: judge the graphs it was running, then bring a fresh one up.

        Called before those graphs' replies fail, so ``_graph_done`` finds their verdicts: a graph
        already named (past its deadline) is the culprit and the rest are innocent; a graph alone
        on the worker is the culprit; several with no culprit named are suspects, each replayed
        alone (a suspect that kills a worker while alone is the culprit).
        """
        running = [p for p in self._pending.values() if p.worker is worker]
        if worker.poisoned:
            pass  # it answered the graphs its fault touched; what is left never ran there
        elif running and not any(p.verdict == "culprit" for p in running):
            if len(running) == 1:
                p = running[0]
                p.verdict = "culprit"
                p.culprit = errors.WorkerLost(
                    f"the graph's kernels ({_kernel_names(p)}) killed the device worker {worker.device} "
                    f"(exit code {code}); the worker was restarted",
                    detail={"device": worker.device, "exit_code": code, "culprit": True})
            else:
                for p in running:
                    p.verdict = "suspect"
        for p in running:
            p.verdict = p.verdict or "innocent"
        if worker.device not in self.workers or self.workers[worker.device] is not worker:
            return  # a dedicated worker being retired
        self._sched_of(worker.device).set_down(worker.device, True)
        self.pool.clear_device(worker.device)
        for r in self.residents.values():
            r.devices.discard(worker.device)
        if not self._stopping and worker.device not in self._respawns:
            task = asyncio.get_running_loop().create_task(self._respawn(worker.device))
            self._respawns[worker.device] = task
            task.add_done_callback(functools.partial(self._respawn_done, worker.device))

    def _respawn_done(self, device: str, task: asyncio.Task[None]) -> None:
        self._respawns.pop(device, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker_respawn_crashed", device=device, error=repr(task.exception()))

    async def _respawn(self, device: str, first: bool = False) -> None:
        delay = 0.05
        while not self._stopping:
            w = self._new_worker(device)
            try:
                await w.start()
                self.workers[device] = w  # new arenas and libraries reach it from here on
                await self._restore(w)
            except (TimeoutError, errors.KaasError) as exc:
                log.warning("worker_respawn_failed", device=device, error=str(exc), retry_in=delay)
                w.kill()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if not w.alive:  # died again while being restored
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if not first:
                self.stats["worker_restarts"] += 1
                self.metrics.worker_restarted(device)
            self._sched_of(device).set_down(device, False)
            log.info("worker_respawned", device=device, pid=w.pid)
            self._pump()
            return

    async def _restore(self, w: WorkerHandle) -> None:
        """Give a fresh worker every live arena and library; one that fails is logged, not fatal."""
        for a in list(self.arenas.values()):
            if a.gid in self.arenas and self._serves(w, a.tenant):
                try:
                    await self._pin_on(w, a)
                except errors.WorkerLost:
                    raise
                except errors.KaasError as exc:
                    log.warning("arena_restore_failed", device=w.device, arena=a.gid, error=str(exc))
        for rec in list(self.libraries.values()):
            if rec.ready is not None and not rec.ready.done():
                await asyncio.wait([rec.ready])
            if rec.digest not in self.libraries:
                continue
            try:
                await w.call(WLoadLibrary(w.next_seq(), rec.digest, rec.format, rec.data,
                                          tuple(rec.kernels.values()), rec.options))
            except errors.WorkerLost:
                raise
            except errors.KaasError as exc:
                log.warning("library_restore_failed", device=w.device, library=rec.digest[:16], error=str(exc))

    def scrape(self, metrics: Metrics) -> None:
        """Fill the gauges a scrape reports (called by the metrics server before each scrape)."""
        depth: dict[str, int] = {}
        for p in self._pending.values():
            if not p.dispatched:
                depth[p.job.tenant] = depth.get(p.job.tenant, 0) + 1
        metrics.set_queue_depths(depth)
        held: dict[tuple[str, str], int] = {}
        for r in self.residents.values():
            for d in r.devices:
                held[(r.tenant, d)] = held.get((r.tenant, d), 0) + r.nbytes
        metrics.set_resident_bytes(held)

    def max_graph_bytes(self) -> int:
        """Device memory one graph may use: what the smallest device hands out."""
        return min((self.pool.capacity(d) for d in self.devices), default=1 << 40)

    def device_info(self) -> list[dict[str, Any]]:
        return [dict(w.info, device=d, alive=w.alive, pid=w.pid, running=len(self._sched_of(d).running.get(d, ())),
                     tenant=w.tenant or None) for d, w in self.workers.items()]

    # -- tenants ---------------------------------------------------------------------------
    def tenant_open(self, name: str, policy: TenantPolicy | None = None) -> TenantState:
        st = self.tenants.get(name)
        if st is None:
            st = self.tenants[name] = TenantState(name)
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
            del self.tenants[st.name]
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
        if rec is None:
            rec = LibraryRecord(digest, fmt, data, specs, tuple(options))
            rec.ready = asyncio.get_running_loop().create_future()
            self.libraries[digest] = rec
            try:
                outcomes = await asyncio.gather(*(
                    w.call(WLoadLibrary(w.next_seq(), digest, fmt, data, kernels, tuple(options)))
                    for w in list(self.workers.values()) if w.alive), return_exceptions=True)
                _raise_unless_lost(outcomes)
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
        if digest not in tenant.libraries:
            tenant.libraries.add(digest)
            tenant.library_sigs[digest] = rec.kernels
            tenant.gen += 1
        return digest, cached, rec.log

    # -- residents -------------------------------------------------------------------------
    async def put_resident(self, tenant: TenantState, arena: ArenaRecord, offset: int, nbytes: int,
                           digest: bytes) -> tuple[ResidentRecord, bool]:
        key = digest.hex()
        rec = tenant.residents.get(key)
        if rec is not None:
            return rec, True
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
        residents = tuple(self.residents[r] for r in template.residents)
        self.stats["prepared"] += 1
        self.stats["prepared_live"] += 1
        kinds = template.literal_kinds
        return PreparedRecord(next(self._ids), template, tenant.name, residents=residents,
                              vstruct=values_struct(kinds), run_st=run_struct(len(template.arena_buffers), kinds))

    def release_prepared(self, rec: PreparedRecord) -> None:
        """Its session let go: workers forget it once no run uses it."""
        if rec.released:
            return
        rec.released = True
        if rec.inflight == 0:
            self._forget_prepared(rec)

    def _forget_prepared(self, rec: PreparedRecord) -> None:
        self.stats["prepared_live"] -= 1
        for w in self.workers.values():
            if rec.gid in w.prepared:
                w.prepared.discard(rec.gid)
                if w.alive:
                    w.send_cb(WRelease(w.next_seq(), rec.gid), _ignore)

    # -- graphs ----------------------------------------------------------------------------
    def submit(self, *, tenant: str, session: int, prepared: PreparedRecord, slices: tuple[int, ...],
               values: tuple[int | float, ...], arenas: tuple[int, ...], timeout: float,
               on_done: Callable[[GraphResult | errors.KaasError], None], priority: int = 0,
               trace_from: float = 0.0) -> int:
        """Queue a run of a prepared graph with checked bindings (``arenas``: the global arena id
        of each arena buffer); ``on_done`` gets its result or typed error, exactly once."""
        if not self.accepting:
            raise errors.ShuttingDown("cannot run graph: the broker is shutting down")
        if not self._respawns and not any(w.alive for w in self.workers.values()):
            raise errors.NoDevice("no device worker is running")  # while one restarts, graphs wait
        st = self.tenants[tenant]
        pol = st.policy
        if st.waiting >= pol.max_queued:
            raise errors.TooManyRequests(f"tenant has {st.waiting} graphs waiting (limit {pol.max_queued})",
                                         detail={"waiting": st.waiting, "limit": pol.max_queued})
        t = prepared.template
        recs = self.arenas
        arena_recs = tuple(recs[g] for g in arenas)
        residents = prepared.residents
        for r in residents:
            if r.released:
                raise errors.UnknownResident(f"resident {r.digest[:16]!r} was released; prepare the graph again",
                                             detail={"resident": r.digest})
        if t.device_bytes or residents:
            self.pool.check_fits(tenant, t.device_bytes + sum(r.nbytes for r in residents))
        now = time.monotonic()
        if pol.priority == "latency":
            priority = LATENCY
        job = Job(next(self._ids), tenant, session, now, t.residents, priority, weight=pol.weight)
        limit = pol.max_graph_seconds
        deadline = (min(timeout, limit) if limit > 0 else timeout) if timeout > 0 else max(limit, 0.0)
        p = _Pending(job, prepared, slices, values, on_done, now, deadline, arena_recs, residents,
                     trace=[trace_from] if trace_from else None)
        prepared.inflight += 1
        for a in arena_recs:
            a.inflight += 1
            a.idle.clear()
        for r in residents:
            r.inflight += 1
        self._pending[job.id] = p
        self._idle.clear()
        st.waiting += 1
        if st.in_sched < pol.max_inflight:
            st.in_sched += 1
            p.in_sched = True
            self._sched_for(tenant).submit(job, now)
            self._pump()
        else:
            st.parked.append(p)  # waits for one of its own graphs to end: others are not held up
        self._kick(now)
        return job.id

    def _unpark(self, st: TenantState) -> bool:
        """Hand held-back graphs to the scheduler as the tenant's in-flight count allows; the caller pumps."""
        if not st.parked:
            return False
        now = time.monotonic()
        while st.parked and st.in_sched < st.policy.max_inflight:
            p = st.parked.popleft()
            st.in_sched += 1
            p.in_sched = True
            self._sched_for(st.name).submit(p.job, now)
        return True

    def _kick(self, now: float) -> None:
        """Keep the event loop polling (never sleeping) for ``spin`` seconds after activity."""
        if self.spin <= 0:
            return
        self._spin_until = now + self.spin
        if not self._spinning:
            self._spinning = True
            asyncio.get_running_loop().call_soon(self._spin_once)

    def _spin_once(self) -> None:
        # A pending call_soon makes the loop poll its sockets with a zero timeout.
        if self.hub.members:
            self.hub.poll_all()
        now = time.monotonic()
        if now < self._spin_until:
            asyncio.get_running_loop().call_soon(self._spin_once)
        elif self.hub.sleep_all():
            self._spinning = False
        else:  # a ring got work while announcing sleep: keep going
            self._spin_until = now + self.spin
            asyncio.get_running_loop().call_soon(self._spin_once)

    def _batched(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` (which may submit and complete many graphs) and schedule once after it."""
        if self._batching:
            fn()
            return
        self._batching = True
        try:
            fn()
        finally:
            self._batching = False
            if self._pump_due:
                self._pump()

    def cancel_session(self, session: int) -> int:
        """Drop a closing session's queued graphs (running ones finish); returns how many."""
        gone = [self._pending[j.id] for s in self.schedulers for j in s.cancel(lambda j: j.session == session)]
        for st in self.tenants.values():
            mine = [p for p in st.parked if p.job.session == session]
            for p in mine:
                st.parked.remove(p)
            gone += mine
        for p in gone:
            self._finish_unrun(p, errors.SessionClosed("the session closed before the graph ran"))
        for name in {p.job.tenant for p in gone}:
            if name in self.tenants:
                self._unpark(self.tenants[name])
        self._pump()
        return len(gone)

    def _finish_unrun(self, p: _Pending, err: errors.KaasError) -> None:
        """End a graph that never reached a device (cancelled or refused at dispatch)."""
        self._pending.pop(p.job.id, None)
        st = self.tenants.get(p.job.tenant)
        if st is not None:
            st.waiting -= 1
            if p.in_sched:
                st.in_sched -= 1
                p.in_sched = False
        self._release_uses(p)
        p.on_done(err)

    def pump(self) -> None:
        """Place what can run now (after an administrator changed what may run where)."""
        self._pump()

    def refuse_queued(self, err: errors.KaasError) -> int:
        """Fail every graph not yet on a device (shutdown); running ones go on. Returns how many."""
        gone = [self._pending[j.id] for s in self.schedulers for j in s.cancel(lambda j: True) if j.id in self._pending]
        for st in self.tenants.values():
            gone += st.parked
            st.parked.clear()
        for p in gone:
            self._finish_unrun(p, err)
        return len(gone)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no graph is queued or running; False if ``timeout`` passed first."""
        if not self._pending:
            return True
        self._idle.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _pump(self) -> None:
        if self._batching:
            self._pump_due = True
            return
        self._pump_due = False
        if not self._pending:
            self._idle.set()
        if not self.dedicated and not self.scheduler.queued:
            return
        for sched in self.schedulers:
            if not sched.queued:
                continue
            plan = sched.schedule(time.monotonic(), self.pool.held, self._admit)
            for a in plan:
                self._dispatch(a.job, a.device)
            for r in plan.rejected:
                p = self._pending.get(r.job.id)
                if p is not None:
                    self._finish_unrun(p, r.error)
                    if self._unpark(self.tenants[p.job.tenant]):
                        self._pump()

    def _admit(self, job: Job, device: str) -> bool:
        """Ask the pool for the graph's memory on ``device``; commits what it answers."""
        p = self._pending[job.id]
        if not p.residents and not p.prepared.template.device_bytes:
            return True  # needs no device memory: nothing to account or evict
        now = time.monotonic()
        adm = self.pool.plan_admit(device, job.tenant, {r.gid: r.nbytes for r in p.residents},
                                   p.prepared.template.device_bytes, now)
        if adm is None:
            return False
        self.pool.commit(adm, now)
        p.admission = adm
        return True

    def _dispatch(self, job: Job, device: str) -> None:
        p = self._pending[job.id]
        w = self.workers[device]
        p.dispatched = time.monotonic()
        self.tenants[job.tenant].waiting -= 1
        adm = p.admission
        for ev in adm.evict if adm is not None else ():
            rec = self.residents.get(ev.resident)
            if rec is not None:
                rec.devices.discard(ev.device)
            ew = self.workers[ev.device]
            if ew.alive:
                ew.send_cb(WEvictResident(ew.next_seq(), ev.resident), _ignore)
            self.stats["evictions"] += 1
        for rid, _ in adm.put if adm is not None else ((r.gid, r.nbytes) for r in p.residents):
            r = self.residents[rid]
            if device not in r.devices:
                r.devices.add(device)
                w.send_cb(WPutResident(w.next_seq(), r.gid, r.nbytes), functools.partial(self._put_done, r, device),
                          r.fd)
                self.stats["resident_puts"] += 1
                self.metrics.tenant(r.tenant).copied(bytes_in=r.nbytes)
        limit = min(p.deadline, self.config.max_graph_seconds) if p.deadline > 0 else self.config.max_graph_seconds
        p.worker, p.limit = w, limit
        self._running[job.id] = p
        if not self._sweeping:
            self._sweeping = True
            asyncio.get_running_loop().call_later(_SWEEP_EVERY, self._sweep)
        if p.trace is not None:
            p.trace.append(time.perf_counter())
        pr = p.prepared
        if pr.gid not in w.prepared:
            w.prepared.add(pr.gid)
            t = pr.template
            w.send_cb(WPrepare(w.next_seq(), pr.gid, t.graph, t.literal_slots), _ignore)
        w.send_run(WRun(w.next_seq(), pr.gid, p.slices, p.values, limit, job.priority, p.trace is not None),
                   pr.run_st, functools.partial(self._graph_done, job.id, device))

    def _sweep(self) -> None:
        """Kill the workers of graphs past their deadline (checked every _SWEEP_EVERY seconds)."""
        now = time.monotonic()
        for p in list(self._running.values()):
            if p.worker is not None and now >= p.dispatched + p.limit + _DEADLINE_GRACE:
                self._deadline_passed(p.job.id, p.worker, p.limit)
        if self._running:
            asyncio.get_running_loop().call_later(_SWEEP_EVERY, self._sweep)
        else:
            self._sweeping = False

    def _deadline_passed(self, job_id: int, w: WorkerHandle, limit: float) -> None:
        """A kernel cannot be stopped from inside its process: the worker goes, innocents replay."""
        p = self._pending.get(job_id)
        if p is None or p.worker is not w or not w.alive:
            return
        p.verdict = "culprit"
        p.culprit = errors.DeadlineExceeded(
            f"graph ({_kernel_names(p)}) ran past its deadline of {limit:g} s on {w.device}; the device worker "
            "was restarted", detail={"deadline": limit, "device": w.device})
        log.warning("deadline_kill", device=w.device, tenant=p.job.tenant, deadline=limit)
        w.kill(f"a graph ran past its deadline of {limit:g} s")

    def _put_done(self, rec: ResidentRecord, device: str, outcome: WReply | errors.KaasError) -> None:
        if isinstance(outcome, errors.KaasError) or outcome.code:
            rec.devices.discard(device)
            self.pool.remove(device, rec.gid)

    def _graph_done(self, job_id: int, device: str, outcome: WReply | errors.KaasError) -> None:
        p = self._pending.pop(job_id, None)
        now = time.monotonic()
        reply = outcome if isinstance(outcome, WReply) else None
        if p is not None and reply is not None and not reply.code:
            self._graph_succeeded(p, device, reply, now)
            return
        device_time = reply.timings.kernels if reply is not None and reply.timings is not None else 0.0
        self._sched_of(device).complete(job_id, now, device_time)
        self._running.pop(job_id, None)
        if p is not None and p.admission is not None:
            self.pool.release(p.admission)
            p.admission = None
        if p is not None and (reply is None or reply.code) and self._replay(p, reply, now):
            self._pump()
            return
        st = self.tenants.get(p.job.tenant) if p is not None else None
        if p is not None:
            if st is not None and p.in_sched:
                st.in_sched -= 1
                p.in_sched = False
                self._unpark(st)
            self._release_uses(p)
            tm = self.metrics.tenant(p.job.tenant)
            if reply is not None and not reply.code:
                t = reply.timings or Timings()
                self.stats["graphs"] += 1
                if st is not None:
                    st.graphs += 1
                    st.device_seconds += t.kernels
                tm.graph_done(device, now - p.submitted, t.kernels, p.prepared.template.input_bytes,
                              p.prepared.template.output_bytes)
                trace = (*p.trace, *reply.trace, time.perf_counter()) if p.trace and reply.trace else ()
                p.on_done(GraphResult(device, Timings(
                    queued=p.dispatched - p.submitted, copy_in=t.copy_in, kernels=t.kernels,
                    copy_out=t.copy_out, total=now - p.submitted), trace))
            else:
                self.stats["graph_errors"] += 1
                tm.charge(device, device_time)
                err = (errors.from_wire(reply.code, reply.message, reply.detail) if reply is not None
                       else outcome if isinstance(outcome, errors.KaasError)
                       else errors.InternalError("graph ended without a result"))
                if p.verdict == "culprit" and p.culprit is not None:
                    err = p.culprit
                if isinstance(err, errors.DeadlineExceeded):
                    self.stats["deadline_kills"] += 1  # by the broker's timer or the worker's own check
                kernel = err.detail.get("kernel")
                if isinstance(err, (errors.KernelFault, errors.DeadlineExceeded)) and kernel \
                        and str(kernel) not in err.message:
                    err = type(err)(f"kernel {kernel!r}: {err.message}", detail=err.detail)
                if p.verdict == "culprit" or isinstance(err, (errors.KernelFault, errors.DeadlineExceeded)):
                    self._strike(p, err)
                p.on_done(err)
        self._pump()
        self._kick(now)

    def _graph_succeeded(self, p: _Pending, device: str, reply: WReply, now: float) -> None:
        """The common case, kept short: the tenant hears first, the books are kept after."""
        t = reply.timings or _NO_TIMINGS
        trace = (*p.trace, *reply.trace, time.perf_counter()) if p.trace and reply.trace else ()
        p.on_done(GraphResult(device, Timings(p.dispatched - p.submitted, t.copy_in, t.kernels, t.copy_out,
                                              now - p.submitted), trace))
        job = p.job
        self._sched_of(device).complete(job.id, now, t.kernels)
        self._running.pop(job.id, None)
        if p.admission is not None:
            self.pool.release(p.admission)
            p.admission = None
        st = self.tenants.get(job.tenant)
        if st is not None:
            if p.in_sched:
                st.in_sched -= 1
                p.in_sched = False
                if st.parked:
                    self._unpark(st)
            st.graphs += 1
            st.device_seconds += t.kernels
        self._release_uses(p)
        self.stats["graphs"] += 1
        tpl = p.prepared.template
        self.metrics.tenant(job.tenant).graph_done(device, now - p.submitted, t.kernels, tpl.input_bytes,
                                                   tpl.output_bytes)
        self._pump()
        self._kick(now)

    def _replay(self, p: _Pending, reply: WReply | None, now: float) -> bool:
        """Queue an innocent (or suspect) graph again after a fault that was not its own."""
        verdict = p.verdict
        if reply is not None:
            if reply.code == errors.KernelFault.code and reply.detail.get("ambiguous"):
                verdict = "suspect"  # a sticky fault shows on every graph in flight: find which alone
            elif reply.code == errors.WorkerLost.code and reply.detail.get("started") is False:
                verdict = "innocent"
        if verdict not in ("innocent", "suspect") or p.attempts >= self.config.replay_attempts:
            return False
        p.attempts += 1
        p.verdict, p.culprit, p.worker, p.dispatched = "", None, None, 0.0
        p.job.device = None
        self._pending[p.job.id] = p
        if p.job.tenant in self.tenants:
            self.tenants[p.job.tenant].waiting += 1
        self._sched_for(p.job.tenant).requeue(p.job, isolate=verdict == "suspect")
        self.stats["replays"] += 1
        log.info("graph_replayed", tenant=p.job.tenant, attempt=p.attempts, isolated=verdict == "suspect")
        return True

    def _strike(self, p: _Pending, err: errors.KaasError) -> None:
        """Count a fault against the kernels that caused it; quarantine repeat offenders."""
        kernels = set(p.prepared.template.kernel_keys)
        named = err.detail.get("kernel")
        if named:
            kernels = {lk for lk in kernels if lk[1] == named} or kernels
        for lib, name in kernels:
            key = (p.job.tenant, lib, name)
            n = self.strikes[key] = self.strikes.get(key, 0) + 1
            if n >= self.config.quarantine_after and key not in self.quarantined:
                self.quarantined[key] = time.time()
                log.warning("kernel_quarantined", tenant=p.job.tenant, library=lib[:16], kernel=name, faults=n)

    def check_quarantine(self, tenant: str, template: Template) -> None:
        if not self.quarantined:
            return
        for lib, name in template.kernel_keys:
            if (tenant, lib, name) in self.quarantined:
                raise errors.Quarantined(
                    f"kernel {name!r} faulted {self.strikes[(tenant, lib, name)]} times and is "
                    "quarantined for this tenant until an administrator clears it",
                    detail={"kernel": name, "library": lib})

    def clear_quarantine(self, tenant: str | None = None) -> int:
        """Lift quarantines (of one tenant, or all); returns how many were lifted."""
        keys = [k for k in self.quarantined if tenant is None or k[0] == tenant]
        for k in keys:
            del self.quarantined[k]
            self.strikes.pop(k, None)
        return len(keys)

    def _release_uses(self, p: _Pending) -> None:
        pr = p.prepared
        pr.inflight -= 1
        if pr.released and pr.inflight == 0:
            self._forget_prepared(pr)
        for a in p.arenas:
            self._arena_done(a)
        for r in p.residents:
            r.inflight -= 1
            if r.released and r.inflight == 0:
                self._forget_resident(r)

    def _arena_done(self, a: ArenaRecord) -> None:
        a.inflight -= 1
        if a.inflight == 0:
            a.idle.set()
