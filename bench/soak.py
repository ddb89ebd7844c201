"""``kaas-bench soak``: mixed load with faults arriving all the time; nothing lost, nothing leaking.

    kaas-bench soak [--device cpu|cuda] [--tenants 8] [--seconds 60] [--chaos-every 2.0] [--seed 0]
                    [--json] [--plot PNG]

Well-behaved tenants (each its own process, under its own uid when run as root, weights 1-4)
run null, sgemm, jacobi and mlp graphs in closed loops and check every result against numpy.
Meanwhile a chaos schedule (exponential gaps of mean ``--chaos-every`` seconds) starts culprits:
a kernel that crashes its worker (the CPU device's stand-in for an illegal address), a runaway
kernel past its deadline, a tenant SIGKILLed mid-request, the device worker killed from outside,
a tenant flooding past its queue quota, garbage frames, and a tenant registering libraries in a
loop.  Checked and printed at the end:

- every request of a well-behaved tenant got exactly one reply, every checked result is right,
  and well-behaved tenants saw no errors (the culprits do); their p99 inside fault windows (the
  2 s after each fault) next to their p99 outside;
- the broker's RSS, open fds and threads after warm-up against the end (flat within 5%), and
  /dev/shm holds nothing new at the end;
- with distinct uids (root), each tenant's share of device time against its weight's.

Exit status 1 when a check fails.  Resources come from /proc, so the broker runs on this host.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

UID_BASE = 62000
WORKLOADS = (("null", 0), ("sgemm", 64), ("jacobi", 64), ("mlp", 16))
FAULTS = ("crash", "runaway", "kill_tenant", "kill_worker", "flood", "garbage", "library_loop")
FAULT_WINDOW = 2.0  # seconds after a fault in which a well-behaved tenant's latency counts as "during a fault"
_SLOW = 'extern "C" __global__ void slow(int ms) {}\nextern "C" __global__ void hang() {}\nextern "C" __global__ void crash() {}\n'


def _become(uid: int | None) -> None:
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def _steady(sock: str, uid: int | None, workload: str, size: int, inflight: int, until: float, seed: int,
            conn: Connection) -> None:
    """A well-behaved tenant: ``inflight`` graphs of its own in flight (each over its own arrays),
    fresh inputs for every run, every result checked against numpy."""
    try:
        _become(uid)
        import tenantlib
        from tenantlib import kernels
        from tools.workloads import make

        rng = np.random.default_rng(seed)
        sent = replies = wrong = 0
        errs: dict[str, int] = {}
        samples: list[tuple[float, float, float]] = []  # (finished, round trip, device seconds)
        with tenantlib.connect(sock, timeout=120) as c:
            lib = kernels.library(c)
            loads = [make(c, lib, workload, size) for _ in range(inflight)]
            tenant = c.tenant
            pending: list[tuple[Any, Any]] = []
            for w in loads:
                w.refresh(rng)
                pending.append((w, c.submit(w.graph, timeout=60)))
                sent += 1
            while pending:
                w, p = pending.pop(0)
                try:
                    r = p.result()
                    replies += 1
                    wrong += 0 if w.check() else 1
                    samples.append((time.monotonic(), r.rtt, r.timings.kernels))
                except tenantlib.errors.KaasError as exc:
                    replies += 1
                    errs[exc.code] = errs.get(exc.code, 0) + 1
                if time.monotonic() < until:
                    w.refresh(rng)
                    try:
                        pending.append((w, c.submit(w.graph, timeout=60)))
                        sent += 1
                    except tenantlib.errors.KaasError as exc:  # refused up front: a reply of its own
                        sent += 1
                        replies += 1
                        errs[exc.code] = errs.get(exc.code, 0) + 1
        conn.send({"tenant": tenant, "workload": workload, "sent": sent, "replies": replies, "wrong": wrong,
                   "errors": errs, "samples": samples})
    except BaseException as exc:  # report, never hang the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def _culprit(sock: str, uid: int | None, fault: str, seed: int) -> None:
    """One fault, from its own process; its errors are expected and not reported."""
    try:
        _become(uid)
        import tenantlib
        from tenantlib import kernels
        from tenantlib.kernels import testing

        with tenantlib.connect(sock, timeout=60) as c:
            if fault == "garbage":
                raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                raw.connect(sock)
                raw.sendall(random.Random(seed).randbytes(4096))
                raw.close()
                return
            if fault == "library_loop":
                # Each distinct library is compiled by the device worker: before it compiled in a
                # thread (broker/streams/precompile.py), 40 of them stalled every tenant for a minute.
                for i in range(8):
                    c.library(f"// soak {seed} {i}\n" + kernels.SOURCE, kernels=kernels.KERNELS)
                return
            lib = c.library(kernels.SOURCE + _SLOW, kernels=[*kernels.KERNELS, testing.SLOW, testing.HANG, testing.CRASH])
            g = c.graph()
            if fault == "crash":
                g.kernel(lib, "crash", grid=1, block=1, args=[])
                c.run(g, timeout=30)
            elif fault == "runaway":
                g.kernel(lib, "hang", grid=1, block=1, args=[])
                c.run(g, timeout=0.5)
            elif fault == "flood":
                g.kernel(lib, "slow", grid=1, block=1, args=[5])
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
                g.kernel(lib, "slow", grid=1, block=1, args=[200])
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


def _worker_pid(sock: str) -> int | None:
    import tenantlib

    try:
        with tenantlib.connect(sock, timeout=10) as c:
            devs = c.status().get("devices", [])
        return next((int(d["pid"]) for d in devs if d.get("pid")), None)
    except Exception:  # the status of a broker between workers: try the next time
        return None


def run(device: str = "cpu", tenants: int = 8, seconds: float = 60.0, chaos_every: float = 2.0, seed: int = 0,
        warmup: float = 5.0, inflight: int = 2, env: dict[str, str] | None = None) -> dict[str, Any]:
    from tools.broker_process import BrokerProcess

    root = os.geteuid() == 0
    rnd = random.Random(seed)
    weights = [1 + i % 4 for i in range(tenants)]
    rules = "".join(f'[[tenants]]\nname = "soak{i}-w{w}"\nuid = {UID_BASE + i}\nweight = {w}\n'
                    for i, w in enumerate(weights)) if root else ""
    cfg_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"kaas-soak-{os.getpid()}"
    cfg_dir.mkdir(exist_ok=True)
    cfg = cfg_dir / "broker.toml"
    cfg.write_text('socket_mode = 438\nhost_modules = ["tenantlib.kernels.host", "tenantlib.kernels.testing"]\n'
                   "tenant_max_libraries = 16\n" + rules)
    from bench.fairness import _preload

    _preload()
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    events: list[tuple[float, str]] = []
    stats: list[tuple[float, dict[str, int]]] = []
    ctx = mp.get_context("fork")
    with BrokerProcess(device, config=str(cfg), env=env) as b:
        os.chmod(os.path.dirname(b.socket), 0o755)
        assert b.proc is not None
        bpid = b.proc.pid
        t0 = time.monotonic()
        until = t0 + warmup + seconds
        pipes, procs = [], []
        for i in range(tenants):
            ours, theirs = ctx.Pipe(duplex=False)
            wl, size = WORKLOADS[i % len(WORKLOADS)]
            pr = ctx.Process(target=_steady, args=(b.socket, UID_BASE + i if root else None, wl, size, inflight,
                                                   until, seed * 1000 + i, theirs))
            pr.start()
            theirs.close()
            pipes.append(ours)
            procs.append(pr)
        # Without root every process is one tenant: a flood would fill the well-behaved tenants' own queue.
        faults = FAULTS if root else tuple(f for f in FAULTS if f != "flood")
        next_fault = t0 + warmup + rnd.expovariate(1 / chaos_every)
        next_sample = t0
        culprits: list[Any] = []
        n = 0
        while time.monotonic() < until:
            now = time.monotonic()
            if now >= next_sample:
                stats.append((now - t0, _proc_stats(bpid)))
                next_sample = now + 1.0
            if now >= next_fault and now < until - FAULT_WINDOW:
                fault = faults[n % len(faults)] if n < len(faults) else rnd.choice(faults)
                n += 1
                events.append((now, fault))
                print(f"soak: {now - t0:6.1f} s  {fault}", file=sys.stderr, flush=True)
                if fault == "kill_worker":
                    pid = _worker_pid(b.socket)
                    try:
                        if pid:
                            os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:  # it was being replaced after an earlier fault
                        pass
                else:
                    uid = UID_BASE + tenants + n if root else None
                    pr = ctx.Process(target=_culprit, args=(b.socket, uid, fault, seed * 1000 + n))
                    pr.start()
                    culprits.append(pr)
                next_fault = now + rnd.expovariate(1 / chaos_every)
            time.sleep(0.05)
        results = [p.recv() for p in pipes]
        for pr in procs + culprits:
            pr.join(60)
        time.sleep(1.0)  # the broker lets go of what closed sessions held
        stats.append((time.monotonic() - t0, _proc_stats(bpid)))
    cfg.unlink()
    cfg_dir.rmdir()
    shm_left = sorted((set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()) - shm_before)
    return _report(results, events, stats, weights if root else None, t0, warmup, shm_left, seconds, device, seed)


def _report(results: list[dict[str, Any]], events: list[tuple[float, str]], stats: list[tuple[float, dict[str, int]]],
            weights: list[int] | None, t0: float, warmup: float, shm_left: list[str], seconds: float, device: str,
            seed: int) -> dict[str, Any]:
    """The table's rows and every check (``events`` at monotonic times, ``stats`` at seconds since ``t0``)."""
    problems: list[str] = [f"a tenant process failed: {r['error']}" for r in results if "error" in r]
    ok = [(i, r) for i, r in enumerate(results) if "error" not in r]
    dev_total = sum(sum(d for t, _, d in r["samples"] if t >= t0 + warmup) for _, r in ok) or 1.0
    rows = []

    def in_fault(t: float) -> bool:
        return any(0 <= t - at <= FAULT_WINDOW for at, _ in events)

    for i, r in ok:
        measured = [(t, rtt, d) for t, rtt, d in r["samples"] if t >= t0 + warmup]  # after warm-up (first compiles)
        inside = [rtt for t, rtt, _ in measured if in_fault(t)]
        outside = [rtt for t, rtt, _ in measured if not in_fault(t)]
        share = sum(d for _, _, d in measured) / dev_total
        row = {"tenant": r["tenant"], "workload": r["workload"], "sent": r["sent"], "replies": r["replies"],
               "wrong": r["wrong"], "errors": r["errors"], "share": share,
               "p99_ms_faults": float(np.percentile(inside, 99) * 1e3) if inside else None,
               "p99_ms_calm": float(np.percentile(outside, 99) * 1e3) if outside else None}
        if weights is not None:
            row["target_share"] = weights[i] / sum(weights)  # reported: mixed workloads do not all saturate
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
    after = [s for t, s in stats if t >= warmup + min(10.0, seconds / 3)] or [s for _, s in stats]
    first, last = after[0], stats[-1][1]
    resources = {k: {"after_warmup": first.get(k), "end": last.get(k)} for k in ("rss_kib", "fds", "threads")}
    for k in ("rss_kib", "fds", "threads"):
        a, e = first.get(k, 0), last.get(k, 0)
        if a and e > a * 1.05 + (2 if k != "rss_kib" else 0):
            problems.append(f"broker {k} grew from {a} to {e}")
    if shm_left:
        problems.append(f"/dev/shm holds {len(shm_left)} new entries: {shm_left[:5]}")
    return {"bench": "soak", "device": device, "seconds": seconds, "seed": seed, "tenants": rows,
            "faults": [{"at": round(t - t0, 2), "fault": f} for t, f in events], "resources": resources,
            "timeline": [{"t": round(t, 2), **s} for t, s in stats], "problems": problems, "ok": not problems}


