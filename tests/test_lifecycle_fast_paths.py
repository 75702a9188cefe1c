"""The cheap paths of a service's start and stop (P9): edge hooks a node keeps from
``NodeLifecycle`` are not called (no task), a failure of a hook the node overrides keeps
no lifecycle frame alive, and ``Service(...)``'s cached check of a node class still sees
a hook made synchronous.
"""

from __future__ import annotations

import asyncio
import gc
import pickle
import sys
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from _support import ScriptedNode, loops, run_on

from dig_service import (
    AlreadyStopped,
    ExitReason,
    ExitStatus,
    NodeLifecycle,
    PreStartFailed,
    RunContext,
    RunFailed,
    Service,
    ShutdownReason,
    ShutdownReport,
    StartContext,
    StopContext,
    TaskKind,
)
from dig_service._exit import trusted_requested, trusted_status
from dig_service._report import (
    PhaseReport,
    StragglerReport,
    trusted_phase_report,
    trusted_shutdown_report,
)


class Defaults(NodeLifecycle):
    """Every hook ``NodeLifecycle``'s; ``run`` returns at once."""

    NAME = "defaults"

    async def run(self, ctx: RunContext) -> None:
        pass


def tasks_made(loop_factory: Callable[[], asyncio.AbstractEventLoop], node: object) -> list[str]:
    """The names of the tasks made while ``Service(node).start()`` runs (a task factory
    records them), after checking that it returned ``RunCompleted``."""
    made: list[asyncio.Task[Any]] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        made.append(task)
        return task

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(factory)
        try:
            status = await Service(node).start()  # type: ignore[type-var]
        finally:
            loop.set_task_factory(None)
        assert status.reason == ExitReason.RunCompleted(), status

    names: list[str] = []
    run_on(loop_factory, main())
    names.extend(task.get_name() for task in made)
    return names


