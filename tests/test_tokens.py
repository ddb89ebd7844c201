"""Job tokens: where many jobs share one uid (Ray workers), a token the config maps (by its SHA-256)
to a tenant names the job; the uid must still match the rule, and the token is never logged."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import tenantlib
from broker import config as cfg
from broker.tenants import token_digest
from tenantlib import errors
from tests.conftest import ROOT, BrokerFactory

TOKEN_A = "job-a-token-0123456789"
TOKEN_B = "job-b-token-9876543210"


def _rules(uid: int) -> str:
    return "".join(f'[[tenants]]\nname = "{name}"\nuid = {uid}\ntoken_sha256 = "{token_digest(tok)}"\nweight = {w}\n'
                   for name, tok, w in (("job-a", TOKEN_A, 2), ("job-b", TOKEN_B, 1)))


def test_a_token_names_the_job_among_many_of_one_uid(broker_factory: BrokerFactory) -> None:
    b = broker_factory(_rules(os.geteuid()))
    with tenantlib.connect(b.socket, token=TOKEN_A) as a, tenantlib.connect(b.socket, token=TOKEN_B) as bb, \
            tenantlib.connect(b.socket, token="") as plain:
        assert (a.tenant, bb.tenant) == ("job-a", "job-b")
        assert plain.tenant not in ("job-a", "job-b")  # no token: the uid's own identity
    with pytest.raises(errors.PermissionDenied, match="names no tenant"):
        tenantlib.connect(b.socket, token="not-a-token-of-this-broker")
    env = dict(os.environ, KAAS_TOKEN=TOKEN_B)  # the default comes from the environment
    out = subprocess.run([sys.executable, "-c", "import sys, tenantlib; print(tenantlib.connect(sys.argv[1]).tenant)",
                          b.socket], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "job-b", out.stderr
    b.stop()
    assert TOKEN_A not in b.final_log and TOKEN_B not in b.final_log and "not-a-token" not in b.final_log


def test_a_token_does_not_lend_its_tenant_to_another_uid(broker_factory: BrokerFactory) -> None:
    b = broker_factory(_rules(os.geteuid() + 1))  # the rules are for a uid that is not ours
    with pytest.raises(errors.PermissionDenied, match="names no tenant"):
        tenantlib.connect(b.socket, token=TOKEN_A)


def test_token_rules_are_checked_when_the_config_is_read() -> None:
    with pytest.raises(cfg.ConfigError, match="SHA-256"):
        cfg.from_mapping({"tenants": [{"name": "j", "user": "ray", "token_sha256": TOKEN_A}]})
    with pytest.raises(cfg.ConfigError, match="who may present the token"):
        cfg.from_mapping({"tenants": [{"name": "j", "token_sha256": token_digest(TOKEN_A)}]})


def test_kaasctl_token_prints_a_rule_the_broker_accepts() -> None:
    out = subprocess.run([sys.executable, "-m", "tools.kaasctl", "token", "--tenant", "job-x", "--user", "ray"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    token = out.stdout.split("KAAS_TOKEN=")[1].split()[0]
    import tomllib

    rules = cfg.from_mapping(tomllib.loads(out.stdout)).tenants
    assert rules[0].name == "job-x" and rules[0].user == "ray" and rules[0].token_sha256 == token_digest(token)
