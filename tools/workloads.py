"""Workloads shared by the demo and the benchmarks: a graph, fresh inputs, and a numpy check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tenantlib import Client, Graph, kernels


@dataclass
class Workload:
    """A ready graph over arena arrays; ``refresh`` draws new inputs, ``check`` verifies outputs."""

    name: str
    graph: Graph
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def refresh(self, rng: np.random.Generator) -> None:
        for key, arr in self.arrays.items():
            if key.startswith("in_"):
                arr[...] = rng.standard_normal(arr.shape, dtype=np.float32)
            elif key.startswith("out_"):
                arr[...] = np.nan  # poison: every element must be written

    def check(self) -> bool:
        a = self.arrays
        if self.name == "null":
            return True
        if self.name == "vadd":
            return bool(np.array_equal(a["out_c"], kernels.ref_vadd(a["in_a"], a["in_b"])))
        if self.name == "sgemm":
            ref = kernels.ref_sgemm(a["in_A"], a["in_B"])
            k = self.params["K"]
            return bool(np.allclose(a["out_C"], ref, rtol=1e-4, atol=1e-5 * k))
        if self.name == "jacobi":
            u = a["in_u"]
            for _ in range(self.params["steps"]):
                u = kernels.ref_jacobi(u)
            return bool(np.allclose(a["out_v"], u, rtol=1e-5, atol=1e-6))
        raise ValueError(self.name)


def make(client: Client, lib: Any, name: str, size: int = 0, steps: int = 8) -> Workload:
    """``null`` | ``vadd`` (n) | ``sgemm`` (n x n) | ``jacobi`` (n x n, ``steps`` steps in one graph)."""
    g = client.graph()
    if name == "null":
        g.kernel(lib, "null", grid=1, block=1, args=[])
        return Workload(name, g)
    if name == "vadd":
        n = size or 1 << 16
        a, b, c = (client.array(n) for _ in range(3))
        grid, block = kernels.launch_1d(n)
        g.kernel(lib, "vadd", grid=grid, block=block, args=[g.input(a), g.input(b), g.output(c), n])
        return Workload(name, g, {"in_a": a, "in_b": b, "out_c": c}, {"n": n})
    if name == "sgemm":
        n = size or 256
        A, B, C = (client.array((n, n)) for _ in range(3))
        grid, block = kernels.sgemm_launch(n, n)
        g.kernel(lib, "sgemm", grid=grid, block=block, args=[g.input(A), g.input(B), g.output(C), n, n, n])
        return Workload(name, g, {"in_A": A, "in_B": B, "out_C": C}, {"K": n})
    if name == "jacobi":
        n = size or 256
        u, v = client.array((n, n)), client.array((n, n))
        grid, block = kernels.jacobi_launch(n, n)
        src = g.input(u)
        temps = [g.temp((n, n)), g.temp((n, n))]
        for i in range(steps):
            dst = g.output(v) if i == steps - 1 else temps[i % 2]
            g.kernel(lib, "jacobi2d", grid=grid, block=block, args=[src, dst, n, n])
            src = dst
        return Workload(name, g, {"in_u": u, "out_v": v}, {"steps": steps})
    raise ValueError(f"unknown workload {name!r} (null, vadd, sgemm, jacobi)")
