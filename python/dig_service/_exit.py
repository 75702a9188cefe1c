"""How a service ended: ``ExitReason`` and ``ExitStatus``.

``ExitStatus`` is what ``Service.start()`` returns when the lifecycle ran to
its end without a ``ServiceError``. Its classification is the one every
binary and orchestrator relies on: :meth:`ExitStatus.is_graceful` is
``False`` exactly for ``ExitReason.RunError`` and for a requested shutdown
whose reason is ``ShutdownReason.Fatal``; :attr:`ExitStatus.exit_code` is
derived from it (``0`` or ``1``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeAlias, final

from ._core import ShutdownReason
from ._report import ShutdownReport
from ._variant import Variant, publish_variants

__all__ = ["ExitReason", "ExitStatus", "check_reason", "trusted_requested", "trusted_status"]


def check_reason(reason: object, owner: str) -> ShutdownReason:
    """``reason`` if it is a ``ShutdownReason``, else a ``TypeError`` naming ``owner``'s
    ``reason`` parameter (the one check of the Python layer; the core checks its own)."""
    if not isinstance(reason, ShutdownReason):
        raise TypeError(
            f"{owner}: `reason` must be a dig_service.ShutdownReason "
            f"(e.g. ShutdownReason.UserRequested()), got {type(reason).__name__}"
        )
    return reason


class ExitReason:
    """Why a service's lifecycle ended.

    Variants:

    - ``ExitReason.RequestedShutdown(reason)``: the shutdown token fired
      (from outside ``run``, or by ``run`` itself) and ``run`` returned;
      carries the token's ``ShutdownReason``.
    - ``ExitReason.RunCompleted()``: ``run`` returned while the token had
      not fired; the service then cancelled the token with
      ``ShutdownReason.RequestedByRun()`` so that tasks wind down.
    - ``ExitReason.RunError(error)``: ``run`` raised ``error`` (the very
      exception object). ``on_stop``/``post_stop`` see it through
      ``StopContext.exit_reason``; ``post_stop`` also sees it, carrying the
      ``on_start`` error, when ``on_start`` failed.

    Variants are immutable, compare by value and work with ``match``.
    ``ExitReason`` itself cannot be instantiated.
    """

    __slots__ = ()

    if TYPE_CHECKING:
        RequestedShutdown: TypeAlias = "_RequestedShutdown"
        RunCompleted: TypeAlias = "_RunCompleted"
        RunError: TypeAlias = "_RunError"

    def __new__(cls, *args: object, **kwargs: object) -> ExitReason:
        if cls is ExitReason:
            raise TypeError(
                "ExitReason cannot be instantiated; use a variant, e.g. "
                "ExitReason.RunCompleted() or "
                "ExitReason.RequestedShutdown(ShutdownReason.UserRequested())"
            )
        return super().__new__(cls)


@final
class _RequestedShutdown(Variant, ExitReason):
    """The shutdown token fired and ``run`` returned; ``reason`` is the token's."""

    __slots__ = ("reason",)
    __match_args__ = ("reason",)
    reason: ShutdownReason

    def __init__(self, reason: ShutdownReason) -> None:
        self._init_fields(check_reason(reason, "ExitReason.RequestedShutdown"))

    def __str__(self) -> str:
        return f"shutdown requested ({self.reason})"


@final
class _RunCompleted(Variant, ExitReason):
    """``run`` returned by itself while the token had not fired."""

    __slots__ = ()

    def __init__(self) -> None:
        pass

    def __str__(self) -> str:
        return "run completed"


@final
class _RunError(Variant, ExitReason):
    """``run`` raised ``error`` (kept as is, with its traceback)."""

    __slots__ = ("error",)
    __match_args__ = ("error",)
    error: BaseException

    def __init__(self, error: BaseException) -> None:
        if not isinstance(error, BaseException):
            raise TypeError(
                "ExitReason.RunError: `error` must be an exception instance, "
                f"got {type(error).__name__}"
            )
        self._init_fields(error)

    def __str__(self) -> str:
        return f"run failed: {type(self.error).__name__}: {self.error}"


