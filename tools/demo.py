"""``make run``: a broker on the best device present and concurrent demo tenants.

    python -m tools.demo [--device auto] [--graphs 40]

Starts a broker (CUDA if present, else the CPU device), runs tenant processes at once
(sgemm and jacobi graphs), checks every result against numpy, prints a table and stops
the broker with SIGTERM.  Exits non-zero if any result is wrong.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

DEMO_TENANTS = (("sgemm", 256), ("jacobi", 256), ("sgemm", 128))


def tenant_main(socket: str, workload: str, size: int, graphs: int, seed: int) -> int:
    import tenantlib
    from tenantlib import kernels
    from tools.workloads import make

    rng = np.random.default_rng(seed)
    with tenantlib.connect(socket) as client:
        lib = kernels.library(client)
        w = make(client, lib, workload, size)
        lat, correct, device = [], 0, ""
        for _ in range(graphs):
            w.refresh(rng)
            r = client.run(w.graph, timeout=60)
            lat.append(r.rtt)
            correct += w.check()
            device = r.device
    print(json.dumps({"tenant": client.tenant, "workload": f"{workload} {size}", "graphs": graphs,
                      "correct": correct, "p50_ms": float(np.median(lat) * 1e3), "device": device}), flush=True)
    return 0 if correct == graphs else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kaas-demo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--graphs", type=int, default=40, help="graphs per tenant")
    p.add_argument("--tenant", nargs=3, metavar=("SOCKET", "WORKLOAD", "SIZE"), help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tenant:
        sock, workload, size = args.tenant
        return tenant_main(sock, workload, int(size), args.graphs, args.seed)

    from tools.broker_process import BrokerProcess

    print(f"kaas demo: starting a broker (--device {args.device}) ...", flush=True)
    broker = BrokerProcess(args.device).start()
    code = 1
    try:
        t0 = time.monotonic()
        procs = [subprocess.Popen([sys.executable, "-m", "tools.demo", "--graphs", str(args.graphs), "--seed",
                                   str(i + 1), "--tenant", broker.socket, w, str(s)], stdout=subprocess.PIPE, text=True)
                 for i, (w, s) in enumerate(DEMO_TENANTS)]
        print(f"kaas demo: {len(procs)} tenant processes running {args.graphs} graphs each, concurrently ...",
              flush=True)
        rows, ok = [], True
        for pr in procs:
            out, _ = pr.communicate(timeout=600)
            ok &= pr.returncode == 0
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            if lines:
                rows.append(json.loads(lines[-1]))
            else:
                ok = False
                rows.append({"tenant": f"pid {pr.pid}", "workload": "?", "graphs": 0, "correct": 0,
                             "p50_ms": float("nan"), "device": f"exit {pr.returncode}"})
        wall = time.monotonic() - t0
        print()
        print(f"{'tenant':<14} {'workload':<12} {'device':<8} {'graphs':>6} {'correct':>7} {'p50 ms':>8}")
        for r in rows:
            print(f"{r['tenant']:<14} {r['workload']:<12} {r['device']:<8} {r['graphs']:>6} {r['correct']:>7} "
                  f"{r['p50_ms']:>8.2f}")
        total = sum(r["graphs"] for r in rows)
        print(f"\n{total} graphs in {wall:.1f} s; all results {'correct' if ok else 'NOT correct'}")
        code = 0 if ok else 1
    finally:
        rc = broker.stop()
        print(f"kaas demo: broker stopped (exit code {rc})")
        if rc != 0:
            code = code or 1
    return code


if __name__ == "__main__":
    sys.exit(main())
