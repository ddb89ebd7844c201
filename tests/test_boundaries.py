"""Invariants a grep or an import can see: who may load CUDA, and the sample config."""

from __future__ import annotations

import os
import subprocess
import sys

from broker.config import Config, load
from tests.conftest import ROOT
from tools.broker_process import BrokerProcess

NO_CUDA = ("import sys\n"
           "import broker.__main__, broker.server, broker.engine, broker.session, broker.workers, broker.graph\n"
           "import tenantlib, tenantlib.aio, tenantlib.kernels, tools.kaasctl, tools.bench, tools.demo\n"
           "bad = sorted(m for m in sys.modules if m == 'cuda' or m.startswith('cuda.'))\n"
           "assert not bad, bad\n")


def test_broker_and_tenantlib_never_import_cuda() -> None:
    out = subprocess.run([sys.executable, "-c", NO_CUDA], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_running_broker_maps_no_cuda_library(broker_env: dict[str, str]) -> None:
    with BrokerProcess("cpu", env=broker_env) as b:
        assert b.proc is not None
        with open(f"/proc/{b.proc.pid}/maps") as f:
            maps = f.read()
    assert "libcuda" not in maps and "cuda/bindings" not in maps and "libnvrtc" not in maps


def test_sample_config_is_valid_and_documents_every_key() -> None:
    path = os.path.join(ROOT, "tools", "kaas.toml")
    cfg = load(path, env={})
    assert cfg.socket == Config().socket
    text = open(path).read()
    from broker.config import TenantPolicy

    for field in [*Config.__dataclass_fields__, *TenantPolicy.__dataclass_fields__]:
        assert field in text, f"tools/kaas.toml does not document {field!r}"
