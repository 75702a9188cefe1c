"""``Service`` accessors, the ``ServiceHandle`` and ``wait_for_exit``.

Issue 3, bullet 3: ``Service[N, A, R]`` as a real ``typing.Generic``, the
contexts, ``ServiceHandle`` (valid after the service is gone),
``wait_for_exit()`` on both.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import threading
import typing
import weakref
from typing import Any

import pytest
from _support import ScriptedNode, loop_kinds, raiser, uvloop

from dig_service import (
    AlreadyStopped,
    ExitReason,
    ExitStatus,
    NodeLifecycle,
    PeerApi,
    RpcApi,
    RunContext,
    RunFailed,
    Service,
    ServiceHandle,
    ShutdownReason,
    ShutdownToken,
    StartContext,
    TaskKind,
    TaskRegistry,
)
from dig_service._phase import Phase


class MyRpc(RpcApi):
    async def dispatch(self, method: str, params: object) -> object:
        return method


def test_service_is_a_real_generic_and_exposes_what_it_was_given() -> None:
    """Proves: ``Service[N, A, R]`` is a ``typing.Generic`` with three parameters
    (subscriptable at runtime, ``get_origin`` works), and the properties return the
    node, the APIs as passed (``None`` for a defaulted slot), a token and a registry
    bound to that token.

    Catches: a fake ``__class_getitem__`` that breaks ``get_origin``/``get_args``, or
    a registry watching another token than the service's.
    """
    alias = Service[NodeLifecycle, None, MyRpc]
    assert typing.get_origin(alias) is Service
    assert typing.get_args(alias) == (NodeLifecycle, type(None), MyRpc)
    assert len(Service.__parameters__) == 3

    node, rpc = NodeLifecycle(), MyRpc()
    service: Service[NodeLifecycle, None, MyRpc] = alias(node, rpc_api=rpc)
    assert service.node is node
    assert service.peer_api is None
    assert service.rpc_api is rpc
    assert isinstance(service.shutdown_token, ShutdownToken)
    assert isinstance(service.tasks, TaskRegistry)
    assert service.tasks.shutdown.same_as(service.shutdown_token)
    peer = PeerApi()
    assert Service(node, peer).peer_api is peer


@pytest.mark.asyncio
async def test_hooks_get_the_service_token_registry_and_name() -> None:
    """Proves: every hook's context carries the service's own token and registry, and
    ``StartContext.name`` is the node's ``NAME``.

    Catches: contexts built with a fresh token (tasks never see the shutdown).
    """
    node = ScriptedNode(run=raiser(RuntimeError("stop here")))
    service = Service(node)
    with pytest.raises(RunFailed):
        await service.start()
    for hook in ("pre_start", "on_start", "run", "on_stop", "post_stop"):
        ctx = node.contexts[hook]
        assert ctx.shutdown.same_as(service.shutdown_token), hook
        assert ctx.tasks is service.tasks, hook
    assert node.contexts["pre_start"].name == "scripted"


@pytest.mark.asyncio
async def test_handle_controls_and_observes_the_service() -> None:
    """Proves: ``ServiceHandle`` reports ``name()``, ``is_running()`` (False before
    ``start()``, True while running, False after), ``tasks()`` (live summaries),
    ``shutdown_token()``, and ``request_shutdown`` stops the service with that reason.

    Catches: ``is_running`` that stays True after exit (health checks lie), a handle
    that cannot stop the service, a bad ``reason`` accepted silently.
    """

    async def run(ctx: RunContext) -> None:
        ctx.tasks.spawn("loop", TaskKind.BackgroundLoop, ctx.shutdown.cancelled())
        node.run_started.set()
        await ctx.shutdown.cancelled()

    node = ScriptedNode(run=run)
    service = Service(node)
    handle = service.handle()
    assert isinstance(handle, ServiceHandle)
    assert handle.name() == "scripted"
    assert not handle.is_running()
    starting = asyncio.ensure_future(service.start())
    await node.run_started.wait()
    assert handle.is_running()
    assert [(s.name, s.kind, s.origin) for s in handle.tasks()] == [
        ("loop", TaskKind.BackgroundLoop, "python")
    ]
    assert handle.shutdown_token().same_as(service.shutdown_token)
    with pytest.raises(TypeError, match=r"`reason` must be a dig_service\.ShutdownReason"):
        handle.request_shutdown("stop")  # type: ignore[arg-type]
    handle.request_shutdown(ShutdownReason.RpcRequested())
    status = await starting
    assert status.reason == ExitReason.RequestedShutdown(ShutdownReason.RpcRequested())
    assert not handle.is_running()
    assert handle.tasks() == []


@pytest.mark.asyncio
async def test_handle_stays_valid_and_harmless_after_the_service_is_gone() -> None:
    """Proves: a handle does not keep the service alive; after the service is gone its
    calls are harmless no-ops and ``wait_for_exit`` still returns the recorded status.

    Catches: a handle holding the node (memory leak) or raising on a dead service
    (a signal handler crashing during shutdown).
    """
    service = Service(ScriptedNode(run=lambda ctx: asyncio.sleep(0)))
    handle = service.handle()
    status = await service.start()
    gone = weakref.ref(service)
    del service
    gc.collect()
    assert gone() is None, "the handle must not keep the Service alive"

    handle.request_shutdown(ShutdownReason.UserRequested())
    assert not handle.is_running()
    assert handle.tasks() == []
    assert handle.shutdown_token().is_cancelled()
    assert await handle.wait_for_exit() == status == ExitStatus(ExitReason.RunCompleted())


@pytest.mark.asyncio
async def test_wait_for_exit_on_a_service_dropped_unstarted_raises_already_stopped() -> None:
    """Proves: if the service is dropped without being started, waiters (already
    waiting, or waiting later) get ``AlreadyStopped`` instead of hanging.

    Catches: an admin task awaiting ``wait_for_exit`` forever on a discarded service.
    """
    service = Service(NodeLifecycle())
    handle = service.handle()
    waiting = asyncio.ensure_future(handle.wait_for_exit())
    await asyncio.sleep(0)
    del service
    gc.collect()
    with pytest.raises(AlreadyStopped, match="garbage-collected before its start"):
        await asyncio.wait_for(waiting, timeout=2)
    with pytest.raises(AlreadyStopped):
        await handle.wait_for_exit()


@pytest.mark.asyncio
async def test_wait_for_exit_before_start_and_many_waiters_share_the_result() -> None:
    """Proves: ``wait_for_exit`` may be awaited before ``start()``; every waiter
    (service or handle, before or after the fact) gets the very status, or the very
    error object ``start()`` raised.

    Catches: waiters that miss a result published before they subscribed, or that get
    a different error than ``start()``.
    """
    node = ScriptedNode()
    service = Service(node)
    early = [asyncio.ensure_future(service.wait_for_exit()) for _ in range(3)]
    early.append(asyncio.ensure_future(service.handle().wait_for_exit()))
    starting = asyncio.ensure_future(service.start())
    await node.run_started.wait()
    service.request_shutdown(ShutdownReason.UserRequested())
    status = await starting
    assert [await w for w in early] == [status] * 4
    assert await service.handle().wait_for_exit() == status

    boom = RuntimeError("boom")
    failing = Service(ScriptedNode(run=raiser(boom)))
    waiter = asyncio.ensure_future(failing.handle().wait_for_exit())
    with pytest.raises(RunFailed) as raised:
        await failing.start()
    with pytest.raises(RunFailed) as waited:
        await waiter
    assert waited.value is raised.value
    assert waited.value.__cause__ is boom


@pytest.mark.asyncio
async def test_cancelled_wait_for_exit_leaves_the_service_alone() -> None:
    """Proves: cancelling a ``wait_for_exit`` waiter (e.g. under ``asyncio.timeout``)
    neither stops the service nor disturbs other waiters.

    Catches: a waiter's cancellation propagating into the lifecycle.
    """
    node = ScriptedNode()
    service = Service(node)
    starting = asyncio.ensure_future(service.start())
    await node.run_started.wait()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(service.wait_for_exit(), timeout=0.01)
    assert not service.shutdown_token.is_cancelled()
    other = asyncio.ensure_future(service.wait_for_exit())
    service.request_shutdown(ShutdownReason.UserRequested())
    assert await other == await starting


@pytest.mark.asyncio
@pytest.mark.parametrize("other_loop", loop_kinds("asyncio", "uvloop"))
async def test_wait_for_exit_from_another_thread_and_event_loop(other_loop: str) -> None:
    """Proves: ``handle.wait_for_exit()`` awaited on a different event loop in another
    thread (asyncio or uvloop) is woken when the service exits on this loop, and
    ``request_shutdown`` from that thread stops the service here.

    Catches: waiters parked on a future of the wrong loop (``got Future attached to a
    different loop``) or woken without ``call_soon_threadsafe`` (never wakes).
    """
    node = ScriptedNode()
    service = Service(node)
    handle = service.handle()
    waiting = threading.Event()
    result: concurrent.futures.Future[ExitStatus] = concurrent.futures.Future()

    async def remote() -> ExitStatus:
        waiter = asyncio.ensure_future(handle.wait_for_exit())
        await asyncio.sleep(0)
        waiting.set()
        return await waiter

    def thread_main() -> None:
        runner: Any = asyncio.run if other_loop == "asyncio" else uvloop.run
        try:
            result.set_result(runner(remote()))
        except BaseException as exc:
            result.set_exception(exc)

    starting = asyncio.ensure_future(service.start())
    await node.run_started.wait()
    thread = threading.Thread(target=thread_main)
    thread.start()
    assert await asyncio.to_thread(waiting.wait, 5)
    await asyncio.to_thread(handle.request_shutdown, ShutdownReason.RpcRequested())
    status = await starting
    assert await asyncio.wait_for(asyncio.wrap_future(result), timeout=5) == status
    await asyncio.to_thread(thread.join, 5)


@pytest.mark.asyncio
async def test_start_on_a_token_cancelled_before_start_runs_no_hook_and_exits() -> None:
    """Proves: a shutdown requested before ``start()`` is kept (first reason wins): no
    hook runs (SPEC 7: the service never starts), and the exit reports that reason
    with a report whose stages are all skipped but the join.

    Catches: a start() that hangs or ignores an early SIGTERM, or that starts the node
    (opens its stores, binds) only to stop it at once.
    """
    node = ScriptedNode()
    service = Service(node)
    service.request_shutdown(ShutdownReason.ReloadRequested())
    status = await service.start()
    assert status.reason == ExitReason.RequestedShutdown(ShutdownReason.ReloadRequested())
    assert node.calls == []
    assert status.report is not None
    outcomes = [(p.name, p.outcome) for p in status.report.phases]
    assert outcomes == [
        ("run", "skipped"),
        ("join", "ok"),
        ("on_stop", "skipped"),
        ("post_stop", "skipped"),
    ]


@pytest.mark.asyncio
async def test_context_variables_set_in_a_hook_are_seen_by_later_hooks() -> None:
    """Proves: the hooks share one ``contextvars`` context (a copy of the caller's), so a
    variable set in ``pre_start`` is visible in ``run``, and the caller's own context is
    left untouched.

    Catches: per-hook context copies silently dropping request/trace ids set at start-up.
    """
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="caller")
    seen: list[str] = []

    async def pre_start(ctx: StartContext) -> None:
        seen.append(var.get())
        var.set("set-in-pre_start")

    async def run(ctx: RunContext) -> None:
        seen.append(var.get())

    await Service(ScriptedNode(pre_start=pre_start, run=run)).start()
    assert seen == ["caller", "set-in-pre_start"]
    assert var.get() == "caller"


@pytest.mark.asyncio
async def test_phase_listener_sees_every_stage_in_order() -> None:
    """Proves: the private phase hook used by ``dig_service.run`` (READY=1 after
    ``on_start``, the shutdown display) reports every stage once, in lifecycle order.

    Catches: a renamed or skipped phase breaking systemd readiness in the runner, or a
    bare string where the ``Phase`` enum is promised (its ``.value`` is the stage's name).
    """
    phases: list[Phase] = []
    node = ScriptedNode()
    service = Service(node)
    service._add_phase_listener(phases.append)
    starting = asyncio.ensure_future(service.start())
    await node.run_started.wait()
    service.request_shutdown(ShutdownReason.UserRequested())
    await starting
    assert all(isinstance(phase, Phase) for phase in phases), phases
    assert [phase.value for phase in phases] == [
        "pre_start", "on_start", "run", "join", "on_stop", "post_stop", "exited"
    ]  # fmt: skip
    assert service._phase is Phase.EXITED
