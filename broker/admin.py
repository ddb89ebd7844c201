"""Administrator commands (``kaasctl``): what the broker runs and holds, and the few levers.

Only root or members of ``admin_group`` may call them; the session checks the peer's
credentials before anything here runs. Every command returns plain JSON-able data.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import errors
from .engine import Engine

COMMANDS = ("status", "tenants", "residents", "memory", "drain", "undrain", "reload", "quarantine_list", "quarantine_clear")


def status(engine: Engine) -> dict[str, Any]:
    devices = []
    for d in engine.device_info():
        name = d["device"]
        d.update(memory_capacity=engine.pool.capacity(name), memory_used=engine.pool.used(name),
                 drained=name in engine._sched_of(name).drained)
        devices.append(d)
    return {"devices": devices, "queued": engine.queued, "accepting": engine.accepting,
            "tenants": len(engine.tenants), "stats": dict(engine.stats), "policy": engine.scheduler.policy.name}


def tenants(engine: Engine) -> list[dict[str, Any]]:
    """Every tenant seen since the broker started: its totals (from the metrics, which outlive its
    sessions) and, while it has sessions, its live queue, memory and residents."""
    rows: dict[str, dict[str, Any]] = {}
    for name, tm in engine.metrics.tenants.items():
        rows[name] = {"tenant": name, "sessions": 0, "weight": None, "priority": None, "graphs": tm.graphs,
                      "errors": sum(tm.errors.values()), "device_seconds": sum(tm.device_seconds.values()),
                      "waiting": 0, "running": 0, "parked": 0, "memory_used": 0, "device_quota": None,
                      "total_quota": None, "residents": 0, "resident_bytes": 0, "arenas": 0, "leased": 0,
                      "lease_bytes": 0}
    leased: dict[str, int] = {}  # sessions on the direct path now (broker/leases.py)
    lease_bytes: dict[str, int] = {}  # the temps their leases hold (in memory_used)
    for lease in engine.leases.values():
        if lease.state in ("granting", "active"):
            leased[lease.tenant] = leased.get(lease.tenant, 0) + 1
        if lease.admission is not None:
            lease_bytes[lease.tenant] = lease_bytes.get(lease.tenant, 0) + lease.admission.temp_bytes
    for st in engine.tenants.values():
        pol = st.policy
        row = rows.setdefault(st.name, {"tenant": st.name, "graphs": st.graphs, "errors": 0,
                                         "device_seconds": st.device_seconds})
        row.update({
            "sessions": st.sessions, "weight": pol.weight, "priority": pol.priority,
            "waiting": st.waiting, "running": st.in_sched - (st.waiting - len(st.parked)), "parked": len(st.parked),
            "memory_used": engine.pool.used(tenant=st.name), "device_quota": pol.device_memory or None,
            "total_quota": pol.total_memory or None, "residents": len(st.residents),
            "resident_bytes": sum(r.nbytes for r in st.residents.values()), "arenas": st.arenas,
            "leased": leased.get(st.name, 0), "lease_bytes": lease_bytes.get(st.name, 0),
        })
    total = sum(r["device_seconds"] for r in rows.values()) or 1.0
    for r in rows.values():
        r["share"] = r["device_seconds"] / total
    return sorted(rows.values(), key=lambda t: t["tenant"])


def residents(engine: Engine) -> list[dict[str, Any]]:
    return [{"tenant": r.tenant, "resident": r.digest, "bytes": r.nbytes, "devices": sorted(r.devices),
             "in_use": r.inflight} for r in engine.residents.values()]


async def memory(engine: Engine) -> list[dict[str, Any]]:
    """Per device, the broker's accounting (what quotas and eviction decide by: resident copies,
    and the memory reserved for graphs on the device) beside what the worker itself holds and what
    the device reports.  The worker's part is None while it is down or does not answer."""
    from .streams.wire import WInfo

    rows = []
    for name, w in engine.workers.items():
        usage: dict[str, int] | None = None
        if w.alive:
            try:
                reply = await asyncio.wait_for(w.call(WInfo(w.next_seq())), 5.0)
                usage = dict(reply.info.get("usage") or {})
            except (errors.KaasError, TimeoutError):
                usage = None
        rows.append({"device": name, "accounted": engine.pool.used(name),
                     "accounted_residents": engine.pool.resident_bytes(name),
                     "accounted_graphs": engine.pool.reserved_bytes(name),
                     "capacity": engine.pool.capacity(name), "worker": usage})
    return rows


def quarantine_list(engine: Engine) -> list[dict[str, Any]]:
    return [{"tenant": t, "library": lib, "kernel": k, "since": since, "faults": engine.strikes.get((t, lib, k), 0)}
            for (t, lib, k), since in sorted(engine.quarantined.items())]


async def run(engine: Engine, command: str, args: dict[str, Any]) -> Any:
    """Run one admin command; unknown commands and bad arguments are InvalidArgument."""
    if command == "status":
        return status(engine)
    if command == "tenants":
        return tenants(engine)
    if command == "residents":
        return residents(engine)
    if command == "memory":
        return await memory(engine)
    if command in ("drain", "undrain"):
        device = args.get("device")
        if device not in engine.workers:
            raise errors.InvalidArgument(f"no device {device!r} (devices: {', '.join(engine.workers)})")
        drained = engine._sched_of(device).drained
        (drained.add if command == "drain" else drained.discard)(device)
        if command == "drain":
            engine.revoke_where(device=device)  # a leased session's runs come back to the broker
        if command == "undrain":
            engine.pump()
        return {"device": device, "drained": device in drained}
    if command == "reload":
        if engine.reload_hook is None:
            raise errors.InvalidArgument("this broker was started without a config file to reload")
        return {"reloaded": await engine.reload_hook()}
    if command == "quarantine_list":
        return quarantine_list(engine)
    if command == "quarantine_clear":
        tenant = args.get("tenant")
        if tenant is not None and not isinstance(tenant, str):
            raise errors.InvalidArgument("tenant must be a string")
        return {"cleared": engine.clear_quarantine(tenant)}
    raise errors.InvalidArgument(f"unknown admin command {command!r} (known: {', '.join(COMMANDS)})")
