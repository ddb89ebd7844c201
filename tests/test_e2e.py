"""End to end on the CPU device: a real broker process, real tenant clients and processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest

import tenantlib
from broker.protocol import HOPS, KernelSpec, Param
from broker.streams import compiler
from tenantlib import errors, kernels
from tests.conftest import ROOT, BrokerFactory
from tools.broker_process import BrokerProcess

RNG = np.random.default_rng()


def fresh(a: np.ndarray) -> np.ndarray:
    a[...] = RNG.standard_normal(a.shape, dtype=np.float32)
    return a


def test_every_shipped_kernel_through_the_broker(client: tenantlib.Client) -> None:
    lib = kernels.library(client)
    n = 3000
    x, y, z = fresh(client.array(n)), fresh(client.array(n)), client.array(n)
    z[...] = np.nan
    g = client.graph()
    grid, block = kernels.launch_1d(n)
    g.kernel(lib, "vadd", grid=grid, block=block, args=[g.input(x), g.input(y), g.output(z), n])
    client.run(g, timeout=30)
    np.testing.assert_array_equal(z, kernels.ref_vadd(x, y))

    y0 = y.copy()
    g = client.graph()
    g.kernel(lib, "axpy", grid=grid, block=block, args=[2.5, g.input(x), g.inout(y), n])
    client.run(g)
    np.testing.assert_allclose(y, kernels.ref_axpy(2.5, x, y0), rtol=1e-6, atol=1e-6)

    M, N, K = 70, 33, 45
    A, B, C = fresh(client.array((M, K))), fresh(client.array((K, N))), client.array((M, N))
    g = client.graph()
    grid, block = kernels.sgemm_launch(M, N)
    g.kernel(lib, "sgemm", grid=grid, block=block, args=[g.input(A), g.input(B), g.output(C), M, N, K])
    client.run(g)
    np.testing.assert_allclose(C, kernels.ref_sgemm(A, B), rtol=1e-4, atol=1e-4)

    out = client.array(1)
    g = client.graph()
    grid, block = kernels.reduce_launch(n)
    part = g.temp(grid[0])
    g.kernel(lib, "reduce_partial", grid=grid, block=block, args=[g.input(x), part, n])
    fgrid, fblock = kernels.reduce_final_launch()
    g.kernel(lib, "reduce_final", grid=fgrid, block=fblock, args=[part, g.output(out), grid[0]])
    client.run(g)
    assert out[0] == pytest.approx(kernels.ref_sum(x), rel=1e-4, abs=1e-3)

    u, v = fresh(client.array((40, 50))), client.array((40, 50))
    g = client.graph()
    grid, block = kernels.jacobi_launch(50, 40)
    t = g.temp((40, 50))
    g.kernel(lib, "jacobi2d", grid=grid, block=block, args=[g.input(u), t, 50, 40])
    g.kernel(lib, "jacobi2d", grid=grid, block=block, args=[t, g.output(v), 50, 40])
    client.run(g)
    np.testing.assert_allclose(v, kernels.ref_jacobi(kernels.ref_jacobi(u)), rtol=1e-6, atol=1e-6)


def test_library_registration_is_content_addressed(client: tenantlib.Client) -> None:
    first = kernels.library(client)
    again = kernels.library(client)
    assert again.cached and again.digest == first.digest
    other = kernels.library(client, options=["-DKAAS_TEST_VARIANT=1"])
    assert other.digest != first.digest


@pytest.mark.skipif(not compiler.nvrtc_available(), reason="NVRTC is not installed")
def test_compile_error_reaches_the_tenant_with_the_log(client: tenantlib.Client) -> None:
    bad = 'extern "C" __global__ void broken(float* x) { x[0] = undefined_thing; }'
    spec = KernelSpec("broken", (Param("x", "buf", "out", "float32"),), "tenantlib.kernels.host:vadd")
    with pytest.raises(errors.CompileError) as ei:
        client.library(bad, kernels=[spec])
    assert "undefined_thing" in ei.value.detail["log"] and "undefined_thing" in str(ei.value)
    with pytest.raises(errors.CompileError, match="not allowed"):
        client.library(kernels.SOURCE, kernels=kernels.KERNELS, options=["-I/etc"])


def test_host_implementation_must_come_from_an_allowed_module(client: tenantlib.Client) -> None:
    spec = KernelSpec("null", (), "os:system")
    with pytest.raises(errors.HostImplementationError, match="not allowed"):
        client.library(kernels.SOURCE, kernels=[spec])
    with pytest.raises(errors.HostImplementationError, match="no host implementation"):
        client.library(kernels.SOURCE, kernels=[KernelSpec("null", ())])


def test_residents_are_cached_and_read_only(client: tenantlib.Client) -> None:
    lib = kernels.library(client)
    n = 512
    w = fresh(client.array(n))
    res = client.resident(w)
    assert not res.cached
    assert client.resident(w).cached  # same content: nothing copied again
    w_copy = w.copy()
    w[...] = 0  # the resident keeps the content it had when registered
    x, out = fresh(client.array(n)), client.array(n)
    for _ in range(2):
        g = client.graph()
        grid, block = kernels.launch_1d(n)
        g.kernel(lib, "vadd", grid=grid, block=block, args=[g.resident(res), g.input(x), g.output(out), n])
        client.run(g)
        np.testing.assert_array_equal(out, kernels.ref_vadd(w_copy, x))
    g = client.graph()
    with pytest.raises(errors.AccessError):
        g.kernel(lib, "axpy", grid=1, block=1, args=[1.0, g.input(x), g.resident(res), n])
        client.run(g)
    client.release_resident(res)
    g = client.graph()
    g.kernel(lib, "vadd", grid=1, block=1, args=[g.resident(res), g.input(x), g.output(out), n])
    with pytest.raises(errors.UnknownResident):
        client.run(g)


def test_pipelined_requests_each_get_their_own_reply(client: tenantlib.Client) -> None:
    lib = kernels.library(client)
    n = 256
    jobs = []
    for _ in range(24):
        a, b, c = fresh(client.array(n)), fresh(client.array(n)), client.array(n)
        g = client.graph()
        g.kernel(lib, "vadd", grid=1, block=256, args=[g.input(a), g.input(b), g.output(c), n])
        jobs.append((client.submit(g), a, b, c))
    for pending, a, b, c in reversed(jobs):  # collect out of order
        pending.result()
        np.testing.assert_array_equal(c, a + b)


def test_outputs_are_written_only_after_the_whole_graph_succeeded(client: tenantlib.Client) -> None:
    lib = kernels.library(client)
    A, B, C = fresh(client.array((16, 16))), fresh(client.array((16, 16))), client.array((16, 16))
    z = client.array(256)
    C[...] = 7.0
    z[...] = 7.0
    g = client.graph()
    g.kernel(lib, "vadd", grid=1, block=256, args=[g.input(A.reshape(-1)), g.input(B.reshape(-1)), g.output(z), 256])
    # sgemm is written for 16x16 blocks: its host implementation refuses 8x8, as the kernel traps.
    g.kernel(lib, "sgemm", grid=(2, 2), block=(8, 8), args=[g.input(A), g.input(B), g.output(C), 16, 16, 16])
    with pytest.raises(errors.KernelFault, match="sgemm"):
        client.run(g)
    assert (C == 7.0).all() and (z == 7.0).all()


def test_closed_arena_is_refused(client: tenantlib.Client) -> None:
    lib = kernels.library(client)
    arena = client.arena(4096)
    x = arena.array(16)
    arena.close()
    g = client.graph()
    g.kernel(lib, "vadd", grid=1, block=16, args=[g.input(x), g.input(x), g.output(x), 16])
    with pytest.raises(errors.ArenaClosed):
        client.run(g)
    with pytest.raises(errors.ArenaClosed):
        arena.array(4)


def test_traced_run_accounts_for_every_hop(client: tenantlib.Client) -> None:
    lib = kernels.library(client)
    g = client.graph()
    g.kernel(lib, "null", grid=1, block=1, args=[])
    assert client.run(g).trace == ()
    r = client.run(g, trace=True)
    hops = r.hops
    assert list(hops) == list(HOPS)
    assert all(v >= 0 for v in hops.values())
    assert sum(hops.values()) == pytest.approx(r.rtt, rel=1e-6, abs=1e-6)


def test_timings_and_status(client: tenantlib.Client) -> None:
    lib = kernels.library(client)
    g = client.graph()
    g.kernel(lib, "null", grid=1, block=1, args=[])
    r = client.run(g)
    t = r.timings
    assert r.device == "cpu:0"
    assert min(t.queued, t.copy_in, t.kernels, t.copy_out) >= 0
    assert t.total >= t.kernels and r.rtt >= t.total
    st = client.status()
    assert st["devices"][0]["device"] == "cpu:0" and st["devices"][0]["alive"]
    assert st["tenant"] == client.tenant


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_async_client_runs_many_graphs_concurrently(broker: BrokerProcess, loop: str) -> None:
    import uvloop

    runner = uvloop.run if loop == "uvloop" else asyncio.run
    runner(asyncio.wait_for(_async_many_graphs(broker), 60))


async def _async_many_graphs(broker: BrokerProcess) -> None:
    async with await tenantlib.connect_async(broker.socket) as client:
        lib = await kernels.library(client)
        n = 1000
        runs = []
        for _ in range(8):
            a, b, c = fresh(await client.array(n)), fresh(await client.array(n)), await client.array(n)
            g = client.graph()
            grid, block = kernels.launch_1d(n)
            g.kernel(lib, "vadd", grid=grid, block=block, args=[g.input(a), g.input(b), g.output(c), n])
            runs.append((g, a, b, c))
        results = await asyncio.gather(*(client.run(g, timeout=30) for g, *_ in runs))
        assert all(r.device == "cpu:0" for r in results)
        for _, a, b, c in runs:
            np.testing.assert_array_equal(c, a + b)
        with pytest.raises(errors.UnknownKernel):
            g = client.graph()
            g.kernel(lib, "nope", grid=1, block=1, args=[])


def test_concurrent_tenant_processes(broker: BrokerProcess) -> None:
    code = ("import sys, numpy as np, tenantlib\nfrom tenantlib import kernels\nfrom tools.workloads import make\n"
            "rng = np.random.default_rng()\n"
            "with tenantlib.connect(sys.argv[1]) as c:\n"
            "    w = make(c, kernels.library(c), sys.argv[2], 64)\n"
            "    ok = 0\n"
            "    for _ in range(10):\n"
            "        w.refresh(rng); c.run(w.graph); ok += w.check()\n"
            "print(ok)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, broker.socket, w], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT) for w in ("sgemm", "jacobi", "vadd", "sgemm")]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4
    assert outs == ["10"] * 4


def test_graphs_spread_over_several_devices(broker_factory: BrokerFactory) -> None:
    b = broker_factory(device="cpu:0,1")
    with tenantlib.connect(b.socket) as client:
        lib = kernels.library(client)
        work = []
        for _ in range(16):
            A, B, C = fresh(client.array((128, 128))), fresh(client.array((128, 128))), client.array((128, 128))
            g = client.graph()
            grid, block = kernels.sgemm_launch(128, 128)
            g.kernel(lib, "sgemm", grid=grid, block=block, args=[g.input(A), g.input(B), g.output(C), 128, 128, 128])
            work.append((g, A, B, C))
        pend = [(client.submit(g), A, B, C) for g, A, B, C in work]  # a burst: more than one device's lanes
        devices = set()
        for p, A, B, C in pend:
            devices.add(p.result().device)
            np.testing.assert_allclose(C, kernels.ref_sgemm(A, B), rtol=1e-4, atol=1e-3)
    assert devices == {"cpu:0", "cpu:1"}


def test_kaasctl_and_bench_tools(broker: BrokerProcess) -> None:
    run = lambda *a: subprocess.run([sys.executable, "-m", *a], capture_output=True, text=True, cwd=ROOT,  # noqa: E731
                                    timeout=300)
    st = run("tools.kaasctl", "--socket", broker.socket, "status", "--json")
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["devices"][0]["device"] == "cpu:0"
    lat = run("tools.bench", "latency", "--socket", broker.socket, "--iterations", "50", "--warmup", "5",
              "--tenants", "2", "--json")
    assert lat.returncode == 0, lat.stderr
    res = json.loads(lat.stdout)
    assert res["kaas"]["n"] == 100 and res["kaas"]["p50_us"] <= res["kaas"]["p99_us"]
    bw = run("tools.bench", "bandwidth", "--socket", broker.socket, "--min-size", "4K", "--max-size", "64K",
             "--seconds", "0.05", "--json")
    assert bw.returncode == 0, bw.stderr
    assert [r["size"] for r in json.loads(bw.stdout)["rows"]] == [4096, 16384, 65536]
    bad = run("tools.kaasctl", "--socket", "/nonexistent/kaas.sock", "status")
    assert bad.returncode == 1 and "cannot connect" in bad.stderr


def test_make_run_demo(broker_env: dict[str, str]) -> None:
    out = subprocess.run([sys.executable, "-m", "tools.demo", "--device", "cpu", "--graphs", "3"], capture_output=True,
                         text=True, cwd=ROOT, env=broker_env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all results correct" in out.stdout and "broker stopped (exit code 0)" in out.stdout


def test_spinning_broker_worker_and_client_still_serve_correctly(broker_factory: BrokerFactory) -> None:
    b = broker_factory("spin_us = 300\nworker_spin_us = 300\nclient_spin_us = 150\n")
    with tenantlib.connect(b.socket) as client:
        assert client.spin == pytest.approx(150e-6)  # suggested by the broker in the handshake
        lib = kernels.library(client)
        n = 500
        x, y, z = fresh(client.array(n)), fresh(client.array(n)), client.array(n)
        g = client.graph()
        g.kernel(lib, "vadd", grid=2, block=256, args=[g.input(x), g.input(y), g.output(z), n])
        for _ in range(50):
            fresh(x)
            client.run(g)
            np.testing.assert_array_equal(z, x + y)
    with tenantlib.connect(b.socket, spin_us=0) as quiet:
        assert quiet.spin == 0


def test_tenants_are_advised_not_to_spin_once_sessions_pass_the_spinning_limit(broker_factory: BrokerFactory) -> None:
    from tests.conftest import wait_for

    b = broker_factory("client_spin_us = 150\nspinning_tenants = 1\n")
    with tenantlib.connect(b.socket) as first:
        assert first._rings is not None
        hint = first._rings.spin_hint
        assert hint() == pytest.approx(150e-6)  # alone: the configured spin
        with tenantlib.connect(b.socket) as second:
            assert second._rings is not None
            assert second._rings.spin_hint() == 0
            wait_for(hint, lambda h: h == 0, "the first session's advice to drop to 0")
            lib = kernels.library(second)
            g = second.graph()
            g.kernel(lib, "null", grid=1, block=1, args=[])
            second.run(g)  # without spinning, runs are still answered
        wait_for(hint, lambda h: h == pytest.approx(150e-6), "the advice to come back once the second left")


def test_resubmitted_graph_is_revalidated_after_its_arena_goes(broker: BrokerProcess) -> None:
    import os

    from broker import protocol as P
    from tests.conftest import RawConnection

    raw = RawConnection(broker.socket)
    try:
        sig = KernelSpec("vadd", tuple(kernels.KERNELS[1].params), "tenantlib.kernels.host:vadd")
        raw.send(P.RegisterLibrary(1, "cuda", kernels.SOURCE.encode(), (sig,)))
        lib = raw.recv()
        assert isinstance(lib, P.LibraryRegistered), lib
        fd = os.memfd_create("t")
        os.ftruncate(fd, 4096)
        raw.send(P.RegisterArena(2, 4096), fd)
        os.close(fd)
        arena = raw.recv()
        assert isinstance(arena, P.ArenaRegistered), arena
        bufs = tuple(P.BufferSpec(k, "float32", (16,), arena.arena, 64 * i) for i, k in enumerate(("in", "in", "out")))
        spec = P.GraphSpec(bufs, (P.KernelNode(lib.library, "vadd", (1,), (16,), (P.Buf(0), P.Buf(1), P.Buf(2),
                                                                                   P.Lit("i32", 16))),))
        for req in (3, 4):
            raw.send(P.RunGraph(req, spec))
            assert isinstance(raw.recv(), P.GraphDone)
        raw.send(P.ReleaseArena(5, arena.arena))
        raw.send(P.RunGraph(6, spec))  # pipelined right behind the release: must not run
        replies = {m.req: m for m in (raw.recv(), raw.recv())}
        assert isinstance(replies[5], P.Done)
        assert isinstance(replies[6], P.Error) and replies[6].code in ("arena_closed", "unknown_arena")
    finally:
        raw.close()


def test_kaas_bench_fuzz_smoke(broker: BrokerProcess) -> None:
    out = subprocess.run([sys.executable, "-m", "tools.bench", "fuzz", "--socket", broker.socket, "--cases", "1500",
                          "--check-every", "500", "--seed", "7", "--json"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert sum(res["outcomes"].values()) == 1500
    assert res["outcomes"].get("GraphDone", 0) > 0 and res["outcomes"].get("malformed_frame", 0) > 0


def test_done_collects_a_reply_without_blocking(broker_factory: BrokerFactory) -> None:
    from tenantlib.kernels import testing

    b = broker_factory('host_modules = ["tenantlib.kernels.host", "tenantlib.kernels.testing"]\n')
    with tenantlib.connect(b.socket) as c:
        lib = c.library(kernels.SOURCE + '\nextern "C" __global__ void slow(int ms) {}\n', kernels=[testing.SLOW])
        g = c.graph()
        g.kernel(lib, "slow", grid=1, block=1, args=[400])
        p = c.submit(g)
        assert not p.done()  # a 400 ms kernel: no reply yet, and done() came back without it
        assert p.done(timeout=60)
        assert p.done() and p.result().device == "cpu:0"  # result() uses the reply done() took
        bad = c.graph()
        bad.kernel(lib, "slow", grid=1, block=1, args=[5000])
        q = c.submit(bad, timeout=0.2)
        assert q.done(timeout=60)
        with pytest.raises(errors.DeadlineExceeded):
            q.result()
        assert q.done()  # the error is the answer, kept: asked again, it is raised again
        with pytest.raises(errors.DeadlineExceeded):
            q.result()


def test_status_names_the_broker_and_only_this_tenants_residents(broker_factory: BrokerFactory) -> None:
    import os

    from broker.tenants import token_digest

    b = broker_factory(f'[[tenants]]\nname = "other"\nuid = {os.geteuid()}\ntoken_sha256 = "{token_digest("t0k")}"\n')
    with tenantlib.connect(b.socket) as c, tenantlib.connect(b.socket, token="t0k") as other:
        w = other.array(512)
        w[...] = 7.0
        other.resident(w)  # another tenant's resident: not in c's status
        x = c.array(1024)
        x[...] = 3.0
        r = c.resident(x)
        y, z = c.array(1024), c.array(1024)
        y[...] = 1.0
        g = c.graph()
        g.kernel(kernels.library(c), "vadd", grid=4, block=256, args=[g.resident(r), g.input(y), g.output(z), 1024])
        c.run(g)
        st = c.status()
        assert len(st["broker"]["id"]) == 32 and st["broker"]["pid"] > 0 and st["healthy"] is True
        assert st["residents"] == [{"digest": r.digest, "bytes": x.nbytes, "devices": ["cpu:0"]}]
        assert st["devices"][0]["memory_free"] > 0
        with tenantlib.connect(b.socket) as again:  # the same broker: the same id
            assert again.status()["broker"]["id"] == st["broker"]["id"]


def test_prefetch_puts_a_resident_on_a_device_before_it_is_used(broker_factory: BrokerFactory) -> None:
    b = broker_factory(device="cpu:0,1")
    with tenantlib.connect(b.socket) as c:
        x = c.array(4096)
        x[...] = 1.5
        r = c.resident(x)
        assert c.status()["residents"][0]["devices"] == []  # registered: a host copy, on no device yet
        assert c.prefetch(r, "cpu:1") == "cpu:1"
        assert c.status()["residents"][0]["devices"] == ["cpu:1"]
        assert c.prefetch(r) == "cpu:1"  # already there: nothing moves
        y, z = c.array(4096), c.array(4096)
        y[...] = 1.0
        g = c.graph()
        g.kernel(kernels.library(c), "vadd", grid=16, block=256, args=[g.resident(r), g.input(y), g.output(z), 4096])
        assert c.run(g).device == "cpu:1"  # placement follows the resident
        np.testing.assert_array_equal(z, np.full(4096, 2.5, dtype=np.float32))
        with pytest.raises(errors.InvalidArgument, match="no shared device 'cuda:3'"):
            c.prefetch(r, "cuda:3")
        c.release_resident(r)
        with pytest.raises(errors.UnknownResident):
            c.prefetch(r)
