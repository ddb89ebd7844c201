"""Workloads shared by the demo and the benchmarks: the work as data, graphs, fresh inputs, numpy checks.

A workload is first a ``Plan``: its buffers and its kernel launches as plain data, so that
kaas (a tenantlib graph, ``to_graph``) and the baselines that launch the same kernels
themselves (``bench.baselines``) run exactly the same work.  ``parse("sgemm:1024")`` gives
one; ``make`` keeps the demo's one-call form (a ready graph over arena arrays).

Checks compare against numpy.  Large outputs are checked on a band of rows
(``check_rows``): ``prepare_check`` draws fresh inputs for the rows that band depends on and
poisons its outputs, so a check passes only if the run after it wrote those rows from the
new inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tenantlib import Client, Graph, Resident, kernels

__all__ = ["NAMES", "BufferPlan", "Plan", "Step", "Workload", "build", "check_rows", "make", "materialize", "parse", "plan_for",
           "prepare_check", "to_graph", "verify"]

NAMES = ("null", "vadd", "sgemm", "jacobi", "mlp")
CHECK_BAND = 16  # rows a check looks at when the output has more than FULL_CHECK_ROWS
FULL_CHECK_ROWS = 64
MLP_WIDTH = 1024
MLP_LAYERS = 4

Dim3 = tuple[int, int, int]


@dataclass(frozen=True)
class BufferPlan:
    """One float32 buffer of a workload: ``in`` / ``out`` (host arrays), ``temp`` or ``resident``."""

    name: str
    kind: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return 4 * math.prod(self.shape)


@dataclass(frozen=True)
class Step:
    """One kernel launch; in ``args`` a str names a buffer of the plan, a number is a literal."""

    kernel: str
    grid: Dim3
    block: Dim3
    args: tuple[str | int | float, ...]


@dataclass(frozen=True)
class Plan:
    """A workload as data: the same buffers and launches however it is run.

    ``rows_in`` / ``rows_out`` name the input and output whose rows a check samples (empty:
    the whole output is always checked); output row ``r`` depends on input rows
    ``r - halo .. r + halo`` (and on every other input whole).
    """

    name: str
    spec: str
    buffers: tuple[BufferPlan, ...]
    steps: tuple[Step, ...]
    params: Mapping[str, int] = field(default_factory=dict)
    rows_in: str = ""
    rows_out: str = ""
    halo: int = 0

    def buffer(self, name: str) -> BufferPlan:
        for b in self.buffers:
            if b.name == name:
                return b
        raise KeyError(f"workload {self.spec} has no buffer {name!r}")

    def of(self, *kinds: str) -> tuple[BufferPlan, ...]:
        return tuple(b for b in self.buffers if b.kind in kinds)

    def nbytes(self, *kinds: str) -> int:
        """Bytes of the buffers of these kinds (all kinds when none are named)."""
        return sum(b.nbytes for b in self.buffers if not kinds or b.kind in kinds)


# -- plans ----------------------------------------------------------------------------------
def plan_for(name: str, size: int = 0, steps: int = 0, width: int = 0) -> Plan:
    """``null`` | ``vadd`` (n) | ``sgemm`` (n x n) | ``jacobi`` (n x n, ``steps`` in one graph, default 8) |
    ``mlp`` (batch ``size``, default 32; ``steps`` layers of sgemm + bias_relu, default 4; ``width`` 1024)."""
    if name == "null":
        return Plan("null", "null", (), (Step("null", (1, 1, 1), (1, 1, 1), ()),))
    if name == "vadd":
        n = size or 1 << 16
        grid, block = kernels.launch_1d(n)
        bufs = (BufferPlan("in_a", "in", (n,)), BufferPlan("in_b", "in", (n,)), BufferPlan("out_c", "out", (n,)))
        return Plan("vadd", f"vadd:{n}", bufs, (Step("vadd", grid, block, ("in_a", "in_b", "out_c", n)),), {"n": n})
    if name == "sgemm":
        n = size or 256
        grid, block = kernels.sgemm_launch(n, n)
        bufs = (BufferPlan("in_A", "in", (n, n)), BufferPlan("in_B", "in", (n, n)), BufferPlan("out_C", "out", (n, n)))
        return Plan("sgemm", f"sgemm:{n}", bufs, (Step("sgemm", grid, block, ("in_A", "in_B", "out_C", n, n, n)),),
                    {"n": n, "K": n}, rows_in="in_A", rows_out="out_C")
    if name == "jacobi":
        n, k = size or 256, steps or 8
        grid, block = kernels.jacobi_launch(n, n)
        temps = [f"t{i}" for i in range(min(2, k - 1))]
        grids = [BufferPlan("in_u", "in", (n, n)), BufferPlan("out_v", "out", (n, n))]
        grids += [BufferPlan(t, "temp", (n, n)) for t in temps]
        src, chain = "in_u", []
        for i in range(k):
            dst = "out_v" if i == k - 1 else temps[i % 2]
            chain.append(Step("jacobi2d", grid, block, (src, dst, n, n)))
            src = dst
        return Plan("jacobi", f"jacobi:{n}:{k}", tuple(grids), tuple(chain), {"n": n, "steps": k},
                    rows_in="in_u", rows_out="out_v", halo=k)
    if name == "mlp":
        batch, layers, w = size or 32, steps or MLP_LAYERS, width or MLP_WIDTH
        mm_grid, mm_block = kernels.sgemm_launch(batch, w)
        ew_grid, ew_block = kernels.launch_1d(batch * w)
        net = [BufferPlan("in_x", "in", (batch, w)), BufferPlan("out_y", "out", (batch, w)),
               BufferPlan("z", "temp", (batch, w))]
        acts = [f"a{i}" for i in range(min(2, layers - 1))]
        net += [BufferPlan(a, "temp", (batch, w)) for a in acts]
        chain = []
        src = "in_x"
        for i in range(layers):
            net += [BufferPlan(f"w{i}", "resident", (w, w)), BufferPlan(f"b{i}", "resident", (w,))]
            dst = "out_y" if i == layers - 1 else acts[i % 2]
            chain.append(Step("sgemm", mm_grid, mm_block, (src, f"w{i}", "z", batch, w, w)))
            chain.append(Step("bias_relu", ew_grid, ew_block, ("z", f"b{i}", dst, batch, w)))
            src = dst
        spec = f"mlp:{batch}:{layers}" + (f":{w}" if w != MLP_WIDTH else "")
        return Plan("mlp", spec, tuple(net), tuple(chain), {"batch": batch, "layers": layers, "width": w},
                    rows_in="in_x", rows_out="out_y")
    raise ValueError(f"unknown workload {name!r} ({', '.join(NAMES)})")


def parse(spec: str) -> Plan:
    """A plan from ``name[:size[:steps[:width]]]``: ``null``, ``sgemm:4096``, ``jacobi:1024:16``, ``mlp:32:4``."""
    name, *rest = spec.strip().split(":")
    if name not in NAMES:
        raise ValueError(f"unknown workload {name!r} in {spec!r} (one of {', '.join(NAMES)})")
    limit = {"null": 0, "vadd": 1, "sgemm": 1, "jacobi": 2, "mlp": 3}[name]
    if len(rest) > limit:
        raise ValueError(f"workload {spec!r}: {name} takes at most {limit} number(s) after its name")
    try:
        nums = [int(x) for x in rest]
    except ValueError:
        raise ValueError(f"workload {spec!r}: sizes must be whole numbers") from None
    if any(x < 1 for x in nums):
        raise ValueError(f"workload {spec!r}: sizes must be at least 1")
    if name == "jacobi" and nums and nums[0] < 3:
        raise ValueError(f"workload {spec!r}: a jacobi grid needs at least 3 x 3 points")
    return plan_for(name, *nums)


# -- host data ------------------------------------------------------------------------------
def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def _fill_normal(rng: np.random.Generator, out: np.ndarray) -> None:
    if out.flags.c_contiguous and out.dtype == np.float32:
        rng.standard_normal(dtype=np.float32, out=out)  # in place: no 64 MiB temporary for sgemm:4096
    else:
        out[...] = _normal(rng, out.shape)


def materialize(plan: Plan, alloc: Callable[[tuple[int, ...]], np.ndarray],
                rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Host arrays of every ``in``, ``out`` and ``resident`` buffer, each from ``alloc(shape)``
    (float32: arena or pinned memory; a resident's host copy is what gets uploaded once).

    Inputs are drawn from ``rng``, outputs poisoned (NaN); mlp weights are He-scaled so that
    activations stay near 1 through the layers.
    """
    values: dict[str, np.ndarray] = {}
    for b in plan.buffers:
        if b.kind == "temp":
            continue
        arr = values[b.name] = alloc(b.shape)
        if b.kind == "in":
            _fill_normal(rng, arr)
        elif b.kind == "out":
            arr[...] = np.nan
        else:
            _fill_normal(rng, arr)
            arr *= np.float32(math.sqrt(2.0 / b.shape[0]) if len(b.shape) == 2 else 0.1)
    return values


