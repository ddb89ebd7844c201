"""The direct path (CPU device): a session alone on the devices gets a lease, and its runs go from
its ring straight to the device worker and back, with every guarantee of the broker's path.

``direct_after = 4`` here: after four runs in a row from one session the broker grants the lease.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from typing import Any

import numpy as np
import pytest

import tenantlib
from broker import protocol as P
from broker import records
from broker.ring import Consumer
from tenantlib import errors
from tenantlib import kernels as K
from tenantlib.kernels import testing
from tests.conftest import BrokerFactory, broker_pid, children, wait_for
from tests.test_hotpath import SLOT, RingTenant, vadd

CONFIG = "direct_after = 4\n"
N = 256


def stats(c: tenantlib.Client) -> dict[str, int]:
    return c.status()["stats"]  # type: ignore[no-any-return]


def leased(c: tenantlib.Client, g: tenantlib.Graph) -> int:
    """Run ``g`` until the session's runs take the direct path; returns how many runs that took."""
    runs = 0

    def run_and_look() -> dict[str, int]:
        nonlocal runs
        c.run(g)
        runs += 1
        return stats(c)

    wait_for(run_and_look, lambda s: s["leases"] >= 1 and s["direct_runs"] >= 1, "the lease")
    return runs


def tenant_row(c: tenantlib.Client, admin: tenantlib.Client) -> dict[str, Any]:
    (row,) = [t for t in admin.admin("tenants") if t["tenant"] == c.tenant]
    return row  # type: ignore[no-any-return]


def test_a_session_alone_takes_the_direct_path_with_correct_results(broker_factory: BrokerFactory) -> None:
    b = broker_factory(CONFIG)
    with tenantlib.connect(b.socket) as c:
        g, x, y, z = vadd(c)
        first = leased(c, g)
        rng = np.random.default_rng(5)
        for _ in range(200):
            x[...] = rng.standard_normal(N, dtype=np.float32)
            y[...] = rng.standard_normal(N, dtype=np.float32)
            z[...] = np.nan
            r = c.run(g)
            np.testing.assert_array_equal(z, x + y)
            assert r.device == c.devices[0]
        s = wait_for(lambda: stats(c), lambda s: s["direct_runs"] >= 200, "the direct runs counted")
        assert s["leases"] == 1, s
        traced = c.run(g, trace=True)
        assert set(traced.hops) == set(P.DIRECT_HOPS) and all(v >= 0 for v in traced.hops.values()), traced.hops
        # The broker's books count the direct runs (folded from the lease page ten times a second).
        total = first + 201
        wait_for(lambda: stats(c)["graphs"], lambda n: n == total, "the direct runs in the broker's totals")
        row = tenant_row(c, c)
        assert row["graphs"] == total and row["device_seconds"] > 0, row


def test_the_lease_takes_new_graphs_and_arenas_and_literals_that_change(broker_factory: BrokerFactory) -> None:
    b = broker_factory(CONFIG)
    with tenantlib.connect(b.socket) as c:
        g, x, y, z = vadd(c)
        leased(c, g)
        lib = K.library(c)
        for step in range(1, 40):  # a literal that changes every run (axpy's alpha)
            u, v = c.array(64), c.array(64)  # and a new arena each time: registered while leased
            u[...] = 1.0
            v[...] = 2.0
            h = c.graph()
            grid, block = K.launch_1d(64)
            h.kernel(lib, "axpy", grid=grid, block=block, args=[float(step), h.input(u), h.inout(v), 64])
            c.run(h)
            np.testing.assert_array_equal(v, np.full(64, 2.0 + step, dtype=np.float32))
        s = wait_for(lambda: stats(c), lambda s: s["direct_runs"] >= 39, "the direct runs counted")
        assert s["leases"] == 1, s


def leased_sessions(c: tenantlib.Client) -> int:
    """The sessions of ``c``'s tenant on the direct path now (``kaasctl tenants``' direct column)."""
    return int(tenant_row(c, c)["leased"])


def alternate(a: tenantlib.Client, ga: tenantlib.Graph, za: np.ndarray, b: tenantlib.Client,
              gb: tenantlib.Graph, zb: np.ndarray, runs: int) -> None:
    """``runs`` runs of each session in turn, each result checked (a is 1 + 2, b is 10 + 20)."""
    for _ in range(runs):
        za[...] = np.nan
        zb[...] = np.nan
        a.run(ga)
        b.run(gb)
        np.testing.assert_array_equal(za, np.full(N, 3.0, dtype=np.float32))
        np.testing.assert_array_equal(zb, np.full(N, 30.0, dtype=np.float32))


