"""The CUDA worker compiles tenant CUDA C off its loop too: one tenant's registration (NVRTC, up to
seconds) does not stop another tenant's graphs on the GPU."""

from __future__ import annotations

import pytest

from tests.gpu.test_cuda_backend import _no_cuda_reason
from tests.test_precompile import graphs_run_while_another_tenant_registers
from tools.broker_process import BrokerProcess

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_no_cuda_reason()), reason=_no_cuda_reason() or "-")]


def test_gpu_graphs_run_while_another_tenant_registers(gpu_broker: BrokerProcess) -> None:
    graphs_run_while_another_tenant_registers(gpu_broker.socket, timeout=300)
