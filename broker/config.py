"""Broker configuration: TOML file + environment, parsed once into immutable values.

A bad key or value raises ConfigError naming it (``config: unknown key 'lanse'``).
Environment overrides (applied after the file): KAAS_SOCKET, KAAS_DEVICE, KAAS_POLICY,
KAAS_LOG_FORMAT, KAAS_LOG_LEVEL.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .protocol import DEFAULT_MAX_FRAME

DEFAULT_SOCKET = "/run/kaas/broker.sock"
DEFAULT_CONFIG = "/etc/kaas/broker.toml"


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


@dataclass(frozen=True, slots=True)
class TenantRule:
    """Maps peers to a tenant: by ``user`` / ``group`` name or ``uid`` / ``gid`` (first match wins)."""

    name: str
    user: str = ""
    group: str = ""
    uid: int = -1
    gid: int = -1
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class Config:
    socket: str = DEFAULT_SOCKET
    device: str = "auto"                  # auto | cpu[:0,1] | cuda[:0,1]
    socket_mode: int = 0o660
    max_frame: int = DEFAULT_MAX_FRAME
    host_modules: tuple[str, ...] = ("tenantlib.kernels.host",)
    compile_check: str = "sm_90"          # arch the CPU device checks CUDA C against; "" off
    lanes_cpu: int = 2
    lanes_cuda: int = 8
    policy: str = "fcfs"
    max_arenas: int = 4096                # per session
    max_tenant_arenas: int = 8192         # per tenant, all its sessions together
    max_inflight: int = 4096              # requests per session at once
    max_fds_queued: int = 64              # fds received ahead of their frames, per session
    max_graph_seconds: float = 300.0      # every graph's deadline on a device (a request's timeout may be shorter)
    replay_attempts: int = 3              # times an innocent graph is replayed after its worker died
    quarantine_after: int = 3             # faults of one tenant's kernel before it is refused
    metrics_port: int = 0                 # Prometheus /metrics on metrics_host:port; 0: off
    metrics_host: str = "127.0.0.1"
    metrics_socket: str = ""              # or on this unix socket; "": off
    log_format: str = "auto"              # auto | json | console
    log_level: str = "info"
    unknown_tenants: str = "admit"        # admit | refuse
    # Busy-polling after activity trades a core for wake-up latency; -1: on only with CUDA devices.
    spin_us: int = -1                     # the broker's event loop
    worker_spin_us: int = -1              # each device worker
    client_spin_us: int = -1              # recommended to tenants in the handshake
    tenants: tuple[TenantRule, ...] = field(default=())

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def spin(self, key: str, devices: list[str]) -> float:
        """Seconds to busy-poll for ``key`` (spin_us, worker_spin_us, client_spin_us), auto resolved."""
        us = getattr(self, key)
        if us < 0:
            gpu = any(d.startswith("cuda") for d in devices)
            us = {"spin_us": 500, "worker_spin_us": 1000, "client_spin_us": 200}[key] if gpu else 0
        return us / 1e6


_SIMPLE = {f.name: f for f in dataclasses.fields(Config) if f.name != "tenants"}
_CHOICES = {"log_format": ("auto", "json", "console"),
            "log_level": ("debug", "info", "warning", "error"),
            "unknown_tenants": ("admit", "refuse")}


def _coerce(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"config: {key} = {value!r} has the wrong type (expected {type(default).__name__})")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"config: {key} = {value!r} is not one of {', '.join(_CHOICES[key])}")
    if key.endswith("spin_us"):
        if isinstance(value, int) and value < -1:
            raise ConfigError(f"config: {key} = {value} must be -1 (auto), 0 (off) or a number of microseconds")
    elif key == "metrics_port":
        if not 0 <= value <= 65535:
            raise ConfigError(f"config: metrics_port = {value} is not a TCP port (0 turns metrics off)")
    elif isinstance(value, int) and not isinstance(value, bool) and key != "socket_mode" and value <= 0:
        raise ConfigError(f"config: {key} = {value} must be positive")
    return value


def _tenant(i: int, raw: Any) -> TenantRule:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: tenants[{i}] must be a table")
    known = {f.name: f for f in dataclasses.fields(TenantRule)}
    for k in raw:
        if k not in known:
            raise ConfigError(f"config: tenants[{i}]: unknown key {k!r}")
    if not isinstance(raw.get("name"), str) or not raw["name"]:
        raise ConfigError(f"config: tenants[{i}]: 'name' is required")
    values = {k: _coerce(f"tenants[{i}].{k}", v, known[k].default if k != "name" else "")
              for k, v in raw.items()}
    if isinstance(values.get("uid"), int) and values["uid"] < -1 or isinstance(values.get("gid"), int) and values["gid"] < -1:
        raise ConfigError(f"config: tenants[{i}]: uid/gid must be >= 0")
    return TenantRule(**values)


def from_mapping(data: Mapping[str, Any], base: Config = Config()) -> Config:
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key == "tenants":
            if not isinstance(value, list):
                raise ConfigError("config: tenants must be an array of tables ([[tenants]])")
            changes["tenants"] = tuple(_tenant(i, t) for i, t in enumerate(value))
        elif key in _SIMPLE:
            changes[key] = _coerce(key, value, _SIMPLE[key].default)
        else:
            raise ConfigError(f"config: unknown key {key!r}")
    return base.replace(**changes)


_ENV = {"KAAS_SOCKET": "socket", "KAAS_DEVICE": "device", "KAAS_POLICY": "policy",
        "KAAS_LOG_FORMAT": "log_format", "KAAS_LOG_LEVEL": "log_level"}


def load(path: str | None = None, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
    """File (``path``, or /etc/kaas/broker.toml when it exists), then environment, then ``overrides``."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    cfg = from_mapping(data)
    cfg = from_mapping({v: env[k] for k, v in _ENV.items() if k in env}, cfg)
    return from_mapping({k: v for k, v in overrides.items() if v is not None}, cfg)
