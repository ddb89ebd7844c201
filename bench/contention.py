"""``kaas-bench contention``: N tenants doing the same work through kaas and through the baselines.

    kaas-bench contention [--tenants 1,2,4,8,16,32,64] [--workload null,sgemm:1024,...]
                          [--modes kaas,own-context,mps,exclusive] [--seconds S] [--warmup W]
                          [--json] [--plot PREFIX] [--trace] [--max-tenants KEY=N,...]

Modes (each runs N closed-loop tenants: a tenant submits its next request when the last returns):
  kaas         N tenant processes submit graphs to a broker (started here on --device unless
               --socket names one) through tenantlib.
  own-context  N processes, each with its own CUDA context, copy in / launch the same kernels /
               copy out through cuda.bindings: what a user gets by default (time-sliced contexts).
  mps          the same processes under an NVIDIA MPS daemon started here with private pipe and log
               directories and stopped afterwards (skipped where nvidia-cuda-mps-control is absent).
  exclusive    static allocation: one worker per GPU, owned by one tenant at a time, FCFS; a request
               of another tenant replaces the worker (fresh process and context: a cold start).
               Its window opens once every tenant has been served and closes once every tenant
               has been served again after --seconds (whole rounds, so latencies are the steady
               state's), at most --exclusive-max-seconds per point.
Only kaas runs on the CPU device; the others need CUDA and are skipped with the reason otherwise.
MPS serves at most 48 clients per GPU: mps points above 48 tenants are skipped.

Workloads (NAME[:SIZE[:STEPS]]): null (one empty kernel), sgemm:N (N x N, e.g. sgemm:1024,
sgemm:4096), jacobi:N:K (K Jacobi steps of an N x N grid in one graph, e.g. jacobi:1024:16),
mlp:B:L (batch B through L layers of 1024-wide sgemm + bias_relu; weights resident, uploaded
once; default mlp:32:4), vadd:N.  Every mode checks a sample of requests against numpy (each
tenant's first, its first in the measured window, then every --check-every-th); outputs larger
than 64 rows are checked on a random band of 16 rows after fresh inputs for those rows.

Per mode, workload and tenant count: throughput (graphs/s finished in the window of --seconds,
after --warmup) and p50/p99 latency.  Memory: every tenant holds its own buffers (sgemm:4096 is
192 MiB per tenant in host memory, and in device memory for own-context/mps, plus ~0.5 GiB per
own context), so points whose estimate exceeds --max-memory GiB of host memory or 90% of the GPU
are skipped with the reason; --max-tenants trims points on purpose (e.g. sgemm:4096=16).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from bench import baselines
from tools import workloads

__all__ = ["MODES", "add_parser", "assess", "memory_need", "parse_limits", "parse_modes", "parse_tenants",
           "render_table", "run", "summarize", "trim_reason"]

MODES = ("kaas", "own-context", "mps", "exclusive")
DIRECT_MODES = ("own-context", "mps", "exclusive")
ROOT = Path(__file__).resolve().parent.parent
MARK = "@@kaas-bench "  # prefix of the protocol lines on a child's stdout
KAAS_LANES = 8  # the broker's lanes_cuda default: graphs in flight on a GPU, each with its own memory
TRACE_EVERY = 16


# -- pure helpers ---------------------------------------------------------------------------
def parse_tenants(text: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4]: positive, unique, in the given order."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            n = int(part)
        except ValueError:
            raise ValueError(f"--tenants: {part!r} is not a whole number") from None
        if n < 1:
            raise ValueError(f"--tenants: {n} must be at least 1")
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError("--tenants: give at least one count, e.g. 1,2,4")
    return out


def parse_modes(text: str) -> list[str]:
    """``"kaas,mps"`` or ``"all"`` -> the modes, in MODES order."""
    names = {m.strip() for m in text.split(",") if m.strip()}
    if "all" in names:
        return list(MODES)
    bad = sorted(names - set(MODES))
    if bad:
        raise ValueError(f"--modes: unknown {', '.join(bad)} (one or more of {', '.join(MODES)}, or all)")
    if not names:
        raise ValueError("--modes: name at least one mode")
    return [m for m in MODES if m in names]


def parse_limits(text: str) -> dict[str, int]:
    """``"exclusive=8,sgemm:4096=16,mps@mlp:32:4=8"`` -> {key: most tenants}.

    A key is a mode, a workload as written, or ``mode@workload``.
    """
    out: dict[str, int] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.rpartition("=")
        try:
            n = int(value)
        except ValueError:
            n = 0
        if not sep or not key or n < 1:
            raise ValueError(f"--max-tenants: {part!r} is not KEY=N (KEY a mode, a workload or mode@workload)")
        out[key] = n
    return out


def trim_reason(limits: dict[str, int], mode: str, workload: str, tenants: int) -> str | None:
    """Why a point is left out by ``--max-tenants``, or None."""
    for key in (f"{mode}@{workload}", workload, mode):
        if key in limits and tenants > limits[key]:
            return f"trimmed: --max-tenants {key}={limits[key]}"
    return None


def memory_need(plan: workloads.Plan, mode: str, tenants: int, gpus: int = 1) -> tuple[int, int]:
    """(host bytes, device bytes) a point needs, roughly: what the memory guard compares."""
    host_per = plan.nbytes("in", "out", "resident")
    if mode == "kaas":
        # Arenas in shared memory per tenant; on the device residents per tenant and one graph's
        # buffers per stream lane.
        return tenants * host_per, tenants * plan.nbytes("resident") + KAAS_LANES * plan.nbytes("in", "out", "temp")
    ctx = baselines.CONTEXT_BYTES
    if mode == "exclusive":
        live = min(tenants, max(1, gpus))
        return live * host_per, plan.nbytes() + ctx
    return tenants * host_per, tenants * (plan.nbytes() + ctx)


def summarize(latencies_us: Sequence[float], per_tenant: Sequence[int], seconds: float) -> dict[str, Any]:
    """Throughput and latency of one point from the requests finished inside its window."""
    a = np.asarray(latencies_us, dtype=np.float64)
    done = int(sum(per_tenant))
    out: dict[str, Any] = {"completed": done, "throughput_gps": done / seconds if seconds > 0 else 0.0}
    if a.size:
        out.update(p50_us=float(np.percentile(a, 50)), p99_us=float(np.percentile(a, 99)),
                   mean_us=float(a.mean()), max_us=float(a.max()))
    else:
        out.update(p50_us=None, p99_us=None, mean_us=None, max_us=None)
    if per_tenant and seconds > 0:
        out.update(tenant_gps_min=min(per_tenant) / seconds, tenant_gps_max=max(per_tenant) / seconds,
                   starved_tenants=sum(1 for c in per_tenant if c == 0))
    return out


def _fmt(x: float | None, width: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return f"{'-':>{width}}"
    if x >= 1e5:
        return f"{x:>{width}.3g}"
    return f"{x:>{width}.1f}" if x < 1000 else f"{x:>{width}.0f}"


def render_table(doc: dict[str, Any]) -> str:
    """Per workload: one row per tenant count, graphs/s, p50 and p99 (us) per mode."""
    lines: list[str] = []
    results = doc.get("results", [])
    skipped_modes = doc.get("skipped_modes", {})
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    for wl in dict.fromkeys(r["workload"] for r in results):
        rows = [r for r in results if r["workload"] == wl]
        lines.append(f"{wl} on {doc.get('device', '?')}, {doc.get('seconds', '?')} s per point "
                     f"(graphs/s, p50 and p99 latency in us)")
        lines.append(f"{'tenants':>7} " + "".join(f"| {m:<28}" for m in modes))
        lines.append(f"{'':>7} " + "".join(f"| {'graphs/s':>9}{'p50':>9}{'p99':>10}" for _ in modes))
        notes: dict[str, str] = {}
        for n in sorted({r["tenants"] for r in rows}):
            cells = []
            for m in modes:
                r = next((r for r in rows if r["mode"] == m and r["tenants"] == n), None)
                if r is None:
                    cells.append(f"| {'':<28}")
                elif "skipped" in r or "error" in r:
                    why = r.get("skipped") or f"error: {r['error']}"
                    tag = "trimmed" if why.startswith("trimmed") else "error" if "error" in r else "skipped"
                    if m not in skipped_modes:
                        notes.setdefault(f"{m} x{n}", why)
                    cells.append(f"| {tag:>9}{'':<19}")
                else:
                    flag = "!" if r.get("check_failures") else " "
                    cells.append(f"| {_fmt(r['throughput_gps'], 9)}{_fmt(r['p50_us'], 9)}{_fmt(r['p99_us'], 9)}{flag}")
            lines.append(f"{n:>7} " + "".join(cells))
        for m, why in notes.items():
            lines.append(f"  {m}: {why}")
        lines.append("")
    for m, why in skipped_modes.items():
        lines.append(f"{m}: skipped: {why}")
    return "\n".join(lines).rstrip() + "\n"


def _measured(results: list[dict[str, Any]], mode: str, workload: str) -> dict[int, dict[str, Any]]:
    return {r["tenants"]: r for r in results
            if r["mode"] == mode and r["workload"] == workload and r.get("p99_us") is not None}


def assess(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets per workload, judged from the measured points (absent data: not judged).

    kaas >= own-context throughput at every N >= 2; kaas within 10% of MPS throughput at every
    N >= 2; kaas p99 below own-context's at every N >= 4; kaas throughput flat (every point
    within 10% of the best); exclusive collapse (throughput with more tenants than GPUs at most
    half that with one tenant per GPU).
    """
    out: list[dict[str, Any]] = []
    results = doc.get("results", [])
    gpus = int(doc.get("gpus") or 1)
    for wl in dict.fromkeys(r["workload"] for r in results):
        kaas = _measured(results, "kaas", wl)
        own = _measured(results, "own-context", wl)
        mps = _measured(results, "mps", wl)
        exc = _measured(results, "exclusive", wl)

        def judge(target: str, pairs: list[tuple[int, bool, str]], wl: str = wl) -> None:
            if pairs:
                missed = [f"N={n}: {why}" for n, ok, why in pairs if not ok]
                out.append({"workload": wl, "target": target, "met": not missed, "missed": missed,
                            "points": len(pairs)})

        gps = "throughput_gps"
        judge("kaas throughput >= own-context (N >= 2)",
              [(n, kaas[n][gps] >= own[n][gps], f"{kaas[n][gps]:.0f} vs {own[n][gps]:.0f} graphs/s")
               for n in sorted(kaas) if n >= 2 and n in own])
        judge("kaas throughput within 10% of MPS (N >= 2)",
              [(n, kaas[n][gps] >= 0.9 * mps[n][gps], f"{kaas[n][gps]:.0f} vs {mps[n][gps]:.0f} graphs/s")
               for n in sorted(kaas) if n >= 2 and n in mps])
        judge("kaas p99 below own-context (N >= 4)",
              [(n, kaas[n]["p99_us"] < own[n]["p99_us"], f"{kaas[n]['p99_us']:.0f} vs {own[n]['p99_us']:.0f} us")
               for n in sorted(kaas) if n >= 4 and n in own])
        if len(kaas) >= 2:
            best = max(r[gps] for r in kaas.values())
            judge("kaas throughput flat (within 10% of its best) over N",
                  [(n, r[gps] >= 0.9 * best, f"{r[gps]:.0f} vs best {best:.0f} graphs/s") for n, r in sorted(kaas.items())])
        base = [exc[n][gps] for n in exc if n <= gpus]
        if base:
            judge("exclusive collapses once tenants outnumber GPUs",
                  [(n, exc[n][gps] <= 0.5 * max(base), f"{exc[n][gps]:.1f} vs {max(base):.1f} graphs/s with <= {gpus}")
                   for n in sorted(exc) if n > gpus])
    return out


