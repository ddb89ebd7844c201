"""What the sync and asyncio clients share: handles, message building, reply checking. No I/O."""

from __future__ import annotations

import collections
import hashlib
import math
import os
import struct
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from broker.protocol import (
    PROTOCOL_VERSION,
    ArenaRegistered,
    BrokerMessage,
    Error,
    FrameDecoder,
    GraphDone,
    GraphPrepared,
    Hello,
    LibraryRegistered,
    Prefetched,
    PrepareGraph,
    PutResident,
    RegisterArena,
    RegisterLibrary,
    ReleaseArena,
    ReleaseGraph,
    ResidentRegistered,
    RunPrepared,
    Timings,
    Welcome,
    decode_broker,
    trace_hops,
)
from broker.records import encode_run, run_struct

from . import errors
from .arena import Arena
from .graph import Graph, Library, Resident
from .kernel_specs import AccessArg, KernelsArg, resolve_kernels

DEFAULT_SOCKET = "/run/kaas/broker.sock"
REPLY_GRACE = 5.0  # seconds a client waits past a graph's timeout for the broker's own verdict


def default_path(path: str | None) -> str:
    return path or os.environ.get("KAAS_SOCKET") or DEFAULT_SOCKET


@dataclass(frozen=True)
class RunResult:
    """A finished graph: where it ran, the broker's stage timings, and the round trip seen here."""

    device: str
    timings: Timings
    rtt: float
    trace: tuple[float, ...] = ()  # with run(trace=True): perf_counter stamps at protocol.TRACE_POINTS

    @property
    def hops(self) -> dict[str, float]:
        """Seconds per hop of a traced run (empty otherwise)."""
        return trace_hops(self.trace)


def raise_if_error(msg: BrokerMessage) -> None:
    if isinstance(msg, Error):
        raise errors.from_wire(msg.code, msg.message, msg.detail)


def read_welcome(bodies: list[bytes], decoder: FrameDecoder) -> Welcome:
    """The broker's answer to hello (its first frame): a Welcome, or the typed refusal raised."""
    msg = decode_broker(bodies[0])
    raise_if_error(msg)
    if not isinstance(msg, Welcome):
        raise errors.ProtocolError(f"expected welcome, got {type(msg).__name__}")
    decoder.max_frame = msg.max_frame
    return msg


def closed_during_handshake(path: str) -> errors.BrokerUnavailable:
    return errors.BrokerUnavailable(f"the broker at {path} closed the connection during the handshake")


def detect_format(code: str | bytes, fmt: str | None) -> tuple[str, bytes]:
    if isinstance(code, str):
        return fmt or "cuda", code.encode()
    if fmt:
        return fmt, bytes(code)
    if code[:4] == b"\x7fELF":
        return "cubin", bytes(code)
    if code[:4] == b"\x50\xed\x55\xba":
        return "fatbin", bytes(code)
    if b".version" in code[:4096] and b".target" in code[:4096]:
        return "ptx", bytes(code)
    return "cuda", bytes(code)


REMEMBERED_LIBRARIES = 256  # libraries a reconnecting client registers again (the broker's default tenant limit)


def digest_of(arr: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(arr).view(np.uint8).data, digest_size=32).digest()


