"""The known traps of a tokio + asyncio bridge (SPEC section 4), each closed by a test.

Trap → test:

- a Rust completion that arrives after its event loop closed is dropped quietly:
  ``test_rust_completion_after_loop_closed_is_quiet``
- interpreter exit with native tasks running neither hangs, panics nor aborts:
  ``test_interpreter_exit_with_native_tasks_running``
- after ``os.fork()`` the child works or fails clearly, never hangs:
  ``test_forked_child_runs_native_tasks``,
  ``test_forked_child_using_the_parents_registry_never_hangs``
- a coroutine that hogs the GIL does not stop the deadline once it yields:
  ``test_gil_hog_does_not_stop_the_deadline``
- the Rust future behind an awaitable is dropped when the awaitable is cancelled:
  ``test_cancelling_an_awaitable_drops_its_rust_future``; the Python task behind a
  Rust future is cancelled when Rust gives up: ``rust/tests/pyfuture.rs``
- waking many waiters costs no runtime round trip each:
  ``test_waking_10k_waiters_is_one_loop_callback``,
  ``test_waking_waiters_never_starts_the_runtime``

Plus the hostile conditions of issue 6: ``test_cancel_storm_from_many_threads``,
``test_one_registry_two_loops_two_threads`` (and
``test_join_on_one_loop_is_woken_by_the_last_task_on_another``),
``test_100k_tasks_random_outcomes_exact_counts``,
``test_task_swallowing_cancellation_forever_is_named_at_the_deadline`` (and its
``Service`` twin).

Tests that need a process of their own (exit, fork, a loop closed under a
pending Rust future) run a small script with ``python -X dev`` and assert on its
exit status and on a clean stderr: dev mode makes every ResourceWarning,
unraisable exception and "Event loop is closed" traceback visible there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from _support import ScriptedNode, loop_kinds, uvloop

from dig_service import (
    Service,
    ServiceConfig,
    ShutdownDeadlineExceeded,
    ShutdownReason,
    ShutdownToken,
    StartContext,
    TaskHandle,
    TaskKind,
    TaskRegistry,
    _core,
)
from dig_service.testing import spawn_native_sleeper

BG = TaskKind.BackgroundLoop
WAIT = 10.0
"""Upper bound for one synchronisation wait; a healthy run needs a fraction of it."""
SCRIPT_TIMEOUT = 60.0
"""A subprocess that has not exited by then is hung (a healthy one needs < 2 s)."""


# --------------------------------------------------------------------------- helpers


def run_script(source: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``source`` in ``python -X dev``; fail the test (not hang) if it does not exit."""
    try:
        return subprocess.run(
            [sys.executable, "-X", "dev", "-c", textwrap.dedent(source), *args],
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"the script hung (no exit within {SCRIPT_TIMEOUT}s)\n"
            f"--- stdout\n{exc.stdout!r}\n--- stderr\n{exc.stderr!r}"
        ) from None


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


class _CountsThreadsafeCalls:
    """Mixin for an event loop class: records every ``call_soon_threadsafe`` callback."""

    def threadsafe_calls(self) -> list[object]:
        calls: list[object] = self.__dict__.setdefault("_threadsafe_calls", [])
        return calls

    def call_soon_threadsafe(self, callback: Any, *args: Any, context: Any = None) -> Any:
        self.threadsafe_calls().append(callback)  # list.append is atomic: any thread may call
        return super().call_soon_threadsafe(  # type: ignore[misc]
            callback, *args, context=context
        )


class CountingAsyncioLoop(_CountsThreadsafeCalls, asyncio.SelectorEventLoop):
    pass


COUNTING_LOOPS: dict[str, type[_CountsThreadsafeCalls]] = {"asyncio": CountingAsyncioLoop}

if uvloop is not None:

    class CountingUvloop(_CountsThreadsafeCalls, uvloop.Loop):  # type: ignore[misc]
        pass

    COUNTING_LOOPS["uvloop"] = CountingUvloop

OTHER_KIND = "uvloop" if uvloop is not None else "asyncio"
"""The second loop kind of the several-loops tests: uvloop, or another asyncio loop
where uvloop is not installed (those tests are about several loops in several threads)."""


def is_wake_all(callback: object) -> bool:
    """Whether ``callback`` is the native core's ``wake_all`` glue (private to ``_core``,
    compiled from ``rust/src/python/aio.py``; no ``_core`` attribute names it)."""
    return (
        getattr(callback, "__module__", None) == "dig_service._core"
        and getattr(callback, "__qualname__", None) == "wake_all"
    )


def wake_calls(loop: object) -> int:
    """How many ``wake_all`` batches of the core were posted to ``loop`` from other threads."""
    assert isinstance(loop, _CountsThreadsafeCalls)
    return sum(is_wake_all(cb) for cb in loop.threadsafe_calls())


