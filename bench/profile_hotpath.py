"""Where a request's time goes inside the broker and its worker, by cProfile.

    python -m bench.profile_hotpath [--device cuda] [--tenants 1] [--iterations 5000] [--top 25]

Starts a broker with ``KAAS_PROFILE`` set (``broker/profiling.py``), runs null graphs from
the given number of tenant processes (each profiled too), stops it, and prints each process's
functions by own time, per request.  Profiling inflates every call, so read proportions, not microseconds.
"""

from __future__ import annotations

import argparse
import os
import pstats
import subprocess
import sys
import tempfile

from tools.broker_process import BrokerProcess

_TENANT = """
import cProfile, os, sys, tenantlib
from tenantlib import kernels
with tenantlib.connect(sys.argv[1]) as c:
    g = c.graph()
    g.kernel(kernels.library(c), "null", grid=1, block=1, args=[])
    c.run(g)
    prof = cProfile.Profile()
    prof.runcall(lambda: [c.run(g) for _ in range(int(sys.argv[2]))])
    prof.dump_stats(os.path.join(sys.argv[3], f"tenant-{os.getpid()}.prof"))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="profile_hotpath", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--tenants", type=int, default=1)
    p.add_argument("--iterations", type=int, default=5000, help="null graphs per tenant")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    out = tempfile.mkdtemp(prefix="kaas-profile-")
    env = dict(os.environ, KAAS_PROFILE=out)
    with BrokerProcess(args.device, env=env) as b:
        procs = [subprocess.Popen([sys.executable, "-c", _TENANT, b.socket, str(args.iterations), out])
                 for _ in range(args.tenants)]
        if any(pr.wait() for pr in procs):
            print("profile_hotpath: a tenant failed", file=sys.stderr)
            return 1
    requests = args.tenants * args.iterations
    for name in sorted(os.listdir(out)):
        st = pstats.Stats(os.path.join(out, name))
        print(f"\n== {name}: {requests} requests; own time per request (us), calls per request ==")
        rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[: args.top]  # type: ignore[attr-defined]
        for (file, line, func), (_, calls, tottime, cumtime, _) in rows:
            where = f"{os.path.basename(file)}:{line}({func})"
            print(f"  {tottime / requests * 1e6:8.2f} own {cumtime / requests * 1e6:8.2f} cum "
                  f"{calls / requests:6.2f}x  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