class ClientCore:
    """Session state: request ids, arenas, and turning calls into messages and replies into results."""

    def __init__(self, welcome: Welcome) -> None:
        self.session = welcome.session
        self.tenant = welcome.tenant
        self.devices = welcome.devices
        # The architecture front ends compile for: the broker's first GPU's (any, when it has none).
        self.arch = next((a for a in welcome.archs if a), "")
        self.max_frame = welcome.max_frame
        self._req = 0
        self._arenas: list[Arena] = []
        # (base, size, id) of recently released arenas, so using one says "closed", not "unknown"
        self._released: collections.deque[tuple[int, int, int]] = collections.deque(maxlen=1024)
        self._arena_gen = 0  # changes whenever arenas come or go: located bindings are stale then
        # Prepared graphs: graph -> (its version when prepared, handle, finalizer). A graph that is
        # collected or changed leaves its handle in _unused, released with the next request.
        self._handles: weakref.WeakKeyDictionary[Graph, tuple[int, int, weakref.finalize]] = (
            weakref.WeakKeyDictionary())
        self._unused: list[int] = []
        self._ignored: set[int] = set()  # requests whose replies nobody waits for
        self._run_structs: dict[int, struct.Struct] = {}  # handle -> layout of its ring run records
        self.closed = False
        # With reconnect (see ``tenantlib.connect``): where the broker is, how this session was
        # opened, and what was registered, to register it again on a new session after a restart.
        self.reconnect = False
        self._path = ""
        self._hello = ClientCore.hello("tenantlib")
        self._old_reqs = 0  # requests up to this id were sent to a lost session: no reply will come
        self._arena_fds: dict[int, int] = {}          # id(arena) -> its segment's fd, kept open
        self._library_msgs: dict[str, RegisterLibrary] = {}  # digest -> how it was registered
        self._resident_arrays: dict[str, tuple[np.ndarray, bytes]] = {}  # digest hex -> (array, digest)

    # -- reconnecting (what the sync and asyncio clients share) ------------------------------------
    def new_session(self, welcome: Welcome) -> None:
        """A new session after a lost one: nothing of the old may be used on it (its prepared
        handles, its arena ids in located bindings, its handles waiting to be released, its ring
        record layouts)."""
        self.session, self.tenant, self.devices = welcome.session, welcome.tenant, welcome.devices
        self.max_frame = welcome.max_frame
        self._arena_gen += 1
        self.forget_prepared()
        self._unused.clear()
        self._run_structs.clear()
        self._ignored.clear()

    def remember_library(self, lib: Library, msg: RegisterLibrary) -> None:
        """With reconnect: how ``lib`` was registered (most recent last; a bounded record)."""
        if self.reconnect:
            self._library_msgs.pop(lib.digest, None)
            self._library_msgs[lib.digest] = msg
            while len(self._library_msgs) > REMEMBERED_LIBRARIES:
                del self._library_msgs[next(iter(self._library_msgs))]

    def remember_resident(self, res: Resident, arr: np.ndarray, msg: PutResident) -> None:
        if self.reconnect:
            self._resident_arrays[res.digest] = (arr, msg.digest)

    def libraries_again(self) -> list[tuple[str, RegisterLibrary]]:
        """The registrations to send again on a new session, by digest."""
        return [(digest, RegisterLibrary(self.next_req(), m.format, m.data, m.kernels, m.name, m.options))
                for digest, m in list(self._library_msgs.items())]

    def residents_again(self) -> list[tuple[str, PutResident | None]]:
        """The residents to put again, by digest; None for one whose bytes changed since (or whose
        arena is gone): it is forgotten, and its graphs get unknown_resident."""
        out: list[tuple[str, PutResident | None]] = []
        for key, (arr, raw) in list(self._resident_arrays.items()):
            try:
                out.append((key, self.resident_msg(arr) if digest_of(arr) == raw else None))
            except errors.KaasError:
                out.append((key, None))
        return out

    @staticmethod
    def hello(client: str, token: str | None = None) -> Hello:
        """The handshake; ``token`` (default ``$KAAS_TOKEN``) names a job where many share a uid."""
        return Hello(PROTOCOL_VERSION, client, os.environ.get("KAAS_TOKEN", "") if token is None else token)

    def next_req(self) -> int:
        self._req += 1
        return self._req

    def _check_open(self) -> None:
        if self.closed:
            raise errors.SessionClosed("client is closed")

    # -- arenas ------------------------------------------------------------------------------
    def register_arena_msg(self, size: int) -> RegisterArena:
        return RegisterArena(self.next_req(), size)

    def locate(self, arr: np.ndarray) -> tuple[int, int]:
        for a in self._arenas:
            off = a.locate(arr)
            if off is not None:
                if a.closed:
                    raise errors.ArenaClosed(f"array lies in arena {a.id}, which is closed")
                return a.id, off
        addr = int(arr.__array_interface__["data"][0])
        for base, size, aid in self._released:
            if base <= addr < base + size:
                raise errors.ArenaClosed(f"array lies in arena {aid}, which is closed")
        raise errors.InvalidArgument("array does not lie in an arena of this client "
                                     "(make it with client.array() or arena.array())")

    def release_arena_msg(self, arena: Arena) -> ReleaseArena:
        self._arena_gen += 1
        self._arenas.remove(arena)
        self._released.append((arena.base, arena.size, arena.id))
        return ReleaseArena(self.next_req(), arena.id)

    # -- libraries and residents -------------------------------------------------------------
    def library_msg(self, code: str | bytes, kernels: KernelsArg, fmt: str | None, name: str,
                    options: Sequence[str], access: AccessArg = None,
                    hosts: Mapping[str, str] | None = None) -> RegisterLibrary:
        fmt, data = detect_format(code, fmt)
        specs = resolve_kernels(fmt, data, kernels, access=access, hosts=hosts, arch=self.arch, options=options)
        return RegisterLibrary(self.next_req(), fmt, data, specs, name, tuple(options))

    @staticmethod
    def library_result(msg: RegisterLibrary, reply: BrokerMessage) -> Library:
        raise_if_error(reply)
        assert isinstance(reply, LibraryRegistered)
        return Library(reply.library, msg.name, {k.name: k for k in msg.kernels}, reply.cached, reply.log)

    def resident_msg(self, arr: np.ndarray) -> PutResident:
        arena, off = self.locate(arr)
        return PutResident(self.next_req(), arena, off, arr.nbytes, digest_of(arr))

    @staticmethod
    def resident_result(arr: np.ndarray, reply: BrokerMessage) -> Resident:
        raise_if_error(reply)
        assert isinstance(reply, ResidentRegistered)
        return Resident(reply.resident, arr.nbytes, arr.dtype.name, tuple(arr.shape), reply.cached)

    # -- graphs ------------------------------------------------------------------------------
    def prepared_handle(self, graph: Graph) -> int | None:
        """The broker's handle for ``graph`` as it is now, or None when it must be prepared (again)."""
        entry = self._handles.get(graph)
        if entry is None:
            return None
        if entry[0] == graph.version:
            return entry[1]
        entry[2].detach()
        del self._handles[graph]
        self._unused.append(entry[1])
        return None

    def prepare_msg(self, graph: Graph) -> PrepareGraph:
        return PrepareGraph(self.next_req(), graph.spec(self.locate))

    def prepared(self, graph: Graph, version: int, reply: BrokerMessage) -> int:
        raise_if_error(reply)
        assert isinstance(reply, GraphPrepared)
        old = self._handles.get(graph)
        if old is not None:
            old[2].detach()
            self._unused.append(old[1])
        self._run_structs[reply.handle] = run_struct(reply.slices // 2, reply.literals)
        fin = weakref.finalize(graph, self._unused.append, reply.handle)
        fin.atexit = False
        self._handles[graph] = (version, reply.handle, fin)
        return reply.handle

    def forget_prepared(self) -> None:
        """Prepare every graph again on its next run (after its residents changed)."""
        for _, handle, fin in list(self._handles.values()):
            fin.detach()
            self._unused.append(handle)
        self._handles.clear()

    def release_msgs(self) -> list[ReleaseGraph]:
        """ReleaseGraph for every handle no graph uses any more; nobody waits for their replies."""
        out = []
        while self._unused:
            msg = ReleaseGraph(self.next_req(), self._unused.pop())
            self._run_structs.pop(msg.handle, None)
            self._ignored.add(msg.req)
            out.append(msg)
        return out

    def _bindings(self, graph: Graph, timeout: float | None) -> tuple[tuple[int, ...], tuple[int | float, ...], float]:
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise errors.InvalidArgument(f"timeout must be a finite number of seconds > 0, got {timeout}")
        slices, values = graph.bindings(self.locate, (id(self), self._arena_gen))
        return slices, values, float(timeout or 0.0)

    def run_prepared_msg(self, graph: Graph, handle: int, timeout: float | None, trace: bool = False) -> RunPrepared:
        return RunPrepared(self.next_req(), handle, *self._bindings(graph, timeout), trace)

    def run_record(self, graph: Graph, handle: int, timeout: float | None, trace: bool,
                   max_payload: int) -> tuple[int, bytes] | None:
        """``(req, ring record)`` of a run of prepared ``graph``, or None if it does not fit a slot."""
        st = self._run_structs.get(handle)
        if st is None or st.size > max_payload:
            return None
        slices, values, limit = self._bindings(graph, timeout)
        req = self.next_req()
        return req, encode_run(st, req, handle, slices, values, limit, trace=trace)

    @staticmethod
    def run_result(reply: BrokerMessage, sent: float, received: float) -> RunResult:
        raise_if_error(reply)
        assert isinstance(reply, GraphDone)
        trace = (sent, *reply.trace, received) if reply.trace else ()
        return RunResult(reply.device, reply.timings, received - sent, trace)

    @staticmethod
    def prefetched(reply: BrokerMessage) -> str:
        raise_if_error(reply)
        assert isinstance(reply, Prefetched)
        return reply.device

    @staticmethod
    def arena_id(reply: BrokerMessage) -> int:
        raise_if_error(reply)
        assert isinstance(reply, ArenaRegistered)
        return reply.arena

    @staticmethod
    def wait_limit(timeout: float | None, default: float | None) -> float | None:
        return timeout + REPLY_GRACE if timeout else default

    def info(self) -> dict[str, Any]:
        return {"session": self.session, "tenant": self.tenant, "devices": list(self.devices)}
