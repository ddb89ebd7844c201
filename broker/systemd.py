"""The systemd service protocols, without python-systemd: socket activation and sd_notify.

- ``listen_fds()`` takes the listening sockets systemd passed (``LISTEN_FDS`` / ``LISTEN_PID`` /
  ``LISTEN_FDNAMES``, fds from 3 on), as ``sd_listen_fds(unset_environment=1)`` does.
- ``Notifier`` sends sd_notify datagrams (READY=1, STATUS=, STOPPING=1, WATCHDOG=1, RELOADING=1) to
  ``$NOTIFY_SOCKET``; every call is a no-op returning False when the broker was not started by systemd.
- ``watchdog_interval()`` reads ``WATCHDOG_USEC`` / ``WATCHDOG_PID``; ``Watchdog`` pings from the event
  loop at that interval, so a stalled loop misses its pings and systemd restarts the broker.

Protocol references: sd_listen_fds(3), sd_notify(3), sd_watchdog_enabled(3).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

from .config import ConfigError

SD_LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class SystemdError(ConfigError):
    """systemd handed the broker something it cannot use; the message names the variable or fd.

    A ConfigError, so ``kaas-broker`` refuses to start with the message instead of a traceback.
    """


def _int(env: Mapping[str, str], key: str) -> int:
    raw = env[key]
    try:
        value = int(raw, 10)
    except ValueError:
        raise SystemdError(f"systemd: {key}={raw!r} is not an integer") from None
    if value < 0:
        raise SystemdError(f"systemd: {key}={raw!r} is negative")
    return value


def _kind(sock: socket.socket) -> str:
    family, kind = sock.family, sock.type
    return f"{getattr(family, 'name', family)}/{getattr(kind, 'name', kind)}"


def listen_fds_with_names(env: MutableMapping[str, str] | None = None,
                          pid: int | None = None) -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed to this process, each with its ``FileDescriptorName=``.

    Returns ``[]`` when the process was not socket-activated, or when ``LISTEN_PID`` names another
    process (a child that inherited the environment). The three variables are removed from ``env``
    whatever the outcome, so device workers and other children never see them. Each socket must be a
    listening AF_UNIX stream socket; it is made non-inheritable (close-on-exec). A name systemd did
    not give is ``"unknown"``, as in sd_listen_fds_with_names(3).

    ``env`` defaults to ``os.environ`` and ``pid`` to ``os.getpid()`` at call time.
    """
    env = os.environ if env is None else env
    pid = os.getpid() if pid is None else pid
    taken = {k: env[k] for k in _LISTEN_VARS if k in env}
    for k in _LISTEN_VARS:
        env.pop(k, None)
    if "LISTEN_PID" not in taken or "LISTEN_FDS" not in taken:
        return []
    if _int(taken, "LISTEN_PID") != pid:
        return []
    n = _int(taken, "LISTEN_FDS")
    names: list[str] = ["unknown"] * n
    if "LISTEN_FDNAMES" in taken:
        given = taken["LISTEN_FDNAMES"].split(":")
        if len(given) != n:
            raise SystemdError(f"systemd: LISTEN_FDNAMES has {len(given)} names for LISTEN_FDS={n}")
        names = [g or "unknown" for g in given]
    out: list[tuple[str, socket.socket]] = []
    for i, name in enumerate(names):
        fd = SD_LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise SystemdError(f"systemd: passed fd {fd} ({name}) is not a socket: {exc.strerror}") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise SystemdError(f"systemd: passed fd {fd} ({name}) is {_kind(sock)}; "
                               f"kaas-broker needs a Unix stream socket (ListenStream=/path)")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise SystemdError(f"systemd: passed fd {fd} ({name}) is not listening (Accept=no is required)")
        out.append((name, sock))
    return out


def listen_fds(env: MutableMapping[str, str] | None = None, pid: int | None = None) -> list[socket.socket]:
    """The listening Unix stream sockets systemd passed, in order; see ``listen_fds_with_names``."""
    return [sock for _, sock in listen_fds_with_names(env, pid)]


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``, as systemd recommends), or None.

    None when the watchdog is off: ``WATCHDOG_USEC`` unset or 0, or ``WATCHDOG_PID`` naming another
    process. A malformed value raises SystemdError.
    """
    env = os.environ if env is None else env
    pid = os.getpid() if pid is None else pid
    if "WATCHDOG_USEC" not in env:
        return None
    usec = _int(env, "WATCHDOG_USEC")
    if usec == 0:
        return None
    if "WATCHDOG_PID" in env and _int(env, "WATCHDOG_PID") != pid:
        return None
    return usec / 2e6


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock:CID:PORT (systemd >= 254) and anything else: not supported here


class Notifier:
    """Sends sd_notify state changes to ``$NOTIFY_SOCKET`` (read once, at construction).

    Every method returns True when the datagram was sent, False when notification is off (not run by
    systemd, or an address form this module does not speak) or the send failed: a notification is
    never worth crashing the broker for. Sends block for at most ``timeout`` seconds; systemd's
    receive queue is large, so in practice they never wait.
    """

    def __init__(self, env: Mapping[str, str] | None = None, *, timeout: float = 1.0) -> None:
        env = os.environ if env is None else env
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.settimeout(timeout)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) finished: systemd starts ordered units and ``systemctl start`` returns."""
        return self.notify("READY=1", *self._status(status))

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.notify(*self._status(text))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *self._status(status))

    def reloading(self, status: str | None = None) -> bool:
        """A reload began; send ``ready()`` when it is done. MONOTONIC_USEC lets systemd order the two."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *self._status(status))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the start (or stop) timeout fires, e.g. while workers compile."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1e6))}")

    @staticmethod
    def _status(text: str | None) -> tuple[str, ...]:
        if text is None:
            return ()
        return (f"STATUS={' '.join(text.splitlines())}",)  # one line: a newline would start a new field

    def close(self) -> None:
        """Idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Watchdog:
    """Pings ``notifier.watchdog()`` every ``interval`` seconds from the event loop.

    The pings run as ``loop.call_later`` callbacks, so they stop when the loop stops making progress
    (a blocking call, a busy callback): that is the failure systemd's WatchdogSec= is there to catch.
    """

    def __init__(self, notifier: Notifier, interval: float) -> None:
        if not interval > 0:
            raise ValueError(f"watchdog interval must be > 0 seconds, got {interval}")
        self.notifier = notifier
        self.interval = interval
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Ping now and then every ``interval``; call from the loop's thread."""
        self._loop = loop or asyncio.get_running_loop()
        self._ping()

    def _ping(self) -> None:
        assert self._loop is not None
        self.notifier.watchdog()
        self._handle = self._loop.call_later(self.interval, self._ping)

    def stop(self) -> None:
        """Idempotent."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


__all__ = ["SD_LISTEN_FDS_START", "Notifier", "SystemdError", "Watchdog", "listen_fds", "listen_fds_with_names",
           "watchdog_interval"]
