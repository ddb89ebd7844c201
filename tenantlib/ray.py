"""kaas graphs from Ray: ``submit`` from any task or driver, placed on the node whose broker already
holds the graph's residents; ``run_local`` inside a task, on its own node's broker, with no Ray hop.

Each GPU node runs its kaas broker (systemd) and joins Ray with no GPUs of Ray's own (the broker
owns them) and a label naming the broker's socket::

    ray start --address HEAD:6379 --num-gpus=0 --resources='{"kaas": 1}' \\
              --labels='{"kaas-socket": "/run/kaas/broker.sock"}'

A graph for Ray is data (``GraphSpec``: libraries, buffers, launches), so that it pickles and
can be built on whichever node runs it::

    spec = GraphSpec(libraries={"std": Source(kernels.SOURCE, kernels.KERNELS)},
                     buffers=(Buffer("W", "resident", (n, n)), Buffer("x", "in", (n, n)),
                              Buffer("y", "out", (n, n))),
                     launches=(Launch("std", "sgemm", grid, block, ("W", "x", "y", n, n, n)),))
    kc = KaasCluster()                      # one per driver: a proxy actor per kaas node
    ref = kc.submit(spec, inputs={"x": x}, residents={"W": w_ref})   # -> ObjectRef of {"y": array}

Inputs and residents are numpy arrays or object references.  A resident is named by its object
reference (or, for an array, its content digest), and ``submit`` sends each request to the node
where it expects it to finish first: the requests already waiting there, plus the time to load
the residents that node lacks.  The proxies (``NodeProxy``, one per node, pinned to it) hold the
broker connection, the registered libraries and residents, and a pool of built graphs whose
arena buffers are reused from request to request.  A node that dies fails its requests in flight
with Ray's typed errors (``RayActorError``), a broker that goes away fails them with
``SessionClosed`` (or ``BrokerUnavailable`` when it cannot be reached at all); either node is left out of placement from the next look at the cluster
(every ``refresh_every`` seconds, or ``refresh()``).

Where many jobs share the Ray workers' uid, each job presents a token (``$KAAS_TOKEN``, or
``token=``) that the brokers' config maps to its tenant (``kaasctl token``).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker import errors
from broker.protocol import KernelSpec

from ._core import digest_of
from .graph import Graph

__all__ = ["LABEL", "Buffer", "GraphSpec", "KaasCluster", "Launch", "NodeProxy", "Source", "run_local"]

LABEL = "kaas-socket"          # the node label naming its broker's socket
KINDS = ("in", "out", "inout", "temp", "resident")
POOL = 8                       # built graphs kept per spec and node (requests of one spec at once)
MAX_SPECS = 64                 # specs a proxy keeps built graphs for (least recently used go)
MAX_KEYS = 4096                # residents a proxy remembers by key
DEFAULT_BANDWIDTH = 2e9        # bytes/s assumed for loading a resident a node lacks, until measured


@dataclass(frozen=True)
class Source:
    """A library: CUDA C source (or CUBIN / PTX / fatbin bytes) and the kernels it holds."""

    code: str | bytes
    kernels: tuple[KernelSpec, ...]
    format: str | None = None
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Buffer:
    name: str
    kind: str  # in | out | inout | temp | resident
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Launch:
    """One kernel launch; in ``args`` a str names a buffer of the spec, a number is a literal."""

    library: str
    kernel: str
    grid: int | tuple[int, ...]
    block: int | tuple[int, ...]
    args: tuple[str | int | float, ...]
    shared: int = 0


@dataclass(frozen=True)
class GraphSpec:
    """A kernel graph as data: what ``submit`` sends and every node builds the same way."""

    libraries: Mapping[str, Source]
    buffers: tuple[Buffer, ...]
    launches: tuple[Launch, ...]
    key: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        names = [b.name for b in self.buffers]
        if len(set(names)) != len(names):
            raise errors.InvalidArgument(f"graph spec: buffer names repeat: {sorted(names)}")
        for b in self.buffers:
            if b.kind not in KINDS:
                raise errors.InvalidArgument(f"graph spec: buffer {b.name!r} has kind {b.kind!r}, "
                                             f"not one of {', '.join(KINDS)}")
            np.dtype(b.dtype)  # raises TypeError for what numpy does not know
        for i, ln in enumerate(self.launches):
            if ln.library not in self.libraries:
                raise errors.InvalidArgument(f"graph spec: launch {i} names library {ln.library!r}, not one of "
                                             f"{sorted(self.libraries)}")
            for a in ln.args:
                if isinstance(a, str) and a not in names:
                    raise errors.InvalidArgument(f"graph spec: launch {i} ({ln.kernel}) names buffer {a!r}, "
                                                 "which the spec does not have")
        if not self.launches:
            raise errors.InvalidArgument("graph spec: no launches")
        object.__setattr__(self, "key", hashlib.sha256(repr((sorted(self.libraries.items()), self.buffers,
                                                             self.launches)).encode()).hexdigest())

    def of(self, *kinds: str) -> tuple[Buffer, ...]:
        return tuple(b for b in self.buffers if b.kind in kinds)


def resident_key(value: Any) -> str:
    """How a resident is known across the cluster: its object reference, or an array's content
    (as tenantlib names residents)."""
    hex_ = getattr(value, "hex", None)
    if callable(hex_) and not isinstance(value, np.ndarray):
        return f"ref:{hex_()}"
    return "blake2b:" + digest_of(np.asarray(value)).hex()


def _check_values(spec: GraphSpec, inputs: Mapping[str, Any], residents: Mapping[str, Any]) -> None:
    want_in = {b.name for b in spec.of("in", "inout")}
    want_res = {b.name for b in spec.of("resident")}
    if set(inputs) != want_in:
        raise errors.InvalidArgument(f"inputs must be exactly {sorted(want_in)}, got {sorted(inputs)}")
    if set(residents) != want_res:
        raise errors.InvalidArgument(f"residents must be exactly {sorted(want_res)}, got {sorted(residents)}")


def _array(b: Buffer, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.shape != b.shape or arr.dtype != np.dtype(b.dtype):
        raise errors.InvalidArgument(f"buffer {b.name!r} is {b.shape} {b.dtype}, got {arr.shape} {arr.dtype}")
    return arr


# -- building a spec on a client ------------------------------------------------------------------
@dataclass
class _Built:
    graph: Graph
    arrays: dict[str, np.ndarray]  # in / out / inout buffers, views into ``arena``
    arena: Any                     # one arena of the node's broker per built graph, closed when it goes


def _arena_bytes(spec: GraphSpec) -> int:
    return max(1, sum(-(-b.nbytes // 256) * 256 for b in spec.of("in", "out", "inout")))


def _carve(spec: GraphSpec, arena: Any) -> dict[str, np.ndarray]:
    return {b.name: arena.array(b.shape, b.dtype) for b in spec.of("in", "out", "inout")}


def _graph(spec: GraphSpec, libs: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
           residents: Mapping[str, Any]) -> Graph:
    g = Graph()
    refs: dict[str, Any] = {}
    for b in spec.buffers:
        if b.kind == "in":
            refs[b.name] = g.input(arrays[b.name])
        elif b.kind == "out":
            refs[b.name] = g.output(arrays[b.name])
        elif b.kind == "inout":
            refs[b.name] = g.inout(arrays[b.name])
        elif b.kind == "temp":
            refs[b.name] = g.temp(b.shape, np.dtype(b.dtype))
        else:
            refs[b.name] = g.resident(residents[b.name])
    for ln in spec.launches:
        g.kernel(libs[ln.library], ln.kernel, grid=ln.grid, block=ln.block, shared=ln.shared,
                 args=[refs[a] if isinstance(a, str) else a for a in ln.args])
    return g


class _Cache:
    """Per session: libraries, residents by key, and built graphs per (spec, residents) in pools.

    A built graph is taken for one run and given back only after that run succeeded; one that is
    dropped (its pool full, its spec evicted, its run failed) has its arena closed, and residents
    evicted from the bounded list are handed back (``dropped``): nothing stays registered unused.
    """

    def __init__(self) -> None:
        self.libs: dict[tuple[str, str], Any] = {}
        self.residents: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.pools: collections.OrderedDict[tuple[str, tuple[str, ...]], list[_Built]] = collections.OrderedDict()
        self.dropped: list[Any] = []  # residents to release (by the client that owns them)

    def take(self, spec: GraphSpec, keys: tuple[str, ...]) -> _Built | None:
        pool = self.pools.get((spec.key, keys))
        if pool:
            self.pools.move_to_end((spec.key, keys))
            return pool.pop()
        return None

    def give(self, spec: GraphSpec, keys: tuple[str, ...], built: _Built) -> None:
        pool = self.pools.setdefault((spec.key, keys), [])
        if len(pool) < POOL:
            pool.append(built)
        else:
            built.arena.close()
        while len(self.pools) > MAX_SPECS:
            for b in self.pools.popitem(last=False)[1]:
                b.arena.close()

    def remember(self, key: str, res: Any) -> None:
        self.residents[key] = res
        self.residents.move_to_end(key)
        while len(self.residents) > MAX_KEYS:
            self.dropped.append(self.residents.popitem(last=False)[1])


def _outputs(spec: GraphSpec, built: _Built) -> dict[str, np.ndarray]:
    return {b.name: built.arrays[b.name].copy() for b in spec.of("out", "inout")}


def _fill(spec: GraphSpec, built: _Built, inputs: Mapping[str, Any]) -> None:
    for b in spec.of("in", "inout"):
        built.arrays[b.name][...] = _array(b, inputs[b.name])


# -- the proxy on each node -----------------------------------------------------------------------
class NodeProxy:
    """One node's broker connection for this job (a Ray actor pinned to the node; asyncio, so that
    many requests are in flight at once).  ``KaasCluster`` starts one per node."""

    def __init__(self, socket: str, token: str | None, node: str) -> None:
        self.socket, self.token, self.node = socket, token, node
        self.client: Any = None
        self.cache = _Cache()
        self._connecting: asyncio.Lock | None = None
        self.hits = self.misses = 0  # requests whose residents this node held already, or not

    async def _client(self) -> Any:
        from .aio import connect_async

        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self.client is None or self.client.closed:
                self.client = await connect_async(self.socket, client=f"tenantlib.ray:{self.node[:8]}",
                                                  token=self.token)
                self.cache = _Cache()  # a new session holds nothing of the old one
        return self.client

    async def info(self) -> dict[str, Any]:
        """The broker's identity, queue and health, and which of this job's residents (by key) it
        holds on a device now."""
        c = await self._client()
        st = await c.status()
        on_device = {r["digest"] for r in st["residents"] if r["devices"]}
        return {"node": self.node, "broker": st["broker"], "queued": st["queued"], "healthy": st["healthy"],
                "residents": [k for k, r in self.cache.residents.items() if r.digest in on_device],
                "hits": self.hits, "misses": self.misses}

    async def _resident(self, c: Any, cache: _Cache, key: str, value: Any) -> tuple[Any, bool]:
        """This node's resident for ``key`` (registered from ``value`` the first time); and whether
        it was held already."""
        r = cache.residents.get(key)
        if r is not None:
            cache.residents.move_to_end(key)
            return r, True
        arr = np.asarray(await value if not isinstance(value, np.ndarray) else value)
        with await c.arena(max(1, arr.nbytes)) as staging:  # the broker keeps its own copy
            view = staging.array(arr.shape, arr.dtype)
            view[...] = arr
            r = await c.resident(view)
        cache.remember(key, r)
        return r, False

    async def prefetch(self, key: str, value: Any, device: str = "") -> str:
        """Register the resident ``key`` here (from ``value``) and put it on a device now."""
        c = await self._client()
        r, _ = await self._resident(c, self.cache, key, value)
        return str(await c.prefetch(r, device))

    async def _library(self, c: Any, cache: _Cache, name: str, src: Source) -> Any:
        key = (name, hashlib.sha256(src.code.encode() if isinstance(src.code, str) else src.code).hexdigest())
        lib = cache.libs.get(key)
        if lib is None:
            lib = cache.libs[key] = await c.library(src.code, kernels=list(src.kernels), format=src.format,
                                                    options=src.options, name=name)
        return lib

    async def run(self, spec: GraphSpec, inputs: Mapping[str, Any], residents: Mapping[str, tuple[str, Any]],
                  timeout: float | None = None) -> dict[str, np.ndarray]:
        """Run ``spec`` here: ``residents`` maps each resident buffer to (key, array or object
        reference); a reference is fetched only when this node does not hold its key yet."""
        c = await self._client()
        cache = self.cache  # this session's: a reconnect meanwhile starts another
        res: dict[str, Any] = {}
        held = True
        for b in spec.of("resident"):
            key, value = residents[b.name]
            res[b.name], had = await self._resident(c, cache, key, value)
            if (tuple(res[b.name].shape), np.dtype(res[b.name].dtype)) != (b.shape, np.dtype(b.dtype)):
                raise errors.InvalidArgument(f"buffer {b.name!r} is {b.shape} {b.dtype}, resident {key[:24]} is "
                                             f"{res[b.name].shape} {res[b.name].dtype}")
            held = held and had
        self.hits += held
        self.misses += not held
        keys = tuple(residents[b.name][0] for b in spec.of("resident"))
        built = cache.take(spec, keys)
        if built is None:
            libs = {name: await self._library(c, cache, name, src) for name, src in spec.libraries.items()}
            arena = await c.arena(_arena_bytes(spec))
            arrays = _carve(spec, arena)
            built = _Built(_graph(spec, libs, arrays, res), arrays, arena)
        ok = False
        try:
            _fill(spec, built, {k: (await v if not isinstance(v, np.ndarray) else v) for k, v in inputs.items()})
            await c.run(built.graph, timeout=timeout)
            ok = True
            return _outputs(spec, built)
        finally:
            # Only a run that ended is done with its arrays: after a timeout or a cancel the broker may
            # still write them, so the graph is not reused (its arena is released once it is idle).
            if ok and cache is self.cache and not c.closed:
                cache.give(spec, keys, built)
            else:
                built.arena.close()
            for r in cache.dropped:
                await c.release_resident(r)
            cache.dropped.clear()


# -- the driver's side: placement ----------------------------------------------------------------
@dataclass
class _Node:
    node: str
    socket: str
    proxy: Any
    alive: bool = True
    outstanding: int = 0
    queued: int = 0
    service: float = 0.005  # seconds per request there (moving average)
    held: set[str] = field(default_factory=set)  # resident keys it holds (what this driver knows)
    recent: set[str] = field(default_factory=set)  # keys sent there since the last refresh asked
    requests: int = 0
    hits: int = 0


class KaasCluster:
    """This driver's view of the kaas nodes of the Ray cluster, and the placement of requests.

    Nodes are the alive Ray nodes labelled ``kaas-socket``; a proxy actor is started on each,
    pinned to it.  ``submit`` picks the node with the lowest expected finish: the requests this
    driver has waiting there (and the broker's own queue, as last reported) times the node's
    time per request, plus the bytes of the residents it lacks over ``bandwidth``.
    """

    def __init__(self, *, token: str | None = None, bandwidth: float = DEFAULT_BANDWIDTH,
                 refresh_every: float = 10.0) -> None:
        self.token = token if token is not None else os.environ.get("KAAS_TOKEN")
        self.bandwidth = bandwidth
        self.refresh_every = refresh_every  # seconds between looks at the cluster (new nodes, evictions)
        self.nodes: dict[str, _Node] = {}
        self._lock = threading.Lock()
        self._refreshing = False
        self._flight: dict[Any, tuple[_Node, float]] = {}  # submitted, not seen ending: (node, when)
        self._reaping = False
        self.refresh()

    def refresh(self) -> None:
        """Find kaas nodes that joined, drop the dead, and ask each broker what it holds."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._refreshed = time.monotonic()
        found = {n["NodeID"]: str(n["Labels"][LABEL]) for n in ray.nodes()
                 if n.get("Alive") and (n.get("Labels") or {}).get(LABEL)}
        with self._lock:
            for nid, sock in found.items():
                if nid not in self.nodes or not self.nodes[nid].alive:
                    actor = ray.remote(num_cpus=0)(NodeProxy).options(
                        scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False), max_concurrency=256,
                        max_restarts=0).remote(sock, self.token, nid)
                    self.nodes[nid] = _Node(nid, sock, actor)
            for nid, node in self.nodes.items():
                if nid not in found:
                    node.alive = False
                node.recent = set()
            asked = {nid: n.proxy.info.remote() for nid, n in list(self.nodes.items()) if n.alive}
        for nid, ref in asked.items():
            try:
                info = ray.get(ref, timeout=60)
            except Exception:  # the node or its broker is gone
                info = None
            with self._lock:
                node = self.nodes[nid]
                if info is None:
                    node.alive = False
                    continue
                # What the broker holds on a device now, and what was sent there since we asked.
                node.queued, node.held = int(info["queued"]), set(info["residents"]) | node.recent
                if not info["healthy"]:
                    node.queued += 1000  # a broker replacing a device worker: elsewhere if we can
        with self._lock:
            alive = any(n.alive for n in self.nodes.values())
        if not alive:
            raise errors.NoDevice(f"no alive Ray node is labelled {LABEL!r} (see tenantlib.ray for `ray start`)")

    def _choose(self, needs: Mapping[str, int]) -> _Node:
        best, best_cost = None, 0.0
        for n in self.nodes.values():
            if not n.alive:
                continue
            missing = sum(size for key, size in needs.items() if key not in n.held)
            cost = (n.outstanding + n.queued) * n.service + missing / self.bandwidth
            if best is None or cost < best_cost:
                best, best_cost = n, cost
        if best is None:
            raise errors.NoDevice("every kaas node of the cluster is gone")
        return best

    def submit(self, spec: GraphSpec, *, inputs: Mapping[str, Any] | None = None,
               residents: Mapping[str, Any] | None = None, timeout: float | None = None,
               node: str | None = None) -> Any:
        """Run ``spec`` on the node expected to finish it first (or on ``node``, a Ray node id); an
        ObjectRef of its outputs (``{name: array}`` for every ``out`` and ``inout`` buffer)."""
        inputs, residents = dict(inputs or {}), dict(residents or {})
        _check_values(spec, inputs, residents)
        self._maybe_refresh()
        keyed = {name: (resident_key(v), v) for name, v in residents.items()}
        sizes = {b.name: b.nbytes for b in spec.of("resident")}
        needs = {key: sizes[name] for name, (key, _) in keyed.items()}
        with self._lock:
            pinned = self.nodes.get(node) if node is not None else None
            if node is not None:
                if pinned is None or not pinned.alive:
                    raise errors.InvalidArgument(f"node {node!r} is not an alive kaas node of this cluster "
                                                 f"(alive: {sorted(k for k, n in self.nodes.items() if n.alive)})")
            where: _Node = pinned if pinned is not None else self._choose(needs)
        started = time.monotonic()
        ref = where.proxy.run.remote(spec, inputs, keyed, timeout)  # raises (unpicklable inputs): nothing counted
        with self._lock:
            where.requests += 1
            where.hits += all(k in where.held for k in needs)
            where.outstanding += 1
            where.held.update(needs)  # it will hold them once this request ran
            where.recent.update(needs)
            self._flight[ref] = (where, started)
            if not self._reaping:  # ObjectRef.future() would cost a round trip of its own per request
                self._reaping = True
                threading.Thread(target=self._reap, name="kaas-ray-reaper", daemon=True).start()
        return ref

    def prefetch(self, value: Any, *, node: str | None = None, device: str = "") -> Any:
        """Put a resident (an array or object reference) on ``node`` (default: the least busy) ahead
        of the requests that will use it; an ObjectRef of the device it went to."""
        key = resident_key(value)
        with self._lock:
            alive = [n for n in self.nodes.values() if n.alive]
            where = self.nodes.get(node) if node is not None else min(alive, key=lambda n: n.outstanding + n.queued,
                                                                       default=None)
            if where is None or not where.alive:
                raise errors.InvalidArgument(f"node {node!r} is not an alive kaas node of this cluster")
            where.held.add(key)
            where.recent.add(key)
        return where.proxy.prefetch.remote(key, value, device)

    def _maybe_refresh(self) -> None:
        """A look at the cluster in the background every ``refresh_every`` seconds."""
        if self._refreshing or time.monotonic() - self._refreshed < self.refresh_every:
            return
        self._refreshing = True

        def run() -> None:
            try:
                self.refresh()
            except errors.KaasError:
                pass  # no node left: the next submit says so
            finally:
                self._refreshing = False

        threading.Thread(target=run, name="kaas-ray-refresh", daemon=True).start()

    def _reap(self) -> None:
        """Notice requests ending (without fetching their outputs): each node's count of requests
        waiting there and its time per request.  A node that died is left out at the next refresh."""
        import ray

        while True:
            with self._lock:
                refs = list(self._flight)
                if not refs:
                    self._reaping = False
                    return
            try:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.01, fetch_local=False)
            except Exception:  # Ray shutting down: the next submit starts another reaper
                with self._lock:
                    self._reaping = False
                return
            now = time.monotonic()
            with self._lock:
                for ref in ready:
                    node, started = self._flight.pop(ref)
                    node.outstanding -= 1
                    node.service = 0.8 * node.service + 0.2 * (now - started)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per node: requests sent, how many this driver expected to find their residents there
        (``hits``), alive."""
        with self._lock:
            return {nid: {"requests": n.requests, "hits": n.hits, "alive": n.alive, "socket": n.socket}
                    for nid, n in self.nodes.items()}


# -- inside a task: the local broker, no Ray hop ----------------------------------------------------
_local: dict[str, tuple[Any, _Cache]] = {}  # job token -> this process's session and its cache
_local_lock = threading.Lock()


def _fetch(value: Any) -> Any:
    """An array, or the object an ObjectRef names (fetched into this process)."""
    if isinstance(value, np.ndarray) or not callable(getattr(value, "hex", None)):
        return value
    import ray

    return ray.get(value)


def _local_socket() -> str:
    sock = os.environ.get("KAAS_SOCKET")
    if sock:
        return sock
    import ray

    here = ray.get_runtime_context().get_node_id()
    for n in ray.nodes():
        if n["NodeID"] == here and (n.get("Labels") or {}).get(LABEL):
            return str(n["Labels"][LABEL])
    raise errors.BrokerUnavailable(f"this node is not labelled {LABEL!r} and $KAAS_SOCKET is not set")


def run_local(spec: GraphSpec, *, inputs: Mapping[str, Any] | None = None,
              residents: Mapping[str, Any] | None = None, timeout: float | None = None,
              token: str | None = None) -> dict[str, np.ndarray]:
    """Run ``spec`` on this node's broker from inside a task (or any process): no Ray hop, one
    connection and a pool of built graphs per process.  Inputs and residents are arrays or object
    references; a resident given by reference is fetched only when this process does not hold it
    (an array is named by its content, which costs a hash of it on every call)."""
    return _run_local(spec, inputs, residents, timeout, token)[0]


def _run_local(spec: GraphSpec, inputs: Mapping[str, Any] | None, residents: Mapping[str, Any] | None,
               timeout: float | None, token: str | None) -> tuple[dict[str, np.ndarray], bool]:
    """``run_local``, and whether this process held every resident already (for ``kaas-bench cluster``)."""
    from .client import connect

    inputs, residents = dict(inputs or {}), dict(residents or {})
    _check_values(spec, inputs, residents)
    who = token if token is not None else os.environ.get("KAAS_TOKEN", "")
    with _local_lock:
        c, cache = _local.get(who, (None, None))
        if c is None or c.closed or cache is None:  # one session per process and job token
            c = connect(_local_socket(), client="tenantlib.ray.local", token=who)
            cache = _Cache()
            _local[who] = (c, cache)
        res = {}
        held = True
        keys = tuple(resident_key(residents[b.name]) for b in spec.of("resident"))
        for b, key in zip(spec.of("resident"), keys, strict=True):
            r = cache.residents.get(key)
            held = held and r is not None
            if r is None:
                arr = _array(b, _fetch(residents[b.name]))  # an object reference is fetched only now
                with c.arena(max(1, arr.nbytes)) as staging:  # the broker keeps its own copy
                    view = staging.array(arr.shape, arr.dtype)
                    view[...] = arr
                    r = c.resident(view)
                cache.remember(key, r)
            res[b.name] = r
        built = cache.take(spec, keys)
        if built is None:
            libs = {}
            for name, src in spec.libraries.items():
                lkey = (name, hashlib.sha256(src.code.encode() if isinstance(src.code, str) else src.code).hexdigest())
                if lkey not in cache.libs:
                    cache.libs[lkey] = c.library(src.code, kernels=list(src.kernels), format=src.format,
                                                 options=src.options, name=name)
                libs[name] = cache.libs[lkey]
            arena = c.arena(_arena_bytes(spec))
            arrays = _carve(spec, arena)
            built = _Built(_graph(spec, libs, arrays, res), arrays, arena)
        ok = False
        try:
            _fill(spec, built, {k: _fetch(v) for k, v in inputs.items()})
            c.run(built.graph, timeout=timeout)
            ok = True
            return _outputs(spec, built), held
        finally:
            if ok:
                cache.give(spec, keys, built)
            else:  # the broker may still write its arrays: not reused
                built.arena.close()
            for r in cache.dropped:
                c.release_resident(r)
            cache.dropped.clear()

