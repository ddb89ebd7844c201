"""Fair share end to end on the CPU device, with real tenant processes under distinct uids.

Shares are of *measured device time* (what the worker reports per graph), over a 20 s window.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import tenantlib
from bench import fairness
from tenantlib import errors, kernels
from tests.conftest import BrokerFactory

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="tenants under distinct uids need root (CI runs as root)")


@pytest.mark.parametrize("weights", [[1.0, 1.0], [2.0, 1.0]])
def test_saturating_tenants_get_their_weighted_share(weights: list[float], broker_env: dict[str, str]) -> None:
    res = fairness.run("cpu", weights, 20.0, warmup=2.0, workload="sgemm", size=96, inflight=4, env=broker_env)
    for t in res["tenants"]:
        assert t["correct"], t
        assert abs(t["share"] - t["target_share"]) <= 0.05, res["tenants"]
    # Both saturating sessions hold leases: the shares are the device worker's fair queue's
    # (broker/streams/direct.py), not the broker's scheduler's.
    assert res["leases"] >= 2 and res["direct_runs"] > res["graphs"] // 2, res


def test_light_latency_tenant_is_not_stuck_behind_a_heavy_one(broker_env: dict[str, str]) -> None:
    """Bound: a latency-class tenant is served ahead of a saturating tenant's queue.

    The heavy tenant keeps 8 graphs submitted, so its round trip is about 8 graph services; the
    light tenant (latency class, one graph at a time) waits only for the graphs already on the
    device's lanes. Stated bound, checked here: light p50 < heavy p50, and light p99 <= 3 x heavy
    p99 (the heavy tenant's own tail, which includes its 8-deep queue). Under FCFS both wait in the
    same queue and the light p50 is no better than the heavy one (measured on the 2-core CI machine:
    fair 0.82 vs 1.25 ms, fcfs 2.13 vs 1.98 ms). On two cores shared by the broker, its worker and
    both tenants, the tails are mostly the OS scheduler's: hence the factor on p99.
    """
    res = fairness.run("cpu", [1.0, 1.0], 10.0, warmup=2.0, workload="sgemm", size=128, inflight=8, light=True,
                       env=broker_env)
    heavy, light = res["tenants"]
    assert light["graphs"] > 50 and light["correct"] and heavy["correct"]
    assert light["p50_ms"] < heavy["p50_ms"], (light, heavy)
    assert light["p99_ms"] <= 3 * heavy["p99_ms"], (light, heavy)


def test_quota_refuses_a_graph_that_can_never_fit(broker_factory: BrokerFactory) -> None:
    b = broker_factory("[tenant_defaults]\ndevice_memory = 100000\n")
    with tenantlib.connect(b.socket) as c:
        lib = kernels.library(c)
        small, big = c.array(1000), c.array(50000)
        g = c.graph()
        g.kernel(lib, "vadd", grid=4, block=256, args=[g.input(small), g.input(small), g.output(small), 1000])
        c.run(g)
        g = c.graph()
        g.kernel(lib, "vadd", grid=4, block=256, args=[g.input(big), g.input(big), g.output(big), 50000])
        with pytest.raises(errors.QuotaExceeded, match="tenant quota is 100000 bytes per device") as ei:
            c.run(g)
        assert ei.value.detail["needed"] == 400000


def test_residents_beyond_the_quota_evict_the_tenants_coldest(broker_factory: BrokerFactory) -> None:
    b = broker_factory("[tenant_defaults]\ndevice_memory = 120000\n")
    rng = np.random.default_rng()
    with tenantlib.connect(b.socket) as c:
        lib = kernels.library(c)
        n = 10000  # 40 kB each: two residents and a graph's copies fit, three residents do not
        xs = [c.array(n) for _ in range(3)]
        for x in xs:
            x[...] = rng.standard_normal(n)
        res = [c.resident(x) for x in xs]
        out = c.array(n)

        def use(r: tenantlib.Resident, x: np.ndarray) -> None:
            g = c.graph()
            g.kernel(lib, "vadd", grid=40, block=256, args=[g.resident(r), g.resident(r), g.output(out), n])
            c.run(g)
            np.testing.assert_array_equal(out, x + x)

        use(res[0], xs[0])
        use(res[1], xs[1])
        assert c.status()["stats"]["evictions"] == 0
        use(res[0], xs[0])      # res[1] is now the coldest
        use(res[2], xs[2])      # needs room: evicts its own coldest (res[1]), not res[0]
        st = c.status()["stats"]
        assert st["evictions"] == 1
        puts = st["resident_puts"]
        use(res[0], xs[0])      # still resident: nothing copied
        assert c.status()["stats"]["resident_puts"] == puts
        use(res[1], xs[1])      # was evicted: copied again from the broker's host copy, still correct
        assert c.status()["stats"]["resident_puts"] == puts + 1


def test_max_queued_refuses_and_nothing_accepted_is_lost(broker_factory: BrokerFactory) -> None:
    b = broker_factory("[tenant_defaults]\nmax_queued = 6\nmax_inflight = 2\n")
    with tenantlib.connect(b.socket) as c:
        lib = kernels.library(c)
        n = 160
        A, B, C = c.array((n, n)), c.array((n, n)), c.array((n, n))
        A[...] = 1.0
        B[...] = 2.0
        g = c.graph()
        grid, block = kernels.sgemm_launch(n, n)
        g.kernel(lib, "sgemm", grid=grid, block=block, args=[g.input(A), g.input(B), g.output(C), n, n, n])
        pend = [c.submit(g) for _ in range(20)]
        ok = refused = 0
        for p in pend:
            try:
                p.result()
                ok += 1
            except errors.TooManyRequests as exc:
                assert "limit 6" in str(exc)
                refused += 1
        assert ok >= 6 and refused >= 1 and ok + refused == 20
        np.testing.assert_array_equal(C, np.full((n, n), 2.0 * n, np.float32))
