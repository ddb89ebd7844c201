"""Fault containment on CUDA, through a real broker: one tenant's fault costs no one else.

The CUDA versions of tests/test_faults.py.  A tenant runs a kernel that stores through the bogus
pointer 0x10 (``CUDA_ERROR_ILLEGAL_ADDRESS``: the worker's context is dead for good), or one that
spins on a flag nobody sets, with ``timeout=1.0``; meanwhile tenant A has long sgemm graphs in
flight and sends more, and tenant C runs small vadd graphs back to back.  The culprit gets its
typed error, A's and C's results are all checked against numpy, the worker comes back, and later
graphs run.  The scenario and its timings come from ``bench.recovery`` (the benchmark measures
the same thing over repeats); each fault runs once per module and several tests read it.

Set ``KAAS_FAULT_LOGS`` to a directory to keep each broker's log there.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import numpy as np
import pytest

import tenantlib
from bench import recovery
from bench.recovery import CUDA_KERNELS, CUDA_SOURCE, Sample
from tenantlib import errors, kernels
from tests.gpu.test_cuda_backend import _no_cuda_reason
from tools.broker_process import BrokerProcess

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_no_cuda_reason()), reason=_no_cuda_reason() or "-")]

STICKY = ("CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_LAUNCH_FAILED")  # what the driver may call the store


@contextlib.contextmanager
def cuda_broker(env: dict[str, str], name: str, extra_config: str = "") -> Iterator[BrokerProcess]:
    """A broker on CUDA with the fault config; fails the test if it logged errors or tracebacks."""
    logs = os.environ.get("KAAS_FAULT_LOGS")
    log = None
    if logs:
        os.makedirs(logs, exist_ok=True)
        log = os.path.join(logs, f"broker-{name}.log")
    with recovery.broker("cuda", log=log, env=env, extra_config=extra_config) as b:
        yield b
    assert not b.problems(), "the broker logged problems:\n" + "\n".join(b.problems())


def _fault(env: dict[str, str], kind: str) -> Iterator[Sample]:
    with cuda_broker(env, kind) as b:
        rig = recovery.Rig(b.socket, "cuda")
        try:
            sample = rig.fault(kind)
        finally:
            rig.close()
        print(f"\n{sample.summary()}")
        yield sample


@pytest.fixture(scope="module")
def illegal(broker_env: dict[str, str]) -> Iterator[Sample]:
    yield from _fault(broker_env, "illegal_address")


@pytest.fixture(scope="module")
def hang(broker_env: dict[str, str]) -> Iterator[Sample]:
    yield from _fault(broker_env, "hang")


def _innocent_errors(s: Sample) -> str:
    return "\n".join(f"  {o.tenant} sent +{(o.submitted - s.outcomes[0].submitted) * 1e3:.1f} ms: {o.error} {o.detail}"
                     for o in s.outcomes if not o.ok)


# -- (a) an illegal address ----------------------------------------------------------------------
def test_illegal_address_fails_the_culprit_with_a_kernel_fault(illegal: Sample) -> None:
    s = illegal
    assert s.culprit_error == "KernelFault", (s.culprit_error, s.culprit_message, s.culprit_detail)
    assert s.culprit_detail["cuda_error"] in STICKY, s.culprit_detail
    assert s.culprit_detail["cuda_error"] in s.culprit_message
    assert s.culprit_detail["kernel"] == "poke", s.culprit_detail


def test_illegal_address_worker_comes_back_and_later_graphs_run(illegal: Sample) -> None:
    s = illegal
    assert s.restarts, "the worker was not restarted"
    assert s.stats_after["worker_restarts"] > s.stats_before["worker_restarts"]
    assert s.later_ok, "graphs sent after the recovery failed or were wrong"


def test_illegal_address_recovery_time(illegal: Sample) -> None:
    s = illegal
    print(f"\nillegal address: culprit's error +{s.culprit_error_s:.3f} s, restarts at "
          f"{[round(t, 3) for t in s.restarts]} s (respawns {[round(t, 3) for t in s.respawns]} s), first "
          f"other tenant's graph +{s.recovery_s} s, probe outage {s.outage_s} s")
    assert s.recovery_s is not None, "no other tenant's graph succeeded after the fault"


def test_illegal_address_innocent_graphs_all_succeed(illegal: Sample) -> None:
    s = illegal
    assert s.innocent_graphs > 0
    assert not s.innocent_errors, f"{len(s.innocent_errors)} of {s.innocent_graphs} innocent graphs failed:\n" \
        + _innocent_errors(s)


def test_illegal_address_message_names_the_kernel(illegal: Sample) -> None:
    assert "poke" in illegal.culprit_message, illegal.culprit_message


# -- (b) a kernel that never ends --------------------------------------------------------------------
def test_hang_fails_the_culprit_with_deadline_exceeded(hang: Sample) -> None:
    s = hang
    assert s.culprit_error == "DeadlineExceeded", (s.culprit_error, s.culprit_message, s.culprit_detail)
    assert s.culprit_detail.get("kernel") == "spin", s.culprit_detail
    assert s.culprit_detail.get("deadline") == pytest.approx(recovery.HANG_TIMEOUT)


def test_hang_worker_comes_back_and_later_graphs_run(hang: Sample) -> None:
    s = hang
    assert s.restarts, "the worker was not restarted"
    assert s.stats_after["worker_restarts"] > s.stats_before["worker_restarts"]
    assert s.later_ok, "graphs sent after the recovery failed or were wrong"


def test_hang_recovery_time(hang: Sample) -> None:
    s = hang
    print(f"\nhang: culprit's error +{s.culprit_error_s:.3f} s after its deadline, restarts at "
          f"{[round(t, 3) for t in s.restarts]} s (respawns {[round(t, 3) for t in s.respawns]} s), first "
          f"other tenant's graph +{s.recovery_s} s, probe outage {s.outage_s} s")
    assert s.recovery_s is not None, "no other tenant's graph succeeded after the fault"


def test_hang_innocent_graphs_all_succeed(hang: Sample) -> None:
    s = hang
    assert s.innocent_graphs > 0
    assert not s.innocent_errors, f"{len(s.innocent_errors)} of {s.innocent_graphs} innocent graphs failed:\n" \
        + _innocent_errors(s)


def test_hang_counts_as_a_deadline_kill(hang: Sample) -> None:
    assert hang.stats_after["deadline_kills"] == hang.stats_before["deadline_kills"] + 1, hang.stats_after


def test_hang_message_names_the_kernel(hang: Sample) -> None:
    assert "spin" in hang.culprit_message, hang.culprit_message


# -- the two ways an innocent graph is blamed, each alone -----------------------------------------
def _vadd(c: tenantlib.Client, n: int = 4096) -> tuple[tenantlib.Graph, np.ndarray, np.ndarray, np.ndarray]:
    x, y, z = c.array(n), c.array(n), c.array(n)
    x[...] = np.arange(n, dtype=np.float32)
    y[...] = 0.5
    g = c.graph()
    grid, block = kernels.launch_1d(n)
    g.kernel(kernels.library(c), "vadd", grid=grid, block=block, args=[g.input(x), g.input(y), g.output(z), n])
    return g, x, y, z


def test_a_graph_sent_after_the_culprit_heard_of_its_fault_runs_on_the_fresh_worker(
        broker_env: dict[str, str]) -> None:
    with cuda_broker(broker_env, "sent-after-fault") as b, tenantlib.connect(b.socket, timeout=120) as x, \
            tenantlib.connect(b.socket, timeout=120) as a:
        bad = x.library(CUDA_SOURCE, kernels=CUDA_KERNELS, name="culprits")
        g, x_in, y_in, z = _vadd(a)
        a.run(g)
        poke = x.graph()
        poke.kernel(bad, "poke", grid=1, block=1, args=[recovery.BOGUS_ADDRESS])
        with pytest.raises(errors.KernelFault):
            x.run(poke, timeout=30)  # alone on the device: the culprit beyond doubt
        z[...] = np.nan
        a.run(g, timeout=30)  # sent the moment the culprit heard of its fault
        np.testing.assert_array_equal(z, x_in + y_in)
        assert a.status()["stats"]["worker_restarts"] == 1


def test_a_graph_queued_behind_the_culprit_is_not_blamed_for_its_fault(broker_env: dict[str, str]) -> None:
    with cuda_broker(broker_env, "queued-behind-fault", "lanes_cuda = 1\n") as b, \
            tenantlib.connect(b.socket, timeout=120) as x, tenantlib.connect(b.socket, timeout=120) as a:
        bad = x.library(CUDA_SOURCE, kernels=CUDA_KERNELS, name="culprits")
        g, x_in, y_in, z = _vadd(a)
        a.run(g)
        late = x.graph()
        late.kernel(bad, "wait_then_poke", grid=1, block=1, args=[300_000_000, recovery.BOGUS_ADDRESS])
        culprit = x.submit(late, timeout=30)  # holds the only lane for 0.3 s, then faults
        time.sleep(0.05)
        z[...] = np.nan
        innocent = a.submit(g, timeout=30)  # queued behind it
        with pytest.raises(errors.KernelFault):
            culprit.result()
        innocent.result()
        np.testing.assert_array_equal(z, x_in + y_in)


def test_a_graph_running_at_another_graphs_missed_deadline_is_replayed(broker_env: dict[str, str]) -> None:
    with cuda_broker(broker_env, "running-at-deadline") as b, tenantlib.connect(b.socket, timeout=120) as x, \
            tenantlib.connect(b.socket, timeout=120) as a:
        bad = x.library(CUDA_SOURCE, kernels=CUDA_KERNELS, name="culprits")
        slow = a.library(CUDA_SOURCE, kernels=CUDA_KERNELS, name="culprits")
        spin = x.graph()
        spin.kernel(bad, "spin", grid=1, block=1, args=[spin.temp(1, np.int32)])
        wait = a.graph()
        wait.kernel(slow, "wait_ns", grid=1, block=1, args=[1_500_000_000])  # 1.5 s, then done
        culprit = x.submit(spin, timeout=1.0)
        time.sleep(0.3)
        t0 = time.perf_counter()
        innocent = a.submit(wait, timeout=30)  # still running when the spin's deadline passes
        with pytest.raises(errors.DeadlineExceeded):
            culprit.result()
        innocent.result()
        assert time.perf_counter() - t0 >= 1.5
