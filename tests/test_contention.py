"""``kaas-bench contention``: its pure helpers, the workload plans and checks it relies on, the
exclusive pool's policy with fake workers, and the kaas mode end to end on the CPU device
(CI-sized: the other modes are skipped there with a reason). The ``gpu`` test runs every mode."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from bench import baselines, contention
from bench.contention import (
    assess,
    memory_need,
    parse_limits,
    parse_modes,
    parse_tenants,
    render_table,
    summarize,
    trim_reason,
)
from tenantlib.kernels import host
from tests.conftest import ROOT
from tools import workloads


# -- the workloads as data ------------------------------------------------------------------
def run_on_host(plan: workloads.Plan, values: dict[str, np.ndarray]) -> None:
    """Run a plan with the CPU device's host implementations: what every mode runs, on numpy."""
    bufs = dict(values)
    for b in plan.of("temp"):
        bufs[b.name] = np.zeros(b.shape, np.float32)
    for s in plan.steps:
        fn = getattr(host, s.kernel)
        fn(SimpleNamespace(grid=s.grid, block=s.block, shared=0), *[bufs[a] if isinstance(a, str) else a for a in s.args])


def host_values(plan: workloads.Plan, seed: int = 1) -> dict[str, np.ndarray]:
    return workloads.materialize(plan, lambda shape: np.zeros(shape, np.float32), np.random.default_rng(seed))


@pytest.mark.parametrize("spec", ["null", "vadd:1000", "sgemm:40", "sgemm:100", "jacobi:90:5", "jacobi:3:1",
                                  "jacobi:70:2", "mlp:8:3:64", "mlp:100:2:32"])
def test_every_plan_runs_and_checks_on_host(spec: str) -> None:
    plan = workloads.parse(spec)
    values = host_values(plan)
    rng = np.random.default_rng(2)
    for _ in range(4):
        rows = workloads.check_rows(plan, rng)
        workloads.prepare_check(plan, values, rng, rows)
        run_on_host(plan, values)
        assert workloads.verify(plan, values, rows)


@pytest.mark.parametrize("spec", ["vadd:100", "sgemm:100", "jacobi:80:4", "mlp:70:2:32", "mlp:4:2:16"])
def test_a_check_fails_when_the_run_did_not_happen(spec: str) -> None:
    plan = workloads.parse(spec)
    values = host_values(plan)
    rng = np.random.default_rng(3)
    run_on_host(plan, values)
    rows = workloads.check_rows(plan, rng)
    workloads.prepare_check(plan, values, rng, rows)  # new inputs and poisoned outputs, then no run
    assert not workloads.verify(plan, values, rows)


def test_jacobi_bands_are_exact_at_every_position_including_the_edges() -> None:
    plan = workloads.parse("jacobi:80:6")
    values = host_values(plan)
    run_on_host(plan, values)
    for r0 in (0, 1, 5, 6, 30, 80 - 16 - 6, 80 - 16):
        band = slice(r0, r0 + 16)
        assert workloads.verify(plan, values, band), band
        values["out_v"][r0 + 3, 40] += 1e-3
        assert not workloads.verify(plan, values, band), band
        values["out_v"][r0 + 3, 40] -= 1e-3


def test_plans_describe_their_buffers_and_refuse_bad_specs() -> None:
    mlp = workloads.parse("mlp")
    assert mlp.spec == "mlp:32:4" and len(mlp.steps) == 8
    assert [s.kernel for s in mlp.steps[:2]] == ["sgemm", "bias_relu"]
    assert mlp.nbytes("resident") == 4 * (4 * 1024 * 1024 + 4 * 1024)
    assert workloads.parse("sgemm:4096").nbytes("in", "out") == 3 * 64 << 20
    assert workloads.parse("jacobi:64").spec == "jacobi:64:8"
    assert len(workloads.parse("jacobi:64:1").of("temp")) == 0
    for bad in ("gemm", "sgemm:x", "sgemm:0", "null:3", "jacobi:2", "sgemm:1:2"):
        with pytest.raises(ValueError):
            workloads.parse(bad)


