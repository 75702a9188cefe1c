"""``Service.start()``: one test per row of the SPEC section 3 contract table.

Rows (SPEC wording) and the tests that keep them:

1. shutdown requested from outside -> ``test_row1_*``
2. ``run`` returned by itself -> ``test_row2_*``
3. ``pre_start`` raises -> ``test_row3_*``
4. ``on_start`` raises -> ``test_row4_*``
5. ``run`` raises -> ``test_row5_*``
6. ``on_stop`` or ``post_stop`` raises -> ``test_row6_*``
7. tracked tasks (or ``run`` itself) outlive the deadline -> ``test_row7_*``
8. a hook outlives ``hook_timeout`` -> ``test_row8_*``
9. ``start`` called twice -> ``test_row9_*``
10. the task awaiting ``start()`` is cancelled -> ``test_row10_*``

plus the paragraph under the table: the order after ``run``, the error
priority run > on_stop > post_stop > join, and ``__cause__`` chaining.
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


@pytest.mark.parametrize(
    "reason",
    [
        ShutdownReason.UserRequested(),
        ShutdownReason.RpcRequested(),
        ShutdownReason.ReloadRequested(),
        ShutdownReason.Fatal("disk gone"),
    ],
    ids=repr,
)
async def test_row1_shutdown_from_outside_returns_requested_shutdown(
    reason: ShutdownReason,
) -> None:
    """Proves: all hooks succeed + shutdown requested from outside ->
    ``ExitStatus(ExitReason.RequestedShutdown(that reason))``, every hook ran once in
    order, and ``is_graceful``/``exit_code`` follow the reason (Fatal -> 1).

    Catches: a status that loses or replaces the reason (e.g. always
    ``RunCompleted``), skipped or reordered hooks, a Fatal reported as exit code 0.
    """
    node = ScriptedNode()
    service = Service(node)
    status = await start_and_stop(service, reason)

    assert status == ExitStatus(ExitReason.RequestedShutdown(reason))
    assert node.calls == ALL_HOOKS
    fatal = isinstance(reason, ShutdownReason.Fatal)
    assert status.is_graceful() is not fatal
    assert status.exit_code == (1 if fatal else 0)
    assert service.shutdown_token.reason() == reason


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


# --------------------------------------------------------------------------- row 2


async def test_row2_run_returning_by_itself_is_run_completed_and_winds_tasks_down() -> None:
    """Proves: ``run`` returning by itself -> ``ExitStatus(ExitReason.RunCompleted())``;
    the token is then cancelled with ``ShutdownReason.RequestedByRun()`` so that a
    background task waiting on it winds down (and is joined before ``on_stop``).

    Catches: a service that hangs because nobody fires the token after ``run``
    returned, the wrong reason on the token, tasks still live during ``on_stop``.
    """
    seen: list[ShutdownReason | None] = []
    live_at_on_stop: list[int] = []

    async def background(ctx: RunContext) -> None:
        await ctx.shutdown.cancelled()
        seen.append(ctx.shutdown.reason())

    async def run(ctx: RunContext) -> None:
        ctx.tasks.spawn("waits-for-shutdown", TaskKind.BackgroundLoop, background(ctx))

    async def on_stop(ctx: StopContext) -> None:
        live_at_on_stop.append(len(ctx.tasks))

    node = ScriptedNode(run=run, on_stop=on_stop)
    service = Service(node)
    status = await service.start()

    assert status == ExitStatus(ExitReason.RunCompleted())
    assert status.is_graceful() and status.exit_code == 0
    assert service.shutdown_token.reason() == ShutdownReason.RequestedByRun()
    assert seen == [ShutdownReason.RequestedByRun()]
    assert live_at_on_stop == [0]
    assert node.calls == ALL_HOOKS


async def test_row2_run_that_fires_the_token_itself_reports_its_reason() -> None:
    """Proves: a ``run`` that cancels the token itself and returns is reported as
    ``RequestedShutdown(its reason)``, as in the Rust crate.

    Catches: ``RunCompleted`` reported although the token had fired (losing the reason).
    """

    async def run(ctx: RunContext) -> None:
        ctx.shutdown.cancel(ShutdownReason.ReloadRequested())

    status = await Service(ScriptedNode(run=run)).start()
    assert status.reason == ExitReason.RequestedShutdown(ShutdownReason.ReloadRequested())


# --------------------------------------------------------------------------- row 3


async def test_row3_pre_start_raises_pre_start_failed_and_nothing_else_runs() -> None:
    """Proves: ``pre_start`` raises -> ``PreStartFailed`` with the very exception as
    ``__cause__``; no later hook runs; the token fires with ``Fatal`` and a task
    spawned by ``pre_start`` is stopped and joined before ``start()`` returns.

    Catches: later hooks running after a failed ``pre_start``; a re-formatted error
    instead of the original; tasks left running after ``start()`` returned.
    """
    boom = OSError("store is locked")
    finished: list[str] = []

    async def spawned(ctx: StartContext) -> None:
        try:
            await ctx.shutdown.cancelled()
        finally:
            finished.append("task")

    async def pre_start(ctx: StartContext) -> None:
        ctx.tasks.spawn("spawned-in-pre-start", TaskKind.Maintenance, spawned(ctx))
        raise boom

    node = ScriptedNode(pre_start=pre_start)
    service = Service(node)
    with pytest.raises(PreStartFailed) as info:
        await service.start()

    assert info.value.__cause__ is boom
    assert "pre_start" in str(info.value) and "store is locked" in str(info.value)
    assert node.calls == ["pre_start"]
    reason = service.shutdown_token.reason()
    assert isinstance(reason, ShutdownReason.Fatal) and "pre_start" in reason.message
    assert finished == ["task"]
    assert len(service.tasks) == 0 and service.tasks.is_closed()


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


# --------------------------------------------------------------------------- row 6


@pytest.mark.parametrize("failing", ["on_stop", "post_stop"])
async def test_row6_on_stop_or_post_stop_raises_on_stop_failed_later_hook_still_runs(
    failing: str,
) -> None:
    """Proves: ``on_stop`` or ``post_stop`` raises -> ``OnStopFailed`` with the
    exception as cause; when ``on_stop`` fails, ``post_stop`` still runs.

    Catches: a failed ``on_stop`` that skips ``post_stop`` (locks never released),
    or a ``post_stop`` failure that is swallowed.
    """
    boom = RuntimeError(f"{failing} exploded")
    node = ScriptedNode(run=returns_at_once, **{failing: raiser(boom)})
    with pytest.raises(OnStopFailed) as info:
        await Service(node).start()
    assert info.value.__cause__ is boom
    assert node.calls == ALL_HOOKS


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
    assert 0.2 <= elapsed < 2.0


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


async def test_row7_run_outliving_the_deadline_is_cancelled_and_named_first() -> None:
    """Proves: once the token fired, ``run`` itself is bounded by ``shutdown_deadline``:
    a ``run`` that ignores the token is cancelled, ``ShutdownDeadlineExceeded`` names
    ``"run"`` first (then every task still live, stopped at once), and ``on_stop`` /
    ``post_stop`` still run.

    Catches: the original crate's SVC-006 gap: a ``run`` that never returns hangs the
    process forever after SIGTERM.
    """
    run_cancelled = asyncio.Event()

    async def run(ctx: RunContext) -> None:
        ctx.tasks.spawn("also-stuck", TaskKind.BackgroundLoop, forever())
        try:
            await asyncio.Event().wait()  # ignores the token
        except asyncio.CancelledError:
            run_cancelled.set()
            raise

    node = ScriptedNode(run=run)
    service = Service(node, config=ServiceConfig(shutdown_deadline=0.2))
    starting = asyncio.ensure_future(service.start())
    await node.run_started.wait()
    t0 = time.monotonic()
    service.request_shutdown(ShutdownReason.UserRequested())
    with pytest.raises(ShutdownDeadlineExceeded) as info:
        await starting
    elapsed = time.monotonic() - t0

    assert info.value.pending_names == ["run", "also-stuck"]
    assert info.value.pending == 2
    assert run_cancelled.is_set()
    assert node.calls == ALL_HOOKS
    assert 0.2 <= elapsed < 2.0


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


# --------------------------------------------------------------------------- row 8


@pytest.mark.parametrize(
    ("hook", "error"),
    [
        ("pre_start", PreStartFailed),
        ("on_start", OnStartFailed),
        ("on_stop", OnStopFailed),
        ("post_stop", OnStopFailed),
    ],
)
async def test_row8_hook_outliving_hook_timeout_fails_with_timeout_error_cause(
    hook: str, error: type[ServiceError]
) -> None:
    """Proves: an edge hook that outlives ``hook_timeout`` is cancelled and reported as
    *that hook's* failure, whose ``__cause__`` is a ``TimeoutError`` naming the hook
    and the setting; the wait is bounded by the timeout.

    Catches: a hung ``pre_start`` hanging the process, a timeout reported as the
    wrong error class, a bare TimeoutError without context.
    """
    cancelled = asyncio.Event()

    async def slow(ctx: Any) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    node = ScriptedNode(run=returns_at_once, **{hook: slow})
    service = Service(node, config=ServiceConfig(hook_timeout=0.1))
    t0 = time.monotonic()
    with pytest.raises(error) as info:
        await service.start()
    assert time.monotonic() - t0 < 2.0
    cause = info.value.__cause__
    assert isinstance(cause, TimeoutError)
    assert hook in str(cause) and "hook_timeout" in str(cause)
    assert cancelled.is_set()


async def test_row8_edge_hook_is_bounded_by_the_deadline_once_the_token_fired() -> None:
    """Proves: with no ``hook_timeout``, an edge hook still cannot outlive
    ``shutdown_deadline`` once the token has fired (here ``on_stop``): it fails with a
    ``TimeoutError`` cause that names the shutdown deadline.

    Catches: a stuck ``on_stop`` hanging shutdown forever when no hook_timeout is set.
    """
    node = ScriptedNode(on_stop=forever)
    service = Service(node, config=ServiceConfig(shutdown_deadline=0.1))
    t0 = time.monotonic()
    with pytest.raises(OnStopFailed) as info:
        await start_and_stop(service, ShutdownReason.UserRequested())
    assert time.monotonic() - t0 < 2.0
    assert isinstance(info.value.__cause__, TimeoutError)
    assert "shutdown_deadline" in str(info.value.__cause__)
    assert node.calls == ALL_HOOKS


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


async def test_row10_cancelled_caller_still_joins_tasks_and_runs_on_stop_post_stop() -> None:
    """Proves: cancelling the task awaiting ``start()`` fires the token
    (``UserRequested``), joins the tracked tasks, runs ``on_stop`` and ``post_stop``,
    and only then lets ``CancelledError`` propagate; ``wait_for_exit`` reports the
    orderly exit.

    Catches: ``asyncio.run`` + Ctrl-C (which cancels the main task) skipping the
    clean-up hooks and leaving tasks running.
    """
    events: list[str] = []

    async def worker(ctx: RunContext) -> None:
        await ctx.shutdown.cancelled()
        events.append("worker finished")

    async def run(ctx: RunContext) -> None:
        ctx.tasks.spawn("worker", TaskKind.BackgroundLoop, worker(ctx))
        await ctx.shutdown.cancelled()

    async def on_stop(ctx: StopContext) -> None:
        events.append("on_stop")

    async def post_stop(ctx: StopContext) -> None:
        events.append("post_stop")

    node = ScriptedNode(run=run, on_stop=on_stop, post_stop=post_stop)
    service = Service(node)
    starting = asyncio.ensure_future(service.start())
    await node.run_started.wait()
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting

    assert events == ["worker finished", "on_stop", "post_stop"]
    assert service.shutdown_token.reason() == ShutdownReason.UserRequested()
    assert len(service.tasks) == 0
    status = await service.wait_for_exit()
    assert status.reason == ExitReason.RequestedShutdown(ShutdownReason.UserRequested())


async def test_row10_cancelled_caller_clean_up_is_bounded_by_the_deadline() -> None:
    """Proves: the clean-up after a cancelled ``start()`` is bounded by the deadline:
    a task that ignores the token is cancelled at ``shutdown_deadline``, and
    ``CancelledError`` still propagates (not ``ShutdownDeadlineExceeded``).

    Catches: Ctrl-C hanging forever on a stuck task; the cancellation being turned
    into another exception (which would break ``asyncio.timeout``/TaskGroup).
    """

    async def on_start(ctx: StartContext) -> None:
        ctx.tasks.spawn("stuck", TaskKind.BackgroundLoop, forever())

    node = ScriptedNode(on_start=on_start)
    service = Service(node, config=ServiceConfig(shutdown_deadline=0.2))
    starting = asyncio.ensure_future(service.start())
    await node.run_started.wait()
    t0 = time.monotonic()
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert 0.2 <= time.monotonic() - t0 < 2.0
    assert node.calls == ALL_HOOKS
    with pytest.raises(ShutdownDeadlineExceeded) as info:
        await service.wait_for_exit()
    assert info.value.pending_names == ["stuck"]


async def test_row10_cancelled_during_on_start_runs_post_stop_only() -> None:
    """Proves: when the caller is cancelled while ``on_start`` runs, ``on_start`` is
    cancelled (it counts as failed), ``post_stop`` runs, ``run`` and ``on_stop`` do not,
    and ``CancelledError`` propagates.

    Catches: a cancelled start-up that keeps going into ``run``, or that forgets
    ``post_stop`` (leaking what ``pre_start`` opened).
    """
    entered = asyncio.Event()

    async def on_start(ctx: StartContext) -> None:
        entered.set()
        await asyncio.Event().wait()

    node = ScriptedNode(on_start=on_start)
    service = Service(node)
    starting = asyncio.ensure_future(service.start())
    await entered.wait()
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert node.calls == ["pre_start", "on_start", "post_stop"]
    with pytest.raises(OnStartFailed) as info:
        await service.wait_for_exit()
    assert isinstance(info.value.__cause__, asyncio.CancelledError)


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
