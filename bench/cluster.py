"""``kaas-bench cluster``: kaas graphs from Ray, with cache-affine placement against Ray's own.

    kaas-bench cluster [--nodes 2] [--sets 6] [--size 2048] [--batch 8] [--fit 3] [--requests 240]
                       [--concurrency 8] [--modes affinity,ray,local] [--seed 0] [--json]

A fake Ray cluster on this machine (``tools.fake_cluster``: a head and ``--nodes`` nodes, each with
its own CPU-device broker) serves requests ``y = W x`` (sgemm, ``x`` of ``--batch`` columns: little work
for a lot of weights, as in inference) whose weights ``W`` come from ``--sets`` sets (``--size``
square, float32, as object references), chosen at random.  Each
broker's device holds ``--fit`` sets for the tenant (a ``device_memory`` quota), so the sets do
not fit on every node.  Modes, each closed loop with ``--concurrency`` requests in flight:

- ``affinity``: ``tenantlib.ray.KaasCluster.submit``: the node with the lowest expected finish
  (requests waiting there, plus the time to load the residents it lacks);
- ``ray``: a Ray task per request (``resources={"kaas": ...}``), placed by Ray's default
  scheduler, running ``tenantlib.ray.run_local`` on whichever node it landed;
- ``local``: the same request from this process on one node's broker, with no Ray at all, one at a
  time: the floor the Ray hop is measured against (``affinity`` also runs once at concurrency 1).

Reported: requests/s, p50 / p99 latency, and the hit rate (requests whose weights the serving node
held already).  Every output is checked against numpy.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

MODES = ("affinity", "ray", "local")


def _spec(n: int, batch: int) -> Any:
    """y = W x for weights W (n x n, resident) and a batch of ``batch`` columns x (n x batch)."""
    from tenantlib import kernels
    from tenantlib import ray as kr

    grid, block = kernels.sgemm_launch(n, batch)
    return kr.GraphSpec(libraries={"std": kr.Source(kernels.SOURCE, kernels.KERNELS)},
                        buffers=(kr.Buffer("W", "resident", (n, n)), kr.Buffer("x", "in", (n, batch)),
                                 kr.Buffer("y", "out", (n, batch))),
                        launches=(kr.Launch("std", "sgemm", grid, block, ("W", "x", "y", n, batch, n)),))


def _closed_loop(submit: Any, pick: Any, requests: int, concurrency: int) -> tuple[list[float], list[bool], float]:
    """Run ``requests`` through ``submit(i) -> (ref, check)`` keeping ``concurrency`` in flight;
    latencies, each check's outcome, and the wall time."""
    import ray

    lat: list[float] = []
    ok: list[bool] = []
    flight: dict[Any, tuple[float, Any]] = {}
    sent = 0
    t0 = time.perf_counter()
    while sent < requests or flight:
        while sent < requests and len(flight) < concurrency:
            ref, check = submit(pick(sent))
            flight[ref] = (time.perf_counter(), check)
            sent += 1
        done, _ = ray.wait(list(flight), num_returns=1)
        for ref in done:
            started, check = flight.pop(ref)
            ok.append(bool(check(ray.get(ref))))
            lat.append(time.perf_counter() - started)
    return lat, ok, time.perf_counter() - t0


