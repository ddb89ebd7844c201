"""Stream lanes of the CUDA backend: enqueueing one graph's work, and timing its stages.

A lane is a non-blocking stream with four stage events that runs one graph at a time.
``enqueue`` puts the whole graph on it without waiting: the scrub and the copies in from the
pinned arena, the kernels in order, the copies out into the arena.  Events between the stages
give the timings, recorded only where a stage exists (a graph without outputs has no copy-out
event, its ``copy_out`` is 0.0); the backend asks the last one (``cuEventQuery``) whether the
graph is done, so completion costs no thread and no callback.

The same ``enqueue`` runs while the stream is being captured into a CUDA graph: stage events
then become event-record nodes and the nodes a replay updates are collected (``Captured``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cuda.bindings import driver

from .. import errors
from .cuda_errors import check, error
from .cuda_memory import mib
from .cuda_plan import Run, pack_pointers, write_literals

if TYPE_CHECKING:
    from .cuda_replay import Replays

__all__ = ["Captured", "Lane", "captured_node", "destroy_lane", "enqueue", "new_lane", "record", "stage_times", "start"]

_RECORD_EXTERNAL = int(driver.CUevent_record_flags.CU_EVENT_RECORD_EXTERNAL)


@dataclass(eq=False, slots=True)
class Lane:
    """A non-blocking stream and the four stage events of the one graph it runs at a time."""

    index: int
    stream: Any
    events: tuple[Any, Any, Any, Any]  # start, after copy-in, after kernels, after copy-out
    high: bool
    # Device memory for small graphs, reused by every graph of this lane: stream order makes
    # the reuse safe, and it saves an allocation and a free per graph.  0 until first needed.
    slab: int = 0


@dataclass(eq=False, slots=True)
class Captured:
    """The nodes of a graph being captured that a replay may update later."""

    copies: list[Any] = field(default_factory=list)  # per copy in, then per copy out
    kernels: list[Any] = field(default_factory=list)  # per launch; only for shapes with bound literals


def new_lane(index: int, priority: int, high: bool) -> Lane:
    stream = check(driver.cuStreamCreateWithPriority(
        driver.CUstream_flags.CU_STREAM_NON_BLOCKING, priority), "cuStreamCreateWithPriority")
    events = tuple(check(driver.cuEventCreate(driver.CUevent_flags.CU_EVENT_DEFAULT), "cuEventCreate")
                   for _ in range(4))
    return Lane(index, stream, events, high)  # type: ignore[arg-type]


def destroy_lane(lane: Lane) -> None:
    """Free the lane's slab, events and stream (the context is idle)."""
    if lane.slab:
        driver.cuMemFreeAsync(lane.slab, lane.stream)
        lane.slab = 0
    for e in lane.events:
        driver.cuEventDestroy(e)
    driver.cuStreamDestroy(lane.stream)


def record(event: Any, stream: Any, capturing: bool) -> None:
    """Record a stage event; while capturing, as an event-record node of the graph."""
    if capturing:
        err = driver.cuEventRecordWithFlags(event, stream, _RECORD_EXTERNAL)[0]
    else:
        err = driver.cuEventRecord(event, stream)[0]
    if err:
        raise error(err, "cuEventRecord")


def captured_node(stream: Any) -> Any:
    """The node the last call on ``stream`` added to the graph being captured."""
    res = driver.cuStreamGetCaptureInfo(stream)
    if res[0]:
        raise error(res[0], "cuStreamGetCaptureInfo")
    # (status, id, graph, dependencies, [edge data,] count): the dependencies are the one list.
    deps = next((x for x in res[1:] if isinstance(x, (list, tuple))), None)
    if not deps or len(deps) != 1:
        raise errors.InternalError(f"stream capture reported {len(deps or ())} nodes after a call, expected 1")
    return deps[0]


