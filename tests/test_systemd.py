"""broker.systemd driven the way systemd drives a service, and the unit files' contents."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.systemd import Notifier, SystemdError, Watchdog, listen_fds, listen_fds_with_names, watchdog_interval

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "tools" / "systemd"

# -- socket activation -------------------------------------------------------------------------
# What systemd does before exec: the listening socket at fd 3, LISTEN_PID = the pid that will run the
# service (exec keeps it), LISTEN_FDS, LISTEN_FDNAMES. The wrapper does that, then execs the check.
_WRAPPER = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="broker")
os.execv(sys.executable, [sys.executable, "-c", sys.argv[2]])
"""

_CHECK = """
import json, os, sys
from broker.systemd import SystemdError, listen_fds_with_names
try:
    got = listen_fds_with_names()
except SystemdError as exc:
    print(json.dumps({"error": str(exc), "left": sorted(k for k in os.environ if k.startswith("LISTEN_"))}))
    sys.exit(0)
out = {"names": [n for n, _ in got], "fds": [s.fileno() for _, s in got],
       "inheritable": [os.get_inheritable(s.fileno()) for _, s in got],
       "left": sorted(k for k in os.environ if k.startswith("LISTEN_"))}
print(json.dumps(out), flush=True)
for _, s in got:
    conn, _ = s.accept()
    conn.sendall(b"hello from " + str(os.getpid()).encode())
    conn.close()
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _activate(sock: socket.socket) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _WRAPPER, str(sock.fileno()), _CHECK], pass_fds=[sock.fileno()],
                            stdout=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    d = Path("/tmp") / f"kaas-sd-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_listen_fds_takes_an_inherited_listening_socket(sockdir: Path) -> None:
    path = str(sockdir / "broker.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lsock:
        lsock.bind(path)
        lsock.listen(8)
        proc = _activate(lsock)
    try:
        assert proc.stdout is not None
        report = json.loads(proc.stdout.readline())
        assert report == {"names": ["broker"], "fds": [3], "inheritable": [False], "left": []}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(path)  # the child's inherited socket answers on the path the parent bound
            c.settimeout(30)
            data = b""
            while chunk := c.recv(100):
                data += chunk
        assert data == f"hello from {proc.pid}".encode()  # exec kept the pid LISTEN_PID named
    finally:
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0


@pytest.mark.parametrize("kind", ["dgram", "unlistened"])
def test_listen_fds_refuses_a_socket_it_cannot_serve_on(kind: str, sockdir: Path) -> None:
    typ = socket.SOCK_DGRAM if kind == "dgram" else socket.SOCK_STREAM
    with socket.socket(socket.AF_UNIX, typ) as s:
        s.bind(str(sockdir / "x.sock"))
        proc = _activate(s)
    out, _ = proc.communicate(timeout=30)
    report = json.loads(out)
    assert "fd 3 (broker)" in report["error"]
    assert report["left"] == []  # unset even when refused


def test_listen_fds_ignores_another_process_and_unsets_the_variables() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "broker", "OTHER": "x"}
    assert listen_fds(env, pid=4242) == []
    assert env == {"OTHER": "x"}
    assert listen_fds({}, pid=4242) == []
    env = {"LISTEN_FDS": "1"}  # no LISTEN_PID: not for us (sd_listen_fds does the same)
    assert listen_fds(env, pid=4242) == []
    assert env == {}


def test_listen_fds_with_no_fds() -> None:
    env = {"LISTEN_PID": "7", "LISTEN_FDS": "0"}
    assert listen_fds_with_names(env, pid=7) == []
    assert env == {}


@pytest.mark.parametrize("env, message", [
    ({"LISTEN_PID": "x7", "LISTEN_FDS": "1"}, "LISTEN_PID='x7' is not an integer"),
    ({"LISTEN_PID": "7", "LISTEN_FDS": "one"}, "LISTEN_FDS='one' is not an integer"),
    ({"LISTEN_PID": "7", "LISTEN_FDS": "-1"}, "LISTEN_FDS='-1' is negative"),
    ({"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "broker"}, "1 names for LISTEN_FDS=2"),
])
def test_listen_fds_refuses_malformed_variables(env: dict[str, str], message: str) -> None:
    with pytest.raises(SystemdError, match=re.escape(message)):
        listen_fds(env, pid=7)
    assert env == {}


# -- sd_notify ---------------------------------------------------------------------------------
@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, sockdir: Path) -> Iterator[tuple[str, socket.socket]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        name = str(sockdir / "notify")
        s.bind(name)
    else:
        tag = f"kaas-test-notify-{uuid.uuid4().hex}"
        s.bind("\0" + tag)
        name = "@" + tag
    s.settimeout(30)
    yield name, s
    s.close()


def _fields(s: socket.socket) -> dict[str, str]:
    lines = s.recv(4096).decode().split("\n")
    return dict(line.split("=", 1) for line in lines)


def test_notifier_sends_each_state(notify_socket: tuple[str, socket.socket]) -> None:
    name, recv = notify_socket
    n = Notifier({"NOTIFY_SOCKET": name})
    assert n.enabled
    assert n.ready("serving cuda:0, cuda:1")
    assert _fields(recv) == {"READY": "1", "STATUS": "serving cuda:0, cuda:1"}
    assert n.status("3 sessions\n7 queued")
    assert _fields(recv) == {"STATUS": "3 sessions 7 queued"}  # one line: a newline would start a new field
    assert n.watchdog()
    assert _fields(recv) == {"WATCHDOG": "1"}
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    f = _fields(recv)
    assert f["RELOADING"] == "1" and int(f["MONOTONIC_USEC"]) >= before
    assert n.ready()
    assert _fields(recv) == {"READY": "1"}
    assert n.extend_timeout(2.5)
    assert _fields(recv) == {"EXTEND_TIMEOUT_USEC": "2500000"}
    assert n.stopping("draining 2 graphs")
    assert _fields(recv) == {"STOPPING": "1", "STATUS": "draining 2 graphs"}
    n.close()
    n.close()
    assert not n.enabled and not n.ready()


def test_notifier_is_a_no_op_outside_systemd() -> None:
    for env in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}):
        n = Notifier(env)
        assert not n.enabled
        assert not n.ready() and not n.status("x") and not n.stopping() and not n.watchdog() and not n.reloading()


def test_notifier_survives_a_missing_receiver(sockdir: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(sockdir / "gone")})
    try:
        assert n.enabled and n.ready() is False
    finally:
        n.close()


async def test_watchdog_pings_from_the_event_loop(notify_socket: tuple[str, socket.socket]) -> None:
    name, recv = notify_socket
    recv.setblocking(False)
    loop = asyncio.get_running_loop()
    n = Notifier({"NOTIFY_SOCKET": name})
    dog = Watchdog(n, 0.001)
    dog.start()
    try:
        for _ in range(3):  # the first at once, then one per interval, each from a loop callback
            data = await asyncio.wait_for(loop.sock_recv(recv, 4096), 30)
            assert data == b"WATCHDOG=1"
    finally:
        dog.stop()
        dog.stop()
        n.close()
    with pytest.raises(ValueError, match="interval"):
        Watchdog(n, 0)


def test_watchdog_interval() -> None:
    assert watchdog_interval({}, pid=5) is None
    assert watchdog_interval({"WATCHDOG_USEC": "10000000"}, pid=5) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "5"}, pid=5) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "6"}, pid=5) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, pid=5) is None
    with pytest.raises(SystemdError, match="WATCHDOG_USEC='ten'"):
        watchdog_interval({"WATCHDOG_USEC": "ten"}, pid=5)
    with pytest.raises(SystemdError, match="WATCHDOG_PID"):
        watchdog_interval({"WATCHDOG_USEC": "1", "WATCHDOG_PID": "me"}, pid=5)


# -- the unit files ----------------------------------------------------------------------------
def _unit(name: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value assigned (systemd's list settings repeat keys)."""
    out: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] | None = None
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), {})
            continue
        assert section is not None, f"{name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{name}: {line!r} is not key=value"
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def test_service_unit() -> None:
    svc = _unit("kaas-broker.service")["Service"]
    one = {k: v[-1] for k, v in svc.items()}
    expected = {
        "Type": "notify", "NotifyAccess": "main", "ExecReload": "/bin/kill -HUP $MAINPID", "WatchdogSec": "10s",
        "Restart": "on-failure", "KillMode": "mixed", "RuntimeDirectory": "kaas", "DevicePolicy": "closed",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "LimitMEMLOCK": "infinity",
    }
    assert {k: one.get(k) for k in expected} == expected
    assert one["ExecStart"] == "/usr/bin/kaas-broker --config /etc/kaas/broker.toml"
    assert "TimeoutStopSec" in one
    assert int(one["LimitNOFILE"]) >= 65536
    allowed = set(svc["DeviceAllow"])
    assert {"char-nvidia rw", "char-nvidia-frontend rw", "char-nvidia-uvm rw", "char-nvidia-caps rw"} <= allowed
    # PrivateDevices= would hide /dev/nvidia*; PrivateUsers= would garble SO_PEERCRED uids.
    assert "PrivateDevices" not in svc and "PrivateUsers" not in svc
    unit = _unit("kaas-broker.service")["Unit"]
    assert "kaas-broker.socket" in unit["Requires"] and "kaas-broker.socket" in unit["After"]


def test_socket_unit() -> None:
    sock = {k: v[-1] for k, v in _unit("kaas-broker.socket")["Socket"].items()}
    expected = {"ListenStream": "/run/kaas/broker.sock", "SocketMode": "0660", "SocketGroup": "kaas",
                "Service": "kaas-broker.service", "Accept": "no"}
    assert {k: sock.get(k) for k in expected} == expected


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    # verify insists that ExecStart's binary exists: point it at a stand-in for kaas-broker.
    stub = tmp_path / "kaas-broker"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    (tmp_path / "kaas-broker.socket").write_text((UNITS / "kaas-broker.socket").read_text())
    (tmp_path / "kaas-broker.service").write_text(
        (UNITS / "kaas-broker.service").read_text().replace("ExecStart=/usr/bin/kaas-broker", f"ExecStart={stub}"))
    res = subprocess.run([analyze, "verify", str(tmp_path / "kaas-broker.socket"), str(tmp_path / "kaas-broker.service")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0 and not res.stderr.strip() and not res.stdout.strip(), res.stdout + res.stderr
