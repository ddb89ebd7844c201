"""The device worker's direct path: runs taken straight from a session's ring, under a lease.

While a session holds a lease (``broker/leases.py`` decides when), the broker is off its hot
path: this worker reads the session's run ring (ring 0 of the session's segment), checks each
run against the tables the lease carries (the session's arenas and prepared graphs, in the
broker's global ids), starts it, and posts its completion on ring 2, which the tenant polls
beside the broker's ring 1.  Two hops instead of four.

Nothing read from the ring is trusted, and nothing here decides what a tenant is told when
something goes wrong: a run this path does not finish itself (a record that does not check
out, an unknown handle, any failure on the device, a full completion ring) goes to the broker
as a ``WEscalate`` with the record, and the broker runs, replays or answers it its own way.
So the checks here are a fast accept, never the source of an error's text.

The lease page (``broker.lease_page``) tells the broker, without a message, what was taken,
what is finished, the oldest run's deadline, and the lease's totals.  Ring 0's tail is held at
the first unfinished record, so after a worker dies its unfinished runs are still in their
slots for the broker to replay; a run that finished is marked before its completion is posted.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import time
from collections.abc import Callable
from typing import Any

from .. import errors
from ..graph import check_literal
from ..lease_page import (
    DEADLINE,
    ESCALATED,
    ESCALATIONS,
    FINISHED,
    GRAPHS,
    OLDEST,
    POSTED,
    SECONDS,
    TAKEN,
    LeasePage,
    page_bytes,
)
from ..records import TRACE, decode_run, encode_done, run_limit, values_struct
from ..ring import Consumer, Producer, RingCorrupt, RingGeometry, map_segment, wake
from .backend import Backend, Completion
from .wire import LeaseHandle, WEscalate, WLease, WLeaseAdd, WLeaseBroken, WReply, WRevoke

DIRECT_TOKEN = 1 << 48  # tokens of direct runs; the broker's command seqs stay below
_TAKE = 32  # records taken from one lease per pass
# Fair share between leases, as the broker's scheduler does it (``broker.scheduler.FairPolicy``):
_MIN_CHARGE = 1e-5   # seconds every run is charged at least
_ESTIMATE = 1e-4     # a new flow's estimate of a run's device time
_SMOOTHING = 0.25
_LATENCY_LAG = 0.01  # a latency-class lease goes first while its start tag is within this of the smallest


class _Flow:
    """One tenant's leases on this worker: a flow of the start-time fair queue."""

    __slots__ = ("finish", "weight", "estimate", "leases")

    def __init__(self, finish: float, weight: float) -> None:
        self.finish = finish     # the tenant's finish tag: device time started, over its weight
        self.weight = weight
        self.estimate = _ESTIMATE
        self.leases = 0


