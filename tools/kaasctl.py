"""``kaasctl``: administer a running kaas broker (root or the broker's ``admin_group``).

    kaasctl [--socket PATH] [--json] status                 devices, workers, memory, queue, counters
    kaasctl [--socket PATH] [--json] tenants                every tenant since start: graphs, errors,
                                                            share of device time, quota use, queue
    kaasctl [--socket PATH] [--json] residents              resident buffers and where they are
    kaasctl [--socket PATH] [--json] memory                 device memory: the broker's accounting
                                                            beside the worker's and the device's count
    kaasctl [--socket PATH] drain DEVICE | undrain DEVICE   stop / resume placing new graphs on a device
    kaasctl [--socket PATH] reload                          re-read the config (as SIGHUP does)
    kaasctl [--socket PATH] [--json] quarantine list        kernels refused after repeated faults
    kaasctl [--socket PATH] quarantine clear [--tenant T]   lift quarantines
    kaasctl [--socket PATH] ping [--count N]                round trips (any tenant may ping)
    kaasctl token [--tenant NAME] [--user USER]             a new job token and the config rule for it

The socket defaults to $KAAS_SOCKET, else /run/kaas/broker.sock. Tables for people by default,
``--json`` for scripts.

Restarting the broker (``systemctl restart kaas-broker``) is safe: running graphs finish, queued
ones are refused with shutting_down, and tenants connected with ``reconnect=True`` carry on with
the new broker (README, Operations).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

import tenantlib
from tenantlib import errors


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=False)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), *(fmt(r) for r in rows)])


def show_status(st: dict[str, Any]) -> str:
    rows = [[d["device"], str(d.get("name", ""))[:28], "up" if d["alive"] else "DOWN",
             "drained" if d.get("drained") else "", str(d.get("pid") or "-"), str(d.get("running", 0)),
             f"{_bytes(d.get('memory_used'))} / {_bytes(d.get('memory_capacity'))}"] for d in st["devices"]]
    out = _table(rows, ["device", "name", "state", "", "pid", "running", "memory (used / usable)"])
    out += f"\n\npolicy {st['policy']}; queued graphs {st['queued']}; tenants {st['tenants']}"
    out += "" if st["accepting"] else "; SHUTTING DOWN"
    out += "\ncounters: " + ", ".join(f"{k}={v}" for k, v in sorted(st["stats"].items()))
    return out


def show_tenants(ts: list[dict[str, Any]]) -> str:
    """Every tenant since the broker started; one with no session left shows its totals and '-'."""
    rows = [[t["tenant"], f"{t['weight']:g}" if t["weight"] is not None else "-", t["priority"] or "-",
             str(t["sessions"]), str(t.get("leased", 0)), str(t["graphs"]), str(t.get("errors", 0)), f"{t['share'] * 100:.1f}%",
             f"{t['device_seconds']:.3f}", str(t["waiting"]), str(t["parked"]),
             f"{_bytes(t['memory_used'])} / {_bytes(t['device_quota'])}", str(t["residents"])] for t in ts]
    return _table(rows, ["tenant", "weight", "class", "sessions", "direct", "graphs", "errors", "share", "device s",
                         "waiting", "held back", "memory / quota", "residents"])


def show_residents(rs: list[dict[str, Any]]) -> str:
    rows = [[r["tenant"], r["resident"][:16], _bytes(r["bytes"]), ",".join(r["devices"]) or "-", str(r["in_use"])]
            for r in rs]
    return _table(rows, ["tenant", "resident", "size", "on devices", "in use"])


def show_memory(ms: list[dict[str, Any]]) -> str:
    """The broker's accounting (residents + graphs on the device) beside the worker's own count of
    its residents, its graph pool (lane slabs, cached blocks) and the device's used / total."""
    rows = []
    for m in ms:
        w = m["worker"] or {}
        pool = f"{_bytes(w['pool_used'])} / {_bytes(w['pool_reserved'])}" if "pool_used" in w else "-"
        dev = f"{_bytes(w['device_used'])} / {_bytes(w['device_total'])}" if "device_used" in w else "-"
        rows.append([m["device"], _bytes(m["accounted"]), _bytes(m["accounted_residents"]),
                     _bytes(m["accounted_graphs"]), _bytes(w.get("resident_bytes")) if w else "DOWN", pool, dev])
    return _table(rows, ["device", "accounted", "residents", "graphs", "worker residents", "graph pool used / held",
                         "device used / total"])


