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
class TenantPolicy:
    """What a tenant may use. ``[tenant_defaults]`` sets it for everyone; a ``[[tenants]]`` rule overrides."""

    weight: float = 1.0              # share of device time (and of device memory under pressure)
    device_memory: int = 0           # bytes on any one device (resident + per-request); 0: no quota
    total_memory: int = 0            # bytes over all devices; 0: no quota
    max_inflight: int = 64           # graphs on devices at once; more wait their turn
    max_queued: int = 4096           # graphs waiting; one more is refused (too_many_requests)
    max_graph_seconds: float = 0.0   # deadline of its graphs; 0: the broker's max_graph_seconds
    priority: str = "batch"          # batch | latency: ahead within its fair share, high-priority lanes
    isolation: str = "shared"        # shared | dedicated: its own device worker (its own context) per GPU
    libraries: tuple[str, ...] = ()  # if set: the only library digests it may register (vetted kernels)


@dataclass(frozen=True, slots=True)
class TenantRule:
    """Maps peers to a tenant: by ``user`` / ``group`` name or ``uid`` / ``gid`` (all given must match).

    With ``token_sha256`` the rule is for one job among many that share a uid (Ray workers): the
    peer must match the rule's user / group / uid / gid *and* present the token whose SHA-256 this
    is.  The config holds only the digest, never the token.
    """

    name: str
    user: str = ""
    group: str = ""
    uid: int = -1
    gid: int = -1
    token_sha256: str = ""
    policy: TenantPolicy = TenantPolicy()


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
    policy: str = "fair"                  # fair (weighted share of device time) | fcfs
    max_arenas: int = 4096                # per session
    max_tenant_arenas: int = 8192         # per tenant, all its sessions together
    max_inflight: int = 4096              # requests per session at once
    max_prepared: int = 4096              # prepared graphs per session
    # Bounded caches: what a tenant registers in a loop cannot grow the broker without bound.
    # Least recently used libraries that no prepared graph uses make room; past that: quota_exceeded.
    max_libraries: int = 1024             # libraries kept (all tenants; a departed tenant's stay cached)
    max_library_bytes: int = 1 << 30      # their bytes
    tenant_max_libraries: int = 256       # libraries one tenant holds
    tenant_max_library_bytes: int = 256 << 20
    tenant_max_prepared: int = 16384      # prepared graphs of one tenant, all its sessions together
    tenant_max_residents: int = 4096      # resident buffers of one tenant
    max_departed_tenants: int = 10_000    # tenants whose totals are kept after their last session (oldest go)
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
    admin_group: str = ""                 # members (and root) may use kaasctl's admin commands
    shutdown_grace: float = 30.0          # seconds running graphs get to finish on SIGTERM
    tenant_defaults: TenantPolicy = field(default=TenantPolicy())
    # Busy-polling after activity trades a core for wake-up latency; -1: on only with CUDA devices.
    spin_us: int = -1                     # the broker's event loop
    worker_spin_us: int = -1              # each device worker
    client_spin_us: int = -1              # recommended to tenants in the handshake
    spinning_tenants: int = -1            # with more sessions than this, tenants are advised not to spin
                                          # (-1: a quarter of the cores; 0: tenants never advised to spin)
    # The direct path: after this many runs in a row from one session with nobody else's in between,
    # its runs go from its ring straight to the device worker (broker/leases.py); 0: never.
    direct_after: int = 32
    # Many sessions leased at once, ordered on each device worker by weighted fair share of device time
    # (broker/streams/direct.py); false: one lease at a time, and another session's run ends it.
    shared_leases: bool = True
    tenants: tuple[TenantRule, ...] = field(default=())

    def spinning_sessions(self) -> int:
        """How many sessions may be advised to spin, auto resolved (a quarter of the cores, at least 1)."""
        return self.spinning_tenants if self.spinning_tenants >= 0 else max(1, (os.cpu_count() or 1) // 4)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def spin(self, key: str, devices: list[str]) -> float:
        """Seconds to busy-poll for ``key`` (spin_us, worker_spin_us, client_spin_us), auto resolved."""
        us = getattr(self, key)
        if us < 0:
            gpu = any(d.startswith("cuda") for d in devices)
            if gpu:
                us = {"spin_us": 500, "worker_spin_us": 1000, "client_spin_us": 200}[key]
            else:
                # CPU devices: only the broker spins, and only with a core to spare for it. Then a
                # request costs one wake-up (the tenant's) instead of two; workers and tenants sleep,
                # so spinners never outnumber cores (two spinners on one core: 8 ms round trips).
                us = 300 if key == "spin_us" and (os.cpu_count() or 1) >= 2 else 0
        return us / 1e6


_SIMPLE = {f.name: f for f in dataclasses.fields(Config) if f.name not in ("tenants", "tenant_defaults")}
_CHOICES = {"log_format": ("auto", "json", "console"),
            "log_level": ("debug", "info", "warning", "error"),
            "unknown_tenants": ("admit", "refuse"),
            "policy": ("fair", "fcfs"),
            "priority": ("batch", "latency"),
            "isolation": ("shared", "dedicated")}
_POLICY = {f.name: f for f in dataclasses.fields(TenantPolicy)}
_MATCH = ("name", "user", "group", "uid", "gid", "token_sha256")


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
    base = key.rsplit(".", 1)[-1]
    if base == "weight" and value <= 0:
        raise ConfigError(f"config: {key} = {value} must be positive")
    if base in ("device_memory", "total_memory", "max_graph_seconds") and value < 0:
        raise ConfigError(f"config: {key} = {value} must be >= 0 (0: no limit)")
    if base in ("device_memory", "total_memory", "max_graph_seconds"):
        return value
    if base == "libraries" and any(len(d) != 64 or set(d) - set("0123456789abcdef") for d in value):
        raise ConfigError(f"config: {key} must list library digests (64 lowercase hex characters)")
    if base in _CHOICES and value not in _CHOICES[base]:
        raise ConfigError(f"config: {key} = {value!r} is not one of {', '.join(_CHOICES[base])}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"config: {key} = {value!r} is not one of {', '.join(_CHOICES[key])}")
    if key.endswith("spin_us"):
        if isinstance(value, int) and value < -1:
            raise ConfigError(f"config: {key} = {value} must be -1 (auto), 0 (off) or a number of microseconds")
    elif key == "spinning_tenants":
        if value < -1:
            raise ConfigError(f"config: spinning_tenants = {value} must be -1 (auto: a quarter of the cores), "
                              "0 (tenants never advised to spin) or a number of sessions")
    elif key == "metrics_port":
        if not 0 <= value <= 65535:
            raise ConfigError(f"config: metrics_port = {value} is not a TCP port (0 turns metrics off)")
    elif (isinstance(value, int) and not isinstance(value, bool) and value <= 0
          and key != "socket_mode" and base not in ("uid", "gid") and not (key == "direct_after" and value == 0)):
        raise ConfigError(f"config: {key} = {value} must be positive")
    return value


def _policy(where: str, raw: Mapping[str, Any], base: TenantPolicy) -> TenantPolicy:
    values = {}
    for k, v in raw.items():
        if k not in _POLICY:
            raise ConfigError(f"config: {where}: unknown key {k!r}")
        values[k] = _coerce(f"{where}.{k}", v, _POLICY[k].default)
    return dataclasses.replace(base, **values)


def _tenant(i: int, raw: Any, defaults: TenantPolicy) -> TenantRule:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: tenants[{i}] must be a table")
    if not isinstance(raw.get("name"), str) or not raw["name"]:
        raise ConfigError(f"config: tenants[{i}]: 'name' is required")
    match = {k: v for k, v in raw.items() if k in _MATCH}
    known = {f.name: f for f in dataclasses.fields(TenantRule)}
    values = {k: _coerce(f"tenants[{i}].{k}", v, known[k].default if k != "name" else "") for k, v in match.items()}
    if values.get("uid", -1) < -1 or values.get("gid", -1) < -1:
        raise ConfigError(f"config: tenants[{i}]: uid/gid must be >= 0")
    if not any(k in values for k in ("user", "group", "uid", "gid")):
        raise ConfigError(f"config: tenants[{i}] ({raw['name']}): give at least one of user, group, uid, gid"
                          + (" (who may present the token)" if "token_sha256" in values else ""))
    digest = values.get("token_sha256", "")
    if "token_sha256" in values and (len(digest) != 64 or set(digest) - set("0123456789abcdef")):
        raise ConfigError(f"config: tenants[{i}].token_sha256 must be the token's SHA-256 (64 lowercase hex "
                          "characters; kaasctl token prints one)")
    policy = _policy(f"tenants[{i}]", {k: v for k, v in raw.items() if k not in _MATCH}, defaults)
    return TenantRule(**values, policy=policy)


def from_mapping(data: Mapping[str, Any], base: Config = Config()) -> Config:
    changes: dict[str, Any] = {}
    defaults = base.tenant_defaults
    if "tenant_defaults" in data:
        if not isinstance(data["tenant_defaults"], Mapping):
            raise ConfigError("config: tenant_defaults must be a table ([tenant_defaults])")
        defaults = changes["tenant_defaults"] = _policy("tenant_defaults", data["tenant_defaults"], TenantPolicy())
    for key, value in data.items():
        if key == "tenant_defaults":
            continue
        if key == "tenants":
            if not isinstance(value, list):
                raise ConfigError("config: tenants must be an array of tables ([[tenants]])")
            changes["tenants"] = tuple(_tenant(i, t, defaults) for i, t in enumerate(value))
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
