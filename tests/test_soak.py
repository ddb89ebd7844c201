"""The short form of ``kaas-bench soak`` on the CPU device: mixed load with a chaos schedule (every
kind of fault at least once); well-behaved tenants lose nothing and see no error, nothing leaks,
the broker's memory accounting agrees with the worker's, and (as root) the share group's device
time splits by weight."""

from __future__ import annotations

import os

import pytest

from bench import soak


@pytest.mark.slow
def test_soak_short_form_on_the_cpu_device(broker_env: dict[str, str]) -> None:
    doc = soak.run("cpu", tenants=6, seconds=30, chaos_every=1.2, seed=1, warmup=3.0, env=broker_env)
    print(soak.show(doc))
    kinds = {f["fault"] for f in doc["faults"]}
    assert kinds >= set(soak.FAULTS) - {"flood"}, kinds  # flood needs distinct tenants: root only
    assert doc["problems"] == [], doc["problems"]
    loops = {r["loop"] for r in doc["tenants"]}
    assert loops == {"open", "closed"}, loops
    for row in doc["tenants"]:
        assert row["sent"] == row["replies"] > 0 and row["wrong"] == 0 and not row["errors"], row
    if os.geteuid() == 0:  # distinct uids: shares, and the admin views for the memory check
        assert doc["shares"]["checked"] and len(doc["shares"]["group"]) == len(soak.SHARE_WEIGHTS)
        assert doc["memory"]["checked"]
        assert all(r["broker_graphs"] >= r["replies"] - sum(r["errors"].values()) for r in doc["tenants"])