class LoopThread:
    """An event loop of the given kind running ``main()`` on a thread of its own.

    Exceptions of ``main`` and anything the loop's exception handler sees are
    re-raised by :meth:`join`, so a failure on the thread fails the test.
    """

    def __init__(
        self, kind: str, main: Callable[[], Coroutine[Any, Any, object]], name: str
    ) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.result: object = None
        self.errors: list[object] = []
        self._main = main
        self._kind = kind
        self.thread = threading.Thread(target=self._run, name=name)
        self.thread.start()

    def _run(self) -> None:
        cls = COUNTING_LOOPS[self._kind]

        def factory() -> asyncio.AbstractEventLoop:
            loop = cls()
            assert isinstance(loop, asyncio.AbstractEventLoop)
            loop.set_debug(False)  # PYTHONDEVMODE: per-callback tracebacks cost seconds here
            loop.set_exception_handler(lambda _loop, ctx: self.errors.append(ctx))
            self.loop = loop
            return loop

        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                self.result = runner.run(self._main())
        except BaseException as exc:
            self.errors.append(exc)

    def join(self) -> object:
        self.thread.join(WAIT * 3)
        assert not self.thread.is_alive(), f"{self.thread.name} did not finish"
        assert not self.errors, f"{self.thread.name}: {self.errors}"
        return self.result


# --------------------------------------------------------------------------- trap 1

CLOSED_LOOP_SCRIPT = """
    import asyncio, sys, threading
    from dig_service import _core

    N = 20
    if sys.argv[1] == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    loop.set_debug(False)  # -X dev: no "Executing ... took 0.1 seconds" lines on a busy box
    dropped = threading.Semaphore(0)
    loop_closed_at_drop = []

    def on_drop():
        loop_closed_at_drop.append(loop.is_closed())
        dropped.release()

    async def start():
        futs = [_core._bridged_sleep(0.2 + i * 0.005, on_drop) for i in range(N)]
        done, _ = await asyncio.wait(futs, timeout=0.01)
        assert not done
        return futs

    futs = loop.run_until_complete(start())
    loop.close()  # the Rust futures are still sleeping: they complete after this
    for _ in range(N):
        assert dropped.acquire(timeout=10), "a Rust future never completed"
    # Joins the runtime's workers: whatever the completion path would print
    # (in the same poll as the drop) has been printed when this returns.
    _core.shutdown_runtime()
    assert loop_closed_at_drop == [True] * N, loop_closed_at_drop
    print("completed after close:", N)
"""


@pytest.mark.parametrize("kind", loop_kinds("asyncio", "uvloop"))
def test_rust_completion_after_loop_closed_is_quiet(kind: str) -> None:
    """Proves: Rust futures (behind asyncio awaitables) that complete after their event
    loop was closed are dropped quietly: the process exits 0 with an empty stderr under
    ``-X dev``, and each completion really happened after the close.

    Catches: the bridge posting the result with ``call_soon_threadsafe`` to the closed
    loop, which raises ``RuntimeError: Event loop is closed`` on a tokio worker and
    prints a traceback per completion (pyo3-async-runtimes does exactly that unless the
    completion is recognised as orphaned).
    """
    proc = run_script(CLOSED_LOOP_SCRIPT, kind)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.strip() == "completed after close: 20", describe(proc)
    assert proc.stderr == "", describe(proc)


# --------------------------------------------------------------------------- trap 2

EXIT_SCRIPT = """
    import asyncio, os, sys, threading
    from dig_service import ShutdownToken, TaskRegistry, _core
    from dig_service.testing import spawn_native_sleeper

    N = 8
    how = sys.argv[1]

    def on_drop():
        # Runs on a tokio worker, which must attach to the interpreter to call
        # it: possible only if the runtime is shut down with the GIL released.
        # One write per line: workers drop futures in parallel.
        os.write(1, b"rust future dropped\\n")

    bg_waiting = threading.Event()

    def background_loop():
        async def main():
            fut = _core._bridged_sleep(3600, on_drop)
            bg_waiting.set()
            await fut

        asyncio.run(main(), debug=False)

    # A daemon thread whose event loop is awaiting a Rust future when the
    # interpreter exits.
    threading.Thread(target=background_loop, daemon=True).start()
    pending = []

    async def main():
        registry = TaskRegistry(ShutdownToken())
        for i in range(N):
            spawn_native_sleeper(registry, f"native-{i}", 3600, honor_shutdown=False)
        pending.extend(_core._bridged_sleep(3600, on_drop) for _ in range(N))
        assert bg_waiting.wait(10)
        assert _core.runtime_started() and len(registry) == N
        os.write(1, b"exiting with native tasks running\\n")
        if how == "sys.exit":
            sys.exit(0)
        return registry

    registry = asyncio.run(main(), debug=False)
"""


@pytest.mark.parametrize("how", ["return", "sys.exit"])
def test_interpreter_exit_with_native_tasks_running(how: str) -> None:
    """Proves: an interpreter that exits (falling off the end, or ``sys.exit`` inside the
    running loop) while native tokio tasks and Rust futures behind awaitables are still
    running neither hangs, panics nor aborts: exit status 0, empty stderr, and every
    pending Rust future was dropped by the deliberate runtime shutdown (the ``atexit``
    hook), which could call back into Python (so it ran with the GIL released).

    Catches: no deliberate shutdown (the runtime torn down with the process: workers
    touching a finalised interpreter, "panicked" / SIGABRT), a shutdown holding the GIL
    (workers block attaching; the drop callbacks never run; a hang or a 1 s stall), or
    a shutdown that waits for tasks that never end.
    """
    proc = run_script(EXIT_SCRIPT, how)
    assert proc.returncode == 0, describe(proc)
    assert proc.stderr == "", describe(proc)
    lines = proc.stdout.splitlines()
    assert lines[0] == "exiting with native tasks running", describe(proc)
    assert lines[1:] == ["rust future dropped"] * 9, describe(proc)


