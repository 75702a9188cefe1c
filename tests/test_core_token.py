"""The native ShutdownToken as Python sees it: reasons, children, waiters, threads."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest

from dig_service import ShutdownReason, ShutdownToken


async def test_first_reason_wins() -> None:
    """Proves the first reason given to cancel() is kept and later ones are ignored.

    Catches: a later cancel() overwriting the recorded reason (exit codes
    would then depend on who called last).
    """
    t = ShutdownToken()
    assert not t.is_cancelled()
    assert t.reason() is None
    t.cancel(ShutdownReason.RpcRequested())
    t.cancel(ShutdownReason.Fatal("late"))
    assert t.is_cancelled()
    assert t.reason() == ShutdownReason.RpcRequested()


async def test_reasons_compare_by_value_and_match() -> None:
    """Proves ShutdownReason variants have value equality, hashing and `match` support.

    Catches: identity-based equality (two UserRequested() differing) or
    variants that cannot be destructured in a match statement.
    """
    assert ShutdownReason.UserRequested() == ShutdownReason.UserRequested()
    assert ShutdownReason.Fatal("a") == ShutdownReason.Fatal("a")
    assert ShutdownReason.Fatal("a") != ShutdownReason.Fatal("b")
    assert ShutdownReason.UserRequested() != ShutdownReason.RpcRequested()
    assert len({ShutdownReason.ReloadRequested(), ShutdownReason.ReloadRequested()}) == 1
    match ShutdownReason.Fatal("disk full"):
        case ShutdownReason.Fatal(message):
            assert message == "disk full"
        case _:
            pytest.fail("Fatal did not match its own class pattern")
    assert isinstance(ShutdownReason.RequestedByRun(), ShutdownReason)


async def test_child_token_reason_is_its_own() -> None:
    """Proves a child's cancel never touches its parent, and a parent's cancel reaches the child.

    Catches: the dig-service 0.1 bug where parent and child shared one reason
    slot, so a child's cancel leaked its reason into an uncancelled parent.
    """
    parent = ShutdownToken()
    child = parent.child_token()
    child.cancel(ShutdownReason.ReloadRequested())
    assert not parent.is_cancelled()
    assert parent.reason() is None
    parent.cancel(ShutdownReason.UserRequested())
    assert child.reason() == ShutdownReason.ReloadRequested()

    late_child = parent.child_token()
    assert late_child.reason() == ShutdownReason.UserRequested()

    other = ShutdownToken()
    waiting_child = other.child_token()
    waiter = asyncio.ensure_future(waiting_child.cancelled())
    await asyncio.sleep(0)
    other.cancel(ShutdownReason.Fatal("boom"))
    await asyncio.wait_for(waiter, 5)
    assert waiting_child.reason() == ShutdownReason.Fatal("boom")


async def test_cancelled_returns_at_once_when_fired() -> None:
    """Proves `await cancelled()` on a fired token does not wait.

    Catches: a waiter registered after the cancel never being woken.
    """
    t = ShutdownToken()
    t.cancel(ShutdownReason.UserRequested())
    await asyncio.wait_for(t.cancelled(), 5)


async def test_cancelled_is_a_coroutine_usable_with_create_task() -> None:
    """Proves cancelled() returns a real coroutine (TaskGroup.create_task accepts it).

    Catches: returning a bare Future, which create_task rejects with TypeError.
    """
    t = ShutdownToken()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(t.cancelled())
        await asyncio.sleep(0)
        assert not task.done()
        t.cancel(ShutdownReason.UserRequested())
    assert task.done() and task.exception() is None


async def test_cancel_from_another_thread_wakes_waiters_on_two_loops() -> None:
    """Proves one cancel() from a third thread wakes every waiter on two event loops.

    Catches: wake-ups delivered only to the loop that registered first, or
    delivered with the wrong thread (set_result from a foreign thread).
    """
    token = ShutdownToken()
    other_ready = threading.Event()
    other_woke: list[ShutdownReason | None] = []

    def other_loop() -> None:
        async def main() -> None:
            waiters = [asyncio.ensure_future(token.cancelled()) for _ in range(50)]
            await asyncio.sleep(0)
            other_ready.set()
            await asyncio.wait_for(asyncio.gather(*waiters), 10)
            other_woke.append(token.reason())

        asyncio.run(main())

    thread = threading.Thread(target=other_loop)
    thread.start()
    here = [asyncio.ensure_future(token.cancelled()) for _ in range(50)]
    await asyncio.sleep(0)
    await asyncio.to_thread(other_ready.wait, 10)
    canceller = threading.Thread(target=token.cancel, args=(ShutdownReason.RpcRequested(),))
    canceller.start()
    await asyncio.wait_for(asyncio.gather(*here), 10)
    canceller.join()
    await asyncio.to_thread(thread.join, 10)
    assert other_woke == [ShutdownReason.RpcRequested()]


async def test_abandoned_waiters_do_not_pile_up() -> None:
    """Proves waiters that time out are pruned instead of kept until the token fires.

    Catches: unbounded growth for a loop that polls `wait_for(token.cancelled(), t)`
    (each abandoned future would otherwise live until shutdown).
    """
    t = ShutdownToken()
    gc.collect()
    before = len(gc.get_objects())
    for _ in range(3000):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(t.cancelled(), 0)
    gc.collect()
    grown = len(gc.get_objects()) - before
    assert grown < 1000, f"{grown} objects kept after 3000 abandoned waits"
    waiter = asyncio.ensure_future(t.cancelled())
    await asyncio.sleep(0)
    t.cancel(ShutdownReason.UserRequested())
    await asyncio.wait_for(waiter, 5)


async def test_cancel_rejects_non_reason() -> None:
    """Proves cancel() with something that is not a ShutdownReason is a TypeError naming `reason`.

    Catches: a string reason silently accepted (and the exit code guessed).
    """
    t = ShutdownToken()
    with pytest.raises(TypeError, match="`reason`"):
        t.cancel("stop")  # type: ignore[arg-type]
    assert not t.is_cancelled()


def test_cancelled_outside_a_loop_is_a_clear_error() -> None:
    """Proves awaiting cancelled() without a running loop raises RuntimeError saying what is needed.

    Catches: a panic or a hang when called from plain synchronous code.
    """
    coro = ShutdownToken().cancelled()
    with pytest.raises(RuntimeError, match="running asyncio event loop"):
        coro.send(None)
