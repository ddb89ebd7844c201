"""Binary records of the hot path: a run and its completion, as they travel on the rings. Pure.

Records are fixed-layout little-endian structs, so that decoding one costs two or three
``struct`` calls and no allocation of graph-sized objects.  A record from a tenant is
untrusted: ``decode_run`` checks its length against the counts it declares before reading
anything else, and the caller checks every value it then uses (``broker.graph.bind``).

Run record (tenant -> broker, and broker -> worker)::

    offset size
      0    u8   kind           1 = run
      1    u8   flags          bit 0: trace
      2    u16  pairs          arena slices that follow (arena, offset)
      4    u16  nvalues        literal values that follow
      6    u16  priority       (broker -> worker) the lane class; 0 from tenants
      8    u32  handle         prepared graph: the session's handle, or the broker's global one
     12    u64  id             the tenant's request id, or the worker command's seq
     20    u64  barrier        (broker -> worker) the last socket command the run must follow
     28    f64  timeout        seconds (tenant: the run's timeout; worker: its deadline)
     36    i64 x 2*pairs       arena id, offset for each arena buffer, in buffer order
      .    8 x nvalues         literal values: i64 for signed, u64 for unsigned, f64 for floats

Completion record (broker -> tenant, and worker -> broker)::

      0    u8   kind           1 = done, 2 = failed (the typed error follows on the socket)
      1    u8   ntrace         trace stamps that follow
      2    u16  device         index into the welcome's devices (tenant side), else 0
      4    u32  flags          bit 0: the device is the tenant's dedicated worker
      8    u64  id             request id / command seq
     16    f64 x 5             timings: queued, copy_in, kernels, copy_out, total
     56    f64 x ntrace        trace stamps
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence

from . import errors

RUN, DONE, FAILED = 1, 1, 2
TRACE = 1
DEDICATED = 1

RUN_HEAD = struct.Struct("<BBHHHIQQd")
DONE_HEAD = struct.Struct("<BBHIQ5d")
MAX_PAIRS = 0xFFFF
_INT = {"i32": "q", "i64": "q", "u32": "Q", "u64": "Q", "f32": "d", "f64": "d"}


def MalformedRecord(message: str, detail: dict[str, int] | None = None) -> errors.MalformedFrame:
    """A ring record whose layout does not hold (lengths, counts, kind): a malformed frame."""
    return errors.MalformedFrame(message, detail=detail)


@functools.lru_cache(maxsize=4096)
def values_struct(kinds: tuple[str, ...]) -> struct.Struct:
    """How the literal values of a graph with these literal ``kinds`` are laid out."""
    return struct.Struct("<" + "".join(_INT[k] for k in kinds))


@functools.lru_cache(maxsize=1024)
def _slices_struct(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}q")


@functools.lru_cache(maxsize=64)
def _trace_struct(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}d")


def policy_deadline(timeout: float, policy_max: float) -> float:
    """A run's deadline in seconds from its request's ``timeout`` and its tenant's cap (0: none)."""
    if timeout > 0:
        return min(timeout, policy_max) if policy_max > 0 else timeout
    return max(policy_max, 0.0)


def run_limit(timeout: float, policy_max: float, config_max: float) -> float:
    """The time a run may take on a device: its deadline, capped by the broker's ``max_graph_seconds``."""
    d = policy_deadline(timeout, policy_max)
    return min(d, config_max) if d > 0 else config_max


def run_size(pairs: int, nvalues: int) -> int:
    return RUN_HEAD.size + 16 * pairs + 8 * nvalues


@functools.lru_cache(maxsize=4096)
def run_struct(pairs: int, kinds: tuple[str, ...]) -> struct.Struct:
    """The whole layout of a run record of a graph with ``pairs`` arena buffers and these literal kinds."""
    return struct.Struct(RUN_HEAD.format + f"{2 * pairs}q" + "".join(_INT[k] for k in kinds))


def encode_run(st: struct.Struct, ident: int, handle: int, slices: Sequence[int], values: Sequence[int | float],
               timeout: float, *, trace: bool = False, barrier: int = 0, priority: int = 0) -> bytes:
    """A run record; ``st`` is the graph's ``run_struct``."""
    return st.pack(RUN, TRACE if trace else 0, len(slices) // 2, len(values), priority, handle, ident, barrier,
                   timeout, *slices, *values)


def decode_run(rec: bytes) -> tuple[int, int, int, int, int, float, tuple[int, ...], int, int]:
    """``(id, handle, flags, priority, barrier, timeout, slices, nvalues, values_at)`` of a run record.

    The values are left in ``rec`` at ``values_at``: only the prepared graph knows their types
    (``decode_values``).  Raises MalformedRecord when the record is not what it says it is.
    """
    if len(rec) < RUN_HEAD.size:
        raise MalformedRecord(f"ring record of {len(rec)} bytes is shorter than a run's header")
    kind, flags, pairs, nvalues, priority, handle, ident, barrier, timeout = RUN_HEAD.unpack_from(rec, 0)
    if kind != RUN:
        raise MalformedRecord(f"ring record of kind {kind} is not a run", detail={"req": ident})
    if len(rec) != run_size(pairs, nvalues):
        raise MalformedRecord(f"run record of {len(rec)} bytes does not hold {pairs} slices and {nvalues} values",
                              detail={"req": ident})
    slices = _slices_struct(2 * pairs).unpack_from(rec, RUN_HEAD.size) if pairs else ()
    return ident, handle, flags, priority, barrier, timeout, slices, nvalues, RUN_HEAD.size + 16 * pairs


def decode_values(rec: bytes, at: int, nvalues: int, vstruct: struct.Struct) -> tuple[int | float, ...]:
    """The literal values of a run record, typed by the graph's ``values_struct``."""
    if nvalues * 8 != vstruct.size:
        raise errors.ArgumentError(f"the graph has {vstruct.size // 8} literal argument(s), got {nvalues} value(s)")
    return vstruct.unpack_from(rec, at) if nvalues else ()


def encode_done(ident: int, timings: Sequence[float], trace: Sequence[float] = (), *, device: int = 0,
                flags: int = 0, failed: bool = False) -> bytes:
    """A completion record: ``timings`` are the five stage times (see ``protocol.Timings``)."""
    if not trace:
        return DONE_HEAD.pack(FAILED if failed else DONE, 0, device, flags, ident, *timings)
    buf = bytearray(DONE_HEAD.size + 8 * len(trace))
    DONE_HEAD.pack_into(buf, 0, FAILED if failed else DONE, len(trace), device, flags, ident, *timings)
    _trace_struct(len(trace)).pack_into(buf, DONE_HEAD.size, *trace)
    return bytes(buf)


def decode_done(rec: bytes) -> tuple[int, int, int, int, tuple[float, ...], tuple[float, ...]]:
    """``(kind, id, device, flags, timings, trace)`` of a completion record."""
    if len(rec) < DONE_HEAD.size:
        raise MalformedRecord(f"ring record of {len(rec)} bytes is shorter than a completion")
    kind, ntrace, device, flags, ident, *timings = DONE_HEAD.unpack_from(rec, 0)
    if kind not in (DONE, FAILED) or len(rec) != DONE_HEAD.size + 8 * ntrace:
        raise MalformedRecord(f"completion record of kind {kind}, {len(rec)} bytes, is malformed")
    trace = _trace_struct(ntrace).unpack_from(rec, DONE_HEAD.size) if ntrace else ()
    return kind, ident, device, flags, tuple(timings), trace