def _row(mode: str, concurrency: int, lat: list[float], ok: list[bool], wall: float, hits: int,
         total: int) -> dict[str, Any]:
    a = np.asarray(lat) * 1e3
    return {"mode": mode, "concurrency": concurrency, "requests": len(lat), "wrong": ok.count(False),
            "per_s": len(lat) / wall, "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "hit_rate": hits / total if total else None}


def run(nodes: int = 2, sets: int = 6, size: int = 2048, fit: int = 3, requests: int = 240, concurrency: int = 8,
        modes: tuple[str, ...] = MODES, seed: int = 0, env: dict[str, str] | None = None,
        batch: int = 8) -> dict[str, Any]:
    import ray

    from tenantlib import ray as kr
    from tools.fake_cluster import fake_cluster

    rng = np.random.default_rng(seed)
    set_bytes = size * size * 4
    # Room for ``fit`` weight sets and the graphs' own buffers (x, y) on each node's device.
    config = f"[tenant_defaults]\ndevice_memory = {fit * set_bytes + set_bytes // 2}\n"
    weights = [rng.standard_normal((size, size)).astype(np.float32) / np.float32(np.sqrt(size)) for _ in range(sets)]
    xs = [rng.standard_normal((size, batch)).astype(np.float32) for _ in range(8)]
    spec = _spec(size, batch)
    choice = rng.integers(0, sets, size=requests)
    rows: list[dict[str, Any]] = []
    with fake_cluster(nodes, config, env=env) as fc:
        refs = [ray.put(w) for w in weights]

        wants = {(i, j): weights[i] @ xs[j] for i in range(sets) for j in range(len(xs))}  # not on the clock

        def check(i: int, j: int) -> Any:
            return lambda out: np.allclose(out["y"], wants[(i, j)], rtol=1e-3, atol=1e-3)

        if "affinity" in modes:
            kc = kr.KaasCluster()

            def submit_aff(k: int) -> tuple[Any, Any]:
                i, j = int(choice[k % requests]), k % len(xs)
                return kc.submit(spec, inputs={"x": xs[j]}, residents={"W": refs[i]}), check(i, j)

            for conc in (1, concurrency):
                before = {nid: ray.get(n.proxy.info.remote()) for nid, n in kc.nodes.items()}
                lat, ok, wall = _closed_loop(submit_aff, lambda k: k, requests, conc)
                after = {nid: ray.get(n.proxy.info.remote()) for nid, n in kc.nodes.items()}
                hits = sum(after[n]["hits"] - before[n]["hits"] for n in after)
                misses = sum(after[n]["misses"] - before[n]["misses"] for n in after)
                rows.append(_row("affinity", conc, lat, ok, wall, hits, hits + misses))

        if "ray" in modes:
            @ray.remote(num_cpus=0, resources={"kaas": 0.01})
            def task(w: list[Any], x: np.ndarray) -> tuple[dict[str, np.ndarray], bool]:
                # The weights' reference comes in a list, so Ray does not fetch them: run_local
                # does, only when this worker process has not registered them yet.
                return kr._run_local(spec, {"x": x}, {"W": w[0]}, None, None)

            held: list[bool] = []

            def submit_ray(k: int) -> tuple[Any, Any]:
                i, j = int(choice[k % requests]), k % len(xs)
                inner = check(i, j)

                def check_and_count(res: tuple[dict[str, np.ndarray], bool]) -> bool:
                    held.append(res[1])
                    return bool(inner(res[0]))
                return task.remote([refs[i]], xs[j]), check_and_count

            lat, ok, wall = _closed_loop(submit_ray, lambda k: k, requests, concurrency)
            rows.append(_row("ray", concurrency, lat, ok, wall, held.count(True), len(held)))

        if "local" in modes:
            import os

            os.environ["KAAS_SOCKET"] = fc.brokers[0].socket
            lat, ok = [], []
            local_hits = 0
            t0 = time.perf_counter()
            for k in range(requests):
                i, j = int(choice[k]), k % len(xs)
                started = time.perf_counter()
                out, had = kr._run_local(spec, {"x": xs[j]}, {"W": refs[i]}, None, None)
                lat.append(time.perf_counter() - started)
                ok.append(bool(check(i, j)(out)))
                local_hits += had
            rows.append(_row("local", 1, lat, ok, time.perf_counter() - t0, local_hits, requests))
    return {"bench": "cluster", "nodes": nodes, "sets": sets, "size": size, "batch": batch, "fit": fit,
            "requests": requests, "rows": rows}


def show(doc: dict[str, Any]) -> str:
    lines = [f"cluster: {doc['nodes']} fake nodes, {doc['sets']} weight sets of {doc['size']}^2 float32 "
             f"({doc['size'] ** 2 * 4 / 2**20:.1f} MiB), {doc['fit']} fit on a node's device; y = W x with x of "
             f"{doc.get('batch', '?')} columns; {doc['requests']} requests a mode", "",
             f"{'mode':9} {'in flight':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'hit rate':>8} {'wrong':>5}"]
    for r in doc["rows"]:
        hit = f"{r['hit_rate']:.2f}" if r["hit_rate"] is not None else "-"
        lines.append(f"{r['mode']:9} {r['concurrency']:>9} {r['per_s']:>8.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                     f"{hit:>8} {r['wrong']:>5}")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    sp = sub.add_parser("cluster", help="kaas graphs from Ray: cache-affine placement against Ray's own")
    sp.add_argument("--nodes", type=int, default=2)
    sp.add_argument("--sets", type=int, default=6, help="weight sets the requests choose from")
    sp.add_argument("--size", type=int, default=2048, help="weights are SIZE x SIZE float32")
    sp.add_argument("--batch", type=int, default=8, help="columns of each request's input x (SIZE x BATCH)")
    sp.add_argument("--fit", type=int, default=3, help="weight sets one node's device holds")
    sp.add_argument("--requests", type=int, default=240, help="requests per mode")
    sp.add_argument("--concurrency", type=int, default=8, help="requests in flight (closed loop)")
    sp.add_argument("--modes", default=",".join(MODES))
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SystemExit("kaas-bench cluster needs Ray (pip install 'kaas[ray]')") from None
    modes = tuple(m for m in args.modes.split(",") if m)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"kaas-bench cluster: unknown mode(s) {bad} (known: {', '.join(MODES)})")
    doc = run(args.nodes, args.sets, args.size, args.fit, args.requests, args.concurrency, modes, args.seed,
              batch=args.batch)
    print(json.dumps(doc, indent=1) if args.json else show(doc))
    return 0 if all(r["wrong"] == 0 for r in doc["rows"]) else 1
