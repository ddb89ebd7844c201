"""A device worker compiles tenant CUDA C off its loop: one tenant's registration (seconds of NVRTC)
does not stop another tenant's graphs on the same device (found by the soak: a minute's stall)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

import tenantlib
from broker.protocol import KernelSpec
from broker.streams.compiler import nvrtc_available
from tenantlib import kernels
from tests.conftest import BrokerFactory

pytestmark = pytest.mark.skipif(not nvrtc_available(), reason="NVRTC (nvidia-cuda-nvrtc) is not installed")


def _big_source() -> str:
    """CUDA C that takes NVRTC a while (many kernels), new each time (no cache hit)."""
    body = "".join(f'extern "C" __global__ void k{i}(float* x, int n) {{ int j = threadIdx.x; '
                   f'for (int r = 0; r < n; ++r) x[j] = sinf(x[j] * {i}.5f) + cosf(x[j] + r); }}\n' for i in range(40))
    return f"// {uuid.uuid4()}\n" + body + 'extern "C" __global__ void null() {}\n'


def graphs_run_while_another_tenant_registers(socket: str, timeout: float = 60.0) -> None:
    """One tenant registers a library that takes NVRTC a while; another's graphs keep ending meanwhile."""
    with tenantlib.connect(socket, timeout=timeout) as busy, tenantlib.connect(socket, timeout=timeout) as other:
        g = other.graph()
        g.kernel(kernels.library(other), "null", grid=1, block=1, args=[])
        other.run(g)
        window: list[float] = []

        def register() -> None:
            window.append(time.monotonic())
            busy.library(_big_source(), kernels=[KernelSpec("null", (), host="tenantlib.kernels.host:null")])
            window.append(time.monotonic())

        t = threading.Thread(target=register)
        t.start()
        done: list[float] = []
        while t.is_alive():
            other.run(g)
            done.append(time.monotonic())
        t.join()
        start, end = window
        during = [x for x in done if start < x < end]
        # Without the compile thread the worker answers nothing while NVRTC runs: no graph ends
        # inside the registration (beyond the one already on its way when it began).
        assert len(during) >= 2, (len(during), end - start)


def test_graphs_run_while_another_tenant_registers(broker_factory: BrokerFactory) -> None:
    graphs_run_while_another_tenant_registers(broker_factory().socket)
