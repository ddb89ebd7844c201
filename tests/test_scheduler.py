"""The scheduler is pure: drive it with fake time and check plans."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from broker.scheduler import Job, Scheduler, create_policy


def job(i: int, tenant: str = "t", session: int = 1, residents: frozenset[int] = frozenset()) -> Job:
    return Job(i, tenant, session, float(i), residents)


def test_fcfs_fills_lanes_in_arrival_order() -> None:
    s = Scheduler({"cpu:0": 2})
    for i in range(1, 5):
        s.submit(job(i), float(i))
    plan = s.schedule(10.0)
    assert [a.job.id for a in plan] == [1, 2] and {a.device for a in plan} == {"cpu:0"}
    assert s.schedule(10.0).assignments == ()
    s.complete(1, 11.0, 0.5)
    assert [a.job.id for a in s.schedule(11.0)] == [3]
    assert s.queued == 1


def test_least_loaded_device_without_residents() -> None:
    s = Scheduler({"a": 2, "b": 2})
    for i in range(1, 5):
        s.submit(job(i), 0)
    plan = s.schedule(0)
    assert sorted(a.device for a in plan) == ["a", "a", "b", "b"]


def test_affinity_prefers_device_holding_residents_until_full() -> None:
    s = Scheduler({"a": 1, "b": 1})
    holds = lambda d, rs: 100 if d == "b" else 0  # noqa: E731
    s.submit(job(1, residents=frozenset({7})), 0)
    s.submit(job(2, residents=frozenset({7})), 0)
    plan = s.schedule(0, holds)
    assert [(a.job.id, a.device) for a in plan] == [(1, "b"), (2, "a")]  # b saturated: 2 goes to a


def test_cancel_removes_only_queued_jobs_of_that_session() -> None:
    s = Scheduler({"a": 1})
    s.submit(job(1, session=1), 0)
    s.submit(job(2, session=1), 0)
    s.submit(job(3, session=2), 0)
    s.schedule(0)
    gone = s.cancel(lambda j: j.session == 1)
    assert [j.id for j in gone] == [2]
    s.complete(1, 1)
    assert [a.job.id for a in s.schedule(1)] == [3]


def test_down_device_gets_nothing() -> None:
    s = Scheduler({"a": 1, "b": 1})
    s.set_down("a", True)
    s.submit(job(1), 0)
    s.submit(job(2), 0)
    assert [(a.job.id, a.device) for a in s.schedule(0)] == [(1, "b")]


def test_unknown_policy_is_named() -> None:
    with pytest.raises(ValueError, match="unknown scheduling policy 'lottery'"):
        create_policy("lottery")


class SchedulerMachine(RuleBasedStateMachine):
    """Invariants: lanes never oversubscribed; every job runs at most once; nothing is lost."""

    def __init__(self) -> None:
        super().__init__()
        self.s = Scheduler({"a": 2, "b": 3})
        self.next = 1
        self.now = 0.0
        self.queued: set[int] = set()
        self.running: set[int] = set()
        self.done: set[int] = set()
        self.cancelled: set[int] = set()

    @rule(session=st.integers(1, 3))
    def submit(self, session: int) -> None:
        self.s.submit(job(self.next, session=session), self.now)
        self.queued.add(self.next)
        self.next += 1

    @rule()
    def schedule(self) -> None:
        self.now += 1
        for a in self.s.schedule(self.now):
            assert a.job.id in self.queued
            self.queued.discard(a.job.id)
            self.running.add(a.job.id)

    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        if self.running:
            jid = data.draw(st.sampled_from(sorted(self.running)))
            assert self.s.complete(jid, self.now, 0.1) is not None
            self.running.discard(jid)
            self.done.add(jid)

    @rule(session=st.integers(1, 3))
    def cancel(self, session: int) -> None:
        for j in self.s.cancel(lambda j: j.session == session):
            assert j.id in self.queued
            self.queued.discard(j.id)
            self.cancelled.add(j.id)

    @invariant()
    def lanes_respected(self) -> None:
        for d, n in self.s.lanes.items():
            assert len(self.s.running[d]) <= n
        assert sum(len(r) for r in self.s.running.values()) == len(self.running)
        assert self.s.queued == len(self.queued)

    @rule()
    def schedule_is_work_conserving(self) -> None:
        self.schedule()
        assert self.s.queued == 0 or all(self.s.free(d) == 0 for d in self.s.lanes)


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
