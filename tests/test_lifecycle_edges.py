"""The lifecycle where real processes end (issue 12, items 1-3).

- A failed ``start()`` leaves nothing alive: the service, its node and its
  recorded failure are collectable (``test_failed_starts_leave_no_node_alive``,
  ``test_a_kept_handle_does_not_keep_a_failed_service_alive``).
- ``asyncio.run`` cancelling every task while ``start()`` runs in one of them
  still runs the wind-down, within the deadline, and reports it
  (``test_asyncio_run_teardown_still_runs_the_stop_hooks`` and its twins).
- A ``BaseException`` that is not an ``Exception`` (``SystemExit``,
  ``KeyboardInterrupt``, others) raised in a hook or a tracked task: the join and
  the stop hooks still run, within the budget, then it propagates
  (``test_base_exception_in_a_hook_*``, ``test_system_exit_in_a_tracked_task_*``,
  and under the runner ``test_runner_*``).

Scenarios that must let an exception escape an event loop (asyncio re-raises
``KeyboardInterrupt``/``SystemExit`` out of the loop) or that need
``asyncio.run``'s own teardown run on a loop of their own, in an
``asyncio.Runner``, on asyncio and on uvloop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import mmap
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from _support import ScriptedNode, forever, loops, raiser, returns_at_once

from dig_service import (
    ExitReason,
    ExitStatus,
    NodeLifecycle,
    OnStartFailed,
    OnStopFailed,
    PreStartFailed,
    RunFailed,
    Service,
    ServiceConfig,
    ServiceError,
    ServiceHandle,
    ShutdownReason,
    StartContext,
    TaskKind,
)
from dig_service._runner import run_service


def run_in_runner(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    main: Callable[[], Coroutine[Any, Any, object]],
) -> BaseException | None:
    """``asyncio.run(main())`` on a loop from ``loop_factory`` (teardown included); what it
    raised, if anything."""
    try:
        with asyncio.Runner(loop_factory=loop_factory, debug=False) as runner:
            runner.run(main())
    except BaseException as exc:  # SystemExit, KeyboardInterrupt: the point of these tests
        return exc
    return None


def outcome_of(handle: ServiceHandle) -> ExitStatus | BaseException:
    """What ``handle.wait_for_exit()`` gives, read on a fresh loop."""

    async def wait() -> ExitStatus:
        return await asyncio.wait_for(handle.wait_for_exit(), 10)

    try:
        return asyncio.run(wait())
    except BaseException as exc:
        return exc


# --------------------------------------------------------------------------- item 1


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class BigNode(NodeLifecycle):
    """A node holding 10 MiB, whose chosen hook fails.

    The 10 MiB are an anonymous mapping with every page touched: resident while the
    node lives, returned to the OS the moment it is freed. (A ``bytearray`` comes from
    malloc, and once glibc has freed one mmapped block of that size it raises its mmap
    threshold and serves the next ones from the heap, which it need not give back: RSS
    then says nothing about whether the nodes were freed. It failed so on 3.12 with
    every node dead.)
    """

    def __init__(self, failing: str) -> None:
        self.cache = mmap.mmap(-1, 10 * 2**20)
        self.cache[:: mmap.PAGESIZE] = b"\x01" * (len(self.cache) // mmap.PAGESIZE)
        self.failing = failing

    async def _maybe_fail(self, hook: str) -> None:
        if hook == self.failing:
            raise OSError(f"{hook}: store locked")

    async def pre_start(self, ctx: StartContext) -> None:
        await self._maybe_fail("pre_start")

    async def on_start(self, ctx: StartContext) -> None:
        await self._maybe_fail("on_start")

    async def run(self, ctx: Any) -> None:
        await self._maybe_fail("run")

    async def on_stop(self, ctx: Any) -> None:
        await self._maybe_fail("on_stop")


@pytest.mark.asyncio
@pytest.mark.parametrize("failing", ["pre_start", "on_start", "run", "on_stop"])
async def test_failed_starts_leave_no_node_alive(failing: str) -> None:
    """Proves: a supervisor retrying a failing ``start()`` 20 times, with a 10 MiB node
    each time, keeps none of them: after ``gc.collect()`` every node is gone and RSS has
    not grown by the nodes' size (whichever hook failed).

    Catches: the service's finalizer holding its exit slot strongly (a global root),
    while the slot holds the ``ServiceError`` whose traceback frames hold the service:
    every failed service and its node stayed alive forever (20 nodes, +200 MiB).
    """
    nodes: list[weakref.ref[BigNode]] = []
    gc.collect()
    before = rss_mib()
    for _ in range(20):
        svc = Service(BigNode(failing))
        nodes.append(weakref.ref(svc.node))
        with pytest.raises(ServiceError):
            await svc.start()
        del svc
    gc.collect()
    alive = sum(ref() is not None for ref in nodes)
    assert alive == 0, f"{alive} of 20 failed services' nodes are still alive"
    assert rss_mib() - before < 100, "RSS grew by the nodes' size: they were not freed"


@pytest.mark.asyncio
async def test_a_kept_handle_does_not_keep_a_failed_service_alive() -> None:
    """Proves: a ``ServiceHandle`` kept after a failed ``start()`` still reports the
    failure (``PreStartFailed``, its cause chained) but does not keep the ``Service``
    alive: nothing in the recorded error's traceback refers to it.

    Catches: the recorded error's traceback holding the lifecycle's frames (or
    ``start()``'s), whose ``self`` is the service: a handle (or the recorded error)
    kept the service, its registry, its node, alive.
    """
    svc = Service(BigNode("pre_start"))
    handle = svc.handle()
    service = weakref.ref(svc)
    with pytest.raises(PreStartFailed):
        await svc.start()
    del svc
    gc.collect()
    assert service() is None, "the kept handle keeps the failed service alive"
    with pytest.raises(PreStartFailed) as info:
        await handle.wait_for_exit()
    assert isinstance(info.value.__cause__, OSError)


# --------------------------------------------------------------------------- item 2


@loops
def test_asyncio_run_teardown_still_runs_the_stop_hooks(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], caplog: pytest.LogCaptureFixture
) -> None:
    """Proves: when ``asyncio.run`` ends while ``start()`` runs in a task of its own (it
    cancels every task, the lifecycle task included), the service still winds down: the
    token fires (``UserRequested``), tasks are joined, ``on_stop`` and ``post_stop`` run;
    the outcome is recorded for handles and reported in the log.

    Catches: the lifecycle task dying on the cancellation: hooks ``['run']`` only, the
    registry never closed, nothing reported (``wait_for_exit`` said ``AlreadyStopped``).
    """
    caplog.set_level(logging.INFO, logger="dig_service")
    node = ScriptedNode()
    svc = Service(node)
    handle = svc.handle()

    async def main() -> None:
        start = asyncio.create_task(svc.start())
        await node.run_started.wait()
        assert not start.done()  # main() returns with start() still running

    assert run_in_runner(loop_factory, main) is None
    assert node.calls == ["pre_start", "on_start", "run", "on_stop", "post_stop"]
    assert svc.tasks.is_closed()
    assert svc.shutdown_token.reason() == ShutdownReason.UserRequested()
    status = outcome_of(handle)
    assert status == ExitStatus(ExitReason.RequestedShutdown(ShutdownReason.UserRequested()))
    logged = [r.getMessage() for r in caplog.records if r.name == "dig_service.service"]
    assert any("lifecycle task was cancelled" in m for m in logged), logged
    assert any("stopped: " in m for m in logged), logged


@loops
def test_asyncio_run_teardown_during_on_start_runs_post_stop(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Proves: torn down while ``on_start`` runs, the service cancels it (it counts as
    failed: ``OnStartFailed``), joins the tasks and still runs ``post_stop``; ``run`` and
    ``on_stop`` do not run, as for a cancelled ``start()``.

    Catches: a torn-down lifecycle that skips the rest of the wind-down.
    """
    on_start_entered = asyncio.Event()

    async def on_start(ctx: Any) -> None:
        on_start_entered.set()
        await forever()

    node = ScriptedNode(on_start=on_start)
    svc = Service(node)

    async def main() -> None:
        start = asyncio.create_task(svc.start())
        await on_start_entered.wait()
        assert not start.done()

    assert run_in_runner(loop_factory, main) is None
    assert node.calls == ["pre_start", "on_start", "post_stop"]
    assert svc.tasks.is_closed()
    failure = outcome_of(svc.handle())
    assert isinstance(failure, ServiceError) and "on_start was cancelled" in str(failure)


@loops
def test_asyncio_run_teardown_wind_down_is_bounded_by_the_deadline(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Proves: the wind-down after a teardown is bounded: an ``on_stop`` that never
    returns is cancelled at the shutdown deadline (``OnStopFailed``, cause
    ``TimeoutError``) and ``post_stop`` still runs.

    Catches: a teardown wind-down that waits for ever on a stuck stop hook.
    """
    node = ScriptedNode(on_stop=forever)
    svc = Service(node, config=ServiceConfig(shutdown_deadline=0.2))

    async def main() -> None:
        start = asyncio.create_task(svc.start())
        await node.run_started.wait()
        assert not start.done()  # main() returns with start() still running

    assert run_in_runner(loop_factory, main) is None
    assert node.calls == ["pre_start", "on_start", "run", "on_stop", "post_stop"]
    failure = outcome_of(svc.handle())
    assert isinstance(failure, OnStopFailed)
    assert isinstance(failure.__cause__, TimeoutError)


# --------------------------------------------------------------------------- item 3


class Custom(BaseException):
    """A ``BaseException`` that is neither ``SystemExit`` nor ``KeyboardInterrupt``."""


BASE_EXCEPTIONS: list[Any] = [
    pytest.param(lambda: SystemExit(3), id="SystemExit"),
    pytest.param(KeyboardInterrupt, id="KeyboardInterrupt"),
    pytest.param(Custom, id="custom"),
]

# For each failing hook: the hooks that still run, and the error handles see.
HOOK_ROWS: list[Any] = [
    pytest.param("pre_start", ["pre_start"], PreStartFailed, id="pre_start"),
    pytest.param("on_start", ["pre_start", "on_start", "post_stop"], OnStartFailed, id="on_start"),
    pytest.param(
        "run", ["pre_start", "on_start", "run", "on_stop", "post_stop"], RunFailed, id="run"
    ),
    pytest.param(
        "on_stop",
        ["pre_start", "on_start", "run", "on_stop", "post_stop"],
        OnStopFailed,
        id="on_stop",
    ),
    pytest.param(
        "post_stop",
        ["pre_start", "on_start", "run", "on_stop", "post_stop"],
        OnStopFailed,
        id="post_stop",
    ),
]


@loops
@pytest.mark.parametrize("make_exc", BASE_EXCEPTIONS)
@pytest.mark.parametrize(("hook", "ran", "recorded"), HOOK_ROWS)
def test_base_exception_in_a_hook_winds_down_then_propagates(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    make_exc: Callable[[], BaseException],
    hook: str,
    ran: list[str],
    recorded: type[ServiceError],
) -> None:
    """Proves: a hook raising a ``BaseException`` that is not an ``Exception`` gets the
    wind-down an ``Exception`` would (token fired, tracked tasks joined, the later stop
    hooks run, all within the budget); then ``start()`` raises that very exception (as
    asyncio propagates it); ``wait_for_exit()`` on a handle raises the hook's
    ``ServiceError`` with it as ``__cause__`` (a watcher on another loop is told, not
    interrupted); the registry is closed; a ``KeyboardInterrupt`` fires the token with
    ``UserRequested``, the others with ``Fatal``.

    Catches: ``SystemExit``/``KeyboardInterrupt`` escaping the event loop from the hook's
    task (hooks ``['run']``, registry never joined, "run raised after it was
    abandoned"), or another ``BaseException`` reported as an ordinary failure.
    """
    raised = make_exc()
    task_stopped: list[str] = []

    async def on_start(ctx: StartContext) -> None:
        async def ticker() -> None:
            await ctx.shutdown.cancelled()
            task_stopped.append("ticker")

        ctx.tasks.spawn("ticker", TaskKind.BackgroundLoop, ticker())
        if hook == "on_start":
            raise raised

    scripts: dict[str, Any] = {"on_start": on_start}
    if hook in ("on_stop", "post_stop"):
        scripts["run"] = returns_at_once  # the service stops by itself
    if hook != "on_start":
        scripts[hook] = raiser(raised)
    node = ScriptedNode(**scripts)
    svc = Service(node)

    async def main() -> None:
        await svc.start()

    got = run_in_runner(loop_factory, main)
    assert got is raised, f"start() raised {got!r}, not the hook's {raised!r}"
    assert node.calls == ran
    assert svc.tasks.is_closed()
    if hook != "pre_start":
        assert task_stopped == ["ticker"], "the tracked task was not joined"
    reason = svc.shutdown_token.reason()
    if hook in ("pre_start", "on_start", "run"):
        if isinstance(raised, KeyboardInterrupt):
            assert reason == ShutdownReason.UserRequested()
        else:
            assert isinstance(reason, ShutdownReason.Fatal), reason
            assert type(raised).__name__ in reason.message
    failure = outcome_of(svc.handle())
    assert isinstance(failure, recorded), failure
    assert failure.__cause__ is raised


@loops
@pytest.mark.parametrize("critical", [False, True], ids=["plain", "critical"])
@pytest.mark.parametrize(
    "make_exc",
    [pytest.param(lambda: SystemExit(5), id="SystemExit"), pytest.param(KeyboardInterrupt)],
)
def test_system_exit_in_a_tracked_task_winds_down_then_propagates(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    make_exc: Callable[[], BaseException],
    critical: bool,
) -> None:
    """Proves: a tracked task (critical or not) raising ``SystemExit`` or
    ``KeyboardInterrupt`` fires the token (``Fatal`` naming the task, or
    ``UserRequested``), and while ``asyncio.run`` tears the loop down (asyncio has
    re-raised the exception out of the loop) the service winds down fully: ``run``
    returns, the tasks are joined, ``on_stop`` and ``post_stop`` run; then the exception
    propagates from ``asyncio.run``.

    Catches: the escape stopping everything half-way (``on_stop``/``post_stop`` never
    run, the registry never closed) or a non-critical task's ``SystemExit`` ignored.
    """
    raised = make_exc()
    stopped: list[str] = []

    async def run(ctx: Any) -> None:
        async def boom() -> None:
            raise raised

        async def polite() -> None:
            try:
                await ctx.shutdown.cancelled()
            finally:  # by the token, or cancelled by asyncio.run's teardown
                stopped.append("polite")

        ctx.tasks.spawn("polite", TaskKind.BackgroundLoop, polite())
        ctx.tasks.spawn("boom", TaskKind.BackgroundLoop, boom(), critical=critical)
        await ctx.shutdown.cancelled()

    node = ScriptedNode(run=run)
    svc = Service(node)

    async def main() -> None:
        await svc.start()

    got = run_in_runner(loop_factory, main)
    assert got is raised
    assert node.calls == ["pre_start", "on_start", "run", "on_stop", "post_stop"]
    assert stopped == ["polite"]
    assert svc.tasks.is_closed()
    reason = svc.shutdown_token.reason()
    if isinstance(raised, KeyboardInterrupt):
        assert reason == ShutdownReason.UserRequested()
    else:
        assert isinstance(reason, ShutdownReason.Fatal), reason
        assert "'boom'" in reason.message and "SystemExit" in reason.message


class RunExits(NodeLifecycle):
    """``run`` raises ``SystemExit(3)``."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def run(self, ctx: Any) -> None:
        self.calls.append("run")
        raise SystemExit(3)

    async def on_stop(self, ctx: Any) -> None:
        self.calls.append("on_stop")

    async def post_stop(self, ctx: Any) -> None:
        self.calls.append("post_stop")


class TaskExits(RunExits):
    """A tracked task raises ``SystemExit(5)`` while ``run`` waits for the token.

    The task waits until ``run`` has begun: how many loop turns the driver
    takes from ``on_start`` to ``run`` is not the test's business.
    """

    async def on_start(self, ctx: StartContext) -> None:
        running = asyncio.Event()
        self.running = running

        async def boom() -> None:
            await running.wait()
            raise SystemExit(5)

        ctx.tasks.spawn("boom", TaskKind.BackgroundLoop, boom())

    async def run(self, ctx: Any) -> None:
        self.calls.append("run")
        self.running.set()
        await ctx.shutdown.cancelled()


@loops
@pytest.mark.parametrize(("node_class", "code"), [(RunExits, 3), (TaskExits, 5)])
def test_runner_winds_down_before_a_system_exit_propagates(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], node_class: type[RunExits], code: int
) -> None:
    """Proves: under ``dig_service.run`` (the runner behind ``python -m dig_service run``),
    ``SystemExit`` from ``run`` or from a tracked task propagates with its code only after
    ``on_stop`` and ``post_stop`` ran and the registry was joined.

    Catches: the runner cancelling everything at once on the escape (the stop hooks cut
    off by its own clean-up) or swallowing the exit code.
    """
    node = node_class()
    svc = Service(node)
    with pytest.raises(SystemExit) as info:
        run_service(svc, install_signal_handlers=False, loop_factory=loop_factory)
    assert info.value.code == code
    assert node.calls == ["run", "on_stop", "post_stop"]
    assert svc.tasks.is_closed()


@loops
def test_runner_names_tracked_stragglers_as_tracked(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], caplog: pytest.LogCaptureFixture
) -> None:
    """Proves: a tracked task that swallows cancellation past the deadline is reported by
    the runner's exit clean-up as a *tracked* task that did not finish, not as an
    untracked one.

    Catches: the exit warning calling every pending task "untracked", tracked
    stragglers included.
    """
    caplog.set_level(logging.WARNING, logger="dig_service.run")
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # swallows every cancellation

    async def on_start(ctx: StartContext) -> None:
        ctx.tasks.spawn("stubborn", TaskKind.BackgroundLoop, stubborn())
        ctx.shutdown.cancel(ShutdownReason.UserRequested())

    async def on_stop(ctx: Any) -> None:
        # Let it go once the runner's exit clean-up has given up on it.
        asyncio.get_running_loop().call_later(0.5, release.set)

    svc = Service(ScriptedNode(on_start=on_start, on_stop=on_stop), config=ServiceConfig(0.1))
    run_service(svc, install_signal_handlers=False, loop_factory=loop_factory)
    warnings = [r.getMessage() for r in caplog.records if "did not finish" in r.getMessage()]
    assert any("1 tracked task(s)" in w and "stubborn" in w for w in warnings), warnings
    assert not any("untracked" in w for w in warnings), warnings
