"""Shared fixtures: real broker processes on the CPU device, clients, leak snapshots."""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest

import tenantlib
from broker import protocol
from tools.broker_process import BrokerProcess

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["KAAS_LOG_FORMAT"] = "json"
    env.setdefault("KAAS_CACHE_DIR", os.path.join(tempfile.gettempdir(), "kaas-test-cache"))
    return env


@pytest.fixture(scope="session")
def broker_env() -> dict[str, str]:
    return _env()


BrokerFactory = Callable[..., BrokerProcess]



@pytest.fixture
def broker_factory(broker_env: dict[str, str], tmp_path: Path) -> Iterator[BrokerFactory]:
    """Start brokers with a given config text; all are stopped at the end of the test."""
    started: list[BrokerProcess] = []

    def start(config: str = "", device: str = "cpu", **kw: object) -> BrokerProcess:
        cfg = None
        if config:
            cfg = str(tmp_path / f"broker{len(started)}.toml")
            Path(cfg).write_text(config)
        b = BrokerProcess(device, config=cfg, env=broker_env, **kw)  # type: ignore[arg-type]
        started.append(b)
        return b.start()

    yield start
    for b in started:
        b.stop()
    problems = [p for b in started for p in b.problems()]
    assert not problems, "the broker logged problems:\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def broker(broker_env: dict[str, str]) -> Iterator[BrokerProcess]:
    """One CPU-device broker shared by a test module."""
    with BrokerProcess("cpu:0", env=broker_env) as b:
        yield b
    assert not b.problems(), "the broker logged problems:\n" + "\n".join(b.problems())


@pytest.fixture
def client(broker: BrokerProcess) -> Iterator[tenantlib.Client]:
    with tenantlib.connect(broker.socket, timeout=60) as c:
        yield c


class RawConnection:
    """A tenant speaking raw frames, for tests of what tenantlib would never send."""

    def __init__(self, path: str, *, hello: bool = True, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.decoder = protocol.FrameDecoder()
        self._pending: list[bytes] = []
        self.welcome: protocol.Welcome | None = None
        if hello:
            self.send(protocol.Hello(protocol.PROTOCOL_VERSION, "raw"))
            msg = self.recv()
            assert isinstance(msg, protocol.Welcome), msg
            self.welcome = msg

    def send(self, msg: msgspec.Struct, fd: int | None = None) -> None:
        self.send_bytes(protocol.encode(msg), fd)

    def send_bytes(self, data: bytes, fd: int | None = None) -> None:
        if fd is None:
            self.sock.sendall(data)
        else:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])

    def send_body(self, body: bytes) -> None:
        self.send_bytes(protocol.HEADER.pack(len(body)) + body)

    def recv(self) -> protocol.BrokerMessage:
        while not self._pending:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionResetError("broker closed the connection")
            self._pending.extend(self.decoder.feed(data))
        return protocol.decode_broker(self._pending.pop(0))

    def closed_by_peer(self) -> bool:
        """True once the broker has closed the connection (after any replies in flight)."""
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    return True
                self._pending.extend(self.decoder.feed(data))
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(broker: BrokerProcess) -> Iterator[Callable[..., RawConnection]]:
    conns: list[RawConnection] = []

    def make(**kw: object) -> RawConnection:
        c = RawConnection(broker.socket, **kw)  # type: ignore[arg-type]
        conns.append(c)
        return c

    yield make
    for c in conns:
        c.close()


T = TypeVar("T")


def wait_for(probe: Callable[[], T], ok: Callable[[T], bool], what: str, deadline: float = 30.0) -> T:
    """Poll ``probe()`` until ``ok`` holds; fail naming ``what`` and the last value otherwise.

    For conditions that become true eventually (a respawn, a release): never a timed assertion.
    """
    end = time.monotonic() + deadline
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() > end:
            pytest.fail(f"{what}: still {value!r} after {deadline:.0f} s")
        time.sleep(0.02)


def broker_pid(b: BrokerProcess) -> int:
    assert b.proc is not None
    return b.proc.pid


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.add(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()