@loops
def test_default_edge_hooks_cost_no_task(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Proves: a node that keeps ``NodeLifecycle``'s edge hooks gets no task for them
    (only the lifecycle's and ``run``'s are made), while a hook it overrides, on its
    class, on an instance, or by replacing the class attribute, is called, in its task
    ``dig_service.<hook>[<name>]``.

    Catches: the default hooks run in tasks again (three loop turns each, P9), or a
    hook the node overrides skipped as if it were the default.
    """
    base = ["dig_service.lifecycle[defaults]", "dig_service.run[defaults]"]
    assert tasks_made(loop_factory, Defaults()) == base

    calls: list[str] = []

    class OnStart(Defaults):
        async def on_start(self, ctx: StartContext) -> None:
            calls.append("class")

    assert tasks_made(loop_factory, OnStart()) == [
        *base[:1],
        "dig_service.on_start[defaults]",
        base[1],
    ]

    async def on_stop(ctx: StopContext) -> None:
        calls.append("instance")

    shadowed = Defaults()
    shadowed.on_stop = on_stop  # type: ignore[method-assign]
    assert tasks_made(loop_factory, shadowed) == [*base, "dig_service.on_stop[defaults]"]

    class Replaced(Defaults):
        pass

    async def post_stop(self: object, ctx: StopContext) -> None:
        calls.append("replaced")

    Replaced.post_stop = post_stop  # type: ignore[method-assign]
    assert tasks_made(loop_factory, Replaced()) == [*base, "dig_service.post_stop[defaults]"]
    assert calls == ["class", "instance", "replaced"]


@loops
def test_a_hook_failure_holds_no_lifecycle_frame(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Proves: the traceback of an exception a hook raises at once starts at the hook's
    own frame, no frame of the lifecycle (which holds the service) is in it or behind
    its outermost frame (``f_back``), and a failed service is freed once its owner drops
    it, on every CPython.

    Catches: a hook stepped inline in the lifecycle task (tried for P9): on CPython 3.12+
    a frame that ends with an exception links its caller's frame as ``f_back``, so the
    recorded failure, and every kept handle, kept the service and its node alive.
    """
    boom = ValueError("boom")

    async def pre_start(ctx: StartContext) -> None:
        raise boom

    svc = Service(ScriptedNode(pre_start=pre_start))
    handle = svc.handle()
    with pytest.raises(PreStartFailed) as info:
        run_on(loop_factory, svc.start())
    assert info.value.__cause__ is boom
    lifecycle = {"_lifecycle", "_stages", "_edge_hook", "_call_hook", "start"}
    tb = boom.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    back = frames[0].f_back if frames else None
    while back is not None:
        frames.append(back)
        back = back.f_back
    names = [f.f_code.co_name for f in frames]
    assert "pre_start" in names, names
    assert not lifecycle & set(names), names
    ref = weakref.ref(svc)
    del svc, info
    gc.collect()
    assert ref() is None, "the failed service is still alive"
    assert handle.is_running() is False


def lifecycle_of(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], node: object
) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Run ``Service(node).start()`` (``RunCompleted`` checked); return the stages its
    phase listener saw, the functions of ``_service.py``, ``_lifecycle.py``,
    ``_report.py`` and ``_exit.py`` called (profiled), and the report's ``(phase,
    outcome)`` pairs."""
    phases: list[str] = []
    called: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        code = frame.f_code
        if event == "call" and code.co_filename.endswith(
            ("_service.py", "_lifecycle.py", "_report.py", "_exit.py")
        ):
            called.append(code.co_name)

    async def main() -> Any:
        svc = Service(node)  # type: ignore[type-var]
        svc._add_phase_listener(lambda phase: phases.append(phase.value))
        sys.setprofile(profile)
        try:
            return await svc.start()
        finally:
            sys.setprofile(None)

    status = run_on(loop_factory, main())
    assert status.reason == ExitReason.RunCompleted(), status
    report = [(p.name, p.outcome) for p in status.report.phases]
    return phases, called, report


@loops
def test_default_edge_hooks_are_passed_over_without_a_coroutine(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Proves: a node that keeps ``NodeLifecycle``'s edge hooks has them passed over at
    once: no ``_edge_hook`` coroutine, no start or stop context made (only ``run``'s),
    yet every stage is entered, in order, for the phase listeners, and the report says
    ``on_stop``/``post_stop`` ``"ok"``; a node overriding some hooks gets them called,
    the stages and report unchanged, and one context shared by the two start hooks and
    one by the two stop hooks (as when every context was made up front).

    Catches: a default hook awaited through a coroutine again (P9: about 5% of a
    service's instructions), a passed-over hook missing from the listeners or the
    report, or a context made twice (the hooks no longer see the same object).
    """
    stages = ["pre_start", "on_start", "run", "join", "on_stop", "post_stop", "exited"]
    report = [("run", "ok"), ("join", "ok"), ("on_stop", "ok"), ("post_stop", "ok")]
    phases, called, got = lifecycle_of(loop_factory, Defaults())
    assert phases == stages
    assert got == report
    assert "_edge_hook" not in called, called
    assert called.count("trusted_run_context") == 1, called
    assert "trusted_start_context" not in called and "trusted_stop_context" not in called
    assert called.count("_call_hook") == 1, called  # run
    # The report is built by the trusted constructors (no frozen dataclass __init__); the
    # passed-over stop hooks' reports are shared values, not made again.
    assert called.count("trusted_phase_report") == 2, called  # run, join
    assert called.count("trusted_shutdown_report") == 1, called
    assert called.count("trusted_status") == 1, called

    seen: dict[str, Any] = {}

    class Some(Defaults):
        async def on_start(self, ctx: StartContext) -> None:
            seen["on_start"] = ctx

        async def post_stop(self, ctx: StopContext) -> None:
            seen["post_stop"] = ctx

    phases, called, got = lifecycle_of(loop_factory, Some())
    assert phases == stages
    assert got == report
    assert "_edge_hook" in called, called
    assert called.count("_call_hook") == 3, called  # on_start, run, post_stop
    assert isinstance(seen["on_start"], StartContext)
    assert seen["on_start"].name == "defaults"
    assert isinstance(seen["post_stop"], StopContext)
    assert seen["post_stop"].exit_reason == ExitReason.RunCompleted()

    class All(Some):
        async def pre_start(self, ctx: StartContext) -> None:
            seen["pre_start"] = ctx

        async def on_stop(self, ctx: StopContext) -> None:
            seen["on_stop"] = ctx

    seen.clear()
    phases, called, got = lifecycle_of(loop_factory, All())
    assert phases == stages
    assert got == report
    assert seen["pre_start"] is seen["on_start"]
    assert seen["on_stop"] is seen["post_stop"]
    assert called.count("trusted_start_context") == 1, called
    assert called.count("trusted_run_context") == 1, called
    assert called.count("trusted_stop_context") == 1, called