def plot(doc: dict[str, Any], prefix: str) -> list[str]:
    """One PNG per workload: throughput vs tenants and p99 vs tenants, one line per mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("kaas-bench: --plot needs matplotlib (pip install 'kaas[plot]')") from None
    paths = []
    results = doc.get("results", [])
    for wl in dict.fromkeys(r["workload"] for r in results):
        fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(11, 4.2))
        for mode in MODES:
            pts = sorted(_measured(results, mode, wl).items())
            if not pts:
                continue
            xs = [n for n, _ in pts]
            ax_t.plot(xs, [r["throughput_gps"] for _, r in pts], marker="o", label=mode)
            ax_p.plot(xs, [r["p99_us"] / 1e3 for _, r in pts], marker="o", label=mode)
        for ax, ylabel in ((ax_t, "throughput (graphs/s)"), (ax_p, "p99 latency (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tenants")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"{wl} on {doc.get('device', '?')} ({doc.get('seconds')} s per point)")
        fig.tight_layout()
        path = f"{prefix}-{wl.replace(':', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# -- child processes ------------------------------------------------------------------------
class ChildFailed(RuntimeError):
    """A benchmark child process died or said something unexpected; the message has its log's tail."""


class _Child:
    """A child process of this module speaking JSON lines: MARK-prefixed on stdout, commands on stdin."""

    def __init__(self, cfg: dict[str, Any], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._err: IO[bytes] = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.contention", "--child", json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     env=env, cwd=ROOT)
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self._q.put(json.loads(line[len(MARK):]))
        self._q.put(None)

    def tail(self, n: int = 6) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise ChildFailed(f"child {self.proc.pid} is gone ({exc}): {self.tail()}") from None

    def recv(self, timeout: float) -> dict[str, Any]:
        try:
            msg = self._q.get(timeout=max(0.01, timeout))
        except queue.Empty:
            raise ChildFailed(f"child {self.proc.pid} said nothing for {timeout:.0f} s: {self.tail()}") from None
        if msg is None:
            self.proc.wait()
            raise ChildFailed(f"child {self.proc.pid} exited {self.proc.returncode}: {self.tail()}")
        if "error" in msg:
            raise ChildFailed(f"child {self.proc.pid}: {msg['error']}")
        return msg

    def close(self, timeout: float = 30.0) -> None:
        """Close its stdin (it ends) and wait; kill it after ``timeout``."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._err.close()


def _emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(msg) + "\n")
    sys.stdout.flush()


def _closed_loop(run: Callable[[bool], dict[str, float] | None], plan: workloads.Plan, values: dict[str, np.ndarray],
                 rng: np.random.Generator, go: dict[str, float], check_every: int, trace_every: int) -> dict[str, Any]:
    """Requests back to back from ``go`` to ``end``; those finished in [measure, end] are kept."""
    measure, end = go["measure"], go["end"]
    time.sleep(max(0.0, go["go"] - time.monotonic()))
    lat: list[float] = []
    hops: dict[str, list[float]] = {}
    checks = failures = i = in_window = 0
    window_checked = False
    clock = time.perf_counter
    while True:
        now = time.monotonic()
        if now >= end:
            break
        check = i == 0 or (now >= measure and not window_checked) or bool(check_every and i % check_every == 0)
        window_checked |= now >= measure
        rows = None
        if check:
            rows = workloads.check_rows(plan, rng)
            workloads.prepare_check(plan, values, rng, rows)
        traced = bool(trace_every) and now >= measure and in_window % trace_every == 0  # the window's 1st, 17th...
        in_window += now >= measure
        t0 = clock()
        hop = run(traced)
        dt = clock() - t0
        done = time.monotonic()
        if check:
            checks += 1
            failures += not workloads.verify(plan, values, rows)
        if measure <= done <= end:
            lat.append(round(dt * 1e6, 2))
            for h, s in (hop or {}).items():
                hops.setdefault(h, []).append(s)
        i += 1
    return {"lat_us": lat, "requests": i, "checks": checks, "check_failures": failures, "hops": hops}


def _child_main(cfg: dict[str, Any]) -> int:
    """A tenant (kaas, own-context, mps) or an exclusive worker; see ``_Child`` for the protocol."""
    try:
        t0 = time.monotonic()
        plan = workloads.parse(cfg["workload"])
        rng = np.random.default_rng(cfg["seed"])
        closer: Callable[[], None]
        if cfg["role"] == "kaas":
            import tenantlib
            from tenantlib import kernels

            client = tenantlib.connect(cfg["socket"], timeout=cfg.get("timeout", 600.0))
            graph, values, _ = workloads.build(client, kernels.library(client), plan, rng)
            client.run(graph)  # first run: compile/shape caches, not part of any request

            def run(traced: bool) -> dict[str, float] | None:
                r = client.run(graph, trace=traced)
                return r.hops if traced else None

            closer = client.close
        else:
            from bench.baselines import DirectRunner

            runner = DirectRunner(plan, Path(cfg["cubin"]).read_bytes(), device=cfg.get("device", 0),
                                  seed=cfg["seed"])
            values = runner.values

            def run(traced: bool) -> dict[str, float] | None:
                runner.run()
                return None

            closer = runner.close
        _emit({"ready": True, "init_s": time.monotonic() - t0})
        if cfg["role"] == "exclusive":
            for line in sys.stdin:
                cmd = json.loads(line)
                if cmd.get("quit"):
                    break
                c0 = time.perf_counter()
                rows = None
                if cmd.get("check"):
                    rows = workloads.check_rows(plan, rng)
                    workloads.prepare_check(plan, values, rng, rows)
                c1 = time.perf_counter()
                run(False)
                c2 = time.perf_counter()
                ok = workloads.verify(plan, values, rows) if cmd.get("check") else None
                _emit({"run_s": c2 - c1, "check": ok, "check_s": (c1 - c0) + (time.perf_counter() - c2)})
        else:
            go = json.loads(sys.stdin.readline())
            _emit(_closed_loop(run, plan, values, rng, go, cfg.get("check_every", 0), cfg.get("trace_every", 0)))
        closer()
        return 0
    except Exception as exc:
        _emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1


class _ExclusiveWorker:
    """An exclusive-mode worker child, as ``baselines.Worker``."""

    def __init__(self, child: _Child, timeout: float) -> None:
        self.child = child
        self.timeout = timeout

    def request(self, check: bool) -> dict[str, Any]:
        self.child.send({"check": check})
        return self.child.recv(self.timeout)

    def close(self) -> None:
        with contextlib.suppress(ChildFailed):
            self.child.send({"quit": True})
        self.child.close()


# -- the benchmark --------------------------------------------------------------------------
@dataclass
class _Session:
    args: argparse.Namespace
    logs: Path
    cuda: dict[str, Any] = field(default_factory=dict)
    cubin: str = ""
    socket: str = ""
    env: dict[str, str] = field(default_factory=dict)
    mps: baselines.MpsDaemon | None = None
    children: int = 0

    def child_env(self, mode: str, tenants: int) -> dict[str, str]:
        env = dict(self.env or os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"  # N tenants checking at once must not each start a BLAS thread per core
        env["PYTHONUNBUFFERED"] = "1"
        if mode == "kaas":
            spin = self.client_spin(tenants)
            if spin is not None:
                env["KAAS_SPIN_US"] = str(spin)
        return env

    def client_spin(self, tenants: int) -> int | None:
        """Tenants' busy-poll: as given, else the broker's suggestion while tenants <= cores / 4, else 0."""
        if self.args.client_spin_us >= 0:
            return int(self.args.client_spin_us)
        return None if tenants <= max(1, (os.cpu_count() or 1) // 4) else 0

    def child(self, cfg: dict[str, Any], mode: str, tenants: int) -> _Child:
        self.children += 1
        return _Child(cfg, self.child_env(mode, tenants), self.logs / f"child-{self.children}.log")


def _progress(msg: str) -> None:
    print(f"[contention {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _schedule(args: argparse.Namespace) -> dict[str, float]:
    go = time.monotonic() + 0.2
    return {"go": go, "measure": go + args.warmup, "end": go + args.warmup + args.seconds}


def _process_point(s: _Session, mode: str, plan: workloads.Plan, n: int) -> dict[str, Any]:
    """kaas, own-context or mps: N tenant processes, closed loops in one window."""
    args = s.args
    base: dict[str, Any] = {"workload": plan.spec, "seed": 0, "check_every": args.check_every}
    if mode == "kaas":
        base.update(role="kaas", socket=s.socket, trace_every=TRACE_EVERY if args.trace else 0)
    else:
        base.update(role="direct", cubin=s.cubin, device=s.cuda.get("index", 0))
    kids: list[_Child] = []
    try:
        for i in range(n):
            kids.append(s.child({**base, "seed": 1000 * n + i + 1}, mode, n))
        deadline = time.monotonic() + 120 + 2 * n
        inits = [k.recv(deadline - time.monotonic())["init_s"] for k in kids]
        go = _schedule(args)
        for k in kids:
            k.send(go)
        wait = go["end"] - time.monotonic() + 120
        outs = [k.recv(wait) for k in kids]
    finally:
        for k in kids:
            k.close()
    lat = [x for o in outs for x in o["lat_us"]]
    result = {"mode": mode, "workload": plan.spec, "tenants": n,
              **summarize(lat, [len(o["lat_us"]) for o in outs], args.seconds),
              "checks": sum(o["checks"] for o in outs), "check_failures": sum(o["check_failures"] for o in outs),
              "init_s_max": max(inits)}
    if mode == "kaas":
        result["client_spin_us"] = s.client_spin(n)
        hops: dict[str, list[float]] = {}
        for o in outs:
            for h, xs in o["hops"].items():
                hops.setdefault(h, []).extend(xs)
        if hops:
            result["hops_p50_us"] = {h: float(np.median(xs) * 1e6) for h, xs in hops.items()}
    return result


def _exclusive_point(s: _Session, plan: workloads.Plan, n: int) -> dict[str, Any]:
    args = s.args
    gpus = int(args.gpus or s.cuda.get("count", 1))
    cfg: dict[str, Any] = {"role": "exclusive", "workload": plan.spec, "cubin": s.cubin}

    def spawn(tenant: int, gpu: int) -> _ExclusiveWorker:
        kid = s.child({**cfg, "seed": 1000 * n + tenant + 1, "device": gpu}, "exclusive", n)
        try:
            kid.recv(180)
        except BaseException:
            kid.close(5)
            raise
        return _ExclusiveWorker(kid, 600)

    pool = baselines.ExclusivePool(n, gpus, spawn, check_every=args.check_every)
    try:
        pool.prestart()
        st = pool.run(time.monotonic() + 0.2, args.warmup, args.seconds, args.exclusive_max_seconds)
    finally:
        pool.close()
    if st.errors:
        raise ChildFailed("; ".join(st.errors[:3]))
    cold = np.asarray(st.cold_starts) if st.cold_starts else None
    assert st.start is not None and st.end is not None
    window = st.end - st.start
    return {"mode": "exclusive", "workload": plan.spec, "tenants": n, "gpus": gpus,
            **summarize([x * 1e6 for x in st.latencies], [st.per_tenant[t] for t in range(n)], window),
            "window_s": window, "steady": st.steady,
            "checks": st.checks, "check_failures": st.check_failures, "cold_starts": len(st.cold_starts),
            "cold_start_p50_s": float(np.median(cold)) if cold is not None else None}


@contextlib.contextmanager
def _mode(s: _Session, mode: str) -> Iterator[None]:
    """What a mode needs around its points: the broker for kaas, the MPS daemon for mps."""
    if mode == "kaas":
        if s.args.socket:
            s.socket = s.args.socket
            yield
            return
        from tools.broker_process import BrokerProcess

        _progress(f"starting a broker on --device {s.args.device} ...")
        with BrokerProcess(s.args.device, config=s.args.config) as b:
            s.socket = b.socket
            yield
            problems = b.problems()
        if problems:
            _progress(f"the broker logged {len(problems)} problem(s); first: {problems[0][:500]}")
        return
    if mode == "mps":
        try:
            d = baselines.MpsDaemon().start()
        except baselines.MpsUnavailable as exc:
            raise _Skip(str(exc)) from None
        try:
            s.env = d.env
            s.mps = d
            yield
        finally:
            s.env = {}
            s.mps = None
            d.stop()
        return
    yield


def _kaas_device(socket: str) -> str:
    import tenantlib

    with tenantlib.connect(socket) as c:
        devs = c.status().get("devices", [])
    return ", ".join(str(d.get("name", d.get("device", "?"))) for d in devs) or "?"


def _mps_probe(s: _Session) -> tuple[str | None, str]:
    """Under the daemon, does a client get a context, and is an MPS server serving it?

    (None or why not, the daemon's server list while the client was up).
    """
    cfg = {"role": "direct", "workload": "null", "seed": 1, "cubin": s.cubin, "device": s.cuda.get("index", 0)}
    kid = s.child(cfg, "mps", 1)
    servers = ""
    try:
        kid.recv(120)
        servers = s.mps.command("get_server_list") if s.mps else ""
        now = time.monotonic()
        kid.send({"go": now, "measure": now, "end": now})
        kid.recv(60)
    except ChildFailed as exc:
        return f"a client could not run under the MPS daemon: {exc}", servers
    finally:
        kid.close()
    if not servers.strip():
        return "the MPS daemon started no server for a client (get_server_list is empty)", servers
    return None, servers


def run(args: argparse.Namespace) -> int:
    """``kaas-bench contention``: returns 0, or 1 when a check failed or a point broke, 2 on bad arguments."""
    try:
        tenants = parse_tenants(args.tenant_counts)
        modes = parse_modes(args.modes)
        plans = [workloads.parse(w) for w in args.workload.split(",") if w.strip()]
        limits = parse_limits(args.max_tenants)
    except ValueError as exc:
        print(f"kaas-bench contention: {exc}", file=sys.stderr)
        return 2
    if args.from_json:
        return _report(json.loads(Path(args.from_json).read_text()), args)
    if args.seconds <= 0 or args.warmup < 0:
        print("kaas-bench contention: --seconds must be > 0 and --warmup >= 0", file=sys.stderr)
        return 2

    logs = Path(tempfile.mkdtemp(prefix="kaas-contention-"))
    s = _Session(args, logs)
    doc: dict[str, Any] = {"bench": "contention", "device": "", "gpus": 0, "cpus": os.cpu_count(),
                           "seconds": args.seconds, "warmup": args.warmup, "modes": modes,
                           "workloads": [p.spec for p in plans], "tenants": tenants, "skipped_modes": {},
                           "results": [], "command": " ".join(["kaas-bench", "contention", *sys.argv[1:]])}
    try:
        direct = [m for m in modes if m in DIRECT_MODES]
        if direct:
            why = _cuda_setup(s)
            if why:
                doc["skipped_modes"].update(dict.fromkeys(direct, why))
            else:
                doc["device"] = s.cuda["name"]
                doc["gpus"] = int(args.gpus or s.cuda["count"])
        for mode in modes:
            if mode in doc["skipped_modes"]:
                doc["results"] += [{"mode": mode, "workload": p.spec, "tenants": n,
                                    "skipped": doc["skipped_modes"][mode]} for p in plans for n in tenants]
                _progress(f"{mode}: skipped: {doc['skipped_modes'][mode]}")
                continue
            try:
                with _mode(s, mode):
                    if mode == "kaas":
                        doc["kaas_device"] = _kaas_device(s.socket)
                        doc["device"] = doc["device"] or doc["kaas_device"]
                    if mode == "mps":
                        why, servers = _mps_probe(s)
                        if why:
                            raise _Skip(why)
                        doc["mps_servers"] = servers
                    for plan in plans:
                        for n in tenants:
                            doc["results"].append(_point(s, mode, plan, n, limits))
                            _save(doc, args.out)
            except _Skip as exc:
                doc["skipped_modes"][mode] = str(exc)
                doc["results"] += [{"mode": mode, "workload": p.spec, "tenants": n, "skipped": str(exc)}
                                   for p in plans for n in tenants]
                _progress(f"{mode}: skipped: {exc}")
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    doc["targets"] = assess(doc)
    _save(doc, args.out)
    return _report(doc, args)


def _save(doc: dict[str, Any], path: str | None) -> None:
    """Write the JSON so far to ``path`` (atomically): a run cut short keeps its finished points."""
    if path:
        tmp = f"{path}.tmp"
        Path(tmp).write_text(json.dumps(doc, indent=2))
        os.replace(tmp, path)


class _Skip(Exception):
    """A mode cannot run here; the message says why."""


def _cuda_setup(s: _Session) -> str | None:
    """Probe the GPU and compile kaas-std to a CUBIN for the direct modes: None, or why they cannot run."""
    device = s.args.device
    if device.startswith("cpu"):
        return f"needs a CUDA GPU (--device {device})"
    info = baselines.probe_in_child()
    if isinstance(info, str):
        return info
    index = 0
    if device.startswith("cuda:"):
        index = int(device.split(":", 1)[1].split(",")[0] or 0)
    info["index"] = index
    s.cuda = info
    try:
        from broker.streams.compiler import CompileCache
        from tenantlib import kernels

        cubin, _ = CompileCache().compile(kernels.SOURCE.encode(), info["arch"], name="kaas-std.cu")
    except Exception as exc:
        return f"cannot compile kaas-std for {info['arch']} with NVRTC: {exc}"
    path = s.logs / f"kaas-std-{info['arch']}.cubin"
    path.write_bytes(cubin)
    s.cubin = str(path)
    return None


def _point(s: _Session, mode: str, plan: workloads.Plan, n: int, limits: dict[str, int]) -> dict[str, Any]:
    head = {"mode": mode, "workload": plan.spec, "tenants": n}
    why = trim_reason(limits, mode, plan.spec, n)
    if why is None and mode == "mps" and n > baselines.MPS_MAX_CLIENTS:
        why = f"MPS serves at most {baselines.MPS_MAX_CLIENTS} client processes per GPU"
    if why is None:
        host, dev = memory_need(plan, mode, n, int(s.args.gpus or s.cuda.get("count", 1)))
        gpu_mem = int(s.cuda.get("memory", 0))
        if host > s.args.max_memory * 2**30:
            why = f"needs ~{host / 2**30:.1f} GiB of host memory (> --max-memory {s.args.max_memory:g})"
        elif gpu_mem and dev > 0.9 * gpu_mem:
            why = f"needs ~{dev / 2**30:.1f} GiB of device memory (> 90% of {gpu_mem / 2**30:.0f} GiB)"
    if why:
        _progress(f"{mode} {plan.spec} x{n}: skipped ({why})")
        return {**head, "skipped": why}
    t0 = time.monotonic()
    try:
        r = _exclusive_point(s, plan, n) if mode == "exclusive" else _process_point(s, mode, plan, n)
    except ChildFailed as exc:
        _progress(f"{mode} {plan.spec} x{n}: FAILED: {exc}")
        return {**head, "error": str(exc)}
    r["wall_s"] = round(time.monotonic() - t0, 2)
    p50, p99 = r.get("p50_us"), r.get("p99_us")
    _progress(f"{mode:<11} {plan.spec:<14} x{n:<3} {r['throughput_gps']:10.1f} graphs/s  p50 "
              f"{p50 if p50 is None else round(p50, 1)} us  p99 {p99 if p99 is None else round(p99, 1)} us  "
              f"checks {r['checks'] - r['check_failures']}/{r['checks']}  ({r['wall_s']} s)")
    return r


def _report(doc: dict[str, Any], args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        sys.stdout.write(render_table(doc))
        for t in doc.get("targets", []):
            state = "met" if t["met"] else "MISSED"
            print(f"{t['workload']}: {t['target']}: {state}" + (f" ({'; '.join(t['missed'])})" if t["missed"] else ""))
    if args.plot:
        for path in plot(doc, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    bad = [r for r in doc["results"] if r.get("check_failures") or "error" in r]
    if bad:
        print(f"kaas-bench contention: {len(bad)} point(s) failed a check or broke", file=sys.stderr)
        return 1
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``contention`` on kaas-bench's subcommands (``run`` is its function)."""
    p = subparsers.add_parser("contention", help="N tenants through kaas vs own contexts, MPS and exclusive GPUs",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="device for the broker of the kaas mode (default auto); "
                                                    "cpu runs kaas alone")
    p.add_argument("--socket", help="kaas mode: use the running broker at this socket instead of starting one")
    p.add_argument("--config", help="config file for the broker this starts")
    p.add_argument("--json", action="store_true", help="print JSON for machines instead of the table")
    p.add_argument("--plot", metavar="PREFIX", help="write PREFIX-WORKLOAD.png per workload (needs matplotlib)")
    # dest is not "tenants": kaas-bench's main checks an int args.tenants of other subcommands
    p.add_argument("--tenants", dest="tenant_counts", default="1,2,4,8,16,32,64", metavar="N,N,...",
                   help="tenant counts (default 1,2,4,8,16,32,64)")
    p.add_argument("--workload", default="null,sgemm:1024", help="workloads, comma-separated (default null,sgemm:1024)")
    p.add_argument("--modes", default="all", help=f"modes, comma-separated, or all ({', '.join(MODES)})")
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per point (default 3)")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds run before each window, not counted (default 0.5)")
    p.add_argument("--check-every", type=int, default=1000,
                   help="also check every Nth request of a tenant against numpy (0: only the sampled ones)")
    p.add_argument("--trace", action="store_true", help="kaas: stamp every 16th request and report per-hop p50")
    p.add_argument("--max-tenants", default="", metavar="KEY=N,...",
                   help="leave out points above N tenants; KEY is a mode, a workload or mode@workload")
    p.add_argument("--max-memory", type=float, default=64.0, metavar="GIB",
                   help="skip points needing more host memory than this (default 64 GiB)")
    p.add_argument("--gpus", type=int, default=0, help="exclusive: GPUs in the pool (default: all present)")
    p.add_argument("--client-spin-us", type=int, default=-1,
                   help="kaas tenants' busy-poll (default: the broker's while tenants <= cores/4, else 0)")
    p.add_argument("--exclusive-max-seconds", type=float, default=60.0, metavar="S",
                   help="exclusive: most seconds per point (its window spans whole rounds of switches)")
    p.add_argument("--out", metavar="FILE", help="also write the JSON here, after every point")
    p.add_argument("--from-json", metavar="FILE", help="print the table (and --plot) of an earlier --json output")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.contention ARGS``: the subcommand on its own (and the children's entry)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child_main(json.loads(argv[1]))
    parser = argparse.ArgumentParser(prog="kaas-bench")
    add_parser(parser.add_subparsers(dest="cmd", required=True))
    return int(run(parser.parse_args(["contention", *argv])))


if __name__ == "__main__":
    sys.exit(main())
