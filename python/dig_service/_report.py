"""``ShutdownReport``: one account of a shutdown, from the token firing to the end of ``start()``.

Guarantees (SPEC section 7; the Rust crate's ``ShutdownReport`` has the same fields):

- **One per shutdown.** ``ExitStatus.report`` / ``ServiceError.report`` carry
  one whenever a shutdown began (the token fired: from outside, by ``run``
  returning or failing, by a failed ``on_start``, during start-up). A
  ``pre_start`` that fails by itself, before any shutdown was requested, has
  none: nothing was shut down.
- **Every stage, in order.** ``phases`` always lists ``run``, ``join``,
  ``on_stop``, ``post_stop``, in that order, each with its duration and
  outcome (``"skipped"`` for a stage that did not run).
- **Every straggler, named.** ``stragglers`` lists the tracked tasks still
  running when the join's share of the budget ran out, in spawn order, with
  kind, origin, age and, for a Python task, the stack it was awaiting in,
  taken just before it was cancelled (``None`` for a native task).
- **Plain values.** ``to_dict()`` is JSON-serialisable (``json.dumps`` works
  on it as is); ``str(report)`` is a readable multi-line text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal, final

from ._core import ShutdownReason, TaskKind
from ._core import _format_task_stack as format_task_stack
from ._display import variant_name

__all__ = [
    "MAX_STACKS",
    "PHASE_NAMES",
    "PhaseOutcome",
    "PhaseReport",
    "ShutdownReport",
    "StragglerReport",
    "format_task_stack",
    "trusted_phase_report",
    "trusted_shutdown_report",
]

PhaseName = Literal["run", "join", "on_stop", "post_stop"]
PhaseOutcome = Literal["ok", "failed", "timed_out", "skipped"]

PHASE_NAMES: Final[tuple[PhaseName, ...]] = ("run", "join", "on_stop", "post_stop")

MAX_STACKS: Final = 100
"""How many stragglers of a shutdown have their stacks taken (the oldest ones): each
is formatted on the event loop, and ten thousand would stall the shutdown they report."""

_LINES_SHOWN: Final = 200
"""How many straggler lines the text form shows."""


@final
@dataclass(frozen=True, slots=True)
class PhaseReport:
    """One stage of a shutdown: ``name`` (``"run"``, ``"join"``, ``"on_stop"``,
    ``"post_stop"``), ``duration`` (seconds; 0 when skipped) and ``outcome``
    (``"ok"``, ``"failed"``, ``"timed_out"``, ``"skipped"``)."""

    name: PhaseName
    duration: float
    outcome: PhaseOutcome

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "duration", "outcome"}``."""
        return {"name": self.name, "duration": self.duration, "outcome": self.outcome}