# --------------------------------------------------------------------------- trap 3

FORK_PREAMBLE = """
    import asyncio, faulthandler, os, random, sys, warnings
    from dig_service import ShutdownReason, ShutdownToken, TaskRegistry, _core
    from dig_service.testing import spawn_native_sleeper

    CHILDREN = int(sys.argv[1])

    def say(line):
        os.write(1, (line + "\\n").encode())  # one write: lines of parallel children never mix

    def child(main):
        # A hang in native code (GIL held) cannot be interrupted from Python:
        # faulthandler's watchdog thread dumps the stacks and exits instead.
        faulthandler.dump_traceback_later(5, exit=True)
        try:
            asyncio.run(main(), debug=False)
        except Exception as exc:  # the other acceptable outcome: a clear error
            say(f"child error: {type(exc).__name__}: {exc}")
            return 3
        finally:
            faulthandler.cancel_dump_traceback_later()
        say("child ok")
        return 0

    async def fork_children(make_child_main):
        rng = random.Random(6)
        token = ShutdownToken()
        registry = TaskRegistry(token)
        await spawn_native_sleeper(registry, "warm-up", 0)
        assert _core.runtime_started()
        pids = []
        for i in range(CHILDREN):
            # Fork while native tasks start and end on the runtime's workers.
            for j in range(50):
                spawn_native_sleeper(registry, f"churn-{i}-{j}", rng.random() * 0.01)
            await asyncio.sleep(rng.random() * 0.003)
            with warnings.catch_warnings():
                # 3.12+: "This process is multi-threaded, use of fork() may lead to deadlocks"
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:
                code = child(make_child_main(registry))
                # Half the children exit through the interpreter (atexit shuts
                # their runtime down), half skip it.
                if i % 2:
                    os._exit(code)
                sys.exit(code)
            pids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        token.cancel(ShutdownReason.UserRequested())
        await registry.join_all(10)
        say(f"parent ok {codes} {registry.stats().live}")
"""

