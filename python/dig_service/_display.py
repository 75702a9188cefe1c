"""What the runner shows an operator: the shutdown as it happens, the stragglers
with the stacks they were stuck in, and the live task snapshot (SIGUSR1).

From the moment the token fires until the service has stopped, the tasks
still running and the time left of the current stage's deadline are shown:
updated in place on stderr when it is a terminal, as plain log lines (logger
``dig_service.run``) otherwise. When the deadline passes, each straggler is
named, with the stack a Python task was awaiting in when last seen; tasks
stuck at the same place are reported together. Nothing is written to
stdout.
"""

from __future__ import annotations

import asyncio
import linecache
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Final

from ._core import ShutdownToken, TaskRegistry, TaskSummary
from ._errors import ShutdownDeadlineExceeded
from ._phase import Phase, hook_task_name

__all__ = ["MAX_NAMES", "ServiceView", "ShutdownMonitor", "describe_tasks"]

logger: Final = logging.getLogger("dig_service.run")

_TICK: Final = 0.1
"""Seconds between two looks at a shutting-down service."""
_PLAIN_EVERY: Final = 1.0
"""Seconds between two plain progress lines (not a terminal)."""
MAX_NAMES: Final = 8
"""Task names shown on one line."""
_MAX_STACKS: Final = 1000
"""At most this many Python tasks have their stacks captured per look during shutdown."""
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


@dataclass(frozen=True, slots=True)
class ServiceView:
    """What the display looks at: one running service, on its event loop."""

    label: str
    """The node's ``NAME``, else its class name (as ``Service`` labels its logs)."""
    loop: asyncio.AbstractEventLoop
    token: ShutdownToken
    registry: TaskRegistry
    deadline: float
    """``ServiceConfig.shutdown_deadline``."""
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
        line = f"  {s.name:<{width}}  {_kind(s):<14}  {s.origin:<6}  {_age(now - s.spawned_at)}"
        # A supervised task that has restarted says so (and how often).
        lines.append(f"{line}  restarted {s.restarts}x" if s.restarts else line)
    if len(live) > _MAX_SNAPSHOT_LINES:
        lines.append(f"  ... and {len(live) - _MAX_SNAPSHOT_LINES} more")
    return "\n".join(lines)


@dataclass
class _Seen:
    """The last look at one live task."""

    summary: TaskSummary | None
    """``None`` for the ``run`` hook, which is not a tracked task."""
    stack: list[tuple[str, int, str]] = field(default_factory=list)
    awaiting: str | None = None


