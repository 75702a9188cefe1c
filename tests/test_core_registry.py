"""The native TaskRegistry as Python sees it: tracking, reaping, joining, refusing."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import warnings
from datetime import timedelta

import pytest

from dig_service import (
    AlreadyStopped,
    ShutdownDeadlineExceeded,
    ShutdownReason,
    ShutdownToken,
    TaskKind,
    TaskRegistry,
    _core,
)
from dig_service.testing import spawn_native_sleeper

BG = TaskKind.BackgroundLoop


def fresh() -> tuple[ShutdownToken, TaskRegistry]:
    token = ShutdownToken()
    return token, TaskRegistry(token)


async def test_finished_tasks_leave_at_once() -> None:
    """Proves a finished task leaves the registry immediately, with exact counters.

    Catches: the 0.1 behaviour of keeping every task ever spawned until
    join_all (unbounded memory for per-request tasks).
    """
    _, reg = fresh()

    async def work(i: int) -> int:
        await asyncio.sleep(0)
        if i % 10 == 0:
            raise ValueError(f"bad {i}")
        return i

    handles = [reg.spawn(f"w{i}", TaskKind.RpcHandler, work(i)) for i in range(1000)]
    assert len(reg) == 1000 and not reg.is_empty()
    results = await asyncio.gather(*handles, return_exceptions=True)
    assert sum(isinstance(r, ValueError) for r in results) == 100
    assert len(reg) == 0 and reg.is_empty() and reg.snapshot() == []
    stats = reg.stats()
    assert (stats.spawned, stats.completed, stats.failed, stats.cancelled, stats.live) == (
        1000,
        900,
        100,
        0,
        0,
    )


async def test_snapshot_describes_live_tasks() -> None:
    """Proves snapshot() reports name, kind, a monotonic spawn instant and the origin.

    Catches: summaries with wrong kinds, wall-clock instants or a missing origin.
    """
    token, reg = fresh()
    before = time.monotonic()
    reg.spawn("peer-1", TaskKind.PeerConnection, token.cancelled())
    spawn_native_sleeper(reg, "native-1", 30, kind=TaskKind.Maintenance)
    after = time.monotonic()
    by_name = {s.name: s for s in reg.snapshot()}
    assert set(by_name) == {"peer-1", "native-1"}
    assert by_name["peer-1"].kind == TaskKind.PeerConnection
    assert by_name["peer-1"].origin == "python"
    assert by_name["native-1"].kind == TaskKind.Maintenance
    assert by_name["native-1"].origin == "native"
    for s in by_name.values():
        assert before - 0.01 <= s.spawned_at <= after + 0.01
    token.cancel(ShutdownReason.UserRequested())
    await reg.join_all(5)


@pytest.mark.parametrize("collector_on", [True, False], ids=["gc-on", "gc-off"])
async def test_snapshot_leaves_the_collector_as_it_found_it(collector_on: bool) -> None:
    """Proves snapshot() (which pauses the cyclic collector while it builds the
    summaries) leaves it enabled if it was and disabled if the user had disabled
    it, and still returns every summary.

    Catches: a snapshot that turns the collector off for good, or on behind the
    back of a program that runs with it off.
    """
    token, reg = fresh()
    for i in range(2000):
        reg.spawn(f"peer-{i}", TaskKind.PeerConnection, token.cancelled())

    was = gc.isenabled()
    (gc.enable if collector_on else gc.disable)()
    try:
        summaries = reg.snapshot()
        assert gc.isenabled() is collector_on
        assert len(summaries) == 2000
        assert {s.name for s in summaries} == {f"peer-{i}" for i in range(2000)}
    finally:
        (gc.enable if was else gc.disable)()
        token.cancel(ShutdownReason.UserRequested())
        await reg.join_all(5)


async def test_join_all_waits_for_python_and_native_tasks() -> None:
    """Proves join_all returns once every task, Python and native, has finished.

    Catches: join_all returning early while native tasks are still running.
    """
    token, reg = fresh()
    finished: list[str] = []

    async def py_task() -> None:
        await token.cancelled()
        await asyncio.sleep(0.01)
        finished.append("py")

    reg.spawn("py", BG, py_task())
    native = spawn_native_sleeper(reg, "native", 30)
    token.cancel(ShutdownReason.UserRequested())
    await reg.join_all(5)
    assert finished == ["py"]
    assert native.is_finished()
    assert len(reg) == 0 and reg.is_closed()


async def test_deadline_exceeded_names_every_straggler() -> None:
    """Proves the deadline error counts and names exactly the tasks still running.

    Catches: a wrong `pending` count, names missing for native tasks, or
    stragglers left running after join_all gave up.
    """
    token, reg = fresh()

    async def obedient() -> None:
        await token.cancelled()

    async def stubborn() -> None:
        await asyncio.sleep(3600)

    for i in range(3):
        reg.spawn(f"ok-{i}", BG, obedient())
    stuck = [reg.spawn(f"stuck-{i}", BG, stubborn()) for i in range(2)]
    native = spawn_native_sleeper(reg, "native-stuck", 3600, honor_shutdown=False)
    token.cancel(ShutdownReason.UserRequested())
    started = time.monotonic()
    with pytest.raises(ShutdownDeadlineExceeded) as info:
        await reg.join_all(0.2)
    elapsed = time.monotonic() - started
    assert 0.19 <= elapsed < 2.0
    assert info.value.deadline == pytest.approx(0.2)
    assert info.value.pending == 3
    assert sorted(info.value.pending_names) == ["native-stuck", "stuck-0", "stuck-1"]
    for h in stuck:
        # Cancelled at the deadline; they unwind on the loop's next turn.
        with pytest.raises(asyncio.CancelledError):
            await h
        assert h.is_finished()
    with pytest.raises(asyncio.CancelledError):
        await native
    assert reg.stats().cancelled == 2 and reg.stats().aborted == 1


async def test_tasks_spawned_during_join_are_joined() -> None:
    """Proves a task spawned while join_all waits is waited for under the same deadline.

    Catches: join_all draining a snapshot of the tasks it saw at the start.
    """
    token, reg = fresh()
    late_done = asyncio.Event()

    async def late() -> None:
        await asyncio.sleep(0.05)
        late_done.set()

    async def spawner() -> None:
        await token.cancelled()
        reg.spawn("late", BG, late())

    reg.spawn("spawner", BG, spawner())
    token.cancel(ShutdownReason.UserRequested())
    await reg.join_all(5)
    assert late_done.is_set()


async def test_closed_registry_refuses_and_closes_the_coroutine() -> None:
    """Proves spawn after join_all raises AlreadyStopped and closes the coroutine it got.

    Catches: a coroutine silently dropped with a "never awaited" warning, or
    tasks accepted into a registry that nobody will join.
    """
    _, reg = fresh()
    await reg.join_all(1)
    assert reg.is_closed()
    ran = False

    async def work() -> None:
        nonlocal ran
        ran = True

    coro = work()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AlreadyStopped):
            reg.spawn("late", BG, coro)
        assert coro.cr_frame is None  # closed
    with pytest.raises(AlreadyStopped):
        spawn_native_sleeper(reg, "late-native", 1)
    assert not ran and reg.stats().spawned == 0


async def test_bad_spawn_arguments_name_the_parameter() -> None:
    """Proves each bad spawn argument is a TypeError naming it, and the coroutine is closed.

    Catches: panics, misleading messages, or "never awaited" warnings on refusal.
    """
    _, reg = fresh()

    async def work() -> None:
        pass

    with pytest.raises(TypeError, match=r"`coro` must be a coroutine.*not spawn"):
        reg.spawn("x", BG, work)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`coro`"):
        reg.spawn("x", BG, 42)  # type: ignore[arg-type]
    for args, param in [((1, BG), "name"), (("x", "BackgroundLoop"), "kind")]:
        coro = work()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(TypeError, match=f"`{param}`"):
                reg.spawn(*args, coro)  # type: ignore[arg-type]
        assert coro.cr_frame is None
    with pytest.raises(TypeError, match="`shutdown`"):
        TaskRegistry("token")  # type: ignore[arg-type]
    assert len(reg) == 0


@pytest.mark.parametrize("deadline", [-1, -0.5, float("nan"), float("inf"), timedelta(seconds=-1)])
async def test_bad_deadline_is_a_value_error(deadline: float) -> None:
    """Proves a negative, NaN or infinite deadline is a ValueError naming `deadline`.

    Catches: NaN comparisons that make join_all wait forever or return at once.
    """
    _, reg = fresh()
    with pytest.raises(ValueError, match="`deadline`"):
        await reg.join_all(deadline)
    assert not reg.is_closed()


async def test_deadline_accepts_timedelta_and_rejects_strings() -> None:
    """Proves durations may be a timedelta, and a string is a TypeError naming the parameter.

    Catches: timedelta rejected (SPEC allows it) or "0.5" silently parsed.
    """
    _, reg = fresh()
    await reg.join_all(timedelta(milliseconds=10))
    with pytest.raises(TypeError, match="`deadline`"):
        await reg.join_all("0.5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`seconds`"):
        spawn_native_sleeper(reg, "x", "1")  # type: ignore[arg-type]


async def test_task_exception_is_logged_with_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """Proves a failing task is logged on `dig_service.tasks` with its traceback, and counted.

    Catches: exceptions lost silently (asyncio's "never retrieved" at GC time, or nothing).
    """
    _, reg = fresh()

    async def explode() -> None:
        raise KeyError("missing-thing")

    caplog.set_level(logging.ERROR, logger="dig_service")
    h = reg.spawn("exploder", TaskKind.Maintenance, explode())
    with pytest.raises(KeyError):
        await h
    records = [r for r in caplog.records if r.name == "dig_service.tasks"]
    assert len(records) == 1
    assert "exploder" in records[0].getMessage()
    assert records[0].exc_info is not None and records[0].exc_info[0] is KeyError
    assert reg.stats().failed == 1


async def test_critical_task_failure_fires_fatal() -> None:
    """Proves a critical task's exception cancels the token with Fatal naming the task.

    Catches: a dead critical loop leaving the service running without it.
    """
    token, reg = fresh()

    async def boom() -> None:
        raise RuntimeError("db gone")

    h = reg.spawn("db-writer", BG, boom(), critical=True)
    with pytest.raises(RuntimeError):
        await h
    reason = token.reason()
    assert isinstance(reason, ShutdownReason.Fatal)
    assert "db-writer" in reason.message and "db gone" in reason.message


async def test_critical_task_returning_early_fires_fatal() -> None:
    """Proves a critical task that returns while the service runs is treated as fatal.

    Catches: a critical loop that quietly exits (e.g. a `break`) going unnoticed.
    """
    token, reg = fresh()

    async def quits() -> None:
        return None

    await reg.spawn("heartbeat", BG, quits(), critical=True)
    reason = token.reason()
    assert isinstance(reason, ShutdownReason.Fatal) and "heartbeat" in reason.message


async def test_critical_task_returning_after_shutdown_is_fine() -> None:
    """Proves a critical task that returns because the token fired is a normal exit.

    Catches: every graceful shutdown being reported as Fatal.
    """
    token, reg = fresh()
    h = reg.spawn("heartbeat", BG, token.cancelled(), critical=True)
    token.cancel(ShutdownReason.UserRequested())
    await h
    assert token.reason() == ShutdownReason.UserRequested()


async def test_task_handle_api() -> None:
    """Proves TaskHandle's name, kind, origin, abort() and is_finished() for both origins.

    Catches: abort() that does nothing on one kind of task.
    """
    token, reg = fresh()
    py = reg.spawn("py", TaskKind.PeerConnection, asyncio.sleep(3600))
    nat = spawn_native_sleeper(reg, "nat", 3600)
    assert (py.name, py.kind, py.origin) == ("py", TaskKind.PeerConnection, "python")
    assert (nat.name, nat.kind, nat.origin) == ("nat", TaskKind.BackgroundLoop, "native")
    assert not py.is_finished() and not nat.is_finished()
    py.abort()
    nat.abort()
    with pytest.raises(asyncio.CancelledError):
        await py
    with pytest.raises(asyncio.CancelledError):
        await nat
    assert py.is_finished() and nat.is_finished()
    assert "nat" in repr(nat) and "native" in repr(nat)
    await reg.join_all(1)
    assert reg.stats().cancelled == 1 and reg.stats().aborted == 1
    del token


async def test_native_await_returns_none() -> None:
    """Proves awaiting a finished native task gives None, as a coroutine returning nothing would.

    Catches: a Rust unit value leaking to Python as an empty tuple.
    """
    _, reg = fresh()
    assert await spawn_native_sleeper(reg, "quick", 0.001) is None


async def test_rust_tracing_reaches_python_logging(caplog: pytest.LogCaptureFixture) -> None:
    """Proves a Rust tracing::warn! from the core arrives on a `dig_service.*` logger.

    Catches: Rust diagnostics printed to stdout or lost.
    """
    caplog.set_level(logging.WARNING, logger="dig_service")
    _core._emit_tracing_event("warn", "native side says hi")
    hits = [r for r in caplog.records if r.getMessage() == "native side says hi"]
    assert [(r.name, r.levelno) for r in hits] == [("dig_service.bridge", logging.WARNING)]
    logging.getLogger("dig_service.bridge").setLevel(logging.ERROR)
    try:
        _core._emit_tracing_event("warn", "filtered out")
    finally:
        logging.getLogger("dig_service.bridge").setLevel(logging.NOTSET)
    assert not [r for r in caplog.records if r.getMessage() == "filtered out"]


def test_spawn_outside_a_loop_is_a_clear_error() -> None:
    """Proves spawn() with no running loop raises RuntimeError and closes the coroutine.

    Catches: a panic, or a task created on a loop that never runs.
    """
    _, reg = fresh()

    async def work() -> None:
        pass

    coro = work()
    with pytest.raises(RuntimeError, match="running asyncio event loop"):
        reg.spawn("x", BG, coro)
    assert coro.cr_frame is None


async def test_stats_by_kind_counts_each_kind_and_origin() -> None:
    """Proves stats_by_kind lists every kind and origin once, with the core's counters.

    Python and native tasks land in their own rows; failures are counted
    under their kind; the rows sum to stats(); restarts of plain tasks stay 0.

    Catches: a row missing when nothing ran, a failure counted only in the
    total, a live task in the wrong origin, a KindStats without a field.
    """
    token, reg = fresh()
    empty = reg.stats_by_kind()
    assert [(s.kind, s.origin) for s in empty] == [
        (kind, origin)
        for kind in (
            TaskKind.BackgroundLoop,
            TaskKind.PeerConnection,
            TaskKind.RpcHandler,
            TaskKind.Maintenance,
        )
        for origin in ("native", "python")
    ]
    assert all((s.spawned, s.failed, s.restarted, s.live) == (0, 0, 0, 0) for s in empty)

    async def boom() -> None:
        raise ValueError("boom")

    ok = reg.spawn("ok", TaskKind.RpcHandler, asyncio.sleep(0))
    bad = reg.spawn("bad", TaskKind.RpcHandler, boom())
    stuck = reg.spawn("stuck", TaskKind.Maintenance, asyncio.sleep(3600))
    nat = spawn_native_sleeper(reg, "nat", 3600)
    await ok
    with pytest.raises(ValueError, match="boom"):
        await bad
    rows = {(s.kind, s.origin): s for s in reg.stats_by_kind()}
    row = rows[(TaskKind.RpcHandler, "python")]
    assert (row.spawned, row.failed, row.restarted, row.live) == (2, 1, 0, 0)
    row = rows[(TaskKind.Maintenance, "python")]
    assert (row.spawned, row.failed, row.live) == (1, 0, 1)
    row = rows[(TaskKind.BackgroundLoop, "native")]
    assert (row.spawned, row.failed, row.live) == (1, 0, 1)
    assert rows[(TaskKind.RpcHandler, "native")].spawned == 0
    stats = reg.stats()
    assert sum(s.spawned for s in rows.values()) == stats.spawned == 4
    assert sum(s.failed for s in rows.values()) == stats.failed == 1
    assert sum(s.live for s in rows.values()) == stats.live == 2
    assert stats.restarted == 0 and "restarted=0" in repr(stats)
    assert "KindStats(kind=TaskKind.RpcHandler, origin='python'" in repr(
        rows[(TaskKind.RpcHandler, "python")]
    )
    assert all(s.restarts == 0 for s in reg.snapshot())
    stuck.abort()
    nat.abort()
    token.cancel(ShutdownReason.UserRequested())
    await reg.join_all(5)
    assert all(s.live == 0 for s in reg.stats_by_kind())
