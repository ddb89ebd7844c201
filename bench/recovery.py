"""Recovery time after a device fault: a kernel that writes to an illegal address, and one that never ends.

    python -m bench.recovery --device cuda --repeats 5 [--kinds illegal_address,hang] [--json] [--out FILE]

One broker on ``--device``; per repeat, two well-behaved tenants keep it busy while a third
faults:

- ``A`` (sgemm) has a batch of long sgemm graphs in flight when the fault happens and sends a
  second batch right after it; every result is checked against numpy;
- ``C`` (vadd) runs one small vadd graph at a time, back to back, checking each: the probe whose
  completions show when the service is back;
- ``X`` runs the culprit: ``poke`` (a store through the bogus pointer 0x10) for
  ``illegal_address``, ``spin`` (a loop on a volatile flag that stays 0) with ``timeout=1.0``
  for ``hang``.  On the CPU device their stand-ins are ``tenantlib.kernels.testing``'s ``crash``
  (the worker process dies) and ``hang``.

Times are seconds after the fault: the culprit's submission for ``illegal_address`` (the kernel
faults within microseconds of its launch), its deadline (submission + timeout) for ``hang``.

- ``culprit_error``: the culprit's typed error reaches it;
- ``restart``: the broker's ``worker_restarts`` counter goes up (a status poll every 5 ms; a
  fault whose innocents are replayed one by one may take more than one), and ``respawn``: from
  the worker seen down to the counter going up (a new process, its context, arenas and libraries);
- ``recovery``: another tenant's first successful graph after the fault (the first to end after
  the worker was seen down: a replayed one, or one sent after the fault);
- ``outage``: the probe tenant's wait between its last success before the worker was seen down
  and its first one after;
- ``stall``: the longest round trip of the monitor's status requests after the fault (they need
  no device, so a long one is the broker's event loop not running).

A repeat also records what the innocent tenants got: every graph's error, if any (they should
get none: innocent graphs in flight are replayed).  The summary gives p50 and max over repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

import tenantlib
from broker.protocol import KernelSpec, Param
from tenantlib import errors, kernels
from tenantlib.kernels import testing
from tools.broker_process import BrokerProcess

KINDS = ("illegal_address", "hang")
BOGUS_ADDRESS = 0x10
HANG_TIMEOUT = 1.0
WAIT = 60.0  # seconds to wait for any step; generous, but a hung broker still ends the run

# The culprits (and, for tests, an innocent kernel that takes a while) in CUDA C.
CUDA_SOURCE = r"""
// Stores through a pointer passed as a plain number: an illegal address.
extern "C" __global__ void poke(unsigned long long addr) { *(volatile int*)addr = 1; }
// Waits for a flag nobody sets (a temp buffer, zeroed): never ends. The load is volatile, so
// the compiler keeps the loop.
extern "C" __global__ void spin(int* flag) {
    volatile int* f = flag;
    while (*f == 0) { }
}
__device__ void kaas_wait(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
// Runs for ns nanoseconds of wall time, then ends: an innocent graph that is slow.
extern "C" __global__ void wait_ns(unsigned long long ns) { kaas_wait(ns); }
// Runs for ns nanoseconds, then stores through addr: a culprit that faults late.
extern "C" __global__ void wait_then_poke(unsigned long long ns, unsigned long long addr) {
    kaas_wait(ns);
    *(volatile int*)addr = 1;
}
"""
CUDA_KERNELS = (
    KernelSpec("poke", (Param("addr", "u64"),)),
    KernelSpec("spin", (Param("flag", "buf", "inout", "int32"),)),
    KernelSpec("wait_ns", (Param("ns", "u64"),)),
    KernelSpec("wait_then_poke", (Param("ns", "u64"), Param("addr", "u64"))),
)
CPU_SOURCE = 'extern "C" __global__ void crash() {}\nextern "C" __global__ void hang() {}\n'
CULPRIT = {("cuda", "illegal_address"): "poke", ("cuda", "hang"): "spin",
           ("cpu", "illegal_address"): "crash", ("cpu", "hang"): "hang"}


def config_text(device: str, extra: str = "") -> str:
    """A broker config for fault runs: no quarantine in the way of repeats, the culprits allowed on CPU."""
    text = "quarantine_after = 1000\nmax_graph_seconds = 30.0\n" + extra
    if device.startswith("cpu"):
        text += 'host_modules = ["tenantlib.kernels.host", "tenantlib.kernels.testing"]\nlanes_cpu = 4\n'
    return text


@dataclass
class Outcome:
    """One graph of an innocent tenant: when it was sent and answered (perf_counter), and how it went."""

    tenant: str
    submitted: float
    done: float
    ok: bool
    error: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    """One fault and what followed it; times in seconds after the fault (see the module docstring)."""

    kind: str
    device: str
    culprit_kernel: str
    culprit_error: str = ""           # the exception's class name
    culprit_message: str = ""
    culprit_detail: dict[str, Any] = field(default_factory=dict)
    culprit_error_s: float | None = None
    restarts: list[float] = field(default_factory=list)   # each time the counter went up
    respawns: list[float] = field(default_factory=list)   # worker seen down -> counter up, each time
    recovery_s: float | None = None
    outage_s: float | None = None
    innocent_graphs: int = 0
    innocent_errors: list[str] = field(default_factory=list)
    stall_s: float | None = None       # the longest status round trip after the fault: the broker not answering
    later_ok: bool = False             # both innocent tenants ran and checked graphs afterwards
    stats_before: dict[str, int] = field(default_factory=dict)
    stats_after: dict[str, int] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list, repr=False)

    @property
    def restart_s(self) -> float | None:
        return self.restarts[0] if self.restarts else None

    def summary(self) -> str:
        def s(v: float | None) -> str:
            return "-" if v is None else f"{v * 1e3:.0f} ms"

        return (f"{self.kind} on {self.device}: culprit {self.culprit_kernel} got {self.culprit_error} after "
                f"{s(self.culprit_error_s)}; worker restarts at {', '.join(s(t) for t in self.restarts) or '-'} "
                f"(down for {', '.join(s(t) for t in self.respawns) or '-'}); first other tenant's graph after "
                f"{s(self.recovery_s)}; probe outage {s(self.outage_s)}; longest status round trip {s(self.stall_s)}; "
                f"innocent graphs {self.innocent_graphs}, errors {len(self.innocent_errors)}")


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Monitor(threading.Thread):
    """Polls the broker's status: when the restart counter goes up, and when the worker is seen down."""

    def __init__(self, path: str, interval: float = 0.005) -> None:
        super().__init__(name="kaas-monitor", daemon=True)
        self.client = tenantlib.connect(path, timeout=WAIT)
        self.interval = interval
        self.stop = threading.Event()
        self.restarts: list[tuple[float, int]] = []  # (when, counter) at each change
        self.downs: list[tuple[float, float]] = []   # (first seen down, first seen up again)
        self.rtts: list[tuple[float, float]] = []    # (when answered, round trip) of every status
        self.last: dict[str, Any] = {}
        self.failure: BaseException | None = None

    def run(self) -> None:
        down_since: float | None = None
        try:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                st = self.client.status()
                now = time.perf_counter()
                self.rtts.append((now, now - t0))
                self.last = st
                n = int(st["stats"]["worker_restarts"])
                if not self.restarts or self.restarts[-1][1] != n:
                    self.restarts.append((now, n))
                alive = all(d.get("alive") for d in st["devices"])
                if not alive and down_since is None:
                    down_since = now
                elif alive and down_since is not None:
                    self.downs.append((down_since, now))
                    down_since = None
                time.sleep(self.interval)
        except BaseException as exc:  # reported by whoever reads the samples
            self.failure = exc

    def counter(self) -> int:
        if self.failure is not None:
            raise RuntimeError(f"status monitor failed: {_error_text(self.failure)}") from self.failure
        return self.restarts[-1][1] if self.restarts else 0

    def close(self) -> None:
        self.stop.set()
        self.join(WAIT)
        self.client.close()


class Probe(threading.Thread):
    """Tenant C: one small vadd at a time, back to back, each result checked exactly."""

    def __init__(self, client: tenantlib.Client, lib: tenantlib.Library, n: int) -> None:
        super().__init__(name="kaas-probe", daemon=True)
        self.client = client
        self.stop = threading.Event()
        self.outcomes: list[Outcome] = []
        c = client
        self.x, self.y, self.z = c.array(n), c.array(n), c.array(n)
        self.y[...] = np.random.default_rng(7).standard_normal(n)
        self.graph = c.graph()
        grid, block = kernels.launch_1d(n)
        g = self.graph
        g.kernel(lib, "vadd", grid=grid, block=block, args=[g.input(self.x), g.input(self.y), g.output(self.z), n])
        self.i = 0

    def once(self) -> Outcome:
        self.i += 1
        self.x.fill(np.float32(self.i % 4096))
        self.z.fill(np.nan)
        t0 = time.perf_counter()
        try:
            self.client.run(self.graph, timeout=WAIT)
        except errors.KaasError as exc:
            return Outcome("C", t0, time.perf_counter(), False, _error_text(exc), dict(exc.detail))
        done = time.perf_counter()
        ok = bool(np.array_equal(self.z, self.x + self.y))
        return Outcome("C", t0, done, ok, "" if ok else "C: vadd result differs from numpy")

    def run(self) -> None:
        while not self.stop.is_set():
            self.outcomes.append(self.once())


class SgemmTenant:
    """Tenant A: long sgemm graphs (``reps`` sgemms into a temp, the last into the output)."""

    def __init__(self, client: tenantlib.Client, lib: tenantlib.Library, n: int, reps: int, count: int) -> None:
        self.client = client
        self.n = n
        self.work: list[tuple[tenantlib.Graph, np.ndarray, np.ndarray, np.ndarray]] = []
        for _ in range(count):
            A, B, C = client.array((n, n)), client.array((n, n)), client.array((n, n))
            g = client.graph()
            grid, block = kernels.sgemm_launch(n, n)
            t = g.temp((n, n))
            for _ in range(reps - 1):
                g.kernel(lib, "sgemm", grid=grid, block=block, args=[g.input(A), g.input(B), t, n, n, n])
            g.kernel(lib, "sgemm", grid=grid, block=block, args=[g.input(A), g.input(B), g.output(C), n, n, n])
            self.work.append((g, A, B, C))
        self.rng = np.random.default_rng(11)

    def refresh(self) -> None:
        for _, A, B, C in self.work:
            A[...] = self.rng.standard_normal(A.shape, dtype=np.float32)
            B[...] = self.rng.standard_normal(B.shape, dtype=np.float32)
            C[...] = np.nan

    def submit(self, part: slice) -> list[tuple[float, tenantlib.PendingRun, int]]:
        return [(time.perf_counter(), self.client.submit(g, timeout=WAIT), i)
                for i, (g, *_) in list(enumerate(self.work))[part]]

    def collect(self, sent: list[tuple[float, tenantlib.PendingRun, int]]) -> list[Outcome]:
        """Wait for each result in order (noting when it came), then check them all against numpy."""
        got: list[tuple[float, float, int, errors.KaasError | None]] = []
        for t0, pending, i in sent:
            try:
                pending.result()
                got.append((t0, time.perf_counter(), i, None))
            except errors.KaasError as exc:
                got.append((t0, time.perf_counter(), i, exc))
        out = []
        for t0, done, i, failure in got:
            if failure is not None:
                out.append(Outcome("A", t0, done, False, _error_text(failure), dict(failure.detail)))
                continue
            _, A, B, C = self.work[i]
            ref = kernels.ref_sgemm(A, B)
            err = float(np.linalg.norm(C - ref) / max(float(np.linalg.norm(ref)), 1e-30))
            out.append(Outcome("A", t0, done, err < 1e-5, "" if err < 1e-5 else f"A: sgemm off by {err:.2g}"))
        return out

    def run_all(self) -> list[Outcome]:
        self.refresh()
        return self.collect(self.submit(slice(None)))


class Rig:
    """The three tenants and the monitor, on one broker, for any number of faults."""

    def __init__(self, path: str, device: str) -> None:
        self.path = path
        self.kind = "cuda" if device.startswith("cuda") else "cpu"
        self.a = tenantlib.connect(path, timeout=WAIT)
        self.c = tenantlib.connect(path, timeout=WAIT)
        self.x = tenantlib.connect(path, timeout=WAIT)
        self.monitor = Monitor(path)
        self.monitor.start()
        cuda = self.kind == "cuda"
        self.bad = (self.x.library(CUDA_SOURCE, kernels=CUDA_KERNELS, name="culprits") if cuda else
                    self.x.library(CPU_SOURCE, kernels=[testing.CRASH, testing.HANG], name="culprits"))
        # Long graphs in flight when the fault hits: 48 sgemm of 1024 on a GPU (~10 ms), two of 192 on CPU.
        self.sgemm = SgemmTenant(self.a, kernels.library(self.a), 1024 if cuda else 192, 48 if cuda else 2, 8)
        self.c_lib = kernels.library(self.c)
        self.probe_n = 1 << 16 if cuda else 4096
        self.device_name = str(self.x.status()["devices"][0].get("name", device))

    def close(self) -> None:
        self.monitor.close()
        for cl in (self.a, self.c, self.x):
            cl.close()

    def culprit_graph(self, kind: str) -> tuple[tenantlib.Graph, str]:
        name = CULPRIT[(self.kind, kind)]
        g = self.x.graph()
        if name == "poke":
            g.kernel(self.bad, name, grid=1, block=1, args=[BOGUS_ADDRESS])
        elif name == "spin":
            g.kernel(self.bad, name, grid=1, block=1, args=[g.temp(1, np.int32)])
        else:
            g.kernel(self.bad, name, grid=1, block=1, args=[])
        return g, name

    def wait_idle(self) -> None:
        """Until the worker is up and nothing is queued or running."""
        end = time.monotonic() + WAIT
        while True:
            st = self.x.status()
            if st["queued"] == 0 and all(d["alive"] and not d["running"] for d in st["devices"]):
                return
            if time.monotonic() > end:
                raise TimeoutError(f"the broker did not settle: {st}")
            time.sleep(0.01)

    def fault(self, kind: str) -> Sample:
        """One fault of ``kind`` while A and C work; returns what happened (never raises for their errors)."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r} (one of {', '.join(KINDS)})")
        self.wait_idle()
        graph, name = self.culprit_graph(kind)
        sample = Sample(kind, self.device_name, name, stats_before=dict(self.x.status()["stats"]))
        restarts0 = self.monitor.counter()
        probe = Probe(self.c, self.c_lib, self.probe_n)
        self.sgemm.refresh()
        probe.start()
        half = len(self.sgemm.work) // 2
        first = self.sgemm.submit(slice(0, half))
        time.sleep(0.002)  # A's first batch is on the device before the culprit
        timeout = HANG_TIMEOUT if kind == "hang" else WAIT
        sent = time.perf_counter()
        culprit = self.x.submit(graph, timeout=timeout)
        second = self.sgemm.submit(slice(half, None))
        a_out: list[Outcome] = []
        collector = threading.Thread(target=lambda: a_out.extend(self.sgemm.collect(first + second)), daemon=True)
        collector.start()
        fault_at = sent + (timeout if kind == "hang" else 0.0)
        try:
            culprit.result()
            sample.culprit_error = "none"
        except errors.KaasError as exc:
            sample.culprit_error, sample.culprit_message = type(exc).__name__, str(exc)
            sample.culprit_detail = dict(exc.detail)
        err_at = time.perf_counter()
        sample.culprit_error_s = err_at - fault_at
        collector.join(WAIT)
        end = time.monotonic() + WAIT
        while self.monitor.counter() <= restarts0 or not any(o.ok and o.submitted > err_at for o in probe.outcomes):
            if time.monotonic() > end or not probe.is_alive():
                break
            time.sleep(0.005)
        probe.stop.set()
        probe.join(WAIT)
        # later graphs of both innocent tenants, on the fresh worker
        later = self.sgemm.run_all()[:2] + [probe.once(), probe.once()]
        sample.later_ok = all(o.ok for o in later)
        self.wait_idle()
        time.sleep(0.05)  # one more status poll
        outcomes = a_out + probe.outcomes
        sample.outcomes = outcomes
        sample.innocent_graphs = len(outcomes)
        sample.innocent_errors = [o.error for o in outcomes if not o.ok]
        # Successes after the worker was seen down can only come from the fresh worker; one seen
        # before it may have ended in the instant between the culprit's submission and its fault.
        down = [d for d, _ in self.monitor.downs if d > sent] + [t for t, n in self.monitor.restarts if n > restarts0]
        if down:
            seen_down = min(down)
            after = [o.done for o in outcomes if o.ok and o.done > seen_down]
            sample.recovery_s = min(after) - fault_at if after else None
            c_ok = sorted(o.done for o in probe.outcomes if o.ok)
            c_before = [t for t in c_ok if t <= seen_down]
            c_after = [t for t in c_ok if t > seen_down]
            if c_before and c_after:
                sample.outage_s = c_after[0] - c_before[-1]
        stalls = [rtt for t, rtt in self.monitor.rtts if t > sent]
        sample.stall_s = max(stalls) if stalls else None
        restarts = [t for t, n in self.monitor.restarts if n > restarts0]
        sample.restarts = [t - fault_at for t in restarts]
        downs = [d for d, _ in self.monitor.downs if d > sent]
        sample.respawns = [r - max(d for d in downs if d < r) for r in restarts if any(d < r for d in downs)]
        sample.stats_after = dict(self.x.status()["stats"])
        return sample


@contextlib.contextmanager
def broker(device: str, *, log: str | None = None, env: dict[str, str] | None = None,
           extra_config: str = "") -> Iterator[BrokerProcess]:
    """A broker on ``device`` with ``config_text(device, extra_config)``."""
    with tempfile.TemporaryDirectory(prefix="kaas-recovery-") as tmp:
        cfg = os.path.join(tmp, "broker.toml")
        with open(cfg, "w") as f:
            f.write(config_text(device, extra_config))
        with BrokerProcess(device, config=cfg, log=log, env=env) as b:
            yield b


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """p50 / max over repeats of each time, with the innocent tenants' errors counted."""
    def stat(values: list[float | None]) -> dict[str, float | int | None]:
        xs = [v for v in values if v is not None]
        return {"p50": _pct(xs, 50), "max": max(xs) if xs else None, "n": len(xs)}

    return {
        "culprit_error_s": stat([s.culprit_error_s for s in samples]),
        "restart_s": stat([s.restart_s for s in samples]),
        "respawn_s": stat([r for s in samples for r in s.respawns]),
        "recovery_s": stat([s.recovery_s for s in samples]),
        "outage_s": stat([s.outage_s for s in samples]),
        "stall_s": stat([s.stall_s for s in samples]),
        "restarts_per_fault": statistics.median(len(s.restarts) for s in samples) if samples else None,
        "culprit_errors": sorted({s.culprit_error for s in samples}),
        "innocent_graphs": sum(s.innocent_graphs for s in samples),
        "innocent_errors": sum(len(s.innocent_errors) for s in samples),
        "innocent_error_examples": sorted({e.split(";")[0][:160] for s in samples for e in s.innocent_errors})[:5],
        "later_ok": all(s.later_ok for s in samples),
    }


def sample_dict(s: Sample) -> dict[str, Any]:
    d = asdict(s)
    d.pop("outcomes")
    d["restart_s"] = s.restart_s
    return d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda[:N] or cpu (default cuda)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--log", help="keep the broker's log here")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    for k in kinds:
        if k not in KINDS:
            p.error(f"unknown kind {k!r} (one of {', '.join(KINDS)})")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")

    result: dict[str, Any] = {"device": args.device, "repeats": args.repeats,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "kinds": {}}
    print(f"starting a broker on --device {args.device} ...", file=sys.stderr, flush=True)
    with broker(args.device, log=args.log) as b:
        rig = Rig(b.socket, args.device)
        try:
            result["device_name"] = rig.device_name
            for kind in kinds:
                samples = []
                for i in range(args.repeats):
                    s = rig.fault(kind)
                    print(f"[{kind} {i + 1}/{args.repeats}] {s.summary()}", file=sys.stderr, flush=True)
                    samples.append(s)
                result["kinds"][kind] = {"summary": summarize(samples), "samples": [sample_dict(s) for s in samples]}
        finally:
            rig.close()
        result["broker_problems"] = b.problems()
    for kind, r in result["kinds"].items():
        sm = r["summary"]

        def ms(v: dict[str, Any]) -> str:
            return "-" if v["p50"] is None else f"p50 {v['p50'] * 1e3:7.1f} ms  max {v['max'] * 1e3:7.1f} ms"

        print(f"{kind:16s} culprit error {ms(sm['culprit_error_s'])} | restart {ms(sm['restart_s'])} | "
              f"respawn {ms(sm['respawn_s'])} | recovery {ms(sm['recovery_s'])} | outage {ms(sm['outage_s'])} | "
              f"status stall {ms(sm['stall_s'])} | "
              f"innocent errors {sm['innocent_errors']}/{sm['innocent_graphs']}", file=sys.stderr)
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
