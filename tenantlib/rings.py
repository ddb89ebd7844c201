"""The tenant's ends of its session rings: run records out, completion records in.

The broker creates the segment and both eventfds and hands them over in ``RingsOpened``
(see ``broker.session_rings``); the client maps them here.  Runs that do not fit a slot, or
find the ring full, go as frames instead; errors always come back as frames.
"""

from __future__ import annotations

import os

from broker.protocol import GraphDone, RingsOpened, Timings
from broker.records import DEDICATED, decode_done
from broker.ring import Consumer, Producer, RingGeometry, drain, map_segment, wake

from . import errors


class ClientRings:
    def __init__(self, reply: RingsOpened, fds: list[int], devices: tuple[str, ...], tenant: str) -> None:
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            raise errors.ProtocolError(f"the broker's rings came with {len(fds)} file descriptors, expected 3")
        seg, self.wake_broker, self.wake_tenant = fds
        try:
            self.geom = RingGeometry(reply.slots, reply.slot_size, reply.rings)
            self.mm = map_segment(seg, self.geom)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        finally:
            os.close(seg)
        self.runs = Producer(self.mm, self.geom, 0)
        self.completions = Consumer(self.mm, self.geom, 1)
        # Ring 2: completions straight from a device worker, while the session's runs go there
        # (the direct path, broker/leases.py); both producers write the same eventfd.
        self.direct = Consumer(self.mm, self.geom, 2) if self.geom.rings >= 3 else None
        self.max_payload = self.geom.max_payload
        self._devices = devices
        self._dedicated = tuple(f"{d}#{tenant}" for d in devices)
        self.open = True

    def send(self, record: bytes) -> bool:
        """Publish a run record (waking the broker if it sleeps); False when the ring is full."""
        if not self.runs.push(record):
            return False
        if self.runs.consumer_sleeping():
            wake(self.wake_broker)
        return True

    def spin_hint(self) -> float:
        """Seconds of busy-polling the broker advises now (it says 0 when tenants outnumber the
        cores it keeps for spinners)."""
        return self.completions.spin_hint() / 1e6

    def pending(self) -> int:
        n = self.completions.pending()
        return n + self.direct.pending() if self.direct is not None else n

    def ready(self) -> bool:
        return self.completions.ready() or (self.direct is not None and self.direct.ready())

    def take(self) -> list[GraphDone]:
        """Completions published so far, as the GraphDone frames they stand for."""
        records = self.completions.pop_many(1024) if self.completions.ready() else []
        if self.direct is not None and self.direct.ready():
            records += self.direct.pop_many(1024)
        out = []
        for rec in records:
            _, req, device, flags, t, trace = decode_done(rec)
            names = self._dedicated if flags & DEDICATED else self._devices
            name = names[device] if device < len(names) else f"device {device}"
            out.append(GraphDone(req, name, Timings(*t), trace))
        return out

    def prepare_sleep(self) -> bool:
        if not self.completions.prepare_sleep():
            return False
        if self.direct is not None and not self.direct.prepare_sleep():
            self.completions.end_sleep()
            return False
        return True

    def end_sleep(self) -> None:
        self.completions.end_sleep()
        if self.direct is not None:
            self.direct.end_sleep()
        drain(self.wake_tenant)

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        self.runs.close()
        self.completions.close()
        if self.direct is not None:
            self.direct.close()
        self.mm.close()
        for fd in (self.wake_broker, self.wake_tenant):
            try:
                os.close(fd)
            except OSError:
                pass
