"""The registry and the token at the edges (issue 12, items 7-10).

- A ``spawn`` that raises has run nothing: every argument is checked before the
  task is made; a refused coroutine is closed (``test_a_refused_spawn_*``).
- Bad input names the parameter: ``critical``, a deadline beyond float range,
  ``ShutdownReason.Fatal``'s ``message``, names with lone surrogates, a coroutine
  already awaited, running or suspended elsewhere (``test_*_names_*``).
- No Python code runs under a core lock: a loop whose futures have a Python
  ``done()`` that cancels the token (as a signal handler may) does not deadlock
  ``ShutdownToken.cancelled()`` (``test_a_python_done_that_cancels_*``).
- Stragglers on another thread's loop are cancelled in one loop callback, not one
  each (``test_stragglers_on_another_loop_are_cancelled_in_one_callback``).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from typing import Any

import pytest
import uvloop

from dig_service import (
    AlreadyStopped,
    ServiceConfig,
    ShutdownDeadlineExceeded,
    ShutdownReason,
    ShutdownToken,
    TaskKind,
    TaskRegistry,
)
from dig_service.testing import spawn_native_sleeper

BG = TaskKind.BackgroundLoop
WAIT = 10.0
"""Upper bound for one synchronisation wait; a healthy run needs a fraction of it."""


class Body:
    """A coroutine factory that records whether any coroutine it made ever ran."""

    def __init__(self) -> None:
        self.ran = False

    async def work(self) -> None:
        self.ran = True


# --------------------------------------------------------------------------- item 7


REFUSALS: list[Any] = [
    pytest.param({"name": "peer-\udcff"}, ValueError, "`name`", id="surrogate-name"),
    pytest.param({"name": 7}, TypeError, "`name`", id="int-name"),
    pytest.param({"kind": "BackgroundLoop"}, TypeError, "`kind`", id="str-kind"),
    pytest.param({"critical": "yes"}, TypeError, "`critical`", id="str-critical"),
    pytest.param({"critical": None}, TypeError, "`critical`", id="none-critical"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("bad", "error", "named"), REFUSALS)
async def test_a_refused_spawn_runs_nothing_and_closes_the_coroutine(
    bad: dict[str, Any], error: type[Exception], named: str
) -> None:
    """Proves: a ``spawn`` refused for any bad argument raises an error naming that
    parameter, has created no task (the coroutine's body never runs, not even after the
    registry is joined and the loop turns), counts nothing, and closes the coroutine
    (no "coroutine was never awaited" warning: the suite runs with ``-W error``).

    Catches: the asyncio task created before the last check (a surrogate name was only
    encoded afterwards): a bare ``UnicodeEncodeError``, ``stats().spawned == 0``, and the
    coroutine running on untracked after ``join_all`` returned; or a ``critical`` of the
    wrong type refused by PyO3 before the call, leaving the coroutine unclosed.
    """
    reg = TaskRegistry(ShutdownToken())
    body = Body()
    coro = body.work()
    args: dict[str, Any] = {"name": "peer", "kind": BG, "critical": False, **bad}
    tasks_before = len(asyncio.all_tasks())
    with pytest.raises(error, match=named):
        reg.spawn(args["name"], args["kind"], coro, critical=args["critical"])
    assert len(asyncio.all_tasks()) == tasks_before
    assert reg.stats().spawned == 0
    assert coro.cr_frame is None, "the refused coroutine was not closed"
    await reg.join_all(1)
    for _ in range(3):
        await asyncio.sleep(0)
    assert not body.ran


@pytest.mark.asyncio
async def test_a_refused_spawn_on_a_closed_registry_runs_nothing() -> None:
    """Proves: after ``join_all`` the registry refuses with ``AlreadyStopped`` before any
    task exists, and closes the coroutine.

    Catches: a refusal that leaves a task behind, or an unclosed coroutine.
    """
    reg = TaskRegistry(ShutdownToken())
    await reg.join_all(1)
    body = Body()
    coro = body.work()
    with pytest.raises(AlreadyStopped):
        reg.spawn("late", BG, coro)
    assert coro.cr_frame is None
    await asyncio.sleep(0)
    assert not body.ran


def test_a_refused_spawn_outside_a_loop_closes_the_coroutine() -> None:
    """Proves: ``spawn`` with no running loop is a ``RuntimeError`` saying so, and the
    coroutine is closed.

    Catches: the coroutine left unclosed ("never awaited" warning) on that refusal.
    """
    reg = TaskRegistry(ShutdownToken())
    coro = Body().work()
    with pytest.raises(RuntimeError, match="running asyncio event loop"):
        reg.spawn("nowhere", BG, coro)
    assert coro.cr_frame is None


# --------------------------------------------------------------------------- item 9


@pytest.mark.asyncio
async def test_spawn_refuses_a_coroutine_that_was_already_awaited() -> None:
    """Proves: a coroutine that has already run to completion is refused at once with a
    ``ValueError`` naming ``coro``, not accepted and failed later in its task.

    Catches: the task failing at its first step with asyncio's "cannot reuse already
    awaited coroutine", after ``spawn`` had counted it.
    """
    reg = TaskRegistry(ShutdownToken())
    coro = Body().work()
    await coro
    with pytest.raises(ValueError, match=r"`coro` has already finished"):
        reg.spawn("again", BG, coro)
    assert reg.stats().spawned == 0


@pytest.mark.asyncio
async def test_spawn_refuses_a_running_or_suspended_coroutine_and_leaves_it_alone() -> None:
    """Proves: a coroutine that is running (spawning itself) or suspended in another
    task's ``await`` is refused at once (``ValueError`` naming ``coro``) and left alone:
    the task that owns it still finishes it normally.

    Catches: a second task stepping a coroutine another task is awaiting, or the refusal
    closing a coroutine that is not the registry's to close.
    """
    reg = TaskRegistry(ShutdownToken())
    gate = asyncio.Event()
    refusals: list[str] = []

    async def owned() -> str:
        await gate.wait()
        return "finished by its owner"

    coro = owned()
    owner = asyncio.ensure_future(coro)
    await asyncio.sleep(0)  # `coro` is now suspended in `gate.wait()`
    with pytest.raises(ValueError, match=r"`coro` was already started"):
        reg.spawn("stolen", BG, coro)

    async def spawns_itself() -> None:
        try:
            reg.spawn("myself", BG, me)
        except ValueError as exc:
            refusals.append(str(exc))

    me = spawns_itself()
    await me
    assert refusals and "`coro` is running" in refusals[0]
    gate.set()
    assert await owner == "finished by its owner"
    assert reg.stats().spawned == 0


@pytest.mark.asyncio
async def test_huge_deadlines_are_errors_naming_the_parameter() -> None:
    """Proves: a deadline beyond float range (``10**400``) is refused like an infinite
    one, with a ``ValueError`` naming the parameter (``join_all``'s ``deadline``,
    ``ServiceConfig``'s ``shutdown_deadline`` and ``hook_timeout``,
    ``spawn_native_sleeper``'s ``seconds``); the registry stays usable.

    Catches: a bare ``OverflowError`` ("int too large to convert to float") that names
    nothing.
    """
    reg = TaskRegistry(ShutdownToken())
    with pytest.raises(ValueError, match=r"join_all\(\): `deadline` must be a finite"):
        await reg.join_all(10**400)
    with pytest.raises(ValueError, match=r"`seconds` must be a finite"):
        spawn_native_sleeper(reg, "nap", 10**400)
    with pytest.raises(ValueError, match=r"`shutdown_deadline` must be a finite"):
        ServiceConfig(shutdown_deadline=10**400)
    with pytest.raises(ValueError, match=r"`hook_timeout` must be a finite"):
        ServiceConfig(hook_timeout=10**400)
    assert not reg.is_closed()
    await reg.join_all(1)


def test_fatal_message_and_native_names_are_checked_naming_the_parameter() -> None:
    """Proves: ``ShutdownReason.Fatal`` refuses a non-``str`` message (``TypeError``) and
    one with a lone surrogate (``ValueError``), both naming ``message``;
    ``spawn_native_sleeper`` refuses a name with a lone surrogate naming ``name``.

    Catches: PyO3's own extraction errors ("'None' is not an instance of 'str'", a bare
    ``UnicodeEncodeError``), which name neither the class nor the parameter.
    """
    with pytest.raises(TypeError, match=r"Fatal\(\): `message` must be str"):
        ShutdownReason.Fatal(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Fatal\(\): `message` must be valid Unicode"):
        ShutdownReason.Fatal("\udcff")
    assert ShutdownReason.Fatal("ok").message == "ok"

    async def main() -> None:
        reg = TaskRegistry(ShutdownToken())
        with pytest.raises(ValueError, match=r"spawn_native_sleeper\(\): `name` must be valid"):
            spawn_native_sleeper(reg, "nap-\udcff", 0)
        assert reg.stats().spawned == 0

    asyncio.run(main())


# --------------------------------------------------------------------------- item 8

PY_FUTURE_SCRIPT = """
    import asyncio, sys
    import uvloop
    from dig_service import ShutdownReason, ShutdownToken

    token = ShutdownToken()
    armed = []

    class SignalLikeFuture(asyncio.futures._PyFuture):
        # done() runs Python code; once armed, done() of a future parked before
        # (what the prune asks) cancels the token, as a signal handler (run
        # between two bytecodes of whatever is running) may.
        def __init__(self, *, loop):
            super().__init__(loop=loop)
            self.parked_before = not armed

        def done(self):
            if armed and self.parked_before and not token.is_cancelled():
                token.cancel(ShutdownReason.UserRequested())
            return super().done()

    def create_future(self):
        return SignalLikeFuture(loop=self)

    base = uvloop.Loop if sys.argv[1] == "uvloop" else asyncio.SelectorEventLoop
    Loop = type("Loop", (base,), {"create_future": create_future})

    async def main():
        # 64 parked waiters (the first prune mark), most of them abandoned: parking
        # one more prunes the list, calling done() on each parked future.
        waiters = [asyncio.ensure_future(token.cancelled()) for _ in range(64)]
        await asyncio.sleep(0)
        for w in waiters[:60]:
            w.cancel()
        await asyncio.sleep(0)
        armed.append(True)
        last = asyncio.ensure_future(token.cancelled())
        await asyncio.wait_for(asyncio.gather(last, *waiters[60:]), 10)
        print("woken", token.reason())

    loop = Loop()
    loop.run_until_complete(main())
    loop.close()
