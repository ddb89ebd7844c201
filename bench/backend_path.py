"""Where a direct run's time goes inside one CUDA device worker, without a broker or a tenant.

    python -m bench.backend_path [--device N] [--iterations N] [--profile]

Runs a prepared null graph (one empty kernel, no buffers) through ``CudaBackend.run`` and a
``poll`` loop in this process, the way the device worker's direct path does, and prints
(JSON) the median microseconds of: ``run`` (bind, queue, launch, event record), the wait
until ``poll`` returns the completion and the number of ``poll`` calls it took, each
``poll`` that finds nothing, and, side by side, the raw driver calls the same work needs
(launch + record + query loop).  ``--profile`` adds the functions by own time per run
(cProfile inflates every call: read proportions).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from typing import Any

from cuda.bindings import driver

from broker.protocol import KernelSpec
from broker.streams.cuda_backend import CudaBackend
from broker.streams.wire import ExecGraph, ExecKernel

_SOURCE = b'extern "C" __global__ void kaas_path_null(void) {}\n'
_LIB = "path-null"


def _p50(xs: list[float]) -> float:
    xs = sorted(xs)
    return round(xs[len(xs) // 2] * 1e6, 2)


def _backend_runs(backend: CudaBackend, iterations: int, handle: int) -> dict[str, Any]:
    clock = time.perf_counter
    run, poll = backend.run, backend.poll
    runs: list[float] = []
    waits: list[float] = []
    polls: list[int] = []
    token = 1
    for i in range(iterations + 200):
        token += 1
        t0 = clock()
        run(token, handle, (), (), 0.0, 0)
        t1 = clock()
        n = 1
        while not poll():
            n += 1
        t2 = clock()
        if i >= 200:
            runs.append(t1 - t0)
            waits.append(t2 - t1)
            polls.append(n)
    polls.sort()
    return {"run_us": _p50(runs), "wait_until_polled_us": _p50(waits), "polls_p50": polls[len(polls) // 2],
            "total_us": _p50([a + b for a, b in zip(runs, waits, strict=True)])}


def _empty_polls(backend: CudaBackend, iterations: int) -> float:
    clock = time.perf_counter
    poll = backend.poll
    t0 = clock()
    for _ in range(iterations):
        poll()
    return round((clock() - t0) / iterations * 1e6, 3)


def _raw(backend: CudaBackend, iterations: int) -> dict[str, Any]:
    function = backend._libraries[_LIB].functions["kaas_path_null"]
    lane = backend._lanes[0]
    s, ev = lane.stream, lane.events[2]
    launch, record, query = driver.cuLaunchKernel, driver.cuEventRecord, driver.cuEventQuery
    clock = time.perf_counter
    starts: list[float] = []
    totals: list[float] = []
    queries: list[int] = []
    for i in range(iterations + 200):
        t0 = clock()
        launch(function, 1, 1, 1, 1, 1, 1, 0, s, 0, 0)
        record(ev, s)
        t1 = clock()
        n = 1
        while query(ev)[0]:
            n += 1
        t2 = clock()
        if i >= 200:
            starts.append(t1 - t0)
            totals.append(t2 - t0)
            queries.append(n)
    queries.sort()
    t0 = clock()
    for _ in range(iterations):
        query(ev)
    per_query = (clock() - t0) / iterations
    return {"launch_record_us": _p50(starts), "launch_to_seen_us": _p50(totals),
            "queries_p50": queries[len(queries) // 2], "cuEventQuery_us": round(per_query * 1e6, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="backend_path", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--iterations", type=int, default=5000)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    out: dict[str, Any] = {}
    for mode in ("auto", "on", "off"):
        backend = CudaBackend(args.device, cuda_graphs=mode)
        try:
            backend.load_library(_LIB, "cuda", _SOURCE, (KernelSpec("kaas_path_null", ()),), ())
            graph = ExecGraph((), (ExecKernel(_LIB, "kaas_path_null", (1, 1, 1), (1, 1, 1), 0, ()),))
            backend.prepare(1, graph, ())
            res = _backend_runs(backend, args.iterations, 1)
            res["empty_poll_us"] = _empty_polls(backend, args.iterations)
            res["graph_stats"] = dict(backend.graph_stats)
            out[f"cuda_graphs={mode}"] = res
            if mode == "auto":
                out["raw"] = _raw(backend, args.iterations)
                if args.profile:
                    prof = cProfile.Profile()
                    prof.runcall(_backend_runs, backend, args.iterations, 1)
                    buf = io.StringIO()
                    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
                    out["profile"] = buf.getvalue().splitlines()
        finally:
            backend.close()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
