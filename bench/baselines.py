"""The baselines of ``kaas-bench contention``: what a user does without kaas.

- ``DirectRunner``: one tenant's workload on its own CUDA context, launched straight through
  ``cuda.bindings`` as a careful user would write it: device buffers allocated once, pinned
  host buffers, weights uploaded once, then per request copy in, launch, copy out, synchronise.
  N processes of it are the ``own-context`` mode (time-sliced contexts); under ``MpsDaemon``
  they are the ``mps`` mode.
- ``ExclusivePool``: static allocation. A fixed pool of one worker per GPU, each owned by one
  tenant at a time; a request of another tenant replaces the worker (a fresh process and
  context: a cold start), as when tenants outnumber GPUs.

Everything that touches CUDA runs in child processes: ``probe`` (``python -m bench.baselines``)
reports the devices without creating a context.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tools import workloads

__all__ = ["CONTEXT_BYTES", "MPS_MAX_CLIENTS", "DirectRunner", "ExclusivePool", "ExclusiveStats", "MpsDaemon", "MpsUnavailable",
           "probe"]

# MPS serves at most this many client processes per GPU (Volta and later); one more gets
# CUDA_ERROR_MPS_MAX_CLIENTS_REACHED (seen on the H100).
MPS_MAX_CLIENTS = 48

# Device memory a process's own CUDA context takes before any allocation (H100, CUDA 13, lazy
# module loading): an estimate for the memory guard, not a measurement of this run.
CONTEXT_BYTES = 512 << 20

_SLOT = {"buf": "Q", "i32": "i4x", "u32": "I4x", "f32": "f4x", "i64": "q", "u64": "Q", "f64": "d"}


class CudaFailure(RuntimeError):
    """A driver call of a baseline failed; the message names the call and the CUDA error."""


def _driver() -> Any:
    from cuda.bindings import driver

    return driver


def _ok(result: tuple[Any, ...], what: str) -> Any:
    """The value of a cuda.bindings call, or CudaFailure naming ``what`` and the error."""
    err = result[0]
    if int(err):
        d = _driver()
        name = d.cuGetErrorName(err)
        raise CudaFailure(f"{what} failed: {bytes(name[1]).decode() if not int(name[0]) else int(err)}")
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


# -- devices --------------------------------------------------------------------------------
def probe() -> dict[str, Any]:
    """The CUDA devices of this machine (count, name, memory, arch of the first), without a context."""
    d = _driver()
    _ok(d.cuInit(0), "cuInit")
    count = int(_ok(d.cuDeviceGetCount(), "cuDeviceGetCount"))
    if count < 1:
        raise CudaFailure("no CUDA device")
    dev = _ok(d.cuDeviceGet(0), "cuDeviceGet")
    attr = d.CUdevice_attribute
    major = _ok(d.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "attribute")
    minor = _ok(d.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "attribute")
    name = bytes(_ok(d.cuDeviceGetName(256, dev), "cuDeviceGetName")).split(b"\0", 1)[0].decode().strip()
    return {"count": count, "name": name, "memory": int(_ok(d.cuDeviceTotalMem(dev), "cuDeviceTotalMem")),
            "arch": f"sm_{major}{minor}", "driver": int(_ok(d.cuDriverGetVersion(), "cuDriverGetVersion"))}


def probe_in_child(timeout: float = 120.0) -> dict[str, Any] | str:
    """``probe()`` in a child process (this one never touches the driver): a dict, or why not."""
    try:
        out = subprocess.run([sys.executable, "-m", "bench.baselines", "probe"], capture_output=True, text=True,
                             timeout=timeout, cwd=Path(__file__).resolve().parent.parent)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"probing CUDA failed: {exc}"
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        why = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        return f"no usable CUDA device ({why})"
    info: dict[str, Any] = json.loads(lines[-1])
    return info


# -- one tenant on its own context ----------------------------------------------------------
@dataclass(eq=False)
class _Launch:
    function: Any
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: Any  # ctypes buffer: one 8-byte slot per parameter
    slots: Any  # the pointers to the slots, what cuLaunchKernel reads
    params: int


class DirectRunner:
    """One tenant's ``plan`` on this process's own CUDA context (the primary context of ``device``).

    ``values`` holds the host arrays (pinned) of its inputs, outputs and residents, as
    ``workloads.materialize`` makes them; ``run()`` is one request, synchronous.
    """

    def __init__(self, plan: workloads.Plan, cubin: bytes, *, device: int = 0, seed: int = 0) -> None:
        from tenantlib import kernels

        d = self._d = _driver()
        self.plan = plan
        self._host: list[int] = []
        self._dev: dict[str, int] = {}
        self._module: Any = None
        _ok(d.cuInit(0), "cuInit")
        self._device = _ok(d.cuDeviceGet(device), f"cuDeviceGet({device})")
        self._ctx = _ok(d.cuDevicePrimaryCtxRetain(self._device), "cuDevicePrimaryCtxRetain")
        try:
            _ok(d.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
            self._module = _ok(d.cuModuleLoadData(cubin), "cuModuleLoadData")
            self.stream = _ok(d.cuStreamCreateWithPriority(d.CUstream_flags.CU_STREAM_NON_BLOCKING, 0),
                              "cuStreamCreateWithPriority")
            for b in plan.buffers:
                self._dev[b.name] = int(_ok(d.cuMemAlloc(b.nbytes), f"cuMemAlloc({b.nbytes}) for {b.name}"))
            self.values = workloads.materialize(plan, self._pinned, np.random.default_rng(seed))
            for b in plan.of("resident"):  # uploaded once, as kaas keeps them resident
                _ok(d.cuMemcpyHtoD(self._dev[b.name], self.values[b.name].ctypes.data, b.nbytes), "upload")
            specs = {k.name: k for k in kernels.KERNELS}
            functions = {s.kernel: _ok(d.cuModuleGetFunction(self._module, s.kernel.encode()), s.kernel)
                         for s in plan.steps}
            self._launches = [self._pack(s, specs[s.kernel], functions[s.kernel]) for s in plan.steps]
            self._copy_in = [(self._dev[b.name], self.values[b.name].ctypes.data, b.nbytes) for b in plan.of("in")]
            self._copy_out = [(self.values[b.name].ctypes.data, self._dev[b.name], b.nbytes) for b in plan.of("out")]
            self.run()  # the module's first launch loads it on the device: not part of any request
        except BaseException:
            self.close()
            raise

    def _pinned(self, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        ptr = int(_ok(self._d.cuMemHostAlloc(max(4, 4 * n), 0), "cuMemHostAlloc"))
        self._host.append(ptr)
        return np.ctypeslib.as_array((ctypes.c_float * max(1, n)).from_address(ptr))[:n].reshape(shape)

    def _pack(self, step: workloads.Step, spec: Any, function: Any) -> _Launch:
        kinds = [p.kind for p in spec.params]
        values = [self._dev[a] if isinstance(a, str) else a for a in step.args]
        count = len(kinds)
        args = ctypes.create_string_buffer(8 * max(count, 1))
        struct.pack_into("<" + "".join(_SLOT[k] for k in kinds), args, 0, *values)
        first = ctypes.addressof(args)
        slots = (ctypes.c_void_p * count)(*(first + 8 * i for i in range(count))) if count else None
        return _Launch(function, step.grid, step.block, args, slots, ctypes.addressof(slots) if slots else 0)

    def run(self) -> None:
        """One request: inputs to the device, the kernels, outputs back; returns when they are in ``values``."""
        d, s = self._d, self.stream
        for dev, host, n in self._copy_in:
            err = d.cuMemcpyHtoDAsync(dev, host, n, s)[0]
            if int(err):
                _ok((err,), "cuMemcpyHtoDAsync")
        launch = d.cuLaunchKernel
        for ln in self._launches:
            g, b = ln.grid, ln.block
            err = launch(ln.function, g[0], g[1], g[2], b[0], b[1], b[2], 0, s, ln.params, 0)[0]
            if int(err):
                _ok((err,), "cuLaunchKernel")
        for host, dev, n in self._copy_out:
            err = d.cuMemcpyDtoHAsync(host, dev, n, s)[0]
            if int(err):
                _ok((err,), "cuMemcpyDtoHAsync")
        _ok(d.cuStreamSynchronize(s), "cuStreamSynchronize")

    def close(self) -> None:
        """Free what was allocated and release the context. Idempotent."""
        d = self._d
        for ptr in self._dev.values():
            d.cuMemFree(ptr)
        self._dev.clear()
        for ptr in self._host:
            d.cuMemFreeHost(ptr)
        self._host.clear()
        if self._module is not None:
            d.cuModuleUnload(self._module)
            self._module = None
        if self._ctx is not None:
            d.cuDevicePrimaryCtxRelease(self._device)
            self._ctx = None


# -- MPS ------------------------------------------------------------------------------------
class MpsUnavailable(RuntimeError):
    """The MPS daemon is absent or would not start: the ``mps`` mode is skipped with this reason."""


class MpsDaemon:
    """An NVIDIA MPS control daemon with private pipe and log directories, for this benchmark only.

    Clients reach it through ``env`` (CUDA_MPS_PIPE_DIRECTORY / CUDA_MPS_LOG_DIRECTORY); no other
    process of the machine sees it.  ``stop`` quits it and waits for it to go.
    """

    def __init__(self) -> None:
        self.exe = shutil.which("nvidia-cuda-mps-control")
        self.dir = ""
        self.env: dict[str, str] = {}
        self.pid = 0

    def start(self) -> MpsDaemon:
        if self.exe is None:
            raise MpsUnavailable("nvidia-cuda-mps-control is not on PATH")
        self.dir = tempfile.mkdtemp(prefix="kaas-mps-")
        pipe, log = os.path.join(self.dir, "pipe"), os.path.join(self.dir, "log")
        os.makedirs(pipe)
        os.makedirs(log)
        self.env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": pipe, "CUDA_MPS_LOG_DIRECTORY": log}
        try:
            r = subprocess.run([self.exe, "-d"], env=self.env, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            self._cleanup()
            raise MpsUnavailable(f"nvidia-cuda-mps-control -d could not run: {exc}") from None
        if r.returncode != 0:
            self._cleanup()
            raise MpsUnavailable(f"nvidia-cuda-mps-control -d exited {r.returncode}: "
                                 f"{(r.stderr or r.stdout).strip()[-300:]}")
        deadline = time.monotonic() + 10
        pidfile = Path(pipe, "nvidia-cuda-mps-control.pid")
        while time.monotonic() < deadline and not Path(pipe, "control").exists():
            time.sleep(0.05)
        if not Path(pipe, "control").exists():
            self.stop()
            raise MpsUnavailable(f"the MPS control daemon made no control pipe in {pipe}: {self.log_tail()}")
        try:
            self.pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            self.pid = 0
        return self

    def command(self, text: str, timeout: float = 30) -> str:
        """Send one command to the control daemon (``get_server_list``, ``quit``...); its answer."""
        if not self.env or self.exe is None:
            return ""
        r = subprocess.run([self.exe], input=text + "\n", env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        return r.stdout.strip()

    def log_tail(self, n: int = 5) -> str:
        try:
            lines = Path(self.env["CUDA_MPS_LOG_DIRECTORY"], "control.log").read_text().splitlines()
        except (OSError, KeyError):
            return "(no control.log)"
        return " | ".join(lines[-n:])

    def stop(self) -> None:
        """Quit the daemon (and its server), wait until it is gone, remove the directories. Idempotent."""
        if not self.env:
            return
        try:
            self.command("quit")
        except (OSError, subprocess.SubprocessError):
            pass
        control = Path(self.env["CUDA_MPS_PIPE_DIRECTORY"], "control")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (self._alive() or control.exists()):
            time.sleep(0.05)
        if self._alive():  # still there after quit: it was started here, so end it by its id
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
        self._cleanup()

    def _alive(self) -> bool:
        if not self.pid:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _cleanup(self) -> None:
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = ""
        self.env = {}
        self.pid = 0


# -- static allocation ----------------------------------------------------------------------
class Worker(Protocol):
    """A tenant's process owning one GPU: ``request`` runs one request, ``close`` ends the process."""

    def request(self, check: bool) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass
