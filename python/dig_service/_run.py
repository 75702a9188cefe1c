"""``dig_service.run``: run a ``Service`` as the main program of a process.

What an operator gets (SPEC, "Running a service for real"):

- **Signals.** SIGINT and SIGTERM request a shutdown with
  ``ShutdownReason.UserRequested()``, SIGHUP with ``ReloadRequested()``. A
  second SIGINT/SIGTERM while shutting down stops waiting: ``run`` returns
  ``128 + signal number`` at once, abandoning whatever was still running.
  SIGUSR1 logs the live task snapshot (name, kind, origin, age). Every
  handler is removed, and the previous one restored, before ``run`` returns.
  On Windows (no ``loop.add_signal_handler``, no SIGHUP or SIGUSR1), Ctrl-C
  (SIGINT) and Ctrl-Break (SIGBREAK) are handled through ``signal.signal``
  and ``call_soon_threadsafe``; reload and snapshot by signal are off.
- **A shutdown one can watch.** From the moment the token fires until the
  service has stopped, the tasks still running and the time left of the
  current stage's deadline are shown: updated in place on stderr when it is a
  terminal, as plain log lines (logger ``dig_service.run``) otherwise. When
  the deadline passes, each straggler is named, with the stack a Python task
  was awaiting in when last seen.
- **systemd.** With ``$NOTIFY_SOCKET`` set: ``READY=1`` after ``on_start``,
  ``STOPPING=1`` when the token fires, ``WATCHDOG=1`` every
  ``$WATCHDOG_USEC / 2`` (see ``_systemd``).
- **An exit code.** ``ExitStatus.exit_code`` (0 graceful, 1 otherwise); 1 for
  any ``ServiceError``; ``128 + n`` for a forced exit by signal ``n``; 2 if
  the control socket cannot be set up.
- **A control socket** (``control_socket=PATH``, see ``_control``) from
  before ``pre_start`` until the service has stopped and every ``shutdown``
  request that waits for the end has its answer; removed on exit.

Nothing is written to stdout.
"""

from __future__ import annotations

import asyncio
import linecache
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Final

from ._control import (
    BoundSocket,
    ControlServer,
    ControlSocketError,
    bind_control_socket,
    final_outcome,
)
from ._core import ShutdownReason, ShutdownToken, TaskSummary
from ._errors import ServiceError, ShutdownDeadlineExceeded
from ._service import Service
from ._systemd import Notifier, watchdog_interval
from ._watchdog import LoopWatch

__all__ = ["run"]

logger: Final = logging.getLogger("dig_service.run")


def stop_signals() -> tuple[int, ...]:
    """The signals that request a shutdown here: SIGINT, SIGTERM and, on Windows,
    SIGBREAK (Ctrl-Break). Read from ``signal`` at each call (tests simulate platforms)."""
    brk = getattr(signal, "SIGBREAK", None)
    return (signal.SIGINT, signal.SIGTERM) + ((brk,) if brk is not None else ())


def reload_signal() -> int | None:
    """SIGHUP, or ``None`` where the platform has none (Windows): reload-by-signal is off."""
    return getattr(signal, "SIGHUP", None)


def snapshot_signal() -> int | None:
    """SIGUSR1, or ``None`` where the platform has none (Windows): snapshot-by-signal is off."""
    return getattr(signal, "SIGUSR1", None)


_TICK: Final = 0.1
"""Seconds between two looks at a shutting-down service."""
_PLAIN_EVERY: Final = 1.0
"""Seconds between two plain progress lines (not a terminal)."""
_READY_POLL: Final = 0.02
"""Seconds between two looks at the phase while waiting for ``on_start`` (fallback only)."""
_MAX_NAMES: Final = 8
"""Task names shown on one progress line."""
_MAX_STACKS: Final = 1000
"""At most this many Python tasks have their stacks captured per look during shutdown."""
_MANY_TASKS: Final = 1000
"""Above this many live tasks, the shutdown display looks at them once a second only."""
_MAX_SNAPSHOT_LINES: Final = 200
"""Task lines in a SIGUSR1 snapshot."""
_STARTUP_PHASES: Final = frozenset({"created", "pre_start", "on_start"})
_RUN_HOOK_TASK_PREFIX: Final = "dig_service.run["
"""How ``Service`` names the asyncio task of the ``run`` hook."""


# --------------------------------------------------------------------------- public


