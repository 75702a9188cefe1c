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
_get_lookup_and_hooks: Final = operator.attrgetter("__getattribute__", *NODE_HOOKS)
_HOOK_NAMES: Final = frozenset(NODE_HOOKS)

_CHECKED_NODE_TYPES: Final[dict[int, tuple[weakref.ref[type], tuple[object, ...]]]] = {}
"""Node classes whose hooks passed the check, by ``id``: a weak reference to the class
(what tells it from a later class at the same address) and its ``__getattribute__`` and
hook objects that passed. A node of such a class whose hooks are still those objects
(looked up on the class, not shadowed by the instance) needs no new check
(``Service(...)`` is made once a start). Weak: an entry goes with its class (a callback
of the reference), so a class made per service is not kept. A plain ``dict`` looked up
by ``id`` is a C call, where a ``WeakKeyDictionary.get`` is a Python one that makes a new
weak reference to look up each time."""


def _class_hooks(node: object, cls: type) -> tuple[object, ...] | None:
    """``cls.__getattribute__`` followed by the node's hooks as its class ``cls`` defines
    them, if that is where its attribute lookup finds them (no instance attribute of
    that name, no ``__getattribute__`` of its own); else ``None``."""
    try:
        found: tuple[object, ...] = _get_lookup_and_hooks(cls)
    except AttributeError:
        return None
    if found[0] is not _OBJECT_GETATTRIBUTE:
        return None
    own = getattr(node, "__dict__", None)
    if own and not _HOOK_NAMES.isdisjoint(own):  # a set's lookups, not a tuple's scans
        return None
    return found


def _remember(cls: type, found: tuple[object, ...]) -> None:
    """Record that ``cls``, with ``found`` as its lookup and hooks, passed the check."""
    key = id(cls)

    def forget(ref: weakref.ref[type]) -> None:
        entry = _CHECKED_NODE_TYPES.get(key)
        if entry is not None and entry[0] is ref:
            del _CHECKED_NODE_TYPES[key]

    _CHECKED_NODE_TYPES[key] = (weakref.ref(cls, forget), found)


def check_node(node: object) -> str | None:
    """Check ``node``'s hooks and ``NAME``; return its ``NAME``."""
    cls = type(node)
    found = _class_hooks(node, cls)
    entry = None if found is None else _CHECKED_NODE_TYPES.get(id(cls))
    if entry is None or entry[0]() is not cls or entry[1] != found:
        _check_async_methods(node, NODE_HOOKS, "node", "NodeLifecycle", _NODE_SIGNATURES)
        if found is not None:
            _remember(cls, found)
    name = getattr(node, "NAME", None)
    if name is not None and not isinstance(name, str):
        raise TypeError(
            f"Service(): `{cls.__name__}.NAME` must be str or None, got {type(name).__name__}"
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