def show(doc: dict[str, Any]) -> str:
    lines = [f"soak: {doc['seconds']:g} s on {doc['device']}, {len(doc['faults'])} faults "
             f"({', '.join(sorted({f['fault'] for f in doc['faults']}))})", ""]
    head = f"{'tenant':16} {'workload':8} {'sent':>7} {'replies':>7} {'wrong':>5} {'errors':>6} {'share':>6} " \
           f"{'target':>6} {'p99 faults':>10} {'p99 calm':>9}"
    lines.append(head)
    for r in doc["tenants"]:
        def ms(x: float | None) -> str:
            return f"{x:.1f}" if x is not None else "-"
        tgt = f"{r['target_share']:.3f}" if "target_share" in r else "-"
        lines.append(f"{r['tenant']:16} {r['workload']:8} {r['sent']:>7} {r['replies']:>7} {r['wrong']:>5} "
                     f"{sum(r['errors'].values()):>6} {r['share']:>6.3f} {tgt:>6} {ms(r['p99_ms_faults']):>10} "
                     f"{ms(r['p99_ms_calm']):>9}")
    lines.append("")
    for k, v in doc["resources"].items():
        lines.append(f"broker {k}: {v['after_warmup']} after warm-up, {v['end']} at the end")
    lines.append("OK: nothing lost, wrong or leaked" if doc["ok"] else "PROBLEMS:\n  " + "\n  ".join(doc["problems"]))
    return "\n".join(lines)