# -- pure helpers of the bench --------------------------------------------------------------
def test_parsers() -> None:
    assert parse_tenants("1, 2,4,2") == [1, 2, 4]
    for bad in ("", "0", "a", "1,-2"):
        with pytest.raises(ValueError, match="--tenants"):
            parse_tenants(bad)
    assert parse_modes("exclusive,kaas") == ["kaas", "exclusive"]
    assert parse_modes("all") == list(contention.MODES)
    with pytest.raises(ValueError, match="unknown ownctx"):
        parse_modes("kaas,ownctx")
    limits = parse_limits("exclusive=8, sgemm:4096=16,mps@mlp:32:4=4")
    assert limits == {"exclusive": 8, "sgemm:4096": 16, "mps@mlp:32:4": 4}
    for bad in ("exclusive", "x=0", "=3", "a=b"):
        with pytest.raises(ValueError, match="--max-tenants"):
            parse_limits(bad)
    assert trim_reason(limits, "exclusive", "null", 8) is None
    assert trim_reason(limits, "exclusive", "null", 16) == "trimmed: --max-tenants exclusive=8"
    assert trim_reason(limits, "kaas", "sgemm:4096", 32) == "trimmed: --max-tenants sgemm:4096=16"
    assert trim_reason(limits, "mps", "mlp:32:4", 8) == "trimmed: --max-tenants mps@mlp:32:4=4"


def test_summarize() -> None:
    r = summarize([100.0] * 98 + [1000.0, 5000.0], [60, 40, 0], 2.0)
    assert r["completed"] == 100 and r["throughput_gps"] == 50.0
    assert r["p50_us"] == 100.0 and 1000 < r["p99_us"] < 5000 and r["max_us"] == 5000.0
    assert (r["tenant_gps_min"], r["tenant_gps_max"], r["starved_tenants"]) == (0.0, 30.0, 1)
    empty = summarize([], [0, 0], 1.0)
    assert empty["completed"] == 0 and empty["p99_us"] is None


def test_memory_guard_estimates() -> None:
    big = workloads.parse("sgemm:4096")
    host64, dev64 = memory_need(big, "own-context", 64)
    assert host64 == 64 * (192 << 20) and dev64 > 40 * 2**30  # 64 contexts of 192 MiB + context each
    host_k, dev_k = memory_need(big, "kaas", 64)
    assert host_k == host64 and dev_k == contention.KAAS_LANES * (192 << 20)  # lanes bound the device side
    _, dev_x = memory_need(big, "exclusive", 64, gpus=1)
    assert dev_x == (192 << 20) + baselines.CONTEXT_BYTES  # one owner at a time


def point(mode: str, n: int, gps: float, p99: float, wl: str = "null", **kw: Any) -> dict[str, Any]:
    return {"mode": mode, "workload": wl, "tenants": n, "throughput_gps": gps, "p50_us": p99 / 2, "p99_us": p99,
            "checks": 1, "check_failures": 0, **kw}


def test_assess_and_table() -> None:
    doc = {"device": "GPU", "seconds": 1, "gpus": 1, "skipped_modes": {}, "results": [
        point("kaas", 1, 9000, 200), point("kaas", 4, 10000, 900), point("kaas", 8, 9500, 1800),
        point("own-context", 1, 20000, 60), point("own-context", 4, 4000, 2000), point("own-context", 8, 4100, 1500),
        point("mps", 4, 11000, 400), point("mps", 8, 30000, 400),
        point("exclusive", 1, 15000, 80), point("exclusive", 4, 2.0, 3e6),
        {"mode": "exclusive", "workload": "null", "tenants": 8, "skipped": "trimmed: --max-tenants exclusive=4"},
    ]}
    got = {t["target"]: t for t in assess(doc)}
    assert got["kaas throughput >= own-context (N >= 2)"]["met"]
    mps = got["kaas throughput within 10% of MPS (N >= 2)"]
    assert not mps["met"] and mps["missed"] == ["N=8: 9500 vs 30000 graphs/s"]
    p99 = got["kaas p99 below own-context (N >= 4)"]
    assert not p99["met"] and p99["missed"][0].startswith("N=8")
    assert got["kaas throughput flat (within 10% of its best) over N"]["met"]
    assert got["exclusive collapses once tenants outnumber GPUs"]["met"]
    table = render_table(doc)
    assert "null on GPU" in table and "trimmed" in table and "exclusive x8: trimmed" in table
    row4 = next(ln for ln in table.splitlines() if ln.strip().startswith("4 |"))
    assert "10000" in row4 and " 4000 " in row4 and "3e+06" in row4


