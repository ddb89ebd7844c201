"""The state the engine's parts share, declared once so that each part is type-checked alone.

``Engine`` (``broker/engine.py``) is built from three parts of one concept each:
``Registry`` (``broker/registry.py``: arenas, libraries, residents, prepared graphs, tenants),
``Dispatch`` (``broker/dispatch.py``: submit, schedule, place, complete: the hot path) and
``Supervision`` (``broker/supervision.py``: worker death, verdicts, replay, quarantine,
respawn).  ``Engine.__init__`` sets every attribute below; the parts read and write them.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .config import Config
from .metrics import Metrics
from .pool.residency import Pool
from .scheduler import Scheduler
from .session_rings import RingHub
from .workers import WorkerHandle

if TYPE_CHECKING:
    from .dispatch import _Pending
    from .errors import KaasError
    from .registry import ArenaRecord, LibraryRecord, PreparedRecord, ResidentRecord, TenantState
    from .streams.wire import WReply


class EngineBase:
    config: Config
    metrics: Metrics
    devices: list[str]
    hub: RingHub
    workers: dict[str, WorkerHandle]
    scheduler: Scheduler                 # the shared workers
    dedicated: dict[str, Scheduler]      # tenant -> its own workers' scheduler
    pool: Pool
    arenas: dict[int, ArenaRecord]
    libraries: dict[str, LibraryRecord]
    residents: dict[int, ResidentRecord]
    tenants: dict[str, TenantState]
    stats: dict[str, int]
    strikes: dict[tuple[str, str, str], int]       # (tenant, library, kernel) -> faults
    quarantined: dict[tuple[str, str, str], float]  # -> since (time.time())
    accepting: bool
    reload_hook: Callable[[], Awaitable[str]] | None
    spin: float
    client_spin: float
    spin_hint: int                       # tenants' busy-poll (us) the ring headers advise now
    fd_budget: int
    tenant_arena_limit: int
    _pending: dict[int, _Pending]
    _running: dict[int, _Pending]
    _respawns: dict[str, asyncio.Task[None]]
    _ids: itertools.count[int]
    _stopping: bool
    _idle: asyncio.Event
    _batching: bool
    _pump_due: bool
    _spinning: bool
    _spin_until: float
    _sweeping: bool
    # the direct path (broker/leases.py)
    leases: dict[int, Any]               # session id -> Lease
    _leases_by_id: dict[int, Any]
    lease_hosts: dict[int, Any]          # session id -> the session (a LeaseHost), once its rings are open
    _lease_ids: itertools.count[int]
    _streaks: dict[int, Any]             # session id -> its streak on the broker's path (leases._Streak)
    _last_runner: int
    _mixed_at: float
    _stuck_until: float
    _lease_sweeping: bool

    if TYPE_CHECKING:  # what one part calls of another (defined in engine.py, registry.py, dispatch.py,
        # supervision.py); declared here so each part type-checks on its own
        @property
        def schedulers(self) -> list[Scheduler]: ...
        def _new_worker(self, device: str) -> WorkerHandle: ...
        def _sched_for(self, tenant: str) -> Scheduler: ...
        def _sched_of(self, device: str) -> Scheduler: ...
        def _serves(self, w: WorkerHandle, tenant: TenantState | None) -> bool: ...
        async def _pin_on(self, w: WorkerHandle, rec: ArenaRecord) -> None: ...
        def _arena_done(self, a: ArenaRecord) -> None: ...
        def _forget_resident(self, rec: ResidentRecord) -> None: ...
        def _forget_prepared(self, rec: PreparedRecord) -> None: ...
        def _pump(self) -> None: ...
        def _unpark(self, st: TenantState) -> bool: ...
        def _open_dedicated(self, st: TenantState) -> None: ...
        def _place(self, adm: Any, device: str, residents: tuple[ResidentRecord, ...]) -> None: ...
        def strike(self, tenant: str, template: Any, err: KaasError) -> None: ...
        def _note_run(self, session: int, now: float) -> None: ...
        def _run_succeeded(self, session: int, device: str) -> None: ...
        def _leases_lost(self, worker: WorkerHandle) -> None: ...
        def revoke_where(self, *, device: str = "", tenant: str = "") -> None: ...
        async def _close_dedicated(self, name: str) -> None: ...
        def _deadline_passed(self, job_id: int, w: WorkerHandle, limit: float) -> None: ...
        def _replay(self, p: _Pending, reply: WReply | None, now: float) -> bool: ...
        def _strike(self, p: _Pending, err: KaasError) -> None: ...