class ExclusiveStats:
    """What the pool saw in its window: latency (queue + cold start + run) per request finished there.

    The window is (``start``, ``end``) in monotonic seconds; ``steady`` is False when the cap
    closed it before every tenant had been served in it.
    """

    latencies: list[float] = field(default_factory=list)
    per_tenant: collections.Counter[int] = field(default_factory=collections.Counter)
    requests: int = 0
    cold_starts: list[float] = field(default_factory=list)
    checks: int = 0
    check_failures: int = 0
    errors: list[str] = field(default_factory=list)
    start: float | None = None
    end: float | None = None
    steady: bool = False


class ExclusivePool:
    """Static allocation: ``gpus`` workers, each owned by one tenant at a time, serving FCFS.

    ``tenants`` closed-loop tenants each keep one request queued; the next request in arrival
    order goes to the next free GPU, and if that GPU's worker belongs to another tenant the
    worker is ended and one for the requesting tenant started (``spawn``): a cold start that the
    request waits for.  There is no lease: with more tenants than GPUs every request switches.

    With N tenants a round takes N switches, so fixed short windows would see only the first
    tenants of the queue: the window opens once every tenant has been served (after the
    warm-up) and closes once every tenant has been served again in it (after ``seconds``), so
    what it measures is the steady state; ``cap`` bounds the whole point.
    """

    def __init__(self, tenants: int, gpus: int, spawn: Callable[[int, int], Worker], *,
                 check_every: int = 0) -> None:
        self.tenants = tenants
        self.gpus = max(1, gpus)
        self.spawn = spawn
        self.check_every = check_every
        self.stats = ExclusiveStats()
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[int, float]] = collections.deque()
        self._workers: list[Worker | None] = [None] * self.gpus
        self._owners: list[int] = [-1] * self.gpus
        self._checked: set[int] = set()
        self._warm: set[int] = set()  # tenants served since go, until the window opens

    def prestart(self) -> None:
        """Start the first tenants' workers before the clock runs (their first start is no switch)."""
        for gpu in range(min(self.gpus, self.tenants)):
            self._workers[gpu] = self.spawn(gpu, gpu)
            self._owners[gpu] = gpu

    def run(self, go: float, warmup: float, seconds: float, cap: float) -> ExclusiveStats:
        """Serve from ``go`` (monotonic); the window as the class says, everything ends by ``go + cap``."""
        self._queue.extend((t, go) for t in range(self.tenants))
        time.sleep(max(0.0, go - time.monotonic()))
        limit = go + cap
        threads = [threading.Thread(target=self._serve, args=(gpu, go + warmup, seconds, limit), daemon=True)
                   for gpu in range(self.gpus)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        st = self.stats
        if st.end is None:
            st.end = min(time.monotonic(), limit)
            st.start = st.end if st.start is None else st.start
        return st

    def close(self) -> None:
        for gpu, w in enumerate(self._workers):
            if w is not None:
                w.close()
            self._workers[gpu] = None

    def _serve(self, gpu: int, opens: float, seconds: float, limit: float) -> None:
        st = self.stats
        while True:
            with self._lock:
                if not self._queue or st.end is not None or st.errors or time.monotonic() >= limit:
                    return
                tenant, since = self._queue.popleft()
                st.requests += 1
                check = tenant not in self._checked or bool(self.check_every and st.requests % self.check_every == 0)
                self._checked.add(tenant)
            try:
                if self._owners[gpu] != tenant:
                    t0 = time.monotonic()
                    old = self._workers[gpu]
                    self._workers[gpu] = None
                    if old is not None:
                        old.close()
                    self._workers[gpu] = self.spawn(tenant, gpu)
                    self._owners[gpu] = tenant
                    with self._lock:
                        st.cold_starts.append(time.monotonic() - t0)
                worker = self._workers[gpu]
                assert worker is not None
                reply = worker.request(check)
            except Exception as exc:  # a worker that failed ends the point with its reason
                with self._lock:
                    st.errors.append(f"tenant {tenant} on GPU {gpu}: {exc}")
                return
            done = time.monotonic()
            with self._lock:
                if reply.get("check") is not None:
                    st.checks += 1
                    st.check_failures += not reply["check"]
                if st.start is None:
                    self._warm.add(tenant)
                    if done >= opens and len(self._warm) == self.tenants:
                        st.start = done
                elif st.end is None and done <= limit:
                    st.latencies.append(done - since - float(reply.get("check_s", 0.0)))
                    st.per_tenant[tenant] += 1
                    if done >= st.start + seconds and len(st.per_tenant) == self.tenants:
                        st.end = done
                        st.steady = True
                self._queue.append((tenant, done))


def _main(argv: Sequence[str]) -> int:
    if list(argv) == ["probe"]:
        try:
            print(json.dumps(probe()))
        except Exception as exc:
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m bench.baselines probe", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
