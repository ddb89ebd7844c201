"""Tenant identities: a peer's uid/gid (from SO_PEERCRED) mapped to a tenant by config."""

from __future__ import annotations

import functools
import grp
import hashlib
import hmac
import pwd
from dataclasses import dataclass

from . import errors
from .config import Config, TenantPolicy, TenantRule


@dataclass(frozen=True, slots=True)
class Peer:
    """The credentials of a connected process, as the kernel reports them."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    policy: TenantPolicy = TenantPolicy()

    @property
    def weight(self) -> float:
        return self.policy.weight


@functools.lru_cache(maxsize=4096)
def _user_cached(uid: int) -> str:
    return pwd.getpwuid(uid).pw_name


def _user(uid: int) -> str:
    """The user name of ``uid`` ('' if none). Found names are cached: a lookup that fails later
    (NSS unreachable, fds short) must not turn a known user into an unknown one."""
    try:
        return _user_cached(uid)
    except KeyError:
        return ""


def _groups(peer: Peer) -> set[str]:
    names: set[str] = set()
    try:
        names.add(grp.getgrgid(peer.gid).gr_name)
    except KeyError:
        pass
    user = _user(peer.uid)
    if user:
        names.update(g.gr_name for g in grp.getgrall() if user in g.gr_mem)
    return names


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _matches(rule: TenantRule, peer: Peer, user: str, groups: set[str], digest: str) -> bool:
    if rule.token_sha256 and not (digest and hmac.compare_digest(rule.token_sha256, digest)):
        return False
    checks = []
    if rule.uid >= 0:
        checks.append(rule.uid == peer.uid)
    if rule.gid >= 0:
        checks.append(rule.gid == peer.gid)
    if rule.user:
        checks.append(rule.user == user)
    if rule.group:
        checks.append(rule.group in groups)
    return bool(checks) and all(checks)


class TenantDirectory:
    """Resolves peers to tenants. Unlisted peers get ``uid:N`` (or their user name) with defaults."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def resolve(self, peer: Peer, token: str = "") -> Tenant:
        """The tenant of ``peer``; with a ``token``, only a rule naming that token (and matching the
        peer) will do: a token that names no tenant for this peer is refused, never ignored."""
        user = _user(peer.uid)
        groups = _groups(peer) if any(r.group for r in self.config.tenants) else set()
        digest = token_digest(token) if token else ""
        for rule in self.config.tenants:
            if (bool(rule.token_sha256) == bool(token)) and _matches(rule, peer, user, groups, digest):
                return Tenant(rule.name, rule.policy)
        if token:
            raise errors.PermissionDenied(f"the token presented names no tenant of this broker for uid {peer.uid}",
                                          detail={"uid": peer.uid})
        if self.config.unknown_tenants == "refuse":
            raise errors.PermissionDenied(f"uid {peer.uid} is not a tenant of this broker",
                                          detail={"uid": peer.uid})
        return Tenant(f"uid:{peer.uid}" if not user else f"user:{user}", self.config.tenant_defaults)

    def is_admin(self, peer: Peer) -> bool:
        """Root, or a member of the configured admin group."""
        return peer.uid == 0 or bool(self.config.admin_group and self.config.admin_group in _groups(peer))

    def policy_of(self, name: str) -> TenantPolicy:
        """The policy the current config gives tenant ``name`` (defaults when no rule names it)."""
        for rule in self.config.tenants:
            if rule.name == name:
                return rule.policy
        return self.config.tenant_defaults
