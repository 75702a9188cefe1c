"""The ``ServiceError`` family, defined by the native module ``dig_service._core``.

This source is compiled into ``_core`` when it is imported (``errors.rs``):
the classes are ``_core``'s own (``__module__`` is ``dig_service._core``), so
``_core`` raises them without importing anything from the Python package,
and ``dig_service`` re-exports them (``dig_service._errors``). It imports
nothing but the standard library.

Every error a ``Service`` raises is a ``ServiceError``. When a hook or task
failed, the original exception is chained as ``__cause__`` (with its
traceback), never re-formatted into a new message.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AlreadyRunning",
    "AlreadyStopped",
    "OnStartFailed",
    "OnStopFailed",
    "PreStartFailed",
    "RunFailed",
    "ServiceError",
    "ShutdownDeadlineExceeded",
]


class ServiceError(Exception):
    """Base class of every error raised by a ``Service`` or its ``TaskRegistry``.

    Attributes:
        report: the ``dig_service.ShutdownReport`` of the shutdown this error
            ended, set by ``Service.start()`` whenever a shutdown began;
            ``None`` otherwise (a ``pre_start`` failure, ``AlreadyRunning``,
            an error of ``TaskRegistry.join_all``).
    """

    report: object = None


class PreStartFailed(ServiceError):
    """``pre_start`` raised (or timed out); no later hook ran."""


class OnStartFailed(ServiceError):
    """``on_start`` raised (or timed out); ``post_stop`` ran, ``run`` and ``on_stop`` did not."""


class RunFailed(ServiceError):
    """``run`` raised; tasks were joined and ``on_stop`` and ``post_stop`` still ran."""


class OnStopFailed(ServiceError):
    """``on_stop`` or ``post_stop`` raised (or timed out); the later hook still ran."""


class AlreadyRunning(ServiceError):
    """``start()`` was called on a service that was already started.

    A ``Service`` is single-shot: build a new one to start again.
    """


class AlreadyStopped(ServiceError):
    """The task registry is closed (``join_all`` has finished): nothing more can be spawned."""


class ShutdownDeadlineExceeded(ServiceError):
    """Tracked tasks were still running when the shutdown deadline passed.

    They were cancelled (Python tasks) or aborted (native tasks).

    Attributes:
        deadline: the deadline, in seconds.
        pending: how many tasks were still running when it passed.
        pending_names: their names.
    """

    deadline: float
    pending: int
    pending_names: list[str]

    def __init__(self, deadline: float, pending: int, pending_names: Sequence[str]) -> None:
        names = list(pending_names)
        shown = ", ".join(names[:20]) + (
            f", ... ({len(names) - 20} more)" if len(names) > 20 else ""
        )
        super().__init__(
            f"shutdown deadline of {deadline:g}s exceeded; {pending} task(s) still running: {shown}"
        )
        self.deadline = deadline
        self.pending = pending
        self.pending_names = names

    def __reduce__(self) -> tuple[type[ShutdownDeadlineExceeded], tuple[float, int, list[str]]]:
        return (type(self), (self.deadline, self.pending, self.pending_names))
