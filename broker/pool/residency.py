"""Which resident buffers live on which device, who pays for them, and whose go when memory is short.

Pure: a model in bytes, with no allocator, no device, no I/O, and time passed in. The engine asks
the pool where a graph's device memory comes from (``plan_admit``), applies the answer
(``commit``), tells the workers to drop and copy what the answer lists, and gives the memory back
when the graph ends (``release``). The pool never logs; ``on_evict`` observes evictions.

What a tenant uses on a device is its resident buffers there plus the per-request bytes (temps and
copies of arena buffers) reserved by its graphs in flight there; quotas are hard limits on that,
per device and summed over devices. Eviction follows three rules, in this order:

1. a tenant that would pass its own quota evicts its own coldest buffers;
2. when the device is short, tenants holding more than their weight-proportional share of it
   lose their coldest buffers first (least recently used within and across those tenants);
3. then the coldest buffers of anyone.

A buffer used by a graph in flight (pinned from ``commit`` to ``release``) is never evicted.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from .. import errors

__all__ = ["Admission", "Eviction", "LruOrder", "Pool", "Quota", "Resident"]


@dataclass(frozen=True, slots=True)
class Quota:
    """A tenant's hard limits on device memory (resident buffers plus reserved per-request bytes)."""

    device_memory: int | None = None  # on any one device; None: unlimited
    total: int | None = None          # summed over all devices; None: unlimited


@dataclass(slots=True)
class Resident:
    """A resident buffer's copy on one device."""

    id: int
    tenant: str
    nbytes: int
    last_used: float  # the ``now`` of its latest add or touch
    tick: int         # pool-wide order of that add or touch: smaller is colder, on every device


@dataclass(frozen=True, slots=True)
class Eviction:
    """One resident copy an admission drops; ``reason`` is the rule that chose it."""

    device: str
    resident: int
    tenant: str
    nbytes: int
    reason: str  # "quota" (the tenant's own), "share" (an over-share tenant's), "capacity" (anyone's)


@dataclass(frozen=True, slots=True)
class Admission:
    """How a graph gets its memory on ``device``. Valid until the pool next changes (``commit`` checks)."""

    ticket: int
    device: str
    tenant: str
    residents: tuple[int, ...]          # every resident the graph uses; pinned from commit to release
    put: tuple[tuple[int, int], ...]    # (resident id, nbytes) not on the device yet: copy them there
    temp_bytes: int                     # per-request bytes reserved from commit to release
    evict: tuple[Eviction, ...]         # drop these before the puts, in this order (coldest first)
    version: int = field(default=0, repr=False, compare=False)


class LruOrder:
    """The resident copies on one device, least recently used at the front.

    Invariant: iteration runs from least to most recently used, i.e. in increasing ``tick``; ``add``
    and ``touch`` move a resident to the back with a fresh tick.
    """

    __slots__ = ("_order",)

    def __init__(self) -> None:
        self._order: collections.OrderedDict[int, Resident] = collections.OrderedDict()

    def add(self, r: Resident) -> None:
        if r.id in self._order:
            raise ValueError(f"resident {r.id} is already in this order")
        self._order[r.id] = r

    def touch(self, rid: int, now: float, tick: int) -> bool:
        r = self._order.get(rid)
        if r is None:
            return False
        r.last_used, r.tick = now, tick
        self._order.move_to_end(rid)
        return True

    def remove(self, rid: int) -> Resident | None:
        return self._order.pop(rid, None)

    def get(self, rid: int) -> Resident | None:
        return self._order.get(rid)

    def __contains__(self, rid: object) -> bool:
        return rid in self._order

    def __iter__(self) -> Iterator[Resident]:
        return iter(self._order.values())

    def __len__(self) -> int:
        return len(self._order)


@dataclass(eq=False, slots=True)
class _Device:
    name: str
    capacity: int
    lru: LruOrder = field(default_factory=LruOrder)
    # resident[t] == sum of nbytes of t's residents in lru; no zero entries.
    resident: dict[str, int] = field(default_factory=dict)
    # reserved[t] == sum of temp_bytes of t's admissions in flight here; no zero entries.
    reserved: dict[str, int] = field(default_factory=dict)
    # pins[r] == number of admissions in flight here that use resident r; no zero entries.
    pins: collections.Counter[int] = field(default_factory=collections.Counter)

    def used(self, tenant: str | None = None) -> int:
        if tenant is None:
            return sum(self.resident.values()) + sum(self.reserved.values())
        return self.resident.get(tenant, 0) + self.reserved.get(tenant, 0)


@dataclass(frozen=True, slots=True)
class _Policy:
    weight: float
    quota: Quota


_DEFAULT = _Policy(1.0, Quota())


def _add(d: dict[str, int], key: str, delta: int) -> None:
    v = d.get(key, 0) + delta
    if v:
        d[key] = v
    else:
        d.pop(key, None)


