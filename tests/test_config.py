"""Configuration: parsed once, every bad key or value named; device specs."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.__main__ import parse_devices
from broker.config import Config, ConfigError, load
from broker.tenants import Peer, TenantDirectory


def test_defaults_without_file(tmp_path: Path) -> None:
    cfg = load(str(_write(tmp_path, "")), env={})
    assert cfg == Config()


def _write(tmp: Path, text: str) -> Path:
    p = tmp / "broker.toml"
    p.write_text(text)
    return p


def test_file_then_env_then_overrides(tmp_path: Path) -> None:
    p = _write(tmp_path, 'socket = "/a.sock"\ndevice = "cpu"\nlanes_cpu = 3\n')
    cfg = load(str(p), env={"KAAS_SOCKET": "/b.sock"}, device="cpu:0,1")
    assert (cfg.socket, cfg.device, cfg.lanes_cpu) == ("/b.sock", "cpu:0,1", 3)


@pytest.mark.parametrize("text, words", [
    ("lanse = 3", "unknown key 'lanse'"),
    ("lanes_cpu = 'two'", "lanes_cpu = 'two' has the wrong type"),
    ("lanes_cpu = 0", "lanes_cpu = 0 must be positive"),
    ("log_format = 'xml'", "log_format = 'xml' is not one of"),
    ("host_modules = 'x'", "host_modules"),
    ("[[tenants]]\nuser = 'x'", "tenants[0]: 'name' is required"),
    ("[[tenants]]\nname = 'a'\nuid = 5\nweigth = 2", "tenants[0]: unknown key 'weigth'"),
    ("[[tenants]]\nname = 'a'\nweight = 2", "give at least one of user, group, uid, gid"),
    ("[[tenants]]\nname = 'a'\nuid = 5\nweight = 0", "weight = 0.0 must be positive"),
    ("[[tenants]]\nname = 'a'\nuid = 5\npriority = 'urgent'", "priority = 'urgent' is not one of"),
    ("[tenant_defaults]\nmax_queued = 0", "max_queued = 0 must be positive"),
    ("[tenant_defaults]\ndevice_memory = -1", "device_memory = -1 must be >= 0"),
    ("policy = 'lottery'", "policy = 'lottery' is not one of"),
    ("this is not toml", "not valid TOML"),
])
def test_bad_config_names_the_problem(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        load(str(_write(tmp_path, text)), env={})


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "nope.toml"), env={})


def test_tenant_policy_defaults_and_overrides(tmp_path: Path) -> None:
    cfg = load(str(_write(tmp_path, "[tenant_defaults]\nmax_inflight = 8\ndevice_memory = 1000\n"
                                    "[[tenants]]\nname = 'fast'\nuid = 7\npriority = 'latency'\nweight = 3\n")), env={})
    fast = TenantDirectory(cfg).resolve(Peer(1, 7, 7))
    other = TenantDirectory(cfg).resolve(Peer(1, 8, 8))
    assert (fast.policy.priority, fast.weight, fast.policy.max_inflight, fast.policy.device_memory) == (
        "latency", 3.0, 8, 1000)  # unset keys of a rule come from [tenant_defaults]
    assert (other.policy.priority, other.weight, other.policy.max_inflight) == ("batch", 1.0, 8)


def test_root_can_be_named_by_uid_and_gid_zero(tmp_path: Path) -> None:
    cfg = load(str(_write(tmp_path, "[[tenants]]\nname = 'ops'\nuid = 0\ngid = 0\n")), env={})
    assert TenantDirectory(cfg).resolve(Peer(1, 0, 0)).name == "ops"


def test_tenant_rules_first_match_wins(tmp_path: Path) -> None:
    cfg = load(str(_write(tmp_path, "[[tenants]]\nname = 'svc'\nuid = 1234\nweight = 2.0\n"
                                    "[[tenants]]\nname = 'g'\ngid = 50\n")), env={})
    d = TenantDirectory(cfg)
    assert d.resolve(Peer(1, 1234, 50)).name == "svc" and d.resolve(Peer(1, 1234, 50)).weight == 2.0
    assert d.resolve(Peer(1, 999999, 50)).name == "g"
    assert d.resolve(Peer(1, 999999, 51)).name == "uid:999999"


@pytest.mark.parametrize("spec, n, want", [
    ("auto", 0, ["cpu:0"]), ("auto", 2, ["cuda:0", "cuda:1"]), ("cpu", 0, ["cpu:0"]),
    ("cpu:0,1", 0, ["cpu:0", "cpu:1"]), ("cuda:1", 2, ["cuda:1"]), ("cuda", 1, ["cuda:0"]),
])
def test_device_specs(spec: str, n: int, want: list[str]) -> None:
    assert parse_devices(spec, lambda: n) == want


@pytest.mark.parametrize("spec, n, words", [
    ("gpu", 1, "expected auto"), ("cuda:2", 2, "not present"), ("cpu:0,0", 0, "distinct"), ("cuda", 0, "no CUDA"),
    ("cpu:x", 0, "integers"),
])
def test_bad_device_specs(spec: str, n: int, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_devices(spec, lambda: n)


def test_auto_spin_never_lets_spinners_outnumber_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from broker.config import Config

    cfg = Config()
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert cfg.spin("spin_us", ["cpu:0"]) == pytest.approx(300e-6)  # the broker alone spins
    assert cfg.spin("worker_spin_us", ["cpu:0"]) == 0 and cfg.spin("client_spin_us", ["cpu:0"]) == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert cfg.spin("spin_us", ["cpu:0"]) == 0
    assert cfg.spin("client_spin_us", ["cuda:0"]) == pytest.approx(200e-6)
    assert Config(spin_us=0).spin("spin_us", ["cuda:0"]) == 0
