"""The device pool is pure: drive it in bytes with fake time and check plans and accounting."""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from broker import errors
from broker.pool import Admission, Eviction, LruOrder, Pool, Quota, Resident


def admit(p: Pool, device: str, tenant: str, residents: Mapping[int, int], temp: int = 0, now: float = 0.0,
          in_use: Collection[int] = ()) -> Admission:
    adm = p.plan_admit(device, tenant, residents, temp, now, in_use)
    assert adm is not None
    p.commit(adm, now)
    return adm


def evicted(adm: Admission) -> list[tuple[str, int, str]]:
    return [(e.device, e.resident, e.reason) for e in adm.evict]


# -- fitting and accounting -----------------------------------------------------------------
def test_graph_that_fits_evicts_nothing_and_is_accounted() -> None:
    p = Pool({"d0": 100, "d1": 100})
    g1 = admit(p, "d0", "a", {1: 10, 2: 20}, temp=5)
    assert g1.put == ((1, 10), (2, 20)) and g1.evict == ()
    assert (p.resident_bytes("d0"), p.reserved_bytes("d0"), p.used("d0", "a"), p.used("d1")) == (30, 5, 35, 0)
    g2 = admit(p, "d0", "a", {1: 10}, temp=7)
    assert g2.put == () and p.pinned("d0", 1) == 2 and p.reserved_bytes(tenant="a") == 12
    p.release(g1)
    p.release(g2)
    assert (p.resident_bytes("d0", "a"), p.reserved_bytes(), p.pinned("d0", 1)) == (30, 0, 0)  # still cached
    assert p.held("d0", [1, 2, 3]) == 30 and p.held("d1", [1]) == 0 and p.holds("d0", 2)


def test_residents_in_use_by_graphs_in_flight_are_never_evicted() -> None:
    p = Pool({"d0": 100})
    running = admit(p, "d0", "a", {1: 60})
    assert p.plan_admit("d0", "b", {9: 50}, 0, 1.0) is None  # only the end of a's graph can make room
    p.release(running)
    later = admit(p, "d0", "b", {9: 50}, now=2.0)
    assert [e.resident for e in later.evict] == [1]


def test_in_use_set_protects_residents_too() -> None:
    p = Pool({"d0": 100})
    p.add("d0", 1, "a", 60, 0.0)
    assert p.plan_admit("d0", "b", {9: 50}, 0, 1.0, in_use={1}) is None
    assert p.plan_admit("d0", "b", {9: 50}, 0, 1.0) is not None


def test_a_graph_never_evicts_its_own_residents() -> None:
    p = Pool({"d0": 100})
    p.add("d0", 1, "a", 40, 0.0)   # a's, coldest
    p.add("d0", 8, "b", 30, 1.0)
    p.add("d0", 9, "b", 30, 2.0)
    adm = admit(p, "d0", "a", {1: 40, 2: 20}, now=3.0)
    assert [e.resident for e in adm.evict] == [8] and adm.put == ((2, 20),)


def test_only_running_graphs_temps_block_admission() -> None:
    p = Pool({"d0": 100})
    running = admit(p, "d0", "a", {}, temp=90)
    assert p.plan_admit("d0", "b", {}, 20, 0.0) is None
    p.release(running)
    assert admit(p, "d0", "b", {}, temp=20).evict == ()


# -- eviction rules -------------------------------------------------------------------------
def test_tenant_at_its_own_quota_evicts_its_own_coldest() -> None:
    p = Pool({"d0": 1000})
    p.set_tenant("a", device_quota=50)
    p.add("d0", 9, "b", 20, 0.0)   # the coldest on the device, but not a's
    p.add("d0", 1, "a", 20, 1.0)
    p.add("d0", 2, "a", 20, 2.0)
    adm = admit(p, "d0", "a", {3: 20}, now=3.0)
    assert evicted(adm) == [("d0", 1, "quota")]
    assert p.used("d0", "a") == 40 and p.holds("d0", 9)


