"""``TaskRegistry.spawn`` and ``Service`` under every way a loop can make tasks.

``spawn`` builds ``asyncio.Task`` itself on a stock loop without a task
factory, and calls ``loop.create_task`` when a factory is set. Under
``asyncio.eager_task_factory`` (CPython >= 3.12) the task runs its first
step inside ``spawn`` and may *finish* there, before ``spawn`` has tracked
it. conftest runs this module (and the registry and Service modules) on
``[asyncio]``, ``[uvloop]``, ``[*-eager]`` (3.12+) and ``[*-lazy]`` loops;
each test states what must hold on all of them.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import warnings
from collections.abc import Coroutine
from typing import Any

import conftest
import pytest

from dig_service import (
    NodeLifecycle,
    RunContext,
    Service,
    ShutdownReason,
    ShutdownToken,
    StartContext,
    TaskKind,
    TaskRegistry,
)

BG = TaskKind.BackgroundLoop


def fresh() -> tuple[ShutdownToken, TaskRegistry]:
    token = ShutdownToken()
    return token, TaskRegistry(token)


def factory_kind() -> str:
    """``"eager"``, ``"lazy"`` or ``"none"``: the task factory of the running loop."""
    factory = asyncio.get_running_loop().get_task_factory()
    if factory is None:
        return "none"
    if factory is conftest.eager_task_factory:
        return "eager"
    assert factory is conftest.lazy_task_factory, factory
    return "lazy"


async def returns(value: int) -> int:
    return value


async def test_the_loop_has_the_task_factory_its_id_names(request: pytest.FixtureRequest) -> None:
    """Proves the extra loops really carry their task factory, and that ``spawn`` goes
    through it: the lazy factory counts the task, the eager one runs it inside ``spawn``.

    Catches: a conftest change that silently runs every ``[*-eager]``/``[*-lazy]`` test
    on a plain loop (the task-factory paths would then go untested).
    """
    loop_id = request.node.callspec.id
    kind = factory_kind()
    assert kind == (loop_id.partition("-")[2] or "none"), (loop_id, kind)
    _, reg = fresh()
    before = conftest.lazy_tasks_made
    handle = reg.spawn("probe", BG, returns(7))
    assert conftest.lazy_tasks_made - before == (1 if kind == "lazy" else 0)
    assert handle.is_finished() is (kind == "eager")
    assert await handle == 7


async def test_a_task_that_finishes_inside_spawn_is_reported_before_spawn_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proves: a task that ends in its first step is, once ``await handle`` resumes (at
    once, under the eager factory: spawn returned it finished), counted, logged and out of
    the registry, whether it returned, raised, or was critical.

    Catches: the end of an eagerly finished task reported only by a done callback on the
    next loop turn: ``await handle`` then returned while the task was still "live", its
    error not yet logged and a critical failure not yet fatal.
    """
    token, reg = fresh()
    caplog.set_level(logging.ERROR, logger="dig_service")

    async def fails() -> None:
        raise KeyError("at once")

    assert await reg.spawn("returns", BG, returns(1)) == 1
    assert len(reg) == 0 and reg.stats().completed == 1
    with pytest.raises(KeyError):
        await reg.spawn("fails", BG, fails())
    assert len(reg) == 0 and reg.stats().failed == 1
    [record] = [r for r in caplog.records if r.name == "dig_service.tasks"]
    assert "fails" in record.getMessage() and record.exc_info is not None
    assert not token.is_cancelled()
    await reg.spawn("critical", BG, returns(2), critical=True)
    reason = token.reason()
    assert isinstance(reason, ShutdownReason.Fatal) and "critical" in reason.message
    stats = reg.stats()
    assert (stats.spawned, stats.completed, stats.failed, stats.live) == (3, 2, 1, 0)
    await reg.join_all(1.0)


async def test_many_tasks_finishing_inside_spawn_leave_nothing_behind() -> None:
    """Proves: 1,000 spawns whose tasks end at once, interleaved with tasks that suspend
    first, all end up counted once, and ``join_all`` closes an empty registry.

    Catches: a task reported twice (once in ``spawn``, once by a done callback), or a
    finished task that stays in the registry until the join (or forever).
    """
    _, reg = fresh()
    gate = asyncio.Event()

    async def waits(i: int) -> int:
        await gate.wait()
        return i

    handles = [
        reg.spawn(f"t{i}", TaskKind.RpcHandler, returns(i) if i % 2 else waits(i))
        for i in range(1000)
    ]
    eager = factory_kind() == "eager"
    assert len(reg) == (500 if eager else 1000)
    gate.set()
    assert await asyncio.gather(*handles) == list(range(1000))
    stats = reg.stats()
    assert (stats.spawned, stats.completed, stats.failed, stats.live) == (1000, 1000, 0, 0)
    await reg.join_all(1.0)
    assert reg.is_closed()


