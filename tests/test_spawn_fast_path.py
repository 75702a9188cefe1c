"""TaskRegistry.spawn's fast path creates exactly the task ``loop.create_task`` would.

On a stock asyncio or uvloop loop with no task factory, ``spawn`` builds
``asyncio.Task(coro, loop=loop, name=name)`` itself instead of calling
``loop.create_task(coro, name=name)`` (SPEC P1). These tests prove that a
task factory and a ``create_task`` override are still honoured, and that the
task is the one ``create_task`` would make: its name, loop, context, debug
traceback, and the closed-loop refusal.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import warnings
from collections.abc import Coroutine
from typing import Any

import pytest
from _support import loop_kinds, uvloop

from dig_service import ShutdownToken, TaskKind, TaskRegistry
from dig_service.testing import spawn_native_sleeper

BG = TaskKind.BackgroundLoop

LOOP_TYPES: dict[str, type[asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.SelectorEventLoop,
    **({"uvloop": uvloop.Loop} if uvloop is not None else {}),
}


def fresh() -> TaskRegistry:
    return TaskRegistry(ShutdownToken())


def spawned_task(name: str) -> asyncio.Task[Any]:
    [task] = [t for t in asyncio.all_tasks() if t.get_name() == name]
    return task


async def answer() -> int:
    return 42


async def test_spawn_honours_a_task_factory() -> None:
    """Proves a task factory set on the loop makes the task, and is looked up at every spawn.

    Catches: the fast path building ``asyncio.Task`` itself although the loop
    has a task factory (eager tasks, instrumented tasks silently lost), or the
    factory decision cached per loop instead of read at each spawn.
    """
    loop = asyncio.get_running_loop()
    made: list[str] = []

    def factory(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Task[Any]:
        made.append("factory")
        return asyncio.Task(coro, loop=loop, **kwargs)

    reg = fresh()
    assert await reg.spawn("before", BG, answer()) == 42
    assert made == []
    loop.set_task_factory(factory)  # type: ignore[arg-type]
    try:
        handle = reg.spawn("with-factory", BG, answer())
        assert made == ["factory"]
        assert spawned_task("with-factory").get_name() == "with-factory"
        assert await handle == 42
    finally:
        loop.set_task_factory(None)
    assert await reg.spawn("after", BG, answer()) == 42
    assert made == ["factory"]
    assert reg.stats().completed == 3


@pytest.mark.parametrize("flavour", loop_kinds("asyncio", "uvloop"))
def test_spawn_honours_a_create_task_override(flavour: str) -> None:
    """Proves a loop subclass that overrides create_task gets the call, with the name.

    Catches: the fast path bypassing a subclass's ``create_task`` (the
    stock-method check done on the base type, or cached for every loop type
    at once), on asyncio and on uvloop.
    """
    calls: list[tuple[str, Any]] = []
    base = LOOP_TYPES[flavour]

    class Recording(base):  # type: ignore[valid-type,misc]
        def create_task(self, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
            calls.append(("create_task", kwargs))
            return super().create_task(coro, **kwargs)  # type: ignore[no-any-return]

    async def main() -> None:
        reg = fresh()
        assert await reg.spawn("overridden", BG, answer()) == 42
        assert reg.stats().completed == 1

    with asyncio.Runner(loop_factory=Recording) as runner:
        runner.run(main())
    assert ("create_task", {"name": "overridden"}) in calls

    # The plain type right after: still the fast path, and still correct.
    calls.clear()
    with asyncio.Runner(loop_factory=base) as runner:
        runner.run(main())
    assert calls == []


async def test_spawned_task_is_what_create_task_makes() -> None:
    """Proves the spawned task is a plain Task on the running loop, named, in a copied context.

    Catches: a task built on the wrong loop, unnamed or default-named, of
    another class, or sharing (instead of copying) the spawner's context.
    """
    loop = asyncio.get_running_loop()
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("spawner")
    seen: list[str] = []

    async def work() -> None:
        seen.append(var.get())
        var.set("task")

    reg = fresh()
    handle = reg.spawn("shape", BG, work())
    task = spawned_task("shape")
    reference = loop.create_task(answer(), name="reference")
    assert type(task) is type(reference)
    assert task.get_loop() is loop and task.get_name() == "shape"
    await handle
    await reference
    assert seen == ["spawner"] and var.get() == "spawner"


async def test_debug_source_traceback_ends_at_the_spawn_call() -> None:
    """Proves in debug mode a task's _source_traceback ends at spawn, as create_task's does.

    Catches: the fast path trimming the caller's frame (copying asyncio's
    ``del task._source_traceback[-1]``, which drops create_task's own frame),
    so "Task was destroyed" reports would point one frame too high.
    """
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    try:
        reg = fresh()
        handle = reg.spawn("traced", BG, answer())
        task = spawned_task("traced")
        reference = loop.create_task(answer(), name="ref")
    finally:
        loop.set_debug(False)
    spawn_site, reference_site = (t._source_traceback[-1] for t in (task, reference))  # type: ignore[attr-defined]
    for site in (spawn_site, reference_site):
        assert site.filename == __file__
        assert site.name == "test_debug_source_traceback_ends_at_the_spawn_call"
    assert spawn_site.lineno + 2 == reference_site.lineno
    await handle
    await reference


def test_spawn_on_a_closed_asyncio_loop_is_refused_and_closes_the_coroutine() -> None:
    """Proves the fast path keeps create_task's closed-loop check: RuntimeError, coroutine closed.

    Catches: a task created on a loop that reports itself closed (a subclass
    can close a running loop), and a "never awaited" coroutine on refusal.
    """

    class Closing(asyncio.SelectorEventLoop):
        pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reg = fresh()
        coro: Any = answer()
        loop._closed = True  # type: ignore[attr-defined]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with pytest.raises(RuntimeError, match="Event loop is closed"):
                    reg.spawn("late", BG, coro)
        finally:
            loop._closed = False  # type: ignore[attr-defined]
        assert coro.cr_frame is None
        assert reg.stats().spawned == 0

    with asyncio.Runner(loop_factory=Closing) as runner:
        runner.run(main())


async def test_the_handle_is_the_tasks_only_done_callback() -> None:
    """Proves a young task has no done callback, and a promoted one exactly one: the returned
    TaskHandle itself.

    A task starts young (its end noticed by the loop's sweep, no callback:
    ``young.rs``) and gets its handle as done callback once it outlives two
    sweeps. Catches: a separate callback object per spawn coming back (one
    more GC-tracked object per live task, SPEC P1), a callback added at
    spawn as well as by the sweep, or the handle never registered (the task
    would never leave the registry).
    """
    reg = fresh()
    gate = asyncio.Event()
    handle = reg.spawn("one-callback", BG, gate.wait())
    task = spawned_task("one-callback")
    assert task._callbacks in (None, [])  # type: ignore[attr-defined]
    for _ in range(4):
        await asyncio.sleep(0)
    assert [cb for cb, _ctx in task._callbacks] == [handle]  # type: ignore[attr-defined]
    gate.set()
    await handle
    assert len(reg) == 0 and reg.stats().completed == 1


async def test_calling_a_handle_by_hand_reports_nothing() -> None:
    """Proves a TaskHandle called by anyone but its task's loop changes no count and no entry.

    Catches: the done-callback role of TaskHandle being abusable: another
    task, its own unfinished task, or a second call after the end removing
    the entry early or counting an outcome twice; a native handle accepting
    the call.
    """
    reg = fresh()
    gate = asyncio.Event()
    handle = reg.spawn("guarded", BG, gate.wait())
    task = spawned_task("guarded")
    other = asyncio.get_running_loop().create_task(answer())
    with pytest.raises(TypeError, match="only its own asyncio task"):
        handle(other)
    with pytest.raises(TypeError, match="only its own asyncio task"):
        handle(None)
    with pytest.raises(asyncio.InvalidStateError):
        handle(task)  # not done yet
    assert len(reg) == 1 and reg.stats().completed == 0
    gate.set()
    await handle
    await other
    handle(task)  # already reported by the loop's call
    stats = reg.stats()
    assert (stats.spawned, stats.completed, stats.failed, stats.live) == (1, 1, 0, 0)
    native = spawn_native_sleeper(reg, "native", 0)
    with pytest.raises(TypeError, match="only its own asyncio task"):
        native(task)
    await native


async def test_task_handles_stay_out_of_the_cycle_collector() -> None:
    """Proves a spawned task's TaskHandle is not tracked by the garbage collector.

    A handle holds its task through Rust, where the collector cannot see,
    so tracking it finds no cycle; it only made every collection walk one
    more object per live task (SPEC P1, about 2k instructions a task at
    100k live). Catches the handle being tracked again, and the handle or
    its task being freed early because of it.
    """
    reg = fresh()
    gate = asyncio.Event()
    handle = reg.spawn("untracked", BG, gate.wait())
    assert not gc.is_tracked(handle)
    gc.collect()
    assert not handle.is_finished() and len(reg) == 1
    gate.set()
    await handle
    assert handle.is_finished() and len(reg) == 0