FORK_FRESH_SCRIPT = (
    FORK_PREAMBLE
    + """
    def make_child_main(inherited):
        async def child_main():
            token = ShutdownToken()
            registry = TaskRegistry(token)
            await asyncio.wait_for(spawn_native_sleeper(registry, "child-nap", 0.01), 10)
            waiter = asyncio.ensure_future(token.cancelled())
            spawn_native_sleeper(registry, "child-until-shutdown", 3600)
            await asyncio.wait_for(_core._bridged_sleep(0.001, lambda: None), 10)
            token.cancel(ShutdownReason.UserRequested())
            await asyncio.wait_for(waiter, 10)
            await registry.join_all(10)
            assert registry.stats().completed == 2, registry.stats()

        return child_main

    asyncio.run(fork_children(make_child_main), debug=False)
"""
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork() on this platform")
def test_forked_child_runs_native_tasks() -> None:
    """Proves: after ``os.fork()`` in a process whose tokio runtime is running (and busy:
    native tasks start and finish around each fork), every child can spawn native tasks,
    await them and a Rust-backed awaitable, wait on a token and join a registry, then
    exit (through the interpreter or ``os._exit``) with status 0; the parent keeps
    working too. Nothing hangs: each child has a watchdog and the script a timeout.

    Catches: a child reusing the parent's runtime, whose worker threads do not exist
    after fork (every native await hangs), a child that drops the inherited runtime
    (waiting for those threads forever), or a child's atexit shutdown that hangs.
    """
    proc = run_script(FORK_FRESH_SCRIPT, "12")
    assert proc.returncode == 0, describe(proc)
    assert proc.stderr == "", describe(proc)
    lines = proc.stdout.splitlines()
    assert lines[-1] == f"parent ok {[0] * 12} 0", describe(proc)
    assert lines[:-1] == ["child ok"] * 12, describe(proc)


FORK_INHERITED_SCRIPT = (
    FORK_PREAMBLE
    + """
    def make_child_main(inherited):
        async def child_main():
            # The parent's registry and token, used in the child: their locks
            # may have been held by the parent's tokio workers at the fork, so
            # every use must fail at once with a clear error (never hang), and
            # fresh objects must work.
            uses = [
                lambda: len(inherited),
                inherited.snapshot,
                inherited.stats,
                lambda: inherited.shutdown.cancel(ShutdownReason.UserRequested()),
                inherited.shutdown.reason,
            ]
            for use in uses:
                try:
                    use()
                except RuntimeError as exc:
                    assert "os.fork()" in str(exc), repr(exc)
                else:
                    raise AssertionError("an inherited registry or token was usable")
            try:
                await inherited.join_all(0.05)
            except RuntimeError as exc:
                assert "os.fork()" in str(exc), repr(exc)
            fresh = TaskRegistry(ShutdownToken())
            await spawn_native_sleeper(fresh, "child-native", 0.001)
            await fresh.join_all(1)
        return child_main

    asyncio.run(fork_children(make_child_main), debug=False)
"""
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork() on this platform")
def test_forked_child_using_the_parents_registry_never_hangs() -> None:
    """Proves: a forked child that touches the registry and token it inherited from the
    parent (``len``, ``snapshot``, ``stats``, ``cancel``, ``reason``, ``join_all``) gets
    a clear RuntimeError naming os.fork() at once, never a hang, and that fresh ones
    work in the child. A hang is turned into a
    failure by the child's watchdog (``faulthandler``), with the child's stack on stderr.

    Catches: locks held by the parent's tokio workers at fork time, inherited locked by
    the child (SPEC section 4: the child "never hangs").
    """
    proc = run_script(FORK_INHERITED_SCRIPT, "24")
    assert proc.returncode == 0, describe(proc)
    assert proc.stderr == "", describe(proc)
    assert proc.stdout.splitlines()[-1] == f"parent ok {[0] * 24} 0", describe(proc)


# --------------------------------------------------------------------------- trap 4


async def test_gil_hog_does_not_stop_the_deadline() -> None:
    """Proves: a tracked coroutine that hogs the GIL (a pure-Python busy loop of at least
    0.7 s, with the switch interval raised so other threads barely get the GIL) while a
    ``join_all(0.3)`` is pending does not stop the deadline: once the hog yields,
    ``join_all`` raises ``ShutdownDeadlineExceeded`` at once (under 0.2 s later, less
    than the deadline itself) naming exactly the two stragglers. Meanwhile the token
    was cancelled from another thread (it had to win the GIL from the hog), native
    tasks ended on tokio workers (on their own and on the token), and the Python
    waiters parked on the token were all woken once the loop ran again. The hog
    busy-waits until those have happened, so the stragglers when it yields are exact.

    Catches: a deadline counted from when the loop got control back (it would fire
    0.3 s after the hog instead of at once), a deadline delivered through a tokio
    timer whose wake-up the hog starves or loses, or a lock-order deadlock between the
    GIL and the token or registry locks (a worker or the canceller holding one while
    waiting for the GIL that the loop thread holds while it needs that lock).
    """
    token = ShutdownToken()
    registry = TaskRegistry(token)
    cancelled = threading.Event()
    hog_yielded: list[float] = []
    old_interval = sys.getswitchinterval()

    def cancel_from_another_thread() -> None:
        token.cancel(ShutdownReason.UserRequested())
        cancelled.set()

    async def hog() -> None:
        threading.Thread(target=cancel_from_another_thread).start()
        sys.setswitchinterval(0.5)
        try:
            now = time.monotonic()
            at_least, give_up = now + 0.7, now + WAIT
            # Only the hog and the stuck native task are left once the canceller
            # ran and the native tasks ended.
            while now < at_least or not cancelled.is_set() or len(registry) != 2:
                assert now < give_up, f"cancelled={cancelled.is_set()} live={len(registry)}"
                now = time.monotonic()
        finally:
            sys.setswitchinterval(old_interval)
        hog_yielded.append(time.monotonic())
        await asyncio.sleep(3600)

    waiters = [asyncio.ensure_future(token.cancelled()) for _ in range(100)]
    for i in range(100):
        spawn_native_sleeper(registry, f"native-{i}", i * 0.002, honor_shutdown=False)
    for i in range(50):
        spawn_native_sleeper(registry, f"native-obedient-{i}", 3600)
    native_stuck = spawn_native_sleeper(registry, "native-stuck", 3600, honor_shutdown=False)
    await asyncio.sleep(0)  # the waiters park on the token
    hog_handle = registry.spawn("hog", BG, hog())
    started = time.monotonic()
    with pytest.raises(ShutdownDeadlineExceeded) as info:
        await registry.join_all(0.3)
    returned = time.monotonic()
    assert hog_yielded, "join_all returned before the hog yielded"
    assert returned - hog_yielded[0] < 0.2, returned - hog_yielded[0]
    assert returned - started >= 0.7
    assert sorted(info.value.pending_names) == ["hog", "native-stuck"]
    await asyncio.wait_for(asyncio.gather(*waiters), WAIT)
    with pytest.raises(asyncio.CancelledError):
        await hog_handle
    with pytest.raises(asyncio.CancelledError):
        await native_stuck
    stats = registry.stats()
    assert (stats.spawned, stats.completed, stats.cancelled, stats.aborted, stats.live) == (
        152,
        150,
        1,
        1,
        0,
    )


# --------------------------------------------------------------------------- trap 5


@pytest.mark.parametrize("how", ["Task.cancel", "asyncio.timeout", "TaskGroup"])
async def test_cancelling_an_awaitable_drops_its_rust_future(how: str) -> None:
    """Proves: cancelling the asyncio side of a Rust-backed awaitable (directly, through
    ``asyncio.timeout``, or through a failing ``TaskGroup`` sibling) drops the Rust
    future behind it promptly (its drop guard runs), while an uncancelled one on the
    same loop keeps running (until it is cancelled in turn).

    Catches: a bridge that leaves the Rust future running after its awaiter gave up
    (pyo3-async-runtimes without cancellation propagation): tokio work and resources
    leak for the full duration of whatever the future was waiting for.
    """
    dropped = threading.Event()
    survivor_dropped = threading.Event()
    survivor = asyncio.ensure_future(_core._bridged_sleep(3600, survivor_dropped.set))

    async def bridged() -> None:
        await _core._bridged_sleep(3600, dropped.set)

    if how == "Task.cancel":
        task = asyncio.ensure_future(bridged())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    elif how == "asyncio.timeout":
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await bridged()
    else:

        async def fails() -> None:
            await asyncio.sleep(0)
            raise LookupError("sibling failed")

        with pytest.raises(ExceptionGroup) as group:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(bridged())
                tg.create_task(fails())
        assert group.group_contains(LookupError)

    assert await asyncio.to_thread(dropped.wait, WAIT), "the Rust future was not dropped"
    assert not survivor_dropped.is_set(), "an uncancelled Rust future was dropped"
    survivor.cancel()
    await asyncio.gather(survivor, return_exceptions=True)
    assert await asyncio.to_thread(survivor_dropped.wait, WAIT)


RUNTIME_SHUTDOWN_SCRIPT = """
    import asyncio, sys, threading
    from dig_service import _core

    async def main():
        dropped = threading.Event()
        awaiting = asyncio.ensure_future(_core._bridged_sleep(3600, dropped.set))
        await asyncio.sleep(0.05)
        # Another thread takes the runtime down under the pending native future.
        await asyncio.to_thread(_core.shutdown_runtime)
        assert await asyncio.to_thread(dropped.wait, 10), "the Rust future was not dropped"
        try:
            await asyncio.wait_for(awaiting, 10)
        except RuntimeError as exc:
            print("raised:", exc)
        else:
            print("returned: a result from a dropped future")

    if sys.argv[1] == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
"""


@pytest.mark.parametrize("kind", loop_kinds("asyncio", "uvloop"))
def test_awaiter_of_a_native_future_dropped_by_a_runtime_shutdown_gets_an_error(
    kind: str,
) -> None:
    """Proves: when the tokio runtime shuts down under a pending native await (its task
    dropped unfinished), the awaiting coroutine gets a ``RuntimeError`` that says so,
    promptly, and the process exits cleanly.

    Catches: a bridge whose dropped task settles nothing (pyo3-async-runtimes' did
    that): the awaiter waits for ever (here: ``wait_for`` times out after 10 s and the
    test fails on the missing line).
    """
    proc = run_script(RUNTIME_SHUTDOWN_SCRIPT, kind)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.strip() == (
        "raised: the native future was dropped before it finished: the tokio runtime "
        "shut down under it"
    ), describe(proc)


# --------------------------------------------------------------------------- trap 6


@pytest.mark.parametrize("kind", loop_kinds("asyncio", "uvloop"))
def test_waking_10k_waiters_is_one_loop_callback(kind: str) -> None:
    """Proves: 10 000 coroutines awaiting ``token.cancelled()`` on one loop are all woken
    by a cancel from another thread with exactly one ``call_soon_threadsafe`` on that
    loop (one batch), and by a cancel on the loop's own thread with none at all (they
    are all done one loop turn later).

    Catches: a wake-up per waiter (10 000 thread-safe calls, or 10 000
    ``future_into_py`` round trips through tokio at 10-20 µs each), which makes a
    shutdown of a busy service take seconds.
    """
    n = 10_000

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, _CountsThreadsafeCalls)
        # From another thread.
        token = ShutdownToken()
        waiters = [asyncio.ensure_future(token.cancelled()) for _ in range(n)]
        await asyncio.sleep(0)  # every waiter has parked
        before = len(loop.threadsafe_calls())
        canceller = threading.Thread(target=token.cancel, args=(ShutdownReason.RpcRequested(),))
        canceller.start()
        await asyncio.wait_for(asyncio.gather(*waiters), WAIT)
        canceller.join(WAIT)
        posted = loop.threadsafe_calls()[before:]
        assert len(posted) == 1 and is_wake_all(posted[0]), posted
        # From the loop's own thread.
        token = ShutdownToken()
        waiters = [asyncio.ensure_future(token.cancelled()) for _ in range(n)]
        await asyncio.sleep(0)
        before = len(loop.threadsafe_calls())
        token.cancel(ShutdownReason.UserRequested())
        await asyncio.sleep(0)
        assert all(w.done() for w in waiters)
        assert len(loop.threadsafe_calls()) == before

    errors: list[object] = []

    def factory() -> asyncio.AbstractEventLoop:
        loop = COUNTING_LOOPS[kind]()
        assert isinstance(loop, asyncio.AbstractEventLoop)
        loop.set_debug(False)  # PYTHONDEVMODE: a traceback per set_result costs seconds for 10k
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        return loop

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
    assert not errors


WAKE_WITHOUT_RUNTIME_SCRIPT = """
    import asyncio, threading
    from dig_service import ShutdownReason, ShutdownToken, _core

    async def main():
        token = ShutdownToken()
        child = token.child_token()
        waiters = [asyncio.ensure_future(t.cancelled()) for t in (token, child) * 5000]
        await asyncio.sleep(0)
        threading.Thread(target=token.cancel, args=(ShutdownReason.UserRequested(),)).start()
        await asyncio.wait_for(asyncio.gather(*waiters), 10)

    asyncio.run(main(), debug=False)
    print("woken", "runtime started:", _core.runtime_started())
"""


def test_waking_waiters_never_starts_the_runtime() -> None:
    """Proves: parking 10 000 waiters on a token and its child and waking them all from
    another thread never even starts the tokio runtime: no waiter costs a runtime round
    trip.

    Catches: ``cancelled()`` implemented as a ``future_into_py`` awaitable per waiter.
    """
    proc = run_script(WAKE_WITHOUT_RUNTIME_SCRIPT)
    assert proc.returncode == 0 and proc.stderr == "", describe(proc)
    assert proc.stdout.strip() == "woken runtime started: False", describe(proc)


# --------------------------------------------------------------------------- storms


def test_cancel_storm_from_many_threads() -> None:
    """Proves: with 4 event loops (2 asyncio, 2 uvloop) in 4 threads, each holding 2 500
    waiters on a token and its child and parking new waiters as fast as it can, 16
    threads released together by a barrier all cancelling the token (and some the
    child) wake every waiter on every loop, lose none of those parked during the
    storm, make every loop agree on the one recorded reason, and cost each loop at most
    one wake-up batch per token. Three rounds, fresh tokens each.

    Catches: lost wake-ups in the race between parking a waiter and the cancel (a
    waiter pushed after the waiter list was taken), a reason that is not first-wins
    under contention, a wake-up per canceller or per waiter, or a crash/deadlock
    between the token's lock and the GIL.
    """
    loops, cancellers, per_loop, rounds = 4, 16, 2_500, 3
    kinds = ["asyncio", OTHER_KIND] * (loops // 2)
    tokens: list[tuple[ShutdownToken, ShutdownToken]] = []
    ready = threading.Barrier(loops + cancellers + 1)
    seen: list[list[tuple[object, object, int, int]]] = [[] for _ in range(loops)]

    async def churn(
        token: ShutdownToken, child: ShutdownToken, late: list[asyncio.Future[None]]
    ) -> None:
        """Park new waiters on both tokens, one pair per loop turn, until the storm."""
        while not token.is_cancelled():
            late.append(asyncio.ensure_future(token.cancelled()))
            late.append(asyncio.ensure_future(child.cancelled()))
            await asyncio.sleep(0)

    def make_main(index: int) -> Callable[[], Coroutine[Any, Any, None]]:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            for r in range(rounds):
                await asyncio.to_thread(ready.wait, WAIT)  # the tokens of round r exist
                token, child = tokens[r]
                waiters = [
                    asyncio.ensure_future((token if i % 2 else child).cancelled())
                    for i in range(per_loop)
                ]
                await asyncio.sleep(0)
                late: list[asyncio.Future[None]] = []
                churner = asyncio.ensure_future(churn(token, child, late))
                before = wake_calls(loop)
                await asyncio.to_thread(ready.wait, WAIT)  # storm starts
                await asyncio.wait_for(churner, WAIT)
                await asyncio.wait_for(asyncio.gather(*waiters, *late), WAIT)
                seen[index].append(
                    (token.reason(), child.reason(), wake_calls(loop) - before, len(late))
                )

        return main

    threads = [LoopThread(kinds[i], make_main(i), f"storm-loop-{i}") for i in range(loops)]
    reasons = [ShutdownReason.Fatal(f"canceller {i}") for i in range(cancellers)]

    def canceller(i: int) -> None:
        for r in range(rounds):
            ready.wait(WAIT)  # round r set up
            token, child = tokens[r]
            ready.wait(WAIT)  # storm
            if i % 4 == 0:
                child.cancel(ShutdownReason.ReloadRequested())
            token.cancel(reasons[i])

    storm = [threading.Thread(target=canceller, args=(i,)) for i in range(cancellers)]
    for t in storm:
        t.start()
    for _ in range(rounds):
        parent = ShutdownToken()
        tokens.append((parent, parent.child_token()))
        ready.wait(WAIT)  # round set up
        ready.wait(WAIT)  # storm
    for t in storm:
        t.join(WAIT)
    for lt in threads:
        lt.join()
    for r in range(rounds):
        token, child = tokens[r]
        assert token.reason() in reasons
        assert child.reason() in (token.reason(), ShutdownReason.ReloadRequested())
        for index in range(loops):
            token_reason, child_reason, batches, _late = seen[index][r]
            assert (token_reason, child_reason) == (token.reason(), child.reason())
            assert batches <= 2, f"loop {index} round {r}: {batches} wake-up batches"


def test_one_registry_two_loops_two_threads() -> None:
    """Proves: one ``TaskRegistry`` used from two event loops (asyncio and uvloop) in two
    threads tracks both loops' tasks (and native ones) in one snapshot; a cancel from
    one thread stops the obedient tasks on both loops; ``join_all`` on loop A is woken
    by the last task ending on loop B; at the deadline the stragglers of *both* loops
    are named and each is cancelled on its own loop; the counts are exact; and after
    the join loop B's ``spawn`` is refused with ``AlreadyStopped`` without a "never
    awaited" warning.

    Catches: a registry bound to the loop that created it, a join that waits only for
    its own loop's tasks, a straggler cancelled from the wrong thread (asyncio is not
    thread-safe: the cancel would be lost or corrupt loop B), or wake-ups delivered to
    the wrong loop.
    """
    per_loop = 200
    token = ShutdownToken()
    registry = TaskRegistry(token)
    spawned = threading.Barrier(2)
    joined = threading.Event()
    outcome: dict[str, object] = {}

    async def obedient() -> None:
        await token.cancelled()

    async def stubborn(release: asyncio.Event) -> None:
        await release.wait()

    async def loop_b() -> None:
        release = asyncio.Event()
        handles = [registry.spawn(f"b-{i}", BG, obedient()) for i in range(per_loop)]
        handles.append(registry.spawn("b-stubborn", BG, stubborn(release)))
        await asyncio.to_thread(spawned.wait, WAIT)
        await asyncio.to_thread(joined.wait, WAIT)
        results = await asyncio.gather(*handles, return_exceptions=True)
        outcome["b-cancelled"] = [
            h.name for h, r in zip(handles, results, strict=True) if r is not None
        ]

        async def late() -> None:
            pass

        with pytest.raises(Exception, match="closed") as refused:
            registry.spawn("b-late", BG, late())
        outcome["b-refused"] = type(refused.value).__name__

    async def loop_a() -> None:
        handles = [registry.spawn(f"a-{i}", BG, obedient()) for i in range(per_loop)]
        handles.append(registry.spawn("a-stubborn", BG, asyncio.sleep(3600)))
        native = spawn_native_sleeper(registry, "native", 3600)
        await asyncio.to_thread(spawned.wait, WAIT)
        origins = {(s.name.split("-")[0], s.origin) for s in registry.snapshot()}
        assert origins == {("a", "python"), ("b", "python"), ("native", "native")}
        assert len(registry) == 2 * per_loop + 3
        threading.Thread(target=token.cancel, args=(ShutdownReason.RpcRequested(),)).start()
        try:
            with pytest.raises(ShutdownDeadlineExceeded) as info:
                await registry.join_all(0.5)
        finally:
            joined.set()
        outcome["pending"] = sorted(info.value.pending_names)
        await asyncio.wait_for(native, WAIT)
        results = await asyncio.gather(*handles, return_exceptions=True)
        outcome["a-cancelled"] = [
            h.name for h, r in zip(handles, results, strict=True) if r is not None
        ]

    b = LoopThread(OTHER_KIND, loop_b, "registry-loop-b")
    a = LoopThread("asyncio", loop_a, "registry-loop-a")
    a.join()
    b.join()
    assert outcome["pending"] == ["a-stubborn", "b-stubborn"]
    assert outcome["a-cancelled"] == ["a-stubborn"]
    assert outcome["b-cancelled"] == ["b-stubborn"]
    assert outcome["b-refused"] == "AlreadyStopped"
    stats = registry.stats()
    assert (stats.spawned, stats.completed, stats.cancelled, stats.live) == (
        2 * per_loop + 3,
        2 * per_loop + 1,
        2,
        0,
    )


async def test_join_on_one_loop_is_woken_by_the_last_task_on_another() -> None:
    """Proves: ``join_all`` awaited on this loop returns as soon as the last tracked task,
    running on another loop in another thread, ends: it is woken across threads, not
    by its (30 s) deadline.

    Catches: an idle wake-up that only works when the registry empties on the joining
    loop's own thread (the join would sit out its whole deadline).
    """
    token = ShutdownToken()
    registry = TaskRegistry(token)
    spawned = threading.Event()

    async def other() -> None:
        handles = [registry.spawn(f"other-{i}", BG, token.cancelled()) for i in range(100)]
        spawned.set()
        await asyncio.gather(*handles)

    thread = LoopThread(OTHER_KIND, other, "other-loop")
    assert await asyncio.to_thread(spawned.wait, WAIT)
    threading.Thread(target=token.cancel, args=(ShutdownReason.UserRequested(),)).start()
    started = time.monotonic()
    await registry.join_all(30)
    assert time.monotonic() - started < WAIT
    await asyncio.to_thread(thread.join)
    assert registry.stats().completed == 100 and registry.is_closed()


# --------------------------------------------------------------------------- 100k


async def test_100k_tasks_random_outcomes_exact_counts(caplog: pytest.LogCaptureFixture) -> None:
    """Proves: 100 000 Python tasks and 1 000 native ones, with random durations (0 to
    0.3 s) and random outcomes (about 1 % raise, 0.1 % never finish), joined under a 1 s
    deadline: ``ShutdownDeadlineExceeded`` names exactly the never-finishing ones, every
    other task is counted as completed or failed exactly, stuck Python tasks are
    cancelled and stuck native ones aborted, nothing is left live, and every raised
    exception was logged once, with its traceback, on the ``dig_service`` logger.
    Seeded, so a failure reproduces.

    Catches: lost or double-counted outcomes under volume, a task that finished before
    the deadline but was still waiting to be reaped named as a straggler (a busy loop
    runs the deadline timer before queued done callbacks), stragglers left running, or
    exceptions swallowed without a log record.
    """
    loop = asyncio.get_running_loop()
    # asyncio debug mode (PYTHONDEVMODE=1) records a creation traceback for every
    # task: ~40 s for 100k. Nothing proven here depends on it.
    loop.set_debug(False)
    caplog.set_level(logging.ERROR, logger="dig_service")
    rng = random.Random(0x5EED_0006)
    token = ShutdownToken()
    registry = TaskRegistry(token)
    expected = {"completed": 0, "failed": 0}
    stuck: list[str] = []
    native_stuck: list[str] = []
    stuck_handles: list[TaskHandle] = []

    class Injected(Exception):
        pass

    async def ok(delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)

    async def fail(delay: float, i: int) -> None:
        if delay:
            await asyncio.sleep(delay)
        raise Injected(i)

    async def never() -> None:
        await asyncio.sleep(3600)

    for batch in range(100):
        for j in range(1000):
            i = batch * 1000 + j
            name = f"t{i}"
            delay = rng.choice((0.0, rng.random() * 0.3))
            roll = rng.random()
            if roll < 0.001:
                stuck_handles.append(registry.spawn(name, TaskKind.RpcHandler, never()))
                stuck.append(name)
            elif roll < 0.011:
                registry.spawn(name, TaskKind.RpcHandler, fail(delay, i))
                expected["failed"] += 1
            else:
                registry.spawn(name, TaskKind.RpcHandler, ok(delay))
                expected["completed"] += 1
        for j in range(10):
            name = f"n{batch}-{j}"
            if rng.random() < 0.05:
                stuck_handles.append(
                    spawn_native_sleeper(registry, name, 3600, honor_shutdown=False)
                )
                native_stuck.append(name)
            else:
                spawn_native_sleeper(registry, name, rng.random() * 0.3)
                expected["completed"] += 1
        # Let the batch start (it schedules its timers now, not after 100k spawns).
        await asyncio.sleep(0)

    with pytest.raises(ShutdownDeadlineExceeded) as info:
        await registry.join_all(1.0)
    assert sorted(info.value.pending_names) == sorted(stuck + native_stuck)
    assert info.value.pending == len(stuck) + len(native_stuck)
    # Each straggler's handle resolves once it has left the registry.
    results = await asyncio.gather(*stuck_handles, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert registry.is_empty()
    stats = registry.stats()
    assert (
        stats.spawned,
        stats.completed,
        stats.failed,
        stats.cancelled,
        stats.aborted,
        stats.live,
    ) == (
        101_000,
        expected["completed"],
        expected["failed"],
        len(stuck),
        len(native_stuck),
        0,
    )
    logged = [
        r.exc_info[1]
        for r in caplog.records
        if r.name.startswith("dig_service") and r.exc_info and r.exc_info[1] is not None
    ]
    assert all(isinstance(e, Injected) and e.__traceback__ is not None for e in logged)
    assert len(logged) == expected["failed"]
    assert len({e.args[0] for e in logged}) == expected["failed"]


# --------------------------------------------------------------------------- swallowers


async def test_task_swallowing_cancellation_forever_is_named_at_the_deadline() -> None:
    """Proves: a tracked Python task that catches every ``CancelledError`` and goes back to
    waiting does not hold ``join_all`` past its deadline: it raises
    ``ShutdownDeadlineExceeded`` on time, naming exactly that task, which did receive
    the cancellation (and swallowed it) and is still running afterwards, tracked.

    Catches: a join that waits for cancelled stragglers to actually finish (it would
    hang forever on such a task), or a deadline report that omits a task because a
    cancel was *requested* for it.
    """
    token = ShutdownToken()
    registry = TaskRegistry(token)
    release = asyncio.Event()
    swallowed = asyncio.Event()

    async def swallower() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                swallowed.set()

    async def obedient() -> None:
        await token.cancelled()

    handle = registry.spawn("swallower", BG, swallower())
    try:
        for i in range(10):
            registry.spawn(f"obedient-{i}", BG, obedient())
        await asyncio.sleep(0)
        token.cancel(ShutdownReason.UserRequested())
        started = time.monotonic()
        with pytest.raises(ShutdownDeadlineExceeded) as info:
            await registry.join_all(0.2)
        # 0.19: uvloop's clock counts whole milliseconds and is read once a loop turn,
        # so its 0.2 s timer can fire a few microseconds early by time.monotonic().
        assert 0.19 <= time.monotonic() - started < 0.2 + WAIT / 4
        assert info.value.pending_names == ["swallower"] and info.value.pending == 1
        await asyncio.wait_for(swallowed.wait(), WAIT)
        assert not handle.is_finished()
        assert [s.name for s in registry.snapshot()] == ["swallower"]
    finally:
        # Let it end, so the loop can close, even after a failed assertion (the
        # loop's teardown would otherwise wait forever for a task that swallows
        # every cancellation).
        release.set()
    await asyncio.wait_for(handle, WAIT)
    assert registry.stats().completed == 11 and registry.is_empty()


async def test_service_with_a_task_swallowing_cancellation_stops_at_the_deadline() -> None:
    """Proves: the same swallowing task inside a ``Service``: ``start()`` still returns at
    the shutdown deadline with ``ShutdownDeadlineExceeded`` naming it, after ``on_stop``
    and ``post_stop`` ran.

    Catches: a service whose shutdown is held hostage by one badly written task.
    """
    release = asyncio.Event()

    async def swallower() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                pass

    handles = []

    async def on_start(ctx: StartContext) -> None:
        handles.append(ctx.tasks.spawn("swallower", BG, swallower()))

    node = ScriptedNode(on_start=on_start)
    service = Service(node, config=ServiceConfig(shutdown_deadline=0.2))
    runner = asyncio.ensure_future(service.start())
    try:
        await asyncio.wait_for(node.run_started.wait(), WAIT)
        service.request_shutdown(ShutdownReason.UserRequested())
        started = time.monotonic()
        with pytest.raises(ShutdownDeadlineExceeded) as info:
            await asyncio.wait_for(runner, WAIT)
        assert time.monotonic() - started < WAIT / 2
        assert info.value.pending_names == ["swallower"]
        assert node.calls[-2:] == ["on_stop", "post_stop"]
    finally:
        release.set()  # even after a failure: a swallowing task would hang the teardown
    await asyncio.wait_for(handles[0], WAIT)


@pytest.fixture(autouse=True)
def _no_thread_left_behind() -> Iterator[None]:
    """Every thread a test here starts must be gone when it ends (no hidden hang)."""
    before = set(threading.enumerate())
    yield
    left = [
        t
        for t in threading.enumerate()
        if t not in before and t.is_alive() and not t.name.startswith(("asyncio_", "Thread-"))
    ]
    assert not left, f"threads left running: {left}"