# -- the exclusive pool, with fake workers --------------------------------------------------
class FakeWorker:
    def __init__(self, tenant: int, log: list[tuple[str, int]]) -> None:
        self.tenant = tenant
        self.log = log
        log.append(("start", tenant))

    def request(self, check: bool) -> dict[str, Any]:
        time.sleep(0.002)
        self.log.append(("run", self.tenant))
        return {"run_s": 0.002, "check": True if check else None, "check_s": 0.0}

    def close(self) -> None:
        self.log.append(("stop", self.tenant))


@pytest.mark.parametrize("tenants", [1, 3])
def test_exclusive_pool_switches_owner_on_every_other_tenants_request(tenants: int) -> None:
    log: list[tuple[str, int]] = []
    pool = baselines.ExclusivePool(tenants, 1, lambda t, gpu: FakeWorker(t, log), check_every=0)
    pool.prestart()
    st = pool.run(time.monotonic(), 0.05, 0.2, 10.0)
    pool.close()
    runs = [t for what, t in log if what == "run"]
    assert runs[: 2 * tenants] == list(range(tenants)) * 2  # FCFS: each tenant in turn
    assert st.checks == tenants and st.check_failures == 0  # each tenant's first request
    if tenants == 1:
        assert st.cold_starts == [] and [w for w, _ in log].count("start") == 1
    else:
        assert len(st.cold_starts) == len(runs) - 1  # every request but the prestarted owner's first
    assert st.steady and st.start is not None and st.end is not None and st.end - st.start >= 0.2
    assert sorted(st.per_tenant) == list(range(tenants)) and sum(st.per_tenant.values()) == len(st.latencies)
    assert log[-1][0] == "stop"


class SlowStart(FakeWorker):
    def __init__(self, tenant: int, log: list[tuple[str, int]]) -> None:
        time.sleep(0.05)  # a cold start
        super().__init__(tenant, log)


def test_exclusive_window_spans_whole_rounds_and_stops_at_the_cap() -> None:
    log: list[tuple[str, int]] = []
    pool = baselines.ExclusivePool(4, 1, lambda t, gpu: SlowStart(t, log))
    pool.prestart()
    st = pool.run(time.monotonic(), 0.0, 0.01, 10.0)
    pool.close()
    assert st.steady and sorted(st.per_tenant) == [0, 1, 2, 3]
    assert min(st.latencies) > 3 * 0.05  # each waited for the other three tenants' cold starts
    pool = baselines.ExclusivePool(8, 1, lambda t, gpu: SlowStart(t, log))
    pool.prestart()
    t0 = time.monotonic()
    st = pool.run(t0, 0.0, 0.01, 0.3)  # a round takes 0.4 s: the cap comes first
    pool.close()
    assert not st.steady and st.end is not None and st.end <= t0 + 0.3 and not st.latencies


