"""``Service.start()``: what the contract table cannot say.

Every row of the SPEC section 3 table (and the error priority, the
cancelled ``start()`` and the run/cancel race) is a row of
``contract/start.toml``, run against this implementation by
``tests/test_contract.py`` and against the Rust one by
``rust/tests/contract.rs``. The tests here check what a row cannot: which
object is handed to the stop hooks, the order tasks end in relative to a
hook, that stragglers really see their cancellation, a native straggler next
to Python ones, bounds on how long a shutdown waits, ``asyncio.timeout`` and
a second cancellation around ``start()``, notes and logs of the failures
that are not raised, and the original traceback behind ``__cause__``. They
keep the SPEC row numbers in their names.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from typing import Any

import pytest
from _support import ScriptedNode, eventually, forever, raiser, returns_at_once

from dig_service import (
    AlreadyRunning,
    ExitReason,
    ExitStatus,
    OnStartFailed,
    OnStopFailed,
    PreStartFailed,
    RunContext,
    RunFailed,
    Service,
    ServiceConfig,
    ServiceError,
    ShutdownDeadlineExceeded,
    ShutdownReason,
    StartContext,
    StopContext,
    TaskKind,
)
from dig_service.testing import spawn_native_sleeper

pytestmark = pytest.mark.asyncio

ALL_HOOKS = ["pre_start", "on_start", "run", "on_stop", "post_stop"]


async def start_and_stop(service: Service[Any, Any, Any], reason: ShutdownReason) -> ExitStatus:
    """Start ``service``, request shutdown with ``reason`` once ``run`` began, return the status."""
    node = service.node
    starting = asyncio.ensure_future(service.start())
    await node.run_started.wait()
    service.request_shutdown(reason)
    return await starting


# --------------------------------------------------------------------------- row 1


async def test_row1_first_reason_wins_and_handle_sees_the_same_status() -> None:
    """Proves: when several parties ask for shutdown, the first reason is the one
    reported, and ``wait_for_exit`` (service and handle) returns the same status.

    Catches: a later ``request_shutdown`` overwriting the reason; a handle that
    reports something different from ``start()``.
    """
    node = ScriptedNode()
    service = Service(node)
    handle = service.handle()
    starting = asyncio.ensure_future(service.start())
    await node.run_started.wait()
    handle.request_shutdown(ShutdownReason.RpcRequested())
    service.request_shutdown(ShutdownReason.UserRequested())
    status = await starting
    assert status.reason == ExitReason.RequestedShutdown(ShutdownReason.RpcRequested())
    assert await service.wait_for_exit() == status
    assert await handle.wait_for_exit() == status


# --------------------------------------------------------------------------- row 4


async def test_row4_on_start_raises_on_start_failed_post_stop_runs_not_run_or_on_stop() -> None:
    """Proves: ``on_start`` raises -> ``OnStartFailed`` (cause: the exception);
    ``post_stop`` runs with ``exit_reason == RunError(that exception)``; ``run`` and
    ``on_stop`` do not run.

    Catches: a leaked resource because ``post_stop`` is skipped, or ``on_stop``/``run``
    called on a node that never finished starting.
    """
    boom = RuntimeError("cannot bind")
    node = ScriptedNode(on_start=raiser(boom))
    with pytest.raises(OnStartFailed) as info:
        await Service(node).start()

    assert info.value.__cause__ is boom
    assert node.calls == ["pre_start", "on_start", "post_stop"]
    assert node.contexts["post_stop"].exit_reason == ExitReason.RunError(boom)


# --------------------------------------------------------------------------- row 5


async def test_row5_run_raises_run_failed_tasks_joined_on_stop_and_post_stop_run() -> None:
    """Proves: ``run`` raises -> ``RunFailed`` (cause: the exception); the token fires
    with ``Fatal``; a task spawned by ``run`` is joined before ``on_stop``; ``on_stop``
    and ``post_stop`` still run and see ``exit_reason == RunError(exception)``.

    Catches: the original crate's bug (SVC-002): a failed ``run`` skipping clean-up;
    tasks still running while ``on_stop`` flushes state.
    """
    boom = ValueError("corrupt block")
    events: list[str] = []

    async def worker(ctx: RunContext) -> None:
        await ctx.shutdown.cancelled()
        events.append("task finished")

    async def run(ctx: RunContext) -> None:
        ctx.tasks.spawn("worker", TaskKind.BackgroundLoop, worker(ctx))
        await asyncio.sleep(0)
        raise boom

    async def on_stop(ctx: StopContext) -> None:
        events.append("on_stop")

    node = ScriptedNode(run=run, on_stop=on_stop)
    service = Service(node)
    with pytest.raises(RunFailed) as info:
        await service.start()

    assert info.value.__cause__ is boom
    assert node.calls == ALL_HOOKS
    assert events == ["task finished", "on_stop"]
    assert node.contexts["on_stop"].exit_reason == ExitReason.RunError(boom)
    assert node.contexts["post_stop"].exit_reason == ExitReason.RunError(boom)
    reason = service.shutdown_token.reason()
    assert isinstance(reason, ShutdownReason.Fatal) and "corrupt block" in reason.message


# --------------------------------------------------------------------------- row 7


async def test_row7_tasks_outliving_the_deadline_are_cancelled_and_named() -> None:
    """Proves: tracked Python tasks that outlive ``shutdown_deadline`` after the token
    fired are cancelled and reported by ``ShutdownDeadlineExceeded`` with the exact
    count and names; ``on_stop``/``post_stop`` still run; the wait is bounded.

    Catches: a join that waits forever for a task ignoring the token, stragglers left
    running after ``start()`` returned, a deadline error without the names.
    """
    cancelled: list[str] = []

    async def ignores_token(name: str) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    async def on_start(ctx: StartContext) -> None:
        ctx.tasks.spawn("stuck-a", TaskKind.BackgroundLoop, ignores_token("stuck-a"))
        ctx.tasks.spawn("stuck-b", TaskKind.PeerConnection, ignores_token("stuck-b"))
        ctx.tasks.spawn("polite", TaskKind.Maintenance, ctx.shutdown.cancelled())

    node = ScriptedNode(on_start=on_start)
    service = Service(node, config=ServiceConfig(shutdown_deadline=0.2))
    t0 = time.monotonic()
    with pytest.raises(ShutdownDeadlineExceeded) as info:
        await start_and_stop(service, ShutdownReason.UserRequested())
    elapsed = time.monotonic() - t0

    err = info.value
    assert err.deadline == pytest.approx(0.2)
    assert err.pending == 2
    assert sorted(err.pending_names) == ["stuck-a", "stuck-b"]
    assert sorted(cancelled) == ["stuck-a", "stuck-b"]
    assert node.calls == ALL_HOOKS
    assert len(service.tasks) == 0
    # run and the join share 0.2 - the default reserve (0.2 / 4) = 0.15 s.
    assert 0.15 <= elapsed < 2.0


async def test_row7_native_task_outliving_the_deadline_is_aborted() -> None:
    """Proves: a native tokio task that ignores the token is aborted at the deadline
    and named in ``ShutdownDeadlineExceeded`` next to Python stragglers (one
    deadline, one count for both kinds).

    Catches: native tasks escaping the service deadline, or being counted apart.
    """

    async def on_start(ctx: StartContext) -> None:
        spawn_native_sleeper(ctx.tasks, "native-stuck", 3600.0, honor_shutdown=False)
        spawn_native_sleeper(ctx.tasks, "native-polite", 3600.0, honor_shutdown=True)
        ctx.tasks.spawn("python-stuck", TaskKind.BackgroundLoop, forever())

    service = Service(ScriptedNode(on_start=on_start), config=ServiceConfig(shutdown_deadline=0.2))
    with pytest.raises(ShutdownDeadlineExceeded) as info:
        await start_and_stop(service, ShutdownReason.UserRequested())
    assert info.value.pending == 2
    assert sorted(info.value.pending_names) == ["native-stuck", "python-stuck"]
    # The abort is delivered on the tokio runtime: its bookkeeping lands just after.
    await eventually(lambda: service.tasks.stats().aborted == 1 and len(service.tasks) == 0)


async def test_row7_run_that_swallows_cancellation_cannot_hold_start_past_the_deadline() -> None:
    """Proves: even a ``run`` that swallows ``CancelledError`` does not keep ``start()``
    from returning shortly after the deadline ("no stage blocks shutdown longer
    than the configured deadline").

    Catches: a lifecycle that awaits the cancelled ``run`` to completion.
    """
    release = asyncio.Event()

    async def run(ctx: RunContext) -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                pass  # misbehaving: ignores cancellation

    node = ScriptedNode(run=run)
    service = Service(node, config=ServiceConfig(shutdown_deadline=0.1))
    starting = asyncio.ensure_future(service.start())
    await node.run_started.wait()
    t0 = time.monotonic()
    service.request_shutdown(ShutdownReason.UserRequested())
    with pytest.raises(ShutdownDeadlineExceeded) as info:
        await starting
    assert time.monotonic() - t0 < 2.0
    assert info.value.pending_names == ["run"]
    release.set()  # let the misbehaving run end before the loop closes
    await asyncio.sleep(0)


# --------------------------------------------------------------------------- row 9


async def test_row9_start_twice_is_already_running_while_running_and_after_exit() -> None:
    """Proves: a second ``start()`` raises ``AlreadyRunning`` both while the first runs
    and after it returned, with a message that says to build a new ``Service``; the
    first run is not disturbed.

    Catches: a second lifecycle on the same node (double ``pre_start``), or a silent
    no-op that returns a bogus status.
    """
    node = ScriptedNode()
    service = Service(node)
    starting = asyncio.ensure_future(service.start())
    await node.run_started.wait()
    with pytest.raises(AlreadyRunning, match="new Service"):
        await service.start()
    service.request_shutdown(ShutdownReason.UserRequested())
    status = await starting
    assert status.is_graceful()
    with pytest.raises(AlreadyRunning):
        await service.start()
    assert node.calls == ALL_HOOKS


# --------------------------------------------------------------------------- row 10


async def test_row10_asyncio_timeout_around_start_still_becomes_timeout_error() -> None:
    """Proves: ``asyncio.timeout`` around ``start()`` works: the clean-up runs and the
    timeout surfaces as ``TimeoutError`` (the cancellation is re-raised, not swallowed).

    Catches: a ``start()`` that swallows or replaces ``CancelledError``, which makes
    ``asyncio.timeout`` and ``TaskGroup`` misbehave.
    """
    node = ScriptedNode()
    service = Service(node)
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(None) as timeout:

            async def expire_once_running() -> None:
                await node.run_started.wait()
                timeout.reschedule(loop.time())

            expiring = asyncio.ensure_future(expire_once_running())
            await service.start()
    await expiring
    assert node.calls == ALL_HOOKS


async def test_row10_second_cancellation_does_not_cut_the_clean_up_short() -> None:
    """Proves: cancelling the caller again while it winds down does not skip
    ``on_stop``/``post_stop``; ``CancelledError`` propagates once they ran.

    Catches: a double Ctrl-C/cancel leaving the node half-stopped.
    """
    on_stop_entered = asyncio.Event()
    release = asyncio.Event()

    async def on_stop(ctx: StopContext) -> None:
        on_stop_entered.set()
        await release.wait()

    node = ScriptedNode(on_stop=on_stop)
    service = Service(node)
    starting = asyncio.ensure_future(service.start())
    await node.run_started.wait()
    starting.cancel()
    await on_stop_entered.wait()
    starting.cancel()
    await asyncio.sleep(0)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert node.calls == ALL_HOOKS


# ------------------------------------------------------------------ order, priority, causes


async def test_order_after_run_is_cancel_join_on_stop_post_stop() -> None:
    """Proves: after ``run``: cancel token -> ``join_all`` -> ``on_stop`` -> ``post_stop``:
    ``on_stop`` sees a fired token and a joined, closed registry.

    Catches: ``on_stop`` racing live tasks, or the registry still accepting spawns.
    """
    seen: dict[str, Any] = {}

    async def on_stop(ctx: StopContext) -> None:
        seen["cancelled"] = ctx.shutdown.is_cancelled()
        seen["live"] = len(ctx.tasks)
        seen["closed"] = ctx.tasks.is_closed()

    async def run(ctx: RunContext) -> None:
        ctx.tasks.spawn("t", TaskKind.BackgroundLoop, ctx.shutdown.cancelled())

    await Service(ScriptedNode(run=run, on_stop=on_stop)).start()
    assert seen == {"cancelled": True, "live": 0, "closed": True}


@pytest.mark.parametrize(
    ("failing", "expected", "cause_from"),
    [
        ({"run", "on_stop", "post_stop", "join"}, RunFailed, "run"),
        ({"on_stop", "post_stop", "join"}, OnStopFailed, "on_stop"),
        ({"post_stop", "join"}, OnStopFailed, "post_stop"),
        ({"join"}, ShutdownDeadlineExceeded, None),
    ],
    ids=["run-wins", "on_stop-wins", "post_stop-wins", "join-alone"],
)
async def test_error_priority_run_then_on_stop_then_post_stop_then_join(
    failing: set[str],
    expected: type[ServiceError],
    cause_from: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proves: when several stages fail, the raised error is the first of
    run > on_stop > post_stop > join (with that stage's exception as cause); every
    other failure is logged on the ``dig_service`` logger and noted on the error.

    Catches: a later failure masking the root cause (e.g. a join timeout hiding
    why ``run`` crashed), or secondary failures vanishing without a trace.
    """
    errors = {hook: RuntimeError(f"{hook} broke") for hook in ("run", "on_stop", "post_stop")}
    scripts: dict[str, Any] = {hook: raiser(exc) for hook, exc in errors.items() if hook in failing}

    async def on_start(ctx: StartContext) -> None:
        if "join" in failing:
            ctx.tasks.spawn("straggler", TaskKind.BackgroundLoop, forever())

    scripts.setdefault("run", returns_at_once)
    node = ScriptedNode(on_start=on_start, **scripts)
    service = Service(node, config=ServiceConfig(shutdown_deadline=0.1))
    with caplog.at_level(logging.ERROR, logger="dig_service"):
        with pytest.raises(expected) as info:
            await service.start()

    err = info.value
    assert type(err) is expected
    if cause_from is not None:
        assert err.__cause__ is errors[cause_from]
    assert node.calls == ALL_HOOKS
    secondary = len(failing) - 1
    assert len(getattr(err, "__notes__", [])) == secondary
    suppressed = [r for r in caplog.records if "failed too" in r.getMessage()]
    assert len(suppressed) == secondary
    assert all(r.exc_info is not None for r in suppressed)


async def test_every_service_error_keeps_the_original_traceback() -> None:
    """Proves: the ``__cause__`` of a ``ServiceError`` is the original exception with
    its traceback (the frame that raised it is in the formatted chain), and the
    implicit ``__context__`` is suppressed as with ``raise ... from``.

    Catches: an error re-created from ``str(exc)`` (losing type and traceback), the
    point the issue calls "chained, not re-formatted".
    """

    def deep_helper() -> None:
        raise KeyError("missing-config-key")

    async def pre_start(ctx: StartContext) -> None:
        deep_helper()

    with pytest.raises(PreStartFailed) as info:
        await Service(ScriptedNode(pre_start=pre_start)).start()
    err = info.value
    assert isinstance(err.__cause__, KeyError)
    assert err.__suppress_context__
    formatted = "".join(traceback.format_exception(err))
    assert "deep_helper" in formatted
    assert "The above exception was the direct cause" in formatted
