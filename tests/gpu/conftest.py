"""What the GPU tests that go through a broker share: one CUDA broker per test module, and a client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import tenantlib
from tools.broker_process import BrokerProcess


@pytest.fixture(scope="module")
def gpu_broker(broker_env: dict[str, str]) -> Iterator[BrokerProcess]:
    with BrokerProcess("cuda", env=broker_env) as b:
        yield b


@pytest.fixture
def gclient(gpu_broker: BrokerProcess) -> Iterator[tenantlib.Client]:
    with tenantlib.connect(gpu_broker.socket, timeout=300) as c:  # first compiles (Triton, CUTLASS) are slow
        yield c
