"""Young tasks: a short-lived task's end is noticed by one sweep a loop turn.

``TaskRegistry.spawn`` gives a stock ``asyncio.Task`` no done callback at
first: the loop's young set is swept once a loop iteration, and a task still
running after two sweeps gets its done callback (``rust/src/python/young.rs``,
SPEC P1). These tests prove the end is reported no later than a done
callback would report it, by the same code (logging, counts, the token,
the exception retrieved), that awaiters find it reported, that long-lived
tasks leave the set (the loop does not keep sweeping), and the edges: other
task types, several loops, a loop closed with young tasks, ``asyncio.run``
teardown, an eager task factory.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import sys
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from dig_service import ShutdownToken, TaskKind, TaskRegistry

BG = TaskKind.BackgroundLoop
REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="-")


def fresh() -> TaskRegistry:
    return TaskRegistry(ShutdownToken())


def spawned_task(name: str) -> asyncio.Task[Any]:
    [task] = [t for t in asyncio.all_tasks() if t.get_name() == name]
    return task


async def nop() -> None:
    return None


async def turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def sweeps_queued(loop: asyncio.AbstractEventLoop) -> int:
    """How many young sweeps wait in an asyncio loop's ready queue."""
    ready = loop._ready  # type: ignore[attr-defined]
    return sum(type(h._callback).__name__ == "YoungTasks" for h in ready)


async def turns_until(predicate: Any, limit: int = 50) -> int:
    n = 0
    while not predicate():
        assert n < limit, "not reported within the limit"
        await asyncio.sleep(0)
        n += 1
    return n


async def test_a_short_task_has_no_done_callback_and_is_reported_when_a_callback_would_be() -> None:
    """Proves a young task has no done callback, and leaves the registry on the same turn as a task
    tracked with one.

    The baseline is the asyncio docs' idiom (a set and ``add_done_callback``)
    measured the same way in the same test. Catches: the young path
    reporting later than a done callback (tests and users that wait "a few
    turns" for an empty registry), or the handle still added as a callback
    (no saving).
    """
    reg = fresh()
    handle = reg.spawn("short", BG, nop())
    task = spawned_task("short")
    assert task._callbacks in (None, [])  # type: ignore[attr-defined]
    tracked = await turns_until(lambda: len(reg) == 0)
    loop = asyncio.get_running_loop()
    bare: set[asyncio.Task[None]] = set()
    t = loop.create_task(nop())
    bare.add(t)
    t.add_done_callback(bare.discard)
    baseline = await turns_until(lambda: not bare)
    assert tracked <= baseline
    assert handle.is_finished()
    st = reg.stats()
    assert (st.spawned, st.completed, st.live) == (1, 1, 0)


async def test_many_short_tasks_are_all_reported_by_the_sweeps() -> None:
    """Proves 5,000 young tasks, spawned in one turn, are all reported and counted, within the bare
    idiom's turns.

    Catches: entries lost when a sweep takes the set while tasks are
    spawned, or a sweep that stops rescheduling itself while tasks remain.
    """
    reg = fresh()
    for i in range(5000):
        reg.spawn(f"t{i % 7}", BG, turns(i % 3))
    n = await turns_until(lambda: len(reg) == 0)
    assert n <= 4
    st = reg.stats()
    assert (st.spawned, st.completed, st.live) == (5000, 5000, 0)


async def test_an_awaiter_of_the_handle_finds_the_end_reported() -> None:
    """Proves ``await handle`` on a young task resumes after the end is reported.

    ``TaskHandle.__await__`` gives a young task its done callback before the
    awaiter's wake-up is added. Catches: the awaiter's wake-up running
    before the report (the awaiter would find the task live and uncounted).
    """
    reg = fresh()
    handle = reg.spawn("awaited", BG, turns(5))
    task = spawned_task("awaited")
    await handle
    assert len(reg) == 0 and reg.stats().completed == 1
    # The handle became the task's first done callback.
    assert task.done()


async def test_a_waiter_on_the_task_itself_finds_the_end_reported() -> None:
    """Proves a task's own done callbacks (``asyncio.wait`` here) run after the young sweep reported
    it.

    Catches: the sweep that reports a task ending in one turn queued after
    the task's done callbacks, so ``asyncio.wait``/``gather`` on the task
    would resume with the task still in the registry.
    """
    reg = fresh()
    for ends_after in (0, 1, 2):
        reg.spawn(f"w{ends_after}", BG, turns(ends_after))
        task = spawned_task(f"w{ends_after}")
        await asyncio.wait([task])
        assert len(reg) == 0, ends_after
    assert reg.stats().completed == 3