def start(run: Run, lane: Lane, pool: Any, lane_slab: int, graphs: Replays) -> None:
    """Give the run its device memory on ``lane`` and enqueue its work: replayed where ``graphs``
    can, else launched directly.  Raises what failed; the caller reports it."""
    shape = run.shape
    s = lane.stream
    size = shape.size
    small = size <= lane_slab
    if not size:
        base = 0
    elif small and lane.slab:
        base = lane.slab
    else:
        want = lane_slab if small else size
        res = driver.cuMemAllocFromPoolAsync(want, pool, s)
        if res[0]:
            raise error(res[0], f"allocating {mib(want)} of device memory for the graph", bytes=want)
        base = int(res[1])
        if small:
            lane.slab = base
        else:
            run.base = base
    launched = False
    if graphs.mode and shape.launches and not shape.refused:
        launched = graphs.launch(run, lane, base)
    if not launched:
        enqueue(run, lane, base, None)
        graphs.stats["direct"] += 1
    if run.base:
        err = driver.cuMemFreeAsync(run.base, s)[0]
        run.base = 0
        if err:
            raise error(err, "cuMemFreeAsync")


def enqueue(run: Run, lane: Lane, base: int, nodes: Captured | None) -> None:
    """Put the graph's work on the lane's stream (``base``: its device memory).

    With ``nodes`` the stream is being captured: stage events become event-record nodes,
    the last one is left to the caller, and the nodes a replay updates are collected.
    """
    d = driver
    s = lane.stream
    ev = lane.events
    shape = run.shape
    hosts = run.hosts
    capturing = nodes is not None
    end = 4 if nodes is None else shape.end  # the event not to record here
    record(ev[0], s, capturing)
    if shape.copy_in:
        htod = d.cuMemcpyHtoDAsync
        for pos, dev, nbytes in shape.copy_in:
            err = htod(base + dev, hosts[pos], nbytes, s)[0]
            if err:
                raise error(err, "copy-in")
            if nodes is not None:
                nodes.copies.append(captured_node(s))
    zoff, zlen = shape.zero
    if zlen:
        err = d.cuMemsetD8Async(base + zoff, 0, zlen, s)[0]
        if err:
            raise error(err, "scrubbing out/temp buffers")
    if shape.pre and end != 1:
        record(ev[1], s, capturing)
    if shape.launches:
        if base != shape.packed_base or run.resident_ptrs != shape.packed_residents:
            pack_pointers(shape, base, run.resident_ptrs)
        if run.lits != shape.packed_lits:
            write_literals(shape, run.lits)
        kernel_nodes = nodes.kernels if nodes is not None and shape.literals else None
        launch = d.cuLaunchKernel
        for ln in shape.launches:
            g = ln.grid
            bl = ln.block
            err = launch(ln.function, g[0], g[1], g[2], bl[0], bl[1], bl[2], ln.shared, s, ln.params, 0)[0]
            if err:
                raise error(err, f"launching kernel {ln.index} ({ln.name!r}) with grid {g}, block {bl}, "
                                 f"{ln.shared} bytes of shared memory", kernel=ln.name, index=ln.index)
            if kernel_nodes is not None:
                kernel_nodes.append(captured_node(s))
        if end != 2:
            record(ev[2], s, capturing)
    if shape.copy_out:
        dtoh = d.cuMemcpyDtoHAsync
        for pos, dev, nbytes in shape.copy_out:
            err = dtoh(hosts[pos], base + dev, nbytes, s)[0]
            if err:
                raise error(err, "copy-out")
            if nodes is not None:
                nodes.copies.append(captured_node(s))
        if end != 3:
            record(ev[3], s, capturing)


def stage_times(run: Run, lane: Lane) -> tuple[float, float, float]:
    """Seconds of copy-in, kernels and copy-out from the lane's events; a stage the graph lacks is 0.0."""
    ev = lane.events
    shape = run.shape
    elapsed = driver.cuEventElapsedTime
    copy_in = kernels = copy_out = 0.0
    at = 0  # the event the next stage starts at
    if shape.pre:
        copy_in = check(elapsed(ev[0], ev[1]), "cuEventElapsedTime") / 1e3
        at = 1
    if shape.launches:
        kernels = check(elapsed(ev[at], ev[2]), "cuEventElapsedTime") / 1e3
        at = 2
    if shape.copy_out:
        copy_out = check(elapsed(ev[at], ev[3]), "cuEventElapsedTime") / 1e3
    return copy_in, kernels, copy_out
