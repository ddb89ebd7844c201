"""Tenant identity comes from SO_PEERCRED: real processes with real, distinct uids.

The tests run as root and fork tenant processes that drop to uid 65534 (nobody) or 65533
(no passwd entry) before they connect.  Forking (rather than exec'ing a new interpreter)
keeps the already-imported code: the interpreter of the test venv need not be readable
by those uids.  Each child reports back as JSON lines over a pipe.
"""

from __future__ import annotations

import json
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.random
import pytest

import tenantlib
from broker import errors
from broker import protocol as P
from tenantlib import kernels as K
from tenantlib.graph import Library, Resident
from tests.conftest import RawConnection
from tools.broker_process import BrokerProcess

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: the tests switch to uids 65534 and 65533 to get distinct peer credentials")

NOBODY = 65534
OTHER = 65533
DEADLINE = 60.0  # generous bound on any child's conversation; never a timed assertion
SHARED_SOCKET = "socket_mode = 438\n"  # 0o666: every uid may connect


# -- tenant processes -----------------------------------------------------------------------------
class Child:
    """A forked process running ``target(child, *args)`` as ``uid``/``gid``, talking JSON lines."""

    def __init__(self, uid: int, gid: int, target: Callable[..., Any], *args: Any) -> None:
        self.uid = uid
        up_r, up_w = os.pipe()      # child -> parent
        down_r, down_w = os.pipe()  # parent -> child
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 0
            try:
                os.close(up_r)
                os.close(down_w)
                self._out, self._in = os.fdopen(up_w, "w", buffering=1), os.fdopen(down_r, "r")
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                target(self, *args)
            except BaseException:
                code = 1
                try:
                    self.send({"crash": traceback.format_exc()})
                except BaseException:
                    pass
            finally:
                os._exit(code)
        os.close(up_w)
        os.close(down_r)
        self.pid = pid
        self._up = up_r
        self._down = os.fdopen(down_w, "w", buffering=1)
        self._buf = b""
        self.status: int | None = None

    # child side
    def send(self, obj: Any) -> None:
        self._out.write(json.dumps(obj) + "\n")

    def wait(self) -> Any:
        return json.loads(self._in.readline())

    # parent side
    def recv(self) -> Any:
        end = time.monotonic() + DEADLINE
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                self.kill()
                pytest.fail(f"child as uid {self.uid} said nothing within {DEADLINE:.0f} s")
            ready, _, _ = select.select([self._up], [], [], left)
            if ready:
                chunk = os.read(self._up, 65536)
                if not chunk:
                    self.join()
                    pytest.fail(f"child as uid {self.uid} exited (status {self.status}) without a reply")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg = json.loads(line)
        if isinstance(msg, dict) and "crash" in msg:
            self.join()
            pytest.fail(f"child as uid {self.uid} failed:\n{msg['crash']}")
        return msg

    def tell(self, obj: Any) -> None:
        self._down.write(json.dumps(obj) + "\n")

    def join(self) -> int:
        end = time.monotonic() + DEADLINE
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > end:
                self.kill()
            else:
                time.sleep(0.01)
        return self.status

    def kill(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status = os.waitpid(self.pid, 0)
            self.status = os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        self.kill()
        os.close(self._up)
        self._down.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., Child]]:
    kids: list[Child] = []

    def start(uid: int, target: Callable[..., Any], *args: Any) -> Child:
        c = Child(uid, uid, target, *args)
        kids.append(c)
        return c

    yield start
    for c in kids:
        c.close()


def share_socket(path: str) -> None:
    """Make the socket's directory traversable by other uids (the socket itself must be 0o666)."""
    parent = os.path.dirname(path)
    os.chmod(parent, 0o755)
    for d in Path(parent).parents:
        if not os.stat(d).st_mode & 0o001:
            pytest.skip(f"{d} is not traversable by other uids, so tenants as uid {NOBODY} cannot reach "
                        f"the broker's socket {path}")
    assert os.stat(path).st_mode & 0o777 == 0o666


