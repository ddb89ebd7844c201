"""``kaasctl``: inspect a running kaas broker.

    kaasctl [--socket PATH] status [--json]   devices, workers, queue, counters
    kaasctl [--socket PATH] ping [--count N]  round trips to the broker

The socket defaults to $KAAS_SOCKET, else /run/kaas/broker.sock.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import tenantlib
from tenantlib import errors


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def cmd_status(client: tenantlib.Client, args: argparse.Namespace) -> int:
    st = client.status()
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    print(f"{'device':<10} {'name':<28} {'state':<6} {'pid':>8} {'running':>8} {'memory':>12}")
    for d in st["devices"]:
        print(f"{d['device']:<10} {str(d.get('name', ''))[:28]:<28} {'up' if d['alive'] else 'DOWN':<6} "
              f"{d.get('pid') or '-':>8} {d.get('running', 0):>8} {_human_bytes(d.get('memory', 0)):>12}")
    print(f"\nqueued graphs: {st['queued']}")
    print("counters: " + ", ".join(f"{k}={v}" for k, v in sorted(st.get("stats", {}).items())))
    return 0


def cmd_ping(client: tenantlib.Client, args: argparse.Namespace) -> int:
    rtts = [client.ping() for _ in range(args.count)]
    a = np.asarray(rtts) * 1e6
    print(f"{args.count} pings to {client.tenant}@broker: p50 {np.median(a):.1f} us, min {a.min():.1f} us, "
          f"max {a.max():.1f} us")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kaasctl", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--socket", help="broker socket (default $KAAS_SOCKET or /run/kaas/broker.sock)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", help="devices, workers, queue and counters")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)
    pg = sub.add_parser("ping", help="measure round trips to the broker")
    pg.add_argument("--count", type=int, default=10)
    pg.set_defaults(func=cmd_ping)
    args = p.parse_args(argv)
    try:
        with tenantlib.connect(args.socket, client="kaasctl", timeout=10) as client:
            return int(args.func(client, args))
    except errors.KaasError as exc:
        print(f"kaasctl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
