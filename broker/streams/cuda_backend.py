"""The CUDA device: one GPU driven through ``cuda.bindings.driver`` inside a device worker.

The only module of kaas that talks to the CUDA driver, and it does so through one error
boundary, ``_check`` (with ``_error`` for a bare result code): every raw ``(CUresult,
value...)`` tuple is checked there and turned into a ``broker.errors`` exception carrying the
error's name and description.  Raw result tuples never leave this module.

How a graph runs (all of it enqueued by ``submit`` on one *stream lane*, never waited on):

1. one block of device memory holds every ``in``/``inout``/``out``/``temp`` buffer of the
   graph (``in``/``inout`` first, then the zeroed ones, so one memset scrubs them all): the
   lane's own slab for a small graph, else a stream-ordered allocation from the pool;
2. ``in``/``inout`` are copied host-to-device from the tenant's arena, which was page-locked
   once by ``pin_arena`` (never per request);
3. the kernels are launched in order;
4. ``out``/``inout`` are copied back into the arena and a pool allocation is freed.

Events between the stages give the timings, recorded only where a stage exists (a graph
without outputs has no copy-out event, its ``copy_out`` is 0.0); ``poll`` asks the last one
(``cuEventQuery``), so completion costs no thread and no callback.  A kernel that faults
leaves the context dead (sticky error): every later copy fails too, so outputs never reach an
arena, and the backend says ``poisoned`` so that the worker exits and the broker starts a
fresh one.  A graph past its deadline cannot be stopped from inside the process either: it
is failed and the backend is poisoned the same way.

A graph's *shape* (its kernels with grid, block, shared memory and literal arguments; the
kind and size of each buffer) is planned once: layout, copies and packed launch arguments
are cached per shape, and a submission only resolves its addresses.  With CUDA graphs on
(``cuda_graphs`` / ``KAAS_CUDA_GRAPHS``), from the second run of a shape each lane captures
steps 2-4 and the stage events into a CUDA graph once, and later runs on that lane replay
it with one ``cuGraphLaunch``, first pointing its memcpy nodes at the run's arena slices
where they moved (``cuGraphExecMemcpyNodeSetParams``) or, where device addresses moved,
capturing anew into ``cuGraphExecUpdate``.  "auto" replays where the self-check measured
it faster: see ``_AUTO_MIN_KERNELS``.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import mmap
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

from cuda.bindings import driver

from .. import errors
from ..protocol import KernelSpec, Lit, Param, Timings
from .backend import Backend, Completion
from .compiler import CompileCache
from .wire import ExecGraph, ExecKernel

__all__ = ["CudaBackend", "direct_null_latency"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

_R_NOT_READY = driver.CUresult.CUDA_ERROR_NOT_READY
_R_OOM = "CUDA_ERROR_OUT_OF_MEMORY"

# Errors after which the context is unusable for the rest of the process (the driver's
# "the process must be terminated and relaunched"): the backend is poisoned by any of them.
# Those a kernel causes are KernelFault; the hardware's own are DeviceError.
_KERNEL_FAULTS = frozenset({
    "CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_LAUNCH_TIMEOUT", "CUDA_ERROR_ASSERT",
    "CUDA_ERROR_HARDWARE_STACK_ERROR", "CUDA_ERROR_ILLEGAL_INSTRUCTION", "CUDA_ERROR_MISALIGNED_ADDRESS",
    "CUDA_ERROR_INVALID_ADDRESS_SPACE", "CUDA_ERROR_INVALID_PC", "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_CONTAINED", "CUDA_ERROR_TENSOR_MEMORY_LEAK",
})
_STICKY = _KERNEL_FAULTS | {"CUDA_ERROR_ECC_UNCORRECTABLE", "CUDA_ERROR_NVLINK_UNCORRECTABLE"}

# Module-load failures that mean "this image is bad for this device", i.e. the tenant's input.
_BAD_IMAGE = frozenset({
    "CUDA_ERROR_INVALID_IMAGE", "CUDA_ERROR_INVALID_PTX", "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
    "CUDA_ERROR_NO_BINARY_FOR_GPU", "CUDA_ERROR_INVALID_SOURCE", "CUDA_ERROR_INVALID_VALUE",
    "CUDA_ERROR_SHARED_OBJECT_INIT_FAILED", "CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND",
    "CUDA_ERROR_JIT_COMPILER_NOT_FOUND", "CUDA_ERROR_UNSUPPORTED_EXEC_AFFINITY",
})

_ALIGN = 256  # device offset of every buffer inside a graph's allocation
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14
_PAGE = mmap.PAGESIZE
_NO_RELEASE = 2**64 - 1

# One 8-byte slot per kernel argument: the driver copies each parameter from its pointer,
# reading as many bytes as the kernel's parameter has.
_SLOT = {"buf": "Q", "i32": "i4x", "u32": "I4x", "f32": "f4x", "i64": "q", "u64": "Q", "f64": "d"}
_SIZE = {"buf": 8, "i32": 4, "u32": 4, "f32": 4, "i64": 8, "u64": 8, "f64": 8}
_Q = struct.Struct("<Q")

# CUDA graph replay.  The run of a shape (counted per device) from which a lane captures it:
# the first runs directly, as most shapes are never submitted twice.
_CAPTURE_AT = 2
# "auto", from the self-check's --sweep on an H100 (submit+poll p50, ways interleaved): a
# replay whose addresses still hold beats direct launches at every kernel count (null
# kernel: 15.7 vs 18.2 us; 1 kernel with 1-KiB copies: 32.5 vs 34.2; 20 kernels: 64 vs 152).
# Re-pointing moved memcpy nodes (cuGraphExecMemcpyNodeSetParams) does not pay for itself
# with one kernel (49.2 vs 45.9 us) and does from two on (2: 49.8 vs 51.9; 3: 46.2 vs 53.9;
# 20: 73 vs 157): "auto" updates moved arena slices only for graphs of at least this many
# kernels, and runs the others directly.  Moved device addresses (a pool allocation
# elsewhere, a resident put again) need a new capture and cuGraphExecUpdate, which costs
# about what it saves at best (20 kernels: 154 vs 157 us; 1 kernel: 89 vs 46): "auto" runs
# those directly.  The one capture of a shape per lane costs a run of 146 us (1 kernel) to
# 363 us (20 kernels).
_AUTO_MIN_KERNELS = 2
_CAPTURE_MODE = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
_RECORD_EXTERNAL = int(driver.CUevent_record_flags.CU_EVENT_RECORD_EXTERNAL)
_MEM_HOST = driver.CUmemorytype.CU_MEMORYTYPE_HOST
_MEM_DEVICE = driver.CUmemorytype.CU_MEMORYTYPE_DEVICE


# -- the error boundary -------------------------------------------------------------------
def _error_name(err: Any) -> str:
    try:
        res, name = driver.cuGetErrorName(err)
        if not res and name:
            return bytes(name).decode(errors="replace")
    except (TypeError, ValueError, RuntimeError):  # a code this binding does not know
        return f"CUresult({int(err)})"
    return getattr(err, "name", None) or f"CUresult({int(err)})"


def _error_string(err: Any) -> str:
    try:
        res, desc = driver.cuGetErrorString(err)
        if not res and desc:
            return bytes(desc).decode(errors="replace")
    except (TypeError, ValueError, RuntimeError):
        return "no description"
    return "no description"


def _error(err: Any, what: str = "", **detail: Any) -> errors.DeviceError:
    """The exception for a failed driver call: KernelFault for a kernel's sticky fault, else DeviceError."""
    name = _error_name(err)
    message = f"{name}: {_error_string(err)}"
    if what:
        message = f"{what} failed: {message}"
    cls = errors.KernelFault if name in _KERNEL_FAULTS else errors.DeviceError
    return cls(message, detail={"cuda_error": name, **detail})


def _check(result: tuple[Any, ...], what: str = "") -> Any:
    """Return the value(s) of a ``cuda.bindings.driver`` call, or raise its error (see ``_error``)."""
    err = result[0]
    if err:  # CUDA_SUCCESS is 0
        raise _error(err, what)
    n = len(result)
    if n == 1:
        return None
    if n == 2:
        return result[1]
    return result[1:]


def _is_sticky(exc: BaseException) -> bool:
    return isinstance(exc, errors.KaasError) and exc.detail.get("cuda_error") in _STICKY


