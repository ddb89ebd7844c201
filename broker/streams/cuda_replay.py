"""CUDA-graph replay: a shape's work on a lane captured once, then launched with one call.

With CUDA graphs on (``cuda_graphs`` / ``KAAS_CUDA_GRAPHS``), from the second run of a shape
each lane captures the copies, scrub, kernels and stage events into a CUDA graph once, and
later runs on that lane replay it with one ``cuGraphLaunch``.  A captured graph holds the
addresses and kernel arguments of the run it was captured from, so before a replay what
changed is updated in place: memcpy nodes pointed at the run's arena slices where they moved
(``cuGraphExecMemcpyNodeSetParams``), kernel nodes given a prepared graph's new literal
values (``cuGraphExecKernelNodeSetParams``, from the argument blocks with the values
written), or, where device addresses moved, the work captured anew into
``cuGraphExecUpdate``.  "auto" replays where the self-check measured it faster (below).

At most ``graph_cache`` instantiated graphs are kept, least recently launched go first.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cuda.bindings import driver

from .. import errors
from .cuda_errors import check, error, is_sticky
from .cuda_lanes import Captured, Lane, enqueue
from .cuda_memory import Arena
from .cuda_plan import Run, Shape, changed_launches, pack_pointers, write_literals

__all__ = ["AUTO", "MODE_NAMES", "OFF", "ON", "Replay", "Replays", "graph_mode"]

# The run of a shape (counted per device) from which a lane captures it: the first runs
# directly, as most shapes are never submitted twice.
_CAPTURE_AT = 2
# "auto" (AUTO_MIN_KERNELS, in cuda_plan where shapes are made), from the self-check's --sweep
# on an H100 (submit+poll p50, ways interleaved): a replay whose addresses still hold beats
# direct launches at every kernel count (null kernel: 15.7 vs 18.2 us; 1 kernel with 1-KiB
# copies: 32.5 vs 34.2; 20 kernels: 64 vs 152).  Re-pointing moved memcpy nodes
# (cuGraphExecMemcpyNodeSetParams) does not pay for itself with one kernel (49.2 vs 45.9 us)
# and does from two on (2: 49.8 vs 51.9; 3: 46.2 vs 53.9; 20: 73 vs 157): "auto" updates
# moved arena slices (and changed bound literals, the same kind of node update) only for
# graphs of at least AUTO_MIN_KERNELS kernels, and runs the others directly.  Moved device
# addresses (a pool allocation elsewhere, a resident put again) need a new capture and
# cuGraphExecUpdate, which costs about what it saves at best (20 kernels: 154 vs 157 us;
# 1 kernel: 89 vs 46): "auto" runs those directly.  The one capture of a shape per lane costs
# a run of 146 us (1 kernel) to 363 us (20 kernels).
_CAPTURE_MODE = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
_MEM_HOST = driver.CUmemorytype.CU_MEMORYTYPE_HOST
_MEM_DEVICE = driver.CUmemorytype.CU_MEMORYTYPE_DEVICE

OFF, AUTO, ON = 0, 1, 2
_MODES = {"0": OFF, "off": OFF, "false": OFF, "1": ON, "on": ON, "true": ON, "auto": AUTO}
MODE_NAMES = {OFF: "off", AUTO: "auto", ON: "on"}


def graph_mode(value: bool | str) -> int:
    """``cuda_graphs`` as one of OFF/AUTO/ON; ``KAAS_CUDA_GRAPHS``, when set, replaces "auto"."""
    if isinstance(value, str) and value == "auto":
        value = os.environ.get("KAAS_CUDA_GRAPHS", "").strip() or "auto"
        where = "KAAS_CUDA_GRAPHS"
    else:
        where = "cuda_graphs"
    if isinstance(value, bool):
        return ON if value else OFF
    mode = _MODES.get(str(value).strip().lower())
    if mode is None:
        raise errors.InternalError(f"{where}={value!r}: expected 0, 1 or auto", detail={"setting": where})
    return mode


@dataclass(eq=False, slots=True)
class _Copy:
    """A memcpy node of a captured graph, with the parameters last set on it."""

    node: Any
    params: Any  # CUDA_MEMCPY3D
    pos: int  # position of its buffer in the shape's arena_buffers
    dev: int  # device offset in the graph's allocation
    to_device: bool


@dataclass(eq=False, slots=True)
class Replay:
    """One shape's work on one lane as an instantiated CUDA graph, and the addresses baked into it.

    The graph holds everything between the start event and the last one (which is recorded
    on the stream after the launch, so that ``poll`` sees it pending at once).
    """

    shape: Shape
    lane: int
    graph: Any  # the captured CUgraph: its nodes name the exec's nodes when updating them
    graph_exec: Any
    copies: tuple[_Copy, ...]  # copy-in nodes, then copy-out nodes
    base: int
    residents: tuple[int, ...]  # resident pointers in the kernels' arguments
    hosts: list[int]  # host pointer per arena buffer
    arenas: list[Arena]  # pinned arenas its copies touch: unpinning one destroys the replay
    lits: bytes  # the bound literal values baked into its kernel nodes (as Run.lits)
    kernels: tuple[Any, ...]  # kernel node per launch (shapes with bound literals only)
    kernel_params: tuple[Any, ...]  # CUDA_KERNEL_NODE_PARAMS per launch, reading the shape's blocks


def _memcpy_params(host: int, dev: int, nbytes: int, to_device: bool) -> Any:
    p = driver.CUDA_MEMCPY3D()
    if to_device:
        p.srcMemoryType = _MEM_HOST
        p.srcHost = host
        p.dstMemoryType = _MEM_DEVICE
        p.dstDevice = dev
    else:
        p.srcMemoryType = _MEM_DEVICE
        p.srcDevice = dev
        p.dstMemoryType = _MEM_HOST
        p.dstHost = host
    p.WidthInBytes = nbytes
    p.Height = 1
    p.Depth = 1
    return p


def _kernel_params(shape: Shape) -> tuple[Any, ...]:
    """Per launch, node parameters that read its arguments from its block (as cuLaunchKernel does)."""
    out = []
    for ln in shape.launches:
        p = driver.CUDA_KERNEL_NODE_PARAMS()
        p.func = ln.function
        p.gridDimX, p.gridDimY, p.gridDimZ = ln.grid
        p.blockDimX, p.blockDimY, p.blockDimZ = ln.block
        p.sharedMemBytes = ln.shared
        p.kernelParams = ln.params
        p.extra = 0
        out.append(p)
    return tuple(out)


class Replays:
    """The instantiated CUDA graphs of one backend, least recently launched first.

    ``alive()`` is False once the context is poisoned or closed: graphs are then left to the
    process's exit instead of destroyed.
    """

    def __init__(self, context: Any, mode: int, graph_cache: int, alive: Callable[[], bool]) -> None:
        self.mode = mode
        self.graph_cache = max(0, graph_cache)
        # How a replay takes new host pointers: "nodes" (set the memcpy nodes that changed) or
        # "capture" (capture the work again and cuGraphExecUpdate); the self-check compares them.
        self.update = "nodes"
        self.stats = dict.fromkeys(
            ("direct", "captures", "replays", "node_updates", "kernel_updates", "exec_updates",
             "capture_failures", "update_failures", "evicted"), 0)
        self.context = context  # the CUDA context the memcpy nodes are set in
        self._alive = alive
        # Every live Replay, least recently launched first; each is also in its shape's replays.
        self.replays: collections.OrderedDict[Replay, None] = collections.OrderedDict()

    def launch(self, run: Run, lane: Lane, base: int) -> bool:
        """Replay (or capture, from the shape's _CAPTURE_AT-th run) the run's work on ``lane``.

        False when the caller is to enqueue it directly instead.
        """
        shape = run.shape
        rp = shape.replays.get(lane.index)
        if rp is not None:
            return self._replay(run, rp, base, self.mode == ON)
        if shape.starts >= _CAPTURE_AT and self.graph_cache:
            return self._capture(run, lane, base)
        return False

    def _capture(self, run: Run, lane: Lane, base: int) -> bool:
        """Capture the graph's work on ``lane`` as a CUDA graph, keep it and launch it.

        False when the work cannot be captured: it is then enqueued directly, which reports
        whatever made the capture fail.
        """
        shape = run.shape
        captured = self._record_graph(run, lane, base)
        if captured is None:
            return False
        graph, nodes = captured
        res = driver.cuGraphInstantiate(graph, 0)
        if res[0]:
            driver.cuGraphDestroy(graph)
            self._capture_failed(shape, error(res[0], "cuGraphInstantiate"))
            return False
        n_in = len(shape.copy_in)
        hosts = run.hosts
        copies = tuple(
            _Copy(node, _memcpy_params(hosts[pos], base + dev, nbytes, i < n_in), pos, dev, i < n_in)
            for i, (node, (pos, dev, nbytes)) in enumerate(
                zip(nodes.copies, shape.copy_in + shape.copy_out, strict=True)))
        kernels = tuple(nodes.kernels)
        rp = Replay(shape, lane.index, graph, res[1], copies, base, run.resident_ptrs, hosts, run.arenas,
                    run.lits, kernels, _kernel_params(shape) if kernels else ())
        shape.replays[lane.index] = rp
        self.replays[rp] = None
        while len(self.replays) > self.graph_cache:  # rp itself is the most recent
            self.destroy(next(iter(self.replays)))
            self.stats["evicted"] += 1
        self._launch_replay(rp, lane)
        self.stats["captures"] += 1
        return True

    def _record_graph(self, run: Run, lane: Lane, base: int) -> tuple[Any, Captured] | None:
        """The graph's work captured from ``lane``'s stream, and its nodes; None if it failed."""
        s = lane.stream
        check(driver.cuStreamBeginCapture(s, _CAPTURE_MODE), "cuStreamBeginCapture")
        nodes = Captured()
        try:
            enqueue(run, lane, base, nodes)
        except BaseException as exc:
            res = driver.cuStreamEndCapture(s)
            if not res[0] and res[1] is not None and int(res[1]):
                driver.cuGraphDestroy(res[1])
            if not isinstance(exc, errors.KaasError):
                raise
            self._capture_failed(run.shape, exc)
            return None
        res = driver.cuStreamEndCapture(s)
        if res[0]:
            self._capture_failed(run.shape, error(res[0], "cuStreamEndCapture"))
            return None
        return res[1], nodes

    def _capture_failed(self, shape: Shape, exc: errors.KaasError) -> None:
        """A sticky error goes on; any other makes the shape run directly from now on."""
        if is_sticky(exc):
            raise exc
        self.stats["capture_failures"] += 1
        self.refuse(shape)

    def refuse(self, shape: Shape) -> None:
        """Launch ``shape`` directly from now on, and forget its graphs."""
        shape.refused = True
        for rp in list(shape.replays.values()):
            self.destroy(rp)

    def _replay(self, run: Run, rp: Replay, base: int, always: bool) -> bool:
        """Launch the lane's instantiated graph of this shape, after updating what moved.

        False when the caller is to enqueue the work directly: the graph could not be
        updated, or (unless ``always``) updating it costs more than it saves (see
        AUTO_MIN_KERNELS); the graph is kept for runs whose addresses hold.
        """
        self.replays.move_to_end(rp)
        if base != rp.base or run.resident_ptrs != rp.residents:
            # Device addresses in kernel arguments moved (a pool allocation, a resident put
            # again): capture anew and update the instantiated graph from that.
            if not always or not self._update_by_capture(run, rp, base):
                return False
        else:
            moved = run.hosts != rp.hosts
            changed = run.lits != rp.lits
            if moved or changed:
                if not always and not rp.shape.auto:
                    return False
                if moved and self.update == "capture":
                    if not self._update_by_capture(run, rp, base):  # takes the literals too
                        return False
                elif (moved and not self._update_nodes(run, rp)) or (
                        changed and not self._update_kernels(run, rp, base)):
                    return False
        lane = run.lane
        assert lane is not None
        self._launch_replay(rp, lane)
        self.stats["replays"] += 1
        return True

    def _launch_replay(self, rp: Replay, lane: Lane) -> None:
        s = lane.stream
        check(driver.cuGraphLaunch(rp.graph_exec, s), f"cuGraphLaunch (a graph of {len(rp.shape.launches)} kernel(s))")
        # Recorded on the stream, not in the graph: pending from now on, whatever poll asks.
        err = driver.cuEventRecord(lane.events[rp.shape.end], s)[0]
        if err:
            raise error(err, "cuEventRecord")

    def _update_nodes(self, run: Run, rp: Replay) -> bool:
        """Point the memcpy nodes whose arena slice changed at the new host memory."""
        hosts = run.hosts
        old = rp.hosts
        set_params = driver.cuGraphExecMemcpyNodeSetParams
        ctx = self.context
        for c in rp.copies:
            host = hosts[c.pos]
            if host == old[c.pos]:
                continue
            if c.to_device:
                c.params.srcHost = host
            else:
                c.params.dstHost = host
            err = set_params(rp.graph_exec, c.node, c.params, ctx)[0]
            if err:
                self._update_failed(rp, error(err, "cuGraphExecMemcpyNodeSetParams"))
                return False
        rp.hosts = hosts
        rp.arenas = run.arenas
        self.stats["node_updates"] += 1
        return True

    def _update_kernels(self, run: Run, rp: Replay, base: int) -> bool:
        """Give the kernel nodes whose bound literals changed the run's values.

        The node parameters are read from the shape's argument blocks, so those first get the
        run's literals and this replay's pointers (another lane may have packed its own).
        """
        shape = rp.shape
        if base != shape.packed_base or run.resident_ptrs != shape.packed_residents:
            pack_pointers(shape, base, run.resident_ptrs)
        write_literals(shape, run.lits)
        set_params = driver.cuGraphExecKernelNodeSetParams
        for i in changed_launches(shape, rp.lits, run.lits):
            err = set_params(rp.graph_exec, rp.kernels[i], rp.kernel_params[i])[0]
            if err:
                self._update_failed(rp, error(err, "cuGraphExecKernelNodeSetParams"))
                return False
        rp.lits = run.lits
        self.stats["kernel_updates"] += 1
        return True

    def _update_by_capture(self, run: Run, rp: Replay, base: int) -> bool:
        """Capture the work again and update the instantiated graph with it (cuGraphExecUpdate)."""
        lane = run.lane
        assert lane is not None
        captured = self._record_graph(run, lane, base)  # refuses the shape (and so rp) on failure
        if captured is None:
            return False
        graph, _ = captured
        res = driver.cuGraphExecUpdate(rp.graph_exec, graph)
        driver.cuGraphDestroy(graph)
        if res[0]:
            self._update_failed(rp, error(res[0], "cuGraphExecUpdate"))
            return False
        # The nodes named at instantiation stay the ones to set; keep their parameters whole.
        hosts = run.hosts
        for c in rp.copies:
            if c.to_device:
                c.params.srcHost = hosts[c.pos]
                c.params.dstDevice = base + c.dev
            else:
                c.params.dstHost = hosts[c.pos]
                c.params.srcDevice = base + c.dev
        rp.base = base
        rp.residents = run.resident_ptrs
        rp.hosts = hosts
        rp.arenas = run.arenas
        rp.lits = run.lits
        self.stats["exec_updates"] += 1
        return True

    def _update_failed(self, rp: Replay, exc: errors.KaasError) -> None:
        """Drop a graph that would not take new addresses; a shape that fails twice is refused."""
        if is_sticky(exc):
            raise exc
        self.stats["update_failures"] += 1
        self.destroy(rp)
        rp.shape.update_failures += 1
        if rp.shape.update_failures > 1:  # this driver will not update such a graph: stop trying
            self.refuse(rp.shape)

    def destroy(self, rp: Replay) -> None:
        """Forget ``rp`` (a no-op when gone already); a graph still running is freed by the driver
        once it finishes."""
        if rp.shape.replays.get(rp.lane) is rp:
            del rp.shape.replays[rp.lane]
        if rp not in self.replays:
            return
        del self.replays[rp]
        if self._alive():
            driver.cuGraphExecDestroy(rp.graph_exec)
            driver.cuGraphDestroy(rp.graph)

    def retire(self, shape: Shape) -> None:
        """``shape`` runs no more after the runs it has: launched directly, graphs gone once they end."""
        shape.retired = True
        shape.refused = True
        if not shape.users:
            for rp in list(shape.replays.values()):
                self.destroy(rp)

    def forget_arena(self, a: Arena) -> None:
        """Destroy every graph whose copies were made for ``a``: its pages are about to go."""
        for rp in [rp for rp in self.replays if any(x is a for x in rp.arenas)]:
            self.destroy(rp)

    def close(self, *, destroy: bool) -> None:
        """Forget every graph (destroying them when ``destroy``: the context is still usable)."""
        if destroy:
            for rp in self.replays:
                driver.cuGraphExecDestroy(rp.graph_exec)
                driver.cuGraphDestroy(rp.graph)
        for rp in self.replays:
            rp.shape.replays.clear()
        self.replays.clear()
