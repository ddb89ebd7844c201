"""Single-producer single-consumer rings in shared memory: the hot path's transport.

Runs and their completions travel through these rings (tenant <-> broker, broker <-> device
worker), polled while busy and woken by an eventfd when idle.  The peer may be hostile (a
tenant) or die mid-write (a worker), so nothing read from shared memory is trusted: each side
keeps its own index in a Python int, reads only the peer's index, and validates it.

Layout
------
A *segment* is one memfd (``MFD_CLOEXEC | MFD_ALLOW_SEALING``) holding ``geom.rings`` rings back
to back, sealed with ``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`` so that no one can truncate it
under a mapping (a truncated mapping would SIGBUS the reader).  Ring ``i`` starts at
``geom.offset(i) = i * geom.ring_bytes``; ``ring_bytes`` is the 256-byte header plus
``slots * slot_size`` bytes, rounded up to 64.  All integers are little-endian.

Header, each field group on its own 64-byte cache line::

    offset  size  field      written by  meaning
    0       8     magic      creator     b"KAASRING"   } informational only: the geometry is
    8       4     version    creator     1             } NEVER read back from shared memory,
    12      4     slots      creator     slot count    } each side is told it over a trusted
    16      4     slot_size  creator     bytes a slot  } channel
    32      4     spin_hint  creator     the busy-poll (us) the creator advises this ring's consumer now:
                                         a hint, read by the consumer before it waits (0: do not spin)
    64      8     head       producer    records published (a count, never wrapped)
    128     8     tail       consumer    records consumed
    192     4     sleeping   consumer    1 while the consumer is asleep or about to be
    256     ...   slots      producer    ``slots * slot_size`` bytes

A slot is a u32 record length followed by the payload; the payload is 1 to ``slot_size - 4``
bytes (zero-length records are refused: a length of 0 in a published slot means corruption).
Record ``i`` lives in slot ``i & (slots - 1)``.  ``slots`` is a power of two, ``slot_size`` a
multiple of 8 and at least 16.

Protocol
--------
- Producer: write length + payload into slot ``head``, then store ``head + 1``.  A worker killed
  mid-write therefore leaves no half record visible.  It reads ``tail`` only when its cached copy
  says the ring is full, and checks ``old tail <= tail <= head``.
- Consumer: read ``head`` (only when its cached copy says the ring is empty) and check
  ``old head <= head <= tail + slots``; read the length and check ``0 < length <= max payload``;
  copy the record out of shared memory (the peer may rewrite the slot); store ``tail + 1``.
  Any broken check raises :class:`RingCorrupt`: drop the peer, the ring is beyond repair.
- The data path needs no fence on x86-64 (TSO: stores are not reordered with stores, loads not
  with loads, and each index has one writer).  Other architectures would need release/acquire
  around the index stores and loads; this module assumes x86-64.
- Sleep/wake is Dekker's handshake and needs a full fence on both sides (a store followed by a
  load of the other side's word): the consumer stores ``sleeping = 1``, fences, re-reads ``head``
  and sleeps on its eventfd only if still empty; the producer stores ``head``, fences, reads
  ``sleeping`` and writes the eventfd if it is set.  Either the producer sees the flag or the
  consumer sees the record, so no wake-up is lost.  A CPython ``Lock`` acquire + release is a
  locked instruction, which is a full fence on x86.

Indices and the length word are read and written through ``memoryview.cast`` views (one aligned
8- or 4-byte access each, and about twice as fast as ``struct.pack_into`` on the mmap); payloads
are copied with mmap slicing.  There is no zero-copy ``push_struct``: packing straight into the
slot measured slower than ``push(st.pack(...))`` (the ``*values`` call costs more than the bytes
object).  Because of those views, close the :class:`Producer` and
:class:`Consumer` over a mapping before closing the mapping itself.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import select
import stat
import struct
import threading
import time
from dataclasses import dataclass

from broker import errors

__all__ = [
    "RingCorrupt", "RingGeometry", "Producer", "Consumer", "create_segment", "map_segment",
    "make_eventfd", "wake", "drain", "wait_readable", "published", "MAGIC", "VERSION", "HEADER_BYTES",
]

MAGIC = b"KAASRING"
VERSION = 1
HEADER_BYTES = 256
_LINE = 64
_LEN_BYTES = 4

# Positions in the header's u64 view (head, tail) and u32 view (sleeping).
_HEAD_Q = 64 // 8
_TAIL_Q = 128 // 8
_SLEEPING_I = 192 // 4
_SPIN_HINT_I = 32 // 4
_INFO = struct.Struct("<8sIII")

# Sanity limits on a geometry, so a bad configuration fails loudly instead of allocating wildly.
MAX_SLOTS = 1 << 20
MAX_SLOT_SIZE = 1 << 24
MAX_RINGS = 64
MAX_SEGMENT_BYTES = 1 << 30

# linux/fcntl.h
_F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x0001)
_F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
_F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x0004)
_F_SEAL_WRITE = getattr(fcntl, "F_SEAL_WRITE", 0x0008)
_F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)

# A wait on an eventfd wakes at least this often to re-check the ring, so even a peer that
# never writes the eventfd (dead, or hostile) cannot make a wait unbounded.  Tests raise it to
# prove that the handshake alone never loses a wake-up.
RECHECK_INTERVAL = 0.1

# A full memory fence is ``_lock_acquire(); _lock_release()`` (a locked instruction on x86): it
# orders a store before a later load.  Inlined where used, a function call costs as much again.
_fence_lock = threading.Lock()
_lock_acquire = _fence_lock.acquire
_lock_release = _fence_lock.release


class RingCorrupt(errors.ProtocolError):
    """The peer broke the ring's invariants (an index out of range, a bad record length, a bad
    segment): the ring cannot be trusted any more; drop the peer."""

    code = "ring_corrupt"


@dataclass(frozen=True)
class RingGeometry:
    """The shape of a segment: ``rings`` rings of ``slots`` slots of ``slot_size`` bytes each.

    Both sides get it over a trusted channel; it is never read back from shared memory.
    """

    slots: int
    slot_size: int
    rings: int = 2

    def __post_init__(self) -> None:
        for name in ("slots", "slot_size", "rings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"RingGeometry.{name} must be an int, not {value!r}")
        if not 2 <= self.slots <= MAX_SLOTS or self.slots & (self.slots - 1):
            raise ValueError(f"RingGeometry.slots must be a power of two from 2 to {MAX_SLOTS}, not {self.slots}")
        if not 16 <= self.slot_size <= MAX_SLOT_SIZE or self.slot_size % 8:
            raise ValueError(
                f"RingGeometry.slot_size must be a multiple of 8 from 16 to {MAX_SLOT_SIZE}, not {self.slot_size}"
            )
        if not 1 <= self.rings <= MAX_RINGS:
            raise ValueError(f"RingGeometry.rings must be from 1 to {MAX_RINGS}, not {self.rings}")
        if self.segment_bytes > MAX_SEGMENT_BYTES:
            raise ValueError(
                f"RingGeometry of {self.rings} x {self.slots} x {self.slot_size} bytes needs a "
                f"{self.segment_bytes}-byte segment, more than the limit of {MAX_SEGMENT_BYTES}"
            )

    @property
    def max_payload(self) -> int:
        """The longest record a slot holds."""
        return self.slot_size - _LEN_BYTES

    @property
    def ring_bytes(self) -> int:
        """Bytes one ring takes: its header and slots, rounded up to a cache line."""
        raw = HEADER_BYTES + self.slots * self.slot_size
        return -(-raw // _LINE) * _LINE

    @property
    def segment_bytes(self) -> int:
        return self.rings * self.ring_bytes

    def offset(self, index: int) -> int:
        """Where ring ``index`` starts in the segment."""
        if not isinstance(index, int) or not 0 <= index < self.rings:
            raise ValueError(f"ring index must be from 0 to {self.rings - 1}, not {index!r}")
        return index * self.ring_bytes


def create_segment(geom: RingGeometry) -> tuple[int, mmap.mmap]:
    """A new sealed memfd holding ``geom.rings`` empty rings, and a shared mapping of it.

    The caller owns the fd (hand it to the peer with SCM_RIGHTS, close it when done).
    """
    fd = os.memfd_create("kaas-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, geom.segment_bytes)
        fcntl.fcntl(fd, _F_ADD_SEALS, _F_SEAL_SHRINK | _F_SEAL_GROW | _F_SEAL_SEAL)
        mm = mmap.mmap(fd, geom.segment_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    for i in range(geom.rings):
        _INFO.pack_into(mm, geom.offset(i), MAGIC, VERSION, geom.slots, geom.slot_size)
    return fd, mm


def map_segment(fd: int, geom: RingGeometry) -> mmap.mmap:
    """Map a segment the peer handed over, after checking it cannot shrink under the mapping.

    Raises :class:`RingCorrupt` if ``fd`` is not a memfd sealed against shrinking, is sealed
    against writing, or is smaller than ``geom.segment_bytes``.  The header is not consulted.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise RingCorrupt("ring segment is not a regular file (expected a memfd)")
    if st.st_size < geom.segment_bytes:
        raise RingCorrupt(
            f"ring segment is {st.st_size} bytes, smaller than the {geom.segment_bytes} bytes its geometry needs"
        )
    try:
        seals = fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError as exc:
        raise RingCorrupt(f"ring segment is not a sealable memfd ({exc.strerror})") from exc
    if not seals & _F_SEAL_SHRINK:
        raise RingCorrupt("ring segment is not sealed against shrinking (F_SEAL_SHRINK)")
    if seals & (_F_SEAL_WRITE | _F_SEAL_FUTURE_WRITE):
        raise RingCorrupt("ring segment is sealed against writing")
    try:
        return mmap.mmap(fd, geom.segment_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        raise RingCorrupt(f"ring segment cannot be mapped read-write ({exc.strerror})") from exc


class _End:
    """What both ends share: views over one ring of a mapping, and the geometry."""

    __slots__ = ("_mm", "_mv", "_q", "_u", "_lens", "_data", "_slots", "_mask", "_slot_size", "_words",
                 "max_payload", "index")

    def __init__(self, mm: mmap.mmap, geom: RingGeometry, index: int) -> None:
        base = geom.offset(index)
        if len(mm) < geom.segment_bytes:
            raise ValueError(f"mapping is {len(mm)} bytes, smaller than the {geom.segment_bytes}-byte segment")
        data = base + HEADER_BYTES
        self._mm = mm
        self._mv = memoryview(mm)
        # u64 and u32 views of the header, and a u32 view of the slots for the length words.
        self._q = self._mv[base:data].cast("Q")
        self._u = self._mv[base:data].cast("I")
        self._lens = self._mv[data:data + geom.slots * geom.slot_size].cast("I")
        self._data = data + _LEN_BYTES  # where slot 0's payload starts
        self._slots = geom.slots
        self._mask = geom.slots - 1
        self._slot_size = geom.slot_size
        self._words = geom.slot_size // 4
        self.max_payload = geom.max_payload
        self.index = index

    def close(self) -> None:
        """Release the views over the mapping (idempotent); the mapping can be closed after this."""
        for view in (self._q, self._u, self._lens, self._mv):
            view.release()


class Producer(_End):
    """The writing end of ring ``index``: :meth:`push` records, then wake a sleeping consumer.

    ``head`` is this side's own count, never read back; ``tail`` is read only when the cached
    copy says the ring is full.
    """

    __slots__ = ("_head", "_tail")

    def __init__(self, mm: mmap.mmap, geom: RingGeometry, index: int) -> None:
        super().__init__(mm, geom, index)
        # Invariant: _tail <= consumer's real tail <= _head, and _head - _tail <= slots.
        self._head = 0
        self._tail = 0

    def _read_tail(self) -> int:
        tail: int = self._q[_TAIL_Q]
        if not self._tail <= tail <= self._head:
            raise RingCorrupt(
                f"ring {self.index}: consumer's tail {tail} is outside [{self._tail}, {self._head}] (head {self._head})"
            )
        self._tail = tail
        return tail

    def push(self, payload: bytes | bytearray | memoryview) -> bool:
        """Publish one record; False if the ring is full (never blocks).

        ValueError if the payload is empty or longer than :attr:`max_payload`.
        """
        n = payload.nbytes if type(payload) is memoryview else len(payload)
        if not 0 < n <= self.max_payload:
            raise ValueError(f"ring record must be 1 to {self.max_payload} bytes, not {n}")
        head = self._head
        if head - self._tail >= self._slots and head - self._read_tail() >= self._slots:
            return False
        i = head & self._mask
        self._lens[i * self._words] = n
        off = self._data + i * self._slot_size
        self._mm[off:off + n] = payload
        self._head = head = head + 1
        self._q[_HEAD_Q] = head
        return True

    def start_at(self, head: int) -> None:
        """Continue a ring another producer wrote ``head`` records into (a handover: the old producer
        has stopped).  The consumer's tail is read, and checked, on the first full ring."""
        self._head = head
        self._tail = max(0, head - self._slots)

    @property
    def head(self) -> int:
        """Records this side has published (its own count)."""
        return self._head

    def space(self) -> int:
        """Free slots now (at least this many pushes will succeed)."""
        return self._slots - (self._head - self._read_tail())

    def set_spin_hint(self, us: int) -> None:
        """Advise the consumer to busy-poll ``us`` microseconds before it sleeps (the creator's side)."""
        self._u[_SPIN_HINT_I] = max(0, min(int(us), 0xFFFFFFFF))

    def consumer_sleeping(self) -> bool:
        """Whether the consumer is asleep (or about to be): if so, write its eventfd.

        Call after the pushes of a batch; the full fence orders the ``head`` store before the
        ``sleeping`` load.
        """
        _lock_acquire()
        _lock_release()
        return self._u[_SLEEPING_I] != 0


class Consumer(_End):
    """The reading end of ring ``index``: :meth:`pop` records, :meth:`prepare_sleep` before sleeping.

    ``tail`` is this side's own count, never read back; ``head`` is read only when the cached
    copy says the ring is empty.
    """

    __slots__ = ("_head", "_tail")

    def __init__(self, mm: mmap.mmap, geom: RingGeometry, index: int) -> None:
        super().__init__(mm, geom, index)
        # Invariant: _tail <= _head <= producer's real head, and _head - _tail <= slots.
        self._head = 0
        self._tail = 0

    def _read_head(self) -> int:
        head: int = self._q[_HEAD_Q]
        if not self._head <= head <= self._tail + self._slots:
            raise RingCorrupt(
                f"ring {self.index}: producer's head {head} is outside "
                f"[{self._head}, {self._tail + self._slots}] (tail {self._tail}, {self._slots} slots)"
            )
        self._head = head
        return head

    def _bad_length(self, record: int, n: int) -> RingCorrupt:
        return RingCorrupt(f"ring {self.index}: record {record} has length {n}, outside [1, {self.max_payload}]")

    def pop(self) -> bytes | None:
        """The next record, copied out of shared memory; None if the ring is empty."""
        tail = self._tail
        if tail == self._head and self._read_head() == tail:
            return None
        i = tail & self._mask
        n: int = self._lens[i * self._words]
        if not 0 < n <= self.max_payload:
            raise self._bad_length(tail, n)
        off = self._data + i * self._slot_size
        record = self._mm[off:off + n]
        self._tail = tail = tail + 1
        self._q[_TAIL_Q] = tail
        return record

    def start_at(self, tail: int) -> None:
        """Continue a ring another consumer read up to ``tail`` (a handover: the old consumer has
        stopped); publishes ``tail`` so the producer sees those slots free."""
        self._tail = self._head = tail
        self._q[_TAIL_Q] = tail

    @property
    def tail(self) -> int:
        """Records this side has taken (its own count)."""
        return self._tail

    def publish_tail(self, tail: int) -> None:
        """Free the slots before ``tail`` to the producer (after ``pop_many(..., publish=False)``,
        once the records taken are finished with): ``tail`` may lag behind what was taken."""
        self._q[_TAIL_Q] = tail

    def read_slot(self, position: int) -> bytes:
        """Record ``position``'s slot as it is now, copied out, its length checked: for a consumer
        taking over records another consumer took but did not finish (the caller knows they are
        published; a hostile producer may have rewritten them, so they are checked like any other)."""
        i = position & self._mask
        n: int = self._lens[i * self._words]
        if not 0 < n <= self.max_payload:
            raise self._bad_length(position, n)
        off = self._data + i * self._slot_size
        return self._mm[off:off + n]

    def pop_many(self, limit: int, publish: bool = True) -> list[bytes]:
        """Up to ``limit`` records, oldest first (a bounded batch, for fairness between rings).

        ``publish=False`` takes them without freeing their slots (see :meth:`publish_tail`)."""
        tail = self._tail
        count = self._head - tail
        if count < limit:
            count = self._read_head() - tail
        count = min(count, limit)
        out: list[bytes] = []
        mm, lens, mask, words, slot_size, data, top = (
            self._mm, self._lens, self._mask, self._words, self._slot_size, self._data, self.max_payload)
        for t in range(tail, tail + count):
            i = t & mask
            n: int = lens[i * words]
            if not 0 < n <= top:
                raise self._bad_length(t, n)
            off = data + i * slot_size
            out.append(mm[off:off + n])
        if count > 0:
            self._tail = tail = tail + count
            if publish:
                self._q[_TAIL_Q] = tail
        return out

    def ready(self) -> bool:
        """Cheap check for a busy-poll loop: a record may be waiting (``pop``/``pop_many`` validate)."""
        return self._q[_HEAD_Q] != self._tail

    def pending(self) -> int:
        """Records published and not yet popped (re-reads and validates ``head``)."""
        return self._read_head() - self._tail

    def prepare_sleep(self) -> bool:
        """Announce a sleep: True if the ring is still empty and the caller may sleep on its
        eventfd (then :meth:`end_sleep` after waking); False if data arrived (flag cleared)."""
        self._u[_SLEEPING_I] = 1
        _lock_acquire()
        _lock_release()
        if self._read_head() != self._tail:
            self._u[_SLEEPING_I] = 0
            return False
        return True

    def end_sleep(self) -> None:
        self._u[_SLEEPING_I] = 0

    def spin_hint(self) -> int:
        """Microseconds of busy-polling the ring's creator advises now (a hint: bound it yourself)."""
        hint: int = self._u[_SPIN_HINT_I]
        return hint


def published(mm: mmap.mmap, geom: RingGeometry, index: int) -> int:
    """Ring ``index``'s head word as it is now: what its producer says it has published.

    For a side that is neither end (the broker, after the worker that produced it died); the value
    is not checked here."""
    value: int = struct.unpack_from("<Q", mm, geom.offset(index) + 8 * _HEAD_Q)[0]
    return value


def make_eventfd() -> int:
    """A non-blocking, close-on-exec eventfd: the consumer sleeps on it, the producer writes it."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def wake(efd: int) -> None:
    """Wake the consumer sleeping on ``efd`` (a full counter is already a pending wake-up)."""
    try:
        os.eventfd_write(efd, 1)
    except BlockingIOError:
        pass


def drain(efd: int) -> None:
    """Reset ``efd``'s counter (nothing to reset is fine)."""
    try:
        os.eventfd_read(efd)
    except BlockingIOError:
        pass


def wait_readable(consumer: Consumer, efd: int, spin: float, timeout: float | None) -> bool:
    """Wait until ``consumer`` has a record: True, or False after ``timeout`` seconds.

    For synchronous processes (tenant client, worker): busy-poll for ``spin`` seconds, then sleep
    on ``efd`` (announced by :meth:`Consumer.prepare_sleep`, so the producer knows to write it),
    waking at least every :data:`RECHECK_INTERVAL` to re-check.  ``timeout=None`` waits forever.
    """
    pending = consumer.pending
    if pending():
        return True
    clock = time.monotonic
    now = clock()
    deadline = None if timeout is None else now + timeout
    if spin > 0:
        spin_end = now + spin if deadline is None else min(now + spin, deadline)
        while clock() < spin_end:
            if pending():
                return True
    poller = select.poll()
    poller.register(efd, select.POLLIN)
    while True:
        wait = RECHECK_INTERVAL
        if deadline is not None:
            remaining = deadline - clock()
            if remaining <= 0:
                return pending() > 0
            wait = min(wait, remaining)
        if not consumer.prepare_sleep():
            return True
        try:
            poller.poll(math.ceil(wait * 1000))
        finally:
            consumer.end_sleep()
        drain(efd)
        if pending():
            return True
