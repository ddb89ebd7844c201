"""The kaas wire protocol: message types and framing. Pure: bytes in, messages out.

A frame is a 4-byte little-endian body length followed by a msgpack body (msgspec,
array-like structs tagged by their first element).  The length is checked against the
maximum frame size before a byte of the body is buffered.

Conversation::

    tenant                                broker
    Hello(version, client)          ->
                                    <-    Welcome(version, session, tenant, ...) | Error
    RegisterArena(req, size) + fd   ->    (fd rides on the same sendmsg, SCM_RIGHTS)
    RunGraph(req, graph, timeout)   ->    any number in flight, matched by ``req``
                                    <-    GraphDone(req, ...) | Error(req, code, ...)
    PrepareGraph(req, graph)        ->    validate a graph's structure once
                                    <-    GraphPrepared(req, handle, ...)
    RunPrepared(req, handle, slices, values, timeout)
                                    ->    run it with only its bindings
                                    <-    GraphDone(req, ...) | Error(req, code, ...)
    ReleaseGraph(req, handle)       ->    <- Done(req)
    OpenRings(req)                  ->    <- RingsOpened(req, slots, slot_size) + 3 fds:
                                          from then on RunPrepared may also travel as ring
                                          records, and GraphDone as completion records
                                          (``broker.records``); errors stay on the socket

Every request carries a tenant-chosen ``req`` id (> 0) and gets exactly one reply with
the same id.  ``Error.req == 0`` answers a frame whose id could not be read.
"""

from __future__ import annotations

import struct
from typing import Any, Literal, Union

import msgspec

from . import errors

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
HEADER = struct.Struct("<I")
HEADER_SIZE = HEADER.size

ScalarType = Literal["i32", "i64", "u32", "u64", "f32", "f64"]
SCALAR_TYPES: tuple[str, ...] = ("i32", "i64", "u32", "u64", "f32", "f64")
Access = Literal["in", "out", "inout"]
BufferKind = Literal["in", "out", "inout", "temp", "resident"]
LibraryFormat = Literal["cuda", "cubin", "ptx", "fatbin"]
DTYPES: tuple[str, ...] = (
    "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64",
)


# Where a traced request is stamped (CLOCK_MONOTONIC seconds, comparable across processes of
# one host). The tenant adds the first and last; GraphDone.trace carries the ones between.
TRACE_POINTS = ("tenant_send", "broker_recv", "broker_dispatch", "worker_recv", "worker_launched",
                "worker_done", "broker_reply", "tenant_recv")


HOPS = ("tenant -> broker", "broker decode/validate/schedule", "broker -> worker", "launch",
        "device + completion detection", "worker -> broker", "broker -> tenant")


# A run on the direct path (broker/leases.py) skips the broker: tenant_send, worker_recv,
# worker_launched, worker_done, tenant_recv.
DIRECT_HOPS = ("tenant -> worker", "launch", "device + completion detection", "worker -> tenant")


def trace_hops(stamps: tuple[float, ...] | list[float]) -> dict[str, float]:
    """Seconds spent in each hop of a traced request, from its TRACE_POINTS stamps (or a direct run's)."""
    if len(stamps) == len(DIRECT_HOPS) + 1:
        return {h: b - a for h, a, b in zip(DIRECT_HOPS, stamps, stamps[1:], strict=False)}
    if len(stamps) != len(TRACE_POINTS):
        return {}
    return {h: b - a for h, a, b in zip(HOPS, stamps, stamps[1:], strict=False)}


class _Base(msgspec.Struct, array_like=True, tag=True, frozen=True, omit_defaults=False):
    pass


# -- pieces of messages -------------------------------------------------------------------
class Param(msgspec.Struct, array_like=True, frozen=True):
    """One kernel parameter: a scalar (``kind`` in SCALAR_TYPES) or a buffer (``kind == 'buf'``).

    A buffer parameter has an ``access`` mode and may pin a ``dtype`` ('' accepts any).
    """

    name: str
    kind: str
    access: str = ""
    dtype: str = ""


class KernelSpec(msgspec.Struct, array_like=True, frozen=True):
    """A kernel's signature and, optionally, its host implementation ``module:function``."""

    name: str
    params: tuple[Param, ...]
    host: str = ""


class Buf(msgspec.Struct, array_like=True, frozen=True, tag="b"):
    """A kernel argument naming buffer ``index`` of the graph."""

    index: int


class Lit(msgspec.Struct, array_like=True, frozen=True, tag="l"):
    """A literal kernel argument of scalar type ``dtype`` (one of SCALAR_TYPES)."""

    dtype: str
    value: int | float


Arg = Union[Buf, Lit]


class BufferSpec(msgspec.Struct, array_like=True, frozen=True):
    """A buffer of a graph.

    ``in``/``out``/``inout``: ``nbytes`` at ``offset`` of the session's arena ``arena``.
    ``temp``: device-only, ``nbytes`` long, zeroed, lives for one request.
    ``resident``: the session's resident buffer ``resident`` (its digest, hex).
    """

    kind: str
    dtype: str
    shape: tuple[int, ...]
    arena: int = 0
    offset: int = 0
    resident: str = ""


