"""Supervised Python tasks (SPEC 8): ``TaskRegistry.supervise``, ``RestartPolicy``,
``SupervisedHandle``.

Every test runs on asyncio and uvloop (and under task factories, see conftest). Nothing
here waits on the wall clock for synchronisation: backoffs are zero or tiny, and a test
that must catch the task in its backoff wait uses a backoff of an hour and events.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dig_service import (
    AlreadyStopped,
    Restart,
    RestartPolicy,
    ShutdownDeadlineExceeded,
    ShutdownReason,
    ShutdownToken,
    SupervisedHandle,
    TaskKind,
    TaskRegistry,
)

BG = TaskKind.BackgroundLoop
QUICK = {"backoff": 0.0, "max_backoff": 0.0}
HOUR = {"backoff": 3600.0, "max_backoff": 3600.0}


def fresh() -> tuple[ShutdownToken, TaskRegistry]:
    token = ShutdownToken()
    return token, TaskRegistry(token)


class Script:
    """A factory whose n-th incarnation (from 0) runs ``body(n)``; counts its calls."""

    def __init__(self, body: Callable[[int], Coroutine[Any, Any, None]]) -> None:
        self.body = body
        self.calls = 0

    def __call__(self) -> Coroutine[Any, Any, None]:
        n = self.calls
        self.calls += 1
        return self.body(n)


async def test_permanent_restarts_returns_and_failures_until_it_gives_up() -> None:
    """Proves a permanent task restarts after returning and after raising, and gives up on
    the (max+1)-th restart within the window: awaiting it raises the last error, and a
    non-critical task leaves the token alone.

    Catches: a permanent task that stops when it returns; an off-by-one in the intensity.
    """
    token, reg = fresh()

    async def body(n: int) -> None:
        await asyncio.sleep(0)
        if n % 2:
            raise ValueError(f"odd {n}")

    script = Script(body)
    policy = RestartPolicy(max_restarts=3, critical=False, **QUICK)
    h = reg.supervise("perm", BG, script, policy=policy)
    assert isinstance(h, SupervisedHandle)
    assert (h.name, h.kind) == ("perm", BG)
    with pytest.raises(ValueError, match="odd 3"):
        await h
    assert script.calls == 4 and h.restarts == 3 and h.is_finished()
    assert not token.is_cancelled()
    stats = reg.stats()
    assert (stats.spawned, stats.failed, stats.restarted, stats.live) == (1, 1, 3, 0)


async def test_transient_restarts_failures_only() -> None:
    """Proves a transient task is restarted after raising and ends cleanly when it returns.

    Catches: a transient task restarted after a clean return, or not after a failure.
    """
    _, reg = fresh()

    async def body(n: int) -> None:
        if n < 2:
            raise OSError(f"reset {n}")

    script = Script(body)
    h = reg.supervise("trans", BG, script, policy=RestartPolicy(Restart.Transient, **QUICK))
    assert await h is None
    assert script.calls == 3 and h.restarts == 2
    stats = reg.stats()
    assert (stats.completed, stats.failed, stats.restarted) == (1, 0, 2)


@pytest.mark.parametrize("critical", [True, False])
async def test_temporary_is_never_restarted(critical: bool) -> None:
    """Proves a temporary task's failure is not restarted; a critical one fires Fatal.

    Catches: a temporary task restarted, or a critical failure that does not stop the
    service.
    """
    token, reg = fresh()

    async def body(n: int) -> None:
        raise KeyError("gone")

    script = Script(body)
    policy = RestartPolicy(restart=Restart.Temporary, critical=critical)
    h = reg.supervise("temp", TaskKind.PeerConnection, script, policy=policy)
    with pytest.raises(KeyError):
        await h
    assert script.calls == 1 and h.restarts == 0
    if critical:
        assert token.reason() == ShutdownReason.Fatal(
            "critical task 'temp' failed: KeyError: 'gone'"
        )
    else:
        assert not token.is_cancelled()


async def test_giving_up_is_fatal_and_logged_without_flooding(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proves a critical task that exceeds its intensity cancels the token with exactly
    ``Fatal("task 'NAME' gave up after N restarts in W s: LAST ERROR")``; each restart is
    logged with its cause, the first with a traceback and the next on one line; giving up
    is logged with the last traceback.

    Catches: a wrong Fatal text, a crash loop that logs a traceback per restart, a give-up
    that is not logged.
    """
    token, reg = fresh()

    async def body(n: int) -> None:
        raise ConnectionResetError(f"peer hung up #{n}")

    caplog.set_level(logging.INFO, logger="dig_service.tasks")
    h = reg.supervise("peer-sync", BG, Script(body), policy=RestartPolicy(max_restarts=4, **QUICK))
    with pytest.raises(ConnectionResetError, match="#4"):
        await h
    reason = token.reason()
    assert isinstance(reason, ShutdownReason.Fatal)
    assert reason.message.startswith("task 'peer-sync' gave up after 4 restarts in ")
    assert reason.message.endswith(" s: ConnectionResetError: peer hung up #4")
    records = [r for r in caplog.records if r.name == "dig_service.tasks"]
    assert len(records) == 5, [r.getMessage() for r in records]
    restarts, gave_up = records[:4], records[4]
    assert all(r.levelno == logging.WARNING for r in restarts)
    assert restarts[0].exc_info is not None and "#0" in str(restarts[0].exc_info[1])
    assert all(r.exc_info is None for r in restarts[1:])
    assert "peer hung up #1" in restarts[1].getMessage()
    assert "restart 2" in restarts[1].getMessage()
    assert gave_up.levelno == logging.ERROR and "gave up after 4 restarts" in gave_up.getMessage()
    assert gave_up.exc_info is not None and "#4" in str(gave_up.exc_info[1])


