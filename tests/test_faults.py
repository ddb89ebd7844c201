"""Fault containment on the CPU device: one tenant's crashing or hanging kernel costs no one else.

The culprit's graph fails with a typed error naming what happened; graphs of other tenants that
were in flight on the same worker are replayed and complete with correct results; the worker comes
back; a kernel that keeps faulting is quarantined.
"""

from __future__ import annotations

import numpy as np
import pytest

import tenantlib
from tenantlib import errors, kernels
from tenantlib.kernels import testing
from tests.conftest import BrokerFactory, wait_for

CONFIG = ('host_modules = ["tenantlib.kernels.host", "tenantlib.kernels.testing"]\n'
          "lanes_cpu = 4\nquarantine_after = 2\n")
BAD_SOURCE = kernels.SOURCE + '\nextern "C" __global__ void crash() {}\nextern "C" __global__ void hang() {}\n'
N = 192  # sgemm size: a few ms per graph on the CPU device, so several are in flight at once


def _sgemm_jobs(client: tenantlib.Client, count: int) -> list[tuple[tenantlib.PendingRun, np.ndarray, np.ndarray,
                                                                    np.ndarray]]:
    lib = kernels.library(client)
    rng = np.random.default_rng()
    work = []
    for _ in range(count):
        A, B, C = client.array((N, N)), client.array((N, N)), client.array((N, N))
        A[...] = rng.standard_normal((N, N))
        B[...] = rng.standard_normal((N, N))
        C[...] = np.nan
        g = client.graph()
        grid, block = kernels.sgemm_launch(N, N)
        g.kernel(lib, "sgemm", grid=grid, block=block, args=[g.input(A), g.input(B), g.output(C), N, N, N])
        work.append((g, A, B, C))
    return [(client.submit(g, timeout=60), A, B, C) for g, A, B, C in work]


def _all_correct(jobs: list[tuple[tenantlib.PendingRun, np.ndarray, np.ndarray, np.ndarray]]) -> None:
    for pending, A, B, C in jobs:
        pending.result()
        np.testing.assert_allclose(C, kernels.ref_sgemm(A, B), rtol=1e-4, atol=1e-3)


def _wait_restarts(client: tenantlib.Client, n: int) -> None:
    wait_for(lambda: client.status()["stats"]["worker_restarts"], lambda r: r >= n, "the worker's respawn", 60)


def _bad_graph(client: tenantlib.Client, kernel: str) -> tenantlib.Graph:
    lib = client.library(BAD_SOURCE, kernels=[testing.CRASH, testing.HANG], name="bad")
    g = client.graph()
    g.kernel(lib, kernel, grid=1, block=1, args=[])
    return g


def test_crashing_kernel_costs_only_its_tenant(broker_factory: BrokerFactory) -> None:
    b = broker_factory(CONFIG)
    with tenantlib.connect(b.socket) as a, tenantlib.connect(b.socket) as c, tenantlib.connect(b.socket) as bad:
        bad_graph = _bad_graph(bad, "crash")
        jobs_a = _sgemm_jobs(a, 4)
        culprit = bad.submit(bad_graph, timeout=60)
        jobs_c = _sgemm_jobs(c, 4)
        with pytest.raises(errors.WorkerLost, match="killed the device worker") as ei:
            culprit.result()
        assert ei.value.detail["culprit"] is True and ei.value.detail["exit_code"] == testing.CRASH_EXIT_CODE
        _all_correct(jobs_a)
        _all_correct(jobs_c)
        stats = a.status()["stats"]
        assert stats["worker_restarts"] >= 1
        _all_correct(_sgemm_jobs(a, 2))  # the device is back


