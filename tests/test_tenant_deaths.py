"""Tenants that die abruptly, at any point, cost the broker nothing and the other tenants nothing.

200 tenant processes are SIGKILLed while they shake hands, register arenas, libraries and
residents, and have graphs queued or running: some kill themselves at an exact point of the
protocol (right after sending a request, before its reply), the others are killed by the test
at a random moment while they do a random mix of everything.  Meanwhile a healthy tenant keeps
running graphs and checking them against numpy.  Afterwards the broker holds nothing of the
dead: its open fds, its worker's open fds, its child processes, /dev/shm, its queue, the
per-tenant accounting of the admin commands (graphs waiting, parked, running; device memory;
arenas; residents) and the per-tenant metrics gauges are back where they started (polled with
a generous deadline, never a timed assertion).

The tenants are forked from a ``multiprocessing`` forkserver, a fresh single-threaded process
that has tenantlib imported already, so 200 of them cost seconds, not an interpreter start each;
none is forked from pytest itself.  They run as the test's uid, so they share one tenant identity
with the healthy tenant (distinct identities need root: tests/test_identity.py).  So the tenant's
counters are checked while only the healthy session is left (nothing waiting, parked or running,
no graph memory, its own six arenas), and its residents, which live as long as any session of
the tenant does, once the healthy tenant has closed too.
"""

from __future__ import annotations

import functools
import grp
import mmap
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import tenantlib
import tenantlib.arena
from broker import protocol as P
from tenantlib import kernels as K
from tests import conftest
from tests.conftest import BrokerFactory, RawConnection, broker_pid, children, open_fds, shm_entries
from tools.broker_process import BrokerProcess

T = TypeVar("T")

DEATHS = 200
BATCH = 20          # tenants alive at once
DEADLINE = 60.0     # seconds to wait for any condition; generous on purpose, never a timed assertion
SEED = int(os.environ.get("KAAS_DEATHS_SEED", time.time_ns() % 2**32))
N = 192             # sgemm size of the dying tenants: a few ms per graph on the CPU device

# How tenants die (weights): "self" ones kill themselves at an exact point, "random" ones are
# killed by the test after a random delay.
SCENARIOS = {
    "handshake": 3,          # self: connected / part of hello / hello unanswered / fd in the handshake
    "arena_request": 3,      # self: register-arena sent with its fd, reply not read
    "graphs_queued": 3,      # self: a dozen graphs pipelined, then gone
    "graphs_running": 3,     # self: a graph or two on the device
    "resident_request": 2,   # self: resident put sent (or used by a graph), reply not read
    "library_request": 1,    # self: a library nobody compiled yet (a compile each) sent, reply not read
    "random_handshake": 2,   # random: connecting and closing in a loop
    "random_arenas": 3,      # random: registering and releasing arenas in a loop
    "random_mix": 5,         # random: arenas, residents, libraries, graphs, all at once
}


