"""tenantlib.ray on a Ray cluster of fake nodes (``ray.cluster_utils.Cluster``: a head with no CPUs and
two nodes), each node with its own CPU-device broker named by its ``kaas-socket`` label: requests
run and come back as object references, placement follows the residents, pinning, a node that dies
fails its requests with typed errors and is left out, job tokens name the tenant, and run_local
needs no Ray hop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'kaas[ray]')")

from broker.tenants import token_digest  # noqa: E402
from tenantlib import errors, kernels  # noqa: E402
from tenantlib import ray as kr  # noqa: E402
from tenantlib.kernels import testing  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tools.broker_process import BrokerProcess  # noqa: E402
from tools.fake_cluster import fake_cluster  # noqa: E402

TOKEN = "ray-job-token-for-the-tests"
N = 64


@pytest.fixture(scope="module")
def cluster(broker_env: dict[str, str]) -> Iterator[tuple[Any, list[BrokerProcess], list[str]]]:
    config = ('host_modules = ["tenantlib.kernels.host", "tenantlib.kernels.testing"]\n'
              f'[[tenants]]\nname = "ray-job"\nuid = {os.geteuid()}\ntoken_sha256 = "{token_digest(TOKEN)}"\n')
    with fake_cluster(2, config, env=broker_env) as fc:
        yield fc.cluster, fc.brokers, fc.node_ids


def _spec() -> kr.GraphSpec:
    grid, block = kernels.sgemm_launch(N, N)
    return kr.GraphSpec(libraries={"std": kr.Source(kernels.SOURCE, kernels.KERNELS)},
                        buffers=(kr.Buffer("W", "resident", (N, N)), kr.Buffer("x", "in", (N, N)),
                                 kr.Buffer("y", "out", (N, N))),
                        launches=(kr.Launch("std", "sgemm", grid, block, ("W", "x", "y", N, N, N)),))


def _graphs(b: BrokerProcess, tenant: str) -> int:
    out = subprocess.run([sys.executable, "-m", "tools.kaasctl", "--socket", b.socket, "--json", "tenants"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    return next((t["graphs"] for t in json.loads(out.stdout) if t["tenant"] == tenant), 0)


def test_submit_places_by_residents_and_pins(cluster: tuple[Any, list[BrokerProcess], list[str]]) -> None:
    _, brokers, ids = cluster
    kc = kr.KaasCluster(token=TOKEN)
    assert set(kc.nodes) == set(ids)
    rng = np.random.default_rng(0)
    wa, wb = (rng.standard_normal((N, N)).astype(np.float32) for _ in range(2))
    ra, rb = ray.put(wa), ray.put(wb)
    spec = _spec()
    before = [_graphs(b, "ray-job") for b in brokers]
    # Pinned: A's weights go to the first node, B's to the second.
    for w, r, node in ((wa, ra, ids[0]), (wb, rb, ids[1])):
        x = rng.standard_normal((N, N)).astype(np.float32)
        out = ray.get(kc.submit(spec, inputs={"x": x}, residents={"W": r}, node=node))
        np.testing.assert_allclose(out["y"], w @ x, rtol=1e-4, atol=1e-4)
    # Unpinned: each request follows its weights.
    for i in range(10):
        w, r = (wa, ra) if i % 2 == 0 else (wb, rb)
        x = rng.standard_normal((N, N)).astype(np.float32)
        out = ray.get(kc.submit(spec, inputs={"x": x}, residents={"W": r}))
        np.testing.assert_allclose(out["y"], w @ x, rtol=1e-4, atol=1e-4)
    st = kc.stats()
    assert [st[n]["requests"] for n in ids] == [6, 6] and [st[n]["hits"] for n in ids] == [5, 5], st
    after = [_graphs(b, "ray-job") for b in brokers]  # the job's token named its tenant on both brokers
    assert [a - b for a, b in zip(after, before, strict=True)] == [6, 6]
    with pytest.raises(errors.InvalidArgument, match="inputs must be exactly"):
        kc.submit(spec, inputs={}, residents={"W": ra})
    with pytest.raises(errors.InvalidArgument, match="not an alive kaas node"):
        kc.submit(spec, inputs={"x": np.zeros((N, N), np.float32)}, residents={"W": ra}, node="no-such-node")


def test_prefetch_puts_weights_where_the_next_requests_go(cluster: tuple[Any, list[BrokerProcess], list[str]]) -> None:
    _, brokers, ids = cluster
    kc = kr.KaasCluster(token=TOKEN)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((N, N)).astype(np.float32)
    ref = ray.put(w)
    assert ray.get(kc.prefetch(ref, node=ids[1])) == "cpu:0"  # that node's broker has one device
    x = rng.standard_normal((N, N)).astype(np.float32)
    out = ray.get(kc.submit(_spec(), inputs={"x": x}, residents={"W": ref}))
    np.testing.assert_allclose(out["y"], w @ x, rtol=1e-4, atol=1e-4)
    assert kc.stats()[ids[1]] == {"requests": 1, "hits": 1, "alive": True, "socket": brokers[1].socket}
    info = ray.get(kc.nodes[ids[1]].proxy.info.remote())  # the proxy found it registered: a hit there too
    assert info["hits"] >= 1 and info["healthy"] and len(info["broker"]["id"]) == 32
    assert kr.resident_key(ref) in info["residents"]  # the broker reports it on a device


def test_run_local_inside_a_task_uses_its_nodes_broker(cluster: tuple[Any, list[BrokerProcess], list[str]]) -> None:
    _, brokers, ids = cluster
    spec = _spec()

    @ray.remote(num_cpus=1, resources={"kaas": 1})
    def task(w: np.ndarray, x: np.ndarray) -> tuple[str, np.ndarray]:
        out = kr.run_local(spec, inputs={"x": x}, residents={"W": w}, token=TOKEN)
        return ray.get_runtime_context().get_node_id(), out["y"]

    rng = np.random.default_rng(1)
    w, x = (rng.standard_normal((N, N)).astype(np.float32) for _ in range(2))
    node, y = ray.get(task.remote(w, x))
    assert node in ids
    np.testing.assert_allclose(y, w @ x, rtol=1e-4, atol=1e-4)


def test_a_broker_that_dies_fails_its_requests_with_a_typed_error(
        cluster: tuple[Any, list[BrokerProcess], list[str]]) -> None:
    c, brokers, ids = cluster
    kc = kr.KaasCluster(token=TOKEN)
    slow = kr.GraphSpec(libraries={"t": kr.Source(kernels.SOURCE + '\nextern "C" __global__ void slow(int ms) {}\n',
                                                  (testing.SLOW,))},
                        buffers=(), launches=(kr.Launch("t", "slow", 1, 1, (3000,)),))
    ref = kc.submit(slow, node=ids[1])
    import time

    time.sleep(1.0)  # let it reach the broker (never an assertion on time: the outcome is typed either way)
    brokers[1].proc.kill()  # type: ignore[union-attr]
    with pytest.raises((errors.BrokerUnavailable, errors.SessionClosed)):
        ray.get(ref, timeout=120)
    # The cluster's other node still serves; the dead broker's node is left out once refreshed.
    kc.refresh()
    assert not kc.nodes[ids[1]].alive and kc.nodes[ids[0]].alive
    rng = np.random.default_rng(2)
    w, x = (rng.standard_normal((N, N)).astype(np.float32) for _ in range(2))
    out = ray.get(kc.submit(_spec(), inputs={"x": x}, residents={"W": w}))
    np.testing.assert_allclose(out["y"], w @ x, rtol=1e-4, atol=1e-4)
    assert kc.stats()[ids[0]]["requests"] == 1
