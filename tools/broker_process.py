"""Start a broker as a child process and wait until it serves: for the demo, benches and tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import tenantlib
from tenantlib import errors


class BrokerProcess:
    """``with BrokerProcess("cpu") as b: tenantlib.connect(b.socket)``; stopped with SIGTERM on exit."""

    def __init__(self, device: str = "auto", *, socket: str | None = None, config: str | None = None,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None, log: str | None = None,
                 start_timeout: float = 120.0) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="kaas-") if socket is None else None
        self.socket = socket or os.path.join(self._tmp.name, "broker.sock")  # type: ignore[union-attr]
        self.device = device
        self.config = config
        self.extra_args = extra_args
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("KAAS_LOG_FORMAT", "json")
        self.log_path = log or (os.path.join(self._tmp.name, "broker.log") if self._tmp else os.devnull)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.final_log = ""  # the whole log, kept at stop() (the temporary directory goes)

    def problems(self) -> list[str]:
        """Log lines that say the broker itself went wrong: errors, tracebacks, unhandled exceptions."""
        lines = (self.final_log or self.log_tail(10_000)).splitlines()
        bad = [i for i, ln in enumerate(lines)
               if '"level": "error"' in ln or '"level": "critical"' in ln or ln.startswith("Traceback")
               or "exception was never retrieved" in ln or "Task was destroyed" in ln]
        # each problem with the lines after it (the traceback that explains it)
        return ["\n".join(lines[i:i + 25]) for i in bad]

    def start(self) -> BrokerProcess:
        cmd = [sys.executable, "-m", "broker", "--socket", self.socket, "--device", self.device, *self.extra_args]
        if self.config:
            cmd += ["--config", self.config]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                with tenantlib.connect(self.socket, timeout=5):
                    return self
            except errors.BrokerUnavailable:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"broker did not start within {self.start_timeout} s:\n{self.log_tail()}") from None
                time.sleep(0.05)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait; SIGKILL after ``timeout``. Returns the exit code."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            code = self.proc.returncode
            self._log.close()
            self.final_log = self.log_tail(10_000)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return code

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
