"""The lease page: what a device worker on the direct path tells the broker without a message. Pure.

When a session holds a lease (``broker/leases.py``), its runs go from the tenant's ring straight
to a device worker (``broker/streams/direct.py``) and the broker is off the path.  The broker
still owns deadlines, accounting and replay, so the worker keeps this page up to date: a memfd
the broker creates per lease and shares with the worker only (the tenant never sees it, so
nothing here is tenant input).  After the worker dies the broker reads it to learn which of
the lease's runs were finished and which must be replayed.

Layout (little-endian u64 / f64 words)::

    word  field      meaning
    0     taken      ring-0 records the worker has taken (its read position)
    1     finished   every record before this one is finished (ring 0's tail lags to here)
    2     deadline   f64: time.monotonic() by which the oldest run on the device must end (0: none)
    3     oldest     ring position of that run
    4     graphs     runs finished on the direct path (successes)
    5     seconds    f64: device time they were charged
    6     escalated  runs handed to the broker (``WEscalate``)
    7     posted     completions the worker has pushed on ring 2 (its own count: never read from ring 2,
                     whose header the tenant can write)
    8+2i  mark       position + 1 of the last finished record in slot i (0: none)
    9+2i  posted     where its completion went on ring 2, or ESCALATED (the broker was told)

A success is marked before its completion is pushed, naming the ring-2 position it goes to, so
that after a death the broker can tell a completion the tenant has (position < ``posted``) from
one it must deliver itself.  ``finished`` passes a run only once its reply is safe: pushed, or
handed to the broker (which has then read the ``WEscalate`` before it acts on the worker's death).
"""

from __future__ import annotations

import mmap
import os

ESCALATED = (1 << 64) - 1
_HEAD_WORDS = 8
TAKEN, FINISHED, DEADLINE, OLDEST, GRAPHS, SECONDS, ESCALATIONS, POSTED = range(8)


def page_bytes(slots: int) -> int:
    return 8 * (_HEAD_WORDS + 2 * slots)


def create_page(slots: int) -> tuple[int, mmap.mmap]:
    """A zeroed page for a ring of ``slots`` slots: its memfd (the caller hands it over, then closes it)."""
    fd = os.memfd_create("kaas-lease", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, page_bytes(slots))
        mm = mmap.mmap(fd, page_bytes(slots), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd, mm


class LeasePage:
    """Views over a lease page (either side); ``close`` before closing the mapping."""

    __slots__ = ("mm", "q", "d", "mask")

    def __init__(self, mm: mmap.mmap, slots: int) -> None:
        if len(mm) < page_bytes(slots):
            raise ValueError(f"lease page of {len(mm)} bytes is smaller than {page_bytes(slots)} for {slots} slots")
        self.mm = mm
        self.q = memoryview(mm).cast("Q")
        self.d = memoryview(mm).cast("d")
        self.mask = slots - 1

    def mark(self, position: int, posted: int) -> None:
        """Record ``position`` finished (its completion at ring-2 ``posted``, or ESCALATED)."""
        i = _HEAD_WORDS + 2 * (position & self.mask)
        self.q[i + 1] = posted
        self.q[i] = position + 1

    def finished(self, position: int) -> int | None:
        """Where ``position``'s completion went (or ESCALATED), or None if it is not finished."""
        i = _HEAD_WORDS + 2 * (position & self.mask)
        if self.q[i] != position + 1:
            return None
        posted: int = self.q[i + 1]
        return posted

    def close(self) -> None:
        self.q.release()
        self.d.release()