def check_rows(plan: Plan, rng: np.random.Generator, band: int = CHECK_BAND) -> slice | None:
    """The output rows the next check looks at: None (all of it) for small or row-less outputs,
    else a random band of ``band`` rows."""
    if not plan.rows_out:
        return None
    rows = plan.buffer(plan.rows_out).shape[0]
    if rows <= FULL_CHECK_ROWS:
        return None
    r0 = int(rng.integers(0, rows - band + 1))
    return slice(r0, r0 + band)


def prepare_check(plan: Plan, values: Mapping[str, np.ndarray], rng: np.random.Generator,
                  rows: slice | None) -> None:
    """Before a checked run: fresh inputs (only the band's rows of ``rows_in`` when ``rows`` is
    given) and NaN in the outputs the check reads."""
    if rows is None:
        for b in plan.of("in"):
            _fill_normal(rng, values[b.name])
        for b in plan.of("out"):
            values[b.name][...] = np.nan
        return
    _fill_normal(rng, values[plan.rows_in][rows])
    values[plan.rows_out][rows] = np.nan


def _jacobi_rows(u: np.ndarray, steps: int, rows: slice) -> np.ndarray:
    # A band of input rows wide enough that the rows asked for are exact: a wrong row at the
    # band's edge (held fixed instead of updated) spoils one row further in per step.
    n = u.shape[0]
    lo, hi = max(0, rows.start - steps), min(n, rows.stop + steps)
    band = np.asarray(u[lo:hi])
    for _ in range(steps):
        band = kernels.ref_jacobi(band)
    return band[rows.start - lo: rows.stop - lo]


