"""Base classes and what ``Service(...)`` accepts.

Issue 3, bullet 1: ``NodeLifecycle``, ``PeerApi``, ``RpcApi`` with the
SPEC defaults; duck-typed nodes accepted; a hook that is not ``async def`` is
a ``TypeError`` at ``Service(...)``, naming the hook.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dig_service import (
    DisconnectReason,
    ExitReason,
    InboundMessage,
    JsonRpcError,
    NodeLifecycle,
    PeerApi,
    PeerInfo,
    RpcApi,
    RunContext,
    Service,
    ServiceConfig,
    ShutdownReason,
    ShutdownToken,
    StartContext,
    StopContext,
    TaskRegistry,
)

PEER = bytes(32)


# --------------------------------------------------------------------------- defaults


@pytest.mark.asyncio
async def test_node_lifecycle_defaults_edge_hooks_do_nothing_run_waits_for_the_token() -> None:
    """Proves: ``NodeLifecycle``'s edge hooks return ``None`` at once and its ``run``
    returns exactly when the token fires; ``NAME`` defaults to ``None``.

    Catches: a default ``run`` that returns at once (every service exits immediately
    as ``RunCompleted``) or that never returns.
    """
    node = NodeLifecycle()
    token = ShutdownToken()
    tasks = TaskRegistry(token)
    assert NodeLifecycle.NAME is None
    assert await node.pre_start(StartContext("", token, tasks)) is None
    assert await node.on_start(StartContext("", token, tasks)) is None
    stop_ctx = StopContext(token, tasks, ExitReason.RunCompleted())
    assert await node.on_stop(stop_ctx) is None
    assert await node.post_stop(stop_ctx) is None

    running = asyncio.ensure_future(node.run(RunContext(token, tasks)))
    done, _ = await asyncio.wait((running,), timeout=0.05)
    assert not done, "the default run must wait for the token"
    token.cancel(ShutdownReason.UserRequested())
    await asyncio.wait_for(running, timeout=2)


@pytest.mark.asyncio
async def test_peer_api_defaults_are_no_ops() -> None:
    """Proves: every ``PeerApi`` method accepts its arguments and returns ``None``.

    Catches: a default that raises (peer-less services crashing on the first message).
    """
    api = PeerApi()
    assert await api.on_message(PEER, InboundMessage(1, b"")) is None
    assert await api.on_peer_connected(PEER, PeerInfo(PEER, "1.2.3.4:5", "wallet")) is None
    assert await api.on_peer_disconnected(PEER, DisconnectReason.Graceful()) is None


@pytest.mark.asyncio
async def test_rpc_api_default_dispatch_is_method_not_found_and_healthz_succeeds() -> None:
    """Proves: the default ``dispatch`` raises ``JsonRpcError`` with code -32601 naming
    the method, and ``healthz`` succeeds.

    Catches: a wrong JSON-RPC code, or a default health probe that reports unhealthy.
    """
    api = RpcApi()
    with pytest.raises(JsonRpcError) as info:
        await api.dispatch("get_blocks", [1, 2])
    assert info.value.code == -32601 == JsonRpcError.METHOD_NOT_FOUND
    assert "get_blocks" in info.value.message
    assert await api.healthz() is None


def test_contexts_hold_their_fields_and_validate_them() -> None:
    """Proves: the contexts expose ``name``/``shutdown``/``tasks``/``exit_reason`` as
    given, are immutable, and reject a wrong type naming the field.

    Catches: a hook receiving a context whose token is not the service's.
    """
    token = ShutdownToken()
    tasks = TaskRegistry(token)
    start = StartContext("svc", token, tasks)
    assert (start.name, start.shutdown, start.tasks) == ("svc", token, tasks)
    run = RunContext(token, tasks)
    assert run.shutdown is token and run.tasks is tasks
    stop = StopContext(token, tasks, ExitReason.RunCompleted())
    assert stop.exit_reason == ExitReason.RunCompleted()
    with pytest.raises(AttributeError):
        start.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"`shutdown` must be a dig_service\.ShutdownToken"):
        RunContext(object(), tasks)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`exit_reason` must be a dig_service\.ExitReason"):
        StopContext(token, tasks, "done")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- duck typing


class DuckNode:
    """Not a NodeLifecycle subclass: five async methods are enough."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def pre_start(self, ctx: StartContext) -> None:
        self.calls.append("pre_start")

    async def on_start(self, ctx: StartContext) -> None:
        self.calls.append("on_start")

    async def run(self, ctx: RunContext) -> None:
        self.calls.append("run")

    async def on_stop(self, ctx: StopContext) -> None:
        self.calls.append("on_stop")

    async def post_stop(self, ctx: StopContext) -> None:
        self.calls.append("post_stop")


class DuckRpc:
    async def dispatch(self, method: str, params: object) -> object:
        return {"echo": params}

    async def healthz(self) -> None:
        return None