def test_hanging_kernel_is_killed_at_its_deadline_and_others_replay(broker_factory: BrokerFactory) -> None:
    b = broker_factory(CONFIG)
    with tenantlib.connect(b.socket) as a, tenantlib.connect(b.socket) as c, tenantlib.connect(b.socket) as bad:
        hang = _bad_graph(bad, "hang")
        jobs_a = _sgemm_jobs(a, 3)
        culprit = bad.submit(hang, timeout=1.0)
        jobs_c = _sgemm_jobs(c, 3)
        with pytest.raises(errors.DeadlineExceeded, match="deadline of 1 s") as ei:
            culprit.result()
        assert "hang" in str(ei.value)
        _all_correct(jobs_a)
        _all_correct(jobs_c)
        _wait_restarts(a, 1)
        st = a.status()["stats"]
        assert st["deadline_kills"] == 1
        _all_correct(_sgemm_jobs(c, 2))


def test_repeat_offender_is_quarantined_and_its_other_kernels_are_not(broker_factory: BrokerFactory) -> None:
    b = broker_factory(CONFIG)
    with tenantlib.connect(b.socket) as bad, tenantlib.connect(b.socket) as same_tenant:
        g = _bad_graph(bad, "crash")
        for n in (1, 2):  # quarantine_after = 2
            with pytest.raises(errors.WorkerLost):
                bad.run(g, timeout=60)
            _wait_restarts(bad, n)
        with pytest.raises(errors.Quarantined, match="'crash' faulted 2 times"):
            bad.run(g)
        # the tenant's other kernels still run; the quarantined one is refused in any of its sessions
        _all_correct(_sgemm_jobs(same_tenant, 2))
        with pytest.raises(errors.Quarantined):
            same_tenant.run(_bad_graph(same_tenant, "crash"))


def test_library_allowlist_admits_only_vetted_digests(broker_factory: BrokerFactory) -> None:
    from broker.engine import library_digest

    vetted = library_digest("cuda", kernels.SOURCE.encode(), kernels.KERNELS, ())
    b = broker_factory(f'[tenant_defaults]\nlibraries = ["{vetted}"]\n')
    with tenantlib.connect(b.socket) as c:
        assert kernels.library(c).digest == vetted
        with pytest.raises(errors.PermissionDenied, match="not on this tenant's list of vetted libraries"):
            kernels.library(c, options=["-DUNVETTED=1"])


def test_dedicated_tenant_gets_its_own_worker_and_only_its_arenas(broker_factory: BrokerFactory) -> None:
    """isolation = "dedicated": the tenant's graphs run in its own worker process (its own context),
    which maps only its arenas; other tenants never run there, and a crash there costs them nothing."""
    import os

    from tests.conftest import broker_pid, children

    b = broker_factory(CONFIG + f'[[tenants]]\nname = "vip"\nuid = {os.getuid()}\nisolation = "dedicated"\n')
    with tenantlib.connect(b.socket) as vip:
        jobs = _sgemm_jobs(vip, 3)
        _all_correct(jobs)
        assert {p.result().device for p, *_ in jobs} == {"cpu:0#vip"}
        devices = {d["device"]: d for d in vip.status()["devices"]}
        assert devices["cpu:0#vip"]["tenant"] == "vip" and devices["cpu:0"]["tenant"] is None
        assert len(children(broker_pid(b))) == 2  # the shared worker and vip's own
        dedicated_pid, shared_pid = devices["cpu:0#vip"]["pid"], devices["cpu:0"]["pid"]
        # vip's arenas (shared-memory segments) are held by its own worker and not by the shared one
        assert _shm_fds(dedicated_pid) >= 9 and _shm_fds(shared_pid) == 0
        # a crash in vip's own worker: vip's graph fails, its worker comes back, the shared one never died
        with pytest.raises(errors.WorkerLost):
            vip.run(_bad_graph(vip, "crash"), timeout=60)
        _wait_restarts(vip, 1)
        after = {d["device"]: d for d in vip.status()["devices"]}
        assert after["cpu:0"]["pid"] == shared_pid and after["cpu:0#vip"]["pid"] != dedicated_pid
        _all_correct(_sgemm_jobs(vip, 2))
    # the last session gone: its workers stop
    wait_for(lambda: len(children(broker_pid(b))), lambda n: n == 1, "the dedicated worker's retirement")


def _shm_fds(pid: int) -> int:
    import os

    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(("/dev/shm/", "/memfd:kaas-arena")):
                n += 1
        except OSError:
            continue
    return n