class KernelNode(msgspec.Struct, array_like=True, frozen=True):
    library: str
    kernel: str
    grid: tuple[int, ...]
    block: tuple[int, ...]
    args: tuple[Arg, ...]
    shared: int = 0
    deps: tuple[int, ...] = ()


class GraphSpec(msgspec.Struct, array_like=True, frozen=True):
    buffers: tuple[BufferSpec, ...]
    kernels: tuple[KernelNode, ...]


class Timings(msgspec.Struct, array_like=True, frozen=True):
    """Seconds spent in each stage of one graph. ``kernels`` is the device time charged."""

    queued: float = 0.0
    copy_in: float = 0.0
    kernels: float = 0.0
    copy_out: float = 0.0
    total: float = 0.0


# -- tenant -> broker -----------------------------------------------------------------
class Hello(_Base, tag="hello", frozen=True):
    version: int
    client: str = ""
    token: str = ""  # a job's identity where many jobs share one uid (config: token_sha256); never logged


class RegisterArena(_Base, tag="arena", frozen=True):
    """Hand over the shared-memory segment sent with this frame (SCM_RIGHTS) of ``size`` bytes."""

    req: int
    size: int


class ReleaseArena(_Base, tag="arena_release", frozen=True):
    req: int
    arena: int


class RegisterLibrary(_Base, tag="library", frozen=True):
    req: int
    format: str
    data: bytes
    kernels: tuple[KernelSpec, ...]
    name: str = ""
    options: tuple[str, ...] = ()


class PutResident(_Base, tag="resident", frozen=True):
    """Make ``nbytes`` at ``offset`` of ``arena`` a resident buffer; ``digest`` is its blake2b-256."""

    req: int
    arena: int
    offset: int
    nbytes: int
    digest: bytes


class ReleaseResident(_Base, tag="resident_release", frozen=True):
    req: int
    resident: str


class Prefetch(_Base, tag="prefetch", frozen=True):
    """Put one of this tenant's residents on ``device`` (``""``: the broker's choice) before it is used."""

    req: int
    resident: str
    device: str = ""


class RunGraph(_Base, tag="run", frozen=True):
    """Run ``graph``; ``trace`` asks for the per-hop timestamps in the reply (TRACE_POINTS)."""

    req: int
    graph: GraphSpec
    timeout: float = 0.0
    trace: bool = False


class PrepareGraph(_Base, tag="prepare", frozen=True):
    """Validate ``graph``'s structure once; the reply's handle runs it with new bindings.

    The arena slices and literal values in ``graph`` are not part of what is prepared: each
    RunPrepared brings its own.
    """

    req: int
    graph: GraphSpec


class RunPrepared(_Base, tag="prun", frozen=True):
    """Run prepared graph ``handle``: ``slices`` is (arena, offset) for each in/out/inout buffer,
    in buffer order; ``values`` the literal arguments in kernel and argument order."""

    req: int
    handle: int
    slices: tuple[int, ...] = ()
    values: tuple[int | float, ...] = ()
    timeout: float = 0.0
    trace: bool = False


class ReleaseGraph(_Base, tag="graph_release", frozen=True):
    req: int
    handle: int


class OpenRings(_Base, tag="rings", frozen=True):
    """Ask for the session's shared-memory rings (runs in, completions out); see ``broker.ring``."""

    req: int


class Ping(_Base, tag="ping", frozen=True):
    req: int


class Status(_Base, tag="status", frozen=True):
    req: int


class Admin(_Base, tag="admin", frozen=True):
    """An administrator's command (root or the configured admin group): see ``broker.admin``."""

    req: int
    command: str
    args: dict[str, Any] = {}


TenantMessage = Union[
    Hello, RegisterArena, ReleaseArena, RegisterLibrary, PutResident, ReleaseResident, Prefetch,
    RunGraph, PrepareGraph, RunPrepared, ReleaseGraph, OpenRings, Ping, Status, Admin,
]


# -- broker -> tenant -----------------------------------------------------------------
class Welcome(_Base, tag="welcome", frozen=True):
    version: int
    session: int
    tenant: str
    max_frame: int
    devices: tuple[str, ...]
    spin_us: int = 0  # how long the broker suggests a client busy-polls for a reply
    archs: tuple[str, ...] = ()  # per device: the sm_XY it runs CUBINs of ('' for the CPU device)


class ArenaRegistered(_Base, tag="arena_ok", frozen=True):
    req: int
    arena: int


class LibraryRegistered(_Base, tag="library_ok", frozen=True):
    req: int
    library: str
    cached: bool
    log: str = ""


class ResidentRegistered(_Base, tag="resident_ok", frozen=True):
    req: int
    resident: str
    cached: bool


class Done(_Base, tag="ok", frozen=True):
    """The reply to a request that returns nothing but success."""

    req: int


class GraphDone(_Base, tag="graph_ok", frozen=True):
    req: int
    device: str
    timings: Timings
    trace: tuple[float, ...] = ()  # time.perf_counter() stamps at TRACE_POINTS[1:-1], when asked


