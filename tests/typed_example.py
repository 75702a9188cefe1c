"""A typed service, checked by ``mypy --strict`` (see ``test_package.py``).

Not a test module: it shows (and pins) what the type checker infers for a
``Service[MyNode, None, MyRpc]``. ``reveal_type`` lines are checked by the test
through mypy's output; at runtime ``main()`` runs the service once.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from dig_service import (
    DisconnectReason,
    ExitReason,
    ExitStatus,
    JsonRpcError,
    NodeLifecycle,
    RpcApi,
    RunContext,
    Service,
    ServiceConfig,
    ServiceHandle,
    ShutdownReason,
    StartContext,
    TaskKind,
)


class MyNode(NodeLifecycle):
    NAME = "typed"

    def __init__(self) -> None:
        self.ticks = 0

    async def on_start(self, ctx: StartContext) -> None:
        ctx.tasks.spawn("ticker", TaskKind.BackgroundLoop, self.tick(ctx))

    async def tick(self, ctx: StartContext) -> None:
        while not ctx.shutdown.is_cancelled():
            self.ticks += 1
            await asyncio.sleep(0.001)

    async def run(self, ctx: RunContext) -> None:
        await ctx.shutdown.cancelled()


class MyRpc(RpcApi):
    def __init__(self, node: MyNode) -> None:
        self.node = node

    async def dispatch(self, method: str, params: object) -> object:
        if method == "ticks":
            return self.node.ticks
        raise JsonRpcError.method_not_found(method)


def describe(reason: ExitReason) -> str:
    match reason:
        case ExitReason.RequestedShutdown(ShutdownReason.Fatal(message)):
            return f"fatal: {message}"
        case ExitReason.RequestedShutdown(why):
            return f"stopped: {why}"
        case ExitReason.RunCompleted():
            return "done"
        case ExitReason.RunError(error):
            return f"crashed: {error!r}"
    return "unknown"


def disconnect_text(reason: DisconnectReason) -> str:
    match reason:
        case DisconnectReason.Transport(message) | DisconnectReason.ProtocolViolation(message):
            return message
        case _:
            return str(reason)


async def main() -> int:
    node = MyNode()
    service: Service[MyNode, None, MyRpc] = Service(
        node, rpc_api=MyRpc(node), config=ServiceConfig(shutdown_deadline=5)
    )
    handle: ServiceHandle = service.handle()
    starting = asyncio.ensure_future(service.start())
    ticks = await service.rpc_api.dispatch("ticks", None)
    handle.request_shutdown(ShutdownReason.RpcRequested())
    status: ExitStatus = await starting
    assert isinstance(ticks, int)
    if TYPE_CHECKING:
        reveal_type(service.node)  # noqa: F821
        reveal_type(service.peer_api)  # noqa: F821
        reveal_type(service.rpc_api)  # noqa: F821
    print(describe(status.reason))
    return status.exit_code


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