def run(
    service: Service[Any, Any, Any],
    *,
    install_signal_handlers: bool = True,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    control_socket: str | os.PathLike[str] | None = None,
) -> int:
    """Run ``service`` on a new event loop until it has stopped; return the exit code.

    Like ``asyncio.run``: it must be called without a running event loop,
    creates one (``loop_factory()``, e.g. ``uvloop.new_event_loop``, or the
    default asyncio loop), runs ``service.start()`` on it, and closes it.

    With ``install_signal_handlers`` (the default; main thread only):
    SIGINT/SIGTERM request a shutdown with ``ShutdownReason.UserRequested()``,
    SIGHUP with ``ShutdownReason.ReloadRequested()``; a second SIGINT/SIGTERM
    during the shutdown stops waiting and returns ``128 + signal number`` at
    once (the service's remaining work is abandoned: exit the process now);
    SIGUSR1 logs the live task snapshot. The previous handlers are restored
    before ``run`` returns. Where the loop has no ``add_signal_handler``
    (Windows), the handlers go through ``signal.signal``; Ctrl-Break
    (SIGBREAK) then counts as a stop signal, and SIGHUP/SIGUSR1, which
    Windows lacks, are not handled.

    While the service shuts down, the tasks still running and the time left
    are shown on stderr (in place, on a terminal) or logged on
    ``dig_service.run``; stragglers past the deadline are named, with their
    stacks. With ``$NOTIFY_SOCKET`` set, systemd is told ``READY=1``,
    ``STOPPING=1`` and, while the loop turns, ``WATCHDOG=1``.

    With ``control_socket=PATH``, a Unix socket at ``PATH`` (mode 0600,
    same-uid peers only) answers JSON-RPC requests (``tasks``, ``stats``,
    ``health``, ``report``, ``shutdown``) until the service has stopped, and
    is removed on exit (``python -m dig_service ps PATH`` / ``stop PATH``).
    A stale socket left at ``PATH`` by a dead process is replaced.

    Returns:
        ``ExitStatus.exit_code`` (0 graceful, 1 not); 1 if ``start()``
        raised a ``ServiceError`` (which is logged); ``128 + n`` after a
        forced exit by signal ``n``; 2 (logged, the service not started) if
        the control socket cannot be set up: ``PATH`` is held by a live
        process, is not a socket, or its directory is missing.

    Raises:
        TypeError: ``service`` is not a ``Service``; ``control_socket`` is
            not a path.
        ValueError: ``control_socket`` is empty.
        RuntimeError: called from a running event loop, or with
            ``install_signal_handlers=True`` outside the main thread.
    """
    try:
        outcome = _run(
            service,
            install_signal_handlers=install_signal_handlers,
            loop_factory=loop_factory,
            control_socket=control_socket,
        )
    except ControlSocketError as exc:
        logger.error("%s", exc)
        return EXIT_CONTROL_SOCKET
    return outcome.code


EXIT_CONTROL_SOCKET: Final = 2
"""The exit code when the control socket cannot be set up."""


@dataclass(frozen=True)
class Outcome:
    """What ``_run`` ended with: the exit code, and whether a second signal forced it."""

    code: int
    forced: bool = False


def _run(
    service: Service[Any, Any, Any],
    *,
    install_signal_handlers: bool = True,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    status_stream: IO[str] | None = None,
    control_socket: str | os.PathLike[str] | None = None,
    stall_warning: float | None = None,
) -> Outcome:
    """``run``, telling the CLI whether the exit was forced (it then skips interpreter teardown).

    ``stall_warning`` (the CLI's ``--stall-warning``) runs a loop-stall
    watchdog around the service when its own ``ServiceConfig.stall_warning``
    is ``None``. Raises ``ControlSocketError`` if the control socket cannot
    be set up (before anything else happened).
    """
    _check_service(service)
    socket_path = _check_control_socket(control_socket)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "dig_service.run() cannot be called from a running event loop; "
            "inside async code, `await service.start()` instead"
        )
    if install_signal_handlers and threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "dig_service.run(): signal handlers can only be installed from the main thread; "
            "pass install_signal_handlers=False (and stop the service through its handle)"
        )
    if loop_factory is not None and not callable(loop_factory):
        raise TypeError(
            f"dig_service.run(): `loop_factory` must be a callable returning an event loop, "
            f"got {type(loop_factory).__name__}"
        )

    bound = bind_control_socket(socket_path) if socket_path is not None else None
    try:
        loop = loop_factory() if loop_factory is not None else asyncio.new_event_loop()
    except BaseException:
        if bound is not None:
            bound.remove()
        raise
    runner = _Runner(service, loop, status_stream if status_stream is not None else sys.stderr)
    runner.control_bound = bound
    if service.config.stall_warning is None:
        runner.stall_warning = stall_warning
    try:
        asyncio.set_event_loop(loop)
        if install_signal_handlers:
            runner.install_signal_handlers()
        try:
            code = loop.run_until_complete(runner.main())
        except BaseException:  # KeyboardInterrupt without our handlers, SystemExit: clean up
            runner.finish_service()
            runner.finish_remaining()
            raise
        if runner.forced:
            runner.abandon_remaining()
        else:
            runner.finish_remaining()
        return Outcome(code, runner.forced)
    finally:
        runner.restore_signal_handlers()
        runner.close_display()
        asyncio.set_event_loop(None)
        loop.close()
        if bound is not None:
            bound.remove()


