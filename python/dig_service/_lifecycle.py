"""What a service author implements: the node, the peer API, the RPC API.

- :class:`NodeLifecycle`: the business core with five async hooks. Every
  hook has a default (the four edge hooks do nothing; ``run`` waits for the
  shutdown token), so a node overrides only what it needs. Any object with
  the five hooks as ``async def`` methods is accepted too (duck typing).
- :class:`PeerApi`: the peer-protocol dispatcher; every method is a no-op.
- :class:`RpcApi`: the JSON-RPC dispatcher; ``dispatch`` answers "method not
  found" (``JsonRpcError`` code -32601) and ``healthz`` succeeds.

The contexts (:class:`StartContext`, :class:`RunContext`,
:class:`StopContext`) hand each hook the service's shutdown token and task
registry. *When* each hook runs is the contract of ``Service.start``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Final, Protocol, final

from ._core import ShutdownToken, TaskRegistry
from ._exit import ExitReason
from ._wire import DisconnectReason, InboundMessage, JsonRpcError, PeerInfo

__all__ = [
    "NODE_HOOKS",
    "PEER_API_METHODS",
    "RPC_API_METHODS",
    "NodeLifecycle",
    "NodeLike",
    "PeerApi",
    "PeerApiLike",
    "RpcApi",
    "RpcApiLike",
    "RunContext",
    "StartContext",
    "StopContext",
    "trusted_run_context",
    "trusted_start_context",
    "trusted_stop_context",
]

NODE_HOOKS: Final = ("pre_start", "on_start", "run", "on_stop", "post_stop")
"""The node hooks, in the order ``Service.start`` calls them."""

PEER_API_METHODS: Final = ("on_message", "on_peer_connected", "on_peer_disconnected")
"""The async methods of a peer API."""

RPC_API_METHODS: Final = ("dispatch", "healthz")
"""The async methods of an RPC API."""


def _check(value: object, expected: type, owner: str, field: str) -> None:
    if not isinstance(value, expected):
        raise TypeError(
            f"{owner}: `{field}` must be a dig_service.{expected.__name__}, "
            f"got {type(value).__name__}"
        )


# The contexts are immutable records; they compare by identity (eq=False),
# as the service hands each hook its own.


@final
@dataclass(frozen=True, slots=True, eq=False)
class StartContext:
    """What ``pre_start`` and ``on_start`` receive.

    Attributes:
        name: the service name (the node's ``NAME``, or ``""`` if it has none).
        shutdown: the service's shutdown token; hand it to background work.
        tasks: the service's task registry; spawn background loops here so
            that they are joined at shutdown.
    """

    name: str
    shutdown: ShutdownToken
    tasks: TaskRegistry

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"StartContext: `name` must be str, got {type(self.name).__name__}")
        _check(self.shutdown, ShutdownToken, "StartContext", "shutdown")
        _check(self.tasks, TaskRegistry, "StartContext", "tasks")


@final
@dataclass(frozen=True, slots=True, eq=False)
class RunContext:
    """What ``run`` receives.

    Attributes:
        shutdown: the service's shutdown token; ``run`` should return once it fires.
        tasks: the service's task registry.
    """

    shutdown: ShutdownToken
    tasks: TaskRegistry

    def __post_init__(self) -> None:
        _check(self.shutdown, ShutdownToken, "RunContext", "shutdown")
        _check(self.tasks, TaskRegistry, "RunContext", "tasks")


@final
@dataclass(frozen=True, slots=True, eq=False)
class StopContext:
    """What ``on_stop`` and ``post_stop`` receive.

    Attributes:
        shutdown: the service's shutdown token (fired by now).
        tasks: the service's task registry (joined and closed by now; for inspection).
        exit_reason: why the service is stopping (``ExitReason.RunError`` carries
            the ``run`` error, or the ``on_start`` error when ``on_start`` failed).
    """

    shutdown: ShutdownToken
    tasks: TaskRegistry
    exit_reason: ExitReason

    def __post_init__(self) -> None:
        _check(self.shutdown, ShutdownToken, "StopContext", "shutdown")
        _check(self.tasks, TaskRegistry, "StopContext", "tasks")
        _check(self.exit_reason, ExitReason, "StopContext", "exit_reason")


# The contexts made without their checks, for ``Service``, which passes its own name,
# token, registry and exit reason (the types the checks would find), once a start: each
# field set through its slot's own setter (a dataclass ``__init__`` with its
# ``__post_init__`` checks, or ``object.__setattr__`` by name, cost about three times as
# much), one function a class, unrolled (a loop over ``zip`` of setters and values costs
# twice the unrolled calls).

_new: Final = object.__new__
_SetField = Callable[[object, object], None]
_set_start_name: Final[_SetField] = StartContext.__dict__["name"].__set__
_set_start_shutdown: Final[_SetField] = StartContext.__dict__["shutdown"].__set__
_set_start_tasks: Final[_SetField] = StartContext.__dict__["tasks"].__set__
_set_run_shutdown: Final[_SetField] = RunContext.__dict__["shutdown"].__set__
_set_run_tasks: Final[_SetField] = RunContext.__dict__["tasks"].__set__
_set_stop_shutdown: Final[_SetField] = StopContext.__dict__["shutdown"].__set__
_set_stop_tasks: Final[_SetField] = StopContext.__dict__["tasks"].__set__
_set_stop_exit_reason: Final[_SetField] = StopContext.__dict__["exit_reason"].__set__


def trusted_start_context(name: str, shutdown: ShutdownToken, tasks: TaskRegistry) -> StartContext:
    """``StartContext(name, shutdown, tasks)`` without its checks (see above)."""
    ctx: StartContext = _new(StartContext)
    _set_start_name(ctx, name)
    _set_start_shutdown(ctx, shutdown)
    _set_start_tasks(ctx, tasks)
    return ctx


def trusted_run_context(shutdown: ShutdownToken, tasks: TaskRegistry) -> RunContext:
    """``RunContext(shutdown, tasks)`` without its checks (see above)."""
    ctx: RunContext = _new(RunContext)
    _set_run_shutdown(ctx, shutdown)
    _set_run_tasks(ctx, tasks)
    return ctx


def trusted_stop_context(
    shutdown: ShutdownToken, tasks: TaskRegistry, exit_reason: ExitReason
) -> StopContext:
    """``StopContext(shutdown, tasks, exit_reason)`` without its checks (see above)."""
    ctx: StopContext = _new(StopContext)
    _set_stop_shutdown(ctx, shutdown)
    _set_stop_tasks(ctx, tasks)
    _set_stop_exit_reason(ctx, exit_reason)
    return ctx


class NodeLifecycle:
    """The business core of a service: subclass it and override the hooks you need.

    ``Service.start()`` calls the hooks in the order
    ``pre_start → on_start → run → on_stop → post_stop``; which hook runs
    after which failure is the contract of ``Service.start``. Every hook must
    be an ``async def`` (checked when the ``Service`` is built).

    Attributes:
        NAME: a static name for logs and ``ServiceHandle.name()``; ``None`` for none.
    """

    NAME: ClassVar[str | None] = None

    async def pre_start(self, ctx: StartContext) -> None:
        """Before the servers bind: open stores, replay journals. Default: nothing."""

    async def on_start(self, ctx: StartContext) -> None:
        """After the servers bind, before ``run``: announce, warm caches. Default: nothing."""

    async def run(self, ctx: RunContext) -> None:
        """The main loop. Return once ``ctx.shutdown`` fires (or when the work is done);
        raise on a fatal error. Default: wait for the shutdown token."""
        await ctx.shutdown.cancelled()

    async def on_stop(self, ctx: StopContext) -> None:
        """After ``run`` and the task join: flush stores, write snapshots.
        Its failure does not stop ``post_stop``. Default: nothing."""

    async def post_stop(self, ctx: StopContext) -> None:
        """The last hook: close stores, release locks. Also runs after a failed
        ``on_start``. Default: nothing."""


class PeerApi:
    """The peer-protocol dispatcher. Every method is a no-op by default.

    ``Service(node, peer_api=None)`` uses a plain ``PeerApi()``.
    """

    async def on_message(self, peer: bytes, msg: InboundMessage) -> None:
        """An inbound message from a connected peer. Default: ignored."""

    async def on_peer_connected(self, peer: bytes, info: PeerInfo) -> None:
        """A peer connected (after the handshake). Default: ignored."""

    async def on_peer_disconnected(self, peer: bytes, reason: DisconnectReason) -> None:
        """A peer disconnected. Default: ignored."""


class RpcApi:
    """The JSON-RPC dispatcher.

    Override :meth:`dispatch` to serve methods; raise :class:`JsonRpcError`
    to answer with an error. ``Service(node, rpc_api=None)`` uses a plain
    ``RpcApi()``, which answers every method with "method not found".
    """

    async def dispatch(self, method: str, params: object) -> object:
        """Handle one request and return its (JSON-serialisable) result.

        Default: raise ``JsonRpcError(-32601, "method not found: ...")``.
        """
        raise JsonRpcError.method_not_found(method)

    async def healthz(self) -> None:
        """A health probe: return if healthy, raise ``JsonRpcError`` if not. Default: healthy."""


class NodeLike(Protocol):
    """What ``Service`` needs of a node (``NodeLifecycle`` or any duck-typed object)."""

    async def pre_start(self, ctx: StartContext, /) -> object: ...
    async def on_start(self, ctx: StartContext, /) -> object: ...
    async def run(self, ctx: RunContext, /) -> object: ...
    async def on_stop(self, ctx: StopContext, /) -> object: ...
    async def post_stop(self, ctx: StopContext, /) -> object: ...


class PeerApiLike(Protocol):
    """What ``Service`` needs of a peer API (``PeerApi`` or any duck-typed object)."""

    async def on_message(self, peer: bytes, msg: InboundMessage, /) -> object: ...
    async def on_peer_connected(self, peer: bytes, info: PeerInfo, /) -> object: ...
    async def on_peer_disconnected(self, peer: bytes, reason: DisconnectReason, /) -> object: ...


class RpcApiLike(Protocol):
    """What ``Service`` needs of an RPC API (``RpcApi`` or any duck-typed object)."""

    async def dispatch(self, method: str, params: object, /) -> object: ...
    async def healthz(self) -> object: ...
