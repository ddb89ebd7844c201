"""The broker as systemd runs it: socket activation, sd_notify, and its metrics endpoint."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

import tenantlib
from tenantlib import kernels
from tests.conftest import ROOT

# Like systemd: the listening socket becomes fd 3, LISTEN_PID names the broker's own pid.
_ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="broker")
os.execv(sys.executable, [sys.executable, "-m", "broker", *sys.argv[2:]])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _recv_until(sock: socket.socket, word: str, seconds: float = 120.0) -> list[str]:
    got: list[str] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sock.settimeout(max(0.1, end - time.monotonic()))
        try:
            msg = sock.recv(4096).decode()
        except TimeoutError:
            break
        got.append(msg)
        if word in msg.split("\n"):
            return got
    raise AssertionError(f"no {word} from the broker; got {got}")


def test_socket_activation_notify_and_metrics(broker_env: dict[str, str], tmp_path: Path) -> None:
    d = Path("/tmp") / f"kaas-svc-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    path, notify_path = str(d / "broker.sock"), str(d / "notify")
    port = _free_port()
    (tmp_path / "broker.toml").write_text(f"metrics_port = {port}\n")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    env = dict(broker_env, NOTIFY_SOCKET=notify_path)
    proc = subprocess.Popen([sys.executable, "-c", _ACTIVATE, str(listener.fileno()), "--device", "cpu",
                             "--config", str(tmp_path / "broker.toml")], pass_fds=[listener.fileno()], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    listener.close()  # the broker holds the only copy now, as with systemd
    try:
        ready = _recv_until(notify, "READY=1")
        assert any("STATUS=" in m for m in ready)
        with tenantlib.connect(path) as client:  # the socket systemd made, served by the broker
            lib = kernels.library(client)
            x, y, z = (client.array(64) for _ in range(3))
            x[...] = 1.0
            y[...] = 2.0
            g = client.graph()
            g.kernel(lib, "vadd", grid=1, block=64, args=[g.input(x), g.input(y), g.output(z), 64])
            client.run(g)
            np.testing.assert_array_equal(z, 3.0)
            tenant = client.tenant
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        done = [s for s in families["kaas_graphs_completed"].samples
                if s.labels.get("tenant") == tenant and s.name.endswith("_total")]
        assert done and done[0].value >= 1
        assert "kaas_request_latency_seconds" in families and "kaas_active_sessions" in families
        proc.send_signal(signal.SIGTERM)
        _recv_until(notify, "STOPPING=1")
        assert proc.wait(30) == 0
        assert os.path.exists(path), "the broker must leave systemd's socket file alone"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