class Pool:
    """Residency, per-tenant accounting and eviction over devices of fixed ``capacity`` (bytes)."""

    def __init__(self, capacity: Mapping[str, int], on_evict: Callable[[Eviction], None] | None = None) -> None:
        for d, c in capacity.items():
            if c < 0:
                raise ValueError(f"device {d}: capacity must be non-negative, not {c}")
        self._devices = {d: _Device(d, int(c)) for d, c in capacity.items()}
        self._tenants: dict[str, _Policy] = {}
        # The admissions committed and not released, by ticket.
        self._inflight: dict[int, Admission] = {}
        self._tickets = itertools.count(1)
        self._ticks = itertools.count(1)
        # Bumped by every change that can invalidate a planned admission.
        self._version = 0
        self.on_evict = on_evict

    # -- tenants ---------------------------------------------------------------------------
    def set_tenant(self, name: str, weight: float = 1.0, device_quota: int | None = None,
                   total_quota: int | None = None) -> None:
        """Set a tenant's weight and quotas. A lowered quota is enforced at its next admission."""
        if not weight > 0:
            raise ValueError(f"tenant {name!r}: weight must be positive, not {weight!r}")
        for what, q in (("device_quota", device_quota), ("total_quota", total_quota)):
            if q is not None and q < 0:
                raise ValueError(f"tenant {name!r}: {what} must be non-negative, not {q}")
        self._tenants[name] = _Policy(float(weight), Quota(device_quota, total_quota))
        self._version += 1

    def quota(self, tenant: str) -> Quota:
        return self._tenants.get(tenant, _DEFAULT).quota

    def weight(self, tenant: str) -> float:
        return self._tenants.get(tenant, _DEFAULT).weight

    def check_fits(self, tenant: str, nbytes: int) -> None:
        """Raise ``QuotaExceeded`` if a graph needing ``nbytes`` on one device could never run.

        For submit time: it fits once its tenant's quotas and the smallest device allow it, so any
        device can take it after graphs in flight end and evictions make room.
        """
        q = self.quota(tenant)
        if q.device_memory is not None and nbytes > q.device_memory:
            raise self._quota_error(nbytes, "one device", q.device_memory, "bytes per device", "device")
        if q.total is not None and nbytes > q.total:
            raise self._quota_error(nbytes, "one device", q.total, "bytes in total", "total")
        if self._devices:
            smallest = min(self._devices.values(), key=lambda d: d.capacity)
            if nbytes > smallest.capacity:
                raise errors.QuotaExceeded(
                    f"graph needs {nbytes} bytes on one device, the smallest device ({smallest.name}) holds "
                    f"{smallest.capacity} bytes",
                    detail={"needed": nbytes, "capacity": smallest.capacity, "device": smallest.name,
                            "scope": "capacity"})

    @staticmethod
    def _quota_error(nbytes: int, where: str, quota: int, unit: str, scope: str) -> errors.QuotaExceeded:
        return errors.QuotaExceeded(f"graph needs {nbytes} bytes on {where}, tenant quota is {quota} {unit}",
                                    detail={"needed": nbytes, "quota": quota, "scope": scope})

    # -- admission -------------------------------------------------------------------------
    def plan_admit(self, device: str, tenant: str, residents: Mapping[int, int], temp_bytes: int, now: float,
                   in_use: Collection[int] = ()) -> Admission | None:
        """Plan the memory for a graph of ``tenant`` on ``device``; changes nothing.

        ``residents`` maps every resident the graph uses to its size (those already on the device
        are kept, the others are listed in ``put``); ``temp_bytes`` is its per-request device
        memory. ``in_use`` names residents to keep on every device besides those pinned by graphs
        in flight. Returns None when only the end of graphs in flight (or ``in_use``) can make
        room: plan again after a ``release``. Raises ``QuotaExceeded`` (with the numbers) when the
        graph can never fit its tenant's quota or this device.
        """
        dev = self._device(device)
        if temp_bytes < 0 or any(n < 0 for n in residents.values()):
            raise ValueError("byte counts must be non-negative")
        footprint = sum(residents.values()) + temp_bytes
        q = self.quota(tenant)
        where = f"device {device}"
        if q.device_memory is not None and footprint > q.device_memory:
            raise self._quota_error(footprint, where, q.device_memory, "bytes per device", "device")
        if q.total is not None and footprint > q.total:
            raise self._quota_error(footprint, where, q.total, "bytes in total", "total")
        if footprint > dev.capacity:
            raise errors.QuotaExceeded(f"graph needs {footprint} bytes on {where}, which holds {dev.capacity} bytes",
                                       detail={"needed": footprint, "capacity": dev.capacity, "device": device,
                                               "scope": "capacity"})
        put: list[tuple[int, int]] = []
        for rid, n in residents.items():
            r = dev.lru.get(rid)
            if r is None:
                put.append((rid, n))
            elif r.tenant != tenant:
                raise ValueError(f"resident {rid} on {device} belongs to {r.tenant!r}, not {tenant!r}")
        need = sum(n for _, n in put) + temp_bytes
        keep_here = set(residents) | set(in_use)
        keep_elsewhere = set(in_use)
        chosen: dict[tuple[str, int], Eviction] = {}
        freed: collections.Counter[tuple[str, str]] = collections.Counter()  # (device, tenant) -> bytes

        def evictable(d: _Device, r: Resident) -> bool:
            return (d.name, r.id) not in chosen and not d.pins[r.id] and \
                r.id not in (keep_here if d is dev else keep_elsewhere)

        def choose(d: _Device, r: Resident, reason: str) -> int:
            chosen[(d.name, r.id)] = Eviction(d.name, r.id, r.tenant, r.nbytes, reason)
            freed[(d.name, r.tenant)] += r.nbytes
            return r.nbytes

        # 1. The tenant's own quotas: its own coldest copies go, here first, then anywhere.
        if q.device_memory is not None:
            over = dev.used(tenant) + need - q.device_memory
            for r in dev.lru:
                if over <= 0:
                    break
                if r.tenant == tenant and evictable(dev, r):
                    over -= choose(dev, r, "quota")
            if over > 0:
                return None
        if q.total is not None:
            over = self.used(tenant=tenant) + need - sum(n for (_, t), n in freed.items() if t == tenant) - q.total
            if over > 0:
                mine = sorted(((r.tick, d, r) for d in self._devices.values() for r in d.lru
                               if r.tenant == tenant and evictable(d, r)), key=lambda x: x[0])
                for _, d, r in mine:
                    if over <= 0:
                        break
                    over -= choose(d, r, "quota")
            if over > 0:
                return None

        # 2. Capacity: over-share tenants' coldest first, then anyone's coldest.
        short = dev.used() + need - sum(n for (dn, _), n in freed.items() if dn == device) - dev.capacity
        if short > 0:
            held = collections.Counter({t: dev.used(t) for t in set(dev.resident) | set(dev.reserved)})
            for (dn, t), n in freed.items():
                if dn == device:
                    held[t] -= n
            held[tenant] += need

            def over_share(t: str) -> bool:
                # Shares are split among the tenants holding memory here, and the one asking.
                present = [u for u, n in held.items() if n > 0 or u == tenant]
                total_weight = sum(self.weight(u) for u in present)
                return held[t] * total_weight > dev.capacity * self.weight(t)

            # One pass suffices: evictions only shrink the set of over-share tenants (a tenant's
            # holding falls, or a tenant leaves and the others' shares grow).
            for r in dev.lru:
                if short <= 0:
                    break
                if evictable(dev, r) and over_share(r.tenant):
                    short -= choose(dev, r, "share")
                    held[r.tenant] -= r.nbytes
            for r in dev.lru:
                if short <= 0:
                    break
                if evictable(dev, r):
                    short -= choose(dev, r, "capacity")
            if short > 0:
                return None
        return Admission(next(self._tickets), device, tenant, tuple(residents), tuple(put), temp_bytes,
                         tuple(chosen.values()), self._version)

    def commit(self, adm: Admission, now: float) -> None:
        """Apply a plan from ``plan_admit``: evict, record the puts, pin the graph's residents, reserve.

        Raises ValueError when the pool changed since the plan was made (plan again).
        """
        if adm.version != self._version or adm.ticket in self._inflight:
            raise ValueError(f"admission {adm.ticket} is stale: the pool changed since it was planned")
        dev = self._devices[adm.device]
        for e in adm.evict:
            self._drop(self._devices[e.device], e.resident)
        for rid, n in adm.put:
            self._insert(dev, rid, adm.tenant, n, now)
        for rid in adm.residents:
            dev.lru.touch(rid, now, next(self._ticks))
            dev.pins[rid] += 1
        if adm.temp_bytes:
            _add(dev.reserved, adm.tenant, adm.temp_bytes)
        self._inflight[adm.ticket] = adm
        self._version += 1
        if self.on_evict is not None:
            for e in adm.evict:
                self.on_evict(e)

    def release(self, adm: Admission) -> None:
        """The graph ended (whatever its outcome): unpin its residents and return its reserved bytes."""
        if self._inflight.pop(adm.ticket, None) is None:
            raise ValueError(f"admission {adm.ticket} is not in flight")
        dev = self._devices[adm.device]
        for rid in adm.residents:
            dev.pins[rid] -= 1
            if dev.pins[rid] <= 0:
                del dev.pins[rid]
        if adm.temp_bytes:
            _add(dev.reserved, adm.tenant, -adm.temp_bytes)
        self._version += 1

    # -- residency -------------------------------------------------------------------------
    def add(self, device: str, resident_id: int, tenant: str, nbytes: int, now: float) -> None:
        """Record a copy placed outside an admission; refuses what capacity or quota would not allow."""
        dev = self._device(device)
        if resident_id in dev.lru:
            raise ValueError(f"resident {resident_id} is already on {device}")
        if dev.used() + nbytes > dev.capacity:
            raise ValueError(f"resident {resident_id} ({nbytes} bytes) does not fit on {device}: "
                             f"{dev.used()} of {dev.capacity} bytes in use")
        q = self.quota(tenant)
        if q.device_memory is not None and dev.used(tenant) + nbytes > q.device_memory:
            raise ValueError(f"resident {resident_id} would take {tenant!r} past its quota on {device}")
        if q.total is not None and self.used(tenant=tenant) + nbytes > q.total:
            raise ValueError(f"resident {resident_id} would take {tenant!r} past its total quota")
        self._insert(dev, resident_id, tenant, nbytes, now)
        self._version += 1

    def touch(self, device: str, resident_id: int, now: float) -> None:
        """Mark a copy as just used (the back of its device's LRU order); unknown copies are ignored."""
        self._device(device).lru.touch(resident_id, now, next(self._ticks))

    def remove(self, device: str, resident_id: int) -> Resident | None:
        """Forget a copy that is gone (released by its tenant, a failed put). Not an eviction."""
        r = self._drop(self._device(device), resident_id)
        if r is not None:
            self._version += 1
        return r

    def clear_device(self, device: str) -> list[Resident]:
        """Forget every copy on a device whose worker died; its admissions are released as usual."""
        dev = self._device(device)
        gone = list(dev.lru)
        for r in gone:
            self._drop(dev, r.id)
        self._version += 1
        return gone

    def holds(self, device: str, resident_id: int) -> bool:
        return resident_id in self._device(device).lru

    def held(self, device: str, residents: Iterable[int]) -> int:
        """Bytes of ``residents`` already on ``device`` (the scheduler's ``holds`` hook)."""
        lru = self._device(device).lru
        return sum(r.nbytes for r in (lru.get(rid) for rid in residents) if r is not None)

    def residents(self, device: str) -> list[Resident]:
        """The copies on ``device``, least recently used first."""
        return list(self._device(device).lru)

    def pinned(self, device: str, resident_id: int) -> int:
        """How many graphs in flight on ``device`` use the resident."""
        return self._device(device).pins.get(resident_id, 0)

    # -- accounting ------------------------------------------------------------------------
    def resident_bytes(self, device: str | None = None, tenant: str | None = None) -> int:
        devs = self._devices.values() if device is None else (self._device(device),)
        if tenant is None:
            return sum(sum(d.resident.values()) for d in devs)
        return sum(d.resident.get(tenant, 0) for d in devs)

    def reserved_bytes(self, device: str | None = None, tenant: str | None = None) -> int:
        devs = self._devices.values() if device is None else (self._device(device),)
        if tenant is None:
            return sum(sum(d.reserved.values()) for d in devs)
        return sum(d.reserved.get(tenant, 0) for d in devs)

    def used(self, device: str | None = None, tenant: str | None = None) -> int:
        """Resident plus reserved bytes: what quotas and capacity are checked against."""
        return self.resident_bytes(device, tenant) + self.reserved_bytes(device, tenant)

    def capacity(self, device: str) -> int:
        return self._device(device).capacity

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def add_device(self, device: str, capacity: int) -> None:
        """A device appears (a dedicated tenant's worker): empty, of ``capacity`` bytes."""
        if device in self._devices:
            raise ValueError(f"device {device!r} is already in the pool")
        self._devices[device] = _Device(device, int(capacity))
        self._version += 1

    def remove_device(self, device: str) -> None:
        """A device goes away; nothing may be in flight on it."""
        dev = self._device(device)
        if any(a.device == device for a in self._inflight.values()):
            raise ValueError(f"device {device!r} still has graphs in flight")
        del self._devices[dev.name]
        self._version += 1

    # -- internals -------------------------------------------------------------------------
    def _device(self, device: str) -> _Device:
        try:
            return self._devices[device]
        except KeyError:
            raise ValueError(f"unknown device {device!r} (known: {', '.join(sorted(self._devices))})") from None

    def _insert(self, dev: _Device, rid: int, tenant: str, nbytes: int, now: float) -> None:
        dev.lru.add(Resident(rid, tenant, nbytes, now, next(self._ticks)))
        _add(dev.resident, tenant, nbytes)

    def _drop(self, dev: _Device, rid: int) -> Resident | None:
        r = dev.lru.remove(rid)
        if r is not None:
            _add(dev.resident, r.tenant, -r.nbytes)
        return r
