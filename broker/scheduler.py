"""Who runs next, and where. Pure policy: no awaits, no I/O, time is an argument.

The engine calls ``submit(job, now)`` as graphs arrive, ``schedule(now)`` whenever a
lane may be free, and ``complete(job_id, now, device_time)`` when a graph finishes.
``schedule`` returns a plan (jobs with their devices); the engine executes it.

The one rule: fill every free lane, taking jobs in the policy's order, and place each
on the device that already holds most of its resident buffers unless that device has
no free lane, else on the least-loaded device.
"""

from __future__ import annotations

import abc
import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Job:
    id: int
    tenant: str
    session: int
    submitted: float
    residents: frozenset[int] = frozenset()
    priority: int = 0
    payload: Any = field(default=None, repr=False)
    device: str | None = None
    started: float | None = None


@dataclass(frozen=True, slots=True)
class Assignment:
    job: Job
    device: str


@dataclass(frozen=True, slots=True)
class Plan:
    assignments: tuple[Assignment, ...]

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


POLICIES: dict[str, Callable[[], QueuePolicy]] = {"fcfs": FcfsPolicy}
_EMPTY = Plan(())


def create_policy(name: str) -> QueuePolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r} (known: {', '.join(sorted(POLICIES))})") from None


class Scheduler:
    """Queue + placement over devices that each run up to ``lanes`` graphs at once."""

    def __init__(self, lanes: dict[str, int], policy: str = "fcfs") -> None:
        # Invariant: running[d] holds exactly the ids of jobs assigned to d and not completed.
        self.lanes = dict(lanes)
        self.running: dict[str, set[int]] = {d: set() for d in lanes}
        self.down: set[str] = set()
        self.policy = create_policy(policy)
        self._jobs: dict[int, Job] = {}

    @property
    def queued(self) -> int:
        return len(self.policy)

    def submit(self, job: Job, now: float) -> None:
        self.policy.push(job, now)

    def free(self, device: str) -> int:
        if device in self.down:
            return 0
        return self.lanes[device] - len(self.running[device])

    def schedule(self, now: float, holds: Callable[[str, frozenset[int]], int] | None = None) -> Plan:
        """Fill free lanes. ``holds(device, residents)`` counts residents already on a device."""
        if not len(self.policy):
            return _EMPTY
        out: list[Assignment] = []
        while True:
            free = [d for d in self.lanes if self.free(d) > 0]
            if not free:
                break
            job = self.policy.pop(now)
            if job is None:
                break
            best = self._place(job, free, holds)
            job.device, job.started = best, now
            self.running[best].add(job.id)
            self._jobs[job.id] = job
            out.append(Assignment(job, best))
        return Plan(tuple(out))

    def _place(self, job: Job, free: list[str], holds: Callable[[str, frozenset[int]], int] | None) -> str:
        def load(d: str) -> float:
            return len(self.running[d]) / max(1, self.lanes[d])

        if holds is not None and job.residents:
            return max(free, key=lambda d: (holds(d, job.residents), -load(d)))
        return min(free, key=load)

    def complete(self, job_id: int, now: float, device_time: float = 0.0) -> Job | None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return None
        if job.device is not None:
            self.running[job.device].discard(job_id)
        self.policy.charge(job, device_time, now)
        return job

    def cancel(self, pred: Callable[[Job], bool]) -> list[Job]:
        """Remove queued (not running) jobs matching ``pred``; returns them."""
        return self.policy.remove(pred)

    def set_down(self, device: str, down: bool) -> None:
        if down:
            self.down.add(device)
        else:
            self.down.discard(device)
