"""``kaas-bench``: the kaas microbenchmarks.

    kaas-bench latency   [--device auto] [--iterations N] [--tenants K] [--json] [--plot PNG]
    kaas-bench bandwidth [--device auto] [--min-size 4K] [--max-size 1G] [--json] [--plot PNG]
    kaas-bench fuzz      [--device cpu] [--cases N] [--seed S] [--json]
    kaas-bench fairness  [--device cpu] [--seconds 20] [--weights 1,2] [--policy fair|fcfs] [--json] [--plot PNG]
    kaas-bench contention [--tenants 1,2,4,...] [--workload null,sgemm:1024,...] [--modes kaas,own-context,mps,exclusive]
    kaas-bench soak      [--device cpu] [--tenants 64] [--seconds 60] [--chaos-every 2] [--json] [--plot PNG]
    kaas-bench cluster   [--nodes 2] [--sets 6] [--size 512] [--fit 3] [--modes affinity,ray,local] [--json]

Each starts its own broker on ``--device`` unless ``--socket`` names a running one.
``latency`` times the null graph (one empty kernel, no buffers) round trip from K tenant
processes at once, and, where CUDA is present, a direct in-process launch+sync of the
same kernel as the floor.  ``bandwidth`` moves an arena to the device and back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from tools.broker_process import BrokerProcess

PCTS = (50, 90, 99, 99.9)


def _size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        return int(float(s[:-1]) * units[s[-1]]) if s and s[-1] in units else int(s)
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (e.g. 4096, 64K, 256M, 1G)") from None


def _fmt_size(n: int) -> str:
    for unit, f in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= f:
            return f"{n / f:g} {unit}"
    return f"{n} B"


@contextlib.contextmanager
def _broker(args: argparse.Namespace) -> Iterator[str]:
    if args.socket:
        yield args.socket
        return
    print(f"starting a broker on --device {args.device} ...", file=sys.stderr, flush=True)
    with BrokerProcess(args.device, config=args.config) as b:
        yield b.socket


def percentiles(samples: list[float] | np.ndarray) -> dict[str, float]:
    a = np.asarray(samples, dtype=np.float64) * 1e6
    out = {f"p{p:g}_us": float(np.percentile(a, p)) for p in PCTS}
    out.update(mean_us=float(a.mean()), min_us=float(a.min()), max_us=float(a.max()), n=int(a.size))
    return out


def text_histogram(samples_us: np.ndarray, width: int = 50) -> str:
    """Log-spaced buckets, one line each: the shape of the tail at a glance."""
    lo, hi = max(1.0, float(samples_us.min())), float(samples_us.max())
    if hi <= lo:
        hi = lo * 1.01
    edges = np.geomspace(lo, hi, num=min(16, max(2, int(math.log2(hi / lo) * 3) + 2)))
    counts, _ = np.histogram(np.clip(samples_us, lo, hi), bins=edges)
    top = max(1, int(counts.max()))
    return "\n".join(f"{a:>9.1f} - {b:<9.1f} us |{'#' * max(1 if c else 0, round(c / top * width)):<{width}}| {c}"
                     for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True))


# -- latency --------------------------------------------------------------------------------
def _latency_tenant(socket: str, iterations: int, warmup: int, trace: bool = False) -> dict[str, Any]:
    import tenantlib
    from tenantlib import kernels

    with tenantlib.connect(socket) as client:
        lib = kernels.library(client)
        g = client.graph()
        g.kernel(lib, "null", grid=1, block=1, args=[])
        for _ in range(warmup):
            client.run(g)
        out = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            client.run(g)
            out.append(time.perf_counter() - t0)
        hops: dict[str, list[float]] = {}
        calls: list[float] = []  # the traced pass: the whole call, and the stamped round trip
        trips: list[float] = []
        if trace:  # a second pass, so stamping costs nothing in the timed one
            for _ in range(iterations):
                t0 = time.perf_counter()
                r = client.run(g, trace=True)
                calls.append(time.perf_counter() - t0)
                trips.append(r.rtt)
                for hop, sec in r.hops.items():
                    hops.setdefault(hop, []).append(sec)
        return {"rtt": out, "hops": hops, "traced_calls": calls, "traced_rtt": trips}


def direct_baseline(iterations: int) -> list[float] | None:
    """In-process cuda.bindings launch+sync of an empty kernel, in a child process (None without CUDA)."""
    code = ("import json,sys\nfrom bench.cuda_selfcheck import direct_null_latency\n"
            "print(json.dumps(direct_null_latency(int(sys.argv[1]))))")
    try:
        out = subprocess.run([sys.executable, "-c", code, str(iterations)], capture_output=True, text=True,
                             timeout=300, check=True)
        return [float(x) for x in json.loads(out.stdout.strip().splitlines()[-1])]
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


def cmd_latency(args: argparse.Namespace) -> int:
    with _broker(args) as sock:
        if args.worker:
            print(json.dumps(_latency_tenant(sock, args.iterations, args.warmup, args.trace)))
            return 0
        print(f"null graph: {args.tenants} tenant(s) x {args.iterations} iterations ...", file=sys.stderr, flush=True)
        procs = [subprocess.Popen([sys.executable, "-m", "tools.bench", "latency", "--socket", sock, "--worker",
                                   "--iterations", str(args.iterations), "--warmup", str(args.warmup),
                                   *(["--trace"] if args.trace else [])],
                                  stdout=subprocess.PIPE, text=True) for _ in range(args.tenants)]
        per: list[dict[str, Any]] = []
        for p in procs:
            out, _ = p.communicate()
            if p.returncode != 0:
                print(f"kaas-bench: a tenant process failed (exit {p.returncode})", file=sys.stderr)
                return 1
            per.append(json.loads(out.strip().splitlines()[-1]))
        with tenantlib_status(sock) as st:
            devices = [d.get("name", d.get("device")) for d in st.get("devices", [])]
    samples = np.concatenate([np.asarray(s["rtt"]) for s in per])
    result: dict[str, Any] = {"bench": "latency", "device": devices, "tenants": args.tenants,
                              "iterations": args.iterations, "kaas": percentiles(samples)}
    if args.trace:
        result["hops_p50_us"] = {h: float(np.median([x for s in per for x in s["hops"].get(h, [])]) * 1e6)
                                 for h in per[0]["hops"]}
        for key in ("traced_calls", "traced_rtt"):
            result[f"{key}_p50_us"] = float(np.median([x for s in per for x in s[key]]) * 1e6)
    direct = direct_baseline(args.iterations) if any(str(d).startswith("cuda") or "H100" in str(d)
                                                     or "NVIDIA" in str(d) for d in devices) else None
    if direct:
        result["direct"] = percentiles(direct)
        result["ratio_p50"] = result["kaas"]["p50_us"] / result["direct"]["p50_us"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        k = result["kaas"]
        print(f"device {', '.join(map(str, devices))}; {args.tenants} tenant(s), {samples.size} round trips")
        print("            " + "".join(f"{'p' + format(p, 'g'):>10}" for p in PCTS))
        print("kaas    us  " + "".join(f"{k[f'p{p:g}_us']:>10.1f}" for p in PCTS))
        if direct:
            d = result["direct"]
            print("direct  us  " + "".join(f"{d[f'p{p:g}_us']:>10.1f}" for p in PCTS))
            print(f"kaas / direct at p50: {result['ratio_p50']:.2f}x")
        if args.trace:
            print("\nper hop, p50 of a traced pass (us):")
            for h, us in result["hops_p50_us"].items():
                print(f"  {h:<32} {us:8.1f}")
            print(f"  {'sum':<32} {sum(result['hops_p50_us'].values()):8.1f}")
            print(f"  the traced pass: stamped round trip p50 {result['traced_rtt_p50_us']:.1f}, the whole "
                  f"client.run() p50 {result['traced_calls_p50_us']:.1f} (the rest is the tenant's own work)")
        print()
        print(text_histogram(samples * 1e6))
    if args.plot:
        _plot_hist(samples * 1e6, np.asarray(direct) * 1e6 if direct else None, args.plot)
    return 0


@contextlib.contextmanager
def tenantlib_status(sock: str) -> Iterator[dict[str, Any]]:
    import tenantlib

    with tenantlib.connect(sock) as c:
        yield c.status()


def _plot_hist(kaas_us: np.ndarray, direct_us: np.ndarray | None, path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    hi = float(np.percentile(kaas_us, 99.9))
    bins = np.linspace(0, hi, 80)
    ax.hist(np.clip(kaas_us, 0, hi), bins=bins, alpha=0.7, label="kaas null graph")
    if direct_us is not None:
        ax.hist(np.clip(direct_us, 0, hi), bins=bins, alpha=0.7, label="direct launch+sync")
    ax.set_xlabel("round trip (us)")
    ax.set_ylabel("count")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("kaas-bench: --plot needs matplotlib (pip install 'kaas[plot]')") from None
    return plt


# -- bandwidth ------------------------------------------------------------------------------
def cmd_bandwidth(args: argparse.Namespace) -> int:
    import tenantlib
    from tenantlib import kernels

    sizes = []
    s = args.min_size
    while s <= args.max_size:
        sizes.append(s)
        s *= args.step
    rows = []
    with _broker(args) as sock, tenantlib.connect(sock, timeout=600) as client:
        lib = kernels.library(client)
        for size in sizes:
            arena = client.arena(size)
            buf = arena.array(size, np.uint8)
            buf[...] = np.arange(size, dtype=np.uint64).astype(np.uint8)  # touch: real pages, real data
            g = client.graph()
            g.inout(buf)
            g.kernel(lib, "null", grid=1, block=1, args=[])
            client.run(g)  # warm-up
            cin: list[float] = []
            cout: list[float] = []
            rtt: list[float] = []
            t_end = time.monotonic() + args.seconds
            while len(cin) < args.min_iterations or (time.monotonic() < t_end and len(cin) < 1000):
                r = client.run(g, timeout=120)
                cin.append(r.timings.copy_in)
                cout.append(r.timings.copy_out)
                rtt.append(r.rtt)
            row = {"size": size, "iterations": len(cin),
                   "to_device_gbps": size / float(np.median(cin)) / 1e9 if np.median(cin) > 0 else float("inf"),
                   "from_device_gbps": size / float(np.median(cout)) / 1e9 if np.median(cout) > 0 else float("inf"),
                   "rtt_p50_us": float(np.median(rtt) * 1e6), "device": r.device}
            rows.append(row)
            arena.close()
            if not args.json:
                print(f"{_fmt_size(size):>10}  to device {row['to_device_gbps']:8.2f} GB/s   from device "
                      f"{row['from_device_gbps']:8.2f} GB/s   round trip p50 {row['rtt_p50_us']:10.1f} us"
                      f"   ({len(cin)} runs)", flush=True)
    if args.json:
        print(json.dumps({"bench": "bandwidth", "rows": rows}, indent=2))
    if args.plot:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [r["size"] for r in rows]
        ax.plot(xs, [r["to_device_gbps"] for r in rows], marker="o", label="arena -> device")
        ax.plot(xs, [r["from_device_gbps"] for r in rows], marker="o", label="device -> arena")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes")
        ax.set_ylabel("GB/s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return 0


def cmd_fuzz(args: argparse.Namespace) -> int:
    from tools import fuzz

    with _broker(args) as sock:
        print(f"fuzzing the broker with {args.cases} cases (seed {args.seed}) ...", file=sys.stderr, flush=True)
        try:
            result = fuzz.run(sock, args.cases, args.seed, args.check_every)
        except AssertionError as exc:
            print(f"kaas-bench fuzz: FAILED: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['cases']} cases in {result['seconds']:.1f} s, every reply typed, broker healthy throughout")
        for code, n in sorted(result["outcomes"].items(), key=lambda kv: -kv[1]):
            print(f"  {code:<28} {n:>8}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kaas-bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--device", default="auto", help="device for the broker this starts (default auto)")
        sp.add_argument("--socket", help="use the running broker at this socket instead of starting one")
        sp.add_argument("--config", help="config file for the broker this starts")
        sp.add_argument("--json", action="store_true", help="print JSON for machines")
        sp.add_argument("--plot", metavar="PNG", help="also write a plot (needs matplotlib)")

    lat = sub.add_parser("latency", help="null-graph round trip percentiles (and the direct-launch floor)")
    common(lat)
    lat.add_argument("--iterations", type=int, default=2000)
    lat.add_argument("--warmup", type=int, default=100)
    lat.add_argument("--tenants", type=int, default=1, help="concurrent tenant processes")
    lat.add_argument("--trace", action="store_true", help="also time each hop (tenant, broker, worker, device)")
    lat.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    lat.set_defaults(func=cmd_latency)

    bw = sub.add_parser("bandwidth", help="arena -> device -> arena copy rates by size")
    common(bw)
    bw.add_argument("--min-size", type=_size, default=4 << 10)
    bw.add_argument("--max-size", type=_size, default=1 << 30)
    bw.add_argument("--step", type=int, default=4, help="size multiplier between rows (default 4)")
    bw.add_argument("--seconds", type=float, default=0.5, help="time per size")
    bw.add_argument("--min-iterations", type=int, default=5)
    bw.set_defaults(func=cmd_bandwidth)

    from bench import fairness

    fairness.add_parser(sub)

    fz = sub.add_parser("fuzz", help="hostile frames and graphs against a broker; every reply must be typed")
    common(fz)
    fz.add_argument("--cases", type=int, default=10_000)
    fz.add_argument("--seed", type=int, default=0)
    fz.add_argument("--check-every", type=int, default=1000, help="run a healthy tenant's graph this often")
    fz.set_defaults(func=cmd_fuzz, device="cpu")

    from bench import cluster, contention, soak

    contention.add_parser(sub)
    soak.add_parser(sub)
    cluster.add_parser(sub)

    args = p.parse_args(argv)
    for name in ("iterations", "tenants"):
        if getattr(args, name, 1) < 1:
            p.error(f"--{name} must be at least 1")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
