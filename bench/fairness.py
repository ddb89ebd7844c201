"""``kaas-bench fairness``: saturating tenants with given weights; device-time shares vs targets.

    kaas-bench fairness --device cpu|cuda --seconds 20 --weights 1,2[,...] [--json] [--plot PNG]

Identity comes from credentials, so each tenant is a process forked from this one that drops
to its own uid (61000 + i) before connecting: this needs root. The broker gets a config with
one ``[[tenants]]`` rule per uid carrying its weight. Every tenant keeps ``--inflight`` graphs
submitted and records, per finished graph, when it finished and the device time the broker
charged it (``timings.kernels``). A tenant's share is its device time inside the measuring
window (after ``--warmup``) over everyone's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

UID_BASE = 61000


def _tenant(sock: str, uid: int, workload: str, size: int, inflight: int, until: float, priority_gap: float,
            conn: Connection) -> None:
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        import tenantlib
        from tenantlib import kernels
        from tools.workloads import make

        with tenantlib.connect(sock, timeout=120) as c:
            w = make(c, kernels.library(c), workload, size)
            w.refresh(np.random.default_rng(uid))
            out: list[tuple[float, float, float]] = []  # (finished, device time, round trip)
            pending = [c.submit(w.graph) for _ in range(inflight)]
            while time.monotonic() < until:
                r = pending.pop(0).result()
                out.append((time.monotonic(), r.timings.kernels, r.rtt))
                if priority_gap:
                    time.sleep(priority_gap)
                pending.append(c.submit(w.graph))
            for p in pending:
                p.result()
            conn.send({"tenant": c.tenant, "samples": out, "correct": bool(w.check())})
    except BaseException as exc:  # report, never hang the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


PRELOAD = ("tenantlib", "tenantlib.aio", "tenantlib.kernels", "tenantlib.kernels.host", "tools.workloads",
           "secrets", "posix_ipc", "msgspec", "select", "mmap", "encodings.idna")


def _preload() -> None:
    """Import what tenants use before forking: after setuid a child may not read the interpreter's files."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)


