"""The CUDA device: one GPU driven through ``cuda.bindings.driver`` inside a device worker.

``CudaBackend`` ties together the parts, one module each: the error boundary
(``cuda_errors``: every raw result tuple is checked there), the device (``cuda_device``),
pinned arenas, residents and device memory (``cuda_memory``), libraries and argument packing
(``cuda_modules``), the plan of a graph and the addresses of one run (``cuda_plan``), stream
lanes, enqueueing and stage timing (``cuda_lanes``), CUDA-graph capture and replay
(``cuda_replay``), and the device time charged (``occupancy``).

A graph runs on one *stream lane*, enqueued and never waited on: its buffers in one block of
device memory (the lane's slab, or the pool), ``in``/``inout`` copied in from the arena
page-locked once by ``pin_arena``, ``out``/``temp`` scrubbed, the kernels in order, then
``out``/``inout`` copied back; ``poll`` asks its last stage event whether it is done.  A
kernel that faults leaves the context dead (sticky error): every later copy fails too, so
outputs never reach an arena, and the backend says ``poisoned`` so that the worker exits and
the broker starts a fresh one.  A graph past its deadline cannot be stopped from inside the
process either: it is failed and the backend is poisoned the same way.

A graph's *shape* is planned once: ``submit`` finds it in an LRU cache keyed by the graph's
kernels and buffer kinds and sizes; a *prepared* graph (``prepare``) owns its shape, and each
``run`` binds only its arena slices and literal values.

``Timings.kernels`` is the device time charged: the graph's share of the device while it was
on a lane (``occupancy``), so that the charges of graphs running at once add up to the time
the device was busy.  ``copy_in`` and ``copy_out`` are event-measured, and ``total`` is the
event-measured span of the graph on its lane (copy-in, kernels and copy-out).
"""
from __future__ import annotations

import collections
import mmap
import os
import time
from collections.abc import Sequence
from typing import Any

from cuda.bindings import driver

from .. import errors
from ..protocol import KernelSpec, Timings
from .backend import Backend, Completion
from .compiler import CompileCache
from .cuda_device import facts, retain
from .cuda_errors import NOT_READY, OOM, check, error, graph_fault, guarded, is_sticky, refused_launch
from .cuda_lanes import Lane, destroy_lane, new_lane, stage_times, start
from .cuda_memory import Arena, Resident, alloc, default_pool, map_arena, release_arena, upload_resident
from .cuda_modules import Library, find_function, literal_packer, load_module
from .cuda_plan import Prepared, Run, Shape, bind, cached_shape, new_shape, plan_literals, resolve
from .cuda_replay import MODE_NAMES, Replay, Replays, graph_mode
from .occupancy import OccupancyClock
from .wire import ExecGraph

__all__ = ["CudaBackend"]


