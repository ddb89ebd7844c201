"""Who runs next, and where. Pure policy: no awaits, no I/O, time is an argument.

The engine calls ``submit(job, now)`` as graphs arrive, ``schedule(now)`` whenever a
lane may be free, and ``complete(job_id, now, device_time)`` when a graph finishes.
``schedule`` returns a plan (jobs with their devices); the engine executes it.
Two queue policies are chosen by name: ``fcfs`` (arrival order) and ``fair`` (weighted
fair share of measured device time across tenants, ``FairPolicy``).

The one rule: fill every free lane, taking jobs in the policy's order, and place each
on the device that already holds most of its resident buffers unless that device has
no free lane, else on the least-loaded device.
"""

from __future__ import annotations

import abc
import collections
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import errors

LATENCY = 1
"""``Job.priority`` of the latency class (high-priority stream lanes); 0 is the batch class."""


@dataclass(slots=True)
class Job:
    """One graph waiting for, or holding, a lane. Ids are unique among jobs not yet completed."""

    id: int
    tenant: str
    session: int
    submitted: float
    residents: frozenset[int] = frozenset()
    priority: int = 0  # LATENCY (1) or batch (0)
    payload: Any = field(default=None, repr=False)
    device: str | None = None
    started: float | None = None
    # The tenant's share weight when the job was submitted; positive and finite. The fair
    # policy divides the job's charged device time by it.
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class Assignment:
    job: Job
    device: str


@dataclass(frozen=True, slots=True)
class Rejection:
    """A job the ``admit`` check refused for good (``error``); the engine fails it with that error."""

    job: Job
    error: errors.KaasError


@dataclass(frozen=True, slots=True)
class Plan:
    """What one ``schedule`` call decided. Iterating it yields the assignments."""

    assignments: tuple[Assignment, ...]
    rejected: tuple[Rejection, ...] = ()

    def __iter__(self) -> Iterator[Assignment]:
        return iter(self.assignments)

    def __len__(self) -> int:
        return len(self.assignments)


class QueuePolicy(abc.ABC):
    """The order in which queued jobs are taken."""

    name: str

    @abc.abstractmethod
    def push(self, job: Job, now: float) -> None: ...

    @abc.abstractmethod
    def pop(self, now: float) -> Job | None: ...

    @abc.abstractmethod
    def remove(self, pred: Callable[[Job], bool]) -> list[Job]: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...

    def charge(self, job: Job, device_time: float, now: float) -> None:  # noqa: B027 - optional
        """Account ``device_time`` of a finished job (fair policies use it)."""

    def unpop(self, job: Job, now: float) -> None:
        """Put back the job the last ``pop`` returned, at the front of its order, as if never popped."""
        raise NotImplementedError(f"the {self.name} policy cannot put a job back")


class FcfsPolicy(QueuePolicy):
    """First come, first served across all tenants."""

    name = "fcfs"

    def __init__(self) -> None:
        self._q: collections.deque[Job] = collections.deque()

    def push(self, job: Job, now: float) -> None:
        self._q.append(job)

    def pop(self, now: float) -> Job | None:
        return self._q.popleft() if self._q else None

    def remove(self, pred: Callable[[Job], bool]) -> list[Job]:
        gone = [j for j in self._q if pred(j)]
        if gone:
            self._q = collections.deque(j for j in self._q if not pred(j))
        return gone

    def __len__(self) -> int:
        return len(self._q)

    def unpop(self, job: Job, now: float) -> None:
        self._q.appendleft(job)


@dataclass(eq=False, slots=True)
class _Flow:
    """One tenant's queue and its place in virtual time (fair policy)."""

    tenant: str
    # FIFO: (arrival seq, job), oldest at the front; seqs increase from front to back.
    queue: collections.deque[tuple[int, Job]] = field(default_factory=collections.deque)
    # Virtual time at which the tenant's dispatched work ends. Each dispatch adds estimate/weight,
    # each charge adds (charged - estimate)/weight, so once the tenant has nothing in flight it has
    # advanced by exactly its charged device time / weight since it last joined at the virtual clock.
    finish: float = 0.0
    # Moving average of this tenant's charged device time per job; None until its first charge.
    estimate: float | None = None
    inflight: int = 0  # popped and not yet charged (nor put back)


@dataclass(frozen=True, slots=True)
class _Dispatched:
    """What a pop advanced, so that ``charge`` can correct it and ``unpop`` can undo it."""

    flow: _Flow
    seq: int
    estimate: float
    weight: float


