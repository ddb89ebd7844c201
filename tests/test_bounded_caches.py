"""Bounded caches: libraries (per tenant and in total, least recently used first, never one a
prepared graph uses), prepared graphs and residents per tenant; each limit is quota_exceeded by name."""

from __future__ import annotations

import pytest

import tenantlib
from broker.protocol import KernelSpec
from tenantlib import errors
from tests.conftest import BrokerFactory

_NULL = KernelSpec("null", (), host="tenantlib.kernels.host:null")
_FAST = 'compile_check = ""\n'  # the CPU device skips NVRTC: these tests register many libraries


def _lib(c: tenantlib.Client, i: int) -> tenantlib.Library:
    """A distinct library (its own digest) with the host-implemented null kernel."""
    return c.library(f'// library {i}\nextern "C" __global__ void null() {{}}\n', kernels=[_NULL])


def _graph(c: tenantlib.Client, lib: tenantlib.Library) -> tenantlib.Graph:
    g = c.graph()
    g.kernel(lib, "null", grid=1, block=1, args=[])
    return g


def test_a_tenant_registering_libraries_in_a_loop_stays_within_its_limit(broker_factory: BrokerFactory) -> None:
    b = broker_factory(_FAST + "tenant_max_libraries = 3\n")
    with tenantlib.connect(b.socket) as c:
        kept = _lib(c, 0)
        g = _graph(c, kept)
        c.run(g)  # prepared: library 0 is in use and is never let go of
        libs = [_lib(c, i) for i in range(1, 8)]
        st = c.status()["stats"]
        assert st["library_evictions"] == 5  # 1 + 7 registered, 3 held
        c.run(g)
        c.run(_graph(c, libs[-1]))
        with pytest.raises(errors.UnknownLibrary, match="not registered by this tenant"):
            c.run(_graph(c, libs[0]))  # the least recently used was let go of: register it again
        _lib(c, 1)
        c.run(_graph(c, libs[0]))  # same content, same digest


def test_when_every_library_is_in_use_the_next_is_refused_by_name(broker_factory: BrokerFactory) -> None:
    b = broker_factory(_FAST + "tenant_max_libraries = 2\n")
    with tenantlib.connect(b.socket) as c:
        graphs = [_graph(c, _lib(c, i)) for i in range(2)]
        for g in graphs:
            c.prepare(g)
        with pytest.raises(errors.QuotaExceeded, match="tenant_max_libraries = 2") as info:
            _lib(c, 2)
        assert info.value.detail["limit"] == "tenant_max_libraries"
        for g in graphs:
            c.run(g)  # nothing accepted before is lost
        with tenantlib.connect(broker_factory(_FAST + "tenant_max_library_bytes = 10\n").socket) as small:
            with pytest.raises(errors.QuotaExceeded, match="tenant_max_library_bytes = 10") as info:
                small.library('extern "C" __global__ void null() {}', kernels=[_NULL])
            assert small.status()["stats"]["library_evictions"] == 0  # a refusal costs nothing
            assert info.value.detail["limit"] == "tenant_max_library_bytes"


def test_the_broker_cache_drops_libraries_no_tenant_holds(broker_factory: BrokerFactory) -> None:
    b = broker_factory(_FAST + "max_libraries = 3\n")
    with tenantlib.connect(b.socket) as c:
        for i in range(3):
            _lib(c, i)
        with pytest.raises(errors.QuotaExceeded, match="library cache is full \\(max_libraries = 3\\)"):
            _lib(c, 3)  # all three are held by this tenant
        loads = c.status()["stats"]["library_loads"]
    with tenantlib.connect(b.socket) as c:  # its last session ended: the three stay cached, held by no one
        _lib(c, 0)
        assert c.status()["stats"]["library_loads"] == loads  # served from the cache, not loaded again
    b2 = broker_factory(_FAST + "max_libraries = 3\ntenant_max_libraries = 2\n")
    with tenantlib.connect(b2.socket) as c:
        libs = [_lib(c, i) for i in range(7)]  # the tenant lets go of its oldest; the cache drops them
        st = c.status()["stats"]
        assert (st["library_evictions"], st["library_drops"], st["library_loads"]) == (5, 4, 7)
        c.run(_graph(c, libs[-1]))  # what it holds still runs (on the worker too)
        c.run(_graph(c, libs[-2]))


def test_prepared_graphs_and_residents_per_tenant(broker_factory: BrokerFactory) -> None:
    b = broker_factory(_FAST + "tenant_max_prepared = 2\ntenant_max_residents = 1\n")
    with tenantlib.connect(b.socket) as c, tenantlib.connect(b.socket) as c2:
        lib, lib2 = _lib(c, 0), _lib(c2, 0)
        c.prepare(_graph(c, lib))
        c2.prepare(_graph(c2, lib2))  # the same tenant's other session counts too
        with pytest.raises(errors.QuotaExceeded, match="tenant_max_prepared = 2"):
            c.prepare(_graph(c, lib))
        x = c.array(16)
        x[...] = 1.0
        c.resident(x)
        x[...] = 2.0
        with pytest.raises(errors.QuotaExceeded, match="tenant_max_residents = 1"):
            c.resident(x)
        x[...] = 1.0
        assert c.resident(x).cached  # the one it holds is still there


def test_concurrent_registrations_keep_to_the_limits(broker_factory: BrokerFactory) -> None:
    import asyncio

    b = broker_factory(_FAST + "tenant_max_libraries = 3\ntenant_max_residents = 2\n")

    async def main() -> tuple[list[object], list[object]]:
        c = await tenantlib.connect_async(b.socket)
        try:
            libs = await asyncio.gather(*(c.library(f'// lib {i}\nextern "C" __global__ void null() {{}}\n',
                                                    kernels=[_NULL]) for i in range(10)), return_exceptions=True)
            arrays = [await c.array(16) for _ in range(5)]
            for i, a in enumerate(arrays):
                a[...] = float(i)
            res = await asyncio.gather(*(c.resident(a) for a in arrays), return_exceptions=True)
            return list(libs), list(res)
        finally:
            await c.close()

    libs, res = asyncio.run(main())
    assert sum(isinstance(x, tenantlib.Library) for x in libs) == 3, libs  # all ten were in flight at once
    assert all(isinstance(x, errors.QuotaExceeded) and x.detail["limit"] == "tenant_max_libraries"
               for x in libs if not isinstance(x, tenantlib.Library))
    assert sum(isinstance(x, tenantlib.Resident) for x in res) == 2, res
    assert all(isinstance(x, errors.QuotaExceeded) and x.detail["limit"] == "tenant_max_residents"
               for x in res if not isinstance(x, tenantlib.Resident))


def test_a_tenant_over_its_bytes_lets_go_of_its_oldest(broker_factory: BrokerFactory) -> None:
    src = 'extern "C" __global__ void null() {}\n' + "// padding\n" * 100
    size = len(src.encode()) + 20
    b = broker_factory(_FAST + f"tenant_max_library_bytes = {int(size * 2.5)}\n")
    with tenantlib.connect(b.socket) as c:
        first = c.library("// 0\n" + src, kernels=[_NULL])
        c.library("// 1\n" + src, kernels=[_NULL])
        assert c.status()["stats"]["library_evictions"] == 0
        c.library("// 2\n" + src, kernels=[_NULL])  # a third would pass the bytes limit: the first goes
        assert c.status()["stats"]["library_evictions"] == 1
        with pytest.raises(errors.UnknownLibrary):
            c.run(_graph(c, first))
