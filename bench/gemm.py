"""GEMM throughput through kaas against cuBLAS in-process.

    python -m bench.gemm [--sizes 1024,2048,4096] [--graphs 30] [--inflight 4] [--json]

For each square size, each way runs ``--graphs`` products ``C = A @ B`` back to back with
``--inflight`` graphs in flight, A and B resident on the GPU and C a temporary (so no copies:
the number is the product's own throughput through the broker), and reports TFLOP/s
(2 n^3 per product over the wall time of all of them):

- ``kaas gemm fp32`` / ``fp32 tf32`` / ``fp16``: ``tenantlib.gemm.Gemm`` (Triton, compiled here);
- ``kaas sgemm``: the shipped 16x16-tiled ``tenantlib.kernels`` sgemm (fp32);
- ``kaas cutlass fp32`` / ``fp16``: ``tenantlib.cutlass.CutlassGemm`` (SIMT; tensor cores, fp32 C);
- ``cublas fp32`` / ``tf32`` / ``fp16``: ``torch.matmul`` in this process (cuBLAS), timed with
  CUDA events, the floor a user with their own context gets.  Needs PyTorch; skipped without;
- ``triton in-process``: the same Triton kernel launched by Triton in this process (PyTorch
  tensors): what the kernel itself does, without kaas.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

import tenantlib
from tenantlib import kernels
from tools.broker_process import BrokerProcess


def _kaas(client: tenantlib.Client, how: str, n: int, graphs: int, inflight: int) -> float:
    dtype = "float16" if how.endswith("fp16") else "float32"
    rng = np.random.default_rng(0)
    host = client.array((n, n), dtype)  # a resident is made from arena memory
    host[...] = rng.standard_normal((n, n)).astype(dtype)
    a = client.resident(host)
    host[...] = rng.standard_normal((n, n)).astype(dtype)
    b = client.resident(host)
    g = client.graph()
    ra, rb = g.resident(a), g.resident(b)
    c = g.temp((n, n), "float32" if how.startswith("cutlass") else dtype)  # CUTLASS's fp16 GEMM writes fp32
    if how == "sgemm":
        grid, block = kernels.sgemm_launch(n, n)
        g.kernel(kernels.library(client), "sgemm", grid=grid, block=block, args=[ra, rb, c, n, n, n])
    elif how.startswith("cutlass"):
        from tenantlib.cutlass import CutlassGemm

        CutlassGemm(client, "float16" if how == "cutlass fp16" else "float32")(g, ra, rb, c)
    else:
        from tenantlib.gemm import Gemm

        Gemm(client, dtype, precision="tf32" if how == "fp32 tf32" else "ieee")(g, ra, rb, c)
    for _ in range(3):
        client.run(g, timeout=120)
    t0 = time.perf_counter()
    pending = []
    for _ in range(graphs):
        pending.append(client.submit(g, timeout=120))
        if len(pending) >= inflight:
            pending.pop(0).result()
    for p in pending:
        p.result()
    wall = time.perf_counter() - t0
    client.release_resident(a)
    client.release_resident(b)
    return 2.0 * n ** 3 * graphs / wall / 1e12


def _cublas(how: str, n: int, graphs: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch.backends.cuda.matmul.allow_tf32 = how == "tf32"
    dtype = torch.float16 if how == "fp16" else torch.float32
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(graphs):
        torch.matmul(a, b)
    end.record()
    end.synchronize()
    return 2.0 * n ** 3 * graphs / (start.elapsed_time(end) / 1e3) / 1e12


def _triton_direct(how: str, n: int, graphs: int) -> float | None:
    """The same Triton kernel as ``kaas gemm``, launched by Triton itself in this process."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    from tenantlib import gemm

    dtype = torch.float16 if how == "fp16" else torch.float32
    bm, bn, bk, warps, stages = gemm._TILES["float16" if how == "fp16" else "float32"]
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    c = torch.empty(n, n, device="cuda", dtype=dtype)
    k = gemm._kernel()
    grid = (-(-n // bm) * -(-n // bn),)

    def once() -> None:
        k[grid](a, b, c, n, n, n, 1.0, 0.0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                PRECISION="ieee" if how == "fp32" else "tf32", BETA_ZERO=True, num_warps=warps, num_stages=stages)

    for _ in range(3):
        once()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(graphs):
        once()
    end.record()
    end.synchronize()
    return 2.0 * n ** 3 * graphs / (start.elapsed_time(end) / 1e3) / 1e12


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gemm", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1024,2048,4096")
    p.add_argument("--graphs", type=int, default=30)
    p.add_argument("--inflight", type=int, default=4)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    ways = ["kaas sgemm", "kaas gemm fp32", "kaas gemm fp32 tf32", "kaas gemm fp16", "kaas cutlass fp32",
            "kaas cutlass fp16", "cublas fp32", "cublas tf32", "cublas fp16", "triton in-process fp32",
            "triton in-process fp16"]
    kaas_ways = {"kaas sgemm": "sgemm", "kaas gemm fp32": "fp32", "kaas gemm fp32 tf32": "fp32 tf32",
                 "kaas gemm fp16": "fp16", "kaas cutlass fp32": "cutlass fp32", "kaas cutlass fp16": "cutlass fp16"}
    results: dict[str, dict[int, float | None]] = {w: {} for w in ways}
    with BrokerProcess("cuda") as broker, tenantlib.connect(broker.socket, timeout=300) as client:
        for n in sizes:
            for way, how in kaas_ways.items():
                print(f"{way} n={n} ...", file=sys.stderr, flush=True)
                results[way][n] = _kaas(client, how, n, args.graphs if how != "sgemm" else max(3, args.graphs // 5),
                                        args.inflight)
    for n in sizes:  # after the broker is gone: this process's own context has the GPU to itself
        for way in ways[6:9]:
            results[way][n] = _cublas(way.split()[1], n, args.graphs)
        for way in ways[9:]:
            results[way][n] = _triton_direct(way.split()[2], n, args.graphs)
    if args.json:
        print(json.dumps({w: {str(k): v for k, v in r.items()} for w, r in results.items()}, indent=1))
        return 0
    print("TFLOP/s (square n x n x n, A and B resident, C a temporary)")
    print(f"{'':24}" + "".join(f"{n:>10}" for n in sizes))
    for w, r in results.items():
        cells: list[Any] = [r.get(n) for n in sizes]
        print(f"{w:24}" + "".join(f"{c:>10.1f}" if c is not None else f"{'-':>10}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
