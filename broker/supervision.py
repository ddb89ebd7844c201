"""The engine's supervision: worker death, verdicts, replay, quarantine, respawn.

A CUDA fault poisons a whole process and a runaway kernel cannot be stopped from inside it, so
a worker that faults or runs past a deadline is killed and respawned with every arena and
library restored.  The graphs it was running get a verdict (culprit, suspect or innocent):
innocents are replayed, suspects replayed each alone, culprits told; kernels that fault
repeatedly are quarantined for their tenant.  Dedicated tenants get their own workers here.
"""

from __future__ import annotations

import asyncio
import functools
import time

import structlog

from . import errors
from .dispatch import _Pending
from .engine_base import EngineBase
from .graph import Template
from .registry import LibraryRecord, TenantState
from .scheduler import Scheduler
from .streams.wire import (
    WLoadLibrary,
    WReply,
)
from .workers import WorkerHandle

log = structlog.get_logger("kaas.engine")


def reply_verdict(verdict: str, reply: WReply | None) -> str:
    """A failed graph's verdict, given what its worker answered: a sticky fault reported on every
    graph in flight makes each a suspect (run alone to find which); a graph the worker never started
    (its device was lost, or it was poisoned already when the run came) is innocent."""
    if reply is None:
        return verdict
    if reply.code == errors.KernelFault.code and reply.detail.get("ambiguous"):
        return "suspect"
    if reply.code == errors.WorkerLost.code and reply.detail.get("started") is False:
        return "innocent"
    if reply.code == errors.DeviceError.code and reply.detail.get("poisoned"):
        return "innocent"  # refused by a context an earlier fault had poisoned: it never ran
    return verdict


def _kernel_names(p: _Pending) -> str:
    names = sorted({k for _, k in p.prepared.template.kernel_keys})
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