def test_sessions_busy_at_once_each_get_a_lease_and_keep_correct_results(broker_factory: BrokerFactory) -> None:
    b = broker_factory(CONFIG)  # shared leases: the default
    with tenantlib.connect(b.socket) as a, tenantlib.connect(b.socket) as other:
        ga, xa, ya, za = vadd(a)
        gb, xb, yb, zb = vadd(other)
        xa[...], ya[...], xb[...], yb[...] = 1.0, 2.0, 10.0, 20.0
        leased(a, ga)

        def both() -> int:
            alternate(a, ga, za, other, gb, zb, 5)
            return leased_sessions(a)  # (one tenant, two sessions)

        wait_for(both, lambda n: n == 2, "a lease for each session")
        before = stats(a)["direct_runs"]
        alternate(a, ga, za, other, gb, zb, 100)  # every run straight to the worker, from both rings
        s = wait_for(lambda: stats(a), lambda s: s["direct_runs"] >= before + 200, "both sessions' direct runs")
        assert s["leases"] == 2 and leased_sessions(a) == 2, s


def test_a_busy_session_that_cannot_be_leased_ends_the_leases(broker_factory: BrokerFactory) -> None:
    b = broker_factory(CONFIG)
    with tenantlib.connect(b.socket) as a, tenantlib.connect(b.socket, rings=False) as frames:
        ga, xa, ya, za = vadd(a)
        gb, xb, yb, zb = vadd(frames)  # runs as frames: never on the direct path
        xa[...], ya[...], xb[...], yb[...] = 1.0, 2.0, 10.0, 20.0
        leased(a, ga)

        def mixed() -> int:
            alternate(a, ga, za, frames, gb, zb, 5)
            return leased_sessions(a)

        # The broker's scheduler orders both again (fair shares hold against a session it must run).
        wait_for(mixed, lambda n: n == 0, "the lease ended by the busy frames session")
        alternate(a, ga, za, frames, gb, zb, 20)
        assert leased_sessions(a) == 0
        wait_for(lambda: (a.run(ga), leased_sessions(a))[1], lambda n: n == 1, "a lease again once it went quiet")


def test_without_shared_leases_another_sessions_run_ends_the_lease(broker_factory: BrokerFactory) -> None:
    b = broker_factory(CONFIG + "shared_leases = false\n")
    with tenantlib.connect(b.socket) as a, tenantlib.connect(b.socket) as other:
        ga, xa, ya, za = vadd(a)
        gb, xb, yb, zb = vadd(other)
        xa[...], ya[...], xb[...], yb[...] = 1.0, 2.0, 10.0, 20.0
        leased(a, ga)
        alternate(a, ga, za, other, gb, zb, 60)  # each of the other's runs ends any lease of a
        s = stats(a)
        assert s["leases"] == 1, s  # contention keeps both on the broker's path
        leases = lambda: (a.run(ga), stats(a)["leases"])[1]  # noqa: E731
        wait_for(leases, lambda n: n == 2, "a lease again once the other went quiet")


def test_bad_runs_on_the_direct_path_get_the_brokers_typed_errors(broker_factory: BrokerFactory) -> None:
    b = broker_factory(CONFIG)
    t = DirectRingTenant(b.socket)
    try:
        t.data[:N] = np.arange(N)
        t.data[N:2 * N] = 1.0
        t.lease()
        cases = [(20, 999, t.slices(), "unknown_graph"),
                 (21, t.handle, (t.arena, 0, t.arena, SLOT, t.arena, 3 * SLOT), "out_of_bounds"),
                 (22, t.handle, (t.arena, 0, t.arena, SLOT, t.arena, 2), "misaligned"),
                 (23, t.handle, (77, 0, t.arena, SLOT, t.arena, 2 * SLOT), "unknown_arena")]
        for req, handle, slices, code in cases:
            t.push(records.encode_run(t.st, req, handle, slices, (N,), 0.0))
            err = t.conn.recv()
            assert isinstance(err, P.Error) and err.code == code and err.req == req, err
        t.push(b"\x07" + records.encode_run(t.st, 24, t.handle, t.slices(), (N,), 0.0)[1:])
        err = t.conn.recv()
        assert isinstance(err, P.Error) and err.code == "malformed_frame", err
        kind, got, *_ = records.decode_done(t.run(30))
        assert (kind, got) == (records.DONE, 30)
        np.testing.assert_array_equal(t.data[2 * N:3 * N], np.arange(N, dtype=np.float32) + 1)
    finally:
        t.close()


