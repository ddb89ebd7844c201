"""The engine's hot path: submit, schedule, place, dispatch, complete.

A run arrives checked (``broker.graph.bind``); ``submit`` queues it under its tenant's
backpressure, ``_pump`` asks the scheduler for a plan and dispatches it (the prepared graph to a
worker that lacks it, then the run record on the worker's ring), and ``_graph_done`` folds the
result back: the tenant hears first, then the books are kept.  While work arrives the event
loop spins (``_kick``) and polls every ring in batches (``_batched``: one scheduling pass per
batch).  A deadline sweep checks the graphs on devices ten times a second.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from . import errors
from .engine_base import EngineBase
from .pool.residency import Admission
from .protocol import Timings
from .records import policy_deadline, run_limit
from .registry import ArenaRecord, PreparedRecord, ResidentRecord, TenantState, _ignore
from .scheduler import LATENCY, Job
from .streams.wire import (
    WEvictResident,
    WPrepare,
    WPutResident,
    WReply,
    WRun,
)
from .workers import WorkerHandle

log = structlog.get_logger("kaas.engine")

_DEADLINE_GRACE = 0.5  # seconds past a graph's deadline before the broker kills its worker
_SWEEP_EVERY = 0.1     # how often graphs on devices are checked against their deadlines
_NO_TIMINGS = Timings()


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
    isolated: bool = False                 # replayed alone, as a suspect: if its worker dies now, it did it


class Dispatch(EngineBase):
    """Graphs from submission to result."""

    # -- graphs ----------------------------------------------------------------------------
    def submit(self, *, tenant: str, session: int, prepared: PreparedRecord, slices: tuple[int, ...],
               values: tuple[int | float, ...], arenas: tuple[int, ...], timeout: float,
               on_done: Callable[[GraphResult | errors.KaasError], None], priority: int = 0,
               trace_from: float = 0.0, replay: str = "") -> int:
        """Queue a run of a prepared graph with checked bindings (``arenas``: the global arena id
        of each arena buffer); ``on_done`` gets its result or typed error, exactly once.

        ``replay``: the run was taken by a device worker that died (the direct path): "suspect" runs
        it alone, "innocent" ahead of new work, as replays on this path are."""
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
        deadline = policy_deadline(timeout, pol.max_graph_seconds)
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
        self._note_run(session, now)
        if replay:
            p.attempts = 1
            p.isolated = replay == "suspect"
            st.in_sched += 1
            p.in_sched = True
            self._sched_for(tenant).requeue(job, isolate=p.isolated)
            self.stats["replays"] += 1
            self._pump()
        elif st.in_sched < pol.max_inflight:
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
        self._place(p.admission, device, p.residents)
        limit = run_limit(p.deadline, 0.0, self.config.max_graph_seconds)
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

    def _place(self, adm: Admission | None, device: str, residents: tuple[ResidentRecord, ...]) -> None:
        """Carry out an admission on the workers: its evictions, then the copies of the residents
        ``device`` lacks (all of ``residents`` when there is no admission: nothing to account)."""
        w = self.workers[device]
        for ev in adm.evict if adm is not None else ():
            rec = self.residents.get(ev.resident)
            if rec is not None:
                rec.devices.discard(ev.device)
            ew = self.workers[ev.device]
            if ew.alive:
                ew.send_cb(WEvictResident(ew.next_seq(), ev.resident), _ignore)
            self.stats["evictions"] += 1
        for rid, _ in adm.put if adm is not None else ((r.gid, r.nbytes) for r in residents):
            r = self.residents[rid]
            if device not in r.devices:
                r.devices.add(device)
                w.send_cb(WPutResident(w.next_seq(), r.gid, r.nbytes), functools.partial(self._put_done, r, device),
                          r.fd)
                self.stats["resident_puts"] += 1
                self.metrics.tenant(r.tenant).copied(bytes_in=r.nbytes)

    def prefetch(self, tenant: str, rec: ResidentRecord, device: str = "") -> str:
        """Put ``rec`` on ``device`` (or the shared device with the most free memory) ahead of the
        graphs that will use it; returns the device.  It is then resident like any other: kept
        while used, evicted (least recently used first) when room is needed."""
        if tenant in self.dedicated:
            raise errors.InvalidArgument("prefetch places residents on shared devices; this tenant's graphs run "
                                         "on its dedicated workers")
        if device and device not in self.devices:
            raise errors.InvalidArgument(f"no shared device {device!r} (devices: {', '.join(self.devices)})")
        sched = self.scheduler
        shared = [d for d in self.devices if self.workers[d].alive and d not in sched.down and d not in sched.drained]
        if not shared:
            raise errors.NoDevice("no device worker is running")
        if device and device not in shared:
            raise errors.NoDevice(f"device {device} is down or drained now", detail={"device": device})
        held = [d for d in rec.devices if d in shared]
        if held and (not device or device in held):
            return device or held[0]
        where = device or max(shared, key=lambda d: self.pool.capacity(d) - self.pool.used(d))
        now = time.monotonic()
        adm = self.pool.plan_admit(where, tenant, {rec.gid: rec.nbytes}, 0, now)
        if adm is None:
            raise errors.TooManyRequests(f"the room for {rec.nbytes} bytes on {where} is held by graphs in flight; "
                                         "try again once they end", detail={"device": where})
        self.pool.commit(adm, now)
        self._place(adm, where, (rec,))
        self.pool.release(adm)  # nothing runs with it yet: it stays, unpinned, like one a graph left
        return where

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
        # A failure (or a reply for a graph no longer pending): replay it, or tell the tenant why.
        device_time = reply.timings.kernels if reply is not None and reply.timings is not None else 0.0
        self._sched_of(device).complete(job_id, now, device_time)
        self._running.pop(job_id, None)
        if p is None:
            self._pump()
            self._kick(now)
            return
        if p.admission is not None:
            self.pool.release(p.admission)
            p.admission = None
        if self._replay(p, reply, now):
            self._pump()
            return
        st = self.tenants.get(p.job.tenant)
        if st is not None and p.in_sched:
            st.in_sched -= 1
            p.in_sched = False
            self._unpark(st)
        self._release_uses(p)
        self.stats["graph_errors"] += 1
        self.metrics.tenant(p.job.tenant).charge(device, device_time)
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
        if self.config.direct_after:
            self._run_succeeded(job.session, device)
        self._pump()
        self._kick(now)

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