def _check_control_socket(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike):
        raise TypeError(
            "dig_service.run(): `control_socket` must be a path (str or os.PathLike) or None, "
            f"got {type(value).__name__}"
        )
    path = os.fspath(value)
    if not isinstance(path, str):
        raise TypeError("dig_service.run(): `control_socket` must be a str path, not bytes")
    if not path:
        raise ValueError("dig_service.run(): `control_socket` must not be empty")
    return path


def _check_service(service: object) -> None:
    if isinstance(service, Service):
        return
    hint = ""
    if all(hasattr(service, hook) for hook in ("pre_start", "on_start", "run")):
        hint = "; it looks like a node: wrap it, run(Service(node))"
    raise TypeError(
        f"dig_service.run(): `service` must be a dig_service.Service, "
        f"got {type(service).__name__}{hint}"
    )


# --------------------------------------------------------------------------- runner


_abandoned: list[asyncio.Task[Any]] = []
"""Tasks left pending by a forced exit: kept alive so that they are not torn down noisily."""


class _Runner:
    """One ``run``: the loop-side state (signals, systemd, the shutdown display)."""

    def __init__(
        self, service: Service[Any, Any, Any], loop: asyncio.AbstractEventLoop, stream: IO[str]
    ) -> None:
        self.service = service
        self.loop = loop
        self.token = service.shutdown_token
        self.registry = service.tasks
        self.label = _label(service)
        self.deadline = service.config.shutdown_deadline
        self.hook_timeout = service.config.hook_timeout
        self.phases = _PhaseWatch(service)
        self.forced = False
        self._force: asyncio.Future[int] = loop.create_future()
        self._stop_signal_seen = False
        self._saved_handlers: list[tuple[int, Any, bool]] = []
        self._notifier = Notifier.from_env()
        self._ready_sent = False
        self._stopping_sent = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._helpers: list[asyncio.Task[Any]] = []
        self._start: asyncio.Task[Any] | None = None
        self.monitor = _ShutdownMonitor(self, stream)
        self.control_bound: BoundSocket | None = None
        self.stall_warning: float | None = None
        self.started_at = time.monotonic()

    # ----------------------------------------------------------------- main

    async def main(self) -> int:
        """``_main`` between the control socket's start and close, under the runner's
        loop-stall watchdog (``--stall-warning``) if any."""
        control: ControlServer | None = None
        if self.control_bound is not None:
            control = ControlServer(
                self.control_bound, self.service, label=self.label, started_at=self.started_at
            )
            await control.start()
            logger.info("control socket listening on %s", self.control_bound.path)
        watch = None
        if self.stall_warning is not None:
            watch = LoopWatch(self.loop, self.stall_warning, self.label)
        try:
            code = await self._main()
            if control is not None:
                control.finish(await final_outcome(self.service, code, self.forced))
                await control.close(grace=0.1 if self.forced else 5.0)
        finally:
            if watch is not None:
                watch.stop()
            if control is not None:
                control.abort()
        return code

    async def _main(self) -> int:
        loop = self.loop
        start = loop.create_task(self.service.start(), name=f"dig_service.main[{self.label}]")
        self._start = start
        self._helpers = [
            loop.create_task(self._on_token_fired(), name="dig_service.run.on_shutdown"),
        ]
        if self._notifier is not None:
            self._helpers.append(
                loop.create_task(self._notify_ready(), name="dig_service.run.notify_ready")
            )
            interval = watchdog_interval()
            if interval is not None:
                self._ping_watchdog(interval)
        try:
            await asyncio.wait((start, self._force), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            for helper in self._helpers:
                helper.cancel()
            if self._helpers:
                await asyncio.wait(self._helpers)
            self.monitor.stop()
            if self._notifier is not None:
                self._notifier.close()

        if not start.done():
            self.forced = True
            code = self._force.result()
            self.monitor.report_forced(code)
            return code
        try:
            status = start.result()
        except ShutdownDeadlineExceeded as err:
            self.monitor.report_stragglers(err)
            return 1
        except ServiceError as err:
            logger.error("service %s failed: %s", self.label, err, exc_info=err)
            return 1
        return status.exit_code

    def finish_service(self) -> None:
        """After a ``KeyboardInterrupt``/``SystemExit`` stopped the loop (raised by a
        tracked task, which asyncio re-raises out of the loop at once): let the service
        wind down before the exception propagates.

        The task's end has fired the token (its done callback runs on the loop's next
        turn), so the lifecycle stops as for any shutdown, every stage bounded by the
        deadline; a second SIGINT/SIGTERM cuts this short, as it does a shutdown.
        """
        start = self._start
        if start is not None and start.done() and not start.cancelled():
            start.exception()  # start() raised what is propagating now: retrieved
        lifecycle = getattr(self.service, "_lifecycle_task", None)
        if not isinstance(lifecycle, asyncio.Task) or lifecycle.done() or self._force.done():
            return
        waited = asyncio.wait((lifecycle, self._force), return_when=asyncio.FIRST_COMPLETED)
        self.loop.run_until_complete(waited)

    def finish_remaining(self) -> None:
        """After a normal exit: end what the registry did not track, like ``asyncio.run``.

        Untracked tasks are cancelled and waited for up to the shutdown
        deadline (a second signal cuts that short too); then async generators
        and the default executor are shut down.
        """
        loop = self.loop
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        if pending:
            for task in pending:
                task.cancel()
            force = self._force

            async def wait() -> None:
                end = loop.time() + self.deadline
                rest: set[asyncio.Future[Any]] = set(pending)
                while rest and not force.done():
                    timeout = end - loop.time()
                    if timeout <= 0:
                        break
                    await asyncio.wait(
                        {*rest, force}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                    rest = {t for t in rest if not t.done()}

            loop.run_until_complete(wait())
            stuck = [t for t in pending if not t.done()]
            for task in pending:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    loop.call_exception_handler(
                        {
                            "message": "unhandled exception in an untracked task at exit",
                            "exception": task.exception(),
                            "task": task,
                        }
                    )
            if stuck:
                # A tracked straggler that swallows cancellation is still in the
                # registry (join_all cancelled it at the deadline): not "untracked".
                tracked = {s.name for s in self.registry.snapshot() if s.origin == "python"}
                for kind, group in (
                    ("tracked", [t for t in stuck if t.get_name() in tracked]),
                    ("untracked", [t for t in stuck if t.get_name() not in tracked]),
                ):
                    if group:
                        logger.warning(
                            "%d %s task(s) did not finish after being cancelled at exit: %s",
                            len(group),
                            kind,
                            ", ".join(t.get_name() for t in group[:_MAX_NAMES]),
                        )
                _abandoned.extend(stuck)
                _quiet_pending_task_noise(loop)
                return
        loop.run_until_complete(loop.shutdown_asyncgens())
        executor = loop.create_task(loop.shutdown_default_executor())
        loop.run_until_complete(asyncio.wait((executor,), timeout=self.deadline))
        if not executor.done():
            executor.cancel()
            _abandoned.append(executor)

    def abandon_remaining(self) -> None:
        """After a forced exit: leave every task as it is, quietly (the process is exiting)."""
        _abandoned.extend(t for t in asyncio.all_tasks(self.loop) if not t.done())
        _quiet_pending_task_noise(self.loop)

    # ----------------------------------------------------------------- signals

    def install_signal_handlers(self) -> None:
        """Handle the stop signals, and SIGHUP/SIGUSR1 where the platform has them.

        Through ``loop.add_signal_handler`` where the loop has it (POSIX);
        where it does not (Windows: asyncio's loops raise
        ``NotImplementedError``), through ``signal.signal`` with a handler
        that hands the signal to the loop with ``call_soon_threadsafe``
        (Python runs it on the main thread, and the loop's self-pipe wakes
        the loop up).
        """
        handlers: list[tuple[int, Callable[[int], None]]] = [
            (sig, self._on_stop_signal) for sig in stop_signals()
        ]
        reload, snapshot = reload_signal(), snapshot_signal()
        if reload is not None:
            handlers.append((reload, self._on_reload_signal))
        if snapshot is not None:
            handlers.append((snapshot, self._on_snapshot_signal))
        for sig, callback in handlers:
            previous = signal.getsignal(sig)
            try:
                self.loop.add_signal_handler(sig, callback, sig)
                on_loop = True
            except NotImplementedError:
                try:
                    signal.signal(sig, self._forwarder(callback))
                except (OSError, RuntimeError, ValueError) as exc:
                    logger.debug("cannot handle %s here: %s", _signame(sig), exc)
                    continue
                on_loop = False
            except (RuntimeError, ValueError) as exc:
                logger.debug("cannot handle %s on this loop: %s", _signame(sig), exc)
                continue
            self._saved_handlers.append((sig, previous, on_loop))

    def _forwarder(self, callback: Callable[[int], None]) -> Callable[[int, Any], None]:
        """A ``signal.signal`` handler that runs ``callback(signum)`` on the loop."""
        loop = self.loop

        def handler(signum: int, frame: Any) -> None:
            try:
                loop.call_soon_threadsafe(callback, signum)
            except RuntimeError:  # the loop closed in the meantime: nothing to stop
                pass

        return handler

    def restore_signal_handlers(self) -> None:
        saved, self._saved_handlers = self._saved_handlers, []
        for sig, previous, on_loop in reversed(saved):
            if on_loop:
                try:
                    self.loop.remove_signal_handler(sig)
                except Exception as exc:  # a closed or broken loop: restore below anyway
                    logger.debug("removing the %s handler failed: %s", _signame(sig), exc)
            elif previous is None:
                # The previous handler was not Python's: put back what
                # remove_signal_handler would (our forwarder must not outlive the loop).
                previous = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            if previous is not None:
                try:
                    signal.signal(sig, previous)
                except (OSError, ValueError, TypeError) as exc:
                    logger.debug("restoring the %s handler failed: %s", _signame(sig), exc)

    def _on_stop_signal(self, signum: int) -> None:
        name = _signame(signum)
        if self._stop_signal_seen:
            code = 128 + signum
            logger.warning(
                "%s received again: not waiting for the shutdown to finish; exiting now (%d)",
                name,
                code,
            )
            if not self._force.done():
                self._force.set_result(code)
            return
        self._stop_signal_seen = True
        again = {signal.SIGINT: "Ctrl-C", getattr(signal, "SIGBREAK", None): "Ctrl-Break"}.get(
            signum, name
        )
        if self.token.is_cancelled():
            logger.warning(
                "%s received: already shutting down (%s); send %s again to exit at once",
                name,
                self.token.reason(),
                again,
            )
            return
        logger.info(
            "%s received: shutting down (deadline %gs); send %s again to exit at once",
            name,
            self.deadline,
            again,
        )
        self.service.request_shutdown(ShutdownReason.UserRequested())

    def _on_reload_signal(self, signum: int) -> None:
        name = _signame(signum)
        if self.token.is_cancelled():
            logger.info("%s received: ignored, already shutting down", name)
            return
        logger.info(
            "%s received: reload requested; shutting down so that the supervisor restarts "
            "the service (deadline %gs)",
            name,
            self.deadline,
        )
        self.service.request_shutdown(ShutdownReason.ReloadRequested())

    def _on_snapshot_signal(self, signum: int) -> None:
        logger.info("%s", self.describe_tasks())

    def describe_tasks(self) -> str:
        """The live task snapshot, as a multi-line text (what SIGUSR1 logs)."""
        now = time.monotonic()
        live = sorted(self.registry.snapshot(), key=lambda s: s.spawned_at)
        python = sum(1 for s in live if s.origin == "python")
        phase = self.phases.current() or "unknown"
        state = f"stopping ({self.token.reason()})" if self.token.is_cancelled() else "running"
        head = (
            f"service {self.label} {state}, phase {phase}: {len(live)} live task(s) "
            f"({python} python, {len(live) - python} native)"
        )
        stats = self.registry.stats()
        head += (
            f"; spawned {stats.spawned}, completed {stats.completed}, failed {stats.failed}, "
            f"cancelled {stats.cancelled}, aborted {stats.aborted}"
        )
        if not live:
            return head
        width = min(48, max(len(s.name) for s in live[:_MAX_SNAPSHOT_LINES]))
        lines = [head, f"  {'NAME':<{width}}  {'KIND':<14}  {'ORIGIN':<6}  AGE"]
        for s in live[:_MAX_SNAPSHOT_LINES]:
            lines.append(
                f"  {s.name:<{width}}  {_kind(s):<14}  {s.origin:<6}  {_age(now - s.spawned_at)}"
            )
        if len(live) > _MAX_SNAPSHOT_LINES:
            lines.append(f"  ... and {len(live) - _MAX_SNAPSHOT_LINES} more")
        return "\n".join(lines)

    # ----------------------------------------------------------------- shutdown, systemd

    async def _on_token_fired(self) -> None:
        await self.token.cancelled()
        reason = self.token.reason()
        if self._notifier is not None:
            self._stopping_sent = True
            self._notifier.send("STOPPING=1", f"STATUS=stopping: {reason}")
        self.monitor.start()

    async def _notify_ready(self) -> None:
        if not await self.phases.wait_started(self.token):
            return
        if self._notifier is not None and not self._stopping_sent:
            self._ready_sent = True
            self._notifier.send("READY=1", f"STATUS=running: {self.label}")

    def _ping_watchdog(self, interval: float) -> None:
        if self._notifier is not None:
            self._notifier.send("WATCHDOG=1")
            self._watchdog = self.loop.call_later(interval, self._ping_watchdog, interval)

    def close_display(self) -> None:
        self.monitor.stop()


def _quiet_pending_task_noise(loop: asyncio.AbstractEventLoop) -> None:
    """Drop "Task was destroyed but it is pending!" for the tasks a forced exit abandoned."""
    previous = loop.get_exception_handler()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("task") in _abandoned or "destroyed but it is pending" in str(
            context.get("message", "")
        ):
            return
        if previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)


# --------------------------------------------------------------------------- phases


class _PhaseWatch:
    """Which lifecycle stage the service is in, for READY=1 and the shutdown display.

    Uses ``Service._add_phase_listener(callback)`` when the service offers it
    (called with each phase name as the lifecycle enters it); otherwise reads
    ``Service._phase``. Phase names: ``created``, ``pre_start``, ``on_start``,
    ``run``, ``join``, ``on_stop``, ``post_stop``, ``exited``.
    """

    def __init__(self, service: object) -> None:
        self._service = service
        self._value: str | None = None
        self._changed: list[Callable[[], None]] = []
        add = getattr(service, "_add_phase_listener", None)
        self._listening = callable(add)
        if callable(add):
            add(self._on_phase)

    def _on_phase(self, phase: str) -> None:
        self._value = phase
        for wake in self._changed:
            wake()

    def current(self) -> str | None:
        if self._listening:
            return self._value
        phase = getattr(self._service, "_phase", None)
        return phase if isinstance(phase, str) else None

    async def wait_started(self, token: ShutdownToken) -> bool:
        """Wait until ``on_start`` has returned successfully (``run`` began); ``False`` if
        the service never got there."""
        if self._listening:
            loop = asyncio.get_running_loop()
            while True:
                phase = self._value
                if phase == "run":
                    return True
                if phase is not None and phase not in _STARTUP_PHASES:
                    return False
                fut: asyncio.Future[None] = loop.create_future()

                def wake(fut: asyncio.Future[None] = fut) -> None:
                    if not fut.done():
                        fut.set_result(None)

                self._changed.append(wake)
                try:
                    await fut
                finally:
                    self._changed.remove(wake)
        if self.current() is None:
            logger.debug("cannot observe the service's phase: READY=1 is sent at start")
            return True
        while True:
            phase = self.current()
            if phase == "run":
                return True
            if phase not in _STARTUP_PHASES:
                return False
            await asyncio.sleep(_READY_POLL)


# --------------------------------------------------------------------------- shutdown display


@dataclass
class _Seen:
    """The last look at one live task."""

    summary: TaskSummary | None
    """``None`` for the ``run`` hook, which is not a tracked task."""
    stack: list[tuple[str, int, str]] = field(default_factory=list)
    awaiting: str | None = None


class _ShutdownMonitor:
    """Shows the shutdown as it happens and names what refused to stop."""

    def __init__(self, runner: _Runner, stream: IO[str]) -> None:
        self.runner = runner
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
            self.task = self.runner.loop.create_task(
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
        runner = self.runner
        reason = runner.token.reason()
        live = len(runner.registry)
        logger.info(
            "shutdown started (%s): waiting up to %gs per stage for run() and %d task(s)",
            reason,
            runner.deadline,
            live,
        )
        # The display follows the level of this logger, on a terminal too.
        show = logger.isEnabledFor(logging.INFO)
        in_place = self.tty and show
        if in_place:
            self._filter_log_handlers()
        phase = runner.phases.current()
        stage_start = self.fired_at
        last_plain = time.monotonic()
        last_look = -math.inf
        live_tasks: list[TaskSummary] = []
        while True:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            current = runner.phases.current()
            if current != phase:
                phase, stage_start = current, now
            # A snapshot of a huge registry is not free: look less often then.
            if len(runner.registry) <= _MANY_TASKS or now - last_look >= _PLAIN_EVERY:
                live_tasks = self._look(phase)
                last_look = now
            if not show:
                continue
            budget = self._stage_budget(phase)
            left = max(0.0, budget - (now - stage_start))
            if not live_tasks and phase not in ("run", "on_stop", "post_stop"):
                self._clear_line()
                continue
            line = self._progress_line(phase, live_tasks, left, budget)
            if in_place:
                self._show_line(line)
            elif now - last_plain >= _PLAIN_EVERY:
                last_plain = now
                logger.info("%s", line)

    def _stage_budget(self, phase: str | None) -> float:
        runner = self.runner
        if phase in ("on_stop", "post_stop") and runner.hook_timeout is not None:
            return min(runner.deadline, runner.hook_timeout)
        return runner.deadline

    def _look(self, phase: str | None) -> list[TaskSummary]:
        """Take the registry's snapshot and the stacks of (up to ``_MAX_STACKS`` of) its
        Python tasks, and of the ``run`` hook while it is still running."""
        live = self.runner.registry.snapshot()
        wanted: set[str] = set()
        for s in live:
            if s.origin == "python":
                wanted.add(s.name)
                if len(wanted) >= _MAX_STACKS:
                    break
        want_run = phase == "run"
        found: dict[str, asyncio.Task[Any]] = {}
        run_task: asyncio.Task[Any] | None = None
        if wanted or want_run:
            for task in asyncio.all_tasks(self.runner.loop):
                name = task.get_name()
                if name in wanted:
                    # Same-named tasks: the first found stands for all; enough to find the bug.
                    found.setdefault(name, task)
                elif want_run and name.startswith(_RUN_HOOK_TASK_PREFIX):
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
        self, phase: str | None, live: list[TaskSummary], left: float, budget: float
    ) -> str:
        stage = {
            "run": "waiting for run() to return",
            "join": "joining tasks",
            "on_stop": "running on_stop",
            "post_stop": "running post_stop",
        }.get(phase or "", "stopping")
        names = [s.name for s in live[:_MAX_NAMES]]
        more = f" (+{len(live) - _MAX_NAMES} more)" if len(live) > _MAX_NAMES else ""
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
            f"service {self.runner.label}: shutdown deadline of {err.deadline:g}s exceeded; "
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
        listed = ", ".join(names[:_MAX_NAMES])
        more = f", ... +{len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else ""
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
        live = self.runner.registry.snapshot()
        names = ", ".join(s.name for s in live[:_MAX_NAMES])
        more = f" (+{len(live) - _MAX_NAMES} more)" if len(live) > _MAX_NAMES else ""
        phase = self.runner.phases.current() or "stopping"
        logger.warning(
            "service %s: forced exit with code %d during %s; %d task(s) abandoned%s",
            self.runner.label,
            code,
            phase,
            len(live),
            f": {names}{more}" if live else "",
        )


# --------------------------------------------------------------------------- helpers


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


def _label(service: Service[Any, Any, Any]) -> str:
    """The node's ``NAME``, else its class name (as ``Service`` labels its logs)."""
    name = getattr(service.node, "NAME", None)
    return name if isinstance(name, str) and name else type(service.node).__name__


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


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