def _guarded(method: Callable[Concatenate[CudaBackend, _P], _R]) -> Callable[Concatenate[CudaBackend, _P], _R]:
    """Mark the backend poisoned when a sticky error passes out of ``method``."""

    @functools.wraps(method)
    def wrapper(self: CudaBackend, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except errors.KaasError as exc:
            if _is_sticky(exc):
                self.poisoned = True
            raise

    return wrapper


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# -- resources ----------------------------------------------------------------------------
@dataclass(eq=False, slots=True)
class _Arena:
    """A tenant's shared-memory segment, mapped and page-locked for the life of the pin."""

    mm: mmap.mmap
    anchor: Any  # the ctypes object giving ``ptr``; holds an export of ``mm`` until unpinned
    ptr: int
    size: int
    users: int = 0  # graphs submitted and not finished that copy to or from this arena


@dataclass(eq=False, slots=True)
class _Resident:
    ptr: int
    size: int
    users: int = 0  # graphs submitted and not finished that read it


@dataclass(eq=False, slots=True)
class _Library:
    module: Any
    functions: dict[str, Any]
    specs: dict[str, KernelSpec]
    packers: dict[str, struct.Struct]  # one 8-byte slot per parameter, in order


@dataclass(eq=False, slots=True)
class _Lane:
    """A non-blocking stream and the four stage events of the one graph it runs at a time."""

    index: int
    stream: Any
    events: tuple[Any, Any, Any, Any]  # start, after copy-in, after kernels, after copy-out
    high: bool
    # Device memory for small graphs, reused by every graph of this lane: stream order makes
    # the reuse safe, and it saves an allocation and a free per graph.  0 until first needed.
    slab: int = 0


@dataclass(eq=False, slots=True)
class _Launch:
    """One kernel launch of a shape, with its own argument block: literals packed once."""

    function: Any
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared: int
    name: str
    index: int
    buffers: tuple[tuple[int, int], ...]  # (byte offset of the slot in ``args``, graph buffer index)
    args: Any  # ctypes buffer: one 8-byte slot per parameter; buffer slots hold the shape's packed pointers
    slots: Any  # ctypes array of pointers to the slots (what the driver reads the arguments through)
    params: int  # address of ``slots``: cuLaunchKernel's kernelParams (0: no parameters)


@dataclass(eq=False, slots=True)
class _Shape:
    """Everything of a graph's plan that does not depend on addresses, built once and reused.

    Keyed by the graph's kernels (function, grid, block, shared memory, literal and buffer
    arguments) and the kind and size of each buffer.  Arenas, offsets and residents, i.e.
    the addresses, are resolved at every submission (``_Run``).
    """

    kernels: tuple[ExecKernel, ...]
    size: int  # bytes of the graph's one device allocation
    offsets: tuple[int, ...]  # per buffer: offset in the allocation (-1: a resident)
    arena_buffers: tuple[int, ...]  # the in/inout/out buffers, in order: one host pointer each per run
    resident_buffers: tuple[int, ...]
    copy_in: tuple[tuple[int, int, int], ...]  # (position in arena_buffers, device offset, bytes)
    copy_out: tuple[tuple[int, int, int], ...]  # (position in arena_buffers, device offset, bytes)
    zero: tuple[int, int]  # (device offset, bytes) scrubbed before the kernels run
    launches: tuple[_Launch, ...]
    # Stage events recorded (lane.events[i]): 0 always; 1 only after a copy-in or scrub; 2 only
    # after kernels; 3 only after a copy-out.  A stage without its event reports 0.0 seconds.
    pre: bool  # event 1 is recorded
    end: int  # the last event recorded: poll asks it
    auto: bool  # "auto" re-points moved memcpy nodes of this shape (see _AUTO_MIN_KERNELS)
    starts: int = 0  # runs started (any lane): the _CAPTURE_AT-th and later may be captured
    used: int = 0  # clock of the last submission, for the shape cache's LRU order
    refused: bool = False  # a capture or a run of it failed: launched directly from now on
    update_failures: int = 0  # replays that would not take new addresses (two: refused)
    replays: dict[int, _Replay] = field(default_factory=dict)  # by lane index
    # The pointers the launches' buffer slots hold (base of the allocation, resident pointers).
    packed_base: int = -1
    packed_residents: tuple[int, ...] = ()


@dataclass(eq=False, slots=True)
class _Copy:
    """A memcpy node of a captured graph, with the parameters last set on it."""

    node: Any
    params: Any  # CUDA_MEMCPY3D
    pos: int  # position of its buffer in the shape's arena_buffers
    dev: int  # device offset in the graph's allocation
    to_device: bool


@dataclass(eq=False, slots=True)
class _Replay:
    """One shape's work on one lane as an instantiated CUDA graph, and the addresses baked into it.

    The graph holds everything between the start event and the last one (which is recorded
    on the stream after the launch, so that ``poll`` sees it pending at once).
    """

    shape: _Shape
    lane: int
    graph: Any  # the captured CUgraph: its nodes name the exec's nodes when updating them
    graph_exec: Any
    copies: tuple[_Copy, ...]  # copy-in nodes, then copy-out nodes
    base: int
    residents: tuple[int, ...]  # resident pointers in the kernels' arguments
    hosts: list[int]  # host pointer per arena buffer
    arenas: list[_Arena]  # pinned arenas its copies touch: unpinning one destroys the replay


@dataclass(eq=False, slots=True)
class _Run:
    """A submitted graph: its shape, resolved addresses and, once started, its lane and memory."""

    token: int
    shape: _Shape
    deadline: float
    high: bool
    submitted: float
    hosts: list[int]  # host pointer per arena buffer of the shape
    resident_ptrs: tuple[int, ...]  # device pointer per resident buffer of the shape
    arenas: list[_Arena]
    residents: list[_Resident]
    started: float = 0.0
    lane: _Lane | None = None
    base: int = 0  # a pool allocation to free once the graph is enqueued (0: none)


_OFF, _AUTO, _ON = 0, 1, 2
_MODES = {"0": _OFF, "off": _OFF, "false": _OFF, "1": _ON, "on": _ON, "true": _ON, "auto": _AUTO}
_MODE_NAMES = {_OFF: "off", _AUTO: "auto", _ON: "on"}


def _graph_mode(value: bool | str) -> int:
    """``cuda_graphs`` as one of _OFF/_AUTO/_ON; ``KAAS_CUDA_GRAPHS``, when set, replaces "auto"."""
    if isinstance(value, str) and value == "auto":
        value = os.environ.get("KAAS_CUDA_GRAPHS", "").strip() or "auto"
        where = "KAAS_CUDA_GRAPHS"
    else:
        where = "cuda_graphs"
    if isinstance(value, bool):
        return _ON if value else _OFF
    mode = _MODES.get(str(value).strip().lower())
    if mode is None:
        raise errors.InternalError(f"{where}={value!r}: expected 0, 1 or auto", detail={"setting": where})
    return mode


def _record(event: Any, stream: Any, capturing: bool) -> None:
    """Record a stage event; while capturing, as an event-record node of the graph."""
    if capturing:
        err = driver.cuEventRecordWithFlags(event, stream, _RECORD_EXTERNAL)[0]
    else:
        err = driver.cuEventRecord(event, stream)[0]
    if err:
        raise _error(err, "cuEventRecord")


def _captured_node(stream: Any) -> Any:
    """The node the last call on ``stream`` added to the graph being captured."""
    res = driver.cuStreamGetCaptureInfo(stream)
    if res[0]:
        raise _error(res[0], "cuStreamGetCaptureInfo")
    # (status, id, graph, dependencies, [edge data,] count): the dependencies are the one list.
    deps = next((x for x in res[1:] if isinstance(x, (list, tuple))), None)
    if not deps or len(deps) != 1:
        raise errors.InternalError(f"stream capture reported {len(deps or ())} nodes after a copy, expected 1")
    return deps[0]


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


def _pack_pointers(shape: _Shape, base: int, resident_ptrs: tuple[int, ...]) -> None:
    """Write the buffer pointers of allocation ``base`` into the shape's argument blocks."""
    ptrs = [base + o for o in shape.offsets]
    for i, p in zip(shape.resident_buffers, resident_ptrs, strict=True):
        ptrs[i] = p
    pack = _Q.pack_into
    for ln in shape.launches:
        args = ln.args
        for off, b in ln.buffers:
            pack(args, off, ptrs[b])
    shape.packed_base = base
    shape.packed_residents = resident_ptrs


class CudaBackend(Backend):
    """One CUDA device, through its primary context, from one thread of a worker process."""

    kind = "cuda"

    def __init__(self, index: int = 0, *, lanes: int = 8, high_lanes: int = 2, lane_slab: int = 4 * 2**20,
                 compile_cache: CompileCache | None = None, cuda_graphs: bool | str = "auto",
                 graph_cache: int = 64, shape_cache: int = 1024) -> None:
        self.index = index
        # Graphs needing at most this many bytes of device memory use their lane's slab (at
        # most lanes * lane_slab bytes, allocated on first use) instead of the pool; 0: never.
        self.lane_slab = lane_slab
        self.poisoned = False  # a sticky error or a missed deadline: the process must be replaced
        # CUDA graph replay: "on", "off" or "auto" (see _AUTO_MIN_KERNELS); at most graph_cache
        # instantiated graphs are kept (least recently used go first), shape_cache shapes.
        self._mode = _graph_mode(cuda_graphs)
        self.graph_cache = max(0, graph_cache)
        self.shape_cache = max(1, shape_cache)
        # How a replay takes new host pointers: "nodes" (set the memcpy nodes that changed) or
        # "capture" (capture the work again and cuGraphExecUpdate); the self-check compares them.
        self.graph_update = "nodes"
        self.graph_stats = dict.fromkeys(
            ("direct", "captures", "replays", "node_updates", "exec_updates", "capture_failures",
             "update_failures", "evicted"), 0)
        self._closed = True
        self._context: Any = None
        self._lanes: list[_Lane] = []
        self._arenas: dict[int, _Arena] = {}
        self._residents: dict[int, _Resident] = {}
        self._libraries: dict[str, _Library] = {}
        self._shapes: dict[Any, _Shape] = {}
        self._clock = 0
        # Every live _Replay, least recently launched first; each is also in its shape's replays.
        self._replays: collections.OrderedDict[_Replay, None] = collections.OrderedDict()
        self._running: dict[int, _Run] = {}  # started on a lane, not yet finished
        # Invariant: a token is in exactly one of _waiting_*, _running, _done until poll returns it.
        self._waiting_high: collections.deque[_Run] = collections.deque()
        self._waiting_normal: collections.deque[_Run] = collections.deque()
        self._done: list[Completion] = []
        self._tokens: set[int] = set()
        self._free_high: list[_Lane] = []
        self._free_normal: list[_Lane] = []
        self._compiler = compile_cache or CompileCache()

        _check(driver.cuInit(0), "cuInit")
        self._device = _check(driver.cuDeviceGet(index), f"cuDeviceGet({index})")
        self._context = _check(driver.cuDevicePrimaryCtxRetain(self._device), "cuDevicePrimaryCtxRetain")
        self._closed = False
        try:
            _check(driver.cuCtxSetCurrent(self._context), "cuCtxSetCurrent")
            attr = driver.CUdevice_attribute
            major = _check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self._device))
            minor = _check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self._device))
            self.arch = f"sm_{major}{minor}"
            raw_name = _check(driver.cuDeviceGetName(256, self._device))
            self.name = bytes(raw_name).split(b"\0", 1)[0].decode(errors="replace").strip()
            self.memory = int(_check(driver.cuDeviceTotalMem(self._device)))
            self.driver_version = int(_check(driver.cuDriverGetVersion()))
            self.sm_count = int(_check(driver.cuDeviceGetAttribute(
                attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, self._device)))
            # Freed graph memory stays in the pool for the next graph instead of going back
            # to the driver (and then forth again) at every synchronisation.
            self._pool = _check(driver.cuDeviceGetDefaultMemPool(self._device), "cuDeviceGetDefaultMemPool")
            _check(driver.cuMemPoolSetAttribute(
                self._pool, driver.CUmemPool_attribute.CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                driver.cuuint64_t(_NO_RELEASE)), "cuMemPoolSetAttribute(RELEASE_THRESHOLD)")
            least, greatest = _check(driver.cuCtxGetStreamPriorityRange(), "cuCtxGetStreamPriorityRange")
            for i in range(lanes + high_lanes):
                high = i >= lanes
                lane = self._new_lane(i, greatest if high else least, high)
                self._lanes.append(lane)
                (self._free_high if high else self._free_normal).append(lane)
            if not self._free_normal:
                raise errors.InternalError("a CUDA backend needs at least one normal-priority lane")
        except BaseException:
            self.close()
            raise

    def _new_lane(self, index: int, priority: int, high: bool) -> _Lane:
        stream = _check(driver.cuStreamCreateWithPriority(
            driver.CUstream_flags.CU_STREAM_NON_BLOCKING, priority), "cuStreamCreateWithPriority")
        events = tuple(_check(driver.cuEventCreate(driver.CUevent_flags.CU_EVENT_DEFAULT), "cuEventCreate")
                       for _ in range(4))
        return _Lane(index, stream, events, high)  # type: ignore[arg-type]

    @property
    def cuda_graphs(self) -> str:
        """CUDA graph replay: "on", "off" or "auto"; settable (as the constructor's argument)."""
        return _MODE_NAMES[self._mode]

    @cuda_graphs.setter
    def cuda_graphs(self, value: bool | str) -> None:
        self._mode = _graph_mode(value)

    # -- Backend ------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "cuda", "index": self.index, "arch": self.arch,
                "memory": self.memory, "driver_version": self.driver_version, "sm_count": self.sm_count,
                "lanes": len(self._lanes), "lane_slab": self.lane_slab, "cuda_graphs": self.cuda_graphs}

    @property
    def busy(self) -> bool:
        return bool(self._running or self._waiting_high or self._waiting_normal or self._done)

    @_guarded
    def load_library(self, library: str, fmt: str, data: bytes, kernels: tuple[KernelSpec, ...],
                     options: tuple[str, ...]) -> str:
        self._usable()
        lib = self._libraries.get(library)
        if lib is not None and all(k.name in lib.functions for k in kernels):
            return ""
        log = ""
        fresh = lib is None
        if lib is None:
            if fmt == "cuda":
                image, log = self._compiler.compile(bytes(data), self.arch, tuple(options))
            elif fmt in ("cubin", "fatbin"):
                image = bytes(data)
            elif fmt == "ptx":
                image = bytes(data) if bytes(data).endswith(b"\0") else bytes(data) + b"\0"
            else:
                raise errors.InvalidArgument(f"unknown library format {fmt!r} (expected cuda, cubin, ptx or fatbin)")
            try:
                if fmt == "ptx":
                    module = _check(driver.cuModuleLoadDataEx(image, 0, [], []), "cuModuleLoadDataEx")
                else:
                    module = _check(driver.cuModuleLoadData(image), "cuModuleLoadData")
            except errors.DeviceError as exc:
                name = exc.detail.get("cuda_error", "")
                if name in _BAD_IMAGE:
                    raise errors.CompileError(
                        f"library {library[:12]} ({fmt}) cannot be loaded on {self.name} ({self.arch}): {exc}",
                        detail={"log": log or str(exc), "cuda_error": name, "arch": self.arch}) from None
                raise
            lib = _Library(module, {}, {}, {})
        try:
            found: dict[str, Any] = {}
            for spec in kernels:
                if spec.name in lib.functions:
                    continue
                res = driver.cuModuleGetFunction(lib.module, spec.name.encode())
                if res[0] == driver.CUresult.CUDA_ERROR_NOT_FOUND:
                    raise errors.UnknownKernel(
                        f"library {library[:12]} has no kernel {spec.name!r} (CUDA C kernels must be "
                        "declared extern \"C\" to keep their plain names)",
                        detail={"library": library, "kernel": spec.name})
                function = _check(res, f"cuModuleGetFunction({spec.name!r})")
                self._check_signature(library, spec, function)
                found[spec.name] = function
        except BaseException:
            if fresh:
                driver.cuModuleUnload(lib.module)
            raise
        for spec in kernels:
            if spec.name in found:
                lib.functions[spec.name] = found[spec.name]
                lib.specs[spec.name] = spec
                lib.packers[spec.name] = struct.Struct("<" + "".join(_SLOT[p.kind] for p in spec.params))
        self._libraries[library] = lib
        return str(log)

    def _check_signature(self, library: str, spec: KernelSpec, function: Any) -> None:
        """Refuse a KernelSpec whose parameters do not match the compiled kernel's."""
        for p in spec.params:
            if p.kind not in _SLOT:
                raise errors.ArgumentError(f"kernel {spec.name!r}: parameter {p.name!r} has unknown kind {p.kind!r}",
                                           detail={"kernel": spec.name, "param": p.name})
        sizes: list[int] = []
        while True:
            res = driver.cuFuncGetParamInfo(function, len(sizes))
            if res[0]:
                break  # past the last parameter (or a driver that cannot tell: nothing to compare)
            sizes.append(int(res[2]))
            if len(sizes) > 4096:
                return
        if not sizes and res[0] != driver.CUresult.CUDA_ERROR_INVALID_VALUE:
            return
        want = [_SIZE[p.kind] for p in spec.params]
        if sizes != want:
            raise errors.ArgumentError(
                f"kernel {spec.name!r} of library {library[:12]} takes {len(sizes)} parameter(s) of "
                f"{sizes} bytes, but its spec declares {len(want)} of {want} bytes",
                detail={"kernel": spec.name, "library": library, "compiled": sizes, "declared": want})

    @_guarded
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
        anchor = ctypes.c_char.from_buffer(mm)
        ptr = ctypes.addressof(anchor)
        _prefault(mm, size)
        try:
            # Registering pre-faulted pages is ~10x faster than letting the driver fault them.
            _check(driver.cuMemHostRegister(ptr, _round_up(size, _PAGE), 0),
                   f"cuMemHostRegister of arena {arena} ({_mib(size)})")
        except BaseException:
            del anchor
            mm.close()
            raise
        self._arenas[arena] = _Arena(mm, anchor, ptr, size)

    @_guarded
    def unpin_arena(self, arena: int) -> None:
        a = self._arenas.get(arena)
        if a is None:
            return
        if a.users:
            raise errors.InternalError(f"arena {arena} is still used by {a.users} graph(s) in flight")
        del self._arenas[arena]
        self._forget_arena(a)
        self._release_arena(a, unregister=True)

    def _release_arena(self, a: _Arena, *, unregister: bool) -> None:
        try:
            if unregister:
                _check(driver.cuMemHostUnregister(a.ptr), "cuMemHostUnregister")
        finally:
            a.anchor = None
            try:
                a.mm.close()
            except BufferError:  # an export escaped; the mapping goes when it does
                pass

    @_guarded
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
            ptr = self._alloc(size, f"resident {resident}")
            try:
                view = memoryview(mm)
                try:
                    _check(driver.cuMemcpyHtoD(ptr, view, size), f"copying resident {resident} to the device")
                finally:
                    view.release()
            except BaseException:
                driver.cuMemFree(ptr)
                raise
        finally:
            mm.close()
        self._residents[resident] = _Resident(ptr, size)

    def _alloc(self, size: int, what: str) -> int:
        """cuMemAlloc, handing the pool's cached blocks back to the driver once before giving up."""
        res = driver.cuMemAlloc(size)
        if res[0] == driver.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
            _check(driver.cuCtxSynchronize(), "cuCtxSynchronize")
            _check(driver.cuMemPoolTrimTo(self._pool, 0), "cuMemPoolTrimTo")
            res = driver.cuMemAlloc(size)
            if res[0] == driver.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
                free, total = _check(driver.cuMemGetInfo())
                raise errors.DeviceError(
                    f"out of device memory allocating {_mib(size)} for {what} on {self.name} "
                    f"(free: {_mib(int(free))} of {_mib(int(total))})",
                    detail={"cuda_error": _R_OOM, "bytes": size})
        return int(_check(res, f"cuMemAlloc({size}) for {what}"))

    @_guarded
    def evict_resident(self, resident: int) -> None:
        r = self._residents.get(resident)
        if r is None:
            return
        if r.users:
            raise errors.InternalError(f"resident {resident} is still used by {r.users} graph(s) in flight")
        del self._residents[resident]
        _check(driver.cuMemFree(r.ptr), f"freeing resident {resident}")

    @_guarded
    def submit(self, token: int, graph: ExecGraph, deadline: float, priority: int) -> None:
        """Queue ``graph``; raises only when it is refused up front (then no Completion follows).

        Once ``submit`` returns, exactly one Completion for ``token`` comes out of ``poll``:
        launch errors and faults arrive there too.
        """
        if self._closed or self.poisoned:
            self._usable()
        if token in self._tokens:
            raise errors.InternalError(f"token {token} is already in flight")
        key = (graph.kernels, tuple([(b.kind, b.nbytes) for b in graph.buffers]))
        shape = self._shapes.get(key)
        self._clock += 1
        if shape is None:
            shape = self._new_shape(graph)
            shape.used = self._clock
            self._shapes[key] = shape
            if len(self._shapes) > self.shape_cache:
                self._evict_shapes()
        else:
            shape.used = self._clock
        run = self._resolve(token, graph, shape, deadline, priority > 0)
        for a in run.arenas:
            a.users += 1
        for r in run.residents:
            r.users += 1
        self._tokens.add(token)
        if run.high:
            self._waiting_high.append(run)
        else:
            self._waiting_normal.append(run)
        self._pump()

    def _resolve(self, token: int, graph: ExecGraph, shape: _Shape, deadline: float, high: bool) -> _Run:
        """The addresses of this submission of ``shape``: host pointers into arenas, residents."""
        buffers = graph.buffers
        pinned = self._arenas
        hosts: list[int] = []
        arenas: list[_Arena] = []
        for i in shape.arena_buffers:
            b = buffers[i]
            a = pinned.get(b.arena)
            if a is None:
                raise errors.InternalError(f"arena {b.arena} is not pinned on {self.name}")
            if b.offset < 0 or b.offset + b.nbytes > a.size:
                raise errors.InternalError(
                    f"buffer {i}: arena {b.arena} slice {b.offset}+{b.nbytes} exceeds its {a.size} bytes")
            arenas.append(a)
            hosts.append(a.ptr + b.offset)
        residents: list[_Resident] = []
        resident_ptrs: tuple[int, ...] = ()
        if shape.resident_buffers:
            for i in shape.resident_buffers:
                b = buffers[i]
                r = self._residents.get(b.resident)
                if r is None:
                    raise errors.UnknownResident(f"resident {b.resident} is not on {self.name}",
                                                 detail={"resident": b.resident})
                if b.nbytes > r.size:
                    raise errors.InternalError(f"buffer {i} reads {b.nbytes} bytes of a {r.size}-byte resident")
                residents.append(r)
            resident_ptrs = tuple(r.ptr for r in residents)
        return _Run(token, shape, deadline, high, time.perf_counter(), hosts, resident_ptrs, arenas, residents)

    def _new_shape(self, graph: ExecGraph) -> _Shape:
        """Lay out the buffers of ``graph`` in one allocation and pack its launches."""
        n = len(graph.buffers)
        offsets = [0] * n
        arena_buffers: list[int] = []
        resident_buffers: list[int] = []
        copy_in: list[tuple[int, int, int]] = []
        copy_out: list[tuple[int, int, int]] = []
        offset = 0
        pending_zero: list[tuple[int, int]] = []  # (buffer, position in arena_buffers or -1)
        for i, b in enumerate(graph.buffers):
            if b.nbytes < 0:
                raise errors.InternalError(f"buffer {i} has a negative size")
            kind = b.kind
            if kind == "resident":
                resident_buffers.append(i)
                offsets[i] = -1
            elif kind in ("in", "inout", "out"):
                pos = len(arena_buffers)
                arena_buffers.append(i)
                if kind == "out":
                    pending_zero.append((i, pos))
                    continue
                offsets[i] = offset
                if b.nbytes:
                    copy_in.append((pos, offset, b.nbytes))
                    if kind == "inout":
                        copy_out.append((pos, offset, b.nbytes))
                offset += _round_up(b.nbytes, _ALIGN)
            elif kind == "temp":
                pending_zero.append((i, -1))
            else:
                raise errors.InternalError(f"buffer {i} has unknown kind {kind!r}")
        # Everything zeroed lies after the copied-in buffers: one memset scrubs it all.
        zero_start = offset
        for i, pos in pending_zero:
            nbytes = graph.buffers[i].nbytes
            offsets[i] = offset
            if pos >= 0 and nbytes:
                copy_out.append((pos, offset, nbytes))
            offset += _round_up(nbytes, _ALIGN)
        launches = tuple(self._pack(i, k, n) for i, k in enumerate(graph.kernels))
        zero = (zero_start, offset - zero_start)
        pre = bool(copy_in or zero[1])
        end = 3 if copy_out else 2 if launches else 1 if pre else 0
        return _Shape(graph.kernels, offset, tuple(offsets), tuple(arena_buffers), tuple(resident_buffers),
                      tuple(copy_in), tuple(copy_out), zero, launches, pre, end,
                      auto=len(launches) >= _AUTO_MIN_KERNELS)

    def _pack(self, n: int, k: ExecKernel, nbuffers: int) -> _Launch:
        lib = self._libraries.get(k.library)
        if lib is None:
            raise errors.UnknownLibrary(f"library {k.library[:12]} is not loaded on {self.name}",
                                        detail={"library": k.library})
        function = lib.functions.get(k.kernel)
        if function is None:
            raise errors.UnknownKernel(f"library {k.library[:12]} has no kernel {k.kernel!r} loaded",
                                       detail={"library": k.library, "kernel": k.kernel})
        params = lib.specs[k.kernel].params
        where = f"kernel {n} ({k.kernel!r})"
        if len(k.args) != len(params):
            raise errors.ArgumentError(f"{where} takes {len(params)} argument(s), {len(k.args)} given",
                                       detail={"kernel": k.kernel, "index": n})
        values: list[int | float] = []
        buffers: list[tuple[int, int]] = []
        for pos, (p, arg) in enumerate(zip(params, k.args, strict=True)):
            if isinstance(arg, Lit):
                if p.kind == "buf":
                    raise errors.ArgumentError(f"{where}: parameter {p.name!r} is a buffer, got a literal",
                                               detail={"kernel": k.kernel, "index": n, "param": p.name})
                values.append(arg.value)
            else:
                if p.kind != "buf":
                    raise errors.ArgumentError(f"{where}: parameter {p.name!r} is {p.kind}, got a buffer",
                                               detail={"kernel": k.kernel, "index": n, "param": p.name})
                if not 0 <= arg.index < nbuffers:
                    raise errors.ArgumentError(f"{where}: no buffer {arg.index}",
                                               detail={"kernel": k.kernel, "index": n, "param": p.name})
                values.append(0)
                buffers.append((8 * pos, arg.index))
        count = len(params)
        args = ctypes.create_string_buffer(8 * max(count, 1))
        try:
            lib.packers[k.kernel].pack_into(args, 0, *values)
        except struct.error as exc:
            raise errors.ArgumentError(f"{where}: a literal does not fit its parameter type: {exc}",
                                       detail={"kernel": k.kernel, "index": n}) from None
        first = ctypes.addressof(args)
        slots = (ctypes.c_void_p * count)(*(first + 8 * i for i in range(count))) if count else None
        grid = (int(k.grid[0]), int(k.grid[1]), int(k.grid[2]))
        block = (int(k.block[0]), int(k.block[1]), int(k.block[2]))
        return _Launch(function, grid, block, int(k.shared), k.kernel, n, tuple(buffers), args, slots,
                       ctypes.addressof(slots) if slots is not None else 0)

    def _evict_shapes(self) -> None:
        """Forget the least recently used quarter of the shape cache (and their CUDA graphs)."""
        by_age = sorted(self._shapes.items(), key=lambda kv: kv[1].used)
        for key, shape in by_age[: len(by_age) - self.shape_cache * 3 // 4]:
            del self._shapes[key]
            for rp in list(shape.replays.values()):
                self._destroy_replay(rp)

    # -- running ------------------------------------------------------------------------------
    def _pump(self) -> None:
        """Start waiting graphs on free lanes: high priority first, on a high lane if one is free."""
        while self._waiting_high and (self._free_high or self._free_normal):
            lane = self._free_high.pop() if self._free_high else self._free_normal.pop()
            self._start(self._waiting_high.popleft(), lane)
        while self._waiting_normal and self._free_normal:
            self._start(self._waiting_normal.popleft(), self._free_normal.pop())

    def _start(self, run: _Run, lane: _Lane) -> None:
        """Enqueue the whole graph on ``lane``; a failure becomes the graph's Completion."""
        shape = run.shape
        s = lane.stream
        run.lane = lane
        run.started = time.perf_counter()
        shape.starts += 1
        try:
            size = shape.size
            small = size <= self.lane_slab
            if not size:
                base = 0
            elif small and lane.slab:
                base = lane.slab
            else:
                want = self.lane_slab if small else size
                res = driver.cuMemAllocFromPoolAsync(want, self._pool, s)
                if res[0]:
                    raise _error(res[0], f"allocating {_mib(want)} of device memory for the graph", bytes=want)
                base = int(res[1])
                if small:
                    lane.slab = base
                else:
                    run.base = base
            mode = self._mode
            launched = False
            if mode and shape.launches and not shape.refused:
                rp = shape.replays.get(lane.index)
                if rp is not None:
                    launched = self._replay(run, rp, base, mode == _ON)
                elif shape.starts >= _CAPTURE_AT and self.graph_cache:
                    launched = self._capture(run, lane, base)
            if not launched:
                self._enqueue(run, lane, base, None)
                self.graph_stats["direct"] += 1
            if run.base:
                err = driver.cuMemFreeAsync(run.base, s)[0]
                run.base = 0
                if err:
                    raise _error(err, "cuMemFreeAsync")
        except errors.KaasError as exc:
            self._abort(run, exc)
            return
        self._running[run.token] = run

    def _enqueue(self, run: _Run, lane: _Lane, base: int, nodes: list[Any] | None) -> None:
        """Put the graph's work on the lane's stream (``base``: its device memory).

        With ``nodes`` the stream is being captured: stage events become event-record nodes,
        the last one is left to the caller, and each copy's node is appended to ``nodes``.
        """
        d = driver
        s = lane.stream
        ev = lane.events
        shape = run.shape
        hosts = run.hosts
        capturing = nodes is not None
        end = 4 if nodes is None else shape.end  # the event not to record here
        _record(ev[0], s, capturing)
        if shape.copy_in:
            htod = d.cuMemcpyHtoDAsync
            for pos, dev, nbytes in shape.copy_in:
                err = htod(base + dev, hosts[pos], nbytes, s)[0]
                if err:
                    raise _error(err, "copy-in")
                if nodes is not None:
                    nodes.append(_captured_node(s))
        zoff, zlen = shape.zero
        if zlen:
            err = d.cuMemsetD8Async(base + zoff, 0, zlen, s)[0]
            if err:
                raise _error(err, "scrubbing out/temp buffers")
        if shape.pre and end != 1:
            _record(ev[1], s, capturing)
        if shape.launches:
            if base != shape.packed_base or run.resident_ptrs != shape.packed_residents:
                _pack_pointers(shape, base, run.resident_ptrs)
            launch = d.cuLaunchKernel
            for ln in shape.launches:
                g = ln.grid
                bl = ln.block
                err = launch(ln.function, g[0], g[1], g[2], bl[0], bl[1], bl[2], ln.shared, s, ln.params, 0)[0]
                if err:
                    raise _error(err, f"launching kernel {ln.index} ({ln.name!r}) with grid {g}, block {bl}, "
                                      f"{ln.shared} bytes of shared memory", kernel=ln.name, index=ln.index)
            if end != 2:
                _record(ev[2], s, capturing)
        if shape.copy_out:
            dtoh = d.cuMemcpyDtoHAsync
            for pos, dev, nbytes in shape.copy_out:
                err = dtoh(hosts[pos], base + dev, nbytes, s)[0]
                if err:
                    raise _error(err, "copy-out")
                if nodes is not None:
                    nodes.append(_captured_node(s))
            if end != 3:
                _record(ev[3], s, capturing)

    # -- CUDA graph replay ----------------------------------------------------------------------
    def _capture(self, run: _Run, lane: _Lane, base: int) -> bool:
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
            self._capture_failed(shape, _error(res[0], "cuGraphInstantiate"))
            return False
        n_in = len(shape.copy_in)
        hosts = run.hosts
        copies = tuple(
            _Copy(node, _memcpy_params(hosts[pos], base + dev, nbytes, i < n_in), pos, dev, i < n_in)
            for i, (node, (pos, dev, nbytes)) in enumerate(zip(nodes, shape.copy_in + shape.copy_out, strict=True)))
        rp = _Replay(shape, lane.index, graph, res[1], copies, base, run.resident_ptrs, hosts, run.arenas)
        shape.replays[lane.index] = rp
        self._replays[rp] = None
        while len(self._replays) > self.graph_cache:  # rp itself is the most recent
            self._destroy_replay(next(iter(self._replays)))
            self.graph_stats["evicted"] += 1
        self._launch_replay(rp, lane)
        self.graph_stats["captures"] += 1
        return True

    def _record_graph(self, run: _Run, lane: _Lane, base: int) -> tuple[Any, list[Any]] | None:
        """The graph's work captured from ``lane``'s stream, and its copy nodes; None if it failed."""
        s = lane.stream
        _check(driver.cuStreamBeginCapture(s, _CAPTURE_MODE), "cuStreamBeginCapture")
        nodes: list[Any] = []
        try:
            self._enqueue(run, lane, base, nodes)
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
            self._capture_failed(run.shape, _error(res[0], "cuStreamEndCapture"))
            return None
        return res[1], nodes

    def _capture_failed(self, shape: _Shape, exc: errors.KaasError) -> None:
        """A sticky error goes on; any other makes the shape run directly from now on."""
        if _is_sticky(exc):
            raise exc
        self.graph_stats["capture_failures"] += 1
        self._refuse(shape)

    def _refuse(self, shape: _Shape) -> None:
        shape.refused = True
        for rp in list(shape.replays.values()):
            self._destroy_replay(rp)

    def _replay(self, run: _Run, rp: _Replay, base: int, always: bool) -> bool:
        """Launch the lane's instantiated graph of this shape, after updating what moved.

        False when the caller is to enqueue the work directly: the graph could not be
        updated, or (unless ``always``) updating it costs more than it saves (see
        _AUTO_MIN_KERNELS); the graph is kept for runs whose addresses hold.
        """
        self._replays.move_to_end(rp)
        if base != rp.base or run.resident_ptrs != rp.residents:
            # Device addresses in kernel arguments moved (a pool allocation, a resident put
            # again): capture anew and update the instantiated graph from that.
            if not always or not self._update_by_capture(run, rp, base):
                return False
        elif run.hosts != rp.hosts:
            if not always and not rp.shape.auto:
                return False
            if not (self._update_by_capture(run, rp, base) if self.graph_update == "capture"
                    else self._update_nodes(run, rp)):
                return False
        lane = run.lane
        assert lane is not None
        self._launch_replay(rp, lane)
        self.graph_stats["replays"] += 1
        return True

    def _launch_replay(self, rp: _Replay, lane: _Lane) -> None:
        s = lane.stream
        _check(driver.cuGraphLaunch(rp.graph_exec, s),
               f"cuGraphLaunch (a graph of {len(rp.shape.launches)} kernel(s))")
        # Recorded on the stream, not in the graph: pending from now on, whatever poll asks.
        err = driver.cuEventRecord(lane.events[rp.shape.end], s)[0]
        if err:
            raise _error(err, "cuEventRecord")

    def _update_nodes(self, run: _Run, rp: _Replay) -> bool:
        """Point the memcpy nodes whose arena slice changed at the new host memory."""
        hosts = run.hosts
        old = rp.hosts
        set_params = driver.cuGraphExecMemcpyNodeSetParams
        ctx = self._context
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
                self._update_failed(rp, _error(err, "cuGraphExecMemcpyNodeSetParams"))
                return False
        rp.hosts = hosts
        rp.arenas = run.arenas
        self.graph_stats["node_updates"] += 1
        return True

    def _update_by_capture(self, run: _Run, rp: _Replay, base: int) -> bool:
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
            self._update_failed(rp, _error(res[0], "cuGraphExecUpdate"))
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
        self.graph_stats["exec_updates"] += 1
        return True

    def _update_failed(self, rp: _Replay, exc: errors.KaasError) -> None:
        """Drop a graph that would not take new addresses; a shape that fails twice is refused."""
        if _is_sticky(exc):
            raise exc
        self.graph_stats["update_failures"] += 1
        self._destroy_replay(rp)
        rp.shape.update_failures += 1
        if rp.shape.update_failures > 1:  # this driver will not update such a graph: stop trying
            self._refuse(rp.shape)

    def _destroy_replay(self, rp: _Replay) -> None:
        """Forget ``rp``; a graph still running is freed by the driver once it finishes."""
        if rp.shape.replays.get(rp.lane) is rp:
            del rp.shape.replays[rp.lane]
        self._replays.pop(rp, None)
        if not self.poisoned and not self._closed:
            driver.cuGraphExecDestroy(rp.graph_exec)
            driver.cuGraphDestroy(rp.graph)

    def _forget_arena(self, a: _Arena) -> None:
        """Destroy every graph whose copies were made for ``a``: its pages are about to go."""
        for rp in [rp for rp in self._replays if any(x is a for x in rp.arenas)]:
            self._destroy_replay(rp)

    # -- completion -----------------------------------------------------------------------------
    def _abort(self, run: _Run, exc: errors.KaasError) -> None:
        """A graph failed while being enqueued: nothing was copied out; free, drain the lane, report."""
        if _is_sticky(exc):
            self.poisoned = True
        elif exc.detail.get("cuda_error") != _R_OOM:
            self._refuse(run.shape)  # whatever failed is reported by direct launches from now on
        if isinstance(exc, errors.DeviceError) and "cuda_error" in exc.detail and not isinstance(
                exc, errors.KernelFault) and "index" in exc.detail:
            exc = errors.KernelFault(exc.message, detail=exc.detail)  # a launch the driver refused
        if self.poisoned:  # an earlier graph's fault surfaced while this one was enqueued
            for key, value in self._names(run).items():
                exc.detail.setdefault(key, value)
        lane = run.lane
        assert lane is not None
        if run.base:
            driver.cuMemFreeAsync(run.base, lane.stream)
            run.base = 0
        if not self.poisoned:
            # The copies already enqueued read the arena: it stays in use until they are done.
            res = driver.cuStreamSynchronize(lane.stream)
            if res[0] and _is_sticky(_error(res[0])):
                self.poisoned = True
        self._finish(run, Completion(run.token, error=exc), free_lane=not self.poisoned)

    def _finish(self, run: _Run, completion: Completion, *, free_lane: bool) -> None:
        self._running.pop(run.token, None)
        self._tokens.discard(run.token)
        self._done.append(completion)
        if free_lane:
            for a in run.arenas:
                a.users -= 1
            for r in run.residents:
                r.users -= 1
            lane = run.lane
            if lane is not None:
                (self._free_high if lane.high else self._free_normal).append(lane)

    @_guarded
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
                    self._finish(run, Completion(run.token, timings=self._timings(run, lane)), free_lane=True)
                elif err == _R_NOT_READY:
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

    def _timings(self, run: _Run, lane: _Lane) -> Timings:
        """Seconds of each stage from the lane's events; a stage the graph does not have is 0.0."""
        ev = lane.events
        shape = run.shape
        elapsed = driver.cuEventElapsedTime
        copy_in = kernels = copy_out = 0.0
        at = 0  # the event the next stage starts at
        if shape.pre:
            copy_in = _check(elapsed(ev[0], ev[1]), "cuEventElapsedTime") / 1e3
            at = 1
        if shape.launches:
            kernels = _check(elapsed(ev[at], ev[2]), "cuEventElapsedTime") / 1e3
            at = 2
        if shape.copy_out:
            copy_out = _check(elapsed(ev[at], ev[3]), "cuEventElapsedTime") / 1e3
        return Timings(queued=run.started - run.submitted, copy_in=copy_in, kernels=kernels, copy_out=copy_out,
                       total=copy_in + kernels + copy_out)

    def _names(self, run: _Run) -> dict[str, Any]:
        names = [k.kernel for k in run.shape.kernels]
        return {"kernel": names[0]} if len(names) == 1 else {"kernels": names}

    def _fault(self, run: _Run, err: Any, in_flight: int) -> None:
        """A graph's last event reports an error: a kernel faulted (ours, or a neighbour's: see below)."""
        exc = _error(err, f"graph of {len(run.shape.kernels)} kernel(s)")
        if _is_sticky(exc):
            self.poisoned = True
            exc = errors.KernelFault(exc.message, detail=exc.detail)
        else:
            self._refuse(run.shape)
        exc.detail.update(self._names(run))
        # A sticky fault surfaces on every graph in flight in this process, not only on the
        # one that caused it: with others in flight, this graph may be innocent.
        exc.detail["in_flight"] = in_flight
        if in_flight > 1:
            exc.detail["ambiguous"] = True
        self._finish(run, Completion(run.token, error=exc), free_lane=not self.poisoned)

    def _expire(self, run: _Run, now: float) -> None:
        """Past its deadline: the kernel cannot be stopped here, so fail it and poison the backend."""
        self.poisoned = True
        err = errors.DeadlineExceeded(
            f"graph did not finish within its deadline of {run.deadline:.3f} s of device time "
            f"(running for {now - run.started:.3f} s); the device worker must be restarted",
            detail={"deadline": run.deadline, **self._names(run)})
        self._finish(run, Completion(run.token, error=err), free_lane=False)

    def _fail_waiting(self) -> None:
        """Graphs that never started cannot run in a poisoned process; they are safe to replay."""
        for queue in (self._waiting_high, self._waiting_normal):
            while queue:
                run = queue.popleft()
                self._tokens.discard(run.token)
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
        if not self.poisoned and self._context is not None:
            driver.cuCtxSynchronize()  # nothing may still copy into arenas about to be unmapped
            for rp in self._replays:
                driver.cuGraphExecDestroy(rp.graph_exec)
                driver.cuGraphDestroy(rp.graph)
            for a in self._arenas.values():
                try:
                    self._release_arena(a, unregister=True)
                except errors.KaasError:
                    pass
            for r in self._residents.values():
                driver.cuMemFree(r.ptr)
            for lib in self._libraries.values():
                driver.cuModuleUnload(lib.module)
            for lane in self._lanes:
                if lane.slab:
                    driver.cuMemFreeAsync(lane.slab, lane.stream)
                    lane.slab = 0
                for e in lane.events:
                    driver.cuEventDestroy(e)
                driver.cuStreamDestroy(lane.stream)
        self._replays.clear()
        self._shapes.clear()
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


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _prefault(mm: mmap.mmap, size: int) -> str:
    """Fault in every page of ``mm`` without changing its contents; returns how."""
    try:
        mm.madvise(_MADV_POPULATE_WRITE)
        return "madvise"
    except (OSError, ValueError):  # kernel older than 5.14
        pass
    import numpy as np

    view = np.frombuffer(mm, dtype=np.uint8, count=size)
    try:
        int(view[::_PAGE].sum())  # a read fault allocates a shared-memory page
    finally:
        del view
    return "touch"


# -- the in-process baseline -------------------------------------------------------------------
_NULL_SOURCE = b'extern "C" __global__ void kaas_direct_null(void) {}\n'


def direct_null_latency(iterations: int, index: int = 0) -> list[float]:
    """Seconds per launch + cuStreamSynchronize of an empty kernel, in this process.

    The floor the broker's round trip is compared with: no socket, no scheduler, no copies.
    """
    backend = CudaBackend(index, lanes=1, high_lanes=0)
    try:
        backend.load_library("direct-null", "cuda", _NULL_SOURCE, (KernelSpec("kaas_direct_null", ()),), ())
        function = backend._libraries["direct-null"].functions["kaas_direct_null"]
        stream = backend._lanes[0].stream
        launch = driver.cuLaunchKernel
        sync = driver.cuStreamSynchronize
        clock = time.perf_counter
        for _ in range(min(100, max(iterations, 10))):
            _check(launch(function, 1, 1, 1, 1, 1, 1, 0, stream, 0, 0), "cuLaunchKernel")
            _check(sync(stream), "cuStreamSynchronize")
        times: list[float] = []
        for _ in range(iterations):
            t0 = clock()
            err = launch(function, 1, 1, 1, 1, 1, 1, 0, stream, 0, 0)[0]
            err = err or sync(stream)[0]
            times.append(clock() - t0)
            if err:
                raise _error(err, "null kernel launch")
        return times
    finally:
        backend.close()


def _selfcheck(argv: list[str] | None = None) -> int:
    """``python -m broker.streams.cuda_backend``: device info, launch latency, copy bandwidth and
    CUDA graph replay against direct launches, as JSON."""
    import argparse
    import json

    import numpy as np

    from .wire import ExecBuffer, ExecKernel

    p = argparse.ArgumentParser(prog="python -m broker.streams.cuda_backend")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--iterations", type=int, default=10000)
    p.add_argument("--mib", type=int, default=256, help="size of the pinned-arena copy test")
    p.add_argument("--sweep", action="store_true",
                   help="also replay against direct launches per chain length, with moving addresses, "
                        "with pool memory (the data behind the 'auto' rule)")
    args = p.parse_args(argv)

    def us(xs: list[float]) -> dict[str, float]:
        a = np.asarray(xs) * 1e6
        return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "n": len(xs)}

    out: dict[str, Any] = {"direct_null_us": us(direct_null_latency(args.iterations, args.device))}
    backend = CudaBackend(args.device)
    size = args.mib * 2**20
    fd = os.memfd_create("kaas-selfcheck")
    try:
        out["device"] = backend.info()
        os.ftruncate(fd, size)
        t0 = time.perf_counter()
        backend.pin_arena(1, os.dup(fd), size)
        pin: dict[str, Any] = {"untouched": (time.perf_counter() - t0) * 1e3}
        # As a tenant hands it over: pages already written.
        fd2 = os.memfd_create("kaas-selfcheck-touched")
        os.ftruncate(fd2, size)
        with mmap.mmap(fd2, size) as m:
            np.frombuffer(m, np.uint8)[:] = 1
            t0 = time.perf_counter()
            backend.pin_arena(2, fd2, size)
            pin["touched"] = (time.perf_counter() - t0) * 1e3
        backend.unpin_arena(2)
        with mmap.mmap(-1, size) as m:
            t0 = time.perf_counter()
            pin["prefault"] = _prefault(m, size)
            pin["prefault_ms"] = (time.perf_counter() - t0) * 1e3
        out["pin_ms"] = pin

        up = ExecGraph((ExecBuffer("in", "uint8", (size,), size, 1, 0),), ())
        down = ExecGraph((ExecBuffer("out", "uint8", (size,), size, 1, 0),), ())
        _run_one(backend, up)
        out["htod_GBps"] = size / min(_run_one(backend, up).copy_in for _ in range(5)) / 1e9
        out["dtoh_GBps"] = size / min(_run_one(backend, down).copy_out for _ in range(5)) / 1e9

        backend.load_library("selfcheck-null", "cuda", _NULL_SOURCE, (KernelSpec("kaas_direct_null", ()),), ())
        tiny = ExecGraph((ExecBuffer("in", "float32", (256,), 1024, 1, 0),
                          ExecBuffer("out", "float32", (256,), 1024, 1, 4096)),
                         (ExecKernel("selfcheck-null", "kaas_direct_null", (1, 1, 1), (1, 1, 1), 0, ()),))
        slab = backend.lane_slab
        for way in ("lane slab", "pool", "lane slab", "pool"):  # the second round of each is kept
            backend.lane_slab = slab if way == "lane slab" else 0
            out[f"backend_graph_us ({way})"] = _graph_latency(
                backend, [tiny], min(args.iterations, 5000), us,
                f"submit+poll: 1 KiB in, 1 KiB out, one null kernel (cuda_graphs={backend.cuda_graphs})")
        backend.lane_slab = slab
        out["cuda_graphs"] = _replay_report(backend, min(args.iterations, 5000), us, args.sweep)
        out["launch_call_us"] = _launch_costs(backend, min(args.iterations, 20000))
        out["enqueue_call_us"] = _call_costs(backend, backend._arenas[1].ptr, min(args.iterations, 5000))
    finally:
        os.close(fd)
        backend.close()
    print(json.dumps(out, indent=1))
    return 0