def test_a_tenant_scribbling_over_its_leased_ring_loses_only_its_session(broker_factory: BrokerFactory) -> None:
    b = broker_factory(CONFIG)
    t = DirectRingTenant(b.socket)
    with tenantlib.connect(b.socket) as c:
        try:
            t.lease()
            (worker,) = children(broker_pid(b))
            struct.pack_into("<Q", t.mm, t.geom.offset(0) + 64, 10**9)  # ring 0's head, far past its slots
            os.eventfd_write(t.wake_broker, 1)
            err = t.conn.recv()
            assert isinstance(err, P.Error) and err.code == "ring_corrupt", err
            assert t.conn.closed_by_peer()
            g, x, y, z = vadd(c)
            x[...] = 1.0
            y[...] = 2.0
            for _ in range(10):
                c.run(g)
            np.testing.assert_array_equal(z, np.full(N, 3.0, dtype=np.float32))
            assert children(broker_pid(b)) == {worker}, "the worker reading the ring must survive it"
        finally:
            t.close()


def test_a_worker_killed_mid_lease_loses_no_run_and_runs_none_twice(broker_factory: BrokerFactory) -> None:
    b = broker_factory(CONFIG)
    with tenantlib.connect(b.socket) as c:
        g, x, y, z = vadd(c, 4096)
        x[...] = 1.0
        y[...] = 5.0
        runs = 0
        for _attempt in range(5):  # until a kill finds runs taken and unfinished (almost always the first)
            runs += leased(c, g)
            (worker,) = children(broker_pid(b))
            pending = [c.submit(g) for _ in range(300)]
            os.kill(worker, signal.SIGKILL)
            for p in pending:
                p.result()  # taken by the dead worker and unfinished: replayed by the broker
            runs += 300
            np.testing.assert_array_equal(z, np.full(4096, 6.0, dtype=np.float32))
            wait_for(lambda: children(broker_pid(b)), lambda s, w=worker: len(s) == 1 and w not in s,  # type: ignore[misc]
                     "a new worker")
            if stats(c)["replays"] > 0:
                break
        assert stats(c)["replays"] > 0, "no kill found a run on the direct path"
        # Exactly once: the broker counted each run one time, however it finished.
        wait_for(lambda: tenant_row(c, c)["graphs"], lambda n: n == runs, "every run counted once", 10)


def test_a_session_whose_worker_died_is_leased_again_at_its_next_success(broker_factory: BrokerFactory) -> None:
    # Its lease ended for the device's reasons, not its own: it does not wait out a new streak of
    # direct_after runs (the least weighted tenant would come back last, with the device to itself).
    b = broker_factory("direct_after = 40\n")
    with tenantlib.connect(b.socket) as c:
        g, x, y, z = vadd(c)
        x[...], y[...] = 1.0, 2.0
        leased(c, g)
        (worker,) = children(broker_pid(b))
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: children(broker_pid(b)), lambda s: len(s) == 1 and worker not in s, "a new worker")
        leases = lambda: (c.run(g), stats(c)["leases"])[1]  # noqa: E731
        runs = 0

        def run_and_count() -> int:
            nonlocal runs
            runs += 1
            return leases()

        wait_for(run_and_count, lambda n: n == 2, "the lease again")
        assert runs < 40, runs
        np.testing.assert_array_equal(z, np.full(N, 3.0, dtype=np.float32))


def test_a_hanging_kernel_on_the_direct_path_is_killed_at_its_deadline(broker_factory: BrokerFactory) -> None:
    b = broker_factory(CONFIG + 'host_modules = ["tenantlib.kernels.host", "tenantlib.kernels.testing"]\n')
    with tenantlib.connect(b.socket) as c:
        g, x, y, z = vadd(c)
        x[...] = 1.0
        y[...] = 1.0
        leased(c, g)
        lib = c.library(K.SOURCE + '\nextern "C" __global__ void hang() {}\n', kernels=[testing.HANG], name="bad")
        h = c.graph()
        h.kernel(lib, "hang", grid=1, block=1, args=[])
        escalated_before = stats(c)["direct_runs"]
        with pytest.raises(errors.DeadlineExceeded, match="deadline of 1 s"):
            c.run(h, timeout=1.0)
        s = stats(c)
        assert s["deadline_kills"] == 1 and s["leases"] == 1 and s["replays"] == 0, s  # killed on the direct path
        assert s["direct_runs"] >= escalated_before
        wait_for(lambda: stats(c)["worker_restarts"], lambda n: n >= 1, "the worker's respawn", 60)
        z[...] = np.nan
        c.run(g)
        np.testing.assert_array_equal(z, np.full(N, 2.0, dtype=np.float32))


