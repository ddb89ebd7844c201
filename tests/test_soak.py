"""The short form of ``kaas-bench soak`` on the CPU device: mixed load with a chaos schedule (every
kind of fault at least once); well-behaved tenants lose nothing and see no error, nothing leaks."""

from __future__ import annotations

import pytest

from bench import soak


@pytest.mark.slow
def test_soak_short_form_on_the_cpu_device(broker_env: dict[str, str]) -> None:
    doc = soak.run("cpu", tenants=4, seconds=25, chaos_every=1.2, seed=1, warmup=3.0, env=broker_env)
    print(soak.show(doc))
    kinds = {f["fault"] for f in doc["faults"]}
    assert kinds >= set(soak.FAULTS) - {"flood"}, kinds  # flood needs distinct tenants: root only
    assert doc["problems"] == [], doc["problems"]
    for row in doc["tenants"]:
        assert row["sent"] == row["replies"] > 0 and row["wrong"] == 0 and not row["errors"], row
