"""An edge hook's first step runs inline in the lifecycle task; a hook that suspends goes
on in a task of its own, with every bound of the contract.

``Service`` runs ``pre_start``, ``on_start``, ``on_stop`` and ``post_stop`` up to their
first suspension without a task (a step that does not suspend cannot be bounded, in a
task or not); only a hook that suspends is handed, mid-flight, to a task named
``dig_service.<hook>[<service>]`` (``_service._Resumed``). These tests pin what that
hand-off must keep: the hooks' shared context, the hook's own task once suspended,
``send``/``throw`` delivered to the hook (cancellation, swallowed or not, ``hook_timeout``,
``KeyboardInterrupt`` after a suspension), tracebacks that hold no lifecycle frame; and
that ``Service(...)``'s cached check of a node class still sees a hook made synchronous.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import uvloop
from _support import ScriptedNode

from dig_service import (
    NodeLifecycle,
    OnStartFailed,
    OnStopFailed,
    PreStartFailed,
    Service,
    ServiceConfig,
    ShutdownReason,
    StartContext,
    StopContext,
)

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
loops = pytest.mark.parametrize("loop_factory", list(LOOPS.values()), ids=list(LOOPS))

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


def run(loop_factory: Callable[[], asyncio.AbstractEventLoop], coro: Any) -> Any:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)


@loops
def test_a_hook_that_suspends_goes_on_in_its_own_task_in_the_hooks_context(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Proves: a hook's first step runs in the lifecycle task; once it suspends it goes on
    in the task ``dig_service.<hook>[<name>]``; what it awaits is resumed with its value;
    a context variable set inline in ``pre_start`` is seen by ``on_start`` after its
    suspension, by ``run`` and by the stop hooks (one context for every hook).

    Catches: a hand-off that restarts the coroutine or drops what the suspension awaited
    (a ``RuntimeError`` / a wrong value), a hand-off task outside the hooks' context.
    """
    seen: dict[str, Any] = {}

    async def pre_start(ctx: StartContext) -> None:
        VAR.set("from pre_start")
        seen["pre_start task"] = asyncio.current_task().get_name()  # type: ignore[union-attr]

    async def on_start(ctx: StartContext) -> None:
        seen["before"] = asyncio.current_task().get_name()  # type: ignore[union-attr]
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(fut.set_result, 42)
        seen["value"] = await fut
        await asyncio.sleep(0)  # a bare yield, handed over too
        seen["after"] = asyncio.current_task().get_name()  # type: ignore[union-attr]
        seen["on_start var"] = VAR.get()

    async def run_(ctx: Any) -> None:
        seen["run var"] = VAR.get()

    async def post_stop(ctx: StopContext) -> None:
        await asyncio.sleep(0)
        seen["post_stop var"] = VAR.get()
        seen["post_stop task"] = asyncio.current_task().get_name()  # type: ignore[union-attr]

    node = ScriptedNode(pre_start=pre_start, on_start=on_start, run=run_, post_stop=post_stop)
    status = run(loop_factory, Service(node).start())
    assert status.is_graceful()
    assert node.calls == ["pre_start", "on_start", "run", "on_stop", "post_stop"]
    assert seen == {
        "pre_start task": "dig_service.lifecycle[scripted]",
        "before": "dig_service.lifecycle[scripted]",
        "value": 42,
        "after": "dig_service.on_start[scripted]",
        "on_start var": "from pre_start",
        "run var": "from pre_start",
        "post_stop var": "from pre_start",
        "post_stop task": "dig_service.post_stop[scripted]",
    }


@loops
@pytest.mark.parametrize("shielded", [False, True], ids=["cancellable", "swallows-cancel"])
def test_a_handed_off_hook_is_still_bounded_by_hook_timeout(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], shielded: bool
) -> None:
    """Proves: an ``on_start`` that does work inline, then hangs, fails with a
    ``TimeoutError`` cause at ``hook_timeout``; the cancellation reaches the hook's own
    ``except`` through the hand-off (``throw``); one that swallows it is abandoned, and
    ``post_stop`` still runs.

    Catches: a hand-off that the timeout cannot cancel (a hang), or that loses the
    ``throw`` (the hook never sees ``CancelledError``).
    """
    got: list[str] = []
    release = asyncio.Event()

    async def on_start(ctx: StartContext) -> None:
        got.append("inline")
        while True:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                got.append("cancelled")
                if not shielded:
                    raise
                await release.wait()  # swallowed: abandoned by the lifecycle
                return

    async def main() -> BaseException:
        svc = Service(ScriptedNode(on_start=on_start), config=ServiceConfig(hook_timeout=0.05))
        try:
            await asyncio.wait_for(svc.start(), 10)
        except OnStartFailed as exc:
            release.set()
            await asyncio.sleep(0)
            return exc
        raise AssertionError("start() did not fail")

    err = run(loop_factory, main())
    assert isinstance(err.__cause__, TimeoutError), err.__cause__
    assert got == ["inline", "cancelled"]


