"""broker.metrics: the counters, their exposition, and the HTTP endpoint over TCP and a Unix socket."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from broker import __version__
from broker.metrics import LATENCY_BUCKETS, Metrics, serve_metrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _filled() -> Metrics:
    m = Metrics()
    a = m.tenant("alice")
    assert m.tenant("alice") is a  # bound once, reused
    a.graph_done("cuda:0", latency=30e-6, device_seconds=0.002, bytes_in=4096, bytes_out=1024)
    a.graph_done("cuda:1", latency=0.5, device_seconds=0.25, bytes_in=100, bytes_out=0)
    a.graph_done("cuda:0", latency=99.0, device_seconds=0.0005)
    a.charge("cuda:0", 0.0005)  # a graph that failed on the device still used it
    a.error("quota_exceeded")
    a.error("quota_exceeded")
    a.copied(bytes_in=1 << 20)
    a.evicted("cuda:0")
    m.tenant("bob").error("invalid_graph")
    m.worker_restarted("cuda:1")
    m.set_active_sessions(3)

    def scrape(mm: Metrics) -> None:
        mm.set_queue_depths({"alice": 5})
        mm.set_resident_bytes({("alice", "cuda:0"): 1 << 30})

    m.on_scrape(scrape)
    return m


def test_exposition_has_every_family() -> None:
    m = _filled()
    body, ctype = m.exposition()
    assert ctype.startswith("text/plain")
    s = _samples(body.decode())
    assert s[("kaas_graphs_completed_total", (("tenant", "alice"),))] == 3
    assert s[("kaas_graphs_completed_total", (("tenant", "bob"),))] == 0
    assert s[("kaas_errors_total", (("code", "quota_exceeded"), ("tenant", "alice")))] == 2
    assert s[("kaas_errors_total", (("code", "invalid_graph"), ("tenant", "bob")))] == 1
    assert s[("kaas_device_seconds_total", (("device", "cuda:0"), ("tenant", "alice")))] == pytest.approx(0.003)
    assert s[("kaas_device_seconds_total", (("device", "cuda:1"), ("tenant", "alice")))] == 0.25
    assert s[("kaas_copy_bytes_total", (("direction", "in"), ("tenant", "alice")))] == 4096 + 100 + (1 << 20)
    assert s[("kaas_copy_bytes_total", (("direction", "out"), ("tenant", "alice")))] == 1024
    assert s[("kaas_evictions_total", (("device", "cuda:0"), ("tenant", "alice")))] == 1
    assert s[("kaas_queue_depth", (("tenant", "alice"),))] == 5
    assert s[("kaas_queue_depth", (("tenant", "bob"),))] == 0
    assert s[("kaas_resident_bytes", (("device", "cuda:0"), ("tenant", "alice")))] == 1 << 30
    assert s[("kaas_worker_restarts_total", (("device", "cuda:1"),))] == 1
    assert s[("kaas_active_sessions", ())] == 3
    assert s[("kaas_build_info", (("version", __version__),))] == 1
    # The histogram: 30 us falls in le=4.64e-05, 0.5 s in le=1.0, 99 s only in +Inf.
    lat = {dict(k[1])["le"]: v for k, v in s.items()
           if k[0] == "kaas_request_latency_seconds_bucket" and dict(k[1])["tenant"] == "alice"}
    assert len(lat) == len(LATENCY_BUCKETS) + 1
    assert lat["2.15e-05"] == 0 and lat["4.64e-05"] == 1
    assert lat["0.464"] == 1 and lat["1.0"] == 2 and lat["10.0"] == 2 and lat["+Inf"] == 3
    assert s[("kaas_request_latency_seconds_count", (("tenant", "alice"),))] == 3
    assert s[("kaas_request_latency_seconds_sum", (("tenant", "alice"),))] == pytest.approx(99.50003)


def test_gauges_follow_the_latest_snapshot() -> None:
    m = Metrics()
    m.set_queue_depths({"alice": 2, "bob": 1})
    m.set_resident_bytes({("alice", "cpu:0"): 10, ("bob", "cpu:0"): 20})
    m.set_queue_depths({"bob": 4})
    m.set_resident_bytes({("bob", "cpu:0"): 5})
    s = _samples(m.exposition()[0].decode())
    assert s[("kaas_queue_depth", (("tenant", "alice"),))] == 0
    assert s[("kaas_queue_depth", (("tenant", "bob"),))] == 4
    assert s[("kaas_resident_bytes", (("device", "cpu:0"), ("tenant", "alice")))] == 0
    assert s[("kaas_resident_bytes", (("device", "cpu:0"), ("tenant", "bob")))] == 5


def test_a_failing_scrape_callback_costs_only_its_gauges() -> None:
    m = Metrics()
    m.tenant("alice").error("x")

    def broken(_: Metrics) -> None:
        raise RuntimeError("engine gone")

    m.on_scrape(broken)
    s = _samples(m.exposition()[0].decode())
    assert s[("kaas_errors_total", (("code", "x"), ("tenant", "alice")))] == 1


def test_own_registry_not_the_global_one() -> None:
    Metrics().tenant("alice").error("x")
    assert REGISTRY.get_sample_value("kaas_errors_total", {"tenant": "alice", "code": "x"}) is None
    assert Metrics().registry is not Metrics().registry


def test_latency_buckets_are_log_spaced_from_10us_to_10s() -> None:
    assert LATENCY_BUCKETS[0] == 1e-5 and LATENCY_BUCKETS[-1] == 10.0
    ratios = [b / a for a, b in zip(LATENCY_BUCKETS, LATENCY_BUCKETS[1:], strict=False)]
    assert all(2.1 < r < 2.2 for r in ratios)


def test_openmetrics_when_asked() -> None:
    body, ctype = _filled().exposition("application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


# -- the endpoint ------------------------------------------------------------------------------
async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, dict[str, str], bytes]:
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 30)  # the server closes after one response
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert int(headers["content-length"]) == len(body) or request.startswith(b"HEAD")
    return int(lines[0].split(" ")[1]), headers, body


def _get(path: str = "/metrics", method: str = "GET", accept: str = "") -> bytes:
    extra = f"Accept: {accept}\r\n" if accept else ""
    return f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path("/tmp") / f"kaas-metrics-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def test_scrape_over_tcp() -> None:
    m = _filled()
    server = await serve_metrics(m, port=0)
    assert server.port
    try:
        status, headers, body = await _http(*await asyncio.open_connection("127.0.0.1", server.port), _get())
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=")
        s = _samples(body.decode())
        assert s[("kaas_graphs_completed_total", (("tenant", "alice"),))] == 3
        m.tenant("alice").graph_done("cuda:0", 1e-4, 1e-4)
        status, _, body = await _http(*await asyncio.open_connection("127.0.0.1", server.port),
                                      _get("/metrics?x=1"))
        assert status == 200 and _samples(body.decode())[("kaas_graphs_completed_total", (("tenant", "alice"),))] == 4
        status, _, _ = await _http(*await asyncio.open_connection("127.0.0.1", server.port), _get("/"))
        assert status == 404
        status, headers, _ = await _http(*await asyncio.open_connection("127.0.0.1", server.port),
                                         _get(method="POST"))
        assert status == 405 and headers["allow"] == "GET, HEAD"
        status, headers, body = await _http(*await asyncio.open_connection("127.0.0.1", server.port),
                                            _get(method="HEAD"))
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0
        status, _, _ = await _http(*await asyncio.open_connection("127.0.0.1", server.port), b"nonsense\r\n\r\n")
        assert status == 400
        status, headers, body = await _http(*await asyncio.open_connection("127.0.0.1", server.port),
                                            _get(accept="application/openmetrics-text; version=1.0.0"))
        assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
    finally:
        server.close()
        server.close()
        await server.wait_closed()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.port)


async def test_scrape_over_a_unix_socket(sockdir: Path) -> None:
    path = str(sockdir / "metrics.sock")
    server = await serve_metrics(_filled(), port=None, unix_path=path)
    try:
        assert server.port is None
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        status, headers, body = await _http(*await asyncio.open_unix_connection(path), _get())
        assert status == 200 and headers["content-type"].startswith("text/plain")
        assert _samples(body.decode())[("kaas_worker_restarts_total", (("device", "cuda:1"),))] == 1
        with pytest.raises(OSError, match="another process serves metrics"):
            await serve_metrics(Metrics(), port=None, unix_path=path)
    finally:
        server.close()
        await server.wait_closed()
    assert not os.path.exists(path)


async def test_a_stale_socket_file_is_replaced(sockdir: Path) -> None:
    path = str(sockdir / "metrics.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(path)  # bound, never listening: what a killed broker leaves behind
    server = await serve_metrics(Metrics(), port=None, unix_path=path)
    try:
        status, _, _ = await _http(*await asyncio.open_unix_connection(path), _get())
        assert status == 200
    finally:
        server.close()
        await server.wait_closed()


async def test_serve_metrics_needs_somewhere_to_listen(sockdir: Path) -> None:
    with pytest.raises(ValueError, match="port"):
        await serve_metrics(Metrics(), port=None)
    (sockdir / "file").write_text("")
    with pytest.raises(OSError, match="not a socket"):
        await serve_metrics(Metrics(), port=None, unix_path=str(sockdir / "file"))


def test_totals_of_departed_tenants_are_bounded() -> None:
    """A broker that sees ever new uids keeps the totals of at most max_departed tenants that left
    (the longest gone are forgotten); a tenant that comes back is not counted as gone."""
    from broker.metrics import Metrics

    m = Metrics()
    m.max_departed = 2
    for name in ("a", "b", "c"):
        m.tenant(name).graph_done("cpu:0", 0.001, 0.0005)
        m.tenant_left(name)
    assert set(m.tenants) == {"b", "c"}
    m.tenant_back("b")  # b has a session again: only c is gone
    m.tenant("d").graph_done("cpu:0", 0.001, 0.0)
    m.tenant_left("d")
    m.tenant_left("e")
    assert "b" in m.tenants and "c" not in m.tenants and set(m.departed) == {"d", "e"}
