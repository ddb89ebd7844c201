"""The engine: the one loop that ties sessions, the scheduler, residency and device workers.

It keeps every piece of state needed to carry on when a worker dies: arenas (their
fds), libraries (their bytes), residents (a host copy in a broker-owned memfd), and
which graphs are queued or in flight.  Workers hold only what can be replayed.

Its three parts, one concept each: ``Registry`` (``broker/registry.py``), ``Dispatch``
(``broker/dispatch.py``, the hot path) and ``Supervision`` (``broker/supervision.py``); the
state they share is declared in ``broker/engine_base.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from . import errors
from .config import Config
from .dispatch import Dispatch, GraphResult, _Pending
from .leases import Leases, new_lease_state
from .metrics import Metrics
from .pool.residency import Pool
from .registry import (
    LIBRARY_FORMATS,
    MAX_LIBRARY_BYTES,
    ArenaRecord,
    LibraryRecord,
    PreparedRecord,
    Registry,
    ResidentRecord,
    TenantState,
    check_kernel_specs,
    library_digest,
)
from .scheduler import Scheduler
from .session_rings import RingHub
from .supervision import Supervision
from .workers import WorkerHandle

log = structlog.get_logger("kaas.engine")

__all__ = ["Engine", "ArenaRecord", "GraphResult", "LibraryRecord", "PreparedRecord", "ResidentRecord",
           "TenantState", "LIBRARY_FORMATS", "MAX_LIBRARY_BYTES", "check_kernel_specs", "library_digest"]


class Engine(Registry, Dispatch, Supervision, Leases):
    def __init__(self, config: Config, devices: list[str], metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.metrics.max_departed = config.max_departed_tenants
        self.devices = list(devices)
        # Who this broker is, for clients that place work across many (tenantlib.ray): new at each start.
        self.identity = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                         "started": time.time()}
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
                                      "worker_restarts": 0, "respawn_failures": 0, "replays": 0, "deadline_kills": 0, "evictions": 0,
                                      "prepared": 0, "prepared_live": 0, "ring_runs": 0, "library_evictions": 0,
                                      "library_drops": 0, "leases": 0, "direct_runs": 0}
        # The direct path (broker/leases.py): sessions whose runs go straight to a worker.
        for name, value in new_lease_state().items():
            setattr(self, name, value)
        self.strikes: dict[tuple[str, str, str], int] = {}    # (tenant, library, kernel) -> faults
        self.quarantined: dict[tuple[str, str, str], float] = {}  # -> since (time.time())
        self.spin = config.spin("spin_us", devices)
        self.client_spin = config.spin("client_spin_us", devices)
        self.spin_hint = round(self.client_spin * 1e6)  # what each session's ring header advises now
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
        w.on_event = self._worker_event
        return w

    def advise_spin(self) -> None:
        """Advise tenants' busy-poll through their ring headers: the configured client spin while the
        sessions with rings are few (``spinning_tenants``: a quarter of the cores), else none, so that spinning
        tenants never crowd the broker and its workers off the cores (64 tenants on 16 cores: 12%
        more graphs/s with tenants not spinning, bench/RESULTS.md).  Rewritten only when it changes."""
        many = len(self.lease_hosts) > self.config.spinning_sessions()
        hint = 0 if many else round(self.client_spin * 1e6)
        if hint == self.spin_hint:
            return
        self.spin_hint = hint
        for host in self.lease_hosts.values():
            if host.rings is not None and host.rings.open:
                host.rings.completions.set_spin_hint(hint)

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

    def device_archs(self) -> tuple[str, ...]:
        """Per device, the CUDA architecture its worker reported ('' for the CPU device)."""
        archs = (str(self.workers[d].info.get("arch", "")) if d in self.workers else "" for d in self.devices)
        return tuple(a if a.startswith("sm_") else "" for a in archs)

    def device_info(self) -> list[dict[str, Any]]:
        return [dict(w.info, device=d, alive=w.alive, pid=w.pid, running=len(self._sched_of(d).running.get(d, ())),
                     tenant=w.tenant or None) for d, w in self.workers.items()]
