"""Tenants that survive a broker restart (``connect(reconnect=True)``): requests in flight fail
with a typed, retryable error, and the next call connects again and registers what it held."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

import tenantlib
from tenantlib import errors, kernels
from tenantlib.kernels import testing
from tools.broker_process import BrokerProcess

_SLOW = kernels.SOURCE + '\nextern "C" __global__ void slow(int ms) {}\n'
_CONFIG = 'host_modules = ["tenantlib.kernels.host", "tenantlib.kernels.testing"]\n'


def _broker(tmp_path: Path, env: dict[str, str]) -> BrokerProcess:
    cfg = tmp_path / "broker.toml"
    cfg.write_text(_CONFIG)
    return BrokerProcess("cpu", socket=str(tmp_path / "broker.sock"), config=str(cfg), env=env,
                         log=str(tmp_path / "broker.log")).start()


def _vadd(c: tenantlib.Client, lib: tenantlib.Library, x: np.ndarray, res: tenantlib.Resident,
          z: np.ndarray) -> tenantlib.Graph:
    g = c.graph()
    grid, block = kernels.launch_1d(x.size)
    g.kernel(lib, "vadd", grid=grid, block=block, args=[g.input(x), g.resident(res), g.output(z), x.size])
    return g


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_tenant_carries_on_after_the_broker_restarts(tmp_path: Path, broker_env: dict[str, str],
                                                        how: signal.Signals) -> None:
    b = _broker(tmp_path, broker_env)
    try:
        with tenantlib.connect(b.socket, reconnect=True, timeout=60) as c:
            lib = c.library(_SLOW, kernels=[*kernels.KERNELS, testing.SLOW])
            rng = np.random.default_rng()
            spare = c.arena(64)  # released before the restart: the others' ids shift on the new session
            x, y, z = c.array(1000), c.array(1000), c.array(1000)
            x[...], y[...] = rng.random(1000, dtype=np.float32), rng.random(1000, dtype=np.float32)
            res = c.resident(y)
            g = _vadd(c, lib, x, res, z)
            c.run(g)
            np.testing.assert_array_equal(z, x + y)
            spare.close()
            slow = c.graph()
            slow.kernel(lib, "slow", grid=1, block=1, args=[3000])
            pending = c.submit(slow)
            assert b.proc is not None
            os.kill(b.proc.pid, how)  # mid-request
            if how == signal.SIGTERM:  # a graceful stop lets the running graph finish, then closes
                pending.result()
            else:
                with pytest.raises(errors.BrokerUnavailable) as info:
                    pending.result()  # it may or may not have run: the tenant is told so
                assert info.value.detail["retryable"] is True
            b.proc.wait(60)
            b.stop()
            b = _broker(tmp_path, broker_env)  # the same socket, a new broker with nothing registered
            x[...] = rng.random(1000, dtype=np.float32)
            c.run(g)  # connects again; arenas, the library and the resident are registered again
            np.testing.assert_array_equal(z, x + y)
            assert c.run(slow).device == "cpu:0"
            y[...] = 0.0  # the resident's content is gone from the tenant's memory now...
            b.stop()
            b = _broker(tmp_path, broker_env)
            with pytest.raises(errors.UnknownResident):
                c.run(g)  # ...so it cannot be registered again: its graph says so
            z2 = c.array(1000)
            g2 = c.graph()
            g2.kernel(lib, "vadd", grid=1, block=1000, args=[g2.input(x), g2.input(x), g2.output(z2), 1000])
            c.run(g2)
            np.testing.assert_array_equal(z2, x + x)
    finally:
        b.stop()


def test_without_reconnect_the_session_just_ends(tmp_path: Path, broker_env: dict[str, str]) -> None:
    b = _broker(tmp_path, broker_env)
    try:
        c = tenantlib.connect(b.socket, timeout=60)
        c.ping()
        assert b.proc is not None
        b.proc.kill()
        b.proc.wait()
        with pytest.raises(errors.SessionClosed):
            c.ping()
        c.close()
    finally:
        b.stop()


def test_with_no_broker_back_a_call_gives_up_after_its_timeout(tmp_path: Path, broker_env: dict[str, str]) -> None:
    b = _broker(tmp_path, broker_env)
    try:
        c = tenantlib.connect(b.socket, reconnect=True, timeout=1.0)
        c.ping()
        assert b.proc is not None
        b.proc.kill()
        b.proc.wait()
        with pytest.raises(errors.BrokerUnavailable) as info:
            c.ping()  # tries again with back-off for its timeout, then says so
        assert info.value.detail["retryable"] is True
        b.stop()
        b = _broker(tmp_path, broker_env)
        assert c.ping() > 0  # and the next call finds the new broker
        c.close()
    finally:
        b.stop()


def test_a_request_of_the_lost_session_is_answered_at_once(tmp_path: Path, broker_env: dict[str, str]) -> None:
    b = _broker(tmp_path, broker_env)
    try:
        c = tenantlib.connect(b.socket, reconnect=True, timeout=60)
        lib = c.library(_SLOW, kernels=[*kernels.KERNELS, testing.SLOW])
        slow = c.graph()
        slow.kernel(lib, "slow", grid=1, block=1, args=[3000])
        pending = c.submit(slow)
        assert b.proc is not None
        b.proc.kill()
        b.proc.wait()
        b.stop()
        b = _broker(tmp_path, broker_env)
        assert c.ping() > 0  # reconnects before anyone waited for the old request
        with pytest.raises(errors.BrokerUnavailable) as info:
            pending.result()  # no reply can come from the new broker: told at once, not at the timeout
        assert info.value.detail["retryable"] is True
        c.close()
        with pytest.raises(errors.SessionClosed):
            c.ping()  # a closed client does not open a new session
    finally:
        b.stop()


def test_an_asyncio_tenant_carries_on_after_the_broker_restarts(tmp_path: Path, broker_env: dict[str, str]) -> None:
    import asyncio

    async def scenario() -> None:
        nonlocal b
        c = await tenantlib.connect_async(b.socket, reconnect=True, timeout=60)
        try:
            lib = await c.library(_SLOW, kernels=[*kernels.KERNELS, testing.SLOW])
            x, y, z = await c.array(1000), await c.array(1000), await c.array(1000)
            x[...], y[...] = 1.5, 2.0
            res = await c.resident(y)
            g = c.graph()
            grid, block = kernels.launch_1d(1000)
            g.kernel(lib, "vadd", grid=grid, block=block, args=[g.input(x), g.resident(res), g.output(z), 1000])
            await c.run(g)
            np.testing.assert_array_equal(z, x + y)
            slow = c.graph()
            slow.kernel(lib, "slow", grid=1, block=1, args=[3000])
            pending = asyncio.ensure_future(c.run(slow))
            await asyncio.sleep(0.3)
            assert b.proc is not None
            b.proc.kill()  # mid-request
            with pytest.raises(errors.BrokerUnavailable) as info:
                await pending  # it may or may not have run: the tenant is told so
            assert info.value.detail["retryable"] is True
            b.proc.wait(60)
            b.stop()
            b = _broker(tmp_path, broker_env)  # the same socket, a new broker with nothing registered
            x[...] = 4.0
            await c.run(g)  # connects again; the arenas, the library and the resident come back
            np.testing.assert_array_equal(z, x + y)
            assert (await c.run(slow)).device == "cpu:0"
        finally:
            await c.close()

    b = _broker(tmp_path, broker_env)
    try:
        asyncio.run(scenario())
    finally:
        b.stop()


def test_without_reconnect_an_asyncio_session_just_ends(tmp_path: Path, broker_env: dict[str, str]) -> None:
    import asyncio

    async def scenario(b: BrokerProcess) -> None:
        c = await tenantlib.connect_async(b.socket, timeout=60)
        await c.ping()
        assert b.proc is not None
        b.proc.kill()
        b.proc.wait()
        with pytest.raises(errors.SessionClosed):
            await c.ping()
        await c.close()

    b = _broker(tmp_path, broker_env)
    try:
        asyncio.run(scenario(b))
    finally:
        b.stop()