async def test_a_task_that_spawns_from_its_first_step_is_tracked_with_its_child() -> None:
    """Proves: a task whose first step spawns another task (run inside the outer ``spawn``
    by the eager factory) gets both tracked and joined.

    Catches: re-entrant ``spawn`` (a spawn running inside ``create_task`` of another)
    losing the inner or the outer task.
    """
    _, reg = fresh()
    release = asyncio.Event()

    async def inner() -> str:
        await release.wait()
        return "inner"

    async def outer() -> str:
        child = reg.spawn("inner", BG, inner())
        return await child

    handle = reg.spawn("outer", BG, outer())
    if factory_kind() != "eager":  # the first step runs on the next loop turn
        assert [s.name for s in reg.snapshot()] == ["outer"]
        await asyncio.sleep(0)
    assert sorted(s.name for s in reg.snapshot()) == ["inner", "outer"]
    release.set()
    assert await handle == "inner"
    await reg.join_all(1.0)
    assert reg.stats().completed == 2


async def test_a_factory_that_raises_closes_the_coroutine_and_tracks_nothing() -> None:
    """Proves: when the loop's task factory raises, ``spawn`` raises that error, closes the
    coroutine (no "never awaited" warning) and tracks nothing.

    Catches: the ``create_task`` path forgetting to close a refused coroutine (a
    ``RuntimeWarning``, an error under ``-W error``), or counting a task never made.
    """
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()

    def refuses(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Task[Any]:
        raise TypeError("this factory takes no tasks")

    _, reg = fresh()
    coro: Any = returns(1)
    loop.set_task_factory(refuses)  # type: ignore[arg-type]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(TypeError, match="this factory takes no tasks"):
                reg.spawn("refused", BG, coro)
    finally:
        loop.set_task_factory(previous)
    assert coro.cr_frame is None  # closed
    assert reg.stats().spawned == 0 and len(reg) == 0


class QuickTasks(NodeLifecycle):
    """Spawns tasks that finish at once (one critical that waits for the token) in on_start."""

    def __init__(self) -> None:
        self.results: list[int] = []

    async def on_start(self, ctx: StartContext) -> None:
        for i in range(10):
            ctx.tasks.spawn(f"quick-{i}", TaskKind.Maintenance, self.record(i))
        ctx.tasks.spawn("watch", BG, ctx.shutdown.cancelled(), critical=True)

    async def record(self, i: int) -> None:
        self.results.append(i)

    async def run(self, ctx: RunContext) -> None:
        ctx.shutdown.cancel(ShutdownReason.UserRequested())
        await ctx.shutdown.cancelled()


async def test_a_service_whose_tasks_finish_inside_spawn_exits_cleanly() -> None:
    """Proves: a ``Service`` whose ``on_start`` spawns tasks that end at once (inside
    ``spawn``, under the eager factory) runs every hook, joins, and exits gracefully
    with every task counted.

    Catches: a task finished inside ``spawn`` confusing the Service's join or its
    critical-task watch (a spurious Fatal, a hang, a straggler).
    """
    node = QuickTasks()
    service = Service(node)
    status = await service.start()
    assert status.is_graceful() and status.exit_code == 0
    assert sorted(node.results) == list(range(10))
    stats = service.tasks.stats()
    assert (stats.spawned, stats.completed, stats.failed, stats.live) == (11, 11, 0, 0)


def test_the_task_factory_matrix_matches_the_python_version() -> None:
    """Proves: the registry and Service modules get ``[*-lazy]`` loops on every version and
    ``[*-eager]`` ones exactly where ``asyncio.eager_task_factory`` exists (3.12+).

    Catches: the eager factory dropped from the matrix (e.g. by a version check gone
    wrong), leaving the finish-inside-spawn path untested.
    """
    ids = set(conftest.TASK_FACTORY_LOOP_FACTORIES)
    assert "asyncio-lazy" in ids
    assert ("asyncio-eager" in ids) is (sys.version_info >= (3, 12))
    assert hasattr(asyncio, "eager_task_factory") is (sys.version_info >= (3, 12))
    if conftest.HAVE_UVLOOP:
        assert "uvloop-lazy" in ids
        assert ("uvloop-eager" in ids) is (sys.version_info >= (3, 12))
