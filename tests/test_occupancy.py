"""The processor-sharing clock that charges device time to graphs running at once (no GPU)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.streams.occupancy import OccupancyClock


def _charges(events: list[tuple[float, str, str]]) -> tuple[dict[str, float], OccupancyClock]:
    """Feed (time, "start"/"finish", graph) events in order; returns each graph's charge."""
    clock = OccupancyClock()
    marks: dict[str, float] = {}
    charges: dict[str, float] = {}
    for t, what, graph in events:
        if what == "start":
            marks[graph] = clock.start(t)
        else:
            charges[graph] = clock.finish(t, marks.pop(graph))
    assert not marks and clock.running == 0
    return charges, clock


def test_one_graph_alone_is_charged_its_span() -> None:
    charges, clock = _charges([(10.0, "start", "a"), (10.25, "finish", "a")])
    assert charges["a"] == pytest.approx(0.25)
    assert clock.busy == pytest.approx(0.25)


def test_two_graphs_side_by_side_share_the_time() -> None:
    charges, clock = _charges([(0.0, "start", "a"), (0.0, "start", "b"), (1.0, "finish", "a"), (1.0, "finish", "b")])
    assert charges == {"a": pytest.approx(0.5), "b": pytest.approx(0.5)}
    assert sum(charges.values()) == pytest.approx(clock.busy) == pytest.approx(1.0)


def test_staggered_overlap() -> None:
    # a alone 0-1, a and b 1-3, b alone 3-4: a = 1 + 1, b = 1 + 1.
    charges, clock = _charges([(0.0, "start", "a"), (1.0, "start", "b"), (3.0, "finish", "a"), (4.0, "finish", "b")])
    assert charges == {"a": pytest.approx(2.0), "b": pytest.approx(2.0)}
    assert clock.busy == pytest.approx(4.0)


def test_weights_one_to_two_come_out_one_to_two() -> None:
    """Tenant x runs one graph at a time, tenant y two, all of the same length, on a shared device:
    charged by occupancy y gets twice x's time (event-measured times would give each 1 s a graph)."""
    events: list[tuple[float, str, str]] = []
    for i in range(10):
        t = float(i)
        events += [(t, "start", f"x{i}"), (t, "start", f"y{i}a"), (t, "start", f"y{i}b")]
        events += [(t + 1, "finish", f"x{i}"), (t + 1, "finish", f"y{i}a"), (t + 1, "finish", f"y{i}b")]
    charges, clock = _charges(events)
    x = sum(v for k, v in charges.items() if k.startswith("x"))
    y = sum(v for k, v in charges.items() if k.startswith("y"))
    assert x / (x + y) == pytest.approx(1 / 3) and y / (x + y) == pytest.approx(2 / 3)
    assert x + y == pytest.approx(clock.busy) == pytest.approx(10.0)


def test_idle_gaps_are_charged_to_no_one() -> None:
    charges, clock = _charges([(0.0, "start", "a"), (1.0, "finish", "a"), (5.0, "start", "b"), (5.5, "finish", "b")])
    assert charges == {"a": pytest.approx(1.0), "b": pytest.approx(0.5)}
    assert clock.busy == pytest.approx(1.5)


def test_nested_and_several_finishes_at_one_poll() -> None:
    # a 0-6; b 1-3; c 2-3 (b and c seen done by one poll at 3).
    charges, clock = _charges([(0.0, "start", "a"), (1.0, "start", "b"), (2.0, "start", "c"),
                               (3.0, "finish", "b"), (3.0, "finish", "c"), (6.0, "finish", "a")])
    assert charges["a"] == pytest.approx(1 + 0.5 + 1 / 3 + 3)
    assert charges["b"] == pytest.approx(0.5 + 1 / 3)
    assert charges["c"] == pytest.approx(1 / 3)
    assert sum(charges.values()) == pytest.approx(clock.busy) == pytest.approx(6.0)


def test_a_clock_read_out_of_order_adds_nothing() -> None:
    clock = OccupancyClock()
    m = clock.start(5.0)
    assert clock.finish(4.0, m) == 0.0 and clock.busy == 0.0


def test_finish_without_start_is_refused() -> None:
    with pytest.raises(ValueError):
        OccupancyClock().finish(1.0, 0.0)


@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0, 10)), min_size=1, max_size=30))
def test_charges_sum_to_the_busy_time(spans: list[tuple[float, float]]) -> None:
    """Any set of (start, length) graphs: the charges add up to the measure of the union of the spans."""
    events = sorted([(s, "start", str(i)) for i, (s, _) in enumerate(spans)]
                    + [(s + d, "finish", str(i)) for i, (s, d) in enumerate(spans)],
                    key=lambda e: (e[0], e[1] == "start"))  # at a tie, finishes first
    # A zero-length graph sorts its finish before its start: keep each graph's start first.
    seen: set[str] = set()
    ordered: list[tuple[float, str, str]] = []
    pending: list[tuple[float, str, str]] = []
    for e in events:
        if e[1] == "finish" and e[2] not in seen:
            pending.append(e)
            continue
        ordered.append(e)
        seen.add(e[2])
        for p in [p for p in pending if p[2] in seen]:
            ordered.append(p)
            pending.remove(p)
    charges, clock = _charges(ordered)
    union, end = 0.0, -1.0
    for s, d in sorted(spans):
        if s + d > end:
            union += s + d - max(s, end)
            end = s + d
    assert all(c >= 0 for c in charges.values())
    assert sum(charges.values()) == pytest.approx(clock.busy, abs=1e-9)
    assert clock.busy == pytest.approx(union, abs=1e-9)