"""


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_a_python_done_that_cancels_the_token_does_not_deadlock(kind: str) -> None:
    """Proves: parking a ``cancelled()`` waiter, whose prune asks every parked future
    ``done()``, does not deadlock when ``done()`` is Python code that cancels the token
    (as a signal handler, or another thread holding the GIL, may): every live waiter is
    woken. Runs in a child process: a deadlock there holds the GIL (a hang, turned into
    a failure by the timeout).

    Catches: the waiter-list lock held while the prune called ``done()``: the token's
    wake-up then waits for that lock, on the thread that holds it.
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PY_FUTURE_SCRIPT), kind],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "woken user requested", proc.stdout + proc.stderr


# --------------------------------------------------------------------------- item 10


class _CountsThreadsafeCalls:
    """Mixin for an event loop class: counts its ``call_soon_threadsafe`` calls."""

    threadsafe_calls = 0

    def call_soon_threadsafe(self, callback: Any, *args: Any, context: Any = None) -> Any:
        self.threadsafe_calls += 1  # only the joining thread calls it here
        return super().call_soon_threadsafe(  # type: ignore[misc]
            callback, *args, context=context
        )


class CountingAsyncioLoop(_CountsThreadsafeCalls, asyncio.SelectorEventLoop):
    pass


class CountingUvloop(_CountsThreadsafeCalls, uvloop.Loop):
    pass