async def test_a_restart_storm_with_zero_backoff_never_holds_the_loop() -> None:
    """Proves a task that fails at once, restarted with zero backoff 2000 times, stays one
    live task throughout and lets other tasks run between its incarnations.

    Catches: a busy restart loop that starves the event loop, an entry per incarnation.
    """
    _, reg = fresh()
    seen_len: set[int] = set()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async def body(n: int) -> None:
        seen_len.add(len(reg))
        raise RuntimeError("storm")

    other = asyncio.create_task(ticker())
    policy = RestartPolicy(max_restarts=2000, critical=False, **QUICK)
    h = reg.supervise("storm", BG, Script(body), policy=policy)
    with pytest.raises(RuntimeError):
        await h
    other.cancel()
    with pytest.raises(asyncio.CancelledError):
        await other
    assert h.restarts == 2000 and seen_len == {1}
    assert ticks >= 2000, "the ticker ran between the restarts"
    stats = reg.stats()
    assert (stats.spawned, stats.restarted, stats.failed, stats.live) == (1, 2000, 1, 0)
    by_kind = {(s.kind, s.origin): s for s in reg.stats_by_kind()}
    assert by_kind[(BG, "python")].restarted == 2000


async def test_shutdown_during_a_backoff_wait_ends_it_at_once() -> None:
    """Proves a token fired during a backoff wait (of an hour) ends the wait at once: the task
    ends cleanly, nothing restarts, and the join does not wait for the backoff. While it
    waits it is one live task, in ``len`` and ``snapshot`` with its restarts.

    Catches: a wait that sleeps through a shutdown, a restart after the token fired.
    """
    token, reg = fresh()
    failed = asyncio.Event()

    async def body(n: int) -> None:
        failed.set()
        raise ValueError("down")

    script = Script(body)
    h = reg.supervise("waits", BG, script, policy=RestartPolicy(**HOUR))
    await failed.wait()
    # The task raised and went straight into its wait (no await in between).
    assert h.restarts == 1 and not h.is_finished()
    assert len(reg) == 1
    (summary,) = reg.snapshot()
    assert (summary.name, summary.restarts, summary.origin) == ("waits", 1, "python")
    token.cancel(ShutdownReason.UserRequested())
    await asyncio.wait_for(reg.join_all(60), 30)
    assert await h is None
    assert script.calls == 1
    stats = reg.stats()
    assert (stats.completed, stats.restarted, stats.live) == (1, 1, 0)


