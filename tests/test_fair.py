"""FairPolicy: weighted fair share of measured device time, driven with a fake clock.

Bounds checked here (L lanes, charges in [c_min, c_max] after the policy's floor, lag_t the
latency lag for a latency-class tenant and 0 for a batch one, w_t the weight):

- lead: a tenant's start tag never leads the virtual clock by more than
  Δ_t = lag_t + c_max/w_t + L·(c_max - c_min)/w_t;
- starvation: while tenant j has queued work, another tenant i is dispatched at most
  1 + w_i·(Δ_j + lag_i)/c_min + L·(c_max - c_min)/c_min times before j is;
- a tenant that rejoins after being idle is dispatched within N - 1 dispatches (N tenants).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import random
from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from broker import errors
from broker.scheduler import LATENCY, FairPolicy, FcfsPolicy, Job, QueuePolicy, Scheduler, create_policy

_ids = itertools.count(1)


def job(tenant: str, *, weight: float = 1.0, priority: int = 0, session: int = 1, jid: int | None = None) -> Job:
    return Job(next(_ids) if jid is None else jid, tenant, session, 0.0, priority=priority, weight=weight)


def lead_bound(policy: FairPolicy, weight: float, latency: bool, lanes: int, c_min: float, c_max: float) -> float:
    return (policy.latency_lag if latency else 0.0) + c_max / weight + lanes * (c_max - c_min) / weight


def simulate(weights: dict[str, float], cost: Callable[[str, random.Random], float], *, lanes: int = 4,
             jobs: int = 20000, policy: QueuePolicy | None = None, latency: frozenset[str] = frozenset(),
             seed: int = 0) -> dict[str, float]:
    """Saturating tenants on a fake clock; returns each tenant's share of device time."""
    pol = policy if policy is not None else FairPolicy()
    s = Scheduler({"d0": lanes // 2, "d1": lanes - lanes // 2}, pol)
    rng = random.Random(seed)
    queued: collections.Counter[str] = collections.Counter()
    used: dict[str, float] = collections.defaultdict(float)
    running: list[tuple[float, int, float, str]] = []
    now = 0.0

    def refill() -> None:
        for t, w in weights.items():
            while queued[t] < lanes + 2:
                s.submit(Job(next(_ids), t, 1, now, priority=LATENCY if t in latency else 0, weight=w), now)
                queued[t] += 1

    refill()
    for _ in range(jobs):
        for a in s.schedule(now):
            queued[a.job.tenant] -= 1
            c = cost(a.job.tenant, rng)
            heapq.heappush(running, (now + c, a.job.id, c, a.job.tenant))
        now, jid, c, tenant = heapq.heappop(running)
        s.complete(jid, now, c)
        used[tenant] += c
        refill()
    total = sum(used.values())
    return {t: used[t] / total for t in weights}


def fixed(costs: dict[str, float]) -> Callable[[str, random.Random], float]:
    return lambda t, rng: costs[t]


# -- shares -------------------------------------------------------------------------------
def test_equal_weights_share_device_time_not_job_counts() -> None:
    shares = simulate({"a": 1.0, "b": 1.0}, fixed({"a": 1e-3, "b": 3e-3}))
    assert shares["a"] == pytest.approx(0.5, abs=0.01)
    # The same load first come first served: b's longer jobs take three quarters of the device.
    fcfs = simulate({"a": 1.0, "b": 1.0}, fixed({"a": 1e-3, "b": 3e-3}), policy=FcfsPolicy())
    assert fcfs["b"] == pytest.approx(0.75, abs=0.01)


def test_two_to_one_weights() -> None:
    shares = simulate({"a": 2.0, "b": 1.0}, fixed({"a": 1e-3, "b": 2.5e-3}))
    assert shares["a"] == pytest.approx(2 / 3, abs=0.01)


def test_three_tenants_with_noisy_device_times() -> None:
    """Estimates are wrong for every job; charges correct them, and shares still hold."""
    means = {"a": 1e-3, "b": 4e-3, "c": 0.5e-3}
    shares = simulate({"a": 1.0, "b": 2.0, "c": 3.0}, lambda t, rng: rng.uniform(0.2, 1.8) * means[t], lanes=6,
                      jobs=30000)
    for t, target in {"a": 1 / 6, "b": 2 / 6, "c": 3 / 6}.items():
        assert shares[t] == pytest.approx(target, abs=0.01)


def test_saturating_latency_tenant_gets_no_more_than_its_share() -> None:
    shares = simulate({"lat": 1.0, "batch": 1.0}, fixed({"lat": 1e-3, "batch": 2e-3}), latency=frozenset({"lat"}))
    assert shares["lat"] == pytest.approx(0.5, abs=0.01)
    shares = simulate({"lat": 1.0, "batch": 2.0}, fixed({"lat": 2e-3, "batch": 1e-3}), latency=frozenset({"lat"}))
    assert shares["lat"] == pytest.approx(1 / 3, abs=0.01)


# -- idle tenants ---------------------------------------------------------------------------
def _run(p: FairPolicy, n: int, cost: float = 1.0) -> list[str]:
    """``n`` dispatches on one lane, each charged ``cost`` before the next."""
    out = []
    for _ in range(n):
        j = p.pop(0.0)
        assert j is not None
        out.append(j.tenant)
        p.charge(j, cost, 0.0)
    return out


def test_returning_tenant_is_served_next_without_a_burst_or_a_penalty_for_the_other() -> None:
    p = FairPolicy(default_estimate=1.0, min_charge=0.1)
    for _ in range(2000):
        p.push(job("a"), 0.0)
    for _ in range(50):
        p.push(job("b"), 0.0)
    assert _run(p, 100).count("b") == 50  # b drains its 50 while sharing 1:1
    _run(p, 500)   # then a runs alone: b is idle, a uses the whole device
    for _ in range(100):
        p.push(job("b"), 0.0)
    after = _run(p, 200)
    assert after[0] == "b"                     # served at once
    assert max(after[:2].count("b"), after[:2].count("a")) == 1
    assert 99 <= after.count("b") <= 101       # 1:1 from there: no banked credit, and a is not starved


def test_returning_tenant_waits_at_most_one_dispatch_per_other_tenant() -> None:
    s = Scheduler({"d": 4}, FairPolicy(default_estimate=1e-3))
    for t in ("a", "b", "c"):
        for _ in range(50):
            s.submit(job(t), 0.0)
    now = 0.0
    running = [a.job for a in s.schedule(now)]
    for _ in range(60):
        now += 1e-3
        j = running.pop(0)
        s.complete(j.id, now, 1e-3 if j.tenant != "c" else 5e-3)
        running += [a.job for a in s.schedule(now)]
    s.submit(job("late"), now)
    order: list[str] = []
    while "late" not in order:
        now += 1e-3
        j = running.pop(0)
        s.complete(j.id, now, 1e-3)
        new = [a.job for a in s.schedule(now)]
        order += [x.tenant for x in new]
        running += new
    assert order.index("late") <= 3  # at most N - 1 = 3 others first


def test_idle_state_is_forgotten_only_when_it_carries_nothing() -> None:
    p = FairPolicy(default_estimate=1.0, min_charge=0.1)
    p.push(job("a"), 0.0)
    j = p.pop(0.0)
    assert j is not None
    p.charge(j, 3.0, 0.0)
    assert p.start_tag("a") == pytest.approx(3.0)  # it ran alone: three seconds of debt, kept
    p.push(job("b"), 0.0)
    assert p.pop(0.0).tenant == "b"  # type: ignore[union-attr]


# -- order ------------------------------------------------------------------------------------
def test_fifo_within_each_tenant() -> None:
    rng = random.Random(7)
    p = FairPolicy(default_estimate=1.0, min_charge=0.1)
    pushed: dict[str, list[int]] = collections.defaultdict(list)
    popped: dict[str, list[int]] = collections.defaultdict(list)
    for _ in range(500):
        t = rng.choice("abcd")
        j = job(t, weight=1.0 + "abcd".index(t), priority=LATENCY if t == "d" else 0)
        p.push(j, 0.0)
        pushed[t].append(j.id)
        if rng.random() < 0.5:
            got = p.pop(0.0)
            assert got is not None
            popped[got.tenant].append(got.id)
            p.charge(got, rng.uniform(0, 3), 0.0)
    while (got := p.pop(0.0)) is not None:
        popped[got.tenant].append(got.id)
    assert popped == pushed


def test_latency_job_goes_before_batch_jobs_at_the_same_tag() -> None:
    p = FairPolicy(default_estimate=1.0, min_charge=0.1, latency_lag=2.0)
    for t in ("a", "b"):
        for _ in range(3):
            p.push(job(t), 0.0)
    p.push(job("lat", priority=LATENCY), 0.0)  # pushed last, taken first
    assert p.pop(0.0).tenant == "lat"  # type: ignore[union-attr]


def test_latency_class_leads_by_at_most_its_lag_then_shares_evenly() -> None:
    p = FairPolicy(default_estimate=1.0, min_charge=0.1, latency_lag=2.0)
    for _ in range(1000):
        p.push(job("batch"), 0.0)
        p.push(job("lat", priority=LATENCY), 0.0)
    order = []
    for _ in range(1000):
        j = p.pop(0.0)
        assert j is not None
        order.append(j.tenant)
        p.charge(j, 1.0, 0.0)
        # Its tag leads the clock by at most lag + one job (one lane, exact estimates).
        assert p.start_tag("lat") - p.vtime <= 2.0 + 1.0 + 1e-9
    assert order[:4] == ["lat", "lat", "lat", "batch"]  # tags 0, 1, 2 are within the lag of batch's 0
    assert all(order[i] != order[i + 1] for i in range(3, 999))  # then strictly alternating
    assert order.count("lat") == 501


def test_latency_class_beyond_its_lag_waits_its_turn() -> None:
    p = FairPolicy(default_estimate=1.0, min_charge=0.1, latency_lag=0.5)
    p.push(job("lat", priority=LATENCY), 0.0)
    j = p.pop(0.0)
    assert j is not None
    p.charge(j, 4.0, 0.0)  # lat is now 4 ahead
    p.push(job("lat", priority=LATENCY), 0.0)
    for _ in range(10):
        p.push(job("batch"), 0.0)
    assert _run(p, 6, 1.0) == ["batch"] * 4 + ["lat", "batch"]


def test_remove_keeps_order_and_counts() -> None:
    p = FairPolicy(default_estimate=1.0)
    a = [job("a") for _ in range(5)]
    b = [job("b") for _ in range(3)]
    for j in a + b:
        p.push(j, 0.0)
    evens = {j.id for j in (a[1], a[3], b[0], b[2])}
    gone = p.remove(lambda j: j.id in evens)
    assert [j.id for j in gone] == [a[1].id, a[3].id, b[0].id, b[2].id]
    assert len(p) == 4
    rest = [p.pop(0.0) for _ in range(4)]
    assert p.pop(0.0) is None
    assert [j.id for j in rest if j is not None and j.tenant == "a"] == [a[0].id, a[2].id, a[4].id]
    assert p.remove(lambda j: True) == []


def test_charge_of_a_job_it_never_dispatched_is_ignored_and_floor_applies() -> None:
    p = FairPolicy(default_estimate=1.0, min_charge=0.5)
    p.charge(job("ghost"), 10.0, 0.0)
    assert p.start_tag("ghost") == 0.0
    p.push(job("a"), 0.0)
    j = p.pop(0.0)
    assert j is not None
    p.charge(j, float("nan"), 0.0)  # a failed graph: charged the floor
    assert p.start_tag("a") == pytest.approx(0.5)


def test_bad_weights_and_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="weight must be a positive number"):
        FairPolicy().push(job("a", weight=0.0), 0.0)
    with pytest.raises(ValueError, match="default_estimate"):
        FairPolicy(default_estimate=1e-6, min_charge=1e-5)
    assert isinstance(create_policy("fair"), FairPolicy)
    assert isinstance(Scheduler({"d": 1}, "fair").policy, FairPolicy)


# -- the admit hook -----------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["fcfs", "fair"])
def test_job_that_does_not_fit_waits_at_the_front_and_blocks_the_round(policy: str) -> None:
    s = Scheduler({"a": 2, "b": 2}, policy)
    big, small = job("x", jid=1), job("y", jid=2)
    s.submit(big, 0.0)
    s.submit(small, 0.0)
    asked: list[tuple[int, str]] = []

    def refuse_big(j: Job, d: str) -> bool:
        asked.append((j.id, d))
        return j.id != 1

    plan = s.schedule(0.0, admit=refuse_big)
    assert len(plan) == 0 and s.queued == 2 and sorted(asked) == [(1, "a"), (1, "b")]
    plan = s.schedule(1.0, admit=lambda j, d: True)
    assert [a.job.id for a in plan] == [1, 2]


def test_admit_is_asked_in_placement_order() -> None:
    s = Scheduler({"a": 1, "b": 1}, "fair")
    s.submit(Job(1, "t", 1, 0.0, frozenset({7})), 0.0)
    asked: list[str] = []

    def only_a(j: Job, d: str) -> bool:
        asked.append(d)
        return d == "a"

    plan = s.schedule(0.0, holds=lambda d, rs: 100 if d == "b" else 0, admit=only_a)
    assert asked == ["b", "a"] and [(x.job.id, x.device) for x in plan] == [(1, "a")]


def test_a_job_that_can_never_fit_is_rejected_not_lost() -> None:
    s = Scheduler({"a": 2}, "fair")
    s.submit(job("x", jid=1), 0.0)
    s.submit(job("y", jid=2), 0.0)

    def admit(j: Job, d: str) -> bool:
        if j.id == 1:
            raise errors.QuotaExceeded("graph needs 10 bytes on device a, tenant quota is 5 bytes per device")
        return True

    plan = s.schedule(0.0, admit=admit)
    assert [r.job.id for r in plan.rejected] == [1] and isinstance(plan.rejected[0].error, errors.QuotaExceeded)
    assert [a.job.id for a in plan] == [2] and s.queued == 0 and s.running["a"] == {2}


def test_unpop_restores_the_fair_state() -> None:
    p = FairPolicy(default_estimate=1.0)
    for t in ("a", "b"):
        p.push(job(t), 0.0)
    first = p.pop(0.0)
    assert first is not None
    tags = (p.start_tag("a"), p.start_tag("b"))
    second = p.pop(0.0)
    assert second is not None
    p.unpop(second, 0.0)
    assert (p.start_tag("a"), p.start_tag("b")) == tags and len(p) == 1
    assert p.pop(0.0) is second


# -- the state machine ------------------------------------------------------------------------
C_MIN, C_MAX, LAG = 1.0, 4.0, 2.0
LANES = {"a": 2, "b": 3}
L = sum(LANES.values())
TENANTS = ("t0", "t1", "t2")


class CheckedFair(FairPolicy):
    """FairPolicy that asserts its one rule at every pop."""

    def pop(self, now: float) -> Job | None:
        before = self.backlogged()
        v = self.vtime
        j = super().pop(now)
        if j is None:
            assert not before
            return None
        s_min = min(s for s, _ in before.values())
        s, head = before[j.tenant]
        assert head is j and self.vtime == s_min >= v
        window = [t for t, (st_, h) in before.items() if h.priority >= LATENCY and st_ <= s_min + self.latency_lag]
        if window:
            assert j.tenant in window and s == min(before[t][0] for t in window)
        else:
            assert s == s_min
        return j


class FairMachine(RuleBasedStateMachine):
    """Scheduler + FairPolicy under random arrivals, device times, completions and cancels.

    Invariants: the policy's one rule at every pop; lanes respected; every job dispatched at most
    once; nothing lost; FIFO within a tenant; work-conserving; every tenant's lead over the virtual clock within Δ_t; no tenant with
    queued work waits more than 1 + w_i·(Δ_j + lag_i)/c_min + L·(c_max - c_min)/c_min dispatches
    of each other tenant i (summed over i) before it is served.
    """

    def __init__(self) -> None:
        super().__init__()
        self.policy = CheckedFair(default_estimate=2.0, min_charge=C_MIN, latency_lag=LAG)
        self.s = Scheduler(LANES, self.policy)
        self.weights: dict[str, float] = {}
        self.latency: str | None = None
        self.next = 1
        self.now = 0.0
        self.queued: dict[str, list[int]] = {t: [] for t in TENANTS}
        self.sessions: dict[int, int] = {}
        self.running: set[int] = set()
        self.dispatched: set[int] = set()
        self.finished: set[int] = set()
        self.cancelled: set[int] = set()
        self.last: dict[str, int] = {t: 0 for t in TENANTS}
        self.waits: dict[str, int] = {t: 0 for t in TENANTS}

    @initialize(weights=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=3, max_size=3),
                latency=st.sampled_from([None, *TENANTS]))
    def setup(self, weights: list[float], latency: str | None) -> None:
        self.weights = dict(zip(TENANTS, weights, strict=True))
        self.latency = latency

    def lag(self, t: str) -> float:
        return LAG if t == self.latency else 0.0

    def delta(self, t: str) -> float:
        return lead_bound(self.policy, self.weights[t], t == self.latency, L, C_MIN, C_MAX)

    def wait_bound(self, j: str) -> float:
        return sum(1 + self.weights[i] * (self.delta(j) + self.lag(i)) / C_MIN + L * (C_MAX - C_MIN) / C_MIN
                   for i in TENANTS if i != j)

    @rule(tenant=st.sampled_from(TENANTS), n=st.integers(1, 4), session=st.integers(1, 2))
    def submit(self, tenant: str, n: int, session: int) -> None:
        for _ in range(n):
            j = Job(self.next, tenant, session, self.now, priority=LATENCY if tenant == self.latency else 0,
                    weight=self.weights[tenant])
            self.s.submit(j, self.now)
            self.queued[tenant].append(j.id)
            self.sessions[j.id] = session
            self.next += 1

    @rule()
    def schedule(self) -> None:
        self.now += 1
        for a in self.s.schedule(self.now):
            t = a.job.tenant
            assert a.job.id in self.queued[t] and a.job.id not in self.dispatched
            assert a.job.id > self.last[t]  # FIFO within the tenant
            self.last[t] = a.job.id
            self.queued[t].remove(a.job.id)
            self.dispatched.add(a.job.id)
            self.running.add(a.job.id)
            self.waits[t] = 0
            for other in TENANTS:
                if other != t and self.queued[other]:
                    self.waits[other] += 1
                    assert self.waits[other] <= self.wait_bound(other), (other, self.waits)
            for u in TENANTS:
                if not self.queued[u]:
                    self.waits[u] = 0
        assert not any(self.queued.values()) or all(self.s.free(d) == 0 for d in LANES)

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data(), device_time=st.floats(0.0, C_MAX))
    def complete(self, data: st.DataObject, device_time: float) -> None:
        jid = data.draw(st.sampled_from(sorted(self.running)))
        self.now += 0.5
        assert self.s.complete(jid, self.now, device_time) is not None
        self.running.discard(jid)
        self.finished.add(jid)

    @rule(session=st.integers(1, 2))
    def cancel(self, session: int) -> None:
        for j in self.s.cancel(lambda j: j.session == session):
            assert j.id in self.queued[j.tenant] and self.sessions[j.id] == session
            self.queued[j.tenant].remove(j.id)
            self.cancelled.add(j.id)
            if not self.queued[j.tenant]:
                self.waits[j.tenant] = 0
        assert not any(self.sessions[i] == session for q in self.queued.values() for i in q)

    @invariant()
    def nothing_lost_and_lanes_respected(self) -> None:
        for d, n in LANES.items():
            assert len(self.s.running[d]) <= n
        assert set().union(*self.s.running.values()) == self.running
        queued = {i for q in self.queued.values() for i in q}
        assert self.s.queued == len(queued) == len(self.policy)
        assert len(queued) + len(self.running) + len(self.finished) + len(self.cancelled) == self.next - 1
        assert self.running | self.finished == self.dispatched

    @invariant()
    def leads_are_bounded(self) -> None:
        if self.weights:
            for t in TENANTS:
                assert self.policy.start_tag(t) - self.policy.vtime <= self.delta(t) + 1e-9


TestFairMachine = FairMachine.TestCase
TestFairMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
