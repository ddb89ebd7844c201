"""The device time charged to graphs that share a device at once: a processor-sharing clock.

Pure (no CUDA, time passed in).  A GPU with several lanes runs graphs at the same time, so
per-graph measured times overlap and do not add up to the time the device was busy: summed
they over-charge whoever overlaps most, and a fair-share scheduler fed with them drifts.
This clock charges by occupancy instead.  The one rule: while ``n > 0`` graphs are on the
device, each of them is charged ``1/n`` of every elapsed second.  It is kept as a virtual
time ``vt`` that advances by ``(t - last) / n`` at every start and finish observed at host
time ``t``; a graph is charged ``vt(finish) - vt(start)``.  The charges of all graphs add up
to exactly the time during which some graph was on the device (``busy``).
"""

from __future__ import annotations

__all__ = ["OccupancyClock"]


class OccupancyClock:
    """Processor-sharing virtual time over the graphs on one device."""

    __slots__ = ("busy", "last", "running", "vt")

    def __init__(self) -> None:
        self.vt = 0.0  # virtual seconds: what one graph on the device all along would have been charged
        self.last = 0.0  # host time of the last start or finish
        self.running = 0  # graphs started and not finished
        self.busy = 0.0  # seconds with at least one graph running: the sum of all charges so far

    def _advance(self, t: float) -> None:
        if self.running:
            dt = t - self.last
            if dt > 0:  # a clock read before the last event (or equal to it) adds nothing
                self.vt += dt / self.running
                self.busy += dt
                self.last = t
        else:
            self.last = max(self.last, t)

    def start(self, t: float) -> float:
        """A graph went on the device at ``t``; returns its mark for ``finish``."""
        self._advance(t)
        self.running += 1
        return self.vt

    def finish(self, t: float, mark: float) -> float:
        """The graph started at ``mark`` was seen done at ``t``; returns its charge in seconds."""
        if self.running <= 0:
            raise ValueError("finish without a start")
        self._advance(t)
        self.running -= 1
        return self.vt - mark