@final
@dataclass(frozen=True, slots=True)
class StragglerReport:
    """A tracked task still running when the join's share of the budget ran out.

    ``name``; ``kind`` (``TaskKind``); ``origin`` (``"python"`` or ``"native"``);
    ``age`` (seconds since it was spawned, when it was stopped); ``stack``: for a
    Python task, the stack it was awaiting in just before it was cancelled, as
    text (``None`` for a native task, and past the first ``MAX_STACKS``).
    """

    name: str
    kind: TaskKind
    origin: str
    age: float
    stack: str | None

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "kind", "origin", "age", "stack"}``; ``kind`` as its variant name."""
        return {
            "name": self.name,
            "kind": variant_name(self.kind),
            "origin": self.origin,
            "age": self.age,
            "stack": self.stack,
        }

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # ``TaskKind`` does not pickle: it travels as its variant's name.
        return (_straggler, (self.name, variant_name(self.kind), self.origin, self.age, self.stack))


_new: Final = object.__new__
_set_phase_name: Final = PhaseReport.__dict__["name"].__set__
_set_phase_duration: Final = PhaseReport.__dict__["duration"].__set__
_set_phase_outcome: Final = PhaseReport.__dict__["outcome"].__set__


def trusted_phase_report(name: PhaseName, duration: float, outcome: PhaseOutcome) -> PhaseReport:
    """``PhaseReport(name, duration, outcome)`` without the frozen dataclass's ``__init__``
    (its fields set through their slots, at about half the cost): for ``Service``, a few
    times a shutdown."""
    report: PhaseReport = _new(PhaseReport)
    _set_phase_name(report, name)
    _set_phase_duration(report, duration)
    _set_phase_outcome(report, outcome)
    return report


def _straggler(name: str, kind: str, origin: str, age: float, stack: str | None) -> StragglerReport:
    """Unpickle a ``StragglerReport``."""
    return StragglerReport(name, getattr(TaskKind, kind), origin, age, stack)


@final
@dataclass(frozen=True, slots=True)
class ShutdownReport:
    """What happened during a shutdown (SPEC section 7).

    Attributes:
        reason: why the service shut down (the token's ``ShutdownReason``).
        total: seconds from the token firing (or ``start()`` being called, for a
            shutdown requested before it) to the end of the lifecycle.
        tasks_at_start: tracked tasks live when the token fired.
        phases: ``run``, ``join``, ``on_stop``, ``post_stop``, in that order.
        stragglers: the tasks stopped at the end of the join, in spawn order.
    """

    reason: ShutdownReason
    total: float
    tasks_at_start: int
    phases: list[PhaseReport]
    stragglers: list[StragglerReport]

    def phase(self, name: str) -> PhaseReport | None:
        """The report of the stage ``name``, or ``None``."""
        return next((p for p in self.phases if p.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-serialisable data: the reason as ``{"kind", "message"}``,
        durations as float seconds, phases and stragglers as lists of dicts."""
        message = self.reason.message if isinstance(self.reason, ShutdownReason.Fatal) else None
        return {
            "reason": {"kind": type(self.reason).__name__, "message": message},
            "total": self.total,
            "tasks_at_start": self.tasks_at_start,
            "phases": [p.to_dict() for p in self.phases],
            "stragglers": [s.to_dict() for s in self.stragglers],
        }

    def __str__(self) -> str:
        lines = [
            f"shutdown ({self.reason}) took {self.total:.2f}s; "
            f"{self.tasks_at_start} task(s) live when it began"
        ]
        lines += [f"  {p.name:<10} {p.duration:>7.2f}s  {p.outcome}" for p in self.phases]
        if self.stragglers:
            lines.append(
                f"  {len(self.stragglers)} task(s) did not stop in time and were cancelled/aborted:"
            )
        shown = 0
        for i, s in enumerate(self.stragglers):
            if shown >= _LINES_SHOWN:
                lines.append(f"  ... and {len(self.stragglers) - i} more")
                break
            head = f"  - {s.name} ({variant_name(s.kind)}, {s.origin}, age {s.age:.1f}s)"
            shown += 1
            if s.stack is not None:
                lines.append(head + ", awaiting in:")
                for line in s.stack.splitlines():
                    lines.append(f"      {line}")
                    shown += 1
            elif s.origin == "native":
                lines.append(head + ": a native tokio task, no stack")
            else:
                lines.append(head + ": no stack captured")
        return "\n".join(lines)


_SHUTDOWN_FIELDS: Final = tuple(
    ShutdownReport.__dict__[field].__set__
    for field in ("reason", "total", "tasks_at_start", "phases", "stragglers")
)


def trusted_shutdown_report(
    reason: ShutdownReason,
    total: float,
    tasks_at_start: int,
    phases: list[PhaseReport],
    stragglers: list[StragglerReport],
) -> ShutdownReport:
    """``ShutdownReport(...)`` without the frozen dataclass's ``__init__`` (its fields set
    through their slots): for ``Service``, once a shutdown."""
    report: ShutdownReport = _new(ShutdownReport)
    set_reason, set_total, set_tasks, set_phases, set_stragglers = _SHUTDOWN_FIELDS
    set_reason(report, reason)
    set_total(report, total)
    set_tasks(report, tasks_at_start)
    set_phases(report, phases)
    set_stragglers(report, stragglers)
    return report
