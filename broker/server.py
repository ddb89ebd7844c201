"""The asyncio adapter: a listening Unix socket, peer credentials, frames in and out.

uvloop transports cannot carry file descriptors, so connections are raw non-blocking
sockets driven by ``loop.add_reader``: ``recvmsg`` collects SCM_RIGHTS fds beside the
bytes, and the session claims one fd per register-arena frame, in order.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
import struct
import time

import structlog

from . import errors
from .config import Config
from .engine import Engine
from .graph import Limits
from .protocol import FrameDecoder, error_frame
from .session import Session
from .tenants import Peer, TenantDirectory

log = structlog.get_logger("kaas.server")
_UCRED = struct.Struct("3i")
_RECV = 256 * 1024
_MAX_FDS_PER_RECV = 16
_MAX_WRITE_BUFFER = 256 * 1024 * 1024


class Connection:
    """One accepted socket: reads frames into its Session, writes replies back."""

    def __init__(self, server: Server, sock: socket.socket, peer: Peer) -> None:
        self.server = server
        self.sock = sock
        self.loop = server.loop
        self.decoder = FrameDecoder(server.config.max_frame)
        self._out = bytearray()
        self._writing = False
        self.open = True
        self.session = Session(server.engine, server.directory, peer, self.write, self.close, limits=server.limits,
                               send_fds=self.write_fds)
        self.loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        fds = array.array("i")
        try:
            data, anc, flags, _ = self.sock.recvmsg(_RECV, socket.CMSG_SPACE(_MAX_FDS_PER_RECV * fds.itemsize))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self.session.recv_stamp = time.perf_counter()
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
        if fds:
            self.session.fds_received(list(fds))
        if flags & socket.MSG_CTRUNC:
            self.session.reply_error(0, errors.ProtocolError(f"too many file descriptors in one message "
                                                             f"(at most {_MAX_FDS_PER_RECV})"))
            self.close()
            return
        if not data:
            self.close()
            return
        try:
            bodies = self.decoder.feed(data)
        except errors.FrameTooLarge as exc:
            self.session.reply_error(0, exc)
            self.close()
            return
        for body in bodies:
            if not self.open:
                break
            try:
                self.session.frame_received(body)
            except Exception:  # a broker bug must cost this frame, never the others or the loop
                log.exception("frame_failed", session=self.session.id)
                self.session.reply_error(0, errors.InternalError("broker error while handling a frame"))

    def write(self, frame: bytes) -> None:
        if not self.open:
            return
        if self._out:
            self._out += frame
        else:
            try:
                n = self.sock.send(frame)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self.close()
                return
            if n < len(frame):
                self._out += frame[n:]
        if self._out and not self._writing:
            if len(self._out) > _MAX_WRITE_BUFFER:
                log.warning("slow_reader_closed", session=self.session.id, buffered=len(self._out))
                self.close()
                return
            self._writing = True
            self.loop.add_writer(self.sock.fileno(), self._on_writable)

    def write_fds(self, frame: bytes, fds: list[int]) -> None:
        """Send ``frame`` with ``fds`` riding on its first byte (SCM_RIGHTS); the fds stay ours."""
        if not self.open:
            raise errors.SessionClosed("the connection is closed")
        if self._out:
            raise errors.TooManyRequests("cannot hand over file descriptors while replies are still queued; "
                                         "retry once they are read")
        try:
            n = self.sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        except (BlockingIOError, InterruptedError):
            raise errors.TooManyRequests("the connection is not writable now; retry") from None
        except OSError as exc:
            self.close()
            raise errors.SessionClosed(f"the connection failed: {exc}") from None
        if n < len(frame):
            self.write(frame[n:])

    def _on_writable(self) -> None:
        try:
            n = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        del self._out[:n]
        if not self._out:
            self._writing = False
            self.loop.remove_writer(self.sock.fileno())

    def close(self) -> None:
        """Stop I/O at once (pending output is flushed best-effort); session cleanup runs in a task."""
        if not self.open:
            return
        self.open = False
        fileno = self.sock.fileno()
        self.loop.remove_reader(fileno)
        if self._writing:
            self.loop.remove_writer(fileno)
        if self._out:  # one non-blocking try (a last error reply, say); never stall the loop
            with contextlib.suppress(OSError):
                self.sock.send(self._out)
        self._out.clear()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.server._connection_closed(self)


class Server:
    def __init__(self, config: Config, engine: Engine, *, limits: Limits = Limits()) -> None:
        self.config = config
        self.engine = engine
        self.limits = limits
        self.directory = TenantDirectory(config)
        self.connections: set[Connection] = set()
        self._cleanup: set[asyncio.Task[None]] = set()
        self.sock: socket.socket | None = None
        self.loop = asyncio.get_event_loop()
        self.path = config.socket
        self._owns_path = False

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on ``config.socket`` (or an inherited listening ``sock``)."""
        self.loop = asyncio.get_running_loop()
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            parent = os.path.dirname(self.path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(self.path)
                    raise OSError(f"another broker is listening on {self.path}")
                except ConnectionRefusedError:
                    os.unlink(self.path)  # stale socket of a broker that died
                finally:
                    probe.close()
            old = os.umask(0o177)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            os.chmod(self.path, self.config.socket_mode)
            sock.listen(512)
            self._owns_path = True
        else:
            self.path = sock.getsockname()  # inherited (systemd socket activation): systemd owns the path
        sock.setblocking(False)
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._on_accept)
        log.info("listening", socket=self.path, devices=self.engine.devices)

    def _on_accept(self) -> None:
        assert self.sock is not None
        for _ in range(64):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of fds: the listening socket stays readable, so stop watching it for a moment
                # instead of spinning on failed accepts; tenants wait in the backlog meanwhile.
                log.warning("accept_failed", error=str(exc))
                self.loop.remove_reader(self.sock.fileno())
                self.loop.call_later(0.1, self._resume_accept)
                return
            conn.setblocking(False)
            try:
                pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            except OSError:
                conn.close()
                continue
            self.connections.add(Connection(self, conn, Peer(pid, uid, gid)))

    def _resume_accept(self) -> None:
        if self.sock is not None:
            self.loop.add_reader(self.sock.fileno(), self._on_accept)

    def _connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        task = self.loop.create_task(conn.session.connection_lost())
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)

    def stop_accepting(self) -> None:
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        if self._owns_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._owns_path = False

    async def close(self) -> None:
        self.stop_accepting()
        for conn in list(self.connections):
            conn.session.reply_error(0, errors.ShuttingDown("broker is shutting down"))
            conn.close()
        if self._cleanup:
            await asyncio.wait(list(self._cleanup), timeout=10)


__all__ = ["Server", "Connection", "error_frame"]
