"""``kaas-bench soak``: mixed load with faults arriving all the time; nothing lost, nothing leaking.

    kaas-bench soak [--device cpu|cuda] [--tenants 64] [--seconds 60] [--chaos-every 2.0] [--seed 0]
                    [--open-rate R] [--memory-slack-mib 256] [--json] [--plot PNG]
    kaas-bench soak --from-json RUN.json [--plot PNG]

Well-behaved tenants (each its own process, under its own uid when run as root) run null,
sgemm, jacobi and mlp graphs (weights 1-4, batch and latency class, closed loop or open loop at
``--open-rate`` arrivals a second) and check every result against numpy.  When run as root, four
more tenants of weights 1, 2, 3, 4 keep a large sgemm queued all the time: the share group, whose
device time must split by weight.  Meanwhile a chaos schedule (exponential gaps of mean
``--chaos-every`` seconds) starts culprits: an illegal-address kernel (on the CPU device, a host
implementation that kills its worker), a runaway kernel past its deadline, a tenant SIGKILLed
mid-request, the device worker killed from outside, a tenant flooding past its queue quota,
garbage frames, a tenant scribbling over its own rings, and a tenant registering libraries and
residents in a loop.  Checked and printed at the end:

- every request of a well-behaved tenant got exactly one reply, every checked result is right,
  and well-behaved tenants saw no errors (the culprits do); their p99 inside fault windows (the
  2 s after each fault) next to their p99 outside;
- the broker's RSS, open fds and threads, and the device memory it accounts (and, on CUDA, what
  the device reports as used), after warm-up against the end of the load (flat within 5%);
  /dev/shm holds nothing new at the end;
- the broker's device-memory accounting against the device worker's own count (residents: equal
  once the load is gone) and, on CUDA, against the device (within ``--memory-slack-mib``);
- the share group's device time (the broker's charge, from ``kaasctl tenants``) against its
  weights, within 5 points.

The table's graphs, errors and device time come from the broker's own counters (``kaasctl
tenants``), beside what each tenant counted.  Memory and shares need the admin commands (root);
without them those checks are reported as not run.  Exit status 1 when a check fails.
Resources come from /proc, so the broker runs on this host.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import struct
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

UID_BASE = 62000
WORKLOADS = ("null", "sgemm", "jacobi", "mlp")
SIZES = {"cpu": {"null": 0, "sgemm": 64, "jacobi": 64, "mlp": 16},
         "cuda": {"null": 0, "sgemm": 1024, "jacobi": 512, "mlp": 64}}
SHARE_SIZE = {"cpu": 128, "cuda": 2048}   # the share group's sgemm: long enough to keep the device busy
SHARE_WEIGHTS = (1, 2, 3, 4)
SHARE_TOLERANCE = 0.05                    # the share group's shares against its weights' (5 points)
FLAT = 0.05                               # resources after warm-up against the end of the load
FAULTS = ("crash", "runaway", "kill_tenant", "kill_worker", "flood", "garbage", "scribble", "library_loop")
STALL_LIMIT = 30.0  # seconds without any well-behaved tenant's completion: the device is down, not slow
FAULT_WINDOW = 2.0  # seconds after a fault in which a well-behaved tenant's latency counts as "during a fault"
_SLOW = 'extern "C" __global__ void slow(int ms) {}\nextern "C" __global__ void hang() {}\nextern "C" __global__ void crash() {}\n'


@dataclass(frozen=True)
class Profile:
    """What one well-behaved tenant runs."""

    name: str
    workload: str
    size: int
    weight: int
    priority: str   # batch | latency
    loop: str       # closed (``inflight`` runs in flight) | open (Poisson arrivals)
    inflight: int
    share: bool = False  # of the share group


def profiles(tenants: int, device: str, inflight: int, share_group: bool) -> list[Profile]:
    """Workload, weight, class and loop vary independently across tenants (no two in lockstep)."""
    kind = device.split(":")[0]
    sizes = SIZES.get(kind, SIZES["cpu"])
    out = []
    for i in range(tenants):
        wl = WORKLOADS[i % len(WORKLOADS)]
        w = 1 + (i // len(WORKLOADS)) % 4
        out.append(Profile(f"soak{i}-w{w}", wl, sizes[wl], w, "latency" if i % 5 == 4 else "batch",
                           "open" if i % 3 == 2 else "closed", inflight))
    if share_group:
        for j, w in enumerate(SHARE_WEIGHTS):
            out.append(Profile(f"share{j}-w{w}", "sgemm", SHARE_SIZE.get(kind, 128), w, "batch", "closed",
                               max(inflight, 3), share=True))
    return out


_ONE_THREAD = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _tenant_context() -> Any:
    """Where tenant processes come from: a fork server whose numpy runs one BLAS thread.

    Each tenant checks its results with numpy; with a BLAS thread per core in each of 68 tenants
    the checks crowded the broker off the H200's 16 cores (153 graphs/s against 2,226 with one
    thread, bench/RESULTS.md).  The variables must be set before numpy loads, which in this
    process it has, so the tenants fork from a server started with them (the broker is not: a CPU
    device's kernels use its BLAS)."""
    from multiprocessing import forkserver

    from bench.fairness import PRELOAD

    ctx = mp.get_context("forkserver")
    saved = {k: os.environ.get(k) for k in _ONE_THREAD}
    os.environ.update(dict.fromkeys(_ONE_THREAD, "1"))
    try:
        # Everything a tenant imports, before it takes its own uid (then it may not read these files).
        ctx.set_forkserver_preload(["numpy", "bench.soak", *PRELOAD])
        forkserver.ensure_running()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ctx


def _become(uid: int | None) -> None:
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


class _Checked:
    """One workload instance: fresh inputs on a band before each run, the band checked after."""

    def __init__(self, w: Any, rng: np.random.Generator) -> None:
        self.w, self.rng = w, rng
        self.rows: slice | None = None

    def refresh(self) -> None:
        from tools.workloads import check_rows, prepare_check

        plan = self.w.plan
        if plan is not None:
            self.rows = check_rows(plan, self.rng)
            prepare_check(plan, self.w.arrays, self.rng, self.rows)

    def check(self) -> bool:
        from tools.workloads import verify

        return self.w.plan is None or verify(self.w.plan, self.w.arrays, self.rows)


def _steady(sock: str, uid: int | None, prof: Profile, until: float, seed: int, open_rate: float,
            conn: Connection) -> None:
    """A well-behaved tenant; every result checked against numpy."""
    try:
        _become(uid)
        import tenantlib
        from tenantlib import kernels
        from tools.workloads import make

        rng = np.random.default_rng(seed)
        sent = replies = wrong = skipped = 0
        errs: dict[str, int] = {}
        samples: list[tuple[float, float, float]] = []  # (finished, round trip, device seconds)
        with tenantlib.connect(sock, timeout=120) as c:
            lib = kernels.library(c)
            npool = prof.inflight * (2 if prof.loop == "open" else 1)
            free = [_Checked(make(c, lib, prof.workload, prof.size), rng) for _ in range(npool)]
            tenant = c.tenant
            pending: deque[tuple[_Checked, Any]] = deque()

            def send() -> None:
                nonlocal sent, replies
                w = free.pop()
                w.refresh()
                sent += 1
                try:
                    pending.append((w, c.submit(w.w.graph, timeout=60)))
                except tenantlib.errors.KaasError as exc:  # refused up front: a reply of its own
                    replies += 1
                    errs[exc.code] = errs.get(exc.code, 0) + 1
                    free.append(w)

            def collect(w: _Checked, p: Any) -> None:
                nonlocal replies, wrong
                replies += 1
                try:
                    r = p.result()
                    wrong += 0 if w.check() else 1
                    samples.append((time.monotonic(), r.rtt, r.timings.kernels))
                except tenantlib.errors.KaasError as exc:
                    errs[exc.code] = errs.get(exc.code, 0) + 1
                free.append(w)

            if prof.loop == "closed":
                while free:
                    send()
                while pending:
                    collect(*pending.popleft())
                    if time.monotonic() < until:
                        send()
            else:
                next_at = time.monotonic() + rng.exponential(1 / open_rate)
                while True:
                    now = time.monotonic()
                    if now >= until and not pending:
                        break
                    while now < until and now >= next_at:  # arrivals come whether or not runs finished
                        if free:
                            send()
                        else:
                            skipped += 1  # every buffer set is in use: the arrival is not sent
                        next_at += rng.exponential(1 / open_rate)
                    if pending:
                        pending[0][1].done(timeout=max(0.0, min(next_at - now, 0.05)))
                        for item in [it for it in pending if it[1].done()]:
                            pending.remove(item)
                            collect(*item)
                    else:
                        time.sleep(max(0.0, min(next_at, until) - now))
        conn.send({"tenant": tenant, "profile": asdict(prof), "sent": sent, "replies": replies, "wrong": wrong,
                   "skipped": skipped, "errors": errs, "samples": samples})
    except BaseException as exc:  # report, never hang the parent
        conn.send({"error": f"{prof.name}: {type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def _scribble(c: Any, seed: int) -> None:
    """Garbage records into our own run ring, then a head index past anything it holds."""
    from tenantlib import kernels

    g = c.graph()
    g.kernel(kernels.library(c), "null", grid=1, block=1, args=[])
    c.run(g)  # the rings are set up with the first run
    rings = c._rings
    if rings is None:
        raise RuntimeError("this session has no rings to scribble over")
    rnd = random.Random(seed)
    mm, geom, base = rings.mm, rings.geom, rings.geom.offset(0)
    tail = struct.unpack_from("<Q", mm, base + 128)[0]
    for k in range(8):
        slot = base + 256 + ((tail + k) & (geom.slots - 1)) * geom.slot_size
        n = rnd.randrange(0, geom.slot_size - 4)
        struct.pack_into("<I", mm, slot, n)
        mm[slot + 4:slot + 4 + n] = rnd.randbytes(n)
    struct.pack_into("<Q", mm, base + 64, tail + 8)
    from broker.ring import wake

    wake(rings.wake_broker)
    time.sleep(0.2)
    struct.pack_into("<Q", mm, base + 64, rnd.randrange(2**40, 2**62))
    wake(rings.wake_broker)
    time.sleep(0.2)
    c.run(g)  # the session is gone: a typed error


def _culprit_library(c: Any, cuda: bool) -> tuple[Any, Any]:
    """The culprits' kernels, and ``build(graph, what, arg)`` adding one: ``crash`` (an illegal
    address on CUDA; on the CPU device a host implementation that kills its worker), ``hang``
    (never ends) or ``slow`` (``arg`` ms)."""
    from tenantlib import kernels
    from tenantlib.kernels import testing

    if cuda:
        from bench.recovery import BOGUS_ADDRESS, CUDA_KERNELS, CUDA_SOURCE

        lib = c.library(CUDA_SOURCE, kernels=CUDA_KERNELS, name="soak-culprits")

        def build(g: Any, what: str, arg: int = 0) -> None:
            if what == "crash":
                g.kernel(lib, "poke", grid=1, block=1, args=[BOGUS_ADDRESS])
            elif what == "hang":
                g.kernel(lib, "spin", grid=1, block=1, args=[g.temp(1, np.int32)])
            else:
                g.kernel(lib, "wait_ns", grid=1, block=1, args=[arg * 1_000_000])
        return lib, build
    lib = c.library(kernels.SOURCE + _SLOW, kernels=[*kernels.KERNELS, testing.SLOW, testing.HANG, testing.CRASH])

    def build_cpu(g: Any, what: str, arg: int = 0) -> None:
        g.kernel(lib, what, grid=1, block=1, args=[arg] if what == "slow" else [])
    return lib, build_cpu


def _culprit(sock: str, uid: int | None, fault: str, seed: int, cuda: bool) -> None:
    """One fault, from its own process; its errors are expected and not reported."""
    try:
        _become(uid)
        import tenantlib
        from tenantlib import kernels

        with tenantlib.connect(sock, timeout=60) as c:
            if fault == "garbage":
                raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                raw.connect(sock)
                raw.sendall(random.Random(seed).randbytes(4096))
                raw.close()
                return
            if fault == "scribble":
                _scribble(c, seed)
                return
            if fault == "library_loop":
                # Each distinct library is compiled by the device worker: before it compiled in a
                # thread (broker/streams/precompile.py), 40 of them stalled every tenant for a minute.
                # Residents in a loop too: the broker's caches are bounded per tenant.
                for i in range(8):
                    c.library(f"// soak {seed} {i}\n" + kernels.SOURCE, kernels=kernels.KERNELS)
                    x = c.array(1 << 16)
                    x[...] = seed * 100 + i
                    c.resident(x)
                return
            _, build = _culprit_library(c, cuda)
            g = c.graph()
            if fault == "crash":
                build(g, "crash")
                c.run(g, timeout=30)
            elif fault == "runaway":
                build(g, "hang")
                c.run(g, timeout=0.5)
            elif fault == "flood":
                build(g, "slow", 5)
                pending = []
                for _ in range(400):  # past max_queued: the rest are refused, the queue drains
                    try:
                        pending.append(c.submit(g))
                    except tenantlib.errors.KaasError:
                        break
                for p in pending:
                    try:
                        p.result()
                    except tenantlib.errors.KaasError:
                        pass
            elif fault == "kill_tenant":
                build(g, "slow", 200)
                for _ in range(4):
                    c.submit(g)
                os.kill(os.getpid(), signal.SIGKILL)  # mid-request, with graphs queued and running
    except BaseException:
        pass


def _proc_stats(pid: int) -> dict[str, int]:
    out = {"fds": len(os.listdir(f"/proc/{pid}/fd"))}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_kib"] = int(line.split()[1])
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
    return out


def _fd_kinds(pid: int) -> dict[str, int]:
    """The broker's open fds by what they are (socket, eventfd, a memfd by name, a path): where a
    growing count comes from."""
    kinds: dict[str, int] = {}
    where = f"/proc/{pid}/fd"
    for fd in os.listdir(where):
        try:
            target = os.readlink(os.path.join(where, fd))
        except OSError:  # closed meanwhile
            continue
        kind = target.split(":[", 1)[0] if ":[" in target else target.removesuffix(" (deleted)")
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


class _Admin:
    """The soak's own session: the worker's pid, and the admin views (memory, tenants) when allowed."""

    def __init__(self, sock: str) -> None:
        import tenantlib

        self.c = tenantlib.connect(sock, client="soak", timeout=30)
        try:
            self.c.admin("status")
            self.allowed = True
        except tenantlib.errors.PermissionDenied:
            self.allowed = False

    def worker_pid(self) -> int | None:
        try:
            devs = self.c.status().get("devices", [])
        except Exception:  # the status of a broker between workers: try the next time
            return None
        return next((int(d["pid"]) for d in devs if d.get("pid")), None)

    def memory(self) -> list[dict[str, Any]] | None:
        if not self.allowed:
            return None
        try:
            return list(self.c.admin("memory"))
        except Exception:  # a broker busy replacing a worker: the next sample
            return None

    def tenants(self) -> dict[str, dict[str, Any]] | None:
        return {t["tenant"]: t for t in self.c.admin("tenants")} if self.allowed else None

    def close(self) -> None:
        self.c.close()


def _memory_sample(rows: list[dict[str, Any]] | None) -> dict[str, int]:
    """The first device's accounting and the worker's counts, flat, for the timeline."""
    if not rows:
        return {}
    m = rows[0]
    w = m.get("worker") or {}
    out = {"accounted": m["accounted"], "accounted_residents": m["accounted_residents"],
           "accounted_graphs": m["accounted_graphs"]}
    for k in ("resident_bytes", "pool_used", "pool_reserved", "device_used"):
        if k in w:
            out[f"worker_{k}"] = w[k]
    return out


def run(device: str = "cpu", tenants: int = 64, seconds: float = 60.0, chaos_every: float = 2.0, seed: int = 0,
        warmup: float = 5.0, inflight: int = 2, env: dict[str, str] | None = None, open_rate: float = 0.0,
        memory_slack_mib: float = 256.0, broker_log: str | None = None) -> dict[str, Any]:
    from tools.broker_process import BrokerProcess

    root = os.geteuid() == 0
    rnd = random.Random(seed)
    kind = device.split(":")[0]
    rate = open_rate or (200.0 if kind == "cuda" else 20.0)
    profs = profiles(tenants, device, inflight, share_group=root)
    rules = "".join(f'[[tenants]]\nname = "{p.name}"\nuid = {UID_BASE + i}\nweight = {p.weight}\n'
                    f'priority = "{p.priority}"\n' for i, p in enumerate(profs)) if root else ""
    cfg_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"kaas-soak-{os.getpid()}"
    cfg_dir.mkdir(exist_ok=True)
    cfg = cfg_dir / "broker.toml"
    cfg.write_text('socket_mode = 438\nhost_modules = ["tenantlib.kernels.host", "tenantlib.kernels.testing"]\n'
                   "tenant_max_libraries = 16\ntenant_max_residents = 64\nmax_libraries = 32\n" + rules)
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    events: list[tuple[float, str]] = []
    stats: list[tuple[float, dict[str, int]]] = []
    ctx = _tenant_context()
    with BrokerProcess(device, config=str(cfg), env=env, log=broker_log) as b:
        os.chmod(os.path.dirname(b.socket), 0o755)
        assert b.proc is not None
        bpid = b.proc.pid
        admin = _Admin(b.socket)
        baseline = _memory_sample(admin.memory())
        t0 = time.monotonic()
        until = t0 + warmup + seconds
        pipes, procs = [], []
        for i, prof in enumerate(profs):
            ours, theirs = ctx.Pipe(duplex=False)
            pr = ctx.Process(target=_steady, args=(b.socket, UID_BASE + i if root else None, prof, until,
                                                   seed * 1000 + i, rate, theirs))
            pr.start()
            theirs.close()
            pipes.append(ours)
            procs.append(pr)
        # Without root every process is one tenant: a flood would fill the well-behaved tenants' own queue.
        faults = FAULTS if root else tuple(f for f in FAULTS if f != "flood")
        next_fault = t0 + warmup + rnd.expovariate(1 / chaos_every)
        next_sample = t0
        shares_from: dict[str, dict[str, Any]] | None = None
        fds_from: dict[str, int] = {}
        culprits: list[Any] = []
        n = 0
        while time.monotonic() < until:
            now = time.monotonic()
            if now >= next_sample:
                stats.append((now - t0, {**_proc_stats(bpid), **_memory_sample(admin.memory())}))
                next_sample = now + 1.0
            if shares_from is None and now >= t0 + warmup:
                shares_from = admin.tenants()
                fds_from = _fd_kinds(bpid)
            if now >= next_fault and now < until - FAULT_WINDOW:
                fault = faults[n % len(faults)] if n < len(faults) else rnd.choice(faults)
                n += 1
                events.append((now, fault))
                print(f"soak: {now - t0:6.1f} s  {fault}", file=sys.stderr, flush=True)
                if fault == "kill_worker":
                    pid = admin.worker_pid()
                    try:
                        if pid:
                            os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:  # it was being replaced after an earlier fault
                        pass
                else:
                    uid = UID_BASE + len(profs) + n if root else None
                    pr = ctx.Process(target=_culprit, args=(b.socket, uid, fault, seed * 1000 + n, kind == "cuda"))
                    pr.start()
                    culprits.append(pr)
                next_fault = now + rnd.expovariate(1 / chaos_every)
            time.sleep(0.05)
        stats.append((time.monotonic() - t0, {**_proc_stats(bpid), **_memory_sample(admin.memory())}))
        load_end = len(stats) - 1  # the last sample under load
        fds_to = _fd_kinds(bpid)
        results = [p.recv() for p in pipes]
        for pr in procs + culprits:
            pr.join(60)
        shares_to = admin.tenants()
        time.sleep(1.0)  # the broker lets go of what closed sessions held
        idle_memory = admin.memory()
        broker_stats = dict(admin.c.status().get("stats", {}))
        admin_allowed = admin.allowed
        stats.append((time.monotonic() - t0, {**_proc_stats(bpid), **_memory_sample(idle_memory)}))
        admin.close()
    cfg.unlink()
    cfg_dir.rmdir()
    shm_left = sorted((set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()) - shm_before)
    doc = _report(results, events, stats, t0, warmup, shm_left, seconds, device, seed, load_end)
    doc["broker_stats"] = broker_stats  # worker restarts, failed respawns, replays, deadline kills, ...
    doc["fd_kinds"] = {"after_warmup": fds_from, "end": fds_to}
    if broker_log:
        doc["recovery"] = recovery(broker_log)
    if admin_allowed and idle_memory is None:
        doc["problems"].append("the broker did not answer the memory view at idle")
    _check_memory(doc, baseline, idle_memory, memory_slack_mib)
    _check_shares(doc, shares_from, shares_to)
    doc["ok"] = not doc["problems"]
    return doc


def _report(results: list[dict[str, Any]], events: list[tuple[float, str]], stats: list[tuple[float, dict[str, int]]],
            t0: float, warmup: float, shm_left: list[str], seconds: float, device: str, seed: int,
            load_end: int) -> dict[str, Any]:
    """The table's rows and the checks of replies, results and resources (``events`` at monotonic
    times, ``stats`` at seconds since ``t0``; ``stats[load_end]`` is the last sample under load)."""
    problems: list[str] = [f"a tenant process failed: {r['error']}" for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    rows = []

    def in_fault(t: float) -> bool:
        return any(0 <= t - at <= FAULT_WINDOW for at, _ in events)

    for r in ok:
        measured = [(t, rtt) for t, rtt, _ in r["samples"] if t >= t0 + warmup]  # after warm-up (first compiles)
        inside = [rtt for t, rtt in measured if in_fault(t)]
        outside = [rtt for t, rtt in measured if not in_fault(t)]
        prof = r["profile"]
        row = {"tenant": r["tenant"], "workload": f"{prof['workload']} {prof['size'] or ''}".strip(),
               "weight": prof["weight"], "class": prof["priority"], "loop": prof["loop"], "share_group": prof["share"],
               "sent": r["sent"], "replies": r["replies"], "wrong": r["wrong"], "errors": r["errors"],
               "skipped": r["skipped"],
               "p99_ms_faults": float(np.percentile(inside, 99) * 1e3) if inside else None,
               "p99_ms_calm": float(np.percentile(outside, 99) * 1e3) if outside else None}
        finished = sorted(t for t, _, _ in r["samples"])
        gaps = [(b - a, a) for a, b in zip(finished, finished[1:], strict=False)]
        if gaps:
            longest, at = max(gaps)
            row["longest_gap_s"], row["longest_gap_at"] = round(longest, 3), round(at - t0, 2)
        if r["sent"] != r["replies"]:
            problems.append(f"{r['tenant']}: {r['sent']} requests, {r['replies']} replies")
        if r["wrong"]:
            problems.append(f"{r['tenant']}: {r['wrong']} wrong results")
        if r["errors"]:
            problems.append(f"{r['tenant']}: errors {r['errors']}")
        rows.append(row)
    load = stats[:load_end + 1]
    after = [s for t, s in load if t >= warmup + min(10.0, seconds / 3)] or [s for _, s in load]
    first, last = after[0], load[-1][1]
    resources = {k: {"after_warmup": first.get(k), "end": last.get(k)} for k in ("rss_kib", "fds", "threads")}
    for k in resources:
        a, e = first.get(k, 0), last.get(k, 0)
        if a and e > a * (1 + FLAT) + (2 if k != "rss_kib" else 0):
            problems.append(f"broker {k} grew from {a} to {e} (more than {FLAT:.0%}) between warm-up and the end")
    # Device memory moves with the graphs in flight and drops when a worker dies, so one sample says
    # little: a leak lifts the floor.  The second half's lowest must stay under the first half's
    # highest (plus 5%); the broker's count against the worker's is checked exactly at idle.
    half = len(after) // 2
    for k in ("accounted", "worker_device_used"):
        early = [s[k] for s in after[:half] if k in s]
        late = [s[k] for s in after[half:] if k in s]
        if not early or not late:
            continue
        resources[k] = {"early_peak": max(early), "late_floor": min(late), "late_peak": max(late)}
        if min(late) > max(early) * (1 + FLAT):
            problems.append(f"{k}: at least {min(late)} bytes all through the second half of the load, "
                            f"against at most {max(early)} in the first")
    if shm_left:
        problems.append(f"/dev/shm holds {len(shm_left)} new entries: {shm_left[:5]}")
    # The longest time no well-behaved tenant got any completion: a device that stays down shows here.
    done_at = sorted(t - t0 for r in ok for t, _, _ in r["samples"])
    stall = max((b - max(a, warmup) for a, b in zip([warmup, *done_at], [*done_at, warmup + seconds], strict=False)
                 if warmup <= b), default=0.0)
    timeline = [{"t": round(t, 2), **s} for t, s in stats]
    if stall > STALL_LIMIT:
        problems.append(f"no well-behaved tenant got a completion for {stall:.1f} s (limit {STALL_LIMIT:g} s)")
    return {"longest_stall_s": round(stall, 2), "bench": "soak", "device": device, "seconds": seconds, "seed": seed,
            "tenants": rows,
            "faults": [{"at": round(t - t0, 2), "fault": f} for t, f in events], "resources": resources,
            "timeline": timeline, "throughput": _per_second(ok, t0), "problems": problems}


def recovery(log_path: str) -> dict[str, Any]:
    """From the broker's log: why workers were lost, how long each respawn took from the new
    worker's start to its return to service (its restore), and why respawns failed."""
    from datetime import datetime

    lost: dict[str, int] = {}
    failed: dict[str, int] = {}
    ready_at: float | None = None
    restores: list[float] = []
    try:
        lines = Path(log_path).read_text(errors="replace").splitlines()
    except OSError as exc:
        return {"error": str(exc)}
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            ev = json.loads(line)
            t = datetime.fromisoformat(str(ev.get("timestamp", "")).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
        name = ev.get("event")
        if name == "worker_lost":
            why = str(ev.get("why", "?")).split(":")[0]
            lost[why] = lost.get(why, 0) + 1
        elif name == "worker_ready":
            ready_at = t
        elif name == "worker_respawned" and ready_at is not None:
            restores.append(t - ready_at)
            ready_at = None
        elif name == "worker_respawn_failed":
            why = str(ev.get("error", "?")).split(":")[0]
            failed[why] = failed.get(why, 0) + 1
    out: dict[str, Any] = {"worker_lost": lost, "respawn_failed": failed, "respawns": len(restores)}
    if restores:
        out.update(restore_p50_s=round(float(np.median(restores)), 3), restore_max_s=round(max(restores), 3))
    return out


def _per_second(results: list[dict[str, Any]], t0: float) -> list[dict[str, float]]:
    """Completions a second and their p50 / p99 round trip, over every well-behaved tenant."""
    by: dict[int, list[float]] = {}
    for r in results:
        for t, rtt, _ in r["samples"]:
            by.setdefault(int(t - t0), []).append(rtt)
    return [{"t": float(s), "graphs": len(v), "p50_ms": float(np.percentile(v, 50) * 1e3),
             "p99_ms": float(np.percentile(v, 99) * 1e3)} for s, v in sorted(by.items())]


def _check_memory(doc: dict[str, Any], baseline: dict[str, int], idle: list[dict[str, Any]] | None,
                  slack_mib: float) -> None:
    """Once the load is gone the broker's count of resident bytes equals the worker's; on CUDA the
    device's used memory, less what it used before any tenant came, is the residents plus the
    worker's graph pool (lane slabs, cached blocks) within ``slack_mib`` (module code, CUDA-graph
    executables)."""
    if idle is None:
        doc["memory"] = {"checked": False, "why": "the admin commands need root or the admin group, or it did "
                                                  "not answer"}
        return
    out: dict[str, Any] = {"checked": True, "slack_mib": slack_mib, "devices": idle, "baseline": baseline}
    for m in idle:
        w = m.get("worker")
        if w is None:
            doc["problems"].append(f"{m['device']}: the worker did not report its memory at the end")
            continue
        if m["accounted_residents"] != w["resident_bytes"]:
            doc["problems"].append(f"{m['device']}: the broker accounts {m['accounted_residents']} resident bytes, "
                                   f"the worker holds {w['resident_bytes']}")
        if m["accounted_graphs"]:
            doc["problems"].append(f"{m['device']}: {m['accounted_graphs']} bytes still reserved for graphs at idle")
        if "device_used" in w and "worker_device_used" in baseline and m is idle[0]:  # the baseline is the first device's
            unexplained = w["device_used"] - baseline["worker_device_used"] - w["resident_bytes"] - w["pool_reserved"]
            out.setdefault("unexplained_mib", {})[m["device"]] = round(unexplained / 2**20, 1)
            if abs(unexplained) > slack_mib * 2**20:
                doc["problems"].append(f"{m['device']}: the device uses {unexplained / 2**20:.0f} MiB more than the "
                                       f"residents and the graph pool explain (slack {slack_mib:g} MiB)")
    doc["memory"] = out


def _check_shares(doc: dict[str, Any], before: dict[str, dict[str, Any]] | None,
                  after: dict[str, dict[str, Any]] | None) -> None:
    """The share group's device time (the broker's charge, after warm-up) splits by weight."""
    for r in doc["tenants"]:
        t = (after or {}).get(r["tenant"])
        if t is not None:
            r.update(broker_graphs=t["graphs"], broker_errors=t["errors"], device_s=round(t["device_seconds"], 3))
    group = [r for r in doc["tenants"] if r["share_group"]]
    if not group or before is None or after is None:
        doc["shares"] = {"checked": False, "why": "the share group needs root (a uid per tenant)"}
        return
    used = {r["tenant"]: after[r["tenant"]]["device_seconds"] - before.get(r["tenant"], {}).get("device_seconds", 0.0)
            for r in group}
    total = sum(used.values()) or 1.0
    wsum = sum(r["weight"] for r in group)
    rows = []
    for r in group:
        share, target = used[r["tenant"]] / total, r["weight"] / wsum
        rows.append({"tenant": r["tenant"], "weight": r["weight"], "share": round(share, 4), "target": round(target, 4)})
        if abs(share - target) > SHARE_TOLERANCE:
            doc["problems"].append(f"{r['tenant']}: share {share:.3f} of the group's device time, target {target:.3f}")
    doc["shares"] = {"checked": True, "tolerance": SHARE_TOLERANCE, "group": rows}


def show(doc: dict[str, Any]) -> str:
    lines = [f"soak: {doc['seconds']:g} s on {doc['device']}, {len(doc['faults'])} faults "
             f"({', '.join(sorted({f['fault'] for f in doc['faults']}))})", ""]
    head = f"{'tenant':14} {'workload':10} {'w':>1} {'class':7} {'loop':6} {'sent':>7} {'replies':>7} {'wrong':>5} " \
           f"{'errors':>6} {'graphs*':>7} {'errors*':>7} {'device s*':>9} {'p99 faults':>10} {'p99 calm':>9}"
    lines.append(head)

    def ms(x: float | None) -> str:
        return f"{x:.1f}" if x is not None else "-"

    for r in doc["tenants"]:
        lines.append(f"{r['tenant']:14} {r['workload']:10} {r['weight']:>1} {r['class']:7} {r['loop']:6} {r['sent']:>7} "
                     f"{r['replies']:>7} {r['wrong']:>5} {sum(r['errors'].values()):>6} "
                     f"{r.get('broker_graphs', '-'):>7} {r.get('broker_errors', '-'):>7} {r.get('device_s', '-'):>9} "
                     f"{ms(r['p99_ms_faults']):>10} {ms(r['p99_ms_calm']):>9}")
    lines.append("(* the broker's own counters, kaasctl tenants; p99 in ms, faults: the 2 s after each fault)")
    lines.append("")
    lines.append(f"longest time without any completion (all tenants): {doc.get('longest_stall_s', '-')} s")
    rec = doc.get("recovery") or {}
    if rec.get("respawns") is not None:
        lines.append(f"recovery: {rec['respawns']} respawns, restore p50 {rec.get('restore_p50_s', '-')} s, max "
                     f"{rec.get('restore_max_s', '-')} s; workers lost: {rec.get('worker_lost')}; respawns failed: "
                     f"{rec.get('respawn_failed') or 'none'}")
    st = doc.get("broker_stats") or {}
    if st:
        lines.append("broker: " + ", ".join(f"{k} {st[k]}" for k in ("graphs", "graph_errors", "worker_restarts",
                                                                     "respawn_failures", "replays", "deadline_kills")
                                           if k in st))
    sh = doc.get("shares", {})
    if sh.get("checked"):
        lines.append("share group (device time after warm-up): " + ", ".join(
            f"{g['tenant']} {g['share']:.3f} (target {g['target']:.3f})" for g in sh["group"]))
    else:
        lines.append(f"shares not checked: {sh.get('why', '-')}")
    for k, v in doc["resources"].items():
        if "early_peak" in v:
            lines.append(f"{k}: at most {v['early_peak']} bytes in the first half after warm-up; "
                         f"{v['late_floor']} to {v['late_peak']} in the second")
        else:
            lines.append(f"broker {k}: {v['after_warmup']} after warm-up, {v['end']} at the end of the load")
    fk = doc.get("fd_kinds") or {}
    a, e = fk.get("after_warmup") or {}, fk.get("end") or {}
    moved = sorted((k for k in set(a) | set(e) if a.get(k, 0) != e.get(k, 0)), key=lambda k: -abs(e.get(k, 0) - a.get(k, 0)))
    if moved:
        lines.append("broker fds that changed, after warm-up -> end: " + ", ".join(
            f"{k} {a.get(k, 0)} -> {e.get(k, 0)}" for k in moved[:8]))
    mem = doc.get("memory", {})
    if mem.get("checked"):
        for m in mem["devices"]:
            w = m.get("worker") or {}
            lines.append(f"{m['device']} at idle: broker accounts {m['accounted_residents']} resident bytes, "
                         f"worker holds {w.get('resident_bytes')}; unexplained device use "
                         f"{mem.get('unexplained_mib', {}).get(m['device'], '-')} MiB (slack {mem['slack_mib']:g})")
    else:
        lines.append(f"memory not checked: {mem.get('why', '-')}")
    lines.append("OK: nothing lost, wrong or leaked" if doc["ok"] else "PROBLEMS:\n  " + "\n  ".join(doc["problems"]))
    return "\n".join(lines)


def _pyplot() -> Any:
    from tools.bench import _pyplot

    return _pyplot()


def _plot(doc: dict[str, Any], path: str) -> None:
    plt = _pyplot()

    fig, ax = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    tp = doc["throughput"]
    ax[0].plot([s["t"] for s in tp], [s["p50_ms"] for s in tp], label="p50")
    ax[0].plot([s["t"] for s in tp], [s["p99_ms"] for s in tp], label="p99")
    ax[0].set_yscale("log")
    ax[0].set_ylabel("round trip (ms)")
    ax[0].legend()
    ax[1].plot([s["t"] for s in tp], [s["graphs"] for s in tp])
    ax[1].set_ylabel("graphs / s")
    tl = doc["timeline"]
    ax[2].plot([s["t"] for s in tl], [s.get("rss_kib", 0) / 1024 for s in tl])
    ax[2].set_ylabel("broker RSS (MiB)")
    ax[3].plot([s["t"] for s in tl], [s.get("accounted", 0) / 2**20 for s in tl], label="accounted")
    if any("worker_device_used" in s for s in tl):
        ax[3].plot([s["t"] for s in tl], [s.get("worker_device_used", 0) / 2**20 for s in tl], label="device used")
    ax[3].set_ylabel("device memory (MiB)")
    ax[3].legend()
    ax[3].set_xlabel("seconds")
    for f in doc["faults"]:
        for a in ax:
            a.axvline(f["at"], color="red", alpha=0.15)
    fig.tight_layout()
    fig.savefig(path)


def add_parser(sub: Any) -> None:
    sp = sub.add_parser("soak", help="mixed load with a chaos schedule; checks that nothing is lost or leaks")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--tenants", type=int, default=64, help="well-behaved tenants (root adds a share group of 4)")
    sp.add_argument("--seconds", type=float, default=60.0)
    sp.add_argument("--warmup", type=float, default=5.0)
    sp.add_argument("--chaos-every", type=float, default=2.0, help="mean seconds between faults")
    sp.add_argument("--inflight", type=int, default=2, help="graphs each closed-loop tenant keeps in flight")
    sp.add_argument("--open-rate", type=float, default=0.0,
                    help="arrivals a second of each open-loop tenant (default 200 on cuda, 20 on cpu)")
    sp.add_argument("--memory-slack-mib", type=float, default=256.0,
                    help="device memory the residents and graph pool need not explain (modules, CUDA graphs)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--broker-log", metavar="PATH", help="keep the broker's log there (for a post-mortem)")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--plot", metavar="PNG", help="latency, throughput, broker RSS and device memory over time")
    sp.add_argument("--from-json", metavar="PATH", help="show (and plot) the result of an earlier --json run")
    sp.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    if args.plot:
        _pyplot()  # fail now, not after the run, when matplotlib is missing
    if args.from_json:
        with open(args.from_json) as f:
            doc = json.load(f)
    else:
        doc = run(args.device, args.tenants, args.seconds, args.chaos_every, args.seed, args.warmup, args.inflight,
                  open_rate=args.open_rate, memory_slack_mib=args.memory_slack_mib, broker_log=args.broker_log)
    print(json.dumps(doc, indent=1) if args.json else show(doc))
    if args.plot:
        _plot(doc, args.plot)
    return 0 if doc["ok"] else 1