def run(device: str, weights: list[float], seconds: float, *, warmup: float = 2.0, workload: str = "sgemm",
        size: int = 128, inflight: int = 4, light: bool = False, policy: str = "fair",
        env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the experiment; with ``light`` the last tenant is a latency-class tenant sending one graph at a time."""
    if os.geteuid() != 0:
        raise SystemExit("kaas-bench fairness: needs root, to run each tenant under its own uid "
                         "(the broker knows tenants by their credentials)")
    from tools.broker_process import BrokerProcess

    _preload()
    rules = "".join(f'[[tenants]]\nname = "t{i}-w{w:g}"\nuid = {UID_BASE + i}\nweight = {w}\n'
                    + ('priority = "latency"\n' if light and i == len(weights) - 1 else "")
                    for i, w in enumerate(weights))
    cfg_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"kaas-fair-{os.getpid()}"
    cfg_dir.mkdir(exist_ok=True)
    cfg = cfg_dir / "broker.toml"
    cfg.write_text(f'socket_mode = 438\npolicy = "{policy}"\n' + rules)
    with BrokerProcess(device, config=str(cfg), env=env) as b:
        os.chmod(os.path.dirname(b.socket), 0o755)
        ctx = mp.get_context("fork")
        t0 = time.monotonic()
        until = t0 + warmup + seconds
        pipes, procs = [], []
        for i, _ in enumerate(weights):
            ours, theirs = ctx.Pipe(duplex=False)
            is_light = light and i == len(weights) - 1
            pr = ctx.Process(target=_tenant, args=(b.socket, UID_BASE + i, workload, size,
                                                   1 if is_light else inflight, until, 0.01 if is_light else 0.0,
                                                   theirs))
            pr.start()
            theirs.close()
            pipes.append(ours)
            procs.append(pr)
        results = [p.recv() for p in pipes]
        for pr in procs:
            pr.join(60)
        import tenantlib

        with tenantlib.connect(b.socket) as c:  # which path the runs took (broker/leases.py)
            stats = c.status()["stats"]
    cfg.unlink()
    cfg_dir.rmdir()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError("a tenant failed: " + "; ".join(errors))
    lo, hi = t0 + warmup, until
    dev = [sum(d for t, d, _ in r["samples"] if lo <= t <= hi) for r in results]
    total = sum(dev) or 1.0
    tenants = []
    for w, r, d in zip(weights, results, dev, strict=True):
        rtts = [x for t, _, x in r["samples"] if lo <= t <= hi]
        tenants.append({"tenant": r["tenant"], "weight": w, "target_share": w / sum(weights), "share": d / total,
                        "device_seconds": d, "graphs": len(rtts), "correct": r["correct"],
                        "p50_ms": float(np.percentile(rtts, 50) * 1e3) if rtts else None,
                        "p99_ms": float(np.percentile(rtts, 99) * 1e3) if rtts else None})
    timeline = [[(t - t0, d) for t, d, _ in r["samples"]] for r in results]
    return {"bench": "fairness", "device": device, "policy": policy, "seconds": seconds, "warmup": warmup,
            "workload": f"{workload}:{size}", "tenants": tenants, "timeline": timeline,
            "leases": stats.get("leases", 0), "direct_runs": stats.get("direct_runs", 0), "graphs": stats.get("graphs", 0)}


def plot(result: dict[str, Any], path: str) -> None:
    from tools.bench import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    end = result["warmup"] + result["seconds"]
    edges = np.arange(0.0, end + 1.0, 1.0)
    per = [np.histogram([t for t, _ in tl], bins=edges, weights=[d for _, d in tl])[0] for tl in result["timeline"]]
    tot = np.maximum(sum(per), 1e-12)
    for t, h in zip(result["tenants"], per, strict=True):
        ax.plot(edges[1:], h / tot, label=f"{t['tenant']} (target {t['target_share']:.2f})")
        ax.axhline(t["target_share"], linestyle=":", linewidth=0.8)
    ax.axvline(result["warmup"], color="grey", linewidth=0.8)
    ax.set_xlabel("seconds")
    ax.set_ylabel("share of device time (1 s bins)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("fairness", help="saturating tenants with weights: device-time shares against targets")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seconds", type=float, default=20.0, help="measuring window")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--weights", default="1,2", help="comma-separated tenant weights")
    p.add_argument("--workload", default="sgemm:128", help="null | vadd[:n] | sgemm[:n] | jacobi[:n]")
    p.add_argument("--inflight", type=int, default=4, help="graphs each tenant keeps submitted")
    p.add_argument("--policy", default="fair", choices=["fair", "fcfs"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="PNG")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise SystemExit(f"kaas-bench fairness: --weights must be numbers like 1,2 (got {args.weights!r})") from None
    if any(w <= 0 for w in weights) or len(weights) < 1:
        raise SystemExit("kaas-bench fairness: weights must be positive")
    if args.plot:
        from tools.bench import _pyplot

        _pyplot()  # fail now, not after the run, when matplotlib is missing
    name, _, size = args.workload.partition(":")
    print(f"{len(weights)} saturating tenants, weights {args.weights}, {args.seconds:g} s on {args.device} "
          f"({args.policy}) ...", file=sys.stderr, flush=True)
    res = run(args.device, weights, args.seconds, warmup=args.warmup, workload=name, size=int(size or 0),
              inflight=args.inflight, policy=args.policy)
    if args.plot:
        plot(res, args.plot)
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "timeline"}, indent=2))
    else:
        print(f"{'tenant':<12} {'weight':>6} {'target':>7} {'share':>7} {'graphs':>7} {'p50 ms':>8} {'p99 ms':>8}")
        for t in res["tenants"]:
            print(f"{t['tenant']:<12} {t['weight']:>6g} {t['target_share']:>7.3f} {t['share']:>7.3f} "
                  f"{t['graphs']:>7} {t['p50_ms'] or 0:>8.2f} {t['p99_ms'] or 0:>8.2f}")
        print(f"direct path: {res['direct_runs']} of {res['graphs']} graphs, {res['leases']} leases granted")
    return 0
