"""A device worker that dies is respawned with everything the broker holds; the device comes back."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

import tenantlib
from tenantlib import errors, kernels
from tests.conftest import BrokerFactory, broker_pid, children, wait_for


def _vadd(client: tenantlib.Client, lib: tenantlib.Library, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
    g = client.graph()
    grid, block = kernels.launch_1d(x.size)
    g.kernel(lib, "vadd", grid=grid, block=block, args=[g.input(x), g.input(y), g.output(z), x.size])
    client.run(g, timeout=30)
    np.testing.assert_array_equal(z, x + y)


def test_killed_worker_is_respawned_with_arenas_libraries_and_residents(broker_factory: BrokerFactory) -> None:
    b = broker_factory()
    rng = np.random.default_rng()
    with tenantlib.connect(b.socket) as client:
        lib = kernels.library(client)
        n = 1000
        x, y, z = (client.array(n) for _ in range(3))
        x[...] = rng.standard_normal(n)
        y[...] = rng.standard_normal(n)
        res = client.resident(y)
        _vadd(client, lib, x, y, z)
        (worker,) = children(broker_pid(b))
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: client.status()["stats"]["worker_restarts"], lambda n: n == 1, "the respawn")
        (new_worker,) = children(broker_pid(b))
        assert new_worker != worker
        # the same arenas, library and resident work on the new worker without registering again
        x[...] = rng.standard_normal(n)
        _vadd(client, lib, x, y, z)
        g = client.graph()
        g.kernel(lib, "vadd", grid=4, block=256, args=[g.resident(res), g.input(x), g.output(z), n])
        client.run(g)
        np.testing.assert_array_equal(z, x + y)
        assert client.status()["devices"][0]["alive"]


def test_crashing_host_kernel_fails_its_graph_and_the_device_comes_back(broker_factory: BrokerFactory) -> None:
    from tenantlib.kernels import testing

    b = broker_factory('host_modules = ["tenantlib.kernels.host", "tenantlib.kernels.testing"]\n')
    with tenantlib.connect(b.socket) as victim, tenantlib.connect(b.socket) as other:
        with pytest.raises(errors.HostImplementationError, match="not allowed"):  # not by default
            with tenantlib.connect(broker_factory().socket) as c:
                c.library(kernels.SOURCE + '\nextern "C" __global__ void crash() {}\n', kernels=[testing.CRASH])
        bad = victim.library(kernels.SOURCE + '\nextern "C" __global__ void crash() {}\n', kernels=[testing.CRASH])
        g = victim.graph()
        g.kernel(bad, "crash", grid=1, block=1, args=[])
        try:
            victim.run(g, timeout=30)
        except errors.WorkerLost as exc:
            assert "exit code 70" in str(exc)
        else:
            raise AssertionError("a graph whose kernel killed the worker must fail")
        lib = kernels.library(other)
        x, y, z = (other.array(64) for _ in range(3))
        x[...] = 1.0
        y[...] = 2.0
        wait_for(lambda: other.status()["stats"]["worker_restarts"], lambda n: n >= 1, "the respawn")
        _vadd(other, lib, x, y, z)


def test_a_worker_killed_from_outside_does_not_blame_the_graph_it_ran(broker_factory: BrokerFactory) -> None:
    from tenantlib.kernels import testing

    b = broker_factory('host_modules = ["tenantlib.kernels.host", "tenantlib.kernels.testing"]\n')
    with tenantlib.connect(b.socket, timeout=60) as c:
        lib = c.library(kernels.SOURCE + '\nextern "C" __global__ void slow(int ms) {}\n', kernels=[testing.SLOW])
        g = c.graph()
        g.kernel(lib, "slow", grid=1, block=1, args=[1500])
        pending = c.submit(g)  # alone on the worker
        worker = next(d["pid"] for d in c.status()["devices"])
        wait_for(lambda: c.status()["devices"][0]["running"], lambda n: n == 1, "the graph on the worker")
        os.kill(worker, signal.SIGKILL)  # an operator, or the OOM killer: not the graph's doing
        pending.result()  # replayed alone, and it runs to the end
        st = c.status()["stats"]
        assert st["worker_restarts"] == 1 and st["replays"] == 1


def test_a_respawn_that_fails_for_any_reason_is_tried_again(broker_factory: BrokerFactory) -> None:
    """Out of file descriptors, a respawn fails with OSError (no KaasError): it is retried until it
    succeeds, and the device comes back (before, the respawn task died and the device stayed down)."""
    import resource

    b = broker_factory()
    pid = broker_pid(b)
    with tenantlib.connect(b.socket) as client:
        lib = kernels.library(client)
        n = 256
        x, y, z = (client.array(n) for _ in range(3))
        x[...], y[...] = 1.0, 2.0
        _vadd(client, lib, x, y, z)
        limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        try:
            used = len(os.listdir(f"/proc/{pid}/fd"))
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (used + 1, limits[1]))  # no room for a worker's fds
            (worker,) = children(pid)
            os.kill(worker, signal.SIGKILL)
            wait_for(lambda: client.status()["stats"]["respawn_failures"], lambda k: k >= 2, "failed respawns")
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        wait_for(lambda: client.status()["stats"]["worker_restarts"], lambda k: k == 1, "the respawn")
        x[...] = 5.0
        _vadd(client, lib, x, y, z)


def test_a_respawn_loads_only_the_libraries_someone_holds(broker_factory: BrokerFactory) -> None:
    """Libraries of tenants that left stay cached in the broker but are not compiled into a new
    worker (the H200 soak's culprits left hundreds); registered again, one is loaded where missing."""
    from broker.tenants import token_digest

    uid = os.geteuid()
    b = broker_factory("".join(f'[[tenants]]\nname = "{n}"\nuid = {uid}\ntoken_sha256 = "{token_digest(n + "-tok")}"\n'
                               for n in ("stays", "leaves")))
    pid = broker_pid(b)
    own = kernels.SOURCE + "\n// the leaving tenant's own copy\n"
    with tenantlib.connect(b.socket, token="stays-tok") as stays:
        lib = kernels.library(stays)
        with tenantlib.connect(b.socket, token="leaves-tok") as leaves:
            leaves.library(own, kernels=kernels.KERNELS)
        usage = lambda: stays.admin("memory")[0]["worker"]  # noqa: E731
        gone = lambda: next((t["sessions"] for t in stays.admin("tenants") if t["tenant"] == "leaves"), 0)  # noqa: E731
        wait_for(gone, lambda k: k == 0, "the leaving tenant's session to close")
        assert usage()["libraries"] == 2
        (worker,) = children(pid)
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: stays.status()["stats"]["worker_restarts"], lambda k: k == 1, "the respawn")
        assert usage()["libraries"] == 1  # only what a tenant holds
        n = 256
        x, y, z = (stays.array(n) for _ in range(3))
        x[...], y[...] = 1.0, 2.0
        _vadd(stays, lib, x, y, z)
        with tenantlib.connect(b.socket, token="leaves-tok") as back:
            again = back.library(own, kernels=kernels.KERNELS)  # cached in the broker: loaded where missing
            assert usage()["libraries"] == 2
            a, c, d = (back.array(n) for _ in range(3))
            a[...], c[...] = 3.0, 4.0
            _vadd(back, again, a, c, d)