class Supervision(EngineBase):
    """Worker lifecycles and what their deaths mean for the graphs they held."""

    def _worker_poisoned(self, worker: WorkerHandle) -> None:
        """A worker announced a sticky fault: place nothing more on it (its replies follow)."""
        if self.workers.get(worker.device) is worker:
            self._sched_of(worker.device).set_down(worker.device, True)

    def _open_dedicated(self, st: TenantState) -> None:
        """Give a dedicated tenant its own worker (its own context) on every device; lazily started."""
        if st.name in self.dedicated:  # reopened before its workers were retired: keep them
            return
        lanes = {f"{d}#{st.name}": (self.config.lanes_cuda if d.startswith("cuda") else self.config.lanes_cpu)
                 for d in self.devices}
        sched = self.dedicated[st.name] = Scheduler(lanes, self.config.policy)
        for key in lanes:
            sched.set_down(key, True)  # until its worker is up
            self.workers[key] = self._new_worker(key)
            self.pool.add_device(key, self.pool.capacity(key.partition("#")[0]))
            task = asyncio.get_running_loop().create_task(self._respawn(key, first=True))
            self._respawns[key] = task
            task.add_done_callback(functools.partial(self._respawn_done, key))

    async def _close_dedicated(self, name: str) -> None:
        """Retire a dedicated tenant's workers once it has no session and nothing queued or running."""
        sched = self.dedicated.get(name)
        if sched is None or name in self.tenants or any(sched.running.values()) or sched.queued:
            return
        # Detach everything before the first await: a session opening meanwhile starts afresh.
        del self.dedicated[name]
        keys = [k for k in self.workers if k.partition("#")[2] == name]
        retired = []
        for k in keys:
            t = self._respawns.pop(k, None)
            if t is not None:
                t.cancel()
            w = self.workers.pop(k)
            w.on_exit = None
            self.pool.remove_device(k)
            retired.append(w)
        await asyncio.gather(*(w.stop() for w in retired), return_exceptions=True)
        log.info("dedicated_workers_stopped", tenant=name, workers=len(retired))

    def _worker_exit(self, worker: WorkerHandle, code: int | None) -> None:
        """A worker died: judge the graphs it was running, then bring a fresh one up.

        Called before those graphs' replies fail, so ``_graph_done`` finds their verdicts: a graph
        already named (past its deadline) is the culprit and the rest are innocent; otherwise every
        graph on the worker is a suspect, replayed alone, and a suspect that kills a worker while
        alone is the culprit.  Even a graph alone on the worker is only a suspect the first time:
        a worker killed from outside (an operator, the OOM killer) is not its fault.
        """
        running = [p for p in self._pending.values() if p.worker is worker]
        if worker.poisoned:
            pass  # it answered the graphs its fault touched; what is left never ran there
        elif running and not any(p.verdict == "culprit" for p in running):
            if len(running) == 1 and running[0].isolated:
                p = running[0]
                p.verdict = "culprit"
                p.culprit = errors.WorkerLost(
                    f"the graph's kernels ({_kernel_names(p)}) killed the device worker {worker.device} "
                    f"(exit code {code}); the worker was restarted",
                    detail={"device": worker.device, "exit_code": code, "culprit": True})
            else:
                for p in running:
                    p.verdict = "suspect"
        for p in running:
            p.verdict = p.verdict or "innocent"
        if worker.device not in self.workers or self.workers[worker.device] is not worker:
            return  # a dedicated worker being retired
        self._sched_of(worker.device).set_down(worker.device, True)
        self.pool.clear_device(worker.device)
        for r in self.residents.values():
            r.devices.discard(worker.device)
        if not self._stopping and worker.device not in self._respawns:
            task = asyncio.get_running_loop().create_task(self._respawn(worker.device))
            self._respawns[worker.device] = task
            task.add_done_callback(functools.partial(self._respawn_done, worker.device))
        if self.leases:
            self._leases_lost(worker)  # with the device down: their replays wait for the new worker

    def _respawn_done(self, device: str, task: asyncio.Task[None]) -> None:
        self._respawns.pop(device, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker_respawn_crashed", device=device, error=repr(task.exception()))

    async def _respawn(self, device: str, first: bool = False) -> None:
        delay = 0.05
        while not self._stopping:
            w = self._new_worker(device)
            try:
                await w.start()
                self.workers[device] = w  # new arenas and libraries reach it from here on
                await self._restore(w)
            except Exception as exc:  # whatever it was (out of fds, a failed fork too): try again, never give up
                self.stats["respawn_failures"] += 1
                log.warning("worker_respawn_failed", device=device, error=f"{type(exc).__name__}: {exc}",
                            retry_in=delay, exc_info=not isinstance(exc, (TimeoutError, errors.KaasError)))
                w.kill()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if not w.alive:  # died again while being restored
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if not first:
                self.stats["worker_restarts"] += 1
                self.metrics.worker_restarted(device)
            self._sched_of(device).set_down(device, False)
            log.info("worker_respawned", device=device, pid=w.pid)
            self._pump()
            return

    async def _restore(self, w: WorkerHandle) -> None:
        """Give a fresh worker every live arena, and the libraries some tenant holds or a prepared graph
        uses (the cache also keeps libraries of tenants that left: loaded again when registered again,
        so that a broker that cached hundreds does not spend its recovery compiling them); one that
        fails is logged, not fatal."""
        for a in list(self.arenas.values()):
            if a.gid in self.arenas and self._serves(w, a.tenant):
                try:
                    await self._pin_on(w, a)
                except errors.WorkerLost:
                    raise
                except errors.KaasError as exc:
                    log.warning("arena_restore_failed", device=w.device, arena=a.gid, error=str(exc))
        tried: set[str] = set()
        for rec in list(self.libraries.values()):
            if rec.ready is not None and not rec.ready.done():
                await asyncio.wait([rec.ready])
            if rec.digest in self.libraries and (rec.holders or rec.refs):
                tried.add(rec.digest)
                await self._restore_library(w, rec)
        # A library registered while this worker came up may have missed it (its load went to the old
        # one); each is tried once here, and one that fails is logged like any other.
        for rec in [r for r in self.libraries.values() if (r.holders or r.refs) and r.digest not in tried
                    and r.digest not in w.libraries and r.ready is not None and r.ready.done()
                    and not r.ready.cancelled() and r.ready.exception() is None]:
            await self._restore_library(w, rec)

    async def _restore_library(self, w: WorkerHandle, rec: LibraryRecord) -> None:
        try:
            await w.call(WLoadLibrary(w.next_seq(), rec.digest, rec.format, rec.data,
                                      tuple(rec.kernels.values()), rec.options))
            w.libraries.add(rec.digest)
        except errors.WorkerLost:
            raise
        except errors.KaasError as exc:  # logged, not fatal: the rest of the device comes back
            log.warning("library_restore_failed", device=w.device, library=rec.digest[:16], error=str(exc))

    def _deadline_passed(self, job_id: int, w: WorkerHandle, limit: float) -> None:
        """A kernel cannot be stopped from inside its process: the worker goes, innocents replay."""
        p = self._pending.get(job_id)
        if p is None or p.worker is not w or not w.alive:
            return
        p.verdict = "culprit"
        p.culprit = errors.DeadlineExceeded(
            f"graph ({_kernel_names(p)}) ran past its deadline of {limit:g} s on {w.device}; the device worker "
            "was restarted", detail={"deadline": limit, "device": w.device})
        log.warning("deadline_kill", device=w.device, tenant=p.job.tenant, deadline=limit)
        w.kill(f"a graph ran past its deadline of {limit:g} s")

    def _replay(self, p: _Pending, reply: WReply | None, now: float) -> bool:
        """Queue an innocent (or suspect) graph again after a fault that was not its own."""
        verdict = reply_verdict(p.verdict, reply)
        if verdict not in ("innocent", "suspect") or p.attempts >= self.config.replay_attempts:
            return False
        p.attempts += 1
        p.isolated = verdict == "suspect"
        p.verdict, p.culprit, p.worker, p.dispatched = "", None, None, 0.0
        p.job.device = None
        self._pending[p.job.id] = p
        if p.job.tenant in self.tenants:
            self.tenants[p.job.tenant].waiting += 1
        self._sched_for(p.job.tenant).requeue(p.job, isolate=verdict == "suspect")
        self.stats["replays"] += 1
        log.info("graph_replayed", tenant=p.job.tenant, attempt=p.attempts, isolated=verdict == "suspect")
        return True

    def _strike(self, p: _Pending, err: errors.KaasError) -> None:
        self.strike(p.job.tenant, p.prepared.template, err)

    def strike(self, tenant: str, template: Template, err: errors.KaasError) -> None:
        """Count a fault against the kernels that caused it; quarantine repeat offenders."""
        kernels = set(template.kernel_keys)
        named = err.detail.get("kernel")
        if named:
            kernels = {lk for lk in kernels if lk[1] == named} or kernels
        for lib, name in kernels:
            key = (tenant, lib, name)
            n = self.strikes[key] = self.strikes.get(key, 0) + 1
            if n >= self.config.quarantine_after and key not in self.quarantined:
                self.quarantined[key] = time.time()
                self.revoke_where(tenant=tenant)  # its runs go through the broker's quarantine check again
                log.warning("kernel_quarantined", tenant=tenant, library=lib[:16], kernel=name, faults=n)

    def check_quarantine(self, tenant: str, template: Template) -> None:
        if not self.quarantined:
            return
        for lib, name in template.kernel_keys:
            if (tenant, lib, name) in self.quarantined:
                raise errors.Quarantined(
                    f"kernel {name!r} faulted {self.strikes[(tenant, lib, name)]} times and is "
                    "quarantined for this tenant until an administrator clears it",
                    detail={"kernel": name, "library": lib})

    def clear_quarantine(self, tenant: str | None = None) -> int:
        """Lift quarantines (of one tenant, or all); returns how many were lifted."""
        keys = [k for k in self.quarantined if tenant is None or k[0] == tenant]
        for k in keys:
            del self.quarantined[k]
            self.strikes.pop(k, None)
        return len(keys)
