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
  current stage and of the whole budget (``shutdown_deadline``) are shown
  (see ``_display``). At the end the service's ``ShutdownReport`` is logged
  once, as one record on ``dig_service.run`` (the report as structured data
  in the record's ``report`` attribute: ``--log-format json`` writes it as
  JSON): each stage's duration and outcome, and every straggler with the
  stack it was stuck in.
- **systemd.** With ``$NOTIFY_SOCKET`` set: ``READY=1`` after ``on_start``,
  ``STOPPING=1`` when the token fires, then ``STATUS=`` with the stage and
  the time left ("stopping: joining 12 tasks, 8.2 s left"), and
  ``WATCHDOG=1`` every ``$WATCHDOG_USEC / 2`` (see ``_systemd``).
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
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Final

from ._control import (
    BoundSocket,
    ControlServer,
    ControlSocketError,
    bind_control_socket,
    final_outcome,
)
from ._core import ShutdownReason
from ._display import MAX_NAMES, ServiceView, ShutdownMonitor, describe_tasks
from ._errors import ServiceError, ShutdownDeadlineExceeded
from ._phase import STARTUP_PHASES, Phase
from ._report import ShutdownReport
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
    of the budget are shown on stderr (in place, on a terminal) or logged on
    ``dig_service.run``; at the end the ``ShutdownReport`` is logged once
    (stragglers named, with their stacks). With ``$NOTIFY_SOCKET`` set,
    systemd is told ``READY=1``, ``STOPPING=1``, the shutdown's progress as
    ``STATUS=`` and, if it asks, ``WATCHDOG=1`` while the loop turns.

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
        outcome = run_service(
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
    """What ``run_service`` ended with: the exit code, and whether a second signal forced it."""

    code: int
    forced: bool = False


def run_service(
    service: Service[Any, Any, Any],
    *,
    install_signal_handlers: bool = True,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    status_stream: IO[str] | None = None,
    plain_status: bool = False,
    control_socket: str | os.PathLike[str] | None = None,
    stall_warning: float | None = None,
    metrics_addr: tuple[str, int] | None = None,
) -> Outcome:
    """``run``, telling the CLI whether the exit was forced (it then skips interpreter teardown).

    ``stall_warning`` (the CLI's ``--stall-warning``) runs a loop-stall
    watchdog around the service when its own ``ServiceConfig.stall_warning``
    is ``None``. ``metrics_addr`` (the CLI's ``--metrics-addr``) serves
    ``/metrics`` at ``(host, port)`` from before ``pre_start`` until the loop
    is closed: the service's ``dig_service.metrics.ServiceCollector`` in
    ``prometheus_client.REGISTRY``, with whatever else is registered there.
    Raises ``ControlSocketError`` or ``MetricsError`` if the control socket
    or the metrics server cannot be set up (before anything else happened).
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
    metrics: _Metrics | None = None
    try:
        if metrics_addr is not None:
            metrics = _Metrics(service, *metrics_addr)
        loop = loop_factory() if loop_factory is not None else asyncio.new_event_loop()
    except BaseException:
        if metrics is not None:
            metrics.close()
        if bound is not None:
            bound.remove()
        raise
    stream = status_stream if status_stream is not None else sys.stderr
    runner = _Runner(service, loop, stream, plain_status=plain_status)
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
        if metrics is not None:
            metrics.close()
        if bound is not None:
            bound.remove()


class MetricsError(Exception):
    """``--metrics-addr`` cannot be served (no prometheus-client, address in use...).

    The message is one line; the CLI exits with status 2.
    """


class _Metrics:
    """The runner's ``/metrics``: the service's collector in the default registry,
    served over HTTP on a thread of its own until ``close()``."""

    def __init__(self, service: Service[Any, Any, Any], host: str, port: int) -> None:
        try:
            from prometheus_client import REGISTRY

            from .metrics import MetricsServer, ServiceCollector
        except ImportError:
            raise MetricsError(
                "--metrics-addr: prometheus-client is not installed "
                "(pip install 'dig-service[metrics]')"
            ) from None
        try:
            self.collector = ServiceCollector(service, registry=REGISTRY)
        except ValueError as exc:
            raise MetricsError(
                f"--metrics-addr: prometheus_client.REGISTRY already has the service's series "
                f"({exc}); do not register a ServiceCollector there yourself"
            ) from None
        self._registry = REGISTRY
        try:
            self.server = MetricsServer(host, port, REGISTRY)
        except OSError as exc:
            REGISTRY.unregister(self.collector)
            raise MetricsError(
                f"--metrics-addr {_format_addr(host, port)}: cannot listen there: "
                f"{exc.strerror or exc}"
            ) from None
        self.server.start()
        host, port = self.server.address
        logger.info("metrics on http://%s/metrics", _format_addr(host, port))

    def close(self) -> None:
        self.server.close()
        self._registry.unregister(self.collector)


def _format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
        self,
        service: Service[Any, Any, Any],
        loop: asyncio.AbstractEventLoop,
        stream: IO[str],
        *,
        plain_status: bool = False,
    ) -> None:
        self.service = service
        self.loop = loop
        self.token = service.shutdown_token
        self.registry = service.tasks
        self.label = service._label
        self.deadline = service.config.shutdown_deadline
        self.phases = _PhaseWatch(service)
        self.view = ServiceView(
            label=self.label,
            loop=loop,
            token=self.token,
            registry=self.registry,
            deadline=self.deadline,
            stop_reserve=service.config.stop_reserve,
            hook_timeout=service.config.hook_timeout,
            phase=self.phases.current,
        )
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
        self.monitor = ShutdownMonitor(self.view, stream, on_status=self._send_status)
        if plain_status:
            self.monitor.tty = False  # progress as log records only (--log-format json)
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
        try:
            if self.stall_warning is not None:
                watch = LoopWatch(self.loop, self.stall_warning, self.label)
                self.service._loop_watch = watch  # for the metrics' loop lag
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
            # No cause to show: the report below names every straggler, with its stack.
            logger.error("service %s failed: %s", self.label, err)
            self._log_report(err.report, failed=True)
            return 1
        except ServiceError as err:
            logger.error("service %s failed: %s", self.label, err, exc_info=err)
            self._log_report(err.report, failed=True)
            return 1
        self._log_report(status.report, failed=not status.is_graceful())
        return status.exit_code

    def _log_report(self, report: ShutdownReport | None, *, failed: bool) -> None:
        """Log the shutdown's report once, as one record: readable text as the message,
        the report as data in the record's ``report`` attribute (``--log-format json``)."""
        if report is None:
            return
        troubled = failed or bool(report.stragglers)
        troubled = troubled or any(p.outcome in ("failed", "timed_out") for p in report.phases)
        logger.log(
            logging.WARNING if troubled else logging.INFO,
            "service %s: %s",
            self.label,
            report,
            extra={"report": report.to_dict()},
        )

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
                            ", ".join(t.get_name() for t in group[:MAX_NAMES]),
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
            "%s received: shutting down (within %gs); send %s again to exit at once",
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
            "the service (within %gs)",
            name,
            self.deadline,
        )
        self.service.request_shutdown(ShutdownReason.ReloadRequested())

    def _on_snapshot_signal(self, signum: int) -> None:
        logger.info("%s", describe_tasks(self.view))

    # ----------------------------------------------------------------- shutdown, systemd

    async def _on_token_fired(self) -> None:
        await self.token.cancelled()
        reason = self.token.reason()
        if self._notifier is not None:
            self._stopping_sent = True
            self._notifier.send("STOPPING=1", f"STATUS=stopping: {reason}")
        self.monitor.start()

    def _send_status(self, text: str) -> None:
        """The shutdown's progress, for systemd (``STATUS=``)."""
        if self._notifier is not None:
            self._notifier.send(f"STATUS={text}")

    async def _notify_ready(self) -> None:
        if not await self.phases.wait_started():
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
    """Which lifecycle phase the service is in, for READY=1 and the display: the service
    calls back (``Service._add_phase_listener``) each time it enters one."""

    def __init__(self, service: Service[Any, Any, Any]) -> None:
        self._value: Phase = service._phase
        self._changed: list[Callable[[], None]] = []
        service._add_phase_listener(self._on_phase)

    def _on_phase(self, phase: Phase) -> None:
        self._value = phase
        for wake in self._changed:
            wake()

    def current(self) -> Phase:
        return self._value

    async def wait_started(self) -> bool:
        """Wait until ``on_start`` has returned successfully (``run`` began); ``False`` if
        the service never got there."""
        loop = asyncio.get_running_loop()
        while True:
            phase = self._value
            if phase is Phase.RUN:
                return True
            if phase not in STARTUP_PHASES:
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


# --------------------------------------------------------------------------- helpers


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
