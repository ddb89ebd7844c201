"""The shared-memory rings of the hot path: order, wrap-around, hostile peers, sealing, processes.

Cross-process tests fork children that map the same memfd; every wait in them is bounded and a
child that fails reports it through its exit code.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import struct
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from broker import errors, ring
from broker.ring import (
    Consumer,
    Producer,
    RingCorrupt,
    RingGeometry,
    create_segment,
    drain,
    make_eventfd,
    map_segment,
    wait_readable,
    wake,
)

_FORK = multiprocessing.get_context("fork")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEAD, _TAIL, _SLEEPING = 64, 128, 192


class Ring:
    """One segment with a producer and a consumer over the same ring, in this process."""

    def __init__(self, geom: RingGeometry, index: int = 0) -> None:
        self.geom = geom
        self.fd, self.mm = create_segment(geom)
        self.base = geom.offset(index)
        self.p = Producer(self.mm, geom, index)
        self.c = Consumer(self.mm, geom, index)

    def poke32(self, offset: int, value: int) -> None:
        _U32.pack_into(self.mm, self.base + offset, value)

    def poke64(self, offset: int, value: int) -> None:
        _U64.pack_into(self.mm, self.base + offset, value)

    def slot(self, i: int) -> int:
        """Offset of slot ``i`` from the ring's start."""
        return ring.HEADER_BYTES + (i & (self.geom.slots - 1)) * self.geom.slot_size

    def close(self) -> None:
        self.p.close()
        self.c.close()
        self.mm.close()
        os.close(self.fd)


@pytest.fixture
def small() -> Iterator[Ring]:
    r = Ring(RingGeometry(slots=4, slot_size=32))
    yield r
    r.close()


_BASE = bytes(range(256)) * 40


def _record(seq: int, size: int) -> bytes:
    """A self-checking record: seq, crc32 of the body, then ``size`` body bytes."""
    body = _BASE[seq % 251:seq % 251 + size]
    return struct.pack("<II", seq, zlib.crc32(body)) + body


def _check(rec: bytes) -> int:
    seq, crc = struct.unpack_from("<II", rec)
    assert zlib.crc32(rec[8:]) == crc, f"record {seq} is damaged"
    return int(seq)


# -- basics -------------------------------------------------------------------------------
def test_push_pop_keeps_order(small: Ring) -> None:
    assert small.c.pop() is None
    for word in (b"a", b"bb", b"ccc"):
        assert small.p.push(word)
    assert small.c.pending() == 3
    assert [small.c.pop(), small.c.pop(), small.c.pop(), small.c.pop()] == [b"a", b"bb", b"ccc", None]


def test_wraps_around_many_times(small: Ring) -> None:
    sent: deque[bytes] = deque()
    for seq in range(5000):
        rec = _record(seq, seq % 20)
        assert small.p.push(rec)
        sent.append(rec)
        if seq % 3 == 0 or len(sent) == small.geom.slots:
            while sent:
                assert small.c.pop() == sent.popleft()
    assert small.c.pop_many(10) == list(sent)


def test_full_ring_refuses_without_blocking(small: Ring) -> None:
    for i in range(4):
        assert small.p.space() == 4 - i
        assert small.p.push(bytes([i + 1]))
    assert small.p.space() == 0
    assert not small.p.push(b"x")
    assert small.c.pop() == b"\x01"
    assert small.p.space() == 1
    assert small.p.push(b"y")
    assert small.c.pop_many(100) == [b"\x02", b"\x03", b"\x04", b"y"]


def test_max_payload_and_empty_records(small: Ring) -> None:
    assert small.p.max_payload == small.c.max_payload == 28 == small.geom.max_payload
    assert small.p.push(b"m" * 28)
    assert small.c.pop() == b"m" * 28
    with pytest.raises(ValueError, match="1 to 28 bytes, not 29"):
        small.p.push(b"m" * 29)
    with pytest.raises(ValueError, match="not 0"):  # zero-length records are refused
        small.p.push(b"")
    assert small.c.pop() is None


def test_payload_types(small: Ring) -> None:
    assert small.p.push(bytearray(b"ba"))
    assert small.p.push(memoryview(struct.pack("<QQ", 1, 2)).cast("Q"))  # counted in bytes
    assert small.c.pop() == b"ba"
    assert small.c.pop() == struct.pack("<QQ", 1, 2)
    with pytest.raises(ValueError, match="not 32"):
        small.p.push(memoryview(bytes(32)).cast("Q"))


