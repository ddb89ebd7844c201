"""``kaas-broker``: the broker daemon.

    kaas-broker --socket /run/kaas/broker.sock --device auto|cpu[:0,1]|cuda[:0,1,...] [--config FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

import structlog

from . import __version__, errors, systemd
from . import log as kaas_log
from .config import Config, ConfigError, load
from .engine import Engine
from .graph import Limits
from .metrics import Metrics, serve_metrics
from .server import Server

logger = structlog.get_logger("kaas.broker")


def cuda_device_count() -> int:
    """Ask a child process (the broker itself never loads the CUDA driver)."""
    try:
        out = subprocess.run([sys.executable, "-m", "broker.streams.probe"], capture_output=True, text=True,
                             timeout=60, check=False)
        return int(out.stdout.strip() or 0)
    except (subprocess.SubprocessError, ValueError, OSError):
        return 0


def parse_devices(spec: str, count_cuda: object = cuda_device_count) -> list[str]:
    """``auto`` | ``cpu`` | ``cpu:0,1`` | ``cuda`` | ``cuda:0,1`` -> ['cuda:0', ...]."""
    kind, _, rest = spec.partition(":")
    if kind == "auto":
        if rest:
            raise ConfigError(f"device {spec!r}: 'auto' takes no indices")
        n = count_cuda()  # type: ignore[operator]
        return [f"cuda:{i}" for i in range(n)] if n else ["cpu:0"]
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"device {spec!r}: expected auto, cpu[:N,...] or cuda[:N,...]")
    if not rest:
        if kind == "cpu":
            return ["cpu:0"]
        n = count_cuda()  # type: ignore[operator]
        if not n:
            raise ConfigError("device 'cuda': no CUDA device is present")
        return [f"cuda:{i}" for i in range(n)]
    try:
        idx = [int(x) for x in rest.split(",")]
    except ValueError:
        raise ConfigError(f"device {spec!r}: indices must be integers") from None
    if len(set(idx)) != len(idx) or any(i < 0 for i in idx):
        raise ConfigError(f"device {spec!r}: indices must be distinct and >= 0")
    if kind == "cuda":
        n = count_cuda()  # type: ignore[operator]
        missing = [i for i in idx if i >= n]
        if missing:
            raise ConfigError(f"device {spec!r}: CUDA device(s) {missing} not present ({n} found)")
    return [f"{kind}:{i}" for i in idx]


async def serve(config: Config, devices: list[str], *, sock: socket.socket | None = None,
                ready: asyncio.Event | None = None, reread: Callable[[], Config] | None = None) -> int:
    """Run the broker until SIGTERM/SIGINT. ``sock``: a listening socket handed over by systemd.

    ``reread`` re-reads the configuration for SIGHUP and ``kaasctl reload``: tenant policy and fault
    settings change at once for every session; devices, sockets and lanes need a restart.
    """
    notifier = systemd.Notifier()
    notifier.status(f"starting device workers: {', '.join(devices)}")
    metrics = Metrics()
    engine = Engine(config, devices, metrics)
    await engine.start()
    server = Server(config, engine, limits=Limits(max_graph_bytes=engine.max_graph_bytes()))
    await server.start(sock)
    path = sock.getsockname() if sock is not None else config.socket
    def on_scrape(m: Metrics) -> None:
        engine.scrape(m)
        m.set_active_sessions(len(server.connections))

    metrics.on_scrape(on_scrape)
    msrv = None
    if config.metrics_port or config.metrics_socket:
        msrv = await serve_metrics(metrics, port=config.metrics_port or None, host=config.metrics_host,
                                   unix_path=config.metrics_socket or None)
    dog = None
    interval = systemd.watchdog_interval()
    if interval:
        dog = systemd.Watchdog(notifier, interval)
        dog.start()
    async def reload() -> str:
        if reread is None:
            raise errors.InvalidArgument("this broker has no configuration to re-read")
        try:
            new = reread()
        except ConfigError as exc:
            logger.warning("reload_refused", error=str(exc))
            raise errors.InvalidArgument(f"reload refused, the old configuration stays: {exc}") from None
        notifier.reloading("re-reading the configuration")
        server.directory.config = new
        engine.config = engine.config.replace(
            tenants=new.tenants, tenant_defaults=new.tenant_defaults, unknown_tenants=new.unknown_tenants,
            admin_group=new.admin_group, max_graph_seconds=new.max_graph_seconds,
            replay_attempts=new.replay_attempts, quarantine_after=new.quarantine_after)
        for st in engine.tenants.values():
            engine.set_policy(st, server.directory.policy_of(st.name))
        logger.info("reloaded", tenant_rules=len(new.tenants))
        notifier.ready(f"serving {', '.join(devices)} on {path} (reloaded)")
        return f"{len(new.tenants)} tenant rules; policies applied to {len(engine.tenants)} tenants"

    def on_hup() -> None:
        task = loop.create_task(reload())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a refusal was logged

    engine.reload_hook = reload
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    print(f"kaas-broker {__version__}: listening on {path} with {', '.join(devices)}", file=sys.stderr, flush=True)
    notifier.ready(f"serving {', '.join(devices)} on {path}")
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        # Graceful: take nothing new, refuse what has not started, let running graphs finish.
        server.stop_accepting()
        engine.accepting = False
        refused = engine.refuse_queued(errors.ShuttingDown("the broker is shutting down; this graph did not start"))
        notifier.stopping(f"stopping: {refused} queued graphs refused, waiting for running ones")
        logger.info("stopping", refused=refused, grace=config.shutdown_grace)
        if not await engine.wait_idle(config.shutdown_grace):
            logger.warning("grace_period_over", still_running=len(engine._pending))
        if msrv is not None:
            msrv.close()
        await server.close()
        await engine.stop()
        if dog is not None:
            dog.stop()
        notifier.close()
    return 0


def raise_fd_limit() -> int:
    """Arenas are fds: take the soft RLIMIT_NOFILE up to the hard limit. Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kaas-broker", description="kaas: the multi-tenant GPU broker daemon")
    p.add_argument("--socket", help="Unix socket path (default: $KAAS_SOCKET, config, /run/kaas/broker.sock)")
    p.add_argument("--device", help="auto | cpu[:0,1] | cuda[:0,1,...] (default: auto)")
    p.add_argument("--config", help="TOML config file (default: /etc/kaas/broker.toml if present)")
    p.add_argument("--policy", help="scheduling policy (fcfs)")
    p.add_argument("--version", action="version", version=f"kaas-broker {__version__}")
    args = p.parse_args(argv)
    try:
        config = load(args.config, socket=args.socket, device=args.device, policy=args.policy)
        kaas_log.configure(config.log_format, config.log_level)
        devices = parse_devices(config.device)
        raise_fd_limit()
        inherited = systemd.listen_fds()  # socket activation: take it before any child starts
        if len(inherited) > 1:
            raise ConfigError(f"systemd passed {len(inherited)} sockets; kaas-broker listens on exactly one")
    except ConfigError as exc:
        print(f"kaas-broker: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep asyncio as a fallback
        runner = asyncio.run  # type: ignore[assignment]
    try:
        reread = functools.partial(load, args.config, socket=args.socket, device=args.device, policy=args.policy)
        from .profiling import profiled

        return profiled("broker", lambda: runner(serve(config, devices, sock=inherited[0] if inherited else None,
                                                       reread=reread)))
    except OSError as exc:
        print(f"kaas-broker: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
