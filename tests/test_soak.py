"""The short form of ``kaas-bench soak`` on the CPU device: mixed load with a chaos schedule (every
kind of fault at least once); well-behaved tenants lose nothing and see no error, nothing leaks,
the broker's memory accounting agrees with the worker's, and (as root) the share group's device
time splits by weight."""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def test_the_recovery_summary_reads_the_brokers_log(tmp_path: Path) -> None:
    log = tmp_path / "broker.log"
    ev = [("worker_lost", {"why": "a graph ran past its deadline of 0.5 s"}), ("worker_ready", {}),
          ("worker_respawn_failed", {"error": "WorkerLost: device worker cpu:0 exited"}), ("worker_ready", {}),
          ("worker_respawned", {}), ("worker_lost", {"why": "worker closed its channel"}), ("worker_ready", {}),
          ("worker_respawned", {})]
    t = ["2026-12-02T00:00:00.000000Z", "2026-12-02T00:00:01.000000Z", "2026-12-02T00:00:02.000000Z",
         "2026-12-02T00:00:03.000000Z", "2026-12-02T00:00:05.500000Z", "2026-12-02T00:00:06.000000Z",
         "2026-12-02T00:00:07.000000Z", "2026-12-02T00:00:07.250000Z"]
    log.write_text("not json\n" + "".join(json.dumps({"event": e, **kw, "timestamp": ts}) + "\n"
                                          for (e, kw), ts in zip(ev, t, strict=True)))
    rec = soak.recovery(str(log))
    assert rec["respawns"] == 2 and rec["restore_max_s"] == 2.5 and rec["restore_p50_s"] == 1.375
    assert rec["worker_lost"] == {"a graph ran past its deadline of 0.5 s": 1, "worker closed its channel": 1}
    assert rec["respawn_failed"] == {"WorkerLost": 1}
