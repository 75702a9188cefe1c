"""The ``ServiceError`` family, and how errors are described in messages.

The classes are defined by the native core (``dig_service._core``, which
raises them itself without importing this package) and re-exported here:
``dig_service.ServiceError`` is ``dig_service._core.ServiceError``.

Every error a ``Service`` raises is a ``ServiceError``. When a hook or task
failed, the original exception is chained as ``__cause__`` (with its
traceback), never re-formatted into a new message.
"""

from __future__ import annotations

from ._core import (
    AlreadyRunning,
    AlreadyStopped,
    OnStartFailed,
    OnStopFailed,
    PreStartFailed,
    RunFailed,
    ServiceError,
    ShutdownDeadlineExceeded,
)

__all__ = [
    "AlreadyRunning",
    "AlreadyStopped",
    "OnStartFailed",
    "OnStopFailed",
    "PreStartFailed",
    "RunFailed",
    "ServiceError",
    "ShutdownDeadlineExceeded",
    "describe_exc",
]


def describe_exc(exc: BaseException) -> str:
    """``"TypeName: message"`` (or just ``"TypeName"`` when the message is empty), as
    every message of the package that names a failure writes it."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