def open_to_all(b: BrokerProcess) -> BrokerProcess:
    share_socket(b.socket)
    return b


@pytest.fixture
def shared_broker(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return open_to_all(broker_factory(SHARED_SOCKET))


def error_info(exc: errors.KaasError) -> dict[str, Any]:
    return {"code": exc.code, "message": exc.message, "detail": exc.detail}


def vadd(client: tenantlib.Client, lib: Library, n: int = 4099) -> bool:
    x, y, z = (client.array(n) for _ in range(3))
    rng = np.random.default_rng(os.getuid())
    x[:] = rng.standard_normal(n, dtype=np.float32)
    y[:] = rng.standard_normal(n, dtype=np.float32)
    g = client.graph()
    grid, block = K.launch_1d(n)
    g.kernel(lib, "vadd", grid=grid, block=block, args=[g.input(x), g.input(y), g.output(z), n])
    client.run(g, timeout=30)
    return bool(np.array_equal(z, x + y))


# The bodies of tenant processes (run after the switch to their uid).
PRIVATE_SOURCE = K.SOURCE + "\n// a private copy of kaas-std: its digest is this tenant's alone\n"
RES_N = 1024


def tenant_vadd(child: Child, path: str) -> None:
    """Connect, say who the broker thinks we are, run a vadd."""
    with tenantlib.connect(path, timeout=30) as c:
        child.send({"uid": os.getuid(), "tenant": c.tenant, "vadd_ok": vadd(c, K.library(c))})


def tenant_connect(child: Child, path: str) -> None:
    """Like tenant_vadd, but report a refused handshake as data."""
    try:
        c = tenantlib.connect(path, timeout=30)
    except errors.KaasError as exc:
        child.send({"refused": error_info(exc)})
        return
    with c:
        child.send({"uid": os.getuid(), "tenant": c.tenant, "vadd_ok": vadd(c, K.library(c))})


def holder(child: Child, path: str) -> None:
    """Register a private library and a resident, prove they work, and keep them until told."""
    with tenantlib.connect(path, timeout=30) as c:
        lib = c.library(PRIVATE_SOURCE, kernels=K.KERNELS, name="private")
        src = c.array(RES_N)
        src[:] = np.arange(RES_N, dtype=np.float32)
        res = c.resident(src)
        out = c.array(RES_N)
        g = c.graph()
        r = g.resident(res)
        grid, block = K.launch_1d(RES_N)
        g.kernel(lib, "vadd", grid=grid, block=block, args=[r, r, g.output(out), RES_N])
        c.run(g, timeout=30)
        child.send({"tenant": c.tenant, "library": lib.digest, "resident": res.digest,
                    "ok": bool(np.array_equal(out, 2 * np.arange(RES_N, dtype=np.float32)))})
        child.wait()


def try_foreign(child: Child, path: str, library: str, resident: str) -> None:
    """Use another tenant's library and resident (and made-up ones); report each outcome."""
    made_lib, made_res = "ab" * 32, "cd" * 32
    out: dict[str, Any] = {}
    with tenantlib.connect(path, timeout=30) as c:
        std = K.library(c)
        out["tenant"] = c.tenant
        x, z = c.array(RES_N), c.array(RES_N)

        def attempt(key: str, run: Callable[[], Any]) -> None:
            try:
                run()
                out[key] = {"ok": True}
            except errors.KaasError as exc:
                out[key] = error_info(exc)

        def with_library(digest: str) -> None:
            lib = Library(digest, "foreign", {k.name: k for k in K.KERNELS})
            g = c.graph()
            g.kernel(lib, "vadd", grid=1, block=256, args=[g.input(x), g.input(x), g.output(z), RES_N])
            c.run(g, timeout=30)

        def with_resident(digest: str) -> None:
            g = c.graph()
            r = g.resident(Resident(digest, RES_N * 4, "float32", (RES_N,)))
            g.kernel(std, "vadd", grid=1, block=256, args=[r, g.input(x), g.output(z), RES_N])
            c.run(g, timeout=30)

        def release(digest: str) -> None:
            c.release_resident(Resident(digest, RES_N * 4, "float32", (RES_N,)))

        attempt("library", lambda: with_library(library))
        attempt("made_up_library", lambda: with_library(made_lib))
        attempt("resident", lambda: with_resident(resident))
        attempt("made_up_resident", lambda: with_resident(made_res))
        attempt("release", lambda: release(resident))
        attempt("made_up_release", lambda: release(made_res))
        out["vadd_ok"] = vadd(c, std)  # the refusals left the session usable
    child.send(out)


def blank(err: dict[str, Any], ident: str) -> dict[str, Any]:
    """The refusal with the offending id (or the prefix of it the message quotes) blanked out."""
    msg = err["message"]
    for text in (ident, ident[:16]):
        msg = re.sub(rf"(?<![0-9a-f]){text}(?![0-9a-f])", "<ID>", msg)
    detail = {k: ("<ID>" if v == ident else v) for k, v in err["detail"].items()}
    return {"code": err["code"], "message": msg, "detail": detail}


# -- tests ----------------------------------------------------------------------------------------
def test_uids_are_distinct_tenants(shared_broker: BrokerProcess, spawn: Callable[..., Child]) -> None:
    a = spawn(NOBODY, tenant_vadd, shared_broker.socket).recv()
    b = spawn(OTHER, tenant_vadd, shared_broker.socket).recv()
    assert a["uid"] == NOBODY and b["uid"] == OTHER
    assert a["tenant"] in ("user:nobody", f"uid:{NOBODY}"), a
    assert b["tenant"] in (f"uid:{OTHER}",) or b["tenant"].startswith("user:"), b
    assert a["tenant"] != b["tenant"]
    assert a["vadd_ok"] and b["vadd_ok"]
    with tenantlib.connect(shared_broker.socket, timeout=30) as root:
        assert root.tenant not in (a["tenant"], b["tenant"])


def test_residents_and_libraries_are_private_to_a_uid(shared_broker: BrokerProcess,
                                                      spawn: Callable[..., Child]) -> None:
    path = shared_broker.socket
    owner = spawn(NOBODY, holder, path)
    held = owner.recv()
    assert held["ok"], held
    # Another uid: refused exactly as if the ids had been made up.
    stranger = spawn(OTHER, try_foreign, path, held["library"], held["resident"]).recv()
    # Another process of the same uid is the same tenant: the handles still work for it (and
    # releasing the resident works, so the stranger's release attempt had not removed it).
    ally = spawn(NOBODY, try_foreign, path, held["library"], held["resident"]).recv()
    owner.tell("done")
    assert owner.join() == 0
    assert ally["tenant"] == held["tenant"]
    assert ally["library"] == ally["resident"] == ally["release"] == {"ok": True}, ally
    assert stranger["tenant"] != held["tenant"]
    assert stranger["library"]["code"] == "unknown_library", stranger
    assert stranger["resident"]["code"] == "unknown_resident", stranger
    assert stranger["release"]["code"] == "unknown_resident", stranger
    assert blank(stranger["library"], held["library"]) == blank(stranger["made_up_library"], "ab" * 32)
    assert blank(stranger["resident"], held["resident"]) == blank(stranger["made_up_resident"], "cd" * 32)
    assert blank(stranger["release"], held["resident"]) == blank(stranger["made_up_release"], "cd" * 32)
    assert stranger["vadd_ok"]


def test_segment_owned_by_another_uid_is_refused(broker: BrokerProcess) -> None:
    r = RawConnection(broker.socket)
    fds = []
    try:
        fd = os.memfd_create("kaas-foreign", os.MFD_CLOEXEC)
        fds.append(fd)
        os.ftruncate(fd, 4096)
        os.fchown(fd, NOBODY, NOBODY)
        r.send(P.RegisterArena(1, 4096), fd=fd)
        reply = r.recv()
        assert isinstance(reply, P.Error) and reply.code == "invalid_arena", reply
        assert "owned by uid 65534" in reply.message and "uid 0" in reply.message, reply.message
        # The same kind of segment owned by the peer itself is accepted: the owner was the problem.
        own = os.memfd_create("kaas-own", os.MFD_CLOEXEC)
        fds.append(own)
        os.ftruncate(own, 4096)
        r.send(P.RegisterArena(2, 4096), fd=own)
        assert isinstance(r.recv(), P.ArenaRegistered)
    finally:
        r.close()
        for fd in fds:
            os.close(fd)


def test_refused_unknown_uids(tmp_path: Path, broker_env: dict[str, str], spawn: Callable[..., Child]) -> None:
    cfg = tmp_path / "refuse.toml"
    cfg.write_text(SHARED_SOCKET + 'unknown_tenants = "refuse"\n\n'
                   f'[[tenants]]\nname = "batch"\nuid = {NOBODY}\n')
    b = BrokerProcess("cpu", config=str(cfg), env=broker_env)
    try:
        try:
            b.start()  # its readiness probe connects as root, which this broker refuses
        except errors.PermissionDenied:
            pass
        open_to_all(b)
        stranger = spawn(OTHER, tenant_connect, b.socket).recv()
        assert stranger["refused"]["code"] == "permission_denied", stranger
        assert f"uid {OTHER}" in stranger["refused"]["message"]
        member = spawn(NOBODY, tenant_connect, b.socket).recv()
        assert member == {"uid": NOBODY, "tenant": "batch", "vadd_ok": True}, member
        # Root is unknown here too: refused at the handshake, and the broker hangs up.
        r = RawConnection(b.socket, hello=False)
        try:
            r.send(P.Hello(P.PROTOCOL_VERSION, "root"))
            reply = r.recv()
            assert isinstance(reply, P.Error) and reply.code == "permission_denied", reply
            assert r.closed_by_peer()
        finally:
            r.close()
    finally:
        b.stop()
    assert not b.problems(), "the broker logged problems:\n" + "\n".join(b.problems())


def register_private(child: Child, path: str) -> None:
    """Register PRIVATE_SOURCE, report whether the broker called it cached, hold it until told."""
    with tenantlib.connect(path, timeout=30) as c:
        lib = c.library(PRIVATE_SOURCE, kernels=K.KERNELS, name="private")
        child.send({"tenant": c.tenant, "library": lib.digest, "cached": lib.cached})
        child.wait()


def test_library_cache_does_not_reveal_other_tenants(shared_broker: BrokerProcess,
                                                     spawn: Callable[..., Child]) -> None:
    """Regression: `cached` was True when another tenant had registered the same bytes."""
    first = spawn(NOBODY, register_private, shared_broker.socket)
    a = first.recv()
    second = spawn(OTHER, register_private, shared_broker.socket)
    b = second.recv()
    first.tell("done")
    second.tell("done")
    assert a["cached"] is False and a["tenant"] != b["tenant"]
    assert a["library"] == b["library"]  # content-addressed: the same digest for both
    assert b["cached"] is False, "the second tenant was told another tenant holds this library"


def tenant_name(child: Child, path: str) -> None:
    """Connect and report only which tenant the broker made of us (or the typed refusal)."""
    try:
        with tenantlib.connect(path, timeout=30) as c:
            child.send({"tenant": c.tenant})
    except errors.KaasError as exc:
        child.send({"refused": error_info(exc)})



class LimitedBroker:
    """A broker process whose RLIMIT_NOFILE (soft and hard) is ``nofile``, socket open to all uids.

    BrokerProcess cannot lower a child's hard limit (and the tests may not raise their own back),
    so this starts ``python -m broker`` itself.
    """

    def __init__(self, config: str, env: dict[str, str], nofile: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="kaas-limited-")
        os.chmod(self.dir, 0o755)
        self.socket = os.path.join(self.dir, "broker.sock")
        cfg = os.path.join(self.dir, "broker.toml")
        Path(cfg).write_text(config)
        self.log_path = os.path.join(self.dir, "broker.log")
        self._log = open(self.log_path, "ab")  # closed in stop()

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "--socket", self.socket, "--device", "cpu", "--config", cfg],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=limit)
        end = time.monotonic() + DEADLINE
        while True:  # serving once a hello gets any answer
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{self.log()}")
            try:
                RawConnection(self.socket).close()
                break
            except (OSError, AssertionError):
                if time.monotonic() > end:
                    self.stop()
                    raise RuntimeError(f"broker did not start:\n{self.log()}") from None
                time.sleep(0.05)
        share_socket(self.socket)

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def problems(self) -> list[str]:
        return [ln for ln in self.log().splitlines()
                if '"level": "error"' in ln or '"level": "critical"' in ln or ln.startswith("Traceback")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def limited_broker(broker_env: dict[str, str]) -> Iterator[Callable[[str, int], LimitedBroker]]:
    started: list[LimitedBroker] = []

    def start(config: str, nofile: int) -> LimitedBroker:
        b = LimitedBroker(config, broker_env, nofile)
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()
    problems = [p for b in started for p in b.problems()]
    for b in started:
        shutil.rmtree(b.dir, ignore_errors=True)
    assert not problems, "the broker logged problems:\n" + "\n".join(problems)


Flood = Callable[[str], "P.Error | None"]


@pytest.fixture
def flood() -> Iterator[Flood]:
    """``flood(path)``: as root, register small arenas until the broker refuses one (returned).

    The flooding connections stay open (holding their arenas) until the end of the test.
    """
    conns: list[RawConnection] = []

    def run(path: str, most: int = 5000) -> P.Error | None:
        r = RawConnection(path)
        conns.append(r)
        for req in range(1, most + 1):
            fd = os.memfd_create("kaas-flood", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, 4096)
                r.send(P.RegisterArena(req, 4096), fd=fd)
            finally:
                os.close(fd)
            reply = r.recv()
            if isinstance(reply, P.Error):
                return reply
        return None

    yield run
    for r in conns:
        r.close()


def register_one_arena(child: Child, path: str) -> None:
    """Connect, register one arena, run a vadd: report the tenant and what happened."""
    try:
        with tenantlib.connect(path, timeout=30) as c:
            try:
                c.arena(4096)
                child.send({"tenant": c.tenant, "arena": "ok", "vadd_ok": vadd(c, K.library(c))})
            except errors.KaasError as exc:
                child.send({"tenant": c.tenant, "arena": error_info(exc)})
    except errors.KaasError as exc:
        child.send({"refused": error_info(exc)})


def test_identity_holds_when_the_broker_is_short_of_fds(limited_broker: Callable[[str, int], LimitedBroker],
                                                         spawn: Callable[..., Child], flood: Flood) -> None:
    """Regression: a failed user-name lookup (pwd.getpwuid: KeyError, e.g. with no fd left for NSS)
    was taken for 'no such user', so a `user =` rule stopped matching and the peer silently became
    the default tenant 'uid:N'. Now the broker keeps fds in reserve and remembers names it found."""
    b = limited_broker(SHARED_SOCKET + '[[tenants]]\nname = "team-nobody"\nuser = "nobody"\n', 512)
    assert spawn(OTHER, tenant_name, b.socket).recv()["tenant"] == f"uid:{OTHER}"
    refused = flood(b.socket)  # root takes every arena the broker will give
    assert refused is not None and refused.code in ("quota_exceeded", "too_many_requests"), refused
    got = spawn(NOBODY, tenant_name, b.socket).recv()  # nobody's first connection: no cached name
    assert got == {"tenant": "team-nobody"} or "refused" in got, got


def test_one_tenant_cannot_take_every_arena(limited_broker: Callable[[str, int], LimitedBroker],
                                            spawn: Callable[..., Child], flood: Flood) -> None:
    b = limited_broker(SHARED_SOCKET, 1024)
    refused = flood(b.socket)
    assert refused is not None and issubclass(errors.error_class(refused.code), errors.QuotaError), refused
    victim = spawn(NOBODY, register_one_arena, b.socket).recv()
    assert victim["tenant"] == "user:nobody"
    assert victim["arena"] == "ok" and victim["vadd_ok"], victim