def show_quarantine(qs: list[dict[str, Any]]) -> str:
    if not qs:
        return "no kernel is quarantined"
    rows = [[q["tenant"], q["kernel"], q["library"][:16], str(q["faults"]),
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(q["since"]))] for q in qs]
    return _table(rows, ["tenant", "kernel", "library", "faults", "since"])


def new_token(tenant: str, user: str) -> str:
    """A fresh token, and the rule to add to the broker's config: the config keeps only its digest."""
    import secrets

    from broker.tenants import token_digest

    token = secrets.token_urlsafe(32)
    return (f"# give the job KAAS_TOKEN={token}\n# (it is shown once; the broker's config keeps only its digest)\n"
            f'[[tenants]]\nname = "{tenant}"\nuser = "{user}"\ntoken_sha256 = "{token_digest(token)}"')


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kaasctl", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--socket", help="broker socket (default $KAAS_SOCKET or /run/kaas/broker.sock)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    # --json may come before or after the command
    js = argparse.ArgumentParser(add_help=False)
    js.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("status", parents=[js], help="devices, workers, memory, queue and counters")
    sub.add_parser("tenants", parents=[js], help="each tenant's share of device time, quota use and queue")
    sub.add_parser("residents", parents=[js], help="resident buffers and the devices holding them")
    sub.add_parser("memory", parents=[js], help="device memory: the broker's accounting against the worker's count")
    for name, what in (("drain", "stop placing new graphs on DEVICE (running ones finish)"),
                       ("undrain", "place graphs on DEVICE again")):
        sp = sub.add_parser(name, parents=[js], help=what)
        sp.add_argument("device", help="e.g. cuda:0")
    sub.add_parser("reload", parents=[js], help="re-read the broker's config file (tenant policy) as SIGHUP does")
    q = sub.add_parser("quarantine", help="kernels refused after repeated faults")
    qsub = q.add_subparsers(dest="qcmd", required=True)
    qsub.add_parser("list", parents=[js], help="list quarantined kernels")
    qc = qsub.add_parser("clear", parents=[js], help="lift quarantines")
    qc.add_argument("--tenant", help="only this tenant's")
    tk = sub.add_parser("token", help="print a new job token (for $KAAS_TOKEN) and the config rule naming it")
    tk.add_argument("--tenant", default="job", help="the tenant the token names")
    tk.add_argument("--user", default="ray", help="the user allowed to present it (whose uid the jobs share)")
    pg = sub.add_parser("ping", help="measure round trips to the broker")
    pg.add_argument("--count", type=int, default=10)
    args = p.parse_args(argv)
    if args.cmd == "token":
        print(new_token(args.tenant, args.user))
        return 0
    try:
        with tenantlib.connect(args.socket, client="kaasctl", timeout=30) as c:
            if args.cmd == "ping":
                a = np.asarray([c.ping() for _ in range(max(1, args.count))]) * 1e6
                print(f"{a.size} pings: p50 {np.median(a):.1f} us, min {a.min():.1f} us, max {a.max():.1f} us")
                return 0
            if args.cmd == "quarantine":
                command, cargs = f"quarantine_{args.qcmd}", ({"tenant": args.tenant} if args.qcmd == "clear"
                                                             and args.tenant else {})
            elif args.cmd in ("drain", "undrain"):
                command, cargs = args.cmd, {"device": args.device}
            else:
                command, cargs = args.cmd, {}
            result = c.admin(command, **cargs)
    except errors.KaasError as exc:
        print(f"kaasctl: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif command == "status":
        print(show_status(result))
    elif command == "tenants":
        print(show_tenants(result))
    elif command == "residents":
        print(show_residents(result) if result else "no resident buffers")
    elif command == "memory":
        print(show_memory(result))
    elif command == "quarantine_list":
        print(show_quarantine(result))
    elif command == "quarantine_clear":
        print(f"lifted {result['cleared']} quarantine(s)")
    elif command in ("drain", "undrain"):
        print(f"{result['device']}: {'drained' if result['drained'] else 'accepting graphs'}")
    elif command == "reload":
        print(f"reloaded: {result['reloaded']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