async def test_shutdown_during_an_incarnation() -> None:
    """Proves an incarnation that ends because the token fired is not restarted, and one
    that ignores the token is cancelled at the join's deadline and named there once, after
    any number of incarnations.

    Catches: a restart during shutdown, a supervised straggler named per incarnation.
    """
    token, reg = fresh()
    polite = reg.supervise(
        "polite", BG, Script(lambda n: token.cancelled()), policy=RestartPolicy(**QUICK)
    )
    started = asyncio.Event()

    async def stubborn_body(n: int) -> None:
        if n < 3:
            raise ValueError("warming up")
        started.set()
        await asyncio.sleep(3600)

    stubborn = reg.supervise("stubborn", BG, Script(stubborn_body), policy=RestartPolicy(**QUICK))
    await started.wait()
    assert len(reg) == 2
    token.cancel(ShutdownReason.UserRequested())
    with pytest.raises(ShutdownDeadlineExceeded) as info:
        await reg.join_all(0.05)
    assert info.value.pending_names == ["stubborn"]
    assert await polite is None
    with pytest.raises(asyncio.CancelledError):
        await stubborn
    assert stubborn.restarts == 3
    stats = reg.stats()
    assert (stats.completed, stats.cancelled, stats.restarted, stats.live) == (1, 1, 3, 0)


async def test_abort_stops_it_for_good() -> None:
    """Proves ``abort()`` stops the task for good: during an incarnation (even one that
    swallows the cancellation and returns) and during a backoff wait.

    Catches: an abort that ends only the current incarnation, after which it restarts.
    """
    _, reg = fresh()
    running = asyncio.Event()

    async def swallow(n: int) -> None:
        running.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return  # swallowed: a permanent task would restart after a return

    script = Script(swallow)
    h = reg.supervise("swallow", BG, script, policy=RestartPolicy(**QUICK))
    await running.wait()
    h.abort()
    assert await h is None
    assert script.calls == 1 and h.restarts == 0

    failed = asyncio.Event()

    async def fail(n: int) -> None:
        failed.set()
        raise ValueError("x")

    script = Script(fail)
    waiting = reg.supervise("waiting", BG, script, policy=RestartPolicy(**HOUR))
    await failed.wait()
    waiting.abort()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert script.calls == 1 and waiting.restarts == 1
    assert len(reg) == 0 and reg.stats().cancelled == 1
    assert "restarts=1" in repr(waiting)


async def test_a_bad_factory_result_is_a_failed_incarnation() -> None:
    """Proves a factory that raises, or returns something that is not a new coroutine, is a
    failed incarnation: restarted by the policy, and the last such error is what awaiting
    the handle raises.

    Catches: a factory error that escapes the supervisor, or a non-coroutine awaited.
    """
    _, reg = fresh()
    calls = 0
    spent = asyncio.sleep(0)
    await spent

    def factory() -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise LookupError("factory broke")
        if calls == 2:
            return 42
        if calls == 3:
            return spent
        return asyncio.sleep(0)

    h = reg.supervise(
        "factory", BG, factory, policy=RestartPolicy(Restart.Transient, critical=False, **QUICK)
    )
    assert await h is None
    assert calls == 4 and h.restarts == 3

    h = reg.supervise(
        "not-a-coro", BG, lambda: 42, policy=RestartPolicy(max_restarts=1, critical=False, **QUICK)
    )
    with pytest.raises(TypeError, match="`factory` must return a new coroutine"):
        await h


async def test_bad_arguments_are_refused_before_any_side_effect() -> None:
    """Proves ``supervise`` checks every argument, naming it, before tracking anything or
    calling the factory; after the join it raises AlreadyStopped.

    Catches: a half-registered task, a factory called by a refused supervise.
    """
    token, reg = fresh()
    called = 0

    def factory() -> Coroutine[Any, Any, None]:
        nonlocal called
        called += 1
        return asyncio.sleep(0)

    async def work() -> None:
        pass

    with pytest.raises(TypeError, match="`factory` must be a callable"):
        reg.supervise("x", BG, 42)  # type: ignore[arg-type]
    coro = work()
    with pytest.raises(TypeError, match="pass the async function itself"):
        reg.supervise("x", BG, coro)  # type: ignore[arg-type]
    coro.close()
    with pytest.raises(TypeError, match="`name`"):
        reg.supervise(1, BG, factory)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`kind`"):
        reg.supervise("x", "loop", factory)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`policy` must be a dig_service\.RestartPolicy"):
        reg.supervise("x", BG, factory, policy={"max_restarts": 1})  # type: ignore[arg-type]
    assert called == 0 and reg.stats().spawned == 0 and len(reg) == 0
    token.cancel(ShutdownReason.UserRequested())
    await reg.join_all(1)
    with pytest.raises(AlreadyStopped):
        reg.supervise("x", BG, factory)
    assert called == 0 and reg.stats().spawned == 0