class GraphPrepared(_Base, tag="prepared", frozen=True):
    """``handle`` names the prepared graph in this session; ``slices``/``literals`` say how many
    binding numbers a run carries (2 per arena buffer) and the type of each literal."""

    req: int
    handle: int
    slices: int
    literals: tuple[str, ...] = ()


class RingsOpened(_Base, tag="rings_ok", frozen=True):
    """The session's rings: three fds ride on this frame (SCM_RIGHTS), in order: the ring
    segment (ring 0: runs, tenant -> broker; ring 1: completions, broker -> tenant; ring 2, when
    ``rings`` is 3: completions from a device worker, the direct path), the eventfd that wakes
    the broker (or the worker reading ring 0) and the one that wakes the tenant."""

    req: int
    slots: int
    slot_size: int
    rings: int = 2


class Pong(_Base, tag="pong", frozen=True):
    req: int


class Prefetched(_Base, tag="prefetched", frozen=True):
    req: int
    device: str


class StatusReply(_Base, tag="status_ok", frozen=True):
    req: int
    info: dict[str, Any]


class Error(_Base, tag="error", frozen=True):
    req: int
    code: str
    message: str
    detail: dict[str, Any] = {}


BrokerMessage = Union[
    Welcome, ArenaRegistered, LibraryRegistered, ResidentRegistered, Done, GraphDone, GraphPrepared,
    RingsOpened, Pong, Prefetched, StatusReply, Error,
]

TENANT_TAGS = frozenset(t.__struct_config__.tag for t in TenantMessage.__args__)  # type: ignore[attr-defined]


# -- encoding ---------------------------------------------------------------------------
_encoder = msgspec.msgpack.Encoder()
_tenant_decoder = msgspec.msgpack.Decoder(TenantMessage)
_broker_decoder = msgspec.msgpack.Decoder(BrokerMessage)
_raw_decoder = msgspec.msgpack.Decoder()


def encode(msg: msgspec.Struct) -> bytes:
    """One frame: header + body."""
    buf = bytearray(HEADER_SIZE)
    _encoder.encode_into(msg, buf, HEADER_SIZE)
    HEADER.pack_into(buf, 0, len(buf) - HEADER_SIZE)
    return bytes(buf)


def error_frame(req: int, err: errors.KaasError) -> bytes:
    return encode(Error(req, err.code, err.message or str(err), err.detail))


def _classify(body: bytes | memoryview, exc: Exception, known: frozenset[str] | None) -> errors.ProtocolError:
    """Turn a decode failure into the most precise typed error, with the request id if readable."""
    req = 0
    try:
        raw = _raw_decoder.decode(body)
    except (msgspec.DecodeError, ValueError, RecursionError):  # invalid UTF-8; absurd nesting
        return errors.MalformedFrame(f"malformed frame: body is not msgpack ({exc})")
    if isinstance(raw, list) and raw:
        if len(raw) > 1 and isinstance(raw[1], int) and not isinstance(raw[1], bool):
            req = raw[1] if 0 < raw[1] < 2**63 else 0
        tag = raw[0]
        if known is not None and (not isinstance(tag, str) or tag not in known):
            err: errors.ProtocolError = errors.UnknownMessage(f"unknown message type {tag!r}")
            err.detail["req"] = req
            return err
    err = errors.MalformedFrame(f"malformed frame: {exc}")
    err.detail["req"] = req
    return err


def decode_tenant(body: bytes | memoryview) -> TenantMessage:
    """Decode a tenant frame body; raises MalformedFrame / UnknownMessage (``detail['req']``)."""
    try:
        return _tenant_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError) as exc:
        raise _classify(body, exc, TENANT_TAGS) from None


def decode_broker(body: bytes | memoryview) -> BrokerMessage:
    try:
        return _broker_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError) as exc:
        raise _classify(body, exc, None) from None


class FrameDecoder:
    """Splits a byte stream into frame bodies.

    ``feed()`` returns the complete bodies so far.  A header announcing more than
    ``max_frame`` bytes raises FrameTooLarge before anything of the body is kept; the
    stream cannot be resynchronised after that, so the caller must close it.
    """

    __slots__ = ("_buf", "_need", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need = -1  # body length of the frame being read; -1 while reading a header

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        buf = self._buf
        pos = 0
        n = len(buf)
        while True:
            if self._need < 0:
                if n - pos < HEADER_SIZE:
                    break
                (length,) = HEADER.unpack_from(buf, pos)
                if length > self.max_frame:
                    del buf[:]
                    raise errors.FrameTooLarge(
                        f"frame of {length} bytes exceeds the maximum frame size of {self.max_frame} bytes",
                        detail={"size": length, "max_frame": self.max_frame},
                    )
                pos += HEADER_SIZE
                self._need = length
            if n - pos < self._need:
                break
            out.append(bytes(buf[pos:pos + self._need]))
            pos += self._need
            self._need = -1
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back (non-zero at EOF means a truncated frame)."""
        return len(self._buf) + (HEADER_SIZE if self._need >= 0 else 0)