def test_total_quota_evicts_own_coldest_on_any_device() -> None:
    p = Pool({"d0": 1000, "d1": 1000})
    p.set_tenant("a", total_quota=50)
    p.add("d1", 1, "a", 20, 0.0)
    p.add("d0", 2, "a", 20, 1.0)
    adm = admit(p, "d0", "a", {3: 20}, now=2.0)
    assert evicted(adm) == [("d1", 1, "quota")]
    assert p.used(tenant="a") == 40


def test_over_share_tenant_loses_its_coldest_first() -> None:
    p = Pool({"d0": 120})
    p.add("d0", 8, "b", 15, 0.0)   # b is under its share (40 of 120) and colder
    p.add("d0", 9, "b", 15, 1.0)
    p.add("d0", 1, "a", 35, 2.0)   # a holds 70: over its share
    p.add("d0", 2, "a", 35, 3.0)
    adm = admit(p, "d0", "c", {5: 30}, now=4.0)
    assert evicted(adm) == [("d0", 1, "share")]


def test_lru_within_the_over_share_tenant_follows_touches() -> None:
    p = Pool({"d0": 120})
    p.add("d0", 8, "b", 30, 0.0)
    p.add("d0", 1, "a", 35, 1.0)
    p.add("d0", 2, "a", 35, 2.0)
    p.touch("d0", 1, 3.0)
    assert [r.id for r in p.residents("d0")] == [8, 2, 1]
    adm = admit(p, "d0", "c", {5: 30}, now=4.0)
    assert evicted(adm) == [("d0", 2, "share")]


@pytest.mark.parametrize(("wa", "victim"), [(3.0, 9), (1.0, 1)])
def test_weights_set_the_shares(wa: float, victim: int) -> None:
    p = Pool({"d0": 100})
    p.set_tenant("a", weight=wa)
    p.add("d0", 1, "a", 30, 0.0)   # a's are colder
    p.add("d0", 2, "a", 30, 1.0)
    p.add("d0", 9, "b", 40, 2.0)
    adm = admit(p, "d0", "a", {3: 10}, now=3.0)
    # a would hold 70: within 3:1's 75 (b, at 40 of 25, loses), past 1:1's 50 (a loses its own).
    assert evicted(adm) == [("d0", victim, "share")]


def test_anyones_coldest_goes_when_over_share_memory_is_busy() -> None:
    p = Pool({"d0": 100})
    busy = admit(p, "d0", "a", {1: 70})   # a is over share but its memory is in use
    p.add("d0", 8, "b", 15, 1.0)
    p.add("d0", 9, "b", 15, 2.0)
    adm = admit(p, "d0", "c", {5: 10}, now=3.0)
    assert evicted(adm) == [("d0", 8, "capacity")]
    p.release(busy)


def test_observer_sees_evictions_in_order_after_commit() -> None:
    seen: list[Eviction] = []
    p = Pool({"d0": 100}, on_evict=seen.append)
    for rid, t in enumerate((1.0, 2.0, 3.0), start=1):
        p.add("d0", rid, "a", 30, t)
    adm = p.plan_admit("d0", "b", {9: 60}, 0, 4.0)
    assert adm is not None and seen == []
    p.commit(adm, 4.0)
    assert seen == list(adm.evict) and [e.resident for e in seen] == [1, 2]
    assert all(e.tenant == "a" and e.nbytes == 30 for e in seen)


