"""What the runner shows an operator: the shutdown as it happens, and the live task
snapshot (SIGUSR1).

From the moment the token fires until the service has stopped, the tasks
still running, the time left of the current stage (``run`` and the join share
``shutdown_deadline - stop_reserve``; the stop hooks get the rest, at least the
reserve) and of the whole budget are shown: updated in place on stderr when it
is a terminal, as plain log lines (logger ``dig_service.run``) otherwise, and
handed to a status callback (systemd's ``STATUS=``). The stragglers, with the
stacks they were stuck in, are in the service's ``ShutdownReport``, which the
runner logs once at the end. Nothing is written to stdout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Final

from ._core import ShutdownToken, TaskRegistry, TaskSummary
from ._phase import Phase

__all__ = ["MAX_NAMES", "ServiceView", "ShutdownMonitor", "describe_tasks"]

logger: Final = logging.getLogger("dig_service.run")

_TICK: Final = 0.1
"""Seconds between two looks at a shutting-down service."""
_PLAIN_EVERY: Final = 1.0
"""Seconds between two plain progress lines (not a terminal)."""
MAX_NAMES: Final = 8
"""Task names shown on one line."""
_MANY_TASKS: Final = 1000
"""Above this many live tasks, the shutdown display looks at them once a second only."""
_MAX_SNAPSHOT_LINES: Final = 200
"""Task lines in a SIGUSR1 snapshot (and in a straggler report)."""
_STAGE_TEXT: Final = {
    Phase.RUN: "waiting for run() to return",
    Phase.JOIN: "joining tasks",
    Phase.ON_STOP: "running on_stop",
    Phase.POST_STOP: "running post_stop",
}
_STOP_PHASES: Final = (Phase.ON_STOP, Phase.POST_STOP)


@dataclass(frozen=True, slots=True)
class ServiceView:
    """What the display looks at: one running service, on its event loop."""

    label: str
    """The node's ``NAME``, else its class name (as ``Service`` labels its logs)."""
    loop: asyncio.AbstractEventLoop
    token: ShutdownToken
    registry: TaskRegistry
    deadline: float
    """``ServiceConfig.shutdown_deadline``: the whole budget of a shutdown."""
    stop_reserve: float
    """``ServiceConfig.stop_reserve``: the part of it kept for the stop hooks."""
    hook_timeout: float | None
    """``ServiceConfig.hook_timeout``."""
    phase: Callable[[], Phase]
    """The service's current lifecycle phase."""


def describe_tasks(view: ServiceView) -> str:
    """The live task snapshot, as a multi-line text (what SIGUSR1 logs)."""
    now = time.monotonic()
    live = sorted(view.registry.snapshot(), key=lambda s: s.spawned_at)
    python = sum(1 for s in live if s.origin == "python")
    phase = view.phase()
    state = f"stopping ({view.token.reason()})" if view.token.is_cancelled() else "running"
    head = (
        f"service {view.label} {state}, phase {phase}: {len(live)} live task(s) "
        f"({python} python, {len(live) - python} native)"
    )
    stats = view.registry.stats()
    head += (
        f"; spawned {stats.spawned}, completed {stats.completed}, failed {stats.failed}, "
        f"cancelled {stats.cancelled}, aborted {stats.aborted}, restarted {stats.restarted}"
    )
    if not live:
        return head
    width = min(48, max(len(s.name) for s in live[:_MAX_SNAPSHOT_LINES]))
    lines = [head, f"  {'NAME':<{width}}  {'KIND':<14}  {'ORIGIN':<6}  AGE"]
    for s in live[:_MAX_SNAPSHOT_LINES]:
        kind, age = variant_name(s.kind), format_age(now - s.spawned_at)
        line = f"  {s.name:<{width}}  {kind:<14}  {s.origin:<6}  {age}"
        # A supervised task that has restarted says so (and how often).
        lines.append(f"{line}  restarted {s.restarts}x" if s.restarts else line)
    if len(live) > _MAX_SNAPSHOT_LINES:
        lines.append(f"  ... and {len(live) - _MAX_SNAPSHOT_LINES} more")
    return "\n".join(lines)


