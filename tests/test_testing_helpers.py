"""``dig_service.testing``: ``TestNode`` as the Rust ``testing::TestNode``, and
``spawn_native_sleeper`` re-exported from the core.

Issue 3, bullet 6.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from dig_service import (
    ExitReason,
    OnStartFailed,
    OnStopFailed,
    PreStartFailed,
    RunFailed,
    Service,
    ServiceError,
    ShutdownReason,
    ShutdownToken,
    TaskKind,
    TaskRegistry,
    _core,
)
from dig_service.testing import TestNode, spawn_native_sleeper


@pytest.mark.asyncio
async def test_default_test_node_runs_until_shutdown_and_exits_gracefully() -> None:
    """Proves: ``TestNode()`` is named ``"test"``, never fails, runs until shutdown and
    exits gracefully with the requested reason (the Rust crate's "TestNode exits
    gracefully" test).

    Catches: a TestNode whose run returns at once (tests of shutdown paths would then
    pass vacuously through ``RunCompleted``).
    """
    node = TestNode()
    service = Service(node)
    assert TestNode.NAME == "test" and service.handle().name() == "test"
    starting = asyncio.ensure_future(service.start())
    done, _ = await asyncio.wait((starting,), timeout=0.05)
    assert not done, "TestNode.run must wait for the shutdown token"
    service.request_shutdown(ShutdownReason.UserRequested())
    status = await starting
    assert status.reason == ExitReason.RequestedShutdown(ShutdownReason.UserRequested())
    assert status.is_graceful()
    assert node.calls == ["pre_start", "on_start", "run", "on_stop", "post_stop"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("flag", "error", "calls"),
    [
        ("fail_pre_start", PreStartFailed, ["pre_start"]),
        ("fail_on_start", OnStartFailed, ["pre_start", "on_start", "post_stop"]),
        ("fail_run", RunFailed, ["pre_start", "on_start", "run", "on_stop", "post_stop"]),
        ("fail_on_stop", OnStopFailed, ["pre_start", "on_start", "run", "on_stop", "post_stop"]),
    ],
)
async def test_each_failure_switch_fails_its_hook(
    flag: str, error: type[ServiceError], calls: list[str]
) -> None:
    """Proves: each ``fail_*`` switch makes exactly its hook raise a ``RuntimeError``
    ``"<hook> failure injected"``, surfacing as the matching ``ServiceError``, with the
    hooks the contract prescribes having run.

    Catches: a switch wired to the wrong hook, or a TestNode whose failures do not
    follow the Rust one (``fail_run`` must fail at once, not after shutdown).
    """
    node = TestNode(**{flag: True}, run_delay=0.01)
    with pytest.raises(error) as info:
        await Service(node).start()
    hook = flag.removeprefix("fail_")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert str(info.value.__cause__) == f"{hook} failure injected"
    assert node.calls == calls


@pytest.mark.asyncio
async def test_run_delay_returns_by_itself_unless_shutdown_comes_first() -> None:
    """Proves: with ``run_delay`` set, ``run`` returns by itself after about that long
    (``RunCompleted``), and returns at once if shutdown comes first.

    Catches: ``run_delay`` ignoring the token (slowing every test) or ignored itself.
    """
    t0 = time.monotonic()
    status = await Service(TestNode(run_delay=0.05)).start()
    assert status.reason == ExitReason.RunCompleted()
    assert time.monotonic() - t0 >= 0.05

    service = Service(TestNode(run_delay=3600))
    service.request_shutdown(ShutdownReason.RpcRequested())
    t0 = time.monotonic()
    status = await service.start()
    assert status.reason == ExitReason.RequestedShutdown(ShutdownReason.RpcRequested())
    assert time.monotonic() - t0 < 2.0


def test_test_node_validates_its_arguments() -> None:
    """Proves: a non-bool switch or a negative/non-numeric ``run_delay`` is rejected
    naming the parameter.

    Catches: ``TestNode(fail_run="yes")`` silently meaning True.
    """
    with pytest.raises(TypeError, match="`fail_run` must be bool"):
        TestNode(fail_run="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`run_delay` must be a finite number"):
        TestNode(run_delay=-1)
    with pytest.raises(TypeError, match="`run_delay` must be a number"):
        TestNode(run_delay="1")  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_spawn_native_sleeper_is_the_core_function_and_tracks_a_native_task() -> None:
    """Proves: ``dig_service.testing.spawn_native_sleeper`` is the core's function and
    puts a real native task (``origin == "native"``) in the registry that a join waits for.

    Catches: a Python stand-in that would make "native tracking" tests meaningless.
    """
    assert spawn_native_sleeper is _core.spawn_native_sleeper
    token = ShutdownToken()
    registry = TaskRegistry(token)
    handle = spawn_native_sleeper(registry, "sleeper", 3600.0)
    assert handle.origin == "native" and handle.kind == TaskKind.BackgroundLoop
    assert [s.origin for s in registry.snapshot()] == ["native"]
    token.cancel(ShutdownReason.UserRequested())
    await registry.join_all(5.0)
    assert registry.is_closed() and len(registry) == 0
