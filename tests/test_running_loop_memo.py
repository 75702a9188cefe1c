"""spawn() finds the running loop exactly as ``asyncio.get_running_loop()`` would.

On CPython 3.11, ``asyncio.get_running_loop()`` makes a ``getpid()`` system
call on every call; ``TaskRegistry.spawn`` and ``ShutdownToken.cancelled``
skip it by remembering the loop next to CPython's own record of the running
loop (SPEC P1). These tests prove the memo never answers differently from
``get_running_loop()``: after the loop stops, for a second loop on the same
thread, for a loop installed by hand, in another thread, and in a forked
child.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from _support import loop_kinds, uvloop

from dig_service import ShutdownToken, TaskKind, TaskRegistry

BG = TaskKind.BackgroundLoop

RUNNERS: dict[str, Callable[[Coroutine[Any, Any, Any]], Any]] = {
    "asyncio": asyncio.run,
    **({"uvloop": uvloop.run} if uvloop is not None else {}),
}


async def nop() -> None:
    return None


def spawn_refused(reg: TaskRegistry) -> bool:
    """spawn() outside a running loop: a clear RuntimeError, and the coroutine closed."""
    coro: Any = nop()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="needs a running asyncio event loop"):
            reg.spawn("no-loop", BG, coro)
    return coro.cr_frame is None  # type: ignore[no-any-return]


async def spawn_and_get_loop(reg: TaskRegistry, name: str) -> asyncio.AbstractEventLoop:
    """Spawn a task, return the loop it was created on (after it ran)."""
    reg.spawn(name, BG, nop())
    [task] = [t for t in asyncio.all_tasks() if t.get_name() == name]
    await task
    return task.get_loop()


@pytest.mark.parametrize("first", loop_kinds("asyncio", "uvloop"))
@pytest.mark.parametrize("second", loop_kinds("asyncio", "uvloop"))
def test_stopped_loop_and_next_loop_on_the_same_thread(first: str, second: str) -> None:
    """Proves after a loop stops, spawn sees no loop; a second loop on the thread gets the tasks.

    Catches: a remembered running loop that outlives its run (tasks created
    on a stopped or closed loop, that never run), on every pair of asyncio
    and uvloop loops run one after the other in one thread.
    """
    reg = TaskRegistry(ShutdownToken())
    seen: list[asyncio.AbstractEventLoop] = []

    async def main(tag: str) -> None:
        loop = await spawn_and_get_loop(reg, f"first-{tag}")
        assert loop is asyncio.get_running_loop()
        seen.append(loop)

    RUNNERS[first](main("a"))
    assert spawn_refused(reg)
    RUNNERS[second](main("b"))
    assert spawn_refused(reg)
    assert seen[0] is not seen[1]
    assert reg.stats().completed == 2


def test_a_loop_installed_by_hand_is_seen() -> None:
    """Proves spawn follows asyncio._set_running_loop: None means no loop, another loop is used.

    Catches: a memo validated by the loop's own state (``is_running()``,
    ``_thread_id``) instead of by the running-loop record asyncio keeps,
    which code that swaps the running loop by hand (nested-loop helpers)
    would defeat: tasks created on a loop that is not the running one.
    """
    reg = TaskRegistry(ShutdownToken())
    other = asyncio.new_event_loop()

    async def main() -> None:
        mine = await spawn_and_get_loop(reg, "mine")
        asyncio._set_running_loop(None)
        try:
            assert spawn_refused(reg)
            asyncio._set_running_loop(other)
            reg.spawn("other", BG, nop())
            [task] = [t for t in asyncio.all_tasks(other) if t.get_name() == "other"]
            assert task.get_loop() is other
        finally:
            asyncio._set_running_loop(mine)
        assert await spawn_and_get_loop(reg, "mine-again") is mine

    try:
        asyncio.run(main())
        other.run_until_complete(asyncio.sleep(0))  # let "other" run to completion
    finally:
        other.close()
    assert reg.stats().completed == 3 and len(reg) == 0


@pytest.mark.parametrize("flavour", loop_kinds("asyncio", "uvloop"))
def test_loops_in_two_threads(flavour: str) -> None:
    """Proves spawns in two threads, each running its own loop at once, land on their own loop.

    Catches: a running-loop memo shared between threads (one thread's tasks
    created on the other thread's loop), and a thread with no loop getting
    one.
    """
    reg = TaskRegistry(ShutdownToken())
    barrier = threading.Barrier(2, timeout=10)
    loops: dict[str, list[bool]] = {"main": [], "thread": []}
    errors: list[BaseException] = []

    async def main(who: str) -> None:
        for i in range(20):
            got = await spawn_and_get_loop(reg, f"{who}-{i}")
            loops[who].append(got is asyncio.get_running_loop())
            if i % 5 == 0:
                # Interleave the two threads' spawns.
                await asyncio.to_thread(barrier.wait)

    def in_thread() -> None:
        try:
            RUNNERS[flavour](main("thread"))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    t = threading.Thread(target=in_thread)
    t.start()
    RUNNERS[flavour](main("main"))
    t.join(10)
    assert not errors
    assert loops == {"main": [True] * 20, "thread": [True] * 20}

    no_loop: list[bool] = []

    async def main_while_a_thread_has_none() -> None:
        await spawn_and_get_loop(reg, "main-again")
        th = threading.Thread(target=lambda: no_loop.append(spawn_refused(reg)))
        th.start()
        th.join(10)

    RUNNERS[flavour](main_while_a_thread_has_none())
    assert no_loop == [True]
    assert reg.stats().completed == 41


CHILD_SCRIPT = """
import asyncio, os, sys, warnings
from dig_service import ShutdownToken, TaskKind, TaskRegistry

async def nop():
    return None

def child():
    # Inside the parent's running loop's call stack: asyncio sees no running
    # loop in a forked child, and neither may spawn.
    reg = TaskRegistry(ShutdownToken())
    coro = nop()
    try:
        reg.spawn("child-early", TaskKind.BackgroundLoop, coro)
    except RuntimeError as exc:
        assert "needs a running asyncio event loop" in str(exc), exc
        assert coro.cr_frame is None
    else:
        return 2

    async def child_main():
        reg.spawn("child-task", TaskKind.BackgroundLoop, nop())
        [task] = [t for t in asyncio.all_tasks() if t.get_name() == "child-task"]
        assert task.get_loop() is asyncio.get_running_loop()
        await task

    asyncio.run(child_main())
    assert reg.stats().completed == 1
    return 0

async def main():
    reg = TaskRegistry(ShutdownToken())
    for _ in range(3):  # the parent's memo is set
        reg.spawn("parent", TaskKind.BackgroundLoop, nop())
    await asyncio.sleep(0)
    pid = os.fork()
    if pid == 0:
        try:
            code = child()
        except BaseException as exc:
            print("child failed:", repr(exc), flush=True)
            code = 1
        os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    reg.spawn("parent-after", TaskKind.BackgroundLoop, nop())
    while len(reg):
        await asyncio.sleep(0)
    print("child exit", code, "parent completed", reg.stats().completed, flush=True)

if sys.argv[1] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("flavour", loop_kinds("asyncio", "uvloop"))
def test_forked_child_sees_no_running_loop(flavour: str) -> None:
    """Proves a child forked inside a running loop cannot spawn, then can on a new loop.

    Catches: the running-loop memo surviving fork: the child would create
    tasks on the parent's loop, which never runs in the child (where
    ``get_running_loop()`` refuses it by pid).
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD_SCRIPT), flavour],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "child exit 0 parent completed 4" in proc.stdout, proc.stdout + proc.stderr