@loops
@pytest.mark.parametrize("hook", ["pre_start", "on_stop"])
def test_keyboard_interrupt_after_a_suspension_winds_down_then_propagates(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], hook: str
) -> None:
    """Proves: a ``KeyboardInterrupt`` a hook raises after it was handed to its task is
    returned by the task (not raised out of the loop): the service winds down (the
    registry joined and closed, ``post_stop`` run after ``on_stop``), then ``start()``
    raises it; ``wait_for_exit`` raises the
    hook's ``ServiceError`` with it as cause.

    Catches: the hand-off task not guarded (the interrupt stops the loop mid-lifecycle,
    ``post_stop`` never runs).
    """
    interrupt = KeyboardInterrupt()

    async def interrupted(ctx: Any) -> None:
        await asyncio.sleep(0)
        raise interrupt

    async def returns(ctx: Any) -> None:
        await asyncio.sleep(0)

    if hook == "pre_start":
        node = ScriptedNode(pre_start=interrupted)
        ran, reason = ["pre_start"], ShutdownReason.UserRequested()
    else:  # the service stops by itself, then on_stop is interrupted
        node = ScriptedNode(on_stop=interrupted, run=returns)
        ran = ["pre_start", "on_start", "run", "on_stop", "post_stop"]
        reason = ShutdownReason.RequestedByRun()
    svc = Service(node)
    with pytest.raises(KeyboardInterrupt) as info:
        run(loop_factory, svc.start())
    assert info.value is interrupt
    assert node.calls == ran
    assert svc.shutdown_token.reason() == reason
    assert svc.tasks.is_closed()

    async def outcome() -> BaseException:
        try:
            await svc.wait_for_exit()
        except BaseException as exc:
            return exc
        raise AssertionError("wait_for_exit() did not raise")

    failure = run(loop_factory, outcome())
    assert isinstance(failure, PreStartFailed if hook == "pre_start" else OnStopFailed)
    assert failure.__cause__ is interrupt


@loops
def test_an_inline_failure_holds_no_lifecycle_frame(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Proves: the traceback of an exception a hook raises in its first (inline) step
    starts at the hook's own frame, as in a task: no frame of the lifecycle (which holds
    the service) is in it, and a failed service is freed once its owner drops it.

    Catches: the inline step's caller frame left in the traceback (every recorded
    failure, and every kept handle, would keep the service and its node alive).
    """
    boom = ValueError("boom")

    async def pre_start(ctx: StartContext) -> None:
        raise boom

    svc = Service(ScriptedNode(pre_start=pre_start))
    handle = svc.handle()
    with pytest.raises(PreStartFailed) as info:
        run(loop_factory, svc.start())
    assert info.value.__cause__ is boom
    tb = boom.__traceback__
    assert tb is not None and tb.tb_frame.f_code.co_name == "pre_start"
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    assert not any(f.endswith("_service.py") for f in frames), frames
    ref = weakref.ref(svc)
    del svc, info
    gc.collect()
    assert ref() is None, "the failed service is still alive"
    assert handle.is_running() is False


class Plain(NodeLifecycle):
    NAME = "plain"


def test_the_node_check_is_cached_but_sees_a_hook_made_synchronous() -> None:
    """Proves: ``Service(...)`` refuses a node whose hook is a plain function even when a
    node of the same class passed before: replaced on the class, or shadowed on the
    instance; a class whose check passed is still accepted.

    Catches: a per-class cache of the check that trusts the class it saw once (a
    synchronous hook accepted, found only when ``start()`` runs it).
    """

    class Node(NodeLifecycle):
        async def on_start(self, ctx: StartContext) -> None:
            pass

    Service(Node())
    Service(Node())  # cached: still fine
    shadowed = Node()
    shadowed.on_start = lambda ctx: None  # type: ignore[method-assign, assignment, return-value]
    with pytest.raises(TypeError, match="on_start"):
        Service(shadowed)

    def sync_on_start(self: Any, ctx: StartContext) -> None:
        pass

    Node.on_start = sync_on_start  # type: ignore[method-assign, assignment]
    with pytest.raises(TypeError, match="on_start"):
        Service(Node())
    Service(Plain())