publish_variants(
    ExitReason,
    RequestedShutdown=_RequestedShutdown,
    RunCompleted=_RunCompleted,
    RunError=_RunError,
)


@final
class ExitStatus:
    """The final status of a service whose lifecycle ran to its end.

    Args:
        reason: why the service exited (an ``ExitReason`` variant).
        report: the ``ShutdownReport`` of the shutdown that ended the service
            (``Service.start()`` always attaches one; keyword-only, default
            ``None``). Not part of the status's value: two statuses with the
            same reason compare equal whatever their reports.

    ``is_graceful()`` is ``False`` iff ``reason`` is ``ExitReason.RunError``
    or ``ExitReason.RequestedShutdown(ShutdownReason.Fatal(...))``;
    ``exit_code`` is ``0`` if graceful, else ``1``. Immutable; compares by value.
    """

    __slots__ = ("reason", "report")
    __match_args__ = ("reason",)
    reason: ExitReason
    report: ShutdownReport | None

    def __init__(self, reason: ExitReason, *, report: ShutdownReport | None = None) -> None:
        if not isinstance(reason, ExitReason):
            raise TypeError(
                "ExitStatus: `reason` must be a dig_service.ExitReason "
                f"(e.g. ExitReason.RunCompleted()), got {type(reason).__name__}"
            )
        if report is not None and not isinstance(report, ShutdownReport):
            raise TypeError(
                "ExitStatus: `report` must be a dig_service.ShutdownReport or None, "
                f"got {type(report).__name__}"
            )
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "report", report)

    def is_graceful(self) -> bool:
        """``False`` iff the reason is ``RunError`` or ``RequestedShutdown(Fatal(...))``."""
        reason = self.reason
        if isinstance(reason, _RunError):
            return False
        if isinstance(reason, _RequestedShutdown):
            return not isinstance(reason.reason, ShutdownReason.Fatal)
        return True

    @property
    def exit_code(self) -> int:
        """The process exit code: ``0`` if graceful, else ``1``."""
        return 0 if self.is_graceful() else 1

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ExitStatus):
            return self.reason == other.reason
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("ExitStatus", self.reason))

    def __repr__(self) -> str:
        return f"ExitStatus(reason={self.reason!r})"

    def __str__(self) -> str:
        return f"{self.reason} (exit code {self.exit_code})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("ExitStatus is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("ExitStatus is immutable")

    def __reduce__(
        self,
    ) -> tuple[Callable[[ExitReason, ShutdownReport | None], ExitStatus], tuple[Any, ...]]:
        return (_rebuild_status, (self.reason, self.report))


_new: Final = object.__new__
_set_requested_reason: Final = _RequestedShutdown.__dict__["reason"].__set__
_set_status_reason: Final = ExitStatus.__dict__["reason"].__set__
_set_status_report: Final = ExitStatus.__dict__["report"].__set__


def trusted_requested(reason: ShutdownReason) -> ExitReason:
    """``ExitReason.RequestedShutdown(reason)`` without its checks: for ``Service``, which
    passes its token's reason (a ``ShutdownReason``), once a start."""
    value: ExitReason = _new(_RequestedShutdown)
    _set_requested_reason(value, reason)
    return value


def trusted_status(reason: ExitReason, report: ShutdownReport) -> ExitStatus:
    """``ExitStatus(reason, report=report)`` without its checks: for ``Service``, which
    passes an ``ExitReason`` it made and its ``ShutdownReport``, once a start."""
    status: ExitStatus = _new(ExitStatus)
    _set_status_reason(status, reason)
    _set_status_report(status, report)
    return status


def _rebuild_status(reason: ExitReason, report: ShutdownReport | None) -> ExitStatus:
    """Unpickle an ``ExitStatus`` (through ``__init__``, so it is validated)."""
    return ExitStatus(reason, report=report)
