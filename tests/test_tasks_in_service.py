"""Tracked tasks seen from a service: critical tasks, logging and counting failures.

Issue 3, bullet 5: ``spawn(..., critical=True)``: an exception (or an
unexpected return) of a critical task cancels the token with
``ShutdownReason.Fatal(...)`` naming the task. Every task exception is logged
with its traceback on the ``dig_service`` logger and counted in ``stats()``.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from _support import ScriptedNode

from dig_service import (
    AlreadyStopped,
    ExitReason,
    RunContext,
    Service,
    ShutdownReason,
    StartContext,
    TaskKind,
)

pytestmark = pytest.mark.asyncio


async def test_critical_task_exception_fires_the_token_with_fatal_naming_it() -> None:
    """Proves: a critical task that raises cancels the token with ``Fatal`` whose
    message names the task and the error; the service then exits non-gracefully
    (exit code 1) through the normal shutdown path.

    Catches: a dead sync loop leaving the node "running" but useless, or a Fatal
    reason that does not say which task died.
    """

    async def sync_loop() -> None:
        await asyncio.sleep(0)
        raise ConnectionError("peer table corrupt")

    async def on_start(ctx: StartContext) -> None:
        ctx.tasks.spawn("sync-loop", TaskKind.BackgroundLoop, sync_loop(), critical=True)

    node = ScriptedNode(on_start=on_start)
    service = Service(node)
    status = await service.start()

    reason = service.shutdown_token.reason()
    assert isinstance(reason, ShutdownReason.Fatal)
    assert "sync-loop" in reason.message and "peer table corrupt" in reason.message
    assert status.reason == ExitReason.RequestedShutdown(reason)
    assert not status.is_graceful() and status.exit_code == 1
    assert service.tasks.stats().failed == 1


async def test_critical_task_returning_while_running_fires_the_token() -> None:
    """Proves: a critical task that *returns* while the service is running is an
    unexpected exit: the token fires with ``Fatal`` naming the task.

    Catches: a critical loop that quietly ``return``s on a bug, leaving the node
    without that loop forever.
    """

    async def returns_early() -> None:
        await asyncio.sleep(0)

    async def on_start(ctx: StartContext) -> None:
        ctx.tasks.spawn("heartbeat", TaskKind.BackgroundLoop, returns_early(), critical=True)

    service = Service(ScriptedNode(on_start=on_start))
    status = await service.start()
    reason = service.shutdown_token.reason()
    assert isinstance(reason, ShutdownReason.Fatal) and "heartbeat" in reason.message
    assert status.exit_code == 1


async def test_critical_task_returning_after_shutdown_is_normal() -> None:
    """Proves: a critical task that returns *because* the token fired is a normal
    wind-down: the reason stays the requested one and the exit is graceful.

    Catches: every orderly shutdown being reported as Fatal (exit code 1).
    """

    async def on_start(ctx: StartContext) -> None:
        ctx.tasks.spawn("loop", TaskKind.BackgroundLoop, ctx.shutdown.cancelled(), critical=True)

    node = ScriptedNode(on_start=on_start)
    service = Service(node)
    starting = asyncio.ensure_future(service.start())
    await node.run_started.wait()
    service.request_shutdown(ShutdownReason.UserRequested())
    status = await starting
    assert status.reason == ExitReason.RequestedShutdown(ShutdownReason.UserRequested())
    assert status.exit_code == 0


async def test_non_critical_failure_is_logged_with_traceback_and_counted_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proves: a failing non-critical task does not stop the service; its exception is
    logged with its traceback on a ``dig_service`` logger (naming the task) and counted
    in ``stats().failed``.

    Catches: a lost exception ("Task exception was never retrieved" or nothing at all),
    or any task failure killing the whole service.
    """
    failed = asyncio.Event()

    async def flaky() -> None:
        try:
            raise LookupError("cache miss storm")
        finally:
            failed.set()

    async def run(ctx: RunContext) -> None:
        ctx.tasks.spawn("cache-warmer", TaskKind.Maintenance, flaky())
        await failed.wait()
        await asyncio.sleep(0)  # let the done callback run
        assert not ctx.shutdown.is_cancelled()

    with caplog.at_level(logging.ERROR, logger="dig_service"):
        service = Service(ScriptedNode(run=run))
        status = await service.start()

    assert status.reason == ExitReason.RunCompleted()
    stats = service.tasks.stats()
    assert (stats.spawned, stats.failed, stats.live) == (1, 1, 0)
    records = [r for r in caplog.records if "cache-warmer" in r.getMessage()]
    assert len(records) == 1
    record = records[0]
    assert record.name.startswith("dig_service")
    assert record.exc_info is not None and isinstance(record.exc_info[1], LookupError)
    assert "cache miss storm" in caplog.text and "in flaky" in caplog.text


async def test_spawn_after_the_service_stopped_is_already_stopped_without_warning() -> None:
    """Proves: once the service has joined its tasks, ``spawn`` raises ``AlreadyStopped``
    and closes the coroutine (no "was never awaited" warning).

    Catches: work started after shutdown that nobody will ever join.
    """
    service = Service(ScriptedNode(run=lambda ctx: asyncio.sleep(0)))
    await service.start()

    async def late() -> None: ...

    coro = late()
    with pytest.raises(AlreadyStopped):
        service.tasks.spawn("late", TaskKind.RpcHandler, coro)
    assert coro.cr_frame is None  # closed


async def test_spawn_with_a_wrong_kind_or_a_function_says_what_to_change() -> None:
    """Proves: the mistakes a new user makes with ``spawn`` (passing the function
    instead of calling it, a string kind) produce a ``TypeError`` naming the parameter
    and the fix.

    Catches: errors that only say "expected coroutine" without the remedy.
    """

    async def work() -> None: ...

    async def run(ctx: RunContext) -> None:
        with pytest.raises(TypeError, match=r"`coro` must be a coroutine.*call the async function"):
            ctx.tasks.spawn("w", TaskKind.BackgroundLoop, work)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"`kind` must be a dig_service\.TaskKind"):
            ctx.tasks.spawn("w", "background", work())  # type: ignore[arg-type]

    await Service(ScriptedNode(run=run)).start()