# -- the dying tenants (run in forked processes) -------------------------------------------------
class _Tenant:
    """What a dying tenant does; ``say`` reports how far it got (the test counts where they died)."""

    def __init__(self, path: str, seed: int, report: multiprocessing.connection.Connection) -> None:
        self.path = path
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.report = report
        self.client: tenantlib.Client | None = None
        self.lib: tenantlib.Library | None = None

    def say(self, phase: str) -> None:
        self.report.send_bytes(phase.encode())

    def die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def connect(self) -> tenantlib.Client:
        self.client = tenantlib.connect(self.path, timeout=DEADLINE)
        self.say("connected")
        return self.client

    def std(self) -> tenantlib.Library:
        assert self.client is not None
        if self.lib is None:
            self.lib = K.library(self.client)
        return self.lib

    def sgemm(self, n: int = N) -> tenantlib.Graph:
        c = self.client
        assert c is not None
        A, B, C = c.array((n, n)), c.array((n, n)), c.array((n, n))
        A[...] = self.rng.standard_normal((n, n))
        B[...] = self.rng.standard_normal((n, n))
        g = c.graph()
        grid, block = K.sgemm_launch(n, n)
        g.kernel(self.std(), "sgemm", grid=grid, block=block, args=[g.input(A), g.input(B), g.output(C), n, n, n])
        return g

    def hello_frame(self) -> bytes:
        return P.encode(P.Hello(P.PROTOCOL_VERSION, "dying"))

    # -- self: die at an exact point -----------------------------------------------------------
    def handshake(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        how = int(self.rng.integers(4))
        frame = self.hello_frame()
        if how == 1:
            s.sendall(frame[: int(self.rng.integers(1, len(frame)))])
        elif how == 2:
            s.sendall(frame)
        elif how == 3:  # a segment's fd rides on part of the hello
            fd, _ = tenantlib.arena.create_segment(4096)
            s.sendmsg([frame[:3]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
        self.say(f"handshake-{how}")
        self.die()

    def arena_request(self) -> None:
        c = self.connect()
        for _ in range(int(self.rng.integers(0, 4))):
            c.arena(int(self.rng.integers(1, 1 << 16)))
        fd, _ = tenantlib.arena.create_segment(1 << 16)
        c._send(c.register_arena_msg(1 << 16), fd)
        self.say("arena-sent")
        self.die()

    def graphs_queued(self) -> None:
        c = self.connect()
        graphs = [self.sgemm() for _ in range(int(self.rng.integers(1, 4)))]
        for i in range(int(self.rng.integers(8, 25))):
            c.submit(graphs[i % len(graphs)], timeout=DEADLINE)
        self.say("graphs-sent")
        self.die()

    def graphs_running(self) -> None:
        c = self.connect()
        pending = [c.submit(self.sgemm(), timeout=DEADLINE) for _ in range(int(self.rng.integers(1, 3)))]
        if self.rng.random() < 0.5:
            pending[0].result()  # one done, the other (if any) on its way
        time.sleep(float(self.rng.uniform(0, 0.006)))
        self.say("graphs-running")
        self.die()

    def resident_request(self) -> None:
        c = self.connect()
        x = c.array(1 << 14)
        x[...] = self.rng.standard_normal(x.size)
        if self.rng.random() < 0.5:
            res = c.resident(x)
            y, z = c.array(x.size), c.array(x.size)
            g = c.graph()
            grid, block = K.launch_1d(x.size)
            g.kernel(self.std(), "vadd", grid=grid, block=block, args=[g.resident(res), g.input(y), g.output(z), x.size])
            c.submit(g, timeout=DEADLINE)
            self.say("resident-used")
        else:
            c._send(c.resident_msg(x))
            self.say("resident-sent")
        self.die()

    def library_request(self) -> None:
        c = self.connect()
        c._send(c.library_msg(K.SOURCE, K.KERNELS, None, "dying", (f"-DKAAS_DYING_TENANT={self.seed}",)))
        self.say("library-sent")
        self.die()

    # -- random: busy until the test kills it ------------------------------------------------------
    def random_handshake(self) -> None:
        self.say("looping")
        while True:
            tenantlib.connect(self.path, timeout=DEADLINE).close()

    def random_arenas(self) -> None:
        c = self.connect()
        live: list[tenantlib.Arena] = []
        while True:
            live.append(c.arena(int(self.rng.integers(1, 1 << 18))))
            if len(live) > 6:
                live.pop(int(self.rng.integers(len(live)))).close()

    def random_mix(self) -> None:
        c = self.connect()
        pending: list[tenantlib.PendingRun] = []
        graphs = [self.sgemm(int(self.rng.choice([64, N])))]
        while True:
            op = self.rng.integers(5)
            if op == 0:
                c.arena(int(self.rng.integers(1, 1 << 16))).close()
            elif op == 1:
                x = c.array(int(self.rng.integers(1, 4096)))
                x[...] = self.rng.standard_normal(x.size)
                c.resident(x)
            elif op == 2 and len(graphs) < 4:
                graphs.append(self.sgemm(int(self.rng.choice([64, N]))))
            else:
                pending += [c.submit(graphs[int(self.rng.integers(len(graphs)))], timeout=DEADLINE)
                            for _ in range(int(self.rng.integers(1, 4)))]
                if len(pending) > 12:
                    pending.pop(0).result()


def _tenant_main(path: str, scenario: str, seed: int, report: multiprocessing.connection.Connection) -> None:
    """Entry point of a dying tenant; it never returns normally (SIGKILL, or an error to report)."""
    getattr(_Tenant(path, seed, report), scenario)()
    raise AssertionError(f"tenant scenario {scenario} ended without dying")


# -- the test's side -------------------------------------------------------------------------------
def wait_for(probe: Callable[[], T], ok: Callable[[T], bool], what: str, deadline: float = DEADLINE) -> T:
    return conftest.wait_for(probe, ok, what, deadline)


@dataclass
class Dying:
    scenario: str
    proc: multiprocessing.process.BaseProcess
    report: multiprocessing.connection.Connection
    kill_after: float | None  # random ones: seconds after they report that they started
    phases: list[str] = field(default_factory=list)

    def drain(self) -> None:
        try:
            while self.report.poll():
                self.phases.append(self.report.recv_bytes().decode())
        except (EOFError, OSError):
            pass


class Healthy(threading.Thread):
    """A tenant that keeps running graphs and checking them against numpy until stopped."""

    def __init__(self, path: str) -> None:
        super().__init__(name="healthy-tenant", daemon=True)
        self.client = tenantlib.connect(path, timeout=DEADLINE)
        self.stop = threading.Event()
        self.done = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        c = self.client
        rng = np.random.default_rng(SEED)
        try:
            lib = K.library(c)
            n, m = 4096, 64
            x, y, z = c.array(n), c.array(n), c.array(n)
            A, B, C = c.array((m, m)), c.array((m, m)), c.array((m, m))
            vadd, sgemm = c.graph(), c.graph()
            grid, block = K.launch_1d(n)
            vadd.kernel(lib, "vadd", grid=grid, block=block, args=[vadd.input(x), vadd.input(y), vadd.output(z), n])
            grid, block = K.sgemm_launch(m, m)
            sgemm.kernel(lib, "sgemm", grid=grid, block=block,
                         args=[sgemm.input(A), sgemm.input(B), sgemm.output(C), m, m, m])
            while not self.stop.is_set():
                x[...] = rng.standard_normal(n)
                y[...] = rng.standard_normal(n)
                z[...] = np.nan
                c.run(vadd, timeout=DEADLINE)
                np.testing.assert_array_equal(z, K.ref_vadd(x, y))
                A[...] = rng.standard_normal((m, m))
                B[...] = rng.standard_normal((m, m))
                C[...] = np.nan
                c.run(sgemm, timeout=DEADLINE)
                np.testing.assert_allclose(C, K.ref_sgemm(A, B), rtol=1e-4, atol=1e-4)
                self.done += 1
        except BaseException as exc:  # reported by the test
            self.failure = exc

    def progressed_since(self, count: int) -> bool:
        if self.failure is not None:
            raise AssertionError(f"the healthy tenant failed: {self.failure!r}") from self.failure
        return self.done > count


def _metrics(path: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape of the broker's metrics socket: {(sample name, sorted labels): value}."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(DEADLINE)
        s.connect(path)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        raw = b""
        while chunk := s.recv(1 << 16):
            raw += chunk
    body = raw.partition(b"\r\n\r\n")[2].decode()
    return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for fam in text_string_to_metric_families(body) for smp in fam.samples}


def _raw_status(path: str) -> dict[str, Any]:
    conn = RawConnection(path)
    try:
        conn.send(P.Status(1))
        reply = conn.recv()
        assert isinstance(reply, P.StatusReply), reply
        return reply.info
    finally:
        conn.close()


def _settled(probe: Callable[[], T]) -> T:
    """``probe()`` once it gave the same value five times in a row (connections still closing)."""
    seen: list[T] = []
    end = time.monotonic() + DEADLINE
    while len(seen) < 5 or any(v != seen[-1] for v in seen[-5:]):
        assert time.monotonic() < end, f"no stable value: {seen[-10:]}"
        seen.append(probe())
        time.sleep(0.05)
    return seen[-1]


@pytest.fixture
def forkserver() -> Iterator[Any]:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    yield ctx


def _scenarios(rng: np.random.Generator) -> list[str]:
    """DEATHS scenario names in their proportions (every one occurs), shuffled."""
    total = sum(SCENARIOS.values())
    names = [s for s, w in SCENARIOS.items() for _ in range(DEATHS * w // total)]
    names += ["random_mix"] * (DEATHS - len(names))
    rng.shuffle(names)
    return names


def _start(ctx: Any, path: str, rng: np.random.Generator, scenarios: list[str]) -> list[Dying]:
    out: list[Dying] = []
    for scenario in scenarios:
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_tenant_main, args=(path, scenario, int(rng.integers(2**31)), writer),
                           name=f"dying-{scenario}", daemon=True)
        kill_after = float(rng.uniform(0.0, 0.25)) if scenario.startswith("random_") else None
        out.append(Dying(scenario, proc, reader, kill_after))
        proc.start()
        writer.close()
    return out


def _reap(batch: list[Dying]) -> None:
    """Kill each random one ``kill_after`` seconds after it started its loop; wait for all to be dead."""
    end = time.monotonic() + DEADLINE
    due: dict[int, float] = {}  # index -> when to kill
    waiting = [i for i, d in enumerate(batch) if d.kill_after is not None]
    while waiting and time.monotonic() < end:
        now = time.monotonic()
        for i in list(waiting):
            d = batch[i]
            if i not in due:
                d.drain()
                if d.phases or not d.proc.is_alive():
                    due[i] = now + (d.kill_after or 0.0)
            if i in due and now >= due[i]:
                d.proc.kill()
                waiting.remove(i)
        time.sleep(0.001)
    for d in batch:
        d.proc.join(max(1.0, end - time.monotonic()))
        d.drain()
        alive = d.proc.is_alive()
        if alive:
            d.proc.kill()
            d.proc.join()
        d.report.close()
        assert not alive, f"a {d.scenario} tenant did not die by itself (phases {d.phases})"
        assert d.proc.exitcode == -signal.SIGKILL, (
            f"a {d.scenario} tenant exited with {d.proc.exitcode} instead of being killed (phases {d.phases}); "
            "its error is in the captured stderr")


def _admin_group() -> str:
    """The test's own group, which the broker lets use the admin commands (root always may)."""
    try:
        return grp.getgrgid(os.getgid()).gr_name
    except KeyError:
        return ""


def _config(metrics_sock: str) -> str:
    # A small in-flight cap per tenant, so that the dead tenants' parked graphs are exercised too.
    return (f'metrics_socket = "{metrics_sock}"\nlanes_cpu = 2\nadmin_group = "{_admin_group()}"\n'
            "[tenant_defaults]\nmax_inflight = 4\n")


def _tenant_row(client: tenantlib.Client) -> dict[str, Any]:
    (row,) = [t for t in client.admin("tenants") if t["tenant"] == client.tenant]
    return row


def test_200_abrupt_tenant_deaths_leave_nothing_behind(broker_factory: BrokerFactory, forkserver: Any,
                                                       tmp_path: Path) -> None:
    metrics_sock = str(tmp_path / "metrics.sock")
    b: BrokerProcess = broker_factory(_config(metrics_sock))
    pid = broker_pid(b)
    (worker,) = children(pid)
    base_fds, base_worker_fds = _settled(lambda: (open_fds(pid), open_fds(worker)))
    base_shm = shm_entries()
    print(f"seed {SEED} (KAAS_DEATHS_SEED={SEED} replays it)")

    healthy = Healthy(b.socket)
    healthy.start()
    rng = np.random.default_rng(SEED)
    scenarios = _scenarios(rng)
    died: list[Dying] = []
    t0 = time.monotonic()
    while len(died) < DEATHS:
        before = healthy.done
        batch = _start(forkserver, b.socket, rng, scenarios[len(died):len(died) + BATCH])
        _reap(batch)
        died += batch
        # the healthy tenant is served while tenants die around it (at least once per batch)
        wait_for(functools.partial(healthy.progressed_since, before), bool, "the healthy tenant's progress")
    storm = time.monotonic() - t0
    healthy.stop.set()
    healthy.join(DEADLINE)
    assert not healthy.is_alive()
    healthy.progressed_since(-1)  # raises what the healthy tenant hit, if anything
    hc = healthy.client

    # Nothing of the dead is queued or running; the device worker never noticed them.
    status = wait_for(lambda: _raw_status(b.socket),
                      lambda s: s["queued"] == 0 and all(d["running"] == 0 for d in s["devices"]),
                      "graphs queued or running in the broker")
    assert all(d["alive"] for d in status["devices"]), status["devices"]
    stats = hc.status()["stats"]
    assert stats["graph_errors"] == 0, stats  # the dead's graphs were cancelled or completed, never failed
    assert stats["worker_restarts"] == stats["replays"] == stats["deadline_kills"] == 0, stats
    # The dead shared the healthy tenant's identity (same uid): its accounting holds only the
    # healthy session now, whose six arenas are idle, and the residents the dead registered (a
    # tenant's residents live as long as any session of the tenant): no graph's device memory but
    # the temps a lease of the healthy session holds while it is on the direct path.
    can_admin = os.geteuid() == 0 or bool(_admin_group())
    if can_admin:
        row = wait_for(lambda: _tenant_row(hc), lambda t: t["sessions"] == 1, "sessions of the dead tenants")
        assert (row["waiting"], row["parked"], row["running"], row["arenas"]) == (0, 0, 0, 6), row
        on_devices = sum(r["bytes"] * len(r["devices"]) for r in hc.admin("residents") if r["tenant"] == hc.tenant)
        assert row["memory_used"] == on_devices + row["lease_bytes"], (row, on_devices)
    hc.close()

    # Every fd, segment and process of the dead is gone, in the broker and in its worker.
    wait_for(lambda: shm_entries() - base_shm, lambda s: not s, "new /dev/shm entries")
    wait_for(lambda: children(pid), lambda s: s == {worker}, "broker child processes")
    wait_for(lambda: open_fds(worker), lambda n: n == base_worker_fds, "open fds in the device worker")
    wait_for(lambda: open_fds(pid), lambda n: n == base_fds, "open fds in the broker")
    # Once no session of the tenant is left, its residents are released too (the tenant's policy).
    m = wait_for(lambda: _metrics(metrics_sock), lambda m: m.get(("kaas_active_sessions", ())) == 0,
                 "sessions the broker counts as open")
    held = {k: v for k, v in m.items() if k[0] in ("kaas_queue_depth", "kaas_resident_bytes") and v}
    assert not held, f"queued graphs or resident bytes still accounted to tenants: {held}"
    broken = {k: v for k, v in m.items() if k[0] == "kaas_errors_total" and ("code", "internal_error") in k[1]}
    assert not any(broken.values()), broken
    if can_admin:
        with tenantlib.connect(b.socket, timeout=DEADLINE) as admin:
            assert admin.admin("residents") == []
            (row,) = admin.admin("tenants")  # only this session's, fresh
            assert (row["sessions"], row["arenas"], row["residents"], row["memory_used"]) == (1, 0, 0, 0), row
            used = {d["device"]: d["memory_used"] for d in admin.admin("status")["devices"]}
            assert not any(used.values()), f"device memory still accounted: {used}"
    else:
        print("not root and no group name: the admin commands' per-tenant accounting was not checked")
    wait_for(lambda: open_fds(pid), lambda n: n == base_fds, "open fds in the broker after the last checks")

    where = Counter(f"{d.scenario}: {d.phases[-1] if d.phases else 'before connecting'}" for d in died)
    print(f"{len(died)} tenants killed in {storm:.1f} s; the healthy tenant ran {healthy.done} vadd+sgemm pairs; "
          f"broker stats {stats}")
    for k, v in sorted(where.items()):
        print(f"  {v:4d}  {k}")


def test_a_tenant_killed_while_creating_a_segment_leaves_nothing_in_dev_shm(broker_factory: BrokerFactory,
                                                                           forkserver: Any) -> None:
    """Regression: tenantlib named the segment (shm_open) and unlinked the name only after mapping it,
    so a tenant killed in between left it in /dev/shm for good; arenas are memfds now."""
    b = broker_factory()
    base = shm_entries()
    reader, writer = forkserver.Pipe(duplex=False)
    proc = forkserver.Process(target=_killed_creating_segment, args=(b.socket, writer), daemon=True)
    proc.start()
    writer.close()
    proc.join(DEADLINE)
    reader.close()
    assert proc.exitcode == -signal.SIGKILL
    left = shm_entries() - base
    try:
        assert not left, f"a tenant killed inside tenantlib.arena.create_segment left {sorted(left)} in /dev/shm"
    finally:
        for name in left:
            path = os.path.join("/dev/shm", name)
            if os.stat(path).st_uid == os.getuid():
                os.unlink(path)


def _killed_creating_segment(path: str, report: multiprocessing.connection.Connection) -> None:
    """A tenant killed at one instruction-exact point: its segment exists, its mapping does not yet."""
    import tenantlib.arena

    class _DieOnMap:
        def __getattr__(self, name: str) -> Any:
            if name == "mmap":
                return lambda *a, **kw: os.kill(os.getpid(), signal.SIGKILL)
            return getattr(mmap, name)

    with tenantlib.connect(path, timeout=DEADLINE) as c:
        report.send_bytes(b"connected")
        tenantlib.arena.mmap = _DieOnMap()  # type: ignore[assignment]
        c.arena(4096)
    raise AssertionError("not killed")
