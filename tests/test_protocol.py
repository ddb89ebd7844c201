"""The wire protocol on byte strings: framing, encoding, typed decode errors."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import errors, protocol
from broker.protocol import FrameDecoder


def _graph() -> protocol.GraphSpec:
    return protocol.GraphSpec(
        (protocol.BufferSpec("in", "float32", (4,), 1, 0), protocol.BufferSpec("temp", "float32", (4,))),
        (protocol.KernelNode("ab" * 32, "k", (1,), (4,), (protocol.Buf(0), protocol.Lit("i32", 3),
                                                       protocol.Lit("f64", 2.5)), 0, ()),))


MESSAGES = [
    protocol.Hello(protocol.PROTOCOL_VERSION, "t"),
    protocol.RegisterArena(1, 4096),
    protocol.ReleaseArena(2, 1),
    protocol.RegisterLibrary(3, "cuda", b"__global__ void k(){}", (protocol.KernelSpec(
        "k", (protocol.Param("x", "buf", "in", "float32"), protocol.Param("n", "i32")), "m:f"),)),
    protocol.PutResident(4, 1, 0, 16, b"\0" * 32),
    protocol.ReleaseResident(5, "ff"),
    protocol.RunGraph(6, _graph(), 1.5),
    protocol.Ping(7),
    protocol.Status(8),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_tenant_messages_round_trip(msg: msgspec.Struct) -> None:
    frame = protocol.encode(msg)
    (length,) = protocol.HEADER.unpack_from(frame)
    assert length == len(frame) - protocol.HEADER_SIZE
    (body,) = FrameDecoder().feed(frame)
    assert protocol.decode_tenant(body) == msg


def test_broker_messages_round_trip() -> None:
    for msg in [protocol.Welcome(1, 2, "t", 1024, ("cpu:0",)), protocol.GraphDone(3, "cpu:0", protocol.Timings(1, 2)),
                protocol.Error(4, "out_of_bounds", "no", {"a": 1}), protocol.LibraryRegistered(5, "d", True, "log")]:
        (body,) = FrameDecoder().feed(protocol.encode(msg))
        assert protocol.decode_broker(body) == msg


def test_decoder_reassembles_frames_split_anywhere() -> None:
    stream = b"".join(protocol.encode(m) for m in MESSAGES)
    for chunk in (1, 2, 3, 7, 64, len(stream)):
        dec = FrameDecoder()
        bodies: list[bytes] = []
        for i in range(0, len(stream), chunk):
            bodies += dec.feed(stream[i:i + chunk])
        assert [protocol.decode_tenant(b) for b in bodies] == MESSAGES
        assert dec.pending == 0


@given(st.lists(st.integers(min_value=0, max_value=10**6), max_size=20), st.data())
@settings(max_examples=100, deadline=None)
def test_decoder_property_any_split(cuts: list[int], data: st.DataObject) -> None:
    msgs = data.draw(st.lists(st.sampled_from(MESSAGES), min_size=1, max_size=8))
    stream = b"".join(protocol.encode(m) for m in msgs)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    dec = FrameDecoder()
    out: list[bytes] = []
    for a, b in zip(points, points[1:], strict=False):
        out += dec.feed(stream[a:b])
    assert [protocol.decode_tenant(x) for x in out] == msgs


def test_oversized_frame_is_refused_from_its_header_alone() -> None:
    dec = FrameDecoder(max_frame=1024)
    with pytest.raises(errors.FrameTooLarge) as ei:
        dec.feed(protocol.HEADER.pack(1025))  # no body byte sent: refused before buffering
    assert ei.value.detail == {"size": 1025, "max_frame": 1024}
    assert "1025" in str(ei.value) and dec.pending == 0


def test_truncated_frame_is_held_back() -> None:
    frame = protocol.encode(protocol.Ping(1))
    dec = FrameDecoder()
    assert dec.feed(frame[:-1]) == []
    assert dec.pending == len(frame) - 1


def test_body_that_is_not_msgpack_is_malformed() -> None:
    with pytest.raises(errors.MalformedFrame):
        protocol.decode_tenant(b"\xc1")  # 0xc1 is never valid msgpack


def test_unknown_message_type_keeps_the_request_id() -> None:
    with pytest.raises(errors.UnknownMessage) as ei:
        protocol.decode_tenant(msgspec.msgpack.encode(["launch_missiles", 42]))
    assert ei.value.detail["req"] == 42 and "launch_missiles" in str(ei.value)


def test_wrong_field_type_is_malformed_with_request_id() -> None:
    with pytest.raises(errors.MalformedFrame) as ei:
        protocol.decode_tenant(msgspec.msgpack.encode(["run", 9, "not a graph"]))
    assert ei.value.detail["req"] == 9


def test_broker_only_message_from_tenant_is_unknown() -> None:
    with pytest.raises(errors.UnknownMessage):
        protocol.decode_tenant(msgspec.msgpack.encode(["welcome", 1, 1, "t", 1, []]))


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bodies_decode_or_raise_typed(body: bytes) -> None:
    try:
        protocol.decode_tenant(body)
    except errors.ProtocolError as exc:
        assert errors.error_class(exc.code) is type(exc)


def test_error_codes_round_trip_to_the_same_class() -> None:
    for cls in (errors.OutOfBounds, errors.CompileError, errors.KernelFault, errors.QuotaExceeded):
        frame = protocol.error_frame(3, cls("why", detail={"x": 1}))
        (body,) = FrameDecoder().feed(frame)
        msg = protocol.decode_broker(body)
        assert isinstance(msg, protocol.Error)
        err = errors.from_wire(msg.code, msg.message, msg.detail)
        assert type(err) is cls and err.detail == {"x": 1} and str(err) == "why"


def test_unknown_error_code_falls_back_but_keeps_the_code() -> None:
    err = errors.from_wire("from_the_future", "m")
    assert type(err) is errors.KaasError and err.detail["code"] == "from_the_future"


def test_error_codes_are_unique_and_grouped() -> None:
    assert issubclass(errors.OutOfBounds, errors.InvalidGraph)
    assert issubclass(errors.InvalidGraph, errors.TenantError)
    assert issubclass(errors.KernelFault, errors.DeviceError)
    assert issubclass(errors.TooManyRequests, errors.QuotaError)


def test_compiling_leaves_interned_bytes_alone() -> None:
    """NVRTC writes into its output buffers; they must never be CPython's interned 1-byte objects."""
    from broker.streams import compiler

    if not compiler.nvrtc_available():
        pytest.skip("NVRTC is not installed")
    compiler.compile_cuda(b'extern "C" __global__ void k() {}', "sm_80")  # an empty log: 1 byte
    # ``x[0]`` reads the byte's value; comparing bytes objects would compare the singleton with itself.
    assert b"a b"[1:2][0] == 0x20 and (b" " * 1)[0] == 0x20
