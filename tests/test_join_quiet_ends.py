"""The join after shutdown counts the tasks that have already ended (P9).

An asyncio task's done callback runs a loop turn after the task ends. A join made
right after shutdown (a service's stop, ``TaskRegistry.join_all``) would wait that
turn for tasks that are already over. So ``_try_close``, the join's every try, first
counts the Python tasks that ended *quietly* (returned, or were cancelled: nothing to
log or act on), stopping at the first one still running. These tests pin:

- after shutdown, ended tasks are counted at once, with their outcomes, and their
  done callbacks change nothing afterwards;
- before shutdown nothing is counted early (a critical task that returns must still
  fire the token through its own report);
- a failed task is left to its report (its log line, its count), and so is every task
  after a running one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from _support import forever, loops, run_on

from dig_service import ShutdownReason, ShutdownToken, TaskHandle, TaskKind, TaskRegistry

BG = TaskKind.BackgroundLoop


async def past_young_sweeps(handles: list[TaskHandle]) -> None:
    """Let the loop turn until every task has its own done callback: a young task's end
    may be reported by its loop's sweep in the very turn it ends (``young.rs``), which
    would leave nothing unreported for these tests to look at. A task leaves the young
    set at the second sweep after its first step; five turns are past that."""
    for _ in range(5):
        await asyncio.sleep(0)
    assert not any(h.is_finished() for h in handles)


def counts(reg: TaskRegistry) -> tuple[int, int, int, int]:
    s = reg.stats()
    return (s.live, s.completed, s.cancelled, s.failed)


@loops
def test_a_join_after_shutdown_counts_ended_tasks_at_once(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Proves: once the token has fired, tasks that returned or were cancelled but whose
    done callbacks have not run yet are counted by ``_try_close`` with their outcomes,
    and it closes the registry at once (no wait, no future left to resolve); the done
    callbacks that run a turn later change no count.

    Catches: the join waiting a loop turn for callbacks of tasks already over (P9's
    extra turn on every service stop); an outcome counted twice or as the wrong kind.
    """

    async def main() -> None:
        loop = asyncio.get_running_loop()
        token = ShutdownToken()
        reg = TaskRegistry(token)
        workers = [reg.spawn(f"w{i}", BG, token.cancelled()) for i in range(3)]
        victim = reg.spawn("victim", BG, forever())
        await past_young_sweeps([*workers, victim])
        victim.abort()
        token.cancel(ShutdownReason.UserRequested())
        # The tasks' last steps run in this turn, before this coroutine resumes; their
        # done callbacks are queued behind it.
        await asyncio.sleep(0)
        assert all(h.is_finished() for h in [*workers, victim])
        assert counts(reg) == (4, 0, 0, 0), "reported before the test could look"

        idle = loop.create_future()
        assert reg._try_close(idle), "the join waited for tasks already over"
        assert not idle.done()
        assert counts(reg) == (0, 3, 1, 0)
        await asyncio.sleep(0)  # the done callbacks run now
        assert counts(reg) == (0, 3, 1, 0)
        await reg.join_all(1.0)  # closed and empty: returns at once

    run_on(loop_factory, main())


@loops
def test_before_shutdown_ended_tasks_wait_for_their_own_reports(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Proves: before the token fires, ``_try_close`` counts nothing early: a task that
    returned stays live until its done callback, which resolves the join's future, and
    a critical task that returned fires the token through that report as before.

    Catches: quiet ends counted before shutdown, which would skip the critical task's
    report (the service would never learn that its critical task stopped).
    """

    async def main() -> None:
        loop = asyncio.get_running_loop()
        token = ShutdownToken()
        reg = TaskRegistry(token)
        go = asyncio.Event()
        critical = reg.spawn("heart", BG, go.wait(), critical=True)
        await past_young_sweeps([critical])
        go.set()
        await asyncio.sleep(0)  # its last step, then its done callback is queued
        assert critical.is_finished()
        assert not token.is_cancelled()

        idle = loop.create_future()
        assert not reg._try_close(idle)
        assert counts(reg) == (1, 0, 0, 0)
        await asyncio.wait_for(idle, 10.0)
        assert counts(reg) == (0, 1, 0, 0)
        reason = token.reason()
        assert isinstance(reason, ShutdownReason.Fatal), reason
        assert "heart" in reason.message

    run_on(loop_factory, main())


@loops
def test_a_failed_or_running_task_stops_the_early_count(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proves: after shutdown, ``_try_close`` stops at a task that failed (its done
    callback logs and counts it, once) and at one still running; the tasks spawned after
    either are left to their own reports too, and the join completes when they come.

    Catches: a failure counted without its log line; a running task counted as ended;
    a task counted twice, by the scan and by its callback.
    """
    caplog.set_level(logging.ERROR, logger="dig_service")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        token = ShutdownToken()
        reg = TaskRegistry(token)

        async def fails() -> None:
            await token.cancelled()
            raise ValueError("boom")

        failing = reg.spawn("failing", BG, fails())
        quiet = reg.spawn("quiet", BG, token.cancelled())
        await past_young_sweeps([failing, quiet])
        token.cancel(ShutdownReason.UserRequested())
        await asyncio.sleep(0)
        assert failing.is_finished() and quiet.is_finished()

        idle = loop.create_future()
        assert not reg._try_close(idle)
        assert counts(reg) == (2, 0, 0, 0)
        await asyncio.wait_for(idle, 10.0)
        assert counts(reg) == (0, 1, 0, 1)

        # A running task first: nothing after it is counted early either.
        reg2 = TaskRegistry(token)
        release = asyncio.Event()
        late_gate = asyncio.Event()
        slow = reg2.spawn("slow", BG, release.wait())
        late = reg2.spawn("late", BG, late_gate.wait())
        await past_young_sweeps([slow, late])
        late_gate.set()
        await asyncio.sleep(0)
        assert late.is_finished() and not slow.is_finished()
        idle2 = loop.create_future()
        assert not reg2._try_close(idle2)
        assert reg2.stats().live == 2, "a task behind a running one was counted early"
        release.set()
        await asyncio.wait_for(idle2, 10.0)
        assert counts(reg2) == (0, 2, 0, 0)

    run_on(loop_factory, main())
    failures = [r for r in caplog.records if "failing" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]