def _run_one(backend: CudaBackend, graph: ExecGraph) -> Timings:
    backend.submit(1, graph, 0.0, 0)
    while True:
        for c in backend.poll():
            if c.error is not None:
                raise c.error
            assert c.timings is not None
            return c.timings


def _graph_latency(backend: CudaBackend, graphs: list[ExecGraph], iterations: int,
                   us: Callable[[list[float]], dict[str, float]], what: str) -> dict[str, Any]:
    """Round trip through submit + poll of ``graphs`` in turn, after 100 warm-up runs."""
    lat: list[float] = []
    enqueue: list[float] = []
    device: list[float] = []
    kernels: list[float] = []
    count = len(graphs)
    for i in range(iterations + 100):
        graph = graphs[i % count]
        t0 = time.perf_counter()
        backend.submit(1, graph, 0.0, 0)
        t1 = time.perf_counter()
        done: list[Completion] = []
        while not done:
            done = backend.poll()
        t2 = time.perf_counter()
        timings = done[0].timings
        if done[0].error is not None or timings is None:
            raise done[0].error or errors.InternalError("no timings")
        if i >= 100:
            lat.append(t2 - t0)
            enqueue.append(t1 - t0)
            device.append(timings.total)
            kernels.append(timings.kernels)
    return {**us(lat), "submit": us(enqueue), "device_total": us(device), "device_kernels": us(kernels),
            "what": what}


