"""The CUDA worker compiles tenant CUDA C off its loop too: one tenant's registration (NVRTC, up to
seconds) does not stop another tenant's graphs on the GPU."""

from __future__ import annotations

import threading
import time

import pytest

import tenantlib
from broker.protocol import KernelSpec
from tenantlib import kernels
from tests.gpu.test_cuda_backend import _no_cuda_reason
from tests.test_precompile import _big_source
from tools.broker_process import BrokerProcess

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_no_cuda_reason()), reason=_no_cuda_reason() or "-")]


def test_gpu_graphs_run_while_another_tenant_registers(gpu_broker: BrokerProcess) -> None:
    with tenantlib.connect(gpu_broker.socket, timeout=300) as busy, \
            tenantlib.connect(gpu_broker.socket, timeout=300) as other:
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
        # Compiled inside the worker's loop, no graph ends while NVRTC runs (beyond one in flight).
        assert len([x for x in done if start < x < end]) >= 2, end - start
