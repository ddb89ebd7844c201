"""Round trip of a 64-byte record between two processes over two shared-memory rings.

    python -m bench.rings [--iterations N] [--spin-us S]

The parent pushes a record on ring 0, a forked child echoes it back on ring 1.  Both sides wait
the same way, one of:

- ``spin``: busy-poll the ring (what a loaded broker does);
- ``sleep``: sleep on an eventfd between messages (announced with ``prepare_sleep``, so every
  message costs a wake-up on each side);
- ``spin+sleep``: busy-poll for S us, then sleep (``wait_readable``'s normal use).

Prints p50 / p99 / mean in microseconds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

from broker.ring import Consumer, Producer, RingGeometry, create_segment, make_eventfd, map_segment, wait_readable, wake

GEOM = RingGeometry(slots=64, slot_size=128, rings=2)
PAYLOAD = bytes(range(64))
STOP = b"stop"
WARMUP = 500


def _receive(c: Consumer, efd: int, spin: float | None) -> bytes:
    """The next record; ``spin=None`` busy-polls forever, otherwise ``wait_readable(spin)``."""
    while True:
        rec = c.pop()
        if rec is not None:
            return rec
        if spin is not None and not wait_readable(c, efd, spin, timeout=10.0):
            raise TimeoutError("the peer went quiet")


def _send(p: Producer, efd: int, rec: bytes) -> None:
    while not p.push(rec):
        pass
    if p.consumer_sleeping():
        wake(efd)


def _echo(fd: int, efd_parent: int, efd_child: int, spin: float | None) -> None:
    mm = map_segment(fd, GEOM)
    inbox, outbox = Consumer(mm, GEOM, 0), Producer(mm, GEOM, 1)
    while (rec := _receive(inbox, efd_child, spin)) != STOP:
        _send(outbox, efd_parent, rec)
    os._exit(0)


def run(iterations: int, spin: float | None) -> list[float]:
    """Round-trip times in microseconds, after a warm-up."""
    fd, mm = create_segment(GEOM)
    efd_parent, efd_child = make_eventfd(), make_eventfd()
    outbox, inbox = Producer(mm, GEOM, 0), Consumer(mm, GEOM, 1)
    child = multiprocessing.get_context("fork").Process(target=_echo, args=(fd, efd_parent, efd_child, spin))
    child.start()
    clock = time.perf_counter_ns
    times: list[float] = []
    try:
        for i in range(WARMUP + iterations):
            t0 = clock()
            _send(outbox, efd_child, PAYLOAD)
            _receive(inbox, efd_parent, spin)
            if i >= WARMUP:
                times.append((clock() - t0) / 1000)
        _send(outbox, efd_child, STOP)
        child.join(10)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        outbox.close()
        inbox.close()
        mm.close()
        for fd_ in (fd, efd_parent, efd_child):
            os.close(fd_)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--iterations", type=int, default=20_000)
    ap.add_argument("--spin-us", type=float, default=50.0, help="busy-poll time before sleeping in spin+sleep")
    args = ap.parse_args(argv)
    modes: list[tuple[str, float | None]] = [
        ("spin", None), ("sleep", 0.0), (f"spin {args.spin_us:g} us+sleep", args.spin_us / 1e6)]
    print(f"64-byte round trip over two rings, {args.iterations} iterations (us)")
    print(f"{'mode':<22}{'p50':>9}{'p99':>9}{'mean':>9}")
    for name, spin in modes:
        t = sorted(run(args.iterations, spin))
        p50, p99 = t[len(t) // 2], t[min(len(t) - 1, int(len(t) * 0.99))]
        print(f"{name:<22}{p50:>9.1f}{p99:>9.1f}{statistics.fmean(t):>9.1f}")


if __name__ == "__main__":
    main()