def test_pop_many_is_bounded(small: Ring) -> None:
    for i in range(4):
        small.p.push(bytes([i + 1]))
    assert small.c.pop_many(0) == []
    assert small.c.pop_many(3) == [b"\x01", b"\x02", b"\x03"]
    assert small.c.pop_many(3) == [b"\x04"]
    assert small.c.pop_many(3) == []


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"slots": 3, "slot_size": 64}, ["slots", "3"]),
        ({"slots": 1, "slot_size": 64}, ["slots", "1"]),
        ({"slots": 1 << 21, "slot_size": 64}, ["slots", str(1 << 21)]),
        ({"slots": 8, "slot_size": 12}, ["slot_size", "12"]),
        ({"slots": 8, "slot_size": 8}, ["slot_size", "8"]),
        ({"slots": 8, "slot_size": 36}, ["slot_size", "36"]),
        ({"slots": 8, "slot_size": 64, "rings": 0}, ["rings", "0"]),
        ({"slots": 1 << 20, "slot_size": 1 << 12}, ["segment", "limit"]),
    ],
)
def test_geometry_names_the_bad_value(kwargs: dict[str, int], words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        RingGeometry(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_spin_hint_is_a_header_word_apart_from_the_data(small: Ring) -> None:
    assert small.c.spin_hint() == 0  # a new ring advises nothing
    small.p.set_spin_hint(200)
    assert small.c.spin_hint() == 200
    assert small.p.push(b"after the hint") and small.c.pop() == b"after the hint"
    assert small.c.spin_hint() == 200  # records do not touch it, and it does not touch them
    small.p.set_spin_hint(-5)
    assert small.c.spin_hint() == 0
    small.poke32(32, 0xFFFFFFFF)  # the consumer's peer may write anything: it is only a hint
    assert small.c.spin_hint() == 0xFFFFFFFF


def test_geometry_types_and_offsets() -> None:
    with pytest.raises(TypeError, match="slots"):
        RingGeometry(slots=4.0, slot_size=64)  # type: ignore[arg-type]
    g = RingGeometry(slots=2, slot_size=16, rings=3)
    assert g.ring_bytes == 320  # 256 + 32, rounded up to a cache line
    assert g.segment_bytes == 960
    assert [g.offset(i) for i in range(3)] == [0, 320, 640]
    with pytest.raises(ValueError, match="not 3"):
        g.offset(3)


def test_rings_of_a_segment_are_independent() -> None:
    g = RingGeometry(slots=2, slot_size=16, rings=3)
    fd, mm = create_segment(g)
    try:
        for i in range(3):
            assert mm[g.offset(i):g.offset(i) + 8] == ring.MAGIC
        ends = [(Producer(mm, g, i), Consumer(mm, g, i)) for i in range(3)]
        for i, (p, _) in enumerate(ends):
            p.push(bytes([i]) * (i + 1))
        assert [c.pop() for _, c in ends] == [b"\x00", b"\x01\x01", b"\x02\x02\x02"]
        for p, c in ends:
            p.close()
            c.close()
            c.close()  # idempotent
    finally:
        mm.close()
        os.close(fd)


def test_corrupt_is_a_registered_protocol_error() -> None:
    assert issubclass(RingCorrupt, errors.ProtocolError)
    assert errors.error_class("ring_corrupt") is RingCorrupt


# -- a model: producer and consumer against a deque ----------------------------------------
class RingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ring = Ring(RingGeometry(slots=4, slot_size=16))
        self.model: deque[bytes] = deque()

    @rule(data=st.binary(min_size=1, max_size=12))
    def push(self, data: bytes) -> None:
        ok = self.ring.p.push(data)
        assert ok == (len(self.model) < 4)
        if ok:
            self.model.append(data)

    @rule()
    def pop(self) -> None:
        expected = self.model.popleft() if self.model else None
        assert self.ring.c.pop() == expected

    @rule(limit=st.integers(0, 6))
    def pop_many(self, limit: int) -> None:
        expected = [self.model.popleft() for _ in range(min(limit, len(self.model)))]
        assert self.ring.c.pop_many(limit) == expected

    @rule()
    def sleep_and_wake(self) -> None:
        empty = not self.model
        assert self.ring.c.prepare_sleep() == empty
        assert self.ring.p.consumer_sleeping() == empty
        self.ring.c.end_sleep()
        assert not self.ring.p.consumer_sleeping()

    @invariant()
    def counts_agree(self) -> None:
        assert self.ring.c.pending() == len(self.model)
        assert self.ring.p.space() == 4 - len(self.model)

    def teardown(self) -> None:
        self.ring.close()


TestRingModel = RingMachine.TestCase
TestRingModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# -- a hostile peer -------------------------------------------------------------------------
@pytest.mark.parametrize("head", [5, 6, 1 << 40, (1 << 64) - 1])
def test_head_too_far_ahead(small: Ring, head: int) -> None:
    small.p.push(b"a")
    small.poke64(_HEAD, head)  # slots = 4, tail = 0
    with pytest.raises(RingCorrupt, match="head"):
        small.c.pending()
    with pytest.raises(RingCorrupt):
        small.c.pop()
    with pytest.raises(RingCorrupt):
        small.c.pop_many(8)
    with pytest.raises(RingCorrupt):
        small.c.prepare_sleep()


def test_head_ahead_within_bounds_is_only_garbage(small: Ring) -> None:
    small.poke64(_HEAD, 1)  # a record never written: length 0
    with pytest.raises(RingCorrupt, match="length 0"):
        small.c.pop()


@pytest.mark.parametrize("head", [0, 2])
def test_head_behind(small: Ring, head: int) -> None:
    for _ in range(3):
        small.p.push(b"a")
    assert small.c.pop_many(3) == [b"a"] * 3
    small.poke64(_HEAD, head)
    with pytest.raises(RingCorrupt, match="head"):
        small.c.pop()
    with pytest.raises(RingCorrupt):
        small.c.pending()


@pytest.mark.parametrize("length", [0, 29, 1 << 20, (1 << 32) - 1])
def test_bad_length(small: Ring, length: int) -> None:
    small.p.push(b"a")
    small.p.push(b"b")
    small.poke32(small.slot(1), length)
    assert small.c.pop() == b"a"
    with pytest.raises(RingCorrupt, match=f"length {length}"):
        small.c.pop()
    with pytest.raises(RingCorrupt):  # and it stays refused: nothing was consumed
        small.c.pop_many(4)
    with pytest.raises(RingCorrupt):
        small.c.pop()


@pytest.mark.parametrize("tail", [5, 1 << 63, (1 << 64) - 1])
def test_tail_ahead_of_head(small: Ring, tail: int) -> None:
    for _ in range(4):
        small.p.push(b"a")
    small.poke64(_TAIL, tail)
    with pytest.raises(RingCorrupt, match="tail"):
        small.p.push(b"b")  # full by its cached tail: it re-reads the consumer's
    with pytest.raises(RingCorrupt):
        small.p.space()


def test_tail_going_backwards(small: Ring) -> None:
    for _ in range(4):
        small.p.push(b"a")
    small.c.pop_many(2)
    assert small.p.space() == 2
    small.poke64(_TAIL, 1)
    with pytest.raises(RingCorrupt, match="tail 1"):
        small.p.space()


def test_scribbled_own_index_is_never_read_back(small: Ring) -> None:
    small.p.push(b"a")
    small.poke64(_TAIL, 3)  # the consumer's own index: it keeps its copy
    assert small.c.pop() == b"a"
    small.poke64(_TAIL, 1)
    small.poke64(_HEAD, 1)
    small.poke64(_HEAD + 8, 99)  # rest of the line: ignored
    assert small.p.push(b"b")  # the producer's own head is still 1
    assert small.c.pop() == b"b"


_FUZZ = RingGeometry(slots=4, slot_size=24, rings=2)
_INTERESTING = [_HEAD, _HEAD + 4, _TAIL, _TAIL + 4, _SLEEPING] + [
    ring.HEADER_BYTES + k * _FUZZ.slot_size for k in range(4)
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    preload=st.integers(0, 6),
    scribbles=st.lists(
        st.tuples(
            st.one_of(st.sampled_from(_INTERESTING), st.integers(0, _FUZZ.ring_bytes - 1)),
            st.binary(min_size=1, max_size=12),
        ),
        max_size=6,
    ),
    ops=st.lists(st.sampled_from(["pop", "pop_many", "pending", "push", "space", "sleep"]), max_size=12),
)
def test_fuzzed_memory_raises_only_ring_corrupt(preload: int, scribbles: list[tuple[int, bytes]], ops: list[str]) -> None:
    r = Ring(_FUZZ)
    try:
        for seq in range(preload):
            r.p.push(_record(seq, seq % 12))
            if seq % 2:
                r.c.pop()
        for offset, junk in scribbles:
            junk = junk[:_FUZZ.ring_bytes - offset]
            r.mm[offset:offset + len(junk)] = junk
        for op in ops:
            try:
                if op == "pop":
                    got = r.c.pop()
                    records = [] if got is None else [got]
                elif op == "pop_many":
                    records = r.c.pop_many(3)
                else:
                    records = []
                    if op == "pending":
                        assert 0 <= r.c.pending() <= _FUZZ.slots
                    elif op == "push":
                        r.p.push(b"fuzz")
                    elif op == "space":
                        assert 0 <= r.p.space() <= _FUZZ.slots
                    elif r.c.prepare_sleep():
                        r.p.consumer_sleeping()
                        r.c.end_sleep()
                for rec in records:
                    assert 1 <= len(rec) <= _FUZZ.max_payload
            except RingCorrupt:
                pass
        # the second ring of the segment is untouched by all this
        other_p, other_c = Producer(r.mm, _FUZZ, 1), Consumer(r.mm, _FUZZ, 1)
        assert other_p.push(b"ok") and other_c.pop() == b"ok"
        other_p.close()
        other_c.close()
    finally:
        r.close()


# -- the segment ----------------------------------------------------------------------------
def test_segment_is_sealed() -> None:
    g = RingGeometry(slots=8, slot_size=64)
    fd, mm = create_segment(g)
    try:
        assert os.fstat(fd).st_size == g.segment_bytes
        for size in (0, g.segment_bytes - 64, g.segment_bytes + 4096):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
        import fcntl

        with pytest.raises(PermissionError):  # F_SEAL_SEAL: no more seals (e.g. F_SEAL_WRITE) either
            fcntl.fcntl(fd, 1033, 0x0008)
        assert not os.get_inheritable(fd)
    finally:
        mm.close()
        os.close(fd)


def test_map_segment_shares_the_rings() -> None:
    g = RingGeometry(slots=8, slot_size=64)
    fd, mm = create_segment(g)
    peer = map_segment(fd, g)
    p, c = Producer(mm, g, 1), Consumer(peer, g, 1)
    try:
        assert p.push(b"across mappings")
        assert c.pop() == b"across mappings"
    finally:
        p.close()
        c.close()
        peer.close()
        mm.close()
        os.close(fd)


def test_map_segment_refuses_a_small_fd() -> None:
    fd, mm = create_segment(RingGeometry(slots=8, slot_size=64))
    try:
        with pytest.raises(RingCorrupt, match="smaller than"):
            map_segment(fd, RingGeometry(slots=16, slot_size=64))
    finally:
        mm.close()
        os.close(fd)


def test_map_segment_refuses_an_unsealed_or_plain_file() -> None:
    g = RingGeometry(slots=8, slot_size=64)
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, g.segment_bytes)
        with pytest.raises(RingCorrupt, match="shrinking"):
            map_segment(fd, g)
    finally:
        os.close(fd)
    with tempfile.TemporaryFile() as f:
        f.truncate(g.segment_bytes)
        with pytest.raises(RingCorrupt, match="memfd"):
            map_segment(f.fileno(), g)


def test_mapping_too_small_for_geometry(small: Ring) -> None:
    with pytest.raises(ValueError, match="smaller"):
        Producer(small.mm, RingGeometry(slots=64, slot_size=64), 0)


# -- sleeping and waking (one process) ------------------------------------------------------
def test_prepare_sleep_sees_pending_data(small: Ring) -> None:
    assert small.c.prepare_sleep()
    assert small.p.consumer_sleeping()
    small.c.end_sleep()
    small.p.push(b"a")
    assert not small.c.prepare_sleep()  # data arrived: no sleep, flag cleared
    assert not small.p.consumer_sleeping()


def test_wait_readable(small: Ring) -> None:
    efd = make_eventfd()
    try:
        assert not wait_readable(small.c, efd, spin=0.001, timeout=0.02)
        assert not wait_readable(small.c, efd, spin=0.0, timeout=0.0)
        wake(efd)
        wake(efd)
        assert not wait_readable(small.c, efd, spin=0.0, timeout=0.02)  # a wake-up without data
        small.p.push(b"a")
        assert wait_readable(small.c, efd, spin=0.0, timeout=None)
        drain(efd)
        drain(efd)  # empty: fine
    finally:
        os.close(efd)


# -- across processes -----------------------------------------------------------------------
def _produce(fd: int, geom: RingGeometry, efd: int, count: int) -> None:
    """Child: push ``count`` self-checking records into ring 0, waking the consumer as asked."""
    mm = map_segment(fd, geom)
    p = Producer(mm, geom, 0)
    top = p.max_payload - 8
    for seq in range(count):
        rec = _record(seq, seq % (top + 1))
        while not p.push(rec):
            time.sleep(0)
        if p.consumer_sleeping():
            wake(efd)
        if seq % 500 == 499:
            time.sleep(0.002)  # let the consumer fall asleep now and then
    os._exit(0)


def test_child_produces_parent_consumes() -> None:
    g = RingGeometry(slots=64, slot_size=128)
    fd, mm = create_segment(g)
    efd = make_eventfd()
    c = Consumer(mm, g, 0)
    child = _FORK.Process(target=_produce, args=(fd, g, efd, 10_000))
    child.start()
    try:
        seqs: list[int] = []
        while len(seqs) < 10_000:
            assert wait_readable(c, efd, spin=0.0001, timeout=20.0), f"stalled after {len(seqs)} records"
            seqs.extend(_check(rec) for rec in c.pop_many(32))
        assert seqs == list(range(10_000))
        child.join(20)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        c.close()
        mm.close()
        os.close(fd)
        os.close(efd)


_BIG = RingGeometry(slots=4, slot_size=1 << 20)


def _produce_big(fd: int, efd: int) -> None:
    """Child: push 1 MiB records until killed, so that a kill most likely lands mid-copy."""
    mm = map_segment(fd, _BIG)
    p = Producer(mm, _BIG, 0)
    records = []
    for seq in range(8):
        body = os.urandom(p.max_payload - 8)
        records.append(struct.pack("<II", seq, zlib.crc32(body)) + body)
    seq = 0
    while True:
        while not p.push(records[seq % 8]):
            time.sleep(0)
        if p.consumer_sleeping():
            wake(efd)
        seq += 1


@pytest.mark.parametrize("round_", range(10))
def test_killed_producer_leaves_no_partial_record(round_: int) -> None:
    # Publishing head before the copy fails about half of these rounds.
    fd, mm = create_segment(_BIG)
    efd = make_eventfd()
    c = Consumer(mm, _BIG, 0)
    child = _FORK.Process(target=_produce_big, args=(fd, efd))
    child.start()
    try:
        seen = 0
        while seen < 20:
            assert wait_readable(c, efd, spin=0.001, timeout=20.0)
            seen += len(c.pop_many(4))
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(20)
        assert child.exitcode == -signal.SIGKILL
        while (rec := c.pop()) is not None:
            assert len(rec) == _BIG.max_payload
            assert _check(rec) == seen % 8
            seen += 1
        assert c.pending() == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        c.close()
        mm.close()
        os.close(fd)
        os.close(efd)


_ROUNDS = 3000
_PING = struct.Struct("<Q")


def _pong(fd: int, geom: RingGeometry, efd_parent: int, efd_child: int) -> None:
    """Child: echo each record from ring 0 back on ring 1, sleeping between messages."""
    mm = map_segment(fd, geom)
    inbox, outbox = Consumer(mm, geom, 0), Producer(mm, geom, 1)
    for expected in range(_ROUNDS):
        if not wait_readable(inbox, efd_child, spin=0.0, timeout=20.0):
            os._exit(3)  # a lost wake-up
        rec = inbox.pop()
        if rec is None or _PING.unpack(rec)[0] != expected or not outbox.push(rec):
            os._exit(4)
        if outbox.consumer_sleeping():
            wake(efd_parent)
    os._exit(0)


def test_ping_pong_never_loses_a_wake_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # No periodic re-check: a lost wake-up would stall a side until its 20 s timeout.
    monkeypatch.setattr(ring, "RECHECK_INTERVAL", 3600.0)
    g = RingGeometry(slots=8, slot_size=16)
    fd, mm = create_segment(g)
    efd_parent, efd_child = make_eventfd(), make_eventfd()
    outbox, inbox = Producer(mm, g, 0), Consumer(mm, g, 1)
    child = _FORK.Process(target=_pong, args=(fd, g, efd_parent, efd_child))
    child.start()
    try:
        for i in range(_ROUNDS):
            assert outbox.push(_PING.pack(i))
            if outbox.consumer_sleeping():
                wake(efd_child)
            assert wait_readable(inbox, efd_parent, spin=0.0, timeout=20.0), f"lost a wake-up in round {i}"
            assert inbox.pop() == _PING.pack(i)
        child.join(20)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        outbox.close()
        inbox.close()
        mm.close()
        for fd_ in (fd, efd_parent, efd_child):
            os.close(fd_)