class FairPolicy(QueuePolicy):
    """Weighted fair share of measured device time across tenants: a start-time fair queue.

    The one rule: take the head job of the backlogged tenant with the smallest start tag
    ``max(vtime, finish[tenant])`` (oldest job first on ties), except that a latency-class head
    (``priority == LATENCY``) goes first while its start tag is within ``latency_lag`` of that
    smallest tag.

    Dispatching a job advances its tenant's ``finish`` by an estimate / weight (the tenant's moving
    average of device time, or the policy-wide one for a tenant with no history); ``charge``
    replaces the estimate with the measured device time, floored at ``min_charge`` (every graph
    costs at least a launch and a sync, and the floor is what bounds waits in dispatches).
    ``vtime`` is the smallest start tag among backlogged tenants at the last dispatch; it never
    decreases and never passes a backlogged tenant's tag, so nobody's earned service is erased.

    What follows from it (checked by tests/test_fair.py; L lanes over all devices, w_t a tenant's
    weight, charges in [c_min, c_max], lag_t = ``latency_lag`` for a latency tenant, else 0):

    - work-conserving: ``pop`` returns a job whenever one is queued;
    - FIFO within a tenant;
    - a tenant that was idle rejoins at ``vtime``: no banked credit for the idle time, and no
      penalty for having used the device alone (its tag then leads ``vtime`` only by its work
      still in flight);
    - a tenant's tag never leads ``vtime`` by more than
      Δ_t = lag_t + c_max/w_t + L·(c_max - c_min)/w_t, so the latency class reorders but does not
      buy share: under saturation its normalised device time stays within Δ_t of the others';
    - no starvation: while tenant j has queued work, another tenant i is dispatched at most
      1 + w_i·(Δ_j + lag_i)/c_min + L·(c_max - c_min)/c_min times before j is.

    Cost per pop is linear in the number of backlogged tenants (tens, not thousands).
    """

    name = "fair"

    def __init__(self, *, default_estimate: float = 1e-3, min_charge: float = 1e-5, smoothing: float = 0.25,
                 latency_lag: float = 0.01) -> None:
        if not (math.isfinite(min_charge) and min_charge > 0):
            raise ValueError(f"min_charge must be a positive number of seconds, not {min_charge!r}")
        if not (math.isfinite(default_estimate) and default_estimate >= min_charge):
            raise ValueError(f"default_estimate must be at least min_charge ({min_charge}), not {default_estimate!r}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must lie in (0, 1], not {smoothing!r}")
        if not (math.isfinite(latency_lag) and latency_lag >= 0):
            raise ValueError(f"latency_lag must be a non-negative number of seconds, not {latency_lag!r}")
        self.min_charge = min_charge
        self.smoothing = smoothing
        self.latency_lag = latency_lag
        # Never decreases; at most the start tag of every backlogged tenant.
        self.vtime = 0.0
        # Every tenant with queued jobs, jobs in flight, or a finish tag ahead of vtime.
        self._flows: dict[str, _Flow] = {}
        # Exactly the flows with a non-empty queue.
        self._backlogged: dict[str, _Flow] = {}
        # Popped jobs not yet charged, by job id.
        self._inflight: dict[int, _Dispatched] = {}
        # Policy-wide moving average of charged device time: the estimate for tenants with no history.
        self._estimate = default_estimate
        self._seq = itertools.count()
        self._len = 0  # == sum of queue lengths

    def push(self, job: Job, now: float) -> None:
        if not (math.isfinite(job.weight) and job.weight > 0):
            raise ValueError(f"job {job.id} of tenant {job.tenant!r}: weight must be a positive number, "
                             f"not {job.weight!r}")
        flow = self._flows.get(job.tenant)
        if flow is None:
            self._sweep()
            flow = self._flows[job.tenant] = _Flow(job.tenant, finish=self.vtime)
        flow.queue.append((next(self._seq), job))
        self._backlogged[job.tenant] = flow
        self._len += 1

    def pop(self, now: float) -> Job | None:
        if not self._backlogged:
            return None
        v = self.vtime
        s_min = min(max(v, f.finish) for f in self._backlogged.values())
        window = s_min + self.latency_lag
        best: _Flow | None = None
        best_key = (True, math.inf, math.inf)
        for f in self._backlogged.values():
            s = max(v, f.finish)
            seq, head = f.queue[0]
            key = (not (head.priority >= LATENCY and s <= window), s, seq)
            if key < best_key:
                best, best_key = f, key
        assert best is not None
        self.vtime = s_min
        seq, job = best.queue.popleft()
        self._len -= 1
        if not best.queue:
            del self._backlogged[best.tenant]
        est = best.estimate if best.estimate is not None else self._estimate
        best.finish = best_key[1] + est / job.weight
        best.inflight += 1
        self._inflight[job.id] = _Dispatched(best, seq, est, job.weight)
        return job

    def unpop(self, job: Job, now: float) -> None:
        d = self._inflight.pop(job.id)
        f = d.flow
        f.finish -= d.estimate / d.weight
        f.inflight -= 1
        f.queue.appendleft((d.seq, job))
        self._backlogged[f.tenant] = f
        self._len += 1

    def charge(self, job: Job, device_time: float, now: float) -> None:
        d = self._inflight.pop(job.id, None)
        if d is None:
            return  # never dispatched by this policy
        cost = device_time if math.isfinite(device_time) and device_time > self.min_charge else self.min_charge
        f = d.flow
        f.finish += (cost - d.estimate) / d.weight
        f.inflight -= 1
        f.estimate = cost if f.estimate is None else f.estimate + self.smoothing * (cost - f.estimate)
        self._estimate += self.smoothing * (cost - self._estimate)
        self._forget_if_idle(f)

    def remove(self, pred: Callable[[Job], bool]) -> list[Job]:
        gone: list[tuple[int, Job]] = []
        for f in list(self._backlogged.values()):
            if not any(pred(j) for _, j in f.queue):
                continue
            keep: collections.deque[tuple[int, Job]] = collections.deque()
            for item in f.queue:
                (gone if pred(item[1]) else keep).append(item)
            f.queue = keep
            if not keep:
                del self._backlogged[f.tenant]
                self._forget_if_idle(f)
        self._len -= len(gone)
        gone.sort(key=lambda item: item[0])
        return [j for _, j in gone]

    def __len__(self) -> int:
        return self._len

    def start_tag(self, tenant: str) -> float:
        """Where ``tenant``'s next job would start in virtual time (``vtime`` for one not tracked)."""
        f = self._flows.get(tenant)
        return self.vtime if f is None else max(self.vtime, f.finish)

    def backlogged(self) -> dict[str, tuple[float, Job]]:
        """Each tenant with queued jobs: its start tag and its head job (for metrics and tests)."""
        return {t: (max(self.vtime, f.finish), f.queue[0][1]) for t, f in self._backlogged.items()}

    def _forget_if_idle(self, f: _Flow) -> None:
        # A tenant that would rejoin at vtime anyway carries nothing worth keeping.
        if not f.queue and not f.inflight and f.finish <= self.vtime and self._flows.get(f.tenant) is f:
            del self._flows[f.tenant]

    def _sweep(self) -> None:
        for f in list(self._flows.values()):
            self._forget_if_idle(f)