@pytest.mark.asyncio
async def test_duck_typed_node_and_apis_are_accepted() -> None:
    """Proves: an object that merely has the hooks as ``async def`` methods runs the full
    lifecycle; a duck-typed RPC API is accepted and kept; an unnamed node's handle name
    is ``""``.

    Catches: an ``isinstance(node, NodeLifecycle)`` check that rejects valid nodes.
    """
    node = DuckNode()
    rpc = DuckRpc()
    service = Service(node, rpc_api=rpc)
    assert service.rpc_api is rpc and service.peer_api is None
    status = await service.start()
    assert status.reason == ExitReason.RunCompleted()
    assert node.calls == ["pre_start", "on_start", "run", "on_stop", "post_stop"]
    assert service.handle().name() == ""


# --------------------------------------------------------------------------- misuse at Service(...)


@pytest.mark.parametrize("hook", ["pre_start", "on_start", "run", "on_stop", "post_stop"])
def test_sync_hook_is_a_type_error_at_construction_naming_the_hook(hook: str) -> None:
    """Proves: a node hook declared with ``def`` instead of ``async def`` is rejected by
    ``Service(...)`` with a ``TypeError`` naming ``Class.hook`` and showing the fix.

    Catches: the mistake surfacing only at start-up (``object NoneType can't be used
    in 'await' expression``) far from where it was made.
    """

    def sync_hook(self: Any, ctx: Any) -> None:
        return None

    node_cls = type("SyncNode", (NodeLifecycle,), {hook: sync_hook})
    with pytest.raises(TypeError) as info:
        Service(node_cls())
    message = str(info.value)
    assert f"SyncNode.{hook}" in message
    assert "async def" in message and "plain (synchronous) function" in message


@pytest.mark.parametrize(
    ("slot", "method"),
    [("peer_api", "on_message"), ("rpc_api", "dispatch"), ("rpc_api", "healthz")],
)
def test_sync_api_method_is_a_type_error_naming_it(slot: str, method: str) -> None:
    """Proves: a peer/RPC API method that is not ``async def`` is rejected the same way,
    naming the slot and the method.

    Catches: a sync ``dispatch`` crashing the RPC server on the first request.
    """
    base = PeerApi if slot == "peer_api" else RpcApi
    api = type("BadApi", (base,), {method: lambda self, *args: None})()
    with pytest.raises(TypeError, match=rf"BadApi\.{method}` of `{slot}` must be an `async def`"):
        Service(NodeLifecycle(), **{slot: api})


def test_missing_hook_on_a_duck_typed_node_is_a_type_error_with_the_fix() -> None:
    """Proves: a duck-typed node lacking a hook is rejected naming the hook and
    suggesting ``NodeLifecycle`` (to inherit the defaults).

    Catches: a typo'd hook name (``on_strat``) silently never called.
    """

    class Partial:
        async def run(self, ctx: RunContext) -> None: ...

    with pytest.raises(
        TypeError, match=r"has no `pre_start` method; subclass dig_service\.NodeLifecycle"
    ):
        Service(Partial())  # type: ignore[type-var]


def test_passing_a_class_instead_of_an_instance_is_a_type_error() -> None:
    """Proves: ``Service(MyNode)`` (the class) is rejected with the corrected call.

    Catches: unbound hooks failing at start-up with a confusing missing-argument error.
    """
    with pytest.raises(
        TypeError, match=r"got the class NodeLifecycle; write Service\(\.\.\., NodeLifecycle\(\)"
    ):
        Service(NodeLifecycle)  # type: ignore[arg-type]


def test_bad_name_and_config_are_type_errors_naming_them() -> None:
    """Proves: a non-str ``NAME`` and a ``config`` that is not a ``ServiceConfig`` are
    rejected at construction, naming ``NAME`` / ``config``.

    Catches: a dict passed as config being ignored (defaults used silently).
    """
    node_cls = type("Numbered", (NodeLifecycle,), {"NAME": 7})
    with pytest.raises(TypeError, match=r"`Numbered\.NAME` must be str or None"):
        Service(node_cls())
    with pytest.raises(TypeError, match=r"`config` must be a dig_service\.ServiceConfig"):
        Service(NodeLifecycle(), config={"shutdown_deadline": 1})  # type: ignore[arg-type]
    assert Service(NodeLifecycle(), config=ServiceConfig(1.0)).config == ServiceConfig(1.0)


def test_async_callable_objects_count_as_async_hooks() -> None:
    """Proves: a hook that is an object with ``async def __call__`` (or an AsyncMock) is
    accepted as an async hook.

    Catches: over-strict checking that rejects legitimate async callables used in tests.
    """
    from unittest.mock import AsyncMock

    class AsyncCallable:
        async def __call__(self, ctx: Any) -> None: ...

    node = NodeLifecycle()
    node.pre_start = AsyncCallable()  # type: ignore[method-assign]
    node.post_stop = AsyncMock()  # type: ignore[method-assign]
    Service(node)