def test_supervise_outside_a_running_loop_is_refused() -> None:
    """Proves ``supervise`` outside a running loop is a clear RuntimeError, with nothing
    tracked.

    Catches: an entry tracked for a task that could never be made.
    """
    _, reg = fresh()
    with pytest.raises(RuntimeError, match="supervise"):
        reg.supervise("x", BG, lambda: asyncio.sleep(0))
    assert reg.stats().spawned == 0 and len(reg) == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"restart": "permanent"}, TypeError, "`restart` must be a dig_service.Restart"),
        ({"max_restarts": -1}, ValueError, "`max_restarts` must be an int from 0"),
        ({"max_restarts": 2**32}, ValueError, "`max_restarts`"),
        ({"max_restarts": 1.5}, TypeError, "`max_restarts` must be an int"),
        ({"max_restarts": True}, TypeError, "`max_restarts` must be an int"),
        ({"within": 0}, ValueError, "`within`"),
        ({"within": -1.0}, ValueError, "`within`"),
        ({"within": math.nan}, ValueError, "`within`"),
        ({"backoff": math.inf}, ValueError, "`backoff`"),
        ({"backoff": -0.1}, ValueError, "`backoff`"),
        ({"max_backoff": math.nan}, ValueError, "`max_backoff`"),
        ({"backoff": 2.0, "max_backoff": 1.0}, ValueError, "`backoff` .* `max_backoff`"),
        ({"backoff": "1"}, TypeError, "`backoff`"),
        ({"critical": 1}, TypeError, "`critical` must be bool"),
    ],
)
def test_restart_policy_refuses_bad_fields_by_name(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Proves each bad RestartPolicy field is refused at construction, naming the field.

    Catches: a NaN, negative or inverted duration accepted (a busy loop or an endless
    wait later), an error that does not say which field is wrong.
    """
    with pytest.raises(error, match=match):
        RestartPolicy(**kwargs)


def test_restart_policy_defaults_and_values() -> None:
    """Proves RestartPolicy's defaults are SPEC 8's, it reads back what it was given
    (timedelta too), and compares by value.

    Catches: a default that drifted from the contract, a field dropped on the way in.
    """
    p = RestartPolicy()
    assert (p.restart, p.max_restarts, p.within, p.backoff, p.max_backoff, p.critical) == (
        Restart.Permanent,
        5,
        60.0,
        0.1,
        30.0,
        True,
    )
    q = RestartPolicy(Restart.Transient, 2, timedelta(seconds=5), 0, 1, critical=False)
    assert (q.restart, q.max_restarts, q.within, q.backoff, q.max_backoff, q.critical) == (
        Restart.Transient,
        2,
        5.0,
        0.0,
        1.0,
        False,
    )
    assert p == RestartPolicy() and p != q
    assert repr(q).startswith("RestartPolicy(restart=Restart.Transient, max_restarts=2")
    assert Restart.Temporary != Restart.Permanent and repr(Restart.Temporary) == (
        "Restart.Temporary"
    )


# ---------------------------------------------------------------------------
# Property: random failure sequences against a model of the policy.


def model(
    restart: Restart, max_restarts: int, fails: list[bool]
) -> tuple[int, int, int | None, bool]:
    """SPEC 8 for incarnations that end at once, one after the other, with no backoff and a
    window longer than the run: (incarnations, restarts, index of the failure it stopped
    on or None if it stopped after a return, gave up)."""
    restarts = 0
    for i, failed in enumerate(fails):
        restarts_it = restart == Restart.Permanent or (restart == Restart.Transient and failed)
        last = i if failed else None
        if not restarts_it:
            return i + 1, restarts, last, False
        if restarts == max_restarts:
            return i + 1, restarts, last, True
        restarts += 1
    raise AssertionError("the script is longer than any run")


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    restart=st.sampled_from([Restart.Permanent, Restart.Transient, Restart.Temporary]),
    max_restarts=st.integers(0, 5),
    fails=st.lists(st.booleans(), min_size=8, max_size=8),
    critical=st.booleans(),
)
def test_random_failure_sequences_follow_the_model(
    restart: Restart, max_restarts: int, fails: list[bool], critical: bool
) -> None:
    """Proves that for any restart type, intensity and sequence of returns and failures,
    the supervised task runs exactly the incarnations the model says, counts its restarts,
    ends as it says, and fires the token (critical) exactly when it gives up or stops
    after a failure.

    Catches: any divergence between the core's restart logic, as Python drives it, and
    SPEC 8's wording.
    """
    script = fails + [False] * 8
    want_calls, want_restarts, want_failed_at, gave_up = model(restart, max_restarts, script)

    async def body(n: int) -> None:
        if script[n]:
            raise ValueError(f"incarnation {n}")

    async def run() -> tuple[int, BaseException | None, TaskRegistry, ShutdownToken]:
        token, reg = fresh()
        s = Script(body)
        policy = RestartPolicy(restart, max_restarts, 3600.0, critical=critical, **QUICK)
        h = reg.supervise("model", TaskKind.Maintenance, s, policy=policy)
        try:
            await h
        except ValueError as exc:
            return s.calls, exc, reg, token
        return s.calls, None, reg, token

    logging.getLogger("dig_service.tasks").disabled = True
    try:
        calls, exc, reg, token = asyncio.run(run())
    finally:
        logging.getLogger("dig_service.tasks").disabled = False
    assert calls == want_calls
    stats = reg.stats()
    assert stats.restarted == want_restarts and (stats.spawned, stats.live) == (1, 0)
    if want_failed_at is None:
        assert exc is None and stats.completed == 1
    else:
        assert str(exc) == f"incarnation {want_failed_at}" and stats.failed == 1
    reason = token.reason()
    fatal = isinstance(reason, ShutdownReason.Fatal)
    assert fatal == (critical and (gave_up or want_failed_at is not None)), reason
    if gave_up and isinstance(reason, ShutdownReason.Fatal):
        assert reason.message.startswith(f"task 'model' gave up after {max_restarts} restarts")


async def test_a_stopped_supervised_task_is_collected() -> None:
    """Proves a supervised task that stopped after a failure, whose factory is a bound
    method of an object that keeps the handle, is freed once nothing else refers to it.

    Catches: a reference cycle through the handle that the collector cannot see (the
    error's traceback holds the driving coroutine's frame, which holds the handle), so
    every failed supervised task would leak its object, handle and task.
    """
    import gc
    import weakref

    _, reg = fresh()

    class Owner:
        handle: SupervisedHandle

        async def work(self) -> None:
            raise ValueError("x")

    # No log records: a capturing handler (pytest's) would keep the error alive.
    logger = logging.getLogger("dig_service.tasks")
    logger.disabled = True
    try:
        owner = Owner()
        owner.handle = reg.supervise(
            "owned", BG, owner.work, policy=RestartPolicy(max_restarts=1, critical=False, **QUICK)
        )
        with pytest.raises(ValueError):
            await owner.handle
    finally:
        logger.disabled = False
    gone = weakref.ref(owner)
    del owner
    for _ in range(3):  # the loop lets go of the task's last callbacks
        await asyncio.sleep(0)
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_is_not_restarted(loop_name: str, interrupt: type[BaseException]) -> None:
    """Proves a ``KeyboardInterrupt`` or ``SystemExit`` from an incarnation is not restarted
    (even under a permanent policy): it leaves the loop as asyncio makes it, the token
    fires (``UserRequested`` for Ctrl-C, ``Fatal`` for ``SystemExit``), and the task leaves
    the registry during the loop's teardown.

    Catches: a supervisor that swallows Ctrl-C and restarts the task, so the process
    cannot be interrupted.
    """
    import uvloop

    token, reg = fresh()
    calls = 0

    async def body() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("first")
        raise interrupt()

    async def main() -> None:
        reg.supervise("interrupted", BG, body, policy=RestartPolicy(**QUICK))
        await asyncio.sleep(3600)

    factory = uvloop.new_event_loop if loop_name == "uvloop" else asyncio.new_event_loop
    logging.getLogger("dig_service.tasks").disabled = True
    try:
        with pytest.raises(interrupt), asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main())
    finally:
        logging.getLogger("dig_service.tasks").disabled = False
    assert calls == 2
    stats = reg.stats()
    assert (stats.restarted, stats.live, stats.failed) == (1, 0, 1)
    reason = token.reason()
    if interrupt is KeyboardInterrupt:
        assert reason == ShutdownReason.UserRequested()
    else:
        assert isinstance(reason, ShutdownReason.Fatal) and "SystemExit" in reason.message