class CudaBackend(Backend):
    """One CUDA device, through its primary context, from one thread of a worker process."""

    kind = "cuda"

    def __init__(self, index: int = 0, *, lanes: int = 8, high_lanes: int = 2, lane_slab: int = 4 * 2**20,
                 compile_cache: CompileCache | None = None, cuda_graphs: bool | str = "auto",
                 graph_cache: int = 1024, shape_cache: int = 1024) -> None:
        self.index = index
        # Graphs needing at most this many bytes of device memory use their lane's slab (at
        # most lanes * lane_slab bytes, allocated on first use) instead of the pool; 0: never.
        self.lane_slab = lane_slab
        self.poisoned = False  # a sticky error or a missed deadline: the process must be replaced
        # CUDA graph replay: "on", "off" or "auto"; at most graph_cache instantiated graphs are
        # kept (least recently used go first), shape_cache shapes of submitted graphs.
        self.shape_cache = max(1, shape_cache)
        self._closed = True
        self._context: Any = None
        self._graphs = Replays(None, graph_mode(cuda_graphs), graph_cache, self._alive)
        self._lanes: list[Lane] = []
        self._arenas: dict[int, Arena] = {}
        self._residents: dict[int, Resident] = {}
        self._libraries: dict[str, Library] = {}
        self._shapes: dict[Any, Shape] = {}
        self._prepared: dict[int, Prepared] = {}
        self._clock = 0
        self._occupancy = OccupancyClock()
        self._running: dict[int, Run] = {}  # started on a lane, not yet finished
        # Invariant: a token is in exactly one of _waiting_*, _running, _done until poll returns it.
        self._waiting_high: collections.deque[Run] = collections.deque()
        self._waiting_normal: collections.deque[Run] = collections.deque()
        self._done: list[Completion] = []
        self._tokens: set[int] = set()
        self._free_high: list[Lane] = []
        self._free_normal: list[Lane] = []
        self._compiler = compile_cache or CompileCache()

        self._device, self._context = retain(index)
        self._graphs.context = self._context
        self._closed = False
        try:
            check(driver.cuCtxSetCurrent(self._context), "cuCtxSetCurrent")
            f = facts(self._device)
            self.arch, self.name, self.memory = f.arch, f.name, f.memory
            self.driver_version, self.sm_count = f.driver_version, f.sm_count
            self.shared_optin = f.shared_optin
            self._pool = default_pool(self._device)
            least, greatest = check(driver.cuCtxGetStreamPriorityRange(), "cuCtxGetStreamPriorityRange")
            for i in range(lanes + high_lanes):
                high = i >= lanes
                lane = new_lane(i, greatest if high else least, high)
                self._lanes.append(lane)
                (self._free_high if high else self._free_normal).append(lane)
            if not self._free_normal:
                raise errors.InternalError("a CUDA backend needs at least one normal-priority lane")
        except BaseException:
            self.close()
            raise

    def _alive(self) -> bool:
        return not self.poisoned and not self._closed

    # -- settings and counters of CUDA graph replay (see cuda_replay) ----------------------------
    @property
    def cuda_graphs(self) -> str:
        """CUDA graph replay: "on", "off" or "auto"; settable (as the constructor's argument)."""
        return MODE_NAMES[self._graphs.mode]

    @cuda_graphs.setter
    def cuda_graphs(self, value: bool | str) -> None:
        self._graphs.mode = graph_mode(value)

    @property
    def graph_cache(self) -> int:
        """At most this many instantiated CUDA graphs are kept."""
        return self._graphs.graph_cache

    @property
    def graph_update(self) -> str:
        """How a replay takes moved host pointers: "nodes" or "capture" (the self-check compares them)."""
        return self._graphs.update

    @graph_update.setter
    def graph_update(self, value: str) -> None:
        self._graphs.update = value

    @property
    def graph_stats(self) -> dict[str, int]:
        return self._graphs.stats

    @property
    def _replays(self) -> collections.OrderedDict[Replay, None]:
        return self._graphs.replays

    # -- Backend ------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "cuda", "index": self.index, "arch": self.arch,
                "memory": self.memory, "driver_version": self.driver_version, "sm_count": self.sm_count,
                "lanes": len(self._lanes), "lane_slab": self.lane_slab, "cuda_graphs": self.cuda_graphs}

    @guarded
    def usage(self) -> dict[str, int]:
        """Residents by this worker's count; the graph pool's blocks (lane slabs and large graphs'
        memory, cached after use) by the driver's; and the device's own free / total."""
        attr = driver.CUmemPool_attribute
        used = check(driver.cuMemPoolGetAttribute(self._pool, attr.CU_MEMPOOL_ATTR_USED_MEM_CURRENT), "pool used")
        held = check(driver.cuMemPoolGetAttribute(self._pool, attr.CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT),
                     "pool reserved")
        free, total = check(driver.cuMemGetInfo(), "cuMemGetInfo")
        return {"residents": len(self._residents), "resident_bytes": sum(r.size for r in self._residents.values()),
                "libraries": len(self._libraries), "pool_used": int(used), "pool_reserved": int(held),
                "lane_slabs": sum(1 for ln in self._lanes if ln.slab) * self.lane_slab,
                "device_used": int(total) - int(free), "device_total": int(total)}

    @property
    def busy(self) -> bool:
        return bool(self._running or self._waiting_high or self._waiting_normal or self._done)

    @guarded
    def load_library(self, library: str, fmt: str, data: bytes, kernels: tuple[KernelSpec, ...],
                     options: tuple[str, ...]) -> str:
        self._usable()
        lib = self._libraries.get(library)
        if lib is not None and all(k.name in lib.functions for k in kernels):
            return ""
        log = ""
        fresh = lib is None
        if lib is None:
            module, log = load_module(library, fmt, data, options, self._compiler, self.arch, self.name, kernels)
            lib = Library(module, {}, {}, {})
        try:
            found = {spec.name: find_function(library, lib.module, spec, self.shared_optin)
                     for spec in kernels if spec.name not in lib.functions}
        except BaseException:
            if fresh:
                driver.cuModuleUnload(lib.module)
            raise
        for spec in kernels:
            if spec.name in found:
                lib.functions[spec.name] = found[spec.name]
                lib.specs[spec.name] = spec
                lib.packers[spec.name] = literal_packer(tuple(p.kind for p in spec.params))
        self._libraries[library] = lib
        return log

    @property
    def compile_arch(self) -> str:
        # CUDA C compiles off the loop (``precompile``), so a tenant registering libraries does not
        # stall the lanes of everyone else on this device.
        return self.arch

    @guarded
    def unload_library(self, library: str) -> None:
        lib = self._libraries.get(library)
        if lib is None:
            return
        for p in self._prepared.values():
            if any(k.library == library for k in p.graph.kernels):
                raise errors.InternalError(f"library {library[:12]} is still used by prepared graph {p.handle}")
        for key, shape in list(self._shapes.items()):
            if any(k.library == library for k in key[0]):
                if shape.users:
                    raise errors.InternalError(f"library {library[:12]} is still used by a graph in flight")
                del self._shapes[key]
                for rp in list(shape.replays.values()):
                    self._graphs.destroy(rp)
        del self._libraries[library]
        check(driver.cuModuleUnload(lib.module), f"cuModuleUnload (library {library[:12]})")

    @guarded
    def pin_arena(self, arena: int, fd: int, size: int) -> None:
        try:
            self._usable()
            if arena in self._arenas:
                raise errors.InternalError(f"arena {arena} is already pinned on {self.name}")
            if size <= 0:
                raise errors.InvalidArena(f"cannot pin an arena of {size} bytes")
            try:
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError) as exc:
                raise errors.InvalidArena(f"cannot map arena of {size} bytes: {exc}") from None
        finally:
            os.close(fd)
        self._arenas[arena] = map_arena(arena, mm, size)

    @guarded
    def unpin_arena(self, arena: int) -> None:
        a = self._arenas.get(arena)
        if a is None:
            return
        if a.users:
            raise errors.InternalError(f"arena {arena} is still used by {a.users} graph(s) in flight")
        del self._arenas[arena]
        self._graphs.forget_arena(a)
        release_arena(a, unregister=True)

    @guarded
    def put_resident(self, resident: int, fd: int, size: int) -> None:
        try:
            self._usable()
            old = self._residents.get(resident)
            if old is not None and old.size == size:
                return  # content-addressed: the same id is the same bytes
            if old is not None:
                raise errors.InternalError(f"resident {resident} is already on {self.name} with another size")
            if size <= 0:
                raise errors.InvalidArgument(f"cannot make a resident buffer of {size} bytes")
            try:
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            except (OSError, ValueError) as exc:
                raise errors.InvalidArgument(f"cannot map resident host copy of {size} bytes: {exc}") from None
        finally:
            os.close(fd)
        try:
            self._residents[resident] = upload_resident(resident, mm, size, self._pool, self.name)
        finally:
            mm.close()

    def _alloc(self, size: int, what: str) -> int:
        return alloc(size, what, self._pool, self.name)

    @guarded
    def evict_resident(self, resident: int) -> None:
        r = self._residents.get(resident)
        if r is None:
            return
        if r.users:
            raise errors.InternalError(f"resident {resident} is still used by {r.users} graph(s) in flight")
        del self._residents[resident]
        check(driver.cuMemFree(r.ptr), f"freeing resident {resident}")

    @guarded
    def submit(self, token: int, graph: ExecGraph, deadline: float, priority: int) -> None:
        """Queue ``graph``; raises only when it is refused up front (then no Completion follows).

        Once ``submit`` returns, exactly one Completion for ``token`` comes out of ``poll``:
        launch errors and faults arrive there too.
        """
        if self._closed or self.poisoned:
            self._usable()
        if token in self._tokens:
            raise errors.InternalError(f"token {token} is already in flight")
        self._clock += 1
        shape, evicted = cached_shape(self._shapes, graph, self._clock, self.shape_cache, self._libraries, self.name)
        for old in evicted:
            for rp in list(old.replays.values()):
                self._graphs.destroy(rp)
        self._queue(resolve(token, graph, shape, deadline, priority > 0, self._arenas, self._residents, self.name))

    # -- prepared graphs ----------------------------------------------------------------------
    @guarded
    def prepare(self, handle: int, graph: ExecGraph, literals: tuple[tuple[int, int], ...]) -> None:
        """Plan the template once (see ``Backend.prepare``); re-preparing ``handle`` retires its old plan."""
        self._usable()
        shape = new_shape(graph, self._libraries, self.name)
        plan_literals(shape, literals, self._libraries)
        nbytes = tuple(graph.buffers[i].nbytes for i in shape.arena_buffers)
        old = self._prepared.get(handle)
        self._prepared[handle] = Prepared(handle, graph, shape, nbytes)
        if old is not None:
            self._graphs.retire(old.shape)

    @guarded
    def release(self, handle: int) -> None:
        p = self._prepared.pop(handle, None)
        if p is not None:
            self._graphs.retire(p.shape)  # its graphs go once the runs it has are done

    @guarded
    def run(self, token: int, handle: int, slices: Sequence[int], values: Sequence[int | float],
            deadline: float, priority: int) -> None:
        """Start prepared graph ``handle`` with its bindings (see ``Backend.run``).

        Refused up front (no Completion follows): an unknown handle, a binding outside its
        arena or a wrong count of bindings (InternalError: the broker checks them), and a
        value that does not fit its parameter's type (ArgumentError, raised here rather than
        carried by the Completion, since no device work is involved yet).
        """
        if self._closed or self.poisoned:
            self._usable()
        if token in self._tokens:
            raise errors.InternalError(f"token {token} is already in flight")
        p = self._prepared.get(handle)
        if p is None:
            raise errors.InternalError(f"prepared graph {handle} is not on {self.name}")
        self._queue(bind(token, p, slices, values, deadline, priority > 0, self._arenas, self._residents, self.name))

    # -- running ------------------------------------------------------------------------------
    def _queue(self, run: Run) -> None:
        for a in run.arenas:
            a.users += 1
        for r in run.residents:
            r.users += 1
        run.shape.users += 1
        self._tokens.add(run.token)
        if run.high:
            self._waiting_high.append(run)
        else:
            self._waiting_normal.append(run)
        self._pump()

    def _pump(self) -> None:
        """Start waiting graphs on free lanes: high priority first, on a high lane if one is free."""
        while self._waiting_high and (self._free_high or self._free_normal):
            lane = self._free_high.pop() if self._free_high else self._free_normal.pop()
            self._start(self._waiting_high.popleft(), lane)
        while self._waiting_normal and self._free_normal:
            self._start(self._waiting_normal.popleft(), self._free_normal.pop())

    def _start(self, run: Run, lane: Lane) -> None:
        """Enqueue the whole graph on ``lane``; a failure becomes the graph's Completion."""
        run.lane = lane
        run.started = time.perf_counter()
        run.mark = self._occupancy.start(run.started)
        run.shape.starts += 1
        try:
            start(run, lane, self._pool, self.lane_slab, self._graphs)
        except errors.KaasError as exc:
            self._abort(run, exc)
            return
        self._running[run.token] = run

    # -- completion -----------------------------------------------------------------------------
    def _abort(self, run: Run, exc: errors.KaasError) -> None:
        """A graph failed while being enqueued: nothing was copied out; free, drain the lane, report."""
        if is_sticky(exc):
            self.poisoned = True
        elif exc.detail.get("cuda_error") != OOM:
            self._graphs.refuse(run.shape)  # whatever failed is reported by direct launches from now on
        exc = refused_launch(exc)
        if self.poisoned:  # an earlier graph's fault surfaced while this one was enqueued
            for key, value in run.names().items():
                exc.detail.setdefault(key, value)
        lane = run.lane
        assert lane is not None
        if run.base:
            driver.cuMemFreeAsync(run.base, lane.stream)
            run.base = 0
        if not self.poisoned:
            # The copies already enqueued read the arena: it stays in use until they are done.
            res = driver.cuStreamSynchronize(lane.stream)
            if res[0] and is_sticky(error(res[0])):
                self.poisoned = True
        self._finish(run, Completion(run.token, error=exc), free_lane=not self.poisoned)

    def _charge(self, run: Run, now: float) -> float:
        """The device time charged to ``run``, seen done at ``now`` (see ``occupancy``)."""
        if run.mark < 0:
            return 0.0
        charge = self._occupancy.finish(now, run.mark)
        run.mark = -1.0
        return charge

    def _finish(self, run: Run, completion: Completion, *, free_lane: bool) -> None:
        self._charge(run, time.perf_counter())
        self._running.pop(run.token, None)
        self._tokens.discard(run.token)
        self._done.append(completion)
        self._drop(run)
        if free_lane:
            for a in run.arenas:
                a.users -= 1
            for r in run.residents:
                r.users -= 1
            lane = run.lane
            if lane is not None:
                (self._free_high if lane.high else self._free_normal).append(lane)

    def _drop(self, run: Run) -> None:
        """``run`` no longer uses its shape: a retired shape's graphs go with its last run."""
        shape = run.shape
        shape.users -= 1
        if shape.retired and not shape.users:
            self._graphs.retire(shape)

    @guarded
    def poll(self) -> list[Completion]:
        if self._running:
            now = time.perf_counter()
            query = driver.cuEventQuery
            in_flight = len(self._running)
            for run in list(self._running.values()):
                lane = run.lane
                assert lane is not None
                err = query(lane.events[run.shape.end])[0]
                if not err:
                    self._finish(run, Completion(run.token, timings=self._timings(run, lane, now)), free_lane=True)
                elif err == NOT_READY:
                    if run.deadline > 0 and now - run.started > run.deadline:
                        self._expire(run, now)
                else:
                    self._fault(run, err, in_flight)
            if self.poisoned:
                self._fail_waiting()
        if self._waiting_high or self._waiting_normal:
            self._pump()
        done = self._done
        self._done = []
        return done

    def _timings(self, run: Run, lane: Lane, now: float) -> Timings:
        """The occupancy charge as ``kernels``; the event-measured stages for the rest."""
        copy_in, kernels, copy_out = stage_times(run, lane)
        return Timings(queued=run.started - run.submitted, copy_in=copy_in, kernels=self._charge(run, now),
                       copy_out=copy_out, total=copy_in + kernels + copy_out)

    def _fault(self, run: Run, err: Any, in_flight: int) -> None:
        """A graph's last event reports an error: a kernel faulted (ours, or a neighbour's: see below)."""
        exc = graph_fault(err, f"graph of {len(run.shape.kernels)} kernel(s)", run.names(), in_flight)
        if is_sticky(exc):
            self.poisoned = True
        else:
            self._graphs.refuse(run.shape)
        self._finish(run, Completion(run.token, error=exc), free_lane=not self.poisoned)

    def _expire(self, run: Run, now: float) -> None:
        """Past its deadline: the kernel cannot be stopped here, so fail it and poison the backend."""
        self.poisoned = True
        err = errors.DeadlineExceeded(
            f"graph did not finish within its deadline of {run.deadline:.3f} s of device time "
            f"(running for {now - run.started:.3f} s); the device worker must be restarted",
            detail={"deadline": run.deadline, **run.names()})
        self._finish(run, Completion(run.token, error=err), free_lane=False)

    def _fail_waiting(self) -> None:
        """Graphs that never started cannot run in a poisoned process; they are safe to replay."""
        for queue in (self._waiting_high, self._waiting_normal):
            while queue:
                run = queue.popleft()
                self._tokens.discard(run.token)
                self._drop(run)
                self._done.append(Completion(run.token, error=errors.WorkerLost(
                    f"graph not started: the device worker on {self.name} must be restarted",
                    detail={"started": False})))

    def _usable(self) -> None:
        if self._closed:
            raise errors.InternalError(f"the CUDA backend of device {self.index} is closed")
        if self.poisoned:
            raise errors.DeviceError(
                f"device worker for {self.name} hit a fatal CUDA error and must be restarted",
                detail={"poisoned": True})

    def close(self) -> None:
        """Release every resource; idempotent.  A poisoned context is left to the process's exit."""
        if self._closed:
            return
        self._closed = True
        live = not self.poisoned and self._context is not None
        if live:
            driver.cuCtxSynchronize()  # nothing may still copy into arenas about to be unmapped
        self._graphs.close(destroy=live)
        if live:
            for a in self._arenas.values():
                try:
                    release_arena(a, unregister=True)
                except errors.KaasError:
                    pass
            for r in self._residents.values():
                driver.cuMemFree(r.ptr)
            for lib in self._libraries.values():
                driver.cuModuleUnload(lib.module)
            for lane in self._lanes:
                destroy_lane(lane)
        self._shapes.clear()
        self._prepared.clear()
        self._arenas.clear()
        self._residents.clear()
        self._libraries.clear()
        self._lanes.clear()
        self._free_high.clear()
        self._free_normal.clear()
        self._running.clear()
        self._waiting_high.clear()
        self._waiting_normal.clear()
        if self._context is not None:
            if not self.poisoned:
                driver.cuDevicePrimaryCtxRelease(self._device)
            self._context = None