POLICIES: dict[str, Callable[[], QueuePolicy]] = {"fcfs": FcfsPolicy, "fair": FairPolicy}
_EMPTY = Plan(())


def create_policy(name: str) -> QueuePolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r} (known: {', '.join(sorted(POLICIES))})") from None


class Scheduler:
    """Queue + placement over devices that each run up to ``lanes`` graphs at once."""

    def __init__(self, lanes: dict[str, int], policy: str | QueuePolicy = "fcfs") -> None:
        # Invariant: running[d] holds exactly the ids of jobs assigned to d and not completed.
        self.lanes = dict(lanes)
        self.running: dict[str, set[int]] = {d: set() for d in lanes}
        self.down: set[str] = set()
        self.drained: set[str] = set()  # administratively closed to new graphs; running ones finish
        self.policy = create_policy(policy) if isinstance(policy, str) else policy
        self._jobs: dict[int, Job] = {}
        # Graphs to run again after a fault that was not theirs, ahead of the policy's queue.
        # Replays are not charged again (their first attempt was).
        self._replays: collections.deque[Job] = collections.deque()
        # Suspects of a fault: each runs alone on an idle device, so a second fault names it.
        self._isolated: collections.deque[Job] = collections.deque()
        # Invariant: exclusive[d] is the isolated job running on d, and running[d] == {it}.
        self.exclusive: dict[str, int] = {}
        self._replayed: set[int] = set()

    @property
    def queued(self) -> int:
        return len(self.policy) + len(self._replays) + len(self._isolated)

    def submit(self, job: Job, now: float) -> None:
        self.policy.push(job, now)

    @property
    def isolating(self) -> bool:
        """Whether suspects are waiting to run alone, or one is running alone now."""
        return bool(self._isolated or self.exclusive)

    def requeue(self, job: Job, *, isolate: bool = False) -> None:
        """Queue ``job`` again after a failed attempt: ahead of everything, alone on a device if ``isolate``."""
        job.device = job.started = None
        self._replayed.add(job.id)
        (self._isolated if isolate else self._replays).append(job)

    def free(self, device: str) -> int:
        if device in self.down or device in self.drained or device in self.exclusive:
            return 0
        return self.lanes[device] - len(self.running[device])

    def schedule(self, now: float, holds: Callable[[str, frozenset[int]], int] | None = None,
                 admit: Callable[[Job, str], bool] | None = None) -> Plan:
        """Fill free lanes. ``holds(device, residents)`` counts residents already on a device.

        ``admit(job, device)``, when given, asks whether the job's memory fits on ``device`` now
        (and reserves it when it answers True). Free devices are asked in placement order. A job
        that none admits goes back to the front of its queue and the round ends, so no later job
        overtakes a graph that waits for memory held by running graphs (it runs once they end).
        If ``admit`` raises a ``KaasError`` the job can never run: it leaves the queue and is
        returned in ``Plan.rejected`` (charged nothing but the policy's floor).
        """
        if not self.queued:
            return _EMPTY
        out: list[Assignment] = []
        rejected: list[Rejection] = []
        draining = self._place_isolated(now, out)
        # Free lanes per device, counted once per round and kept as jobs are placed.
        caps = {d: n for d in self.lanes if d != draining and (n := self.free(d)) > 0}
        while caps:
            free = list(caps)
            replay = bool(self._replays)
            job = self._replays.popleft() if replay else self.policy.pop(now)
            if job is None:
                break
            if admit is None:
                best = self._place(job, free, holds)
            else:
                try:
                    admitted = next((d for d in self._ranked(job, free, holds) if admit(job, d)), None)
                except errors.KaasError as exc:
                    if not replay:
                        self.policy.charge(job, 0.0, now)
                    self._replayed.discard(job.id)
                    rejected.append(Rejection(job, exc))
                    continue
                if admitted is None:
                    if replay:
                        self._replays.appendleft(job)
                    else:
                        self.policy.unpop(job, now)
                    break
                best = admitted
            job.device, job.started = best, now
            self.running[best].add(job.id)
            self._jobs[job.id] = job
            out.append(Assignment(job, best))
            left = caps[best] - 1
            if left:
                caps[best] = left
            else:
                del caps[best]
        return Plan(tuple(out), tuple(rejected))

    def _place_isolated(self, now: float, out: list[Assignment]) -> str | None:
        """Start waiting suspects on idle devices; returns a device to drain for the next one."""
        while self._isolated:
            usable = [d for d in self.lanes if d not in self.down and d not in self.drained and d not in self.exclusive]
            idle = [d for d in usable if not self.running[d]]
            if not idle:
                alive = usable
                # Nothing new goes to the emptiest device until it is idle: the suspect cannot starve.
                return min(alive, key=lambda d: len(self.running[d])) if alive else None
            job, d = self._isolated.popleft(), idle[0]
            job.device, job.started = d, now
            self.running[d].add(job.id)
            self.exclusive[d] = job.id
            self._jobs[job.id] = job
            out.append(Assignment(job, d))
        return None

    def _place(self, job: Job, free: list[str], holds: Callable[[str, frozenset[int]], int] | None) -> str:
        def load(d: str) -> float:
            return len(self.running[d]) / max(1, self.lanes[d])

        if holds is not None and job.residents:
            return max(free, key=lambda d: (holds(d, job.residents), -load(d)))
        return min(free, key=load)

    def _ranked(self, job: Job, free: list[str], holds: Callable[[str, frozenset[int]], int] | None) -> list[str]:
        """``free`` in placement order: the first is what ``_place`` picks."""
        if len(free) == 1:
            return free
        def load(d: str) -> float:
            return len(self.running[d]) / max(1, self.lanes[d])

        if holds is not None and job.residents:
            return sorted(free, key=lambda d: (holds(d, job.residents), -load(d)), reverse=True)
        return sorted(free, key=load)

    def complete(self, job_id: int, now: float, device_time: float = 0.0) -> Job | None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return None
        if job.device is not None:
            self.running[job.device].discard(job_id)
            if self.exclusive.get(job.device) == job_id:
                del self.exclusive[job.device]
        if job_id in self._replayed:
            self._replayed.discard(job_id)
        else:
            self.policy.charge(job, device_time, now)
        return job

    def cancel(self, pred: Callable[[Job], bool]) -> list[Job]:
        """Remove queued (not running) jobs matching ``pred``; returns them."""
        gone = self.policy.remove(pred)
        for q in (self._replays, self._isolated):
            mine = [j for j in q if pred(j)]
            for j in mine:
                q.remove(j)
                self._replayed.discard(j.id)
            gone += mine
        return gone

    def set_down(self, device: str, down: bool) -> None:
        if down:
            self.down.add(device)
        else:
            self.down.discard(device)