def test_a_graph_released_while_leased_is_unknown_to_the_next_run(broker_factory: BrokerFactory) -> None:
    b = broker_factory(CONFIG)
    t = DirectRingTenant(b.socket)
    try:
        t.lease()
        t.conn.send(P.ReleaseGraph(50, t.handle))
        done = t.conn.recv()
        assert isinstance(done, P.Done) and done.req == 50, done
        t.push(records.encode_run(t.st, 51, t.handle, t.slices(), (N,), 0.0))
        err = t.conn.recv()
        assert isinstance(err, P.Error) and err.code == "unknown_graph" and err.req == 51, err
    finally:
        t.close()


def test_completions_that_find_ring_2_full_are_delivered_once_each(broker_factory: BrokerFactory) -> None:
    b = broker_factory(CONFIG)
    t = DirectRingTenant(b.socket)
    try:
        t.lease()
        before = t.req - 1000  # runs so far (request ids count from 1001)
        first = t.req + 1
        reqs = list(range(first, first + 400))
        for req in reqs:  # ring 2 holds 256: the rest come back through the broker, unread meanwhile
            rec = records.encode_run(t.st, req, t.handle, t.slices(), (N,), 0.0)
            wait_for(lambda rec=rec: t.runs.push(rec), bool, "room on ring 0")  # type: ignore[misc]
            os.eventfd_write(t.wake_broker, 1)
        got: list[int] = []
        end = time.monotonic() + 30
        while len(got) < len(reqs) and time.monotonic() < end:
            for ring in (t.direct, t.done):
                while (rec := ring.pop()) is not None:
                    got.append(records.decode_done(rec)[1])
            if t._socket_has_data():
                while t.conn._pending:
                    msg = t.conn.recv()
                    assert isinstance(msg, P.GraphDone), msg
                    got.append(msg.req)
            time.sleep(0.001)
        assert sorted(got) == reqs  # each exactly once
        with tenantlib.connect(b.socket) as admin:
            wait_for(lambda: tenant_row(admin, admin)["graphs"], lambda n: n == before + 400, "every run charged once")
    finally:
        t.close()


def test_a_kernel_quarantined_while_leased_is_refused(broker_factory: BrokerFactory) -> None:
    b = broker_factory(CONFIG + 'host_modules = ["tenantlib.kernels.host", "tenantlib.kernels.testing"]\n'
                                "quarantine_after = 2\n")
    with tenantlib.connect(b.socket) as c:
        g, x, y, z = vadd(c)
        lib = c.library(K.SOURCE + '\nextern "C" __global__ void crash() {}\n', kernels=[testing.CRASH], name="bad")
        h = c.graph()
        h.kernel(lib, "crash", grid=1, block=1, args=[])
        for _ in range(2):
            leased(c, g)
            with pytest.raises(errors.WorkerLost):
                c.run(h, timeout=30)
            wait_for(lambda: children(broker_pid(b)), lambda s: len(s) == 1, "a new worker")
        with pytest.raises(errors.Quarantined):
            c.run(h, timeout=30)
        z[...] = np.nan
        c.run(g)
        assert np.isfinite(z).all()


def test_draining_the_leased_device_moves_the_session_to_another(broker_factory: BrokerFactory) -> None:
    b = broker_factory(CONFIG, device="cpu:0,1")
    with tenantlib.connect(b.socket) as c:
        g, x, y, z = vadd(c)
        leased(c, g)
        where = c.run(g).device
        c.admin("drain", device=where)
        others = {c.run(g).device for _ in range(20)}
        assert where not in others, others


class DirectRingTenant(RingTenant):
    """A raw ring tenant that also reads ring 2, where a leased session's completions arrive."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.direct = Consumer(self.mm, self.geom, 2)
        self.direct_seen = 0
        self.req = 1000

    def lease(self) -> None:
        """Run until completions come back on ring 2 (request ids from 1000 up)."""
        def run() -> int:
            self.req += 1
            kind, got, *_ = records.decode_done(self.run(self.req))
            assert (kind, got) == (records.DONE, self.req)
            return self.direct_seen

        wait_for(run, lambda n: n > 0, "completions on ring 2")

    def completion(self, req: int) -> bytes:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            rec = self.done.pop()
            if rec is None:
                rec = self.direct.pop()
                if rec is not None:
                    self.direct_seen += 1
            if rec is not None:
                return rec
            if self._socket_has_data():
                raise AssertionError(f"a frame came instead of the completion of {req}: {self.conn.recv()!r}")
            time.sleep(0.0005)
        raise AssertionError(f"no completion of {req}")

    def close(self) -> None:
        self.direct.close()
        super().close()
