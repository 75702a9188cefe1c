"""What ``Service(...)`` checks of the objects it is given, before anything runs.

A node must have the five hooks, a peer API and an RPC API their methods,
each as an ``async def`` (or an object whose class defines ``async def
__call__``); the node's ``NAME`` must be a ``str`` or ``None``. A mistake is
a ``TypeError`` that names the slot, the hook and what was found, and shows
the signature to declare.
"""

from __future__ import annotations

import inspect
import operator
import weakref
from typing import Final

from ._lifecycle import NODE_HOOKS, PEER_API_METHODS, RPC_API_METHODS

__all__ = ["check_node", "check_peer_api", "check_rpc_api"]

_NODE_SIGNATURES: Final = {
    "pre_start": "self, ctx: StartContext",
    "on_start": "self, ctx: StartContext",
    "run": "self, ctx: RunContext",
    "on_stop": "self, ctx: StopContext",
    "post_stop": "self, ctx: StopContext",
}
_PEER_SIGNATURES: Final = {
    "on_message": "self, peer: bytes, msg: InboundMessage",
    "on_peer_connected": "self, peer: bytes, info: PeerInfo",
    "on_peer_disconnected": "self, peer: bytes, reason: DisconnectReason",
}
_RPC_SIGNATURES: Final = {
    "dispatch": "self, method: str, params: object",
    "healthz": "self",
}


_OBJECT_GETATTRIBUTE: Final = object.__getattribute__
_get_hooks: Final = operator.attrgetter(*NODE_HOOKS)

_CHECKED_NODE_TYPES: Final[weakref.WeakKeyDictionary[type, tuple[object, ...]]] = (
    weakref.WeakKeyDictionary()
)
"""Node classes whose hooks passed the check, with the hook objects that passed: a node
of such a class whose hooks are still those objects (looked up on the class, not shadowed
by the instance) needs no new check (``Service(...)`` is made once a start)."""


def _class_hooks(node: object) -> tuple[object, ...] | None:
    """The node's hooks as its class defines them, if that is where its attribute lookup
    finds them (no instance attribute of that name, no ``__getattribute__`` of its own);
    else ``None``."""
    cls = type(node)
    if cls.__getattribute__ is not _OBJECT_GETATTRIBUTE:
        return None
    own = getattr(node, "__dict__", None)
    if own and not own.keys().isdisjoint(NODE_HOOKS):
        return None
    try:
        hooks: tuple[object, ...] = _get_hooks(cls)
    except AttributeError:
        return None
    return hooks


def check_node(node: object) -> str | None:
    """Check ``node``'s hooks and ``NAME``; return its ``NAME``."""
    hooks = _class_hooks(node)
    if hooks is None or _CHECKED_NODE_TYPES.get(type(node)) != hooks:
        _check_async_methods(node, NODE_HOOKS, "node", "NodeLifecycle", _NODE_SIGNATURES)
        if hooks is not None:
            _CHECKED_NODE_TYPES[type(node)] = hooks
    name = getattr(node, "NAME", None)
    if name is not None and not isinstance(name, str):
        raise TypeError(
            f"Service(): `{type(node).__name__}.NAME` must be str or None, "
            f"got {type(name).__name__}"
        )
    return name


def check_peer_api(api: object) -> None:
    """Check the methods of a peer API."""
    _check_async_methods(api, PEER_API_METHODS, "peer_api", "PeerApi", _PEER_SIGNATURES)


def check_rpc_api(api: object) -> None:
    """Check the methods of an RPC API."""
    _check_async_methods(api, RPC_API_METHODS, "rpc_api", "RpcApi", _RPC_SIGNATURES)


def _is_async_callable(fn: object) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    # An object whose class defines `async def __call__`.
    if not (inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isbuiltin(fn)):
        return inspect.iscoroutinefunction(inspect.getattr_static(type(fn), "__call__", None))
    return False


def _describe(fn: object) -> str:
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        return "a generator function"
    if inspect.isfunction(fn) or inspect.ismethod(fn):
        return "a plain (synchronous) function"
    if callable(fn):
        return f"a non-async callable ({type(fn).__name__})"
    return f"{type(fn).__name__}, which is not callable"


def _check_async_methods(
    obj: object, methods: tuple[str, ...], slot: str, base: str, signature: dict[str, str]
) -> None:
    owner = type(obj).__name__
    if isinstance(obj, type):
        raise TypeError(
            f"Service(): `{slot}` must be an instance, got the class {obj.__name__}; "
            f"write Service(..., {obj.__name__}(), ...)"
        )
    for name in methods:
        fn = getattr(obj, name, None)
        if fn is None:
            raise TypeError(
                f"Service(): `{slot}` ({owner}) has no `{name}` method; subclass "
                f"dig_service.{base} to inherit the default, or define "
                f"`async def {name}({signature[name]})`"
            )
        if not _is_async_callable(fn):
            raise TypeError(
                f"Service(): hook `{owner}.{name}` of `{slot}` must be an `async def` "
                f"coroutine function, got {_describe(fn)}; declare it as "
                f"`async def {name}({signature[name]}): ...`"
            )