class ShutdownMonitor:
    """Shows the shutdown as it happens and names what refused to stop."""

    def __init__(self, view: ServiceView, stream: IO[str]) -> None:
        self.view = view
        self.stream = stream
        self.tty = _is_tty(stream)
        self.task: asyncio.Task[None] | None = None
        self.seen: dict[str, _Seen] = {}
        self.run_stack: _Seen | None = None
        self.fired_at = 0.0
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
            "shutdown started (%s): waiting up to %gs per stage for run() and %d task(s)",
            reason,
            view.deadline,
            live,
        )
        # The display follows the level of this logger, on a terminal too.
        show = logger.isEnabledFor(logging.INFO)
        in_place = self.tty and show
        if in_place:
            self._filter_log_handlers()
        phase = view.phase()
        stage_start = self.fired_at
        last_plain = time.monotonic()
        last_look = -math.inf
        live_tasks: list[TaskSummary] = []
        while True:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            current = view.phase()
            if current != phase:
                phase, stage_start = current, now
            # A snapshot of a huge registry is not free: look less often then.
            if len(view.registry) <= _MANY_TASKS or now - last_look >= _PLAIN_EVERY:
                live_tasks = self._look(phase)
                last_look = now
            if not show:
                continue
            budget = self._stage_budget(phase)
            left = max(0.0, budget - (now - stage_start))
            if not live_tasks and phase not in (Phase.RUN, Phase.ON_STOP, Phase.POST_STOP):
                self._clear_line()
                continue
            line = self._progress_line(phase, live_tasks, left, budget)
            if in_place:
                self._show_line(line)
            elif now - last_plain >= _PLAIN_EVERY:
                last_plain = now
                logger.info("%s", line)

    def _stage_budget(self, phase: Phase) -> float:
        view = self.view
        if phase in (Phase.ON_STOP, Phase.POST_STOP) and view.hook_timeout is not None:
            return min(view.deadline, view.hook_timeout)
        return view.deadline

    def _look(self, phase: Phase) -> list[TaskSummary]:
        """Take the registry's snapshot and the stacks of (up to ``_MAX_STACKS`` of) its
        Python tasks, and of the ``run`` hook while it is still running."""
        live = self.view.registry.snapshot()
        wanted: set[str] = set()
        for s in live:
            if s.origin == "python":
                wanted.add(s.name)
                if len(wanted) >= _MAX_STACKS:
                    break
        want_run = phase is Phase.RUN
        run_task_name = hook_task_name(Phase.RUN, self.view.label)
        found: dict[str, asyncio.Task[Any]] = {}
        run_task: asyncio.Task[Any] | None = None
        if wanted or want_run:
            for task in asyncio.all_tasks(self.view.loop):
                name = task.get_name()
                if name in wanted:
                    # Same-named tasks: the first found stands for all; enough to find the bug.
                    found.setdefault(name, task)
                elif want_run and name == run_task_name:
                    run_task = task
        seen: dict[str, _Seen] = {}
        for s in live:
            entry = _Seen(s)
            same_name = found.get(s.name)
            if same_name is not None:
                entry.stack, entry.awaiting = _await_stack(same_name)
            seen[s.name] = entry
        # Keep the last non-empty look: the stragglers are gone from the registry by the
        # time the report is written.
        if seen or not self.seen:
            self.seen = seen
        if run_task is not None:
            stack, awaiting = _await_stack(run_task)
            self.run_stack = _Seen(None, stack, awaiting)
        return live

    def _progress_line(
        self, phase: Phase, live: list[TaskSummary], left: float, budget: float
    ) -> str:
        stage = _STAGE_TEXT.get(phase, "stopping")
        names = [s.name for s in live[:MAX_NAMES]]
        more = f" (+{len(live) - MAX_NAMES} more)" if len(live) > MAX_NAMES else ""
        text = f"shutting down, {stage} ({left:.1f}s of {budget:g}s left)"
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

    def report_stragglers(self, err: ShutdownDeadlineExceeded) -> None:
        """Log the tasks that outlived the deadline, with the stack each was awaiting in.

        Tasks stuck at the same place (same kind, origin and stack) are reported
        together, so a thousand connections blocked in one read make one entry.
        """
        now = time.monotonic()
        groups: dict[tuple[object, ...], list[str]] = {}
        for name in err.pending_names:
            groups.setdefault(self._group_key(name), []).append(name)
        lines = [
            f"service {self.view.label}: shutdown deadline of {err.deadline:g}s exceeded; "
            f"{err.pending} task(s) did not stop in time and were cancelled/aborted:"
        ]
        budget = _MAX_SNAPSHOT_LINES
        for shown, names in enumerate(groups.values()):
            if budget <= 0:
                rest = sum(len(n) for n in list(groups.values())[shown:])
                lines.append(f"  ... and {rest} more task(s)")
                break
            entry_lines = self._describe_group(names, now)
            budget -= len(entry_lines)
            lines.extend(entry_lines)
        logger.error("%s", "\n".join(lines))

    def _entry(self, name: str) -> _Seen | None:
        if name == "run" and name not in self.seen:
            return self.run_stack
        return self.seen.get(name)

    def _group_key(self, name: str) -> tuple[object, ...]:
        entry = self._entry(name)
        if entry is None:
            return ("unseen",)
        s = entry.summary
        if s is None:  # the run hook
            return ("run", name)
        if s.origin != "python":
            return (s.origin, _kind(s))
        return (s.origin, _kind(s), tuple(entry.stack), entry.awaiting)

    def _describe_group(self, names: list[str], now: float) -> list[str]:
        name = names[0]
        entry = self._entry(name)
        listed = ", ".join(names[:MAX_NAMES])
        more = f", ... +{len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else ""
        if entry is None:
            return [f"  - {listed}{more}: (not seen while shutting down)"]
        s = entry.summary
        if s is None:
            head = f"  - {name} (the node's run hook)"
        elif len(names) == 1:
            head = f"  - {name} ({_kind(s)}, {s.origin}, age {_age(now - s.spawned_at)})"
        else:
            head = f"  - {len(names)} tasks ({listed}{more}) ({_kind(s)}, {s.origin})"
        if s is not None and s.origin != "python":
            what = "a native tokio task" if len(names) == 1 else "native tokio tasks"
            return [f"{head}: {what}, no Python stack"]
        if not entry.stack:
            return [f"{head}: no stack captured"]
        out = [f"{head}, awaiting in:"]
        for filename, lineno, func in entry.stack:
            out.append(f'      File "{filename}", line {lineno}, in {func}')
            source = linecache.getline(filename, lineno).strip()
            if source:
                out.append(f"        {source}")
        if entry.awaiting:
            out.append(f"      awaiting {entry.awaiting}")
        return out

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


def _await_stack(task: asyncio.Task[Any]) -> tuple[list[tuple[str, int, str]], str | None]:
    """Where ``task`` is suspended: the chain of frames down its ``await``\\ s, and the
    innermost awaited object that is not a coroutine (a future, a native awaitable)."""
    frames: list[tuple[str, int, str]] = []
    obj: Any = task.get_coro()
    for _ in range(128):
        frame = (
            getattr(obj, "cr_frame", None)
            or getattr(obj, "gi_frame", None)
            or getattr(obj, "ag_frame", None)
        )
        if frame is None:
            break
        code = frame.f_code
        frames.append((code.co_filename, frame.f_lineno, code.co_name))
        nxt = (
            getattr(obj, "cr_await", None)
            or getattr(obj, "gi_yieldfrom", None)
            or getattr(obj, "ag_await", None)
        )
        if nxt is None:
            return frames, None
        if not any(hasattr(nxt, a) for a in ("cr_frame", "gi_frame", "ag_frame")):
            return frames, _describe_awaitable(nxt)
        obj = nxt
    return frames, None


def _describe_awaitable(obj: object) -> str:
    if type(obj).__name__ == "FutureIter":  # the C implementation of Future.__await__
        return "an asyncio Future"
    if isinstance(obj, asyncio.Future):
        state = "cancelled" if obj.cancelled() else ("done" if obj.done() else "pending")
        return f"{type(obj).__name__} ({state})"
    return type(obj).__qualname__


def _kind(summary: TaskSummary) -> str:
    return str(summary.kind).rpartition(".")[2]


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _is_tty(stream: IO[str]) -> bool:
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False