# -- quotas and errors --------------------------------------------------------------------------
def test_quota_errors_carry_the_numbers() -> None:
    p = Pool({"d0": 1000, "d1": 500})
    p.set_tenant("a", weight=1, device_quota=300, total_quota=200)
    assert p.quota("a") == Quota(300, 200) and p.quota("nobody") == Quota()
    with pytest.raises(errors.QuotaExceeded, match="graph needs 301 bytes on one device, tenant quota is "
                       "300 bytes per device") as ei:
        p.check_fits("a", 301)
    assert ei.value.detail == {"needed": 301, "quota": 300, "scope": "device"}
    with pytest.raises(errors.QuotaExceeded, match="graph needs 250 bytes on one device, tenant quota is "
                       "200 bytes in total"):
        p.check_fits("a", 250)
    with pytest.raises(errors.QuotaExceeded, match=r"graph needs 600 bytes on one device, the smallest device "
                       r"\(d1\) holds 500 bytes"):
        p.check_fits("b", 600)
    p.check_fits("a", 200)
    with pytest.raises(errors.QuotaExceeded, match="graph needs 310 bytes on device d0, tenant quota is 300 bytes "
                       "per device"):
        p.plan_admit("d0", "a", {1: 300}, 10, 0.0)
    with pytest.raises(errors.QuotaExceeded, match="graph needs 510 bytes on device d1, which holds 500 bytes"):
        p.plan_admit("d1", "b", {1: 500}, 10, 0.0)


def test_misuse_is_refused() -> None:
    p = Pool({"d0": 100})
    a = p.plan_admit("d0", "a", {1: 10}, 0, 0.0)
    p.add("d0", 2, "b", 10, 0.0)
    assert a is not None
    with pytest.raises(ValueError, match="stale"):
        p.commit(a, 0.0)
    a = p.plan_admit("d0", "a", {1: 10}, 0, 0.0)
    assert a is not None
    p.commit(a, 0.0)
    p.release(a)
    with pytest.raises(ValueError, match="not in flight"):
        p.release(a)
    with pytest.raises(ValueError, match="belongs to 'b'"):
        p.plan_admit("d0", "a", {2: 10}, 0, 0.0)
    with pytest.raises(ValueError, match="does not fit"):
        p.add("d0", 3, "a", 81, 0.0)
    p.set_tenant("q", device_quota=5)
    with pytest.raises(ValueError, match="past its quota"):
        p.add("d0", 4, "q", 6, 0.0)
    with pytest.raises(ValueError, match="unknown device 'gpu9'"):
        p.holds("gpu9", 1)
    with pytest.raises(ValueError, match="weight must be positive"):
        p.set_tenant("z", weight=0)


def test_remove_and_clear_device_forget_copies_without_eviction() -> None:
    seen: list[Eviction] = []
    p = Pool({"d0": 100, "d1": 100}, on_evict=seen.append)
    g = admit(p, "d0", "a", {1: 10, 2: 20}, temp=5)
    assert p.remove("d0", 1) is not None and p.remove("d0", 1) is None
    p.add("d1", 3, "a", 10, 0.0)
    assert [r.id for r in p.clear_device("d0")] == [2]
    assert p.resident_bytes() == 10 and p.reserved_bytes("d0") == 5  # the graph still holds its temps
    p.release(g)
    assert p.used("d0") == 0 and seen == []


def test_lru_order_keeps_least_recently_used_at_the_front() -> None:
    o = LruOrder()
    for i in range(4):
        o.add(Resident(i, "a", 1, float(i), i))
    assert o.touch(1, 9.0, 10) and not o.touch(42, 9.0, 11)
    assert [r.id for r in o] == [0, 2, 3, 1] and len(o) == 4 and 1 in o
    assert o.remove(2) is not None and [r.id for r in o] == [0, 3, 1]
    with pytest.raises(ValueError):
        o.add(Resident(0, "a", 1, 0.0, 12))


# -- the state machine ------------------------------------------------------------------------
DEVICES = {"d0": 100, "d1": 60}
TENANTS = ("a", "b", "c")
CATALOG = {rid: (TENANTS[rid % 3], 5 + (rid * 7) % 20) for rid in range(1, 13)}  # id -> (owner, bytes)


