"""The direct path, broker side: leases that take the broker off a busy session's hot path.

A run through the broker crosses four ring hops (tenant -> broker -> worker -> broker -> tenant)
and twenty-odd Python functions in between.  A session whose last ``config.direct_after`` runs
on one device succeeded, over at least 50 ms, gets a *lease*: a device worker reads the session's
run ring itself and posts completions on the session's ring 2 (``broker/streams/direct.py``), two
hops in all.  Many sessions hold leases at once (``config.shared_leases``).  The broker keeps every
decision that is not a fast accept:

- **Tables.** The lease carries the session's arenas and prepared graphs (global ids, what a
  binding is checked against); what the session registers while leased is added before the
  tenant hears of it; anything it releases ends the lease first.
- **Memory.** The graphs' residents and temps are admitted once for the lease (held until it ends).
- **Policy.** Each worker orders its leases by weighted fair share of device time, by tenant,
  with the latency class first within a lag, as the broker's scheduler does; it puts at most the
  device's lane count of direct runs on it, so what waits is ordered there, and a lease takes at
  most the tenant's ``max_inflight`` runs at once.  A session the broker cannot lease (no rings,
  no memory for its graphs now) that stays busy on the broker's path ends every lease, and none
  is granted while it runs: the broker's scheduler orders everyone again (``_note_run``).
  Without shared leases, any other session's run ends a lease.
- **Anything but a success** comes back as a ``WEscalate`` and goes down the broker's path:
  a record that did not check out is run (or refused, with the broker's error text), a fault is
  replayed as a suspect or told to the tenant, a completion that found ring 2 full is delivered.
- **Deadlines and accounting** come from the lease page (``broker/lease_page.py``), read ten
  times a second: totals are folded into the tenant's books, and a run past its deadline gets its
  worker killed like any other.
- **A worker's death** ends its leases: runs it took and did not finish are still in the ring's
  slots (its tail is held at the first unfinished one) and are replayed, with the same verdicts
  as graphs on the broker's path; a completion marked but not posted is delivered.  Then the
  broker reads the ring again from where the worker stopped.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import mmap
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from . import errors
from .engine_base import EngineBase
from .graph import Template
from .lease_page import DEADLINE, ESCALATED, FINISHED, GRAPHS, OLDEST, POSTED, SECONDS, TAKEN, LeasePage, create_page
from .pool.residency import Admission
from .protocol import Timings
from .records import decode_run, run_limit
from .registry import ArenaRecord, PreparedRecord, ResidentRecord
from .scheduler import LATENCY
from .session_rings import SessionRings
from .streams.wire import LeaseHandle, WEscalate, WLease, WLeaseAdd, WLeaseBroken, WPrepare, WReply, WRevoke
from .workers import WorkerHandle

log = structlog.get_logger("kaas.leases")

_SWEEP_EVERY = 0.1     # lease pages are read this often (deadlines, totals)
_QUIET = 0.05          # seconds without another session's run before a lease (a tenant that paused is not gone)
_DEADLINE_GRACE = 0.5  # as for graphs on the broker's path
_STUCK = 0.25          # a session busy this long on the broker's path, refused a lease, ends the others' leases


@dataclass(eq=False)
class _Streak:
    """One session's runs on the broker's path since it was last leased."""

    since: float             # the first of them
    runs: int = 0
    busy_since: float = 0.0  # the first after its last pause of more than _QUIET
    last: float = 0.0
    device: str = ""         # the device its last success ran on,
    on_device: int = 0       # and how many in a row ran there
    refused: bool = False    # the broker could not lease it (no rings, no memory for it now, ...)
    leased: bool = False     # its lease just ended (the device's events, a release): back at its next success


class LeaseHost(Protocol):
    """The session side of a lease (``broker.session.Session``)."""

    id: int
    rings: SessionRings | None

    def lease_tables(self) -> tuple[str, tuple[tuple[int, ArenaRecord], ...],
                                    tuple[tuple[int, PreparedRecord], ...]] | None: ...

    def run_escalated(self, rec: bytes, replay: str) -> None: ...

    def deliver_direct(self, rec: bytes, device: str, timings: Timings) -> None: ...

    def fail_direct(self, rec: bytes, err: errors.KaasError) -> None: ...

    def rings_broken(self, reason: str) -> None: ...


@dataclass(eq=False)
class Lease:
    id: int
    host: LeaseHost
    tenant: str
    device: str
    worker: WorkerHandle
    page: LeasePage
    page_mm: mmap.mmap
    slots: int
    state: str = "granting"  # granting | active | revoking | ended
    admission: Admission | None = None
    residents: frozenset[int] = frozenset()  # resident gids the admission holds
    device_bytes: int = 0                   # temps the admission holds, per lane
    escalated: set[int] = field(default_factory=set)  # positions handed over (deduped against a harvest)
    graphs: int = 0        # totals folded into the tenant's books so far
    seconds: float = 0.0
    culprit: int = -1      # ring position of a run past its deadline (its worker was killed for it)
    ended: asyncio.Event = field(default_factory=asyncio.Event)


def _handle(h: int, rec: PreparedRecord) -> LeaseHandle:
    t = rec.template
    return LeaseHandle(h, rec.gid, tuple((nbytes, itemsize) for _, nbytes, itemsize in t.arena_buffers),
                       t.literal_kinds, t.literal_values)


class Leases(EngineBase):
    """Grant, extend, revoke and recover leases (state declared in ``EngineBase``)."""

    # -- when ---------------------------------------------------------------------------------
    def _note_run(self, session: int, now: float) -> None:
        """A run came down the broker's path: count the session's streak.  Without shared leases,
        another session's run ends every lease; with them, only a session that stays on the broker's
        path does (one that could not be leased: its runs and the leased ones are ordered by the
        broker's scheduler again, so fair shares hold)."""
        if session in self.leases:
            return  # a leased session's escalated or replayed run
        s = self._streaks.get(session)
        if s is None:
            s = self._streaks[session] = _Streak(now)
        s.runs += 1
        if now - s.last > _QUIET:
            s.busy_since = now  # it paused: a session that runs now and then is never stuck
        s.last = now
        if not self.config.shared_leases:
            if session != self._last_runner:
                self._last_runner, self._mixed_at = session, now
                for lease in list(self.leases.values()):
                    self.revoke_lease(lease)
            return
        if s.refused and now - s.busy_since > _STUCK:
            self._stuck_until = now + _QUIET  # no leases for others while it runs on the broker's path
            if self.leases:
                log.info("leases_revoked", session=session, reason="a busy session is not leased")
                for lease in list(self.leases.values()):
                    self.revoke_lease(lease)

    def _run_succeeded(self, session: int, device: str) -> None:
        """A run of ``session`` succeeded on ``device`` on the broker's path: grant a lease if its streak says so."""
        s = self._streaks.get(session)
        if s is None:
            return
        if device != s.device:  # a session spread over several devices keeps them all
            s.device, s.on_device = device, 0
            return
        s.on_device += 1
        n = self.config.direct_after
        if not n or session in self.leases or self._stopping or "#" in device:
            return
        now = time.monotonic()
        if s.leased:
            pass  # it was busy on the direct path a moment ago: no new streak to wait for
        elif s.on_device < n or s.runs < n or now - s.since < _QUIET:
            return
        if self.config.shared_leases:
            if now < self._stuck_until and not s.refused:
                return  # a session the broker could not lease is busy: nobody else gets one meanwhile
        else:
            if now - self._mixed_at < _QUIET:
                return  # another session ran lately
            for p in self._pending.values():  # nobody else's graph is queued or running (one may wait
                if p.job.session != session:   # behind this session's: it submitted nothing meanwhile)
                    return
        host = self.lease_hosts.get(session)  # (none: a session without rings)
        if host is None or self._grant(host, device) == "refused":
            s.refused = True  # (one with no rings, or whose memory does not fit now; it tries again)

    def session_gone(self, session: int) -> None:
        """``session`` closed: forget its streak."""
        self._streaks.pop(session, None)

    # -- grant --------------------------------------------------------------------------------
    def _grant(self, host: LeaseHost, device: str) -> str:
        """Lease ``host``'s rings on ``device``: "granted", "later" (the device cannot take one now),
        or "refused" (the session cannot be leased: no rings, or no memory for its graphs now)."""
        rings = host.rings
        w = self.workers.get(device)
        sched = self.scheduler
        if rings is None or not rings.open or rings.broken:
            return "refused"
        if (rings.paused or w is None or not w.alive or device in sched.down or device in sched.drained
                or sched.isolating):
            return "later"  # (while suspects are replayed alone, nothing may run beside them)
        tables = host.lease_tables()
        if tables is None:
            return "later"  # (a release is under way)
        tenant, arenas, prepared = tables
        st = self.tenants.get(tenant)
        if st is None:
            return "later"
        residents: dict[int, ResidentRecord] = {}
        device_bytes = 0
        for _, pr in prepared:
            residents.update((r.gid, r) for r in pr.residents)
            device_bytes = max(device_bytes, pr.template.device_bytes)
        inflight = max(1, min(st.policy.max_inflight, sched.lanes[device]))
        adm = None
        if residents or device_bytes:
            now = time.monotonic()
            adm = self.pool.plan_admit(device, tenant, {g: r.nbytes for g, r in residents.items()},
                                       device_bytes * inflight, now)
            if adm is None:
                return "refused"  # no room now: the broker's path waits for it run by run
            self.pool.commit(adm, now)
            self._place(adm, device, tuple(residents.values()))
        for _, pr in prepared:
            self._prepare_on(w, pr)
        geom = rings.geom
        page_fd, page_mm = create_page(geom.slots)
        lease = Lease(next(self._lease_ids), host, tenant, device, w, LeasePage(page_mm, geom.slots), page_mm,
                      geom.slots, admission=adm, residents=frozenset(residents), device_bytes=device_bytes)
        run_tail = rings.pause()
        lease.page.q[TAKEN] = lease.page.q[FINISHED] = run_tail  # what a harvest reads if the worker never starts
        lease.page.q[POSTED] = rings.done_head
        pol = st.policy
        cmd = WLease(w.next_seq(), lease.id, geom.slots, geom.slot_size, geom.rings, run_tail, rings.done_head,
                     self.devices.index(device), 0, LATENCY if pol.priority == "latency" else 0, inflight,
                     pol.max_graph_seconds, self.config.max_graph_seconds,
                     tuple((local, a.gid, a.size) for local, a in arenas), tuple(_handle(h, pr) for h, pr in prepared),
                     spin_us=round(max(self.spin, self.config.spin("worker_spin_us", self.devices)) * 1e6),
                     flow=tenant, weight=pol.weight, device_inflight=sched.lanes[device])
        self.leases[host.id] = lease
        self._leases_by_id[lease.id] = lease
        try:
            w.send_cb(cmd, functools.partial(self._granted, lease), [*rings.handover(), page_fd])
        finally:
            os.close(page_fd)
        self.stats["leases"] += 1
        log.info("lease_granted", tenant=tenant, session=host.id, device=device, lease=lease.id)
        if not self._lease_sweeping:
            self._lease_sweeping = True
            asyncio.get_running_loop().call_later(_SWEEP_EVERY, self._lease_sweep)
        return "granted"

    def _prepare_on(self, w: WorkerHandle, pr: PreparedRecord) -> None:
        if pr.gid not in w.prepared:
            w.prepared.add(pr.gid)
            t = pr.template
            w.send_cb(WPrepare(w.next_seq(), pr.gid, t.graph, t.literal_slots), _ignore)

    def _granted(self, lease: Lease, reply: WReply | errors.KaasError) -> None:
        if lease.state == "ended":
            return
        if isinstance(reply, WReply) and not reply.code:
            if lease.state == "granting":
                lease.state = "active"
            return
        if isinstance(reply, WReply):  # refused (a bad segment?): the broker's path goes on
            log.warning("lease_refused", tenant=lease.tenant, device=lease.device, error=reply.message)
            self._lease_over(lease, int(lease.page.q[TAKEN]), lease.host.rings.done_head if lease.host.rings else 0)
        # WorkerLost: the worker's death ended it already (_leases_lost)

    # -- while it lasts -------------------------------------------------------------------------
    def lease_arena(self, session: int, local: int, rec: ArenaRecord) -> None:
        """A leased session registered an arena: its worker learns of it before the tenant does."""
        lease = self.leases.get(session)
        if lease is not None and lease.state in ("granting", "active"):
            w = lease.worker
            w.send_cb(WLeaseAdd(w.next_seq(), lease.id, arenas=((local, rec.gid, rec.size),)), _ignore)

    def lease_prepared(self, session: int, handle: int, rec: PreparedRecord) -> None:
        """A leased session prepared a graph: its worker gets it, unless it needs memory the lease
        does not hold (then the lease ends and the broker's path runs it)."""
        lease = self.leases.get(session)
        if lease is None or lease.state not in ("granting", "active"):
            return
        if rec.template.device_bytes > lease.device_bytes or any(r.gid not in lease.residents for r in rec.residents):
            self.revoke_lease(lease)
            return
        w = lease.worker
        self._prepare_on(w, rec)
        w.send_cb(WLeaseAdd(w.next_seq(), lease.id, handles=(_handle(handle, rec),)), _ignore)

    def lease_released(self, session: int, handle: int) -> None:
        """A leased session released a prepared graph: its worker stops taking runs of it first."""
        lease = self.leases.get(session)
        if lease is not None and lease.state in ("granting", "active"):
            w = lease.worker
            w.send_cb(WLeaseAdd(w.next_seq(), lease.id, drop=(handle,)), _ignore)

    def revoke_lease(self, lease: Lease) -> None:
        """Ask the worker to end ``lease`` (it answers once the lease's runs have finished)."""
        if lease.state in ("revoking", "ended"):
            return
        lease.state = "revoking"
        w = lease.worker
        w.send_cb(WRevoke(w.next_seq(), lease.id), functools.partial(self._revoked, lease))

    def revoke_where(self, *, device: str = "", tenant: str = "") -> None:
        """End the leases on ``device`` (drained, or a suspect to run alone) or of ``tenant`` (quarantined)."""
        for lease in list(self.leases.values()):
            if (device and lease.device == device) or (tenant and lease.tenant == tenant):
                self.revoke_lease(lease)

    async def end_lease(self, session: int) -> None:
        """End ``session``'s lease, if it has one, and wait until its runs are back with the broker."""
        lease = self.leases.get(session)
        if lease is not None:
            self.revoke_lease(lease)
            await lease.ended.wait()

    def _revoked(self, lease: Lease, reply: WReply | errors.KaasError) -> None:
        if lease.state == "ended":
            return
        if isinstance(reply, WReply) and not reply.code:
            self._lease_over(lease, int(reply.info["taken"]), int(reply.info["done_head"]))
        elif isinstance(reply, WReply):  # the worker lost track of it: treat it as lost with it
            self._harvest(lease)

    def _lease_over(self, lease: Lease, taken: int, done_head: int) -> None:
        """The worker is done with ``lease``: the books, the memory, and the ring back to the broker."""
        lease.state = "ended"
        self._fold(lease)
        # Back on the broker's path: a new streak.  A lease that ended with the session still open
        # (its worker died, its device was drained, a suspect ran alone, it released something) is
        # granted again at the session's next success, so that sessions leased before are not
        # leased again one by one, the least weighted last, while the rest hold the device.
        sid = lease.host.id
        self._streaks.pop(sid, None)
        if self.config.shared_leases and sid in self.lease_hosts:
            self._streaks[sid] = _Streak(time.monotonic(), device=lease.device, leased=True)
        if self.leases.get(lease.host.id) is lease:
            del self.leases[lease.host.id]
        self._leases_by_id.pop(lease.id, None)
        if lease.admission is not None:
            self.pool.release(lease.admission)
            lease.admission = None
        lease.page.close()
        lease.page_mm.close()
        rings = lease.host.rings
        if rings is not None:
            rings.resume(taken, done_head)
        lease.ended.set()
        log.info("lease_ended", tenant=lease.tenant, session=lease.host.id, device=lease.device, lease=lease.id)

    def _fold(self, lease: Lease) -> None:
        """Add what the lease's runs did since the last look to the tenant's books."""
        page = lease.page
        graphs, seconds = int(page.q[GRAPHS]), float(page.d[SECONDS])
        n, s = graphs - lease.graphs, seconds - lease.seconds
        if n <= 0:
            return
        lease.graphs, lease.seconds = graphs, seconds
        st = self.tenants.get(lease.tenant)
        if st is not None:
            st.graphs += n
            st.device_seconds += s
        self.stats["graphs"] += n
        self.stats["direct_runs"] += n
        self.metrics.tenant(lease.tenant).graphs_direct(lease.device, n, s)

    def _lease_sweep(self) -> None:
        """Ten times a second: fold totals, and kill the worker of a run past its deadline."""
        now = time.monotonic()
        for lease in list(self.leases.values()):
            if lease.state == "ended":
                continue
            self._fold(lease)
            page = lease.page
            deadline = float(page.d[DEADLINE])
            if deadline and now >= deadline + _DEADLINE_GRACE and lease.culprit < 0 and lease.worker.alive:
                lease.culprit = int(page.q[OLDEST])
                log.warning("deadline_kill", device=lease.device, tenant=lease.tenant, direct=True)
                lease.worker.kill("a run of a lease ran past its deadline")
                continue
            if lease.escalated:
                finished = int(page.q[FINISHED])
                lease.escalated = {p for p in lease.escalated if p >= finished}
        if self.leases:
            asyncio.get_running_loop().call_later(_SWEEP_EVERY, self._lease_sweep)
        else:
            self._lease_sweeping = False

    # -- what the worker hands back ------------------------------------------------------------
    def _worker_event(self, worker: WorkerHandle, ev: Any) -> None:
        if isinstance(ev, WEscalate):
            lease = self._leases_by_id.get(ev.lease)
            if lease is None or lease.worker is not worker:
                log.warning("escalation_dropped", lease=ev.lease, device=worker.device)
                return
            lease.escalated.add(ev.position)
            # Acted on from the loop: this may run while the worker's death is being read (its last
            # frames come before the harvest), and the broker's path must see the device down by then.
            asyncio.get_running_loop().call_soon(self._escalated, lease, ev)
        elif isinstance(ev, WLeaseBroken):
            lease = self._leases_by_id.get(ev.lease)
            if lease is not None and lease.worker is worker:
                lease.host.rings_broken(ev.reason)

    def _escalated(self, lease: Lease, ev: WEscalate) -> None:
        host = lease.host
        if not ev.code and ev.timings is not None:
            host.deliver_direct(ev.record, lease.device, ev.timings)
        elif not ev.code:
            host.run_escalated(ev.record, "")
        elif ev.code == errors.WorkerLost.code and ev.detail.get("started") is False:
            host.run_escalated(ev.record, "innocent")  # a sticky fault came before it reached the device
        elif ((ev.code == errors.KernelFault.code and ev.detail.get("ambiguous"))
              or ev.code == errors.WorkerLost.code):
            host.run_escalated(ev.record, "suspect")  # which graph it was is found alone, as on the broker's path
        else:
            host.fail_direct(ev.record, errors.from_wire(ev.code, ev.message, ev.detail))

    def direct_delivered(self, tenant: str, device: str, timings: Timings) -> None:
        """A direct run the broker delivered (ring 2 was full, or its worker died before posting it):
        charged like the rest."""
        st = self.tenants.get(tenant)
        if st is not None:
            st.graphs += 1
            st.device_seconds += timings.kernels
        self.stats["graphs"] += 1
        self.stats["direct_runs"] += 1
        self.metrics.tenant(tenant).graphs_direct(device, 1, timings.kernels)

    def direct_failed(self, tenant: str, template: Template, err: errors.KaasError) -> errors.KaasError:
        """A direct run failed on the device: count it, strike its kernels, name the kernel."""
        self.stats["graph_errors"] += 1
        kernel = err.detail.get("kernel")
        if isinstance(err, (errors.KernelFault, errors.DeadlineExceeded)):
            if isinstance(err, errors.DeadlineExceeded):
                self.stats["deadline_kills"] += 1
            if kernel and str(kernel) not in err.message:
                err = type(err)(f"kernel {kernel!r}: {err.message}", detail=err.detail)
            self.strike(tenant, template, err)
        return err

    # -- a worker's death ---------------------------------------------------------------------
    def _leases_lost(self, worker: WorkerHandle) -> None:
        """``worker`` died: end its leases, replaying what they took and did not finish."""
        for lease in [x for x in self.leases.values() if x.worker is worker and x.state != "ended"]:
            self._harvest(lease)

    def _harvest(self, lease: Lease) -> None:
        host, rings, page = lease.host, lease.host.rings, lease.page
        taken, finished = int(page.q[TAKEN]), int(page.q[FINISHED])
        taken = max(finished, min(taken, finished + lease.slots))
        # Completions the worker pushed: its own count (the page), plus the one it may have pushed
        # just before dying (ring 2's head, which only the tenant could have made wrong).
        head2 = int(page.q[POSTED])
        if rings is not None and rings.direct_published() == head2 + 1:
            head2 += 1
        replay: list[tuple[int, bytes]] = []
        deliver: list[bytes] = []
        for pos in range(finished, taken):
            if pos in lease.escalated:
                continue  # the broker has it (read before this: the worker's last frames come first)
            posted = page.finished(pos)
            if posted is not None and posted != ESCALATED and posted < head2:
                continue  # the tenant has its completion
            rec = rings.record_at(pos) if rings is not None else None
            if rec is None:
                continue
            if posted is not None and posted != ESCALATED:
                deliver.append(rec)  # it succeeded; its completion never reached ring 2
            else:
                replay.append((pos, rec))  # taken and unfinished (or handed over in a frame that was lost)
        poisoned, culprit = lease.worker.poisoned, lease.culprit
        self._lease_over(lease, taken, head2)
        for rec in deliver:
            host.deliver_direct(rec, lease.device, Timings())
        for pos, rec in replay:
            if pos == culprit:
                try:
                    _, _, _, _, _, timeout, *_ = decode_run(rec)
                except errors.KaasError:
                    timeout = 0.0
                st = self.tenants.get(lease.tenant)
                limit = run_limit(timeout, st.policy.max_graph_seconds if st else 0.0, self.config.max_graph_seconds)
                host.fail_direct(rec, errors.DeadlineExceeded(
                    f"graph ran past its deadline of {limit:g} s on {lease.device}; the device worker was restarted",
                    detail={"deadline": limit, "device": lease.device}))
            else:
                # As on the broker's path: after a named culprit, or a sticky fault that answered
                # the graphs it touched, the rest are innocent; otherwise each is a suspect.
                host.run_escalated(rec, "innocent" if culprit >= 0 or poisoned else "suspect")
        if replay or deliver:
            log.info("lease_harvested", tenant=lease.tenant, device=lease.device, replayed=len(replay),
                     delivered=len(deliver))


def _ignore(_: object) -> None:
    pass


def new_lease_state() -> dict[str, Any]:
    """The attributes ``Engine.__init__`` sets for this part."""
    return {"leases": {}, "_leases_by_id": {}, "lease_hosts": {}, "_lease_ids": itertools.count(1),
            "_streaks": {}, "_last_runner": 0, "_mixed_at": 0.0, "_stuck_until": 0.0,
            "_lease_sweeping": False}
