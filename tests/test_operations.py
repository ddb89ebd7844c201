"""Operating the broker: kaasctl's admin commands, drain, reload (SIGHUP), graceful SIGTERM."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tenantlib
from tenantlib import errors, kernels
from tenantlib.kernels import testing
from tests.conftest import ROOT, BrokerFactory


def kaasctl(sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.kaasctl", "--socket", sock, *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def _sgemm(client: tenantlib.Client, n: int) -> tuple[tenantlib.Graph, np.ndarray, np.ndarray, np.ndarray]:
    lib = kernels.library(client)
    A, B, C = client.array((n, n)), client.array((n, n)), client.array((n, n))
    A[...] = np.random.default_rng().standard_normal((n, n))
    B[...] = 1.0
    g = client.graph()
    grid, block = kernels.sgemm_launch(n, n)
    g.kernel(lib, "sgemm", grid=grid, block=block, args=[g.input(A), g.input(B), g.output(C), n, n, n])
    return g, A, B, C


def test_kaasctl_views(broker_factory: BrokerFactory) -> None:
    b = broker_factory()
    with tenantlib.connect(b.socket) as c:
        g, A, B, C = _sgemm(c, 64)
        c.run(g)
        c.resident(A)
        st = json.loads(kaasctl(b.socket, "--json", "status").stdout)
        assert st["devices"][0]["device"] == "cpu:0" and st["policy"] == "fair" and st["accepting"]
        assert st["devices"][0]["memory_capacity"] > 0
        ts = json.loads(kaasctl(b.socket, "tenants", "--json").stdout)
        me = next(t for t in ts if t["tenant"] == c.tenant)
        assert me["graphs"] == 1 and me["sessions"] == 2 and me["residents"] == 1 and me["share"] == 1.0  # + kaasctl
        rs = json.loads(kaasctl(b.socket, "residents", "--json").stdout)
        assert rs[0]["tenant"] == c.tenant and rs[0]["bytes"] == A.nbytes
        for cmd in (["status"], ["tenants"], ["residents"], ["quarantine", "list"]):
            out = kaasctl(b.socket, *cmd)
            assert out.returncode == 0 and out.stdout.strip(), (cmd, out.stderr)
        assert "no kernel is quarantined" in kaasctl(b.socket, "quarantine", "list").stdout
        bad = kaasctl(b.socket, "drain", "cuda:7")
        assert bad.returncode == 1 and "no device 'cuda:7'" in bad.stderr


def test_kaasctl_memory_sets_the_broker_accounting_beside_the_workers_count(broker_factory: BrokerFactory) -> None:
    b = broker_factory()
    with tenantlib.connect(b.socket) as c:
        lib = kernels.library(c)
        n = 32
        A, B, C = c.array((n, n)), c.array((n, n)), c.array((n, n))
        A[...], B[...] = 2.0, 1.0
        ra = c.resident(A)
        g = c.graph()
        grid, block = kernels.sgemm_launch(n, n)
        g.kernel(lib, "sgemm", grid=grid, block=block, args=[g.resident(ra), g.input(B), g.output(C), n, n, n])
        c.run(g)
        np.testing.assert_allclose(C, np.full((n, n), 2.0 * n, dtype=np.float32))
        ms = json.loads(kaasctl(b.socket, "memory", "--json").stdout)
        assert [m["device"] for m in ms] == ["cpu:0"]
        m = ms[0]
        # The resident is on the device now, counted once by the broker and once by the worker.
        assert m["accounted_residents"] == A.nbytes and m["worker"]["resident_bytes"] == A.nbytes, m
        assert m["worker"]["residents"] == 1 and m["accounted"] >= A.nbytes
        table = kaasctl(b.socket, "memory")
        assert table.returncode == 0 and "cpu:0" in table.stdout and "worker residents" in table.stdout


def test_a_tenant_keeps_its_totals_after_its_last_session(broker_factory: BrokerFactory) -> None:
    b = broker_factory()
    with tenantlib.connect(b.socket) as c:
        g, *_ = _sgemm(c, 32)
        for _ in range(5):
            c.run(g)
        with pytest.raises(errors.InvalidArgument, match="library is empty"):
            c.library(b"", kernels=[])  # one typed error
        name = c.tenant
    # Its last session is gone: the broker dropped the tenant's live state...
    deadline = time.monotonic() + 30
    while True:
        ts = json.loads(kaasctl(b.socket, "tenants", "--json").stdout)
        me = next(t for t in ts if t["tenant"] == name)
        if me["sessions"] == 1 or time.monotonic() > deadline:  # kaasctl's own session only
            break
        time.sleep(0.05)
    # ...and still reports what it did (kaasctl's session is the same tenant: its live row is new).
    assert me["sessions"] == 1 and me["graphs"] == 5 and me["errors"] >= 1 and me["device_seconds"] > 0, me
    assert "errors" in kaasctl(b.socket, "tenants").stdout


def test_drain_moves_new_graphs_off_a_device(broker_factory: BrokerFactory) -> None:
    b = broker_factory(device="cpu:0,1")
    with tenantlib.connect(b.socket) as c:
        g, *_ = _sgemm(c, 48)
        assert kaasctl(b.socket, "drain", "cpu:0").stdout.strip() == "cpu:0: drained"
        assert {c.submit(g).result().device for _ in range(12)} == {"cpu:1"}
        kaasctl(b.socket, "undrain", "cpu:0")
        kaasctl(b.socket, "drain", "cpu:1")
        assert {c.submit(g).result().device for _ in range(12)} == {"cpu:0"}


def _as_nobody(sock: str, q: mp.Queue) -> None:  # type: ignore[type-arg]
    try:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        with tenantlib.connect(sock) as c:
            try:
                c.admin("status")
                q.put("allowed")
            except errors.PermissionDenied as exc:
                q.put(f"refused: {exc}")
    except BaseException as exc:
        q.put(f"error: {exc!r}")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a tenant under another uid")
def test_admin_commands_are_for_root_and_the_admin_group(broker_factory: BrokerFactory) -> None:
    import secrets  # noqa: F401 - loaded before the child drops privileges

    b = broker_factory("socket_mode = 438\n")
    os.chmod(os.path.dirname(b.socket), 0o755)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    pr = ctx.Process(target=_as_nobody, args=(b.socket, q))
    pr.start()
    verdict = q.get(timeout=60)
    pr.join(30)
    assert verdict.startswith("refused") and "admin group" in verdict, verdict


def test_quarantine_clear_lets_the_kernel_run_again(broker_factory: BrokerFactory) -> None:
    b = broker_factory('host_modules = ["tenantlib.kernels.host", "tenantlib.kernels.testing"]\nquarantine_after = 1\n')
    with tenantlib.connect(b.socket) as c:
        lib = c.library(kernels.SOURCE + '\nextern "C" __global__ void crash() {}\n', kernels=[testing.CRASH])
        g = c.graph()
        g.kernel(lib, "crash", grid=1, block=1, args=[])
        with pytest.raises(errors.WorkerLost):
            c.run(g, timeout=60)
        with pytest.raises(errors.Quarantined):
            c.run(g)
        listed = json.loads(kaasctl(b.socket, "quarantine", "list", "--json").stdout)
        assert [(q["tenant"], q["kernel"]) for q in listed] == [(c.tenant, "crash")]
        assert kaasctl(b.socket, "quarantine", "clear").stdout.strip() == "lifted 1 quarantine(s)"
        end = time.monotonic() + 60
        while c.status()["stats"]["worker_restarts"] < 1:
            assert time.monotonic() < end
            time.sleep(0.05)
        with pytest.raises(errors.WorkerLost):  # refused no more: it runs (and crashes) again
            c.run(g, timeout=60)


def test_sigterm_finishes_running_graphs_and_refuses_queued_ones(broker_factory: BrokerFactory) -> None:
    b = broker_factory('lanes_cpu = 1\nhost_modules = ["tenantlib.kernels.host", "tenantlib.kernels.testing"]\n')
    assert b.proc is not None
    with tenantlib.connect(b.socket) as c:
        lib = c.library(kernels.SOURCE + '\nextern "C" __global__ void slow(int ms) {}\n', kernels=[testing.SLOW])
        g = c.graph()
        g.kernel(lib, "slow", grid=1, block=1, args=[400])
        first = c.submit(g)
        end = time.monotonic() + 30
        while c.status()["queued"] or not c.status()["devices"][0]["running"]:  # wait until it runs
            assert time.monotonic() < end
            time.sleep(0.01)
        rest = [c.submit(g) for _ in range(5)]  # one lane: these wait behind the first
        while c.status()["queued"] < 5:
            assert time.monotonic() < end
            time.sleep(0.01)
        b.proc.send_signal(signal.SIGTERM)
        assert first.result().device == "cpu:0"  # the running graph finished, inside the grace period
        for p in rest:
            with pytest.raises(errors.ShuttingDown, match="did not start"):
                p.result()
    assert b.proc.wait(60) == 0
    assert not os.path.exists(b.socket)


def test_sighup_reloads_tenant_policy_and_keeps_it_on_a_bad_file(broker_factory: BrokerFactory,
                                                                 tmp_path: Path) -> None:
    allow = 'host_modules = ["tenantlib.kernels.host", "tenantlib.kernels.testing"]\n'
    b = broker_factory(allow + "[tenant_defaults]\nmax_queued = 1000\nmax_inflight = 1\n")
    assert b.proc is not None and b.config is not None
    cfg = Path(b.config)
    with tenantlib.connect(b.socket) as c:
        lib = c.library(kernels.SOURCE + '\nextern "C" __global__ void slow(int ms) {}\n', kernels=[testing.SLOW])
        g = c.graph()
        g.kernel(lib, "slow", grid=1, block=1, args=[20])  # 8 of them: one runs, seven wait
        assert not _queued_limit(c, g, 1000)  # all accepted under the first policy
        cfg.write_text(allow + "[tenant_defaults]\nmax_queued = 2\nmax_inflight = 1\n")
        b.proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + 30
        while json.loads(kaasctl(b.socket, "tenants", "--json").stdout)[0]["tenant"] != c.tenant or not _queued_limit(
                c, g, 2):
            assert time.monotonic() < end, "the reload did not take effect"
            time.sleep(0.1)
        cfg.write_text(allow + "[tenant_defaults]\nmax_queued = 'many'\n")
        out = kaasctl(b.socket, "reload")
        assert out.returncode == 1 and "reload refused" in out.stderr and "max_queued" in out.stderr
        assert _queued_limit(c, g, 2)  # the old (reloaded) policy stays


def _queued_limit(c: tenantlib.Client, g: tenantlib.Graph, limit: int) -> bool:
    """True when a burst of graphs is refused past ``limit`` waiting ones."""
    refused = 0
    for p in [c.submit(g) for _ in range(8)]:
        try:
            p.result()
        except errors.TooManyRequests as exc:
            assert f"limit {limit}" in str(exc)
            refused += 1
    return refused > 0