async def test_a_long_lived_task_is_promoted_and_the_sweeps_stop() -> None:
    """Proves a task that outlives two sweeps gets its handle as done callback, and no sweep stays
    queued.

    Catches: long-lived tasks scanned by every sweep (cost growing with the
    live tasks), a loop that spins on a sweep for ever while a task lives,
    or a promoted task's end never noticed.
    """
    reg = fresh()
    loop = asyncio.get_running_loop()
    gate = asyncio.Event()
    handle = reg.spawn("long", BG, gate.wait())
    task = spawned_task("long")
    stock = isinstance(loop, asyncio.BaseEventLoop)  # uvloop's queue is not visible
    assert not stock or sweeps_queued(loop) == 1
    await turns(4)
    assert [cb for cb, _ctx in task._callbacks] == [handle]  # type: ignore[attr-defined]
    assert not stock or sweeps_queued(loop) == 0
    gate.set()
    await handle
    assert len(reg) == 0 and reg.stats().completed == 1


async def test_a_young_failure_is_logged_retrieved_and_fires_the_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proves a young task's failure is logged, counted and its exception retrieved; a critical one
    fires the token.

    (The suite's loop records "Task exception was never retrieved" and fails
    the test on it.) Catches: the sweep path skipping the report code the
    done callback runs.
    """

    async def boom() -> None:
        raise ValueError("young boom")

    token = ShutdownToken()
    reg = TaskRegistry(token)
    with caplog.at_level(logging.ERROR):
        reg.spawn("boom", BG, boom())
        await turns_until(lambda: len(reg) == 0)
    assert "young boom" in caplog.text
    assert reg.stats().failed == 1 and not token.is_cancelled()
    reg.spawn("crit", BG, boom(), critical=True)
    await turns_until(lambda: len(reg) == 0)
    assert token.is_cancelled() and reg.stats().failed == 2


async def test_a_critical_young_task_that_returns_fires_the_token() -> None:
    """Proves a critical task that returns at once fires the token through the sweep.

    Catches: the sweep reporting a completion without the critical check.
    """
    token = ShutdownToken()
    reg = TaskRegistry(token)
    reg.spawn("crit", BG, nop(), critical=True)
    await turns_until(lambda: len(reg) == 0)
    assert token.is_cancelled()


async def test_a_report_that_raises_goes_to_the_exception_handler_and_the_entry_leaves() -> None:
    """Proves a failing report (a logging handler that raises) reaches the loop's exception handler,
    and the task still leaves the registry.

    Catches: a sweep that stops at the first failing report (the other
    tasks never reported) or loses the error.
    """

    class Raising(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise RuntimeError("handler broke")

        def handleError(self, record: logging.LogRecord) -> None:
            raise RuntimeError("handler broke")

    async def boom() -> None:
        raise ValueError("x")

    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    logger = logging.getLogger("dig_service")
    handler = Raising()
    logger.addHandler(handler)
    try:
        reg = fresh()
        reg.spawn("a", BG, boom())
        reg.spawn("b", BG, nop())
        await turns_until(lambda: len(reg) == 0)
    finally:
        logger.removeHandler(handler)
        loop.set_exception_handler(old)
    st = reg.stats()
    assert (st.completed, st.failed, st.live) == (1, 1, 0)
    # Whether the logging layer swallowed the handler's error or it reached
    # the loop, nothing is lost: if it reached the loop it names the task.
    for ctx in seen:
        assert "task" in ctx and "exception" in ctx


async def test_a_task_of_another_type_gets_its_done_callback_at_once() -> None:
    """Proves a task that is not exactly ``asyncio.Task`` (a factory's subclass) is not young.

    Catches: the sweep applied to task types whose ``done()`` may be
    anything (the young path's assumption is a stock task).
    """

    class MyTask(asyncio.Task[Any]):
        pass

    def factory(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Task[Any]:
        return MyTask(coro, loop=loop, name=kwargs.get("name"))

    loop = asyncio.get_running_loop()
    loop.set_task_factory(factory)
    try:
        reg = fresh()
        handle = reg.spawn("sub", BG, nop())
    finally:
        loop.set_task_factory(None)
    task = spawned_task("sub")
    assert type(task) is MyTask
    assert [cb for cb, _ctx in task._callbacks] == [handle]  # type: ignore[attr-defined]
    await handle
    assert len(reg) == 0


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager task factories are 3.12+")
async def test_an_eager_task_that_suspends_is_young_and_reported() -> None:
    """Proves an eager task (3.12+) that suspends in its first step is tracked young and reported;
    one that ends inside spawn is reported at once.

    Catches: the young path assuming the task has not run yet.
    """
    from conftest import eager_task_factory  # uvloop passes `eager_start`: dropped there

    loop = asyncio.get_running_loop()
    loop.set_task_factory(eager_task_factory)
    try:
        reg = fresh()
        reg.spawn("now", BG, nop())
        assert len(reg) == 0
        reg.spawn("later", BG, turns(1))
        task = spawned_task("later")
        assert task._callbacks in (None, [])  # type: ignore[attr-defined]
    finally:
        loop.set_task_factory(None)
    await turns_until(lambda: len(reg) == 0)
    assert reg.stats().completed == 2


def test_tasks_on_several_loops_in_several_threads() -> None:
    """Proves one registry fed from loops in three threads reports every young task on its own loop.

    Catches: a young set shared between loops (swept on the wrong loop's
    thread) or one thread's set replacing another's.
    """
    reg = fresh()
    errors: list[BaseException] = []

    async def feed() -> None:
        for i in range(500):
            reg.spawn(f"x{i}", BG, turns(i % 3))
        await asyncio.sleep(0)

    def worker() -> None:
        try:
            asyncio.run(feed())
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    st = reg.stats()
    assert (st.spawned, st.completed + st.cancelled, st.live) == (1500, 1500, 0)


def test_two_loops_on_one_thread_each_sweep_their_own() -> None:
    """Proves a loop paused with young tasks keeps them while another loop of the same thread runs,
    and reports them when it runs again.

    Catches: the thread's young set switched to the second loop taking the
    first loop's tasks with it (swept on the wrong loop) or dropping them.
    """
    reg = fresh()
    first = asyncio.new_event_loop()
    second = asyncio.new_event_loop()
    try:

        async def spawn_some(tag: str, ends_after: int) -> None:
            for i in range(10):
                reg.spawn(f"{tag}{i}", BG, turns(ends_after))

        first.run_until_complete(spawn_some("a", 3))
        assert len(reg) == 10
        second.run_until_complete(spawn_some("b", 0))
        second.run_until_complete(turns(3))
        assert len(reg) == 10  # the first loop's, not run since
        first.run_until_complete(turns(5))
        assert len(reg) == 0
    finally:
        first.close()
        second.close()
    assert reg.stats().completed == 20


def test_a_loop_closed_with_young_tasks_leaves_them_as_a_done_callback_would() -> None:
    """Proves a loop closed while young tasks are pending drops the queued sweep without error, and
    the tasks stay visible as live.

    Catches: a crash or a "never retrieved"/callback error at close, or the
    tasks silently removed from the registry.
    """
    reg = fresh()
    loop = asyncio.new_event_loop()
    left: list[asyncio.Task[Any]] = []

    async def spawn_and_leave() -> None:
        reg.spawn("left", BG, asyncio.sleep(3600))
        left.append(spawned_task("left"))

    loop.run_until_complete(spawn_and_leave())
    loop.close()
    assert len(reg) == 1
    [summary] = reg.snapshot()
    assert summary.name == "left"
    # The task stays pending with its closed loop, as it would with a done
    # callback: end its coroutine quietly so the test leaves no noise.
    [task] = left
    task._log_destroy_pending = False  # type: ignore[attr-defined]
    task.get_coro().close()


def test_asyncio_run_teardown_reports_young_tasks() -> None:
    """Proves ``asyncio.run`` teardown (cancel every task, run until they end) reports the young
    tasks it cancels.

    Catches: young tasks cancelled at teardown left in the registry because
    no sweep ran after their cancellation.
    """
    reg = fresh()

    async def main() -> None:
        for i in range(20):
            reg.spawn(f"sleeper{i}", BG, asyncio.sleep(3600))

    asyncio.run(main())
    st = reg.stats()
    assert (st.live, st.cancelled) == (0, 20)


class StampRequest(logging.Filter):
    """Stamps each record with the ``REQUEST`` context variable at log time."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request = REQUEST.get()
        return True


async def fail_after(n: int) -> None:
    await turns(n)
    raise ValueError(f"failed after {n}")


def spawn_in_context(reg: TaskRegistry, name: str, coro: Coroutine[Any, Any, Any]) -> Any:
    """Spawn from a context where ``REQUEST`` is ``name`` (a request handler's, say)."""

    def go() -> Any:
        REQUEST.set(name)
        return reg.spawn(name, BG, coro)

    return contextvars.copy_context().run(go)


@contextmanager
def stamping_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Capture ERROR records, each stamped with ``REQUEST`` at log time (``StampRequest``)."""
    f = StampRequest()
    caplog.handler.addFilter(f)
    try:
        with caplog.at_level(logging.ERROR):
            yield
    finally:
        caplog.handler.removeFilter(f)


def requests_logged(caplog: pytest.LogCaptureFixture) -> dict[str, str]:
    """Task name (from the failure message) -> ``REQUEST`` seen when it was logged."""
    out = {}
    for r in caplog.records:
        if "failed" in r.getMessage() and hasattr(r, "request"):
            out[r.getMessage().split("'")[1]] = r.request
    return out


async def test_a_failure_is_logged_in_the_spawners_context(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proves a young task's and a promoted task's failure are logged in the task's context.

    Three tasks spawned in one turn from three contexts (``REQUEST`` set to
    the task's name): two fail in their first steps (reported by a sweep),
    one after six turns (promoted, reported by its done callback). A logging
    filter reads ``REQUEST`` at log time. Catches: the sweep reporting in
    its own context (the first spawner's: another request's id in the log),
    or the promoted callback run in a context other than the task's.
    """
    with stamping_errors(caplog):
        reg = fresh()
        spawn_in_context(reg, "req-a", fail_after(0))
        spawn_in_context(reg, "req-b", fail_after(1))
        spawn_in_context(reg, "req-old", fail_after(6))
        await turns_until(lambda: len(reg) == 0)
    assert requests_logged(caplog) == {"req-a": "req-a", "req-b": "req-b", "req-old": "req-old"}
    assert reg.stats().failed == 3


def context_of(task: asyncio.Task[Any]) -> contextvars.Context:
    """The context ``task`` runs in: the one ``Context`` among its references (every version)."""
    [context] = [r for r in gc.get_referents(task) if isinstance(r, contextvars.Context)]
    return context


async def test_a_task_context_is_held_by_the_handle_only_on_3_11() -> None:
    """Proves where ``spawn`` keeps a task's context, on every version: on CPython >= 3.12
    the task's own (``Task.get_context()``, asked only when a report needs it), so the
    handle holds no reference to it and nothing is copied beyond the copy the task makes,
    as ``loop.create_task`` makes it; on 3.11, where a task cannot tell its context, the
    copy ``spawn`` gave the task, held by the handle too.

    The context's reference count is compared with that of an untracked task's. Catches:
    the 3.12+ path not taken (the handle still holding a copy: the ~600 instructions a
    task it saves, SPEC P1), or 3.11 left without the context it reports in.
    """
    reg = fresh()
    handle = reg.spawn("held", BG, nop())
    untracked = asyncio.get_running_loop().create_task(nop())
    tracked = spawned_task("held")
    assert not tracked.done()
    # Counted outside `assert`, whose rewriting keeps its operands alive.
    baseline = sys.getrefcount(context_of(untracked))
    held = sys.getrefcount(context_of(tracked))
    assert held == (baseline if sys.version_info >= (3, 12) else baseline + 1)
    if sys.version_info >= (3, 12):
        assert tracked.get_context() is context_of(tracked)
    await asyncio.gather(handle, untracked)
    assert reg.stats().completed == 1


async def test_a_factory_task_is_young_only_where_its_context_is_known(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proves the factory path: young on CPython >= 3.12 (``Task.get_context()``), a done
    callback at once on 3.11; either way the failure is logged in the task's context.

    Runs on every version (the branch is version-specific). Catches: a
    factory's task made young on 3.11, where ``spawn`` cannot know its
    context (its failure would be logged in the sweep's), or the 3.12+
    branch not taken (no saving there).
    """

    def factory(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Task[Any]:
        return asyncio.Task(coro, loop=loop, name=kwargs.get("name"))

    loop = asyncio.get_running_loop()
    loop.set_task_factory(factory)
    try:
        with stamping_errors(caplog):
            reg = fresh()
            spawn_in_context(reg, "req-first", fail_after(0))
            handle = spawn_in_context(reg, "req-factory", fail_after(0))
            task = spawned_task("req-factory")
            callbacks = [cb for cb, _ctx in task._callbacks or []]  # type: ignore[attr-defined]
            if sys.version_info >= (3, 12):
                assert callbacks == []
            else:
                assert callbacks == [handle]
            await turns_until(lambda: len(reg) == 0)
    finally:
        loop.set_task_factory(None)
    assert requests_logged(caplog) == {"req-first": "req-first", "req-factory": "req-factory"}