def _plot(doc: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    tl = doc["timeline"]
    ax[0].plot([s["t"] for s in tl], [s.get("rss_kib", 0) / 1024 for s in tl])
    ax[0].set_ylabel("broker RSS (MiB)")
    ax[1].plot([s["t"] for s in tl], [s.get("fds", 0) for s in tl])
    ax[1].set_ylabel("broker open fds")
    ax[1].set_xlabel("seconds")
    for f in doc["faults"]:
        for a in ax:
            a.axvline(f["at"], color="red", alpha=0.2)
    fig.savefig(path)


def add_parser(sub: Any) -> None:
    sp = sub.add_parser("soak", help="mixed load with a chaos schedule; checks that nothing is lost or leaks")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--tenants", type=int, default=8)
    sp.add_argument("--seconds", type=float, default=60.0)
    sp.add_argument("--warmup", type=float, default=5.0)
    sp.add_argument("--chaos-every", type=float, default=2.0, help="mean seconds between faults")
    sp.add_argument("--inflight", type=int, default=2, help="graphs each well-behaved tenant keeps in flight")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--plot", metavar="PNG")
    sp.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    doc = run(args.device, args.tenants, args.seconds, args.chaos_every, args.seed, args.warmup, args.inflight)
    print(json.dumps(doc, indent=1) if args.json else show(doc))
    if args.plot:
        _plot(doc, args.plot)
    return 0 if doc["ok"] else 1
