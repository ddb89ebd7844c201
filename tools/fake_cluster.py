"""A Ray cluster of fake nodes on this machine, each with its own kaas broker (tests and benchmarks).

``ray.cluster_utils.Cluster``: a head with no CPUs (nothing runs there) and ``nodes`` nodes of one
CPU each, labelled with their broker's socket (``tenantlib.ray.LABEL``) and given the ``kaas``
resource, as ``ray start`` gives real kaas nodes.  Ray's files go under a short temporary
directory (its socket paths are length-limited), with token auth off for the loopback cluster.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .broker_process import BrokerProcess

STORE = 80 * 2**20  # object store per node (Ray wants at least 75 MiB)


@dataclass
class FakeCluster:
    cluster: Any
    brokers: list[BrokerProcess]
    node_ids: list[str]


@contextmanager
def fake_cluster(nodes: int = 2, broker_config: str = "", device: str = "cpu",
                 env: dict[str, str] | None = None) -> Iterator[FakeCluster]:
    """Brokers, then the Ray cluster, then ``ray.init`` against it; all torn down at the end."""
    import ray
    from ray.cluster_utils import Cluster

    from tenantlib.ray import LABEL

    tmp = tempfile.mkdtemp(prefix="kr-")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["RAY_TMPDIR"] = tmp  # not /tmp/ray
    os.makedirs(f"{tmp}/ray")
    brokers: list[BrokerProcess] = []
    cluster = None
    try:
        for i in range(nodes):
            cfg = None
            if broker_config:
                cfg = f"{tmp}/broker{i}.toml"
                with open(cfg, "w") as f:
                    f.write(broker_config)
            brokers.append(BrokerProcess(device, config=cfg, env=env).start())
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                                "object_store_memory": STORE,
                                                                "temp_dir": f"{tmp}/ray"})
        ids = [cluster.add_node(num_cpus=1, resources={"kaas": 1}, labels={LABEL: b.socket},
                                object_store_memory=STORE).node_id for b in brokers]
        ray.init(address=cluster.address, log_to_driver=False)
        yield FakeCluster(cluster, brokers, ids)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for b in brokers:
            b.stop()
        shutil.rmtree(tmp, ignore_errors=True)