@loops
def test_start_resumes_the_turn_after_its_lifecycle_returns(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Proves: the lifecycle wakes ``start()`` itself as its last act: ``start()`` has
    returned its status by the time a done callback of the returned lifecycle task runs
    (the next loop turn), and its status is the lifecycle's.

    Catches: ``start()`` woken through a done callback of the lifecycle task again (a
    callback that resolves a waiter, which then wakes ``start()``: one more loop turn and
    callback a service, P9).
    """
    seen: list[bool] = []

    async def main() -> None:
        svc = Service(Defaults())
        start = asyncio.create_task(svc.start())
        await asyncio.sleep(0)  # one loop turn: start() makes its lifecycle task
        lifecycle = svc._lifecycle_task
        assert lifecycle is not None
        lifecycle.add_done_callback(lambda _: seen.append(start.done()))
        status = await start
        assert status.reason == ExitReason.RunCompleted(), status
        assert lifecycle.done()
        assert await svc.handle().wait_for_exit() is status

    run_on(loop_factory, main())
    assert seen == [True]


@loops
def test_start_wakes_when_its_lifecycle_task_is_cancelled_before_it_began(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Proves: a lifecycle task cancelled before its first step (it never returns, so it
    cannot wake ``start()`` itself) still wakes ``start()`` through its done callback:
    ``start()`` raises ``CancelledError`` (nothing ran, nothing was recorded) and the
    handles' ``wait_for_exit()`` raises ``AlreadyStopped``.

    Catches: ``start()`` woken only by a lifecycle that returns (it would wait forever:
    here, the 10 s guard's ``TimeoutError``), or no outcome recorded for the handles.
    """
    hooks: list[str] = []

    class Node(Defaults):
        async def run(self, ctx: RunContext) -> None:
            hooks.append("run")

    async def main() -> None:
        svc = Service(Node())
        handle = svc.handle()
        start = asyncio.create_task(svc.start())
        await asyncio.sleep(0)  # one loop turn: start() makes its lifecycle task
        lifecycle = svc._lifecycle_task
        assert lifecycle is not None
        lifecycle.cancel()  # its first step has not run yet
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(start, 10)
        assert start.cancelled()
        with pytest.raises(AlreadyStopped, match="cancelled before it began"):
            await handle.wait_for_exit()

    run_on(loop_factory, main())
    assert hooks == []


def test_trusted_reports_equal_the_checked_ones() -> None:
    """Proves: ``trusted_phase_report``, ``trusted_shutdown_report``,
    ``trusted_requested`` and ``trusted_status`` (how ``Service`` builds its reports and
    its status, without the public constructors' checks) make values equal to the
    public constructors' (same fields, equality, hash, repr, ``match``, pickling), just
    as immutable.

    Catches: a field left unset or swapped by the trusted constructors (an
    ``AttributeError`` or a wrong value in every ``ShutdownReport`` or ``ExitStatus``),
    or a value that can be changed after the fact.
    """
    phase = trusted_phase_report("join", 0.25, "timed_out")
    assert phase == PhaseReport("join", 0.25, "timed_out")
    assert hash(phase) == hash(PhaseReport("join", 0.25, "timed_out"))
    assert repr(phase) == repr(PhaseReport("join", 0.25, "timed_out"))
    with pytest.raises(AttributeError):
        phase.duration = 1.0  # type: ignore[misc]
    reason = ShutdownReason.Fatal("boom")
    straggler = StragglerReport("w", TaskKind.BackgroundLoop, "python", 1.5, None)
    args = (reason, 2.5, 3, [phase], [straggler])
    report = trusted_shutdown_report(*args)
    checked = ShutdownReport(*args)
    assert report == checked
    assert repr(report) == repr(checked)
    assert str(report) == str(checked)
    assert report.to_dict() == checked.to_dict()
    assert pickle.loads(pickle.dumps(report)) == checked
    with pytest.raises(AttributeError):
        report.total = 0.0  # type: ignore[misc]

    requested = trusted_requested(reason)
    assert requested == ExitReason.RequestedShutdown(reason)
    assert hash(requested) == hash(ExitReason.RequestedShutdown(reason))
    assert repr(requested) == repr(ExitReason.RequestedShutdown(reason))
    match requested:
        case ExitReason.RequestedShutdown(got):
            assert got is reason
        case _:
            raise AssertionError(requested)
    assert pickle.loads(pickle.dumps(requested)) == requested
    with pytest.raises(AttributeError):
        requested.reason = ShutdownReason.UserRequested()  # type: ignore[attr-defined]
    status = trusted_status(requested, report)
    assert status == ExitStatus(ExitReason.RequestedShutdown(reason), report=report)
    assert status.report is report
    assert not status.is_graceful()
    assert status.exit_code == 1
    assert str(status) == str(ExitStatus(requested, report=report))
    again = pickle.loads(pickle.dumps(status))
    assert again == status
    assert again.report == report
    with pytest.raises(AttributeError):
        status.report = None  # type: ignore[misc]


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


def test_a_node_class_checked_before_is_not_checked_again_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Proves: the second ``Service(...)`` of a node class whose hooks passed takes the
    cached path (the per-hook check is not run again) and builds the same service as the
    full check (same name, same node); the cache entry goes when its class is collected;
    a class with a ``__getattribute__`` of its own, or an instance that shadows a hook,
    is checked in full every time.

    Catches: a cache that is never hit (the check's full cost on every service, P9), one
    that keeps the node classes of the past alive, or one trusted where the hooks the
    lifecycle would call are not the class's.
    """
    from dig_service import _validation

    full: list[str] = []
    check = _validation._check_async_methods

    def counting(obj: object, *args: Any) -> None:
        full.append(type(obj).__name__)
        check(obj, *args)

    monkeypatch.setattr(_validation, "_check_async_methods", counting)

    class Fresh(NodeLifecycle):
        NAME = "fresh"

    first, second = Service(Fresh()), Service(Fresh())
    assert full == ["Fresh"]  # the second was not checked again
    assert second.handle().name() == first.handle().name() == "fresh"
    assert isinstance(second.node, Fresh)
    key = id(Fresh)
    assert _validation._CHECKED_NODE_TYPES[key][0]() is Fresh

    class Looked(NodeLifecycle):
        def __getattribute__(self, name: str) -> Any:
            return object.__getattribute__(self, name)

    Service(Looked())
    Service(Looked())
    assert full == ["Fresh", "Looked", "Looked"]

    shadowing = Fresh()
    shadowing.run = Fresh.run.__get__(shadowing)  # type: ignore[method-assign]
    Service(shadowing)
    assert full == ["Fresh", "Looked", "Looked", "Fresh"]

    del first, second, shadowing, Fresh
    gc.collect()
    assert key not in _validation._CHECKED_NODE_TYPES


def test_a_service_whose_constructor_raised_is_dropped_quietly() -> None:
    """Proves: a ``Service`` whose ``__init__`` raised before it made its exit slot is
    dropped without an error from its finalizer (nothing to abandon), while one dropped
    unstarted still releases its slot with ``AlreadyStopped``.

    Catches: a finalizer that reads the slot as if ``__init__`` always got that far
    ("Exception ignored in Service.__del__"), or one that no longer abandons.
    """
    seen: list[BaseException | None] = []
    hook = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(u.exc_value)
    try:
        with pytest.raises(TypeError, match="NAME"):

            class BadName(NodeLifecycle):
                NAME = 3  # type: ignore[assignment]

            Service(BadName())
        gc.collect()
        dropped = Service(Plain())
        slot = dropped._slot
        del dropped
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert seen == []
    outcome = slot.outcome()
    assert isinstance(outcome, AlreadyStopped)
    assert "garbage-collected before its start() finished" in str(outcome)


def test_the_api_slots_left_empty_mean_the_no_op_apis() -> None:
    """Proves: a ``Service`` given no peer or RPC API reports ``None`` for it and uses
    the no-op ``PeerApi()``/``RpcApi()`` (made when asked for), and one given an API uses
    that very object.

    Catches: the no-op APIs lost when they stopped being made in the constructor, or a
    given API replaced by a default.
    """
    from dig_service import PeerApi, RpcApi

    bare = Service(Plain())
    assert bare.peer_api is None and bare.rpc_api is None
    assert type(bare._peer_api_impl) is PeerApi
    assert type(bare._rpc_api_impl) is RpcApi
    peer, rpc = PeerApi(), RpcApi()
    given = Service(Plain(), peer, rpc)
    assert given._peer_api_impl is peer and given._rpc_api_impl is rpc


class _PhaseSpy(Service[Any, None, None]):
    """A ``Service`` that records every value stored as its stage (``_phase_value``)."""

    written: list[str]

    @property  # type: ignore[override]
    def _phase_value(self) -> Any:
        return self.__dict__["_spied_phase"]

    @_phase_value.setter
    def _phase_value(self, phase: Any) -> None:
        self.__dict__["_spied_phase"] = phase
        self.__dict__.setdefault("written", []).append(str(phase))


@loops
def test_stages_entered_inline_without_listeners_are_the_listeners_stages(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Proves: with no phase listener the lifecycle enters its stages inline (``_enter``,
    the listeners' path, is not called) and goes through the very stages, in the same
    order, that a listener is told of; ``_phase`` ends ``exited`` both ways.

    Catches: the inline path (P9: a property setter call a stage saved) skipping or
    reordering a stage, or leaving the phase behind, where the runner reads it.
    """
    stages = ["pre_start", "on_start", "run", "join", "on_stop", "post_stop", "exited"]
    called: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.endswith("_service.py"):
            called.append(frame.f_code.co_name)

    async def quiet() -> _PhaseSpy:
        svc = _PhaseSpy(Defaults())
        sys.setprofile(profile)
        try:
            status = await svc.start()
        finally:
            sys.setprofile(None)
        assert status.reason == ExitReason.RunCompleted()
        return svc

    spy = run_on(loop_factory, quiet())
    assert spy.written == ["created", *stages]
    assert "_enter" not in called, called
    assert spy._phase == "exited"

    told: list[str] = []

    async def listened() -> Service[Any, None, None]:
        svc = Service(Defaults())
        svc._add_phase_listener(lambda phase: told.append(str(phase)))
        await svc.start()
        return svc

    assert run_on(loop_factory, listened())._phase == "exited"
    assert told == stages


@loops
def test_a_hook_result_is_checked_awaitable_past_the_coroutine_fast_path(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Proves: a hook that returns a coroutine is run without asking ``inspect`` (its
    type says it is awaitable), one that returns another awaitable (a ``Future``) is still
    run, and one that returns something not awaitable is still refused: ``RunFailed``
    with a ``TypeError`` naming the hook and saying to declare it ``async def``.

    Catches: the type test on the hot path refusing an awaitable that is not a
    coroutine, or letting a non-awaitable through to ``_guarded``.
    """
    inspected: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_name == "isawaitable":
            inspected.append(frame.f_code.co_filename)

    async def start(make_run: Callable[[asyncio.AbstractEventLoop], Any]) -> Any:
        node = Defaults()
        svc = Service(node)
        node.run = make_run(asyncio.get_running_loop())  # type: ignore[method-assign]
        sys.setprofile(profile)
        try:
            return await svc.start()
        except RunFailed as exc:
            return exc
        finally:
            sys.setprofile(None)

    async def returns() -> None:
        pass

    status = run_on(loop_factory, start(lambda loop: lambda ctx: returns()))
    assert status.reason == ExitReason.RunCompleted()
    assert inspected == []

    def done_future(loop: asyncio.AbstractEventLoop) -> Any:
        fut = loop.create_future()
        fut.set_result(None)
        return lambda ctx: fut

    status = run_on(loop_factory, start(done_future))
    assert status.reason == ExitReason.RunCompleted()
    assert len(inspected) == 1

    failed = run_on(loop_factory, start(lambda loop: lambda ctx: 42))
    assert isinstance(failed, RunFailed)
    assert isinstance(failed.__cause__, TypeError)
    assert "returned int, not a coroutine; declare it `async def run(...)`" in str(failed.__cause__)


class _Waits(NodeLifecycle):
    """Default edge hooks; ``run`` says it started, then waits for the token."""

    NAME = "waits"

    def __init__(self) -> None:
        self.started: asyncio.Event | None = None

    async def run(self, ctx: RunContext) -> None:
        assert self.started is not None
        self.started.set()
        await ctx.shutdown.cancelled()


class _NoFireWatch(Service[Any, None, None]):
    """A ``Service`` with no future parked on its token by ``_watch_fire``: ``run``'s wait
    has to park its own (the path taken when that future is gone)."""

    def _watch_fire(self) -> None:
        pass


@loops
def test_run_waits_on_the_future_parked_since_start(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Proves: while ``run`` runs, the lifecycle waits on the future ``_watch_fire``
    parked on the token when ``start()`` began (one ``_park`` a start, not two), and
    without that future it parks one of its own; both ways a shutdown requested while
    ``run`` waits ends in the same status, with the same report stages.

    Catches: the wait parking a second future again (P9: a park and a wake a start), or
    a wait on a future that never resolves when the watch is missing (a hang).
    """

    def lifecycle(make: Callable[[Any], Any]) -> tuple[Any, int]:
        parks: list[str] = []

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "c_call" and getattr(arg, "__name__", "") == "_park":
                if frame.f_code.co_filename.endswith("_service.py"):
                    parks.append(frame.f_code.co_name)

        async def main() -> Any:
            node = _Waits()
            node.started = asyncio.Event()
            svc = make(node)
            sys.setprofile(profile)
            try:
                starting = asyncio.ensure_future(svc.start())
                await node.started.wait()
                svc.request_shutdown(ShutdownReason.UserRequested())
                return await starting
            finally:
                sys.setprofile(None)

        status = run_on(loop_factory, main())
        return status, len(parks)

    shared, parks = lifecycle(Service)
    assert parks == 1  # _watch_fire's, nothing for run's wait
    own, parks = lifecycle(_NoFireWatch)
    assert parks == 1  # run's wait's own
    requested = ExitReason.RequestedShutdown(ShutdownReason.UserRequested())
    assert shared.reason == own.reason == requested
    assert shared.report is not None and own.report is not None
    stages = [(p.name, p.outcome) for p in shared.report.phases]
    assert stages == [(p.name, p.outcome) for p in own.report.phases]
    assert stages == [("run", "ok"), ("join", "ok"), ("on_stop", "ok"), ("post_stop", "ok")]