class ShutdownMonitor:
    """Shows the shutdown as it happens and names what refused to stop."""

    def __init__(
        self,
        view: ServiceView,
        stream: IO[str],
        on_status: Callable[[str], object] | None = None,
    ) -> None:
        self.view = view
        self.stream = stream
        self.tty = _is_tty(stream)
        self.on_status = on_status
        """Called with a short status ("stopping: joining 12 tasks, 8.2 s left") at each
        stage and once a second (the runner sends it to systemd as ``STATUS=``)."""
        self.task: asyncio.Task[None] | None = None
        self.fired_at = 0.0
        self.stop_started: float | None = None
        self._line_shown = False
        self._filtered: list[logging.Handler] = []

    def start(self) -> None:
        if self.task is None:
            self.fired_at = time.monotonic()
            self.task = self.view.loop.create_task(
                self._watch(), name="dig_service.run.shutdown_monitor"
            )

    def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None and not task.done():
            task.cancel()
        self._clear_line()
        for handler in self._filtered:
            handler.removeFilter(self._before_log_record)
        self._filtered = []

    async def _watch(self) -> None:
        view = self.view
        reason = view.token.reason()
        live = len(view.registry)
        logger.info(
            "shutdown started (%s): a budget of %gs; run() and %d task(s) share %gs, "
            "on_stop/post_stop get the rest (at least %gs)",
            reason,
            view.deadline,
            live,
            view.deadline - view.stop_reserve,
            view.stop_reserve,
        )
        # The display follows the level of this logger, on a terminal too.
        show = logger.isEnabledFor(logging.INFO)
        in_place = self.tty and show
        if in_place:
            self._filter_log_handlers()
        last_phase: Phase | None = None
        stage_start = self.fired_at
        last_plain = time.monotonic()
        last_status = -math.inf
        last_look = -math.inf
        live_tasks: list[TaskSummary] = []
        while True:
            now = time.monotonic()
            phase = view.phase()
            changed = phase != last_phase
            if changed:
                last_phase, stage_start = phase, now
                if phase in _STOP_PHASES and self.stop_started is None:
                    self.stop_started = now
            # A snapshot of a huge registry is not free: look less often then.
            if len(view.registry) <= _MANY_TASKS or now - last_look >= _PLAIN_EVERY:
                live_tasks = view.registry.snapshot()
                last_look = now
            left, limit = self._stage_left(phase, now, stage_start)
            total_left = max(0.0, self.fired_at + view.deadline - now)
            if self.on_status is not None and (changed or now - last_status >= _PLAIN_EVERY):
                last_status = now
                self.on_status(_status_text(phase, len(live_tasks), total_left))
            if show:
                if not live_tasks and phase not in (Phase.RUN, *_STOP_PHASES):
                    self._clear_line()
                else:
                    line = self._progress_line(phase, live_tasks, left, limit, total_left)
                    if in_place:
                        self._show_line(line)
                    elif now - last_plain >= _PLAIN_EVERY:
                        last_plain = now
                        logger.info("%s", line)
            await asyncio.sleep(_TICK)

    def _stage_left(self, phase: Phase, now: float, stage_start: float) -> tuple[float, float]:
        """``(seconds left, seconds allowed)`` of the current stage, as the lifecycle
        bounds it: ``run``, the join (and a start-up hook the token interrupted) share
        ``deadline - stop_reserve`` from the token firing; the stop hooks end with the
        budget, or ``stop_reserve`` after they began if that is later; a stop hook is
        also bounded by ``hook_timeout`` from its start."""
        view = self.view
        if phase in _STOP_PHASES:
            began = self.stop_started if self.stop_started is not None else stage_start
            end = max(self.fired_at + view.deadline, began + view.stop_reserve)
            if view.hook_timeout is not None:
                end = min(end, stage_start + view.hook_timeout)
            return max(0.0, end - now), end - stage_start
        share = view.deadline - view.stop_reserve
        return max(0.0, self.fired_at + share - now), share

    def _progress_line(
        self, phase: Phase, live: list[TaskSummary], left: float, limit: float, total: float
    ) -> str:
        stage = _STAGE_TEXT.get(phase, "stopping")
        names = [s.name for s in live[:MAX_NAMES]]
        more = f" (+{len(live) - MAX_NAMES} more)" if len(live) > MAX_NAMES else ""
        text = (
            f"shutting down, {stage} ({left:.1f}s of {limit:.3g}s left; "
            f"{total:.1f}s of the {self.view.deadline:g}s budget)"
        )
        if live:
            text += f": {len(live)} task(s) still running: {', '.join(names)}{more}"
        return text

    # ---- terminal status line

    def _show_line(self, text: str) -> None:
        width = shutil.get_terminal_size((100, 24)).columns
        if len(text) >= width:
            text = text[: max(0, width - 2)] + "…"
        try:
            self.stream.write("\r\x1b[2K" + text)
            self.stream.flush()
        except (OSError, ValueError):
            return
        self._line_shown = True

    def _clear_line(self) -> None:
        if self._line_shown:
            self._line_shown = False
            try:
                self.stream.write("\r\x1b[2K")
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def _before_log_record(self, record: logging.LogRecord) -> bool:
        """A handler filter: clear the status line before a log line goes out under it."""
        self._clear_line()
        return True

    def _filter_log_handlers(self) -> None:
        for handler in logging.getLogger().handlers:
            if getattr(handler, "stream", None) is self.stream:
                handler.addFilter(self._before_log_record)
                self._filtered.append(handler)

    # ---- reports

    def report_forced(self, code: int) -> None:
        live = self.view.registry.snapshot()
        names = ", ".join(s.name for s in live[:MAX_NAMES])
        more = f" (+{len(live) - MAX_NAMES} more)" if len(live) > MAX_NAMES else ""
        phase = self.view.phase()
        logger.warning(
            "service %s: forced exit with code %d during %s; %d task(s) abandoned%s",
            self.view.label,
            code,
            phase,
            len(live),
            f": {names}{more}" if live else "",
        )


def _status_text(phase: Phase, live: int, total_left: float) -> str:
    """The short status systemd shows (``STATUS=``): the stage and the time left."""
    stage = {
        Phase.RUN: "waiting for run()",
        Phase.JOIN: f"joining {live} task{'s' if live != 1 else ''}",
        Phase.ON_STOP: "running on_stop",
        Phase.POST_STOP: "running post_stop",
        Phase.PRE_START: "pre_start interrupted",
        Phase.ON_START: "on_start interrupted",
    }.get(phase, str(phase))
    return f"stopping: {stage}, {total_left:.1f} s left"


def variant_name(value: object) -> str:
    """``TaskKind.PeerConnection`` -> ``"PeerConnection"``: how the runner's display,
    the shutdown report, ``ps``, the control socket's log and the metrics name a
    ``TaskKind`` (or any ``_core`` variant)."""
    return str(value).rpartition(".")[2]


def format_age(seconds: float) -> str:
    """A task's age as the runner's display and ``ps`` show it: ``4.2s``, ``3m07s``,
    ``5h12m``, ``3d04h``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _is_tty(stream: IO[str]) -> bool:
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False