def test_a_worker_started_with_fds_past_1024_keeps_working() -> None:
    """Regression (the 10-minute H200 soak): a broker holding over a thousand fds (64 tenants' arenas)
    passed its worker fds numbered past 1024, and every respawned worker died in select() on them."""
    import asyncio
    import resource

    from broker.streams.wire import WInfo
    from broker.workers import WorkerHandle

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1400:
        pytest.skip(f"needs room for 1400 fds (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1400), hard))
    hogs = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # what the worker gets comes after these

    async def main() -> None:
        w = WorkerHandle("cpu:0", host_modules=("tenantlib.kernels.host",), compile_check="")
        await w.start()
        try:
            assert w._wake_broker > 1024  # the fds it inherits are numbered past select()'s limit
            await asyncio.sleep(0.3)  # long enough to go idle: the wait that failed
            reply = await asyncio.wait_for(w.call(WInfo(w.next_seq())), 10)
            assert reply.info["kind"] == "cpu" and w.alive
        finally:
            await w.stop()

    try:
        asyncio.run(main())
    finally:
        for fd in hogs:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_run_refused_by_a_poisoned_worker_is_innocent_and_replayed() -> None:
    """The H200 soak: a sticky fault poisons the context; runs that reach the worker before it exits are
    refused with DeviceError(poisoned) and were failed to their (innocent) tenants instead of replayed."""
    from broker import errors as E
    from broker.streams.wire import WReply
    from broker.supervision import reply_verdict

    poisoned = WReply(1, E.DeviceError.code, "device worker hit a fatal CUDA error", {"poisoned": True})
    assert reply_verdict("", poisoned) == "innocent"
    assert reply_verdict("culprit", poisoned) == "innocent"  # it never ran, whatever was thought of it
    never_started = WReply(2, E.WorkerLost.code, "graph not started", {"started": False})
    assert reply_verdict("", never_started) == "innocent"
    ambiguous = WReply(3, E.KernelFault.code, "illegal address", {"ambiguous": True})
    assert reply_verdict("", ambiguous) == "suspect"
    out_of_memory = WReply(4, E.DeviceError.code, "the CPU device ran out of memory for this graph", {})
    assert reply_verdict("", out_of_memory) == ""  # a device error of its own: the tenant is told
    assert reply_verdict("innocent", None) == "innocent"