class _Lease:
    """One session's lease on this worker."""

    def __init__(self, cmd: WLease, fds: list[int]) -> None:
        seg, self.wake_fd, self.notify_fd, page_fd = fds
        self.id = cmd.lease
        self.mm: mmap.mmap | None = None
        self.page_mm: mmap.mmap | None = None
        try:
            geom = RingGeometry(cmd.slots, cmd.slot_size, cmd.rings)
            if geom.rings < 3:
                raise RingCorrupt(f"a lease needs a segment of 3 rings, got {geom.rings}")
            self.mm = map_segment(seg, geom)
            self.page_mm = mmap.mmap(page_fd, page_bytes(cmd.slots), mmap.MAP_SHARED,
                                     mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            for fd in (self.wake_fd, self.notify_fd):
                os.close(fd)
            if self.mm is not None:
                self.mm.close()
            raise
        finally:
            os.close(seg)
            os.close(page_fd)
        self.runs = Consumer(self.mm, geom, 0)
        self.runs.start_at(cmd.run_tail)
        self.done = Producer(self.mm, geom, 2)
        self.done.start_at(cmd.done_head)
        self.page = LeasePage(self.page_mm, cmd.slots)
        self.page.q[TAKEN] = self.page.q[FINISHED] = cmd.run_tail
        self.page.q[POSTED] = cmd.done_head
        self.finished = cmd.run_tail
        self.device, self.flags, self.priority = cmd.device, cmd.flags, cmd.priority
        self.max_inflight = max(1, cmd.max_inflight)
        self.max_seconds, self.limit_seconds = cmd.max_seconds, cmd.limit_seconds
        self.spin = cmd.spin_us / 1e6
        self.flow: _Flow | None = None  # set by DirectRuns.install
        self.flow_key = cmd.flow
        self.arenas: dict[int, tuple[int, int]] = {}
        self.handles: dict[int, tuple[int, tuple[tuple[int, int], ...], Any, tuple[str, ...], tuple[Any, ...]]] = {}
        self.add(cmd.arenas, cmd.handles)
        # token -> (position, request id, absolute deadline or 0, record, trace stamps or None,
        #           the device time its flow was charged at the start)
        self.inflight: dict[int, tuple[int, int, float, bytes, list[float] | None, float]] = {}
        self.out_of_order: set[int] = set()  # finished positions past ``finished``
        self.revoke_seq = 0   # a WRevoke waiting for the runs in flight to end
        self.broken = False   # the ring broke its invariants: nothing more is read or posted
        self.posted = False   # completions pushed since the tenant was last checked for sleep

    def add(self, arenas: tuple[tuple[int, int, int], ...], handles: tuple[LeaseHandle, ...],
            drop: tuple[int, ...] = ()) -> None:
        for gone in drop:
            self.handles.pop(gone, None)
        for local, gid, size in arenas:
            self.arenas[local] = (gid, size)
        for h in handles:
            self.handles[h.handle] = (h.gid, h.buffers, values_struct(h.kinds), h.kinds, h.values)

    @property
    def taking(self) -> bool:
        return not self.broken and not self.revoke_seq and len(self.inflight) < self.max_inflight

    def finish(self, position: int) -> None:
        """``position``'s reply is safe (marked, and pushed or handed over): free the ring's slots up to
        the first unfinished record."""
        if position != self.finished:
            self.out_of_order.add(position)
            return
        f = position + 1
        ooo = self.out_of_order
        while f in ooo:
            ooo.discard(f)
            f += 1
        self.finished = f
        self.page.q[FINISHED] = f
        if not self.broken:
            self.runs.publish_tail(f)

    def note_start(self, position: int, deadline: float) -> None:
        """A run with a deadline started: the page's deadline moves only if it is the earliest."""
        current = self.page.d[DEADLINE]
        if not current or deadline < current:
            self.page.q[OLDEST] = position
            self.page.d[DEADLINE] = deadline

    def note_oldest(self) -> None:
        """Keep the page's deadline at the oldest run's (the broker's sweep reads it)."""
        best, where = 0.0, 0
        for pos, _, deadline, _, _, _ in self.inflight.values():
            if deadline and (not best or deadline < best):
                best, where = deadline, pos
        self.page.q[OLDEST] = where
        self.page.d[DEADLINE] = best

    def close(self) -> None:
        self.runs.close()
        self.done.close()
        self.page.close()
        if self.mm is not None:
            self.mm.close()
        if self.page_mm is not None:
            self.page_mm.close()
        for fd in (self.wake_fd, self.notify_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class DirectRuns:
    """Every lease this worker holds.  ``send`` writes a frame to the broker; ``sync`` reads what the
    broker has sent so far (a run may name a handle whose ``WLeaseAdd`` is still on the socket)."""

    def __init__(self, backend: Backend, send: Callable[[Any], None], sync: Callable[[], None]) -> None:
        self.backend = backend
        self.send = send
        self.sync = sync
        self.leases: dict[int, _Lease] = {}
        self._by_token: dict[int, _Lease] = {}
        self._tokens = itertools.count(DIRECT_TOKEN)
        self._taking: _Lease | None = None  # the lease whose records are being started
        self.spin_s = 0.0  # seconds to busy-poll after activity: the most any lease asks (0: none held)
        self._gids: dict[int, int] = {}      # prepared graph -> its direct runs on the device
        self._gid_of: dict[int, int] = {}    # token -> prepared graph
        self.on_gid_idle: Callable[[int], None] = lambda gid: None  # a deferred release may go now
        # Fair share of the device between tenants (a start-time fair queue over flows): it decides
        # only while more runs wait than ``cap`` lets onto the device.
        self.cap = 0           # direct runs on the device at once, over every lease (0: no bound)
        self.on_device = 0     # direct runs on the device
        self.vtime = 0.0       # never decreases; at most the start tag of every waiting flow
        self._flows: dict[str, _Flow] = {}

    # -- commands from the broker ----------------------------------------------------------
    def install(self, cmd: WLease, fds: list[int]) -> None:
        if cmd.lease in self.leases:
            for fd in fds:
                os.close(fd)
            raise errors.InternalError(f"lease {cmd.lease} is held already")
        lease = self.leases[cmd.lease] = _Lease(cmd, fds)
        flow = self._flows.get(cmd.flow)
        if flow is None:  # a tenant new here starts at vtime: no credit banked, no debt
            flow = self._flows[cmd.flow] = _Flow(self.vtime, cmd.weight if cmd.weight > 0 else 1.0)
        flow.leases += 1
        lease.flow = flow
        if cmd.device_inflight > 0:
            self.cap = cmd.device_inflight
        self._spin_changed()

    def add(self, cmd: WLeaseAdd) -> None:
        lease = self.leases.get(cmd.lease)
        if lease is not None:
            lease.add(cmd.arenas, cmd.handles, cmd.drop)

    @property
    def busy(self) -> bool:
        """Whether any direct run is on the device."""
        return bool(self._gids)

    def running(self, gid: int) -> bool:
        """Whether a direct run of prepared graph ``gid`` is on the device (its release must wait)."""
        return self._gids.get(gid, 0) > 0

    def revoke(self, cmd: WRevoke) -> None:
        """Answer now if nothing of the lease is on the device, else when its last run ends."""
        lease = self.leases.get(cmd.lease)
        if lease is None:
            self.send(WReply(cmd.seq, errors.InternalError.code, f"lease {cmd.lease} is not held"))
            return
        lease.revoke_seq = cmd.seq
        if not lease.inflight and lease is not self._taking:  # (else: once its batch is started)
            self._end(lease)

    def _end(self, lease: _Lease) -> None:
        del self.leases[lease.id]
        flow = lease.flow
        if flow is not None:
            flow.leases -= 1
            if not flow.leases:
                del self._flows[lease.flow_key]
        self._spin_changed()
        info = {"taken": lease.runs.tail, "done_head": lease.done.head}
        seq = lease.revoke_seq
        lease.close()
        self.send(WReply(seq, info=info))

    # -- the hot path ---------------------------------------------------------------------
    def ready(self) -> bool:
        if self.cap and self.on_device >= self.cap:
            return False  # the device is full: what waits is taken as runs end
        for lease in self.leases.values():
            if lease.runs.ready() and lease.taking:  # the ring's head word first: the cheaper test
                return True
        return False

    def take(self) -> int:
        """Start what the leases have waiting, as far as the device has room: everything (a bounded
        batch from each lease) when it fits, else run by run to the flow with the smallest start tag.
        Returns how many were taken."""
        room = self.cap - self.on_device if self.cap else _TAKE * len(self.leases)
        waiting = [lease for lease in self.leases.values() if lease.taking and lease.runs.ready()]
        if room <= 0 or not waiting:
            return 0
        if len(waiting) > 1 and self.cap:
            wanted = 0
            for lease in list(waiting):
                try:
                    wanted += min(lease.runs.pending(), lease.max_inflight - len(lease.inflight))
                except RingCorrupt as exc:
                    self._broken(lease, str(exc))
                    waiting.remove(lease)
            if wanted > room:
                return self._take_fairly(waiting, room)
        total = 0
        for lease in waiting:
            total += self._take_from(lease, min(_TAKE, lease.max_inflight - len(lease.inflight), room - total))
            if total >= room:
                break
        return total

    def _take_fairly(self, waiting: list[_Lease], room: int) -> int:
        """More waits than the device has room for: each run to the waiting flow with the smallest start
        tag (``max(vtime, finish)``), a latency-class lease first while within ``_LATENCY_LAG`` of it."""
        total = 0
        while total < room and waiting:
            v = self.vtime
            s_min = min(max(v, lease.flow.finish) for lease in waiting if lease.flow is not None)
            if s_min > v:
                self.vtime = v = s_min
            best, best_key = waiting[0], (True, math.inf)
            for lease in waiting:
                f = lease.flow
                s = max(v, f.finish) if f is not None else v
                key = (not (lease.priority and s <= s_min + _LATENCY_LAG), s)
                if key < best_key:
                    best, best_key = lease, key
            n = self._take_from(best, 1)
            total += n
            if not n or not best.taking or not best.runs.ready():
                waiting.remove(best)
        return total

    def _take_from(self, lease: _Lease, n: int) -> int:
        """Start up to ``n`` of ``lease``'s waiting runs."""
        if n <= 0:
            return 0
        try:
            records = lease.runs.pop_many(n, publish=False)
        except (RingCorrupt, ValueError) as exc:
            self._broken(lease, str(exc))
            return 0
        first = lease.runs.tail - len(records)
        lease.page.q[TAKEN] = lease.runs.tail
        self._taking = lease
        try:
            for i, rec in enumerate(records):
                self._start(lease, first + i, rec)
        finally:
            self._taking = None
        if lease.revoke_seq and not lease.inflight and lease.id in self.leases:
            self._end(lease)  # revoked while its batch was being started
        return len(records)

    def _start(self, lease: _Lease, position: int, rec: bytes) -> None:
        stamp = time.perf_counter()
        if lease.revoke_seq or lease.broken:
            self._escalate(lease, position, rec)
            return
        try:
            req, handle, flags, _, _, timeout, slices, nvalues, at = decode_run(rec)
        except errors.KaasError:
            self._escalate(lease, position, rec)
            return
        h = lease.handles.get(handle)
        if h is None:
            self.sync()  # its WLeaseAdd may be on the socket still
            h = lease.handles.get(handle)
            if h is None or lease.revoke_seq or lease.broken:
                self._escalate(lease, position, rec)
                return
        gid, buffers, vstruct, kinds, defaults = h
        if len(slices) != 2 * len(buffers) or nvalues * 8 != vstruct.size or not timeout >= 0.0:
            self._escalate(lease, position, rec)
            return
        bound: list[int] = []
        arenas = lease.arenas
        for j, (nbytes, itemsize) in enumerate(buffers):
            a = arenas.get(slices[2 * j])
            offset = slices[2 * j + 1]
            if a is None or offset < 0 or offset + nbytes > a[1] or offset % itemsize:
                self._escalate(lease, position, rec)
                return
            bound.append(a[0])
            bound.append(offset)
        values = vstruct.unpack_from(rec, at) if nvalues else ()
        if values != defaults:
            try:
                values = tuple(check_literal("literal", k, v) for k, v in zip(kinds, values, strict=True))
            except errors.KaasError:
                self._escalate(lease, position, rec)
                return
        limit = run_limit(timeout, lease.max_seconds, lease.limit_seconds)
        token = next(self._tokens)
        try:
            self.backend.run(token, gid, tuple(bound), values, limit, lease.priority)
        except Exception:
            self._escalate(lease, position, rec)  # the broker's way gives the error its full text
            return
        trace = [stamp, time.perf_counter()] if flags & TRACE else None
        deadline = time.monotonic() + limit if limit > 0 else 0.0
        flow = lease.flow
        est = 0.0
        if flow is not None:  # charged by its estimate now, by its measured time when it ends
            est = flow.estimate / flow.weight
            f = flow.finish
            flow.finish = (f if f > self.vtime else self.vtime) + est
        self.on_device += 1
        lease.inflight[token] = (position, req, deadline, rec, trace, est)
        self._by_token[token] = lease
        self._gids[gid] = self._gids.get(gid, 0) + 1
        self._gid_of[token] = gid
        if deadline:
            lease.note_start(position, deadline)

    def complete(self, done: list[Completion]) -> None:
        """Finish direct runs: post each completion to its tenant (or hand the run to the broker)."""
        now = time.perf_counter()
        touched: list[_Lease] = []
        for c in done:
            lease = self._by_token.pop(c.token, None)
            if lease is None:
                continue
            gid = self._gid_of.pop(c.token)
            left = self._gids[gid] = self._gids[gid] - 1
            if not left:
                del self._gids[gid]
                self.on_gid_idle(gid)
            position, req, deadline, rec, stamps, est = lease.inflight.pop(c.token)
            self.on_device -= 1
            t = c.timings
            flow = lease.flow
            if flow is not None:
                charge = t.kernels if t is not None and t.kernels > _MIN_CHARGE else _MIN_CHARGE
                flow.finish += charge / flow.weight - est
                flow.estimate += _SMOOTHING * (charge - flow.estimate)
            if c.error is not None or t is None or lease.broken:
                err = c.error or errors.InternalError("a run ended without timings")
                self._escalate(lease, position, rec, err.code, err.message, err.detail)
            else:
                page = lease.page
                page.mark(position, lease.done.head)  # a death from here on: the broker delivers it
                times = (t.queued, t.copy_in, t.kernels, t.copy_out, t.total)
                pushed = False
                if not lease.broken:
                    try:
                        pushed = lease.done.push(encode_done(req, times, (*stamps, now) if stamps else (),
                                                             device=lease.device, flags=lease.flags))
                    except (RingCorrupt, ValueError, OverflowError) as exc:
                        self._broken(lease, str(exc))
                if pushed:
                    page.q[POSTED] = lease.done.head
                    page.q[GRAPHS] += 1
                    page.d[SECONDS] += t.kernels
                    lease.posted = True
                    lease.finish(position)
                else:  # the tenant is not reading its completions: the broker delivers (and charges) it
                    self._escalate(lease, position, rec, timings=t)
            if deadline and position == lease.page.q[OLDEST]:
                lease.note_oldest()  # the run the page's deadline was for
            if not touched or touched[-1] is not lease:
                touched.append(lease)
        for lease in touched:
            if lease.posted:
                lease.posted = False
                try:
                    if lease.done.consumer_sleeping():
                        wake(lease.notify_fd)
                except (RingCorrupt, ValueError) as exc:
                    self._broken(lease, str(exc))
            if lease.revoke_seq and not lease.inflight and lease.id in self.leases:
                self._end(lease)

    def _escalate(self, lease: _Lease, position: int, rec: bytes, code: str = "", message: str = "",
                  detail: dict[str, Any] | None = None, timings: Any = None) -> None:
        # Sent before it is marked: a worker dying in between leaves the broker the frame, which it
        # reads before it looks at the page (it skips what it was handed).
        self.send(WEscalate(lease.id, position, rec, code, message, detail or {}, timings))
        lease.page.mark(position, ESCALATED)
        lease.page.q[ESCALATIONS] += 1
        lease.finish(position)

    def _broken(self, lease: _Lease, reason: str) -> None:
        if not lease.broken:
            lease.broken = True
            self.send(WLeaseBroken(lease.id, reason))

    # -- sleeping ---------------------------------------------------------------------------
    def _spin_changed(self) -> None:
        self.spin_s = max((lease.spin for lease in self.leases.values()), default=0.0)

    def wake_fds(self) -> list[int]:
        if self.cap and self.on_device >= self.cap:
            return []  # the device is full: its completions wake the worker, not the rings
        return [lease.wake_fd for lease in self.leases.values() if lease.taking]

    def prepare_sleep(self) -> bool:
        """Announce sleep on every lease's ring: False (none asleep for long) if one has work.  While the
        device is full nothing is announced: what waits is taken once a run ends."""
        if self.cap and self.on_device >= self.cap:
            return True
        ok = True
        for lease in self.leases.values():
            if not lease.taking:
                continue
            try:
                if not lease.runs.prepare_sleep():
                    ok = False
            except (RingCorrupt, ValueError) as exc:
                self._broken(lease, str(exc))
        return ok

    def end_sleep(self) -> None:
        for lease in self.leases.values():
            if not lease.broken:
                lease.runs.end_sleep()

    def close(self) -> None:
        for lease in self.leases.values():
            lease.close()
        self.leases.clear()
        self.spin_s = 0.0