def test_mps_is_unavailable_without_its_control_program(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(baselines.shutil, "which", lambda name: None)
    with pytest.raises(baselines.MpsUnavailable, match="not on PATH"):
        baselines.MpsDaemon().start()


# -- end to end -----------------------------------------------------------------------------
def bench(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench.contention", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def test_kaas_mode_on_the_cpu_device(broker_env: dict[str, str], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = bench(["--device", "cpu", "--tenants", "1,2", "--seconds", "1", "--warmup", "0.2",
                 "--workload", "null,sgemm:64,mlp:4:2:32", "--check-every", "20", "--trace", "--json"], broker_env)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)
    assert doc["bench"] == "contention" and doc["tenants"] == [1, 2]
    assert doc["workloads"] == ["null", "sgemm:64", "mlp:4:2:32"]
    assert set(doc["skipped_modes"]) == {"own-context", "mps", "exclusive"}
    assert all("CUDA" in why for why in doc["skipped_modes"].values())
    results = doc["results"]
    assert len(results) == 4 * 3 * 2
    kaas = [r for r in results if r["mode"] == "kaas"]
    assert [(r["workload"], r["tenants"]) for r in kaas] == [(w, n) for w in doc["workloads"] for n in (1, 2)]
    for r in kaas:
        assert r["completed"] > 0 and r["throughput_gps"] > 0, r
        assert 0 < r["p50_us"] <= r["p99_us"] <= r["max_us"], r
        assert r["checks"] >= 2 and r["check_failures"] == 0, r
        assert r["starved_tenants"] == 0
        # Busy tenants may take the direct path (broker/leases.py): their hops skip the broker.
        hops = set(r["hops_p50_us"])
        assert hops >= {"tenant -> broker", "broker -> tenant"} or hops >= {"tenant -> worker", "worker -> tenant"}, \
            r["hops_p50_us"]
    assert all("skipped" in r for r in results if r["mode"] != "kaas")
    assert {t["target"] for t in doc["targets"]} == {"kaas throughput flat (within 10% of its best) over N"}

    saved = tmp_path / "c.json"
    saved.write_text(out.stdout)
    assert contention.main(["--from-json", str(saved)]) == 0
    table = capsys.readouterr().out
    assert "sgemm:64 on cpu:0" in table and "own-context: skipped: needs a CUDA GPU (--device cpu)" in table


def test_bad_arguments_exit_2(broker_env: dict[str, str]) -> None:
    out = bench(["--modes", "kaas,nope"], broker_env, timeout=60)
    assert out.returncode == 2 and "unknown nope" in out.stderr
    assert contention.run(argparse.Namespace(tenant_counts="1", modes="kaas", workload="gemm", max_tenants="")) == 2


def test_registers_on_kaas_bench_as_the_integrator_will() -> None:
    from tools import bench as kaas_bench

    parser = argparse.ArgumentParser(prog="kaas-bench")
    sub = parser.add_subparsers(dest="cmd", required=True)
    contention.add_parser(sub)
    args = parser.parse_args(["contention", "--tenants", "1,4", "--modes", "kaas", "--max-tenants", "kaas=2"])
    assert args.func is contention.run and args.tenant_counts == "1,4" and args.max_tenants == "kaas=2"
    assert getattr(args, "tenants", 1) == 1  # kaas-bench's main checks an int --tenants of its own subcommands
    assert kaas_bench.main.__module__ == "tools.bench"


def _gpu_reason() -> str | None:
    info = baselines.probe_in_child(timeout=60)
    return info if isinstance(info, str) else None


@pytest.mark.gpu
def test_every_mode_on_the_gpu(broker_env: dict[str, str]) -> None:
    why = _gpu_reason()
    if why:
        pytest.skip(why)
    out = bench(["--device", "cuda", "--tenants", "1,2", "--seconds", "0.5", "--warmup", "0.2",
                 "--workload", "null,sgemm:128,jacobi:96:3,mlp:8:2", "--check-every", "10", "--json"],
                broker_env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)
    for r in doc["results"]:
        if r["mode"] == "mps" and "mps" in doc["skipped_modes"]:
            continue
        assert "skipped" not in r and "error" not in r, r
        assert r["completed"] > 0 and r["checks"] >= 1 and r["check_failures"] == 0, r
    assert all(r.get("cold_starts", 0) > 0 for r in doc["results"] if r["mode"] == "exclusive" and r["tenants"] == 2)