@pytest.mark.parametrize(
    "loop_class", [CountingAsyncioLoop, CountingUvloop], ids=["asyncio", "uvloop"]
)
def test_stragglers_on_another_loop_are_cancelled_in_one_callback(
    loop_class: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Proves: ``join_all``'s deadline cancels 2,000 stragglers running on another
    thread's loop with one ``call_soon_threadsafe`` to that loop (not one each), and
    every one of them is cancelled there (they all end, none left live).

    Catches: a ``call_soon_threadsafe`` per straggler: a wake-up of the other loop (and a
    system call on the joining thread) each, which overshot a 0.2 s deadline by most of
    a second at 40k stragglers.
    """
    n = 2000
    reg = TaskRegistry(ShutdownToken())
    ready = threading.Event()
    other: dict[str, Any] = {}

    async def straggler() -> None:
        await asyncio.Event().wait()  # ignores the token; ends when cancelled

    async def host() -> None:
        joined = asyncio.Event()
        other["loop"], other["joined"] = asyncio.get_running_loop(), joined
        for i in range(n):
            reg.spawn(f"s-{i}", BG, straggler())
        ready.set()
        await joined.wait()
        await reg.join_all(WAIT)  # until the cancelled stragglers have all ended

    def thread_main() -> None:
        loop = loop_class()
        try:
            loop.run_until_complete(host())
        finally:
            loop.close()

    thread = threading.Thread(target=thread_main)
    thread.start()
    try:
        assert ready.wait(WAIT)
        loop = other["loop"]
        posted_before = loop.threadsafe_calls

        async def join() -> ShutdownDeadlineExceeded:
            with pytest.raises(ShutdownDeadlineExceeded) as info:
                await reg.join_all(0.05)
            return info.value

        err = asyncio.run(join())
        assert err.pending == n
        posted = loop.threadsafe_calls - posted_before
        assert posted == 1, f"{posted} call_soon_threadsafe calls for {n} stragglers"
    finally:
        loop.call_soon_threadsafe(other["joined"].set)
        thread.join(WAIT * 3)
    assert not thread.is_alive()
    assert len(reg) == 0
    assert reg.stats().cancelled == n