def _mlp(x: np.ndarray, values: Mapping[str, np.ndarray], layers: int) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    for i in range(layers):
        a = np.maximum(a @ values[f"w{i}"].astype(np.float64) + values[f"b{i}"].astype(np.float64), 0.0)
    return a


def verify(plan: Plan, values: Mapping[str, np.ndarray], rows: slice | None = None) -> bool:
    """Do the outputs (the band ``rows`` of ``rows_out``, or all) agree with numpy?"""
    r = slice(None) if rows is None else rows
    if plan.name == "null":
        return True
    if plan.name == "vadd":
        return bool(np.array_equal(values["out_c"], kernels.ref_vadd(values["in_a"], values["in_b"])))
    if plan.name == "sgemm":
        ref = kernels.ref_sgemm(values["in_A"][r], values["in_B"])
        return bool(np.allclose(values["out_C"][r], ref, rtol=1e-4, atol=1e-5 * plan.params["K"]))
    if plan.name == "jacobi":
        u, steps = values["in_u"], plan.params["steps"]
        if rows is None:
            ref = np.asarray(u)
            for _ in range(steps):
                ref = kernels.ref_jacobi(ref)
        else:
            ref = _jacobi_rows(u, steps, rows)
        return bool(np.allclose(values["out_v"][r], ref, rtol=1e-5, atol=1e-5))
    if plan.name == "mlp":
        ref = _mlp(values["in_x"][r], values, plan.params["layers"])
        return bool(np.allclose(values["out_y"][r], ref, rtol=1e-3, atol=1e-3))
    raise ValueError(plan.name)


# -- kaas graphs ----------------------------------------------------------------------------
def to_graph(client: Client, lib: Any, plan: Plan, values: Mapping[str, np.ndarray],
             residents: Mapping[str, Resident]) -> Graph:
    """The plan as a tenantlib graph over ``values`` (arena arrays) and ``residents``."""
    g = client.graph()
    refs: dict[str, Any] = {}
    for b in plan.buffers:
        if b.kind == "in":
            refs[b.name] = g.input(values[b.name])
        elif b.kind == "out":
            refs[b.name] = g.output(values[b.name])
        elif b.kind == "temp":
            refs[b.name] = g.temp(b.shape)
        else:
            refs[b.name] = g.resident(residents[b.name])
    for s in plan.steps:
        g.kernel(lib, s.kernel, grid=s.grid, block=s.block,
                 args=[refs[a] if isinstance(a, str) else a for a in s.args])
    return g


def build(client: Client, lib: Any, plan: Plan,
          rng: np.random.Generator) -> tuple[Graph, dict[str, np.ndarray], dict[str, Resident]]:
    """Arena arrays (drawn from ``rng``), residents put once, and the plan's graph over them."""
    values = materialize(plan, lambda shape: client.array(shape), rng)
    residents = {b.name: client.resident(values[b.name]) for b in plan.of("resident")}
    return to_graph(client, lib, plan, values, residents), values, residents


@dataclass
class Workload:
    """A ready graph over arena arrays; ``refresh`` draws new inputs, ``check`` verifies outputs."""

    name: str
    graph: Graph
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    plan: Plan | None = None

    def refresh(self, rng: np.random.Generator) -> None:
        if self.plan is not None:
            prepare_check(self.plan, self.arrays, rng, None)

    def check(self) -> bool:
        return self.plan is None or verify(self.plan, self.arrays)


def make(client: Client, lib: Any, name: str, size: int = 0, steps: int = 8) -> Workload:
    """``null`` | ``vadd`` (n) | ``sgemm`` (n x n) | ``jacobi`` (n x n, ``steps`` steps in one graph) | ``mlp``
    (batch ``size``); inputs drawn from a fixed seed until ``refresh``."""
    plan = plan_for(name, size, steps if name == "jacobi" else 0)
    graph, values, _ = build(client, lib, plan, np.random.default_rng(0))
    return Workload(name, graph, values, dict(plan.params), plan)
