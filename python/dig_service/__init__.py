"""dig_service: the service scaffold every DIG Network process stands on.

A node with five async lifecycle hooks, optional peer and RPC APIs, ordered
start-up and shut-down, a registry of named background tasks (asyncio and
tokio) joined under a deadline, a broadcast ``ShutdownToken`` with a typed
``ShutdownReason``, a ``ServiceHandle`` usable from anywhere, and an
``ExitStatus`` an operator can trust::

    import asyncio
    from dig_service import NodeLifecycle, RunContext, Service

    class Node(NodeLifecycle):
        NAME = "hello"

        async def run(self, ctx: RunContext) -> None:
            await ctx.shutdown.cancelled()

    asyncio.run(Service(Node()).start())

``import dig_service`` is cheap: it starts no thread and imports neither
asyncio nor the native core; each name is loaded on first use.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._config import ServiceConfig
    from ._core import (
        KindStats,
        Restart,
        RestartPolicy,
        ShutdownReason,
        ShutdownToken,
        SupervisedHandle,
        TaskHandle,
        TaskKind,
        TaskRegistry,
        TaskStats,
        TaskSummary,
    )
    from ._errors import (
        AlreadyRunning,
        AlreadyStopped,
        OnStartFailed,
        OnStopFailed,
        PreStartFailed,
        RunFailed,
        ServiceError,
        ShutdownDeadlineExceeded,
    )
    from ._exit import ExitReason, ExitStatus
    from ._handle import ServiceHandle
    from ._lifecycle import (
        NodeLifecycle,
        PeerApi,
        RpcApi,
        RunContext,
        StartContext,
        StopContext,
    )
    from ._report import PhaseReport, ShutdownReport, StragglerReport
    from ._runner import run
    from ._service import Service
    from ._wire import DisconnectReason, InboundMessage, JsonRpcError, PeerInfo

__all__ = [
    "AlreadyRunning",
    "AlreadyStopped",
    "DisconnectReason",
    "ExitReason",
    "ExitStatus",
    "InboundMessage",
    "JsonRpcError",
    "KindStats",
    "NodeLifecycle",
    "OnStartFailed",
    "OnStopFailed",
    "PeerApi",
    "PeerInfo",
    "PhaseReport",
    "PreStartFailed",
    "Restart",
    "RestartPolicy",
    "RpcApi",
    "RunContext",
    "RunFailed",
    "Service",
    "ServiceConfig",
    "ServiceError",
    "ServiceHandle",
    "ShutdownDeadlineExceeded",
    "ShutdownReason",
    "ShutdownReport",
    "ShutdownToken",
    "StartContext",
    "StopContext",
    "StragglerReport",
    "SupervisedHandle",
    "TaskHandle",
    "TaskKind",
    "TaskRegistry",
    "TaskStats",
    "TaskSummary",
    "run",
]

# Where each public name lives; loaded on first access (PEP 562).
_LAZY: dict[str, str] = {
    "KindStats": "_core",
    "Restart": "_core",
    "RestartPolicy": "_core",
    "SupervisedHandle": "_core",
    "ShutdownReason": "_core",
    "ShutdownToken": "_core",
    "TaskHandle": "_core",
    "TaskKind": "_core",
    "TaskRegistry": "_core",
    "TaskStats": "_core",
    "TaskSummary": "_core",
    "AlreadyRunning": "_errors",
    "AlreadyStopped": "_errors",
    "OnStartFailed": "_errors",
    "OnStopFailed": "_errors",
    "PreStartFailed": "_errors",
    "RunFailed": "_errors",
    "ServiceError": "_errors",
    "ShutdownDeadlineExceeded": "_errors",
    "ExitReason": "_exit",
    "ExitStatus": "_exit",
    "NodeLifecycle": "_lifecycle",
    "PeerApi": "_lifecycle",
    "RpcApi": "_lifecycle",
    "RunContext": "_lifecycle",
    "StartContext": "_lifecycle",
    "StopContext": "_lifecycle",
    "Service": "_service",
    "ServiceConfig": "_config",
    "ServiceHandle": "_handle",
    "PhaseReport": "_report",
    "ShutdownReport": "_report",
    "StragglerReport": "_report",
    "DisconnectReason": "_wire",
    "InboundMessage": "_wire",
    "JsonRpcError": "_wire",
    "PeerInfo": "_wire",
    "run": "_runner",
}

if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'dig_service' has no attribute {name!r}")
        from importlib import import_module

        value = getattr(import_module(f"{__name__}.{module}"), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(globals()) | set(__all__))