def _compare(backend: CudaBackend, ways: dict[str, tuple[str, str, list[ExecGraph]]], iterations: int,
             us: Callable[[list[float]], dict[str, float]], chunk: int = 50) -> dict[str, dict[str, float]]:
    """submit+poll of several ways (label: cuda_graphs mode, graph_update, graphs in turn), interleaved.

    The ways take turns in chunks of ``chunk`` runs, so that drift of the host (clocks,
    neighbours) spreads over all of them instead of favouring whichever ran in a quiet moment.
    """
    lat: dict[str, list[float]] = {label: [] for label in ways}
    enqueue: dict[str, list[float]] = {label: [] for label in ways}
    kernels: dict[str, list[float]] = {label: [] for label in ways}
    turn = dict.fromkeys(ways, 0)
    clock = time.perf_counter
    for rnd in range(-2, max(1, iterations // chunk)):  # two rounds of warm-up
        for label, (mode, update, graphs) in ways.items():
            backend.cuda_graphs = mode
            backend.graph_update = update
            for _ in range(chunk):
                graph = graphs[turn[label] % len(graphs)]
                turn[label] += 1
                t0 = clock()
                backend.submit(1, graph, 0.0, 0)
                t1 = clock()
                done: list[Completion] = []
                while not done:
                    done = backend.poll()
                t2 = clock()
                timings = done[0].timings
                if done[0].error is not None or timings is None:
                    raise done[0].error or errors.InternalError("no timings")
                if rnd >= 0:
                    lat[label].append(t2 - t0)
                    enqueue[label].append(t1 - t0)
                    kernels[label].append(timings.kernels)
    backend.graph_update = "nodes"
    return {label: {**us(lat[label]), "submit_p50": us(enqueue[label])["p50"],
                    "gpu_kernels_p50": us(kernels[label])["p50"]} for label in ways}


_REPLAY_SOURCE = _NULL_SOURCE + b"""
extern "C" __global__ void kaas_sc_vadd(const float* a, const float* b, float* c, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) c[i] = a[i] + b[i];
}
"""


def _replay_report(backend: CudaBackend, iterations: int, us: Callable[[list[float]], dict[str, float]],
                   sweep: bool) -> dict[str, Any]:
    """submit+poll with CUDA graph replay off, on and auto: null graph, 1-KiB vadd, 20-kernel chain."""
    import numpy as np

    from ..protocol import Buf
    from .wire import ExecBuffer, ExecKernel

    lib = "selfcheck-replay"
    vadd_params = (Param("a", "buf"), Param("b", "buf"), Param("c", "buf"), Param("n", "i32"))
    backend.load_library(lib, "cuda", _REPLAY_SOURCE,
                         (KernelSpec("kaas_direct_null", ()), KernelSpec("kaas_sc_vadd", vadd_params)), ())
    n, arena_size = 256, 1 << 20
    maps: dict[int, mmap.mmap] = {}
    for arena in (11, 12):
        fd = os.memfd_create(f"kaas-selfcheck-{arena}")
        os.ftruncate(fd, arena_size)
        maps[arena] = mmap.mmap(fd, arena_size)
        backend.pin_arena(arena, fd, arena_size)

    def buffers(arena: int, at: int) -> tuple[ExecBuffer, ...]:
        return tuple(ExecBuffer(kind, "float32", (n,), 4 * n, arena, at + 4096 * i)
                     for i, kind in enumerate(("in", "in", "out")))

    def vadd(x: int, y: int, z: int) -> ExecKernel:
        return ExecKernel(lib, "kaas_sc_vadd", (1, 1, 1), (256, 1, 1), 0, (Buf(x), Buf(y), Buf(z), Lit("i32", n)))

    def chain(length: int, arena: int = 11, at: int = 0, count: int = n) -> ExecGraph:
        first = ExecKernel(lib, "kaas_sc_vadd", (1, 1, 1), (256, 1, 1), 0, (Buf(0), Buf(1), Buf(2), Lit("i32", count)))
        return ExecGraph(buffers(arena, at), (first,) + (vadd(2, 1, 2),) * (length - 1))

    null_kernel = ExecKernel(lib, "kaas_direct_null", (1, 1, 1), (1, 1, 1), 0, ())
    graphs = {"null": ExecGraph((), (null_kernel,)), "vadd_1KiB": chain(1), "chain20": chain(20)}
    result: dict[str, Any] = {}
    saved = backend.cuda_graphs
    try:
        for name, graph in graphs.items():
            result[name] = _compare(backend, {mode: (mode, "nodes", [graph]) for mode in ("off", "on", "auto")},
                                    iterations, us)
        # The 20-kernel chain gives the same numbers both ways, on fresh data.
        rng = np.random.default_rng()
        a, b, c = (np.frombuffer(maps[11], np.float32, n, 4096 * i) for i in range(3))
        for mode in ("off", "on"):
            backend.cuda_graphs = mode
            for _ in range(3):
                a[:] = rng.standard_normal(n, dtype=np.float32)
                b[:] = rng.standard_normal(n, dtype=np.float32)
                _run_one(backend, graphs["chain20"])
                want = a + b
                for _ in range(19):
                    want = want + b
                if not np.array_equal(c, want):
                    raise errors.InternalError(f"20-kernel chain with cuda_graphs={mode} computed a wrong result")
        del a, b, c
        result["chain20_same_result_both_ways"] = True
        result["chain20_gpu_kernels_p50_us"] = {mode: result["chain20"][mode]["gpu_kernels_p50"] for mode in ("off", "on")}
        if sweep:
            result["sweep"] = _replay_sweep(backend, iterations // 2, us, chain, null_kernel)
        result["stats"] = dict(backend.graph_stats)
    finally:
        backend.cuda_graphs = saved
        for arena, m in maps.items():
            backend.unpin_arena(arena)
            m.close()
    return result


def _replay_sweep(backend: CudaBackend, iterations: int, us: Callable[[list[float]], dict[str, float]],
                  chain: Callable[..., ExecGraph], null_kernel: Any) -> dict[str, Any]:
    """submit+poll p50 direct vs replayed: by chain length, with moving arenas, with pool memory."""
    out: dict[str, Any] = {}

    def p50(ways: dict[str, tuple[str, str, list[ExecGraph]]]) -> dict[str, float]:
        return {label: round(r["p50"], 2) for label, r in _compare(backend, ways, iterations, us).items()}

    for name, make in (("vadd_chain", chain), ("null_chain", lambda k: ExecGraph((), (null_kernel,) * k))):
        out[f"{name}_p50_us"] = {
            str(k): p50({"off": ("off", "nodes", [make(k)]), "on": ("on", "nodes", [make(k)])})
            for k in (1, 2, 3, 4, 6, 8, 12, 20)}
    moving: dict[str, Any] = {}
    for k in (1, 2, 3, 20):
        # Four different host addresses for one shape, in turn: two arenas, two offsets each.
        g = [chain(k, arena, at) for arena in (11, 12) for at in (0, 16384)]
        moving[str(k)] = p50({"off": ("off", "nodes", g), "on (set memcpy nodes)": ("on", "nodes", g),
                              "on (capture + cuGraphExecUpdate)": ("on", "capture", g), "auto": ("auto", "nodes", g)})
    out["moving_arenas_p50_us"] = moving
    # What the one capture of a shape costs: the second run of 40 new shapes each (submit+poll).
    backend.cuda_graphs = "on"
    capture: dict[str, Any] = {}
    for k in (1, 20):
        times: list[float] = []
        for i in range(40):
            fresh = chain(k, count=255 - i - 100 * (k > 1))  # a shape not seen before
            _run_one(backend, fresh)
            t0 = time.perf_counter()
            _run_one(backend, fresh)
            times.append(time.perf_counter() - t0)
        capture[str(k)] = us(times)
    out["capture_run_us"] = capture
    slab = backend.lane_slab
    backend.lane_slab = 0  # every graph's memory from the pool: its base may move between runs
    before = dict(backend.graph_stats)
    out["pool_memory_p50_us"] = {str(k): p50({"off": ("off", "nodes", [chain(k)]), "on": ("on", "nodes", [chain(k)])})
                                 for k in (1, 20)}
    out["pool_memory_stats"] = {key: value - before[key] for key, value in backend.graph_stats.items()}
    backend.lane_slab = slab
    return out


def _call_costs(backend: CudaBackend, host: int, iterations: int) -> dict[str, float]:
    """Median microseconds of each driver call a small graph is enqueued with (1 KiB copies)."""
    lane = backend._lanes[0]
    s, ev = lane.stream, lane.events
    dev = backend._alloc(1 << 20, "call costs")
    d = driver
    calls: dict[str, Callable[[], Any]] = {
        "cuEventRecord": lambda: d.cuEventRecord(ev[0], s),
        "cuMemcpyHtoDAsync": lambda: d.cuMemcpyHtoDAsync(dev, host, 1024, s),
        "cuMemsetD8Async": lambda: d.cuMemsetD8Async(dev, 0, 1024, s),
        "cuMemcpyDtoHAsync": lambda: d.cuMemcpyDtoHAsync(host, dev, 1024, s),
        "cuMemAllocFromPoolAsync+cuMemFreeAsync": lambda: d.cuMemFreeAsync(
            d.cuMemAllocFromPoolAsync(4096, backend._pool, s)[1], s),
        "cuEventQuery": lambda: d.cuEventQuery(ev[0]),
        "cuEventElapsedTime": lambda: d.cuEventElapsedTime(ev[0], ev[0]),
    }
    clock = time.perf_counter
    result: dict[str, float] = {}
    for name, call in calls.items():
        times: list[float] = []
        for i in range(iterations):
            t0 = clock()
            err = call()[0]
            times.append(clock() - t0)
            if err:
                raise _error(err, name)
            if i % 128 == 127:
                _check(d.cuStreamSynchronize(s))
        _check(d.cuStreamSynchronize(s))
        times.sort()
        result[name] = times[len(times) // 2] * 1e6
    d.cuMemFree(dev)
    return result


def _launch_costs(backend: CudaBackend, iterations: int) -> dict[str, float]:
    """Median seconds of one cuLaunchKernel call (4 arguments) per way of passing the arguments."""
    source = b'extern "C" __global__ void kaas_args(const float* a, const float* b, float* c, int n) {}\n'
    params = tuple(Param(x, "buf") for x in "abc") + (Param("n", "i32"),)
    backend.load_library("selfcheck-args", "cuda", source, (KernelSpec("kaas_args", params),), ())
    function = backend._libraries["selfcheck-args"].functions["kaas_args"]
    stream = backend._lanes[0].stream
    ptrs = [backend._alloc(1024, "launch test") for _ in range(3)]
    packer = struct.Struct("<QQQi4x")
    argbuf = ctypes.create_string_buffer(32)
    slots = (ctypes.c_void_p * 4)(*(ctypes.addressof(argbuf) + 8 * i for i in range(4)))
    addr = ctypes.addressof(slots)
    types = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
    launch = driver.cuLaunchKernel
    clock = time.perf_counter
    result: dict[str, float] = {}
    for way in ("tuple", "packed", "tuple", "packed"):
        times: list[float] = []
        for i in range(iterations):
            t0 = clock()
            if way == "tuple":
                err = launch(function, 1, 1, 1, 32, 1, 1, 0, stream, ((ptrs[0], ptrs[1], ptrs[2], i), types), 0)[0]
            else:
                packer.pack_into(argbuf, 0, ptrs[0], ptrs[1], ptrs[2], i)
                err = launch(function, 1, 1, 1, 32, 1, 1, 0, stream, addr, 0)[0]
            times.append(clock() - t0)
            if err:
                raise _error(err, f"launch ({way})")
            if i % 256 == 255:
                _check(driver.cuStreamSynchronize(stream))
        _check(driver.cuStreamSynchronize(stream))
        times.sort()
        result[way] = times[len(times) // 2] * 1e6  # the second round of each way wins: warm
    for p in ptrs:
        driver.cuMemFree(p)
    return result


if __name__ == "__main__":
    raise SystemExit(_selfcheck())