class PoolMachine(RuleBasedStateMachine):
    """Invariants: per-device and per-tenant sums equal the live copies and reservations; LRU order
    is tick order; graphs' residents are never evicted while in flight; capacity and quotas are never
    exceeded; ``plan_admit`` says "not now" only when evicting everything evictable would not do."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Eviction] = []
        self.p = Pool(DEVICES, on_evict=self.seen.append)
        self.quotas: dict[str, Quota] = {}
        self.live: dict[tuple[str, int], tuple[str, int]] = {}  # (device, rid) -> (tenant, bytes)
        self.gone: set[tuple[str, int]] = set()  # copies the engine removed (not evicted) at some point
        self.inflight: list[Admission] = []
        self.now = 0.0
        self.clock = itertools.count(1)

    @initialize(data=st.data())
    def setup(self, data: st.DataObject) -> None:
        for t in TENANTS:
            w = data.draw(st.sampled_from([0.5, 1.0, 2.0, 3.0]))
            dq = data.draw(st.one_of(st.none(), st.integers(30, 100)))
            tq = data.draw(st.one_of(st.none(), st.integers(40, 150)))
            self.p.set_tenant(t, w, dq, tq)
            self.quotas[t] = Quota(dq, tq)

    def tick(self) -> float:
        self.now = float(next(self.clock))
        return self.now

    def pins(self, device: str) -> set[int]:
        return {r for a in self.inflight if a.device == device for r in a.residents}

    def never_fits(self, device: str, tenant: str, residents: Mapping[int, int], temp: int) -> bool:
        q, fp = self.quotas[tenant], sum(residents.values()) + temp
        return (q.device_memory is not None and fp > q.device_memory) or (q.total is not None and fp > q.total) \
            or fp > DEVICES[device]

    def could_fit(self, device: str, tenant: str, residents: Mapping[int, int], temp: int) -> bool:
        """Whether evicting every copy that may be evicted would make room (the best any plan can do)."""
        need = sum(n for r, n in residents.items() if (device, r) not in self.live) + temp
        pinned = {d: self.pins(d) for d in DEVICES}

        def kept(d: str, r: int) -> bool:
            return r in pinned[d] or (d == device and r in residents)

        def used(d: str | None, t: str | None, only_kept: bool) -> int:
            res = sum(n for (dd, r), (tt, n) in self.live.items() if (d is None or dd == d)
                      and (t is None or tt == t) and (kept(dd, r) or not only_kept))
            return res + sum(a.temp_bytes for a in self.inflight if (d is None or a.device == d)
                             and (t is None or a.tenant == t))

        q = self.quotas[tenant]
        if q.device_memory is not None and used(device, tenant, True) + need > q.device_memory:
            return False
        if q.total is not None and used(None, tenant, True) + need > q.total:
            return False
        return used(device, None, True) + need <= DEVICES[device]

    @rule(device=st.sampled_from(sorted(DEVICES)), tenant=st.sampled_from(TENANTS), data=st.data(),
          temp=st.integers(0, 40))
    def admit(self, device: str, tenant: str, data: st.DataObject, temp: int) -> None:
        mine = [r for r, (t, _) in CATALOG.items() if t == tenant]
        rids = data.draw(st.lists(st.sampled_from(mine), max_size=3, unique=True))
        residents = {r: CATALOG[r][1] for r in rids}
        now = self.tick()
        try:
            adm = self.p.plan_admit(device, tenant, residents, temp, now)
        except errors.QuotaExceeded:
            assert self.never_fits(device, tenant, residents, temp)
            return
        assert not self.never_fits(device, tenant, residents, temp)
        if adm is None:
            assert not self.could_fit(device, tenant, residents, temp)
            return
        pinned = {d: self.pins(d) for d in DEVICES}
        for e in adm.evict:
            assert e.resident not in pinned[e.device], "evicted a resident in use"
            assert not (e.device == device and e.resident in residents), "evicted the graph's own resident"
            assert self.live[(e.device, e.resident)] == (e.tenant, e.nbytes)
            if e.reason == "quota":
                assert e.tenant == tenant
        assert {r for r, _ in adm.put} == {r for r in residents if (device, r) not in self.live}
        before = len(self.seen)
        self.p.commit(adm, now)
        assert self.seen[before:] == list(adm.evict)
        for e in adm.evict:
            del self.live[(e.device, e.resident)]
        for r, n in adm.put:
            self.live[(device, r)] = (tenant, n)
        self.inflight.append(adm)

    @precondition(lambda self: bool(self.inflight))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        adm = data.draw(st.sampled_from(self.inflight))
        self.inflight.remove(adm)
        self.p.release(adm)

    @rule(device=st.sampled_from(sorted(DEVICES)), rid=st.sampled_from(sorted(CATALOG)))
    def add(self, device: str, rid: int) -> None:
        tenant, n = CATALOG[rid]
        q = self.quotas[tenant]
        ok = (device, rid) not in self.live and self.p.used(device) + n <= DEVICES[device] \
            and (q.device_memory is None or self.p.used(device, tenant) + n <= q.device_memory) \
            and (q.total is None or self.p.used(tenant=tenant) + n <= q.total)
        if ok:
            self.p.add(device, rid, tenant, n, self.tick())
            self.live[(device, rid)] = (tenant, n)
        else:
            with pytest.raises(ValueError):
                self.p.add(device, rid, tenant, n, self.tick())

    @rule(device=st.sampled_from(sorted(DEVICES)), rid=st.sampled_from(sorted(CATALOG)))
    def touch(self, device: str, rid: int) -> None:
        self.p.touch(device, rid, self.tick())

    @rule(device=st.sampled_from(sorted(DEVICES)), rid=st.sampled_from(sorted(CATALOG)))
    def remove(self, device: str, rid: int) -> None:
        gone = self.p.remove(device, rid)
        assert (gone is not None) == ((device, rid) in self.live)
        if self.live.pop((device, rid), None) is not None:
            self.gone.add((device, rid))

    @rule(device=st.sampled_from(sorted(DEVICES)))
    def worker_dies(self, device: str) -> None:
        self.p.clear_device(device)
        for key in [k for k in self.live if k[0] == device]:
            del self.live[key]
            self.gone.add(key)

    @invariant()
    def accounting_sums(self) -> None:
        for d in DEVICES:
            assert {r.id for r in self.p.residents(d)} == {r for dd, r in self.live if dd == d}
            ticks = [r.tick for r in self.p.residents(d)]
            assert ticks == sorted(ticks)  # least recently used at the front
            for t in (*TENANTS, None):
                assert self.p.resident_bytes(d, t) == sum(n for (dd, _), (tt, n) in self.live.items()
                                                          if dd == d and t in (None, tt))
                assert self.p.reserved_bytes(d, t) == sum(a.temp_bytes for a in self.inflight
                                                          if a.device == d and t in (None, a.tenant))
            for r in CATALOG:
                assert self.p.pinned(d, r) == sum(r in a.residents for a in self.inflight if a.device == d)
        for t in TENANTS:
            assert self.p.resident_bytes(tenant=t) == sum(n for tt, n in self.live.values() if tt == t)
        assert self.p.inflight == len(self.inflight)

    @invariant()
    def capacity_and_quotas_hold(self) -> None:
        for d, cap in DEVICES.items():
            assert self.p.used(d) <= cap
            for t, q in self.quotas.items():
                assert q.device_memory is None or self.p.used(d, t) <= q.device_memory
        for t, q in self.quotas.items():
            assert q.total is None or self.p.used(tenant=t) <= q.total

    @invariant()
    def graphs_in_flight_keep_their_residents(self) -> None:
        # Only the engine saying a copy is gone (remove, worker_dies) may take one away, never a plan.
        for a in self.inflight:
            for r in a.residents:
                assert (a.device, r) in self.live or (a.device, r) in self.gone


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
