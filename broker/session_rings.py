"""A session's hot path: its two shared-memory rings, and the hub that polls every ring.

Ring 0 carries run records from the tenant (``broker.records``), ring 1 completion records
back.  The broker creates the segment (sealed: the tenant cannot shrink it) and both
eventfds, and hands them over in ``RingsOpened``.  Everything read from ring 0 is untrusted:
records are copied out of shared memory before they are decoded (``broker.ring``), decoded
with their declared lengths checked (``broker.records``), and then go through the same
checks as a ``RunPrepared`` frame.  A broken ring (indices out of range) ends the session,
as a broken frame stream does.

The hub polls every ring with work in one pass, at most ``PASS_LIMIT`` records from each
(one busy tenant cannot starve the others), while the engine spins after activity; when the
spin ends each consumer announces its sleep, and a producer that sees it writes the eventfd.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import Protocol

from .ring import Consumer, Producer, RingCorrupt, RingGeometry, create_segment, drain, make_eventfd, published, wake

# Ring 0: runs (tenant -> broker, or -> a device worker under a lease); ring 1: completions from the
# broker; ring 2: completions from a device worker on the direct path (``broker/leases.py``).
GEOMETRY = RingGeometry(slots=256, slot_size=512, rings=3)
PASS_LIMIT = 32  # records taken from one ring per pass


class Polled(Protocol):
    """Something with an inbound ring: polled by the hub, put to sleep when the spin ends."""

    def ready(self) -> bool: ...

    def poll(self, limit: int) -> int: ...

    def sleep(self) -> bool: ...


class RingHub:
    """Every inbound ring of the broker (sessions' run rings, workers' completion rings)."""

    def __init__(self) -> None:
        self.members: set[Polled] = set()
        self.spinning: Callable[[], bool] = lambda: False
        self.batch: Callable[[Callable[[], object]], object] = lambda fn: fn()  # the engine's pump batching

    def poll_all(self) -> int:
        """One pass over every ring with records waiting; returns how many were taken."""
        ready = [m for m in self.members if m.ready()]
        if not ready:
            return 0
        total = 0

        def run() -> None:
            nonlocal total
            for m in ready:
                total += m.poll(PASS_LIMIT)

        self.batch(run)
        return total

    def sleep_all(self) -> bool:
        """Announce sleep on every ring; False (and nothing asleep) if one had work meanwhile."""
        for m in list(self.members):
            if not m.sleep():
                return False
        return True

    def woken(self, m: Polled) -> None:
        """``m``'s eventfd fired: take what it has (and, when not spinning, sleep again)."""
        def run() -> None:
            while m.poll(PASS_LIMIT) >= PASS_LIMIT:
                pass

        self.batch(run)
        if not self.spinning():
            while not m.sleep():
                self.batch(lambda: m.poll(PASS_LIMIT))


class SessionRings:
    """The broker's ends of one session's rings."""

    def __init__(self, loop: asyncio.AbstractEventLoop, hub: RingHub, on_record: Callable[[bytes], None],
                 on_corrupt: Callable[[RingCorrupt], None]) -> None:
        self.geom = GEOMETRY
        self.loop = loop
        self.hub = hub
        self._on_record = on_record
        self._on_corrupt = on_corrupt
        self.fd, self.mm = create_segment(self.geom)
        self.runs = Consumer(self.mm, self.geom, 0)
        self.completions = Producer(self.mm, self.geom, 1)
        self.wake_broker = make_eventfd()
        self.wake_tenant = make_eventfd()
        self.open = True
        self.broken = False  # a corrupt ring: nothing more is read from it (the session is closing)
        self.paused = False  # a device worker reads ring 0 now (a lease)
        self.done_head = 0   # ring 2's records so far, as of the last lease's end
        self.runs.prepare_sleep()  # asleep until the tenant's first record (it writes the eventfd)
        loop.add_reader(self.wake_broker, self._on_wake)
        hub.members.add(self)

    def handover(self) -> list[int]:
        """The fds the tenant gets, and a leased worker too (the segment's fd is kept for leases)."""
        return [self.fd, self.wake_broker, self.wake_tenant]

    def pause(self) -> int:
        """Stop reading ring 0 (a device worker takes over there); returns where it goes on."""
        self.paused = True
        self.hub.members.discard(self)
        self.loop.remove_reader(self.wake_broker)
        return self.runs.tail

    def resume(self, taken: int, done_head: int) -> None:
        """Read ring 0 again from ``taken`` (where the worker stopped), now, and whenever woken."""
        if not self.open:
            return
        self.paused = False
        self.done_head = done_head
        self.runs.start_at(taken)
        self.hub.members.add(self)
        self.loop.add_reader(self.wake_broker, self._on_wake)
        self.hub.woken(self)  # records that came while nobody was reading

    def direct_published(self) -> int:
        """Ring 2's head as the worker left it (after its death: how many completions it posted)."""
        return published(self.mm, self.geom, 2)

    def record_at(self, position: int) -> bytes | None:
        """Ring-0 record ``position`` as its slot holds it now (a lease's unfinished run), or None."""
        try:
            return self.runs.read_slot(position)
        except RingCorrupt:
            return None

    def _on_wake(self) -> None:
        drain(self.wake_broker)
        self.runs.end_sleep()
        self.hub.woken(self)

    def ready(self) -> bool:
        return self.open and not self.broken and not self.paused and self.runs.ready()

    def _corrupt(self, exc: RingCorrupt) -> None:
        self.broken = True
        self._on_corrupt(exc)

    def poll(self, limit: int) -> int:
        if not self.open or self.broken or self.paused:
            return 0
        try:
            records = self.runs.pop_many(limit)
        except RingCorrupt as exc:
            self._corrupt(exc)
            return 0
        for rec in records:
            if not self.open:
                break
            self._on_record(rec)
        return len(records)

    def sleep(self) -> bool:
        if not self.open or self.broken or self.paused:
            return True
        try:
            return self.runs.prepare_sleep()
        except RingCorrupt as exc:
            self._corrupt(exc)
            return True

    def post(self, record: bytes) -> bool:
        """Publish a completion; False when the ring is full (the caller sends a frame instead)."""
        if not self.open:
            return False
        if self.broken:
            return False
        try:
            if not self.completions.push(record):
                return False
            if self.completions.consumer_sleeping():
                wake(self.wake_tenant)
        except RingCorrupt as exc:
            self._corrupt(exc)
            return False
        return True

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        self.hub.members.discard(self)
        if not self.paused:
            self.loop.remove_reader(self.wake_broker)
        self.runs.close()
        self.completions.close()
        self.mm.close()
        for fd in (self.fd, self.wake_broker, self.wake_tenant):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
