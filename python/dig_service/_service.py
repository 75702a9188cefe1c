"""``Service``: ordered start-up and shut-down of a node around a task registry.

The contract of :meth:`Service.start` (SPEC section 3, written as data in
``contract/start.toml``) is implemented here; the tracking, the deadline join
and the shutdown token are the Rust core's (``dig_service._core``). The
service moves through the phases of ``_phase.Phase`` and tells its
listeners (the runner) each time.

Design notes:

- ``start()`` runs the lifecycle in an inner *lifecycle task* and waits for
  it without propagating its own cancellation into it: it awaits a future of
  its own, which the lifecycle resolves as its last act when it returns (else
  the lifecycle task's done callback does), so that ``start()`` resumes the
  loop turn after the lifecycle ends.
  That is what lets a cancelled ``start()`` still wind the service down —
  fire the token, join the tasks, run ``on_stop``/``post_stop`` — bounded by
  the shutdown budget, before ``CancelledError`` propagates.
- One budget: from the token firing, ``run`` and the join share
  ``shutdown_deadline - stop_reserve``; ``on_stop`` and ``post_stop`` share
  what is left, never less than ``stop_reserve``. The moment the token fired
  is stamped by a future parked on it (``_watch_fire``); every limit is
  counted from it. At the end of the join's share the stacks of the Python
  stragglers are taken, then they are cancelled (``_join``), for the
  ``ShutdownReport``.
- Each hook runs in its own asyncio task, so that the lifecycle can stop
  waiting for a hook that outlives ``hook_timeout`` (or ``run`` that
  outlives the shutdown deadline) even when the hook swallows cancellation.
  The hooks share one ``contextvars.Context`` (a copy of the caller's, taken
  when ``start()`` begins), so a context variable set in ``pre_start`` is
  seen by ``run``, as if the hooks ran in one task. An edge hook the node
  keeps from ``NodeLifecycle`` (it does nothing) is not called at all: no
  task, no wait, no loop turn. Running other hooks' first step inline in the
  lifecycle task was tried and left out: on CPython 3.12+ a hook frame that
  ends with an exception there keeps its caller's frames as ``f_back``, and
  the recorded failure then keeps the service alive.
- The join is ``join_all``'s own loop (``TaskRegistry._try_close``), run in
  the lifecycle task, so that the stacks of the stragglers can be taken at
  the deadline before they are stopped: no task of its own. Its first try
  counts the tasks that have already returned or been cancelled (their done
  callbacks are a loop turn away), so a service whose tasks stop at once
  closes without waiting for them.
- The result of ``start()`` is recorded once in a thread-safe slot shared
  with every ``ServiceHandle`` (``_handle.ExitSlot``); ``wait_for_exit()`` can be awaited on any
  event loop, in any thread. Nothing recorded refers to the service: the
  lifecycle returns its failures instead of raising them (no traceback
  through its frames), ``start()`` drops ``self`` before it raises one, and
  no global root refers to the service (its ``__del__`` abandons the slot of a
  service dropped before it finished). A failed service is freed as soon as
  its owner drops it.
- The lifecycle task survives its own cancellation (``asyncio.run`` cancels
  every task when ``main()`` returns): every wait in it turns a
  cancellation into a shutdown request and goes on, so the wind-down still
  runs, within the deadline; the task then ends cancelled.
- A hook runs inside ``_guarded``, which returns a ``KeyboardInterrupt`` or
  ``SystemExit`` instead of raising it (raised in a task, asyncio re-raises
  them out of the loop at once): the service winds down, then ``start()``
  raises it.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import sys
import time
import types
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Generic, TypeVar, overload

from ._config import ServiceConfig
from ._core import ShutdownReason, ShutdownToken, TaskKind, TaskRegistry, TaskSummary
from ._errors import (
    AlreadyRunning,
    AlreadyStopped,
    OnStartFailed,
    OnStopFailed,
    PreStartFailed,
    RunFailed,
    ServiceError,
    ShutdownDeadlineExceeded,
    describe_exc,
)
from ._exit import ExitReason, ExitStatus, check_reason, trusted_requested, trusted_status
from ._handle import EXITED as _EXITED
from ._handle import ExitSlot, ServiceHandle
from ._lifecycle import (
    NodeLifecycle,
    NodeLike,
    PeerApi,
    PeerApiLike,
    RpcApi,
    RpcApiLike,
    StartContext,
    StopContext,
    trusted_run_context,
    trusted_start_context,
    trusted_stop_context,
)
from ._phase import Phase, hook_task_name
from ._report import (
    MAX_STACKS,
    PHASE_NAMES,
    PhaseOutcome,
    PhaseReport,
    ShutdownReport,
    StragglerReport,
    format_task_stack,
    trusted_phase_report,
    trusted_shutdown_report,
)
from ._validation import check_node, check_peer_api, check_rpc_api
from ._watchdog import LoopWatch, watch_running_loop

__all__ = ["Service"]

logger: Final = logging.getLogger("dig_service.service")

N = TypeVar("N", bound=NodeLike)
A = TypeVar("A", bound=PeerApiLike | None)
R = TypeVar("R", bound=RpcApiLike | None)

# The phases as module globals: on CPython 3.11 `Phase.RUN` goes through the `__getattr__`
# hook of the enum's metaclass (~1,000 instructions a lookup, where a global is a few
# dozen), and the lifecycle names a phase about fifteen times a start.
_CREATED: Final = Phase.CREATED
_PRE_START: Final = Phase.PRE_START
_ON_START: Final = Phase.ON_START
_RUN: Final = Phase.RUN
_JOIN: Final = Phase.JOIN
_ON_STOP: Final = Phase.ON_STOP
_POST_STOP: Final = Phase.POST_STOP
_EXITED_PHASE: Final = Phase.EXITED

_HOOK_NAMES: Final = {phase: str(phase) for phase in Phase}
"""Each phase's name (a plain ``str``: ``Phase.X.value`` is a Python-level descriptor)."""

_DEFAULT_HOOKS: Final[dict[str, object]] = {
    hook: getattr(NodeLifecycle, hook) for hook in ("pre_start", "on_start", "on_stop", "post_stop")
}
"""``NodeLifecycle``'s edge hooks, which do nothing: a node that keeps one is not called
for it (``Service._passed_over``)."""

_DEFAULT_CONFIG: Final = ServiceConfig()
"""The config of a ``Service`` given none (immutable: one is enough)."""

_CoroutineType: Final = types.CoroutineType

RUN_TASK_NAME: Final = "run"
"""How ``run`` is named in ``ShutdownDeadlineExceeded.pending_names`` when it overruns."""


def _chain(err: ServiceError, cause: BaseException | None) -> ServiceError:
    """``raise err from cause``, without raising."""
    err.__cause__ = cause
    err.__suppress_context__ = True
    return err


# --------------------------------------------------------------------------- service


class Service(Generic[N, A, R]):
    """A node, its peer and RPC APIs, a shutdown token and a task registry.

    ``Service(node, peer_api=None, rpc_api=None, *, config=None)``: ``None``
    in an API slot means the no-op ``PeerApi()`` / ``RpcApi()`` (the
    ``peer_api``/``rpc_api`` properties then return ``None``, what was
    passed). Every hook and API method must be an ``async def``; this is
    checked here, and a mistake is a ``TypeError`` naming the hook.

    ``await service.start()`` runs the lifecycle once (see :meth:`start`).
    """

    @overload
    def __init__(
        self: Service[N, None, None],
        node: N,
        peer_api: None = None,
        rpc_api: None = None,
        *,
        config: ServiceConfig | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self: Service[N, A, None],
        node: N,
        peer_api: A,
        rpc_api: None = None,
        *,
        config: ServiceConfig | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self: Service[N, None, R],
        node: N,
        peer_api: None = None,
        *,
        rpc_api: R,
        config: ServiceConfig | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self, node: N, peer_api: A, rpc_api: R, *, config: ServiceConfig | None = None
    ) -> None: ...
    def __init__(
        self,
        node: Any,
        peer_api: Any = None,
        rpc_api: Any = None,
        *,
        config: ServiceConfig | None = None,
    ) -> None:
        name = check_node(node)
        if peer_api is not None:
            check_peer_api(peer_api)
        if rpc_api is not None:
            check_rpc_api(rpc_api)
        if config is None:
            config = _DEFAULT_CONFIG
        elif not isinstance(config, ServiceConfig):
            raise TypeError(
                "Service(): `config` must be a dig_service.ServiceConfig or None, "
                f"got {type(config).__name__}"
            )

        self._node: N = node
        self._peer_api: A = peer_api
        self._rpc_api: R = rpc_api
        self._config = config
        self._name: str = name or ""
        self._label: str = name or type(node).__name__
        self._token = ShutdownToken()
        self._tasks = TaskRegistry(self._token)
        self._slot = ExitSlot()  # abandoned by __del__ if start() never finished

        # Lifecycle state (owned by the loop that runs start()).
        self._phase_value = _CREATED
        self._phase_listeners: list[Callable[[Phase], object]] = []
        self._hook_task: asyncio.Task[Any] | None = None
        self._startup_aborted = False
        self._torn_down = False
        self._lifecycle_task: asyncio.Task[Any] | None = None
        self._exited: asyncio.Future[None] | None = None  # what start() awaits
        self._start_ctx: StartContext | None = None  # see _start_context
        self._stop_ctx: StopContext | None = None  # see _stop_context
        self._hook_context: contextvars.Context | None = None
        # The shutdown: when the token fired (loop time), the tasks live then, and what
        # the report says of each stage.
        self._fire_watch: asyncio.Future[None] | None = None
        self._fired_at: float | None = None
        self._live_at_fire = 0
        self._phases: dict[str, PhaseReport] = {}
        self._stragglers: list[StragglerReport] = []
        # The loop-stall watchdog over the loop start() runs on (its own, or
        # the runner's): the metrics' loop lag reads it (dig_service.metrics).
        self._loop_watch: LoopWatch | None = None

    def __del__(self, _finalizing: Callable[[], bool] = sys.is_finalizing) -> None:
        # Gone before start() finished (or was ever called): no result will come, the
        # handles' waiters are released with AlreadyStopped. Nothing at interpreter exit
        # (a `weakref.finalize` with `atexit = False` did the same, at ~10x the cost of a
        # Service a start, and its registry was a global root to keep weak).
        # Read as an attribute, not through `self.__dict__` (which would build the dict
        # the instance's attributes do without), and the slot's state read as is: this
        # runs once a service.
        try:
            slot = self._slot
        except AttributeError:  # __init__ raised before it made the slot
            return
        if slot._state != _EXITED and not _finalizing():
            slot.abandon("the Service was garbage-collected before its start() finished")

    # ----------------------------------------------------------------- accessors

    @property
    def node(self) -> N:
        """The node."""
        return self._node

    @property
    def peer_api(self) -> A:
        """The peer API passed to the constructor (``None``: the no-op ``PeerApi()`` is used)."""
        return self._peer_api

    @property
    def rpc_api(self) -> R:
        """The RPC API passed to the constructor (``None``: the no-op ``RpcApi()`` is used)."""
        return self._rpc_api

    @property
    def _peer_api_impl(self) -> PeerApiLike:
        """The peer API in use: the one passed, or a no-op ``PeerApi()`` (made when asked
        for: nothing in the lifecycle needs it)."""
        return self._peer_api if self._peer_api is not None else PeerApi()

    @property
    def _rpc_api_impl(self) -> RpcApiLike:
        """The RPC API in use: the one passed, or a no-op ``RpcApi()`` (made when asked
        for: nothing in the lifecycle needs it)."""
        return self._rpc_api if self._rpc_api is not None else RpcApi()

    @property
    def config(self) -> ServiceConfig:
        """The timing limits."""
        return self._config

    @property
    def shutdown_token(self) -> ShutdownToken:
        """The service's shutdown token (also in every hook's context)."""
        return self._token

    @property
    def tasks(self) -> TaskRegistry:
        """The service's task registry (also in every hook's context)."""
        return self._tasks

    def handle(self) -> ServiceHandle:
        """A handle that stays valid, and keeps nothing alive, after the service is gone."""
        return ServiceHandle(self._name, self._token, self._tasks, self._slot)

    def request_shutdown(self, reason: ShutdownReason) -> None:
        """Fire the shutdown token with ``reason`` (first reason wins; safe from any thread).

        Raises:
            TypeError: ``reason`` is not a ``ShutdownReason``.
        """
        if not isinstance(reason, ShutdownReason):  # check_reason's test, without its call
            check_reason(reason, "Service.request_shutdown()")  # raises the TypeError
        self._token.cancel(reason)

    async def wait_for_exit(self) -> ExitStatus:
        """Wait until ``start()`` has finished; return its result or raise its error.

        Usable from any task and any event loop (see ``ServiceHandle.wait_for_exit``).
        """
        return await self._slot.wait()

    def __repr__(self) -> str:
        return f"<Service {self._label!r} {self._slot.state_name()}>"

    # ----------------------------------------------------------------- phases (for the runner)

    @property
    def _phase(self) -> Phase:
        """The lifecycle stage (private; read by ``dig_service.run``)."""
        return self._phase_value

    @_phase.setter
    def _phase(self, phase: Phase) -> None:
        self._enter(phase)

    def _enter(self, phase: Phase) -> None:
        """Enter the stage ``phase`` and tell the listeners (unless it is the current one).

        The lifecycle's hot spots do this inline when nobody listens (the runner is the
        only listener): ``self._phase_value = phase`` is all it does then."""
        if phase == self._phase_value:
            return
        self._phase_value = phase
        if not self._phase_listeners:
            return
        for listener in tuple(self._phase_listeners):
            try:
                listener(phase)
            except Exception:
                logger.exception("service %s: a phase listener failed", self._label)

    def _add_phase_listener(self, callback: Callable[[Phase], object]) -> None:
        """Call ``callback(phase)`` on the loop's thread each time the lifecycle enters a
        stage (private; used by ``dig_service.run`` for READY=1 and its shutdown display)."""
        self._phase_listeners.append(callback)

    # ----------------------------------------------------------------- start

    async def start(self) -> ExitStatus:
        """Run the lifecycle once and return how it ended.

        Order: ``pre_start → on_start → run``; then (once ``run`` returned or
        the token fired) cancel the token → join the tasks → ``on_stop`` →
        ``post_stop``. From the token firing, ``start()`` returns within
        ``shutdown_deadline`` (plus scheduling slack): ``run`` and the join
        share ``shutdown_deadline - stop_reserve``, the stop hooks get the
        rest, never less than ``stop_reserve``.

        ==============================================  ==========================================
        situation                                       result
        ==============================================  ==========================================
        shutdown requested from outside                 ``ExitStatus(RequestedShutdown(reason))``
        ``run`` returned by itself                      ``ExitStatus(RunCompleted())``; the token is
                                                        cancelled with ``RequestedByRun()``
        ``pre_start`` raises                            ``PreStartFailed``; no later hook runs
        ``on_start`` raises                             ``OnStartFailed``; ``post_stop`` runs,
                                                        ``run``/``on_stop`` do not
        ``run`` raises                                  ``RunFailed``; tasks joined, ``on_stop`` and
                                                        ``post_stop`` still run
        ``on_stop`` or ``post_stop`` raises             ``OnStopFailed``; the later hook still runs
        tasks (or ``run``) outlive their share of the   stragglers cancelled/aborted;
        budget after the token fired                    ``ShutdownDeadlineExceeded``
        a hook outlives ``hook_timeout`` (or, once     that hook's failure, cause ``TimeoutError``
        the token fired, its share of the budget)
        shutdown requested before ``start()``           no hook runs; ``RequestedShutdown(reason)``
        shutdown requested while ``pre_start`` runs     ``on_start``/``run`` skipped; tasks joined,
        (and it returns)                                ``post_stop``; ``RequestedShutdown(reason)``
        shutdown requested while ``on_start`` runs      ``run`` skipped; tasks joined, ``on_stop``,
        (and it returns)                                ``post_stop``; ``RequestedShutdown(reason)``
        ``start`` called twice                          ``AlreadyRunning``
        the task awaiting ``start()`` is cancelled      token fired (``UserRequested``), tasks
        (or the lifecycle task itself, as               joined, ``on_stop``/``post_stop`` run, all
        ``asyncio.run`` does to every task when         bounded by the deadline; then
        ``main()`` returns while ``start()`` runs)      ``CancelledError`` propagates
        a hook raises a ``BaseException`` that is not   as if it raised an ``Exception`` (token
        an ``Exception`` (``SystemExit``,               fired, tasks joined, the later stop hooks
        ``KeyboardInterrupt``, ...; not                 run, bounded by the budget); then
        ``CancelledError``)                             ``start()`` re-raises that exception
        ==============================================  ==========================================

        When several stages fail, the error raised is the first of
        run > on_stop > post_stop > join; the others are logged on the
        ``dig_service.service`` logger and added as notes to it. Every
        ``ServiceError`` chains the original exception as ``__cause__``.
        Whenever a shutdown began, the status (``ExitStatus.report``) or the
        error (``ServiceError.report``) carries its ``ShutdownReport``.
        After a failed ``pre_start``/``on_start`` the token is cancelled with
        ``ShutdownReason.Fatal(...)`` and the tasks spawned so far are joined.

        A tracked task that raises ``KeyboardInterrupt`` or ``SystemExit``
        (critical or not) fires the token (``UserRequested`` /
        ``Fatal``); asyncio re-raises those out of the event loop at once, and
        the service winds down while ``asyncio.run`` or ``dig_service.run``
        tear the loop down (see the README's failure table).

        Raises:
            AlreadyRunning: ``start()`` was called before on this service.
            ServiceError: as in the table above.
            BaseException: what a hook raised that is not an ``Exception``.
        """
        if not self._slot.begin():
            raise AlreadyRunning(
                f"Service {self._label!r}: start() was already called; a Service is "
                "single-shot, build a new Service (with a new node) to start again"
            )
        loop = asyncio.get_running_loop()
        watch = None
        stall_warning = self._config.stall_warning
        if stall_warning is not None:  # else watch_running_loop makes none: not called
            try:
                watch = watch_running_loop(stall_warning, self._label)
            except BaseException:  # no thread for the watchdog: nothing started yet
                self._slot.abandon(
                    f"service {self._label!r}: the loop-stall watchdog did not start"
                )
                raise
            self._loop_watch = watch
        self._hook_context = contextvars.copy_context()
        lifecycle = loop.create_task(
            self._lifecycle(), name=f"dig_service.lifecycle[{self._label}]"
        )
        self._lifecycle_task = lifecycle
        # Resolved by the lifecycle itself as its last act when it returns (start()
        # resumes one loop turn after it ends, not two: no done callback in between), or
        # else by `_record_outcome`. Ours alone: cancelling it (when the caller of start()
        # is cancelled) touches nothing else.
        exited: asyncio.Future[None] = loop.create_future()
        self._exited = exited
        lifecycle.add_done_callback(self._record_outcome)
        service, slot = weakref.ref(self), self._slot
        # What start() raises is also what every handle's wait_for_exit()
        # raises: its traceback (this frame included) must not hold the
        # service, or a kept handle (or a recorded failure) would keep it,
        # and its node, alive. The lifecycle task holds it while it runs.
        del self
        escape: _Escape | None = None
        try:
            try:
                await exited
            except asyncio.CancelledError:
                me = service()
                if me is not None:  # always, while the lifecycle runs
                    await me._wind_down_after_cancel(lifecycle)
                    del me
                escape = _escape_of(lifecycle)
                if escape is None:
                    raise
        finally:
            if watch is not None:
                watch.stop()
        if escape is not None:
            # A hook's BaseException outranks the cancellation. Raised out of
            # the handler, so that its context is left as it was.
            raise escape.exc
        return _result_of(lifecycle, slot)

    def _record_outcome(self, task: asyncio.Task[Any]) -> None:
        """Done callback of the lifecycle task when it did not return normally (the
        lifecycle removes it when it does): record what it did not record itself, and
        wake ``start()``."""
        self._wake_start()
        if task.cancelled():
            self._slot.abandon(
                f"the lifecycle task of service {self._label!r} was cancelled before it began"
            )
            return
        exc = task.exception()
        if exc is not None:  # not expected: `_lifecycle` returns its failures
            self._slot.finish(exc)

    async def _wind_down_after_cancel(self, lifecycle: asyncio.Task[Any]) -> None:
        """The caller of ``start()`` was cancelled: stop the service before re-raising.

        The token is fired (``UserRequested``; an earlier reason wins), a
        running ``pre_start``/``on_start`` is cancelled (it then counts as
        failed, so ``post_stop`` still runs after ``on_start``), and the
        lifecycle winds down as for any shutdown: every stage after the token
        fired is bounded by ``shutdown_deadline``. A second cancellation does
        not cut the clean-up short.
        """
        logger.info(
            "service %s: the task awaiting start() was cancelled; shutting down", self._label
        )
        self._abort_startup()
        while not lifecycle.done():
            try:
                await _first_done(lifecycle.get_loop(), (lifecycle,))
            except asyncio.CancelledError:
                continue
        if lifecycle.cancelled():
            return  # the lifecycle was torn down too: it reported its outcome itself
        outcome = lifecycle.exception() or lifecycle.result()
        if isinstance(outcome, _Escape):
            return  # start() raises it instead of CancelledError
        if isinstance(outcome, BaseException):
            # start() raises CancelledError, not this: make sure it is seen.
            logger.error(
                "service %s stopped with an error after start() was cancelled",
                self._label,
                exc_info=outcome,
            )

    def _abort_startup(self) -> None:
        """Fire the token (``UserRequested``; an earlier reason wins) and cancel a running
        ``pre_start``/``on_start`` (it then counts as failed)."""
        self._token.cancel(ShutdownReason.UserRequested())
        self._startup_aborted = True
        if self._phase in (_PRE_START, _ON_START) and self._hook_task is not None:
            self._hook_task.cancel()

    def _lifecycle_cancelled(self) -> None:
        """The lifecycle task itself was cancelled (``asyncio.run`` cancels every task when
        ``main()`` returns while ``start()`` still runs in another one): wind the service
        down as for a cancelled ``start()``, and go on waiting where it was."""
        if not self._torn_down:
            self._torn_down = True
            logger.warning(
                "service %s: its lifecycle task was cancelled (is asyncio.run() ending while "
                "start() still runs in a task of its own?); shutting down: the tasks are "
                "joined and on_stop/post_stop run, within the shutdown deadline",
                self._label,
            )
        self._abort_startup()

    async def _wait(
        self, futs: tuple[asyncio.Future[Any], ...], within: float | None = None
    ) -> None:
        """Wait in the lifecycle task until one of ``futs`` is done, or ``within`` seconds
        have passed (``asyncio.wait`` with ``FIRST_COMPLETED``, lighter), which a
        cancellation does not cut short: the service winds down instead
        (``_lifecycle_cancelled``) and the wait goes on, to the same end. Nothing in
        ``futs`` is cancelled."""
        for fut in futs:
            if fut.done():
                return  # nothing to wait for (asyncio.wait would still take two loop turns)
        loop = asyncio.get_running_loop()
        end = None if within is None else loop.time() + within
        while True:
            try:
                await _first_done(loop, futs, end)
                return
            except asyncio.CancelledError:
                self._lifecycle_cancelled()

    # ----------------------------------------------------------------- lifecycle

    async def _lifecycle(self) -> ExitStatus | ServiceError | _Escape:
        """Run the stages; record their outcome for ``wait_for_exit``; return it.

        Failures are returned, not raised (``start()`` raises them), so that no
        frame of the lifecycle, which holds the service, is in their traceback.
        """
        try:
            outcome = await self._stages()
        finally:
            if self._fire_watch is not None and not self._fire_watch.done():
                self._fire_watch.cancel()
            self._fire_watch = None
        self._slot.finish(outcome.error if isinstance(outcome, _Escape) else outcome)
        if self._torn_down:
            # Nobody may be waiting for start() any more: say how it ended.
            if isinstance(outcome, ExitStatus):
                logger.info("service %s: stopped: %s", self._label, outcome)
            else:
                err = outcome.error if isinstance(outcome, _Escape) else outcome
                logger.error("service %s: stopped: %s", self._label, err, exc_info=err)
            if isinstance(outcome, _Escape):
                raise outcome.exc
            raise asyncio.CancelledError
        # Returning: wake start() now (it resumes on the next loop turn), and drop the
        # done callback that would otherwise run then (it records nothing for a
        # lifecycle that returns).
        task = self._lifecycle_task
        if task is not None:
            task.remove_done_callback(self._record_outcome)
        self._wake_start()
        return outcome

    def _wake_start(self) -> None:
        """Resolve the future ``start()`` awaits (once)."""
        exited = self._exited
        if exited is not None and not exited.done():
            exited.set_result(None)

    async def _stages(self) -> ExitStatus | ServiceError | _Escape:
        token = self._token
        logger.debug("service %s: starting", self._label)
        self._watch_fire()

        if token.is_cancelled():
            # Requested before start(): the service never starts, no hook runs; the
            # tasks already in its registry are joined (the budget counts from start()).
            logger.info("service %s: shutdown requested before start(): no hook runs", self._label)
            reason = trusted_requested(_reason_of(token))
            return await self._wind_down(reason, [], on_stop=False, post_stop=False)

        if self._passed_over(_PRE_START):
            exc = None
        else:
            exc = await self._edge_hook(_PRE_START, self._start_context())
        # A shutdown requested before pre_start ended: then the service has a report.
        requested = token.is_cancelled()
        if exc is not None:
            primary = self._hook_failure(PreStartFailed, "pre_start", exc)
            self._fire_after("pre_start", exc)
            join_err = await self._join(self._share_end())
            self._finish_phase()
            failed = self._outcome([("pre_start", exc, primary), ("joining tasks", None, join_err)])
            assert failed is not None
            if requested:
                self._attach(failed, self._report())
            return failed
        if requested:
            return await self._startup_interrupted("pre_start", on_start_completed=False)

        if self._passed_over(_ON_START):
            exc = None
        else:
            exc = await self._edge_hook(_ON_START, self._start_context())
        if exc is not None:
            primary = self._hook_failure(OnStartFailed, "on_start", exc)
            self._fire_after("on_start", exc)
            return await self._wind_down(
                ExitReason.RunError(exc), [("on_start", exc, primary)], on_stop=False
            )
        if token.is_cancelled():
            return await self._startup_interrupted("on_start", on_start_completed=True)

        logger.info("service %s: started", self._label)
        exit_reason, run_exc, run_overran = await self._drive_run()
        failures: list[tuple[str, BaseException | None, ServiceError | None]] = []
        if run_exc is not None:
            failures.append(("run", run_exc, self._hook_failure(RunFailed, "run", run_exc)))
        return await self._wind_down(exit_reason, failures, run_overran=run_overran)

    async def _startup_interrupted(
        self, hook: str, *, on_start_completed: bool
    ) -> ExitStatus | ServiceError | _Escape:
        """The token fired while the start-up hook ``hook`` ran, and it returned: ``run`` is
        skipped, the service winds down (``on_stop`` only if ``on_start`` completed) and
        ``start()`` returns ``RequestedShutdown``."""
        logger.info("service %s: shutdown requested during %s; run is skipped", self._label, hook)
        reason = trusted_requested(_reason_of(self._token))
        return await self._wind_down(reason, [], on_stop=on_start_completed)

    async def _wind_down(
        self,
        exit_reason: ExitReason,
        failures: list[tuple[str, BaseException | None, ServiceError | None]],
        *,
        on_stop: bool = True,
        post_stop: bool = True,
        run_overran: bool = False,
    ) -> ExitStatus | ServiceError | _Escape:
        """After the token fired: join the tasks in what is left of the share of ``run`` and
        the join, then ``on_stop`` (if ``on_stop``) and ``post_stop`` (if ``post_stop``) in
        the stop hooks' window; return the outcome, with its report attached.

        ``failures``: the failures so far (``(stage, exception, error)``, each with an
        error), which outrank every later one."""
        loop = asyncio.get_running_loop()
        # `run` past its share: the share is spent, every task still live is a straggler.
        join_err = await self._join(loop.time() if run_overran else self._share_end())
        if run_overran:
            names = [RUN_TASK_NAME]
            if isinstance(join_err, ShutdownDeadlineExceeded):
                names += join_err.pending_names
            elif join_err is not None:
                logger.error("service %s: joining tasks failed", self._label, exc_info=join_err)
            join_err = ShutdownDeadlineExceeded(self._config.shutdown_deadline, len(names), names)

        stop_by = self._stop_end(loop.time())
        for hook, wanted in ((_ON_STOP, on_stop), (_POST_STOP, post_stop)):
            if not wanted:
                continue
            if self._passed_over(hook):
                exc = None
            else:
                ctx = self._stop_context(exit_reason)
                exc = await self._edge_hook(hook, ctx, stop_by=stop_by)
            if exc is not None:
                name = _HOOK_NAMES[hook]
                failures.append((name, exc, self._hook_failure(OnStopFailed, name, exc)))
        if self._phase_listeners:
            self._enter(_EXITED_PHASE)
        else:
            self._phase_value = _EXITED_PHASE  # what _enter does when nobody listens
        if join_err is not None:
            failures.append(("joining tasks", None, join_err))
        report = self._report()
        failed = self._outcome(failures) if failures else None
        if failed is not None:
            self._attach(failed, report)
            return failed
        status = trusted_status(exit_reason, report)
        logger.info("service %s: stopped: %s", self._label, status)
        return status

    # ----------------------------------------------------------------- the budget

    def _watch_fire(self) -> None:
        """Stamp the moment the token fires (loop time) and the tasks live then: the
        budget and the report count from it. At once if it has fired already."""
        fired = self._token._park()
        if fired is None:
            self._mark_fired()
            return
        self._fire_watch = fired
        me = weakref.ref(self)  # the token (held by every handle) must not hold the service

        def on_fire(f: asyncio.Future[None]) -> None:
            service = me()
            if service is not None and not f.cancelled():
                service._mark_fired()

        fired.add_done_callback(on_fire)

    def _mark_fired(self) -> None:
        """Record the token's firing, now, unless it was recorded already (first wins)."""
        if self._fired_at is None:
            self._fired_at = asyncio.get_running_loop().time()
            self._live_at_fire = len(self._tasks)

    def _fired(self) -> float:
        """When the token fired (loop time). Asked only once it has: a firing from
        another thread whose callback has not run yet is stamped now."""
        if self._fired_at is None:
            self._mark_fired()
        assert self._fired_at is not None
        return self._fired_at

    def _share_end(self) -> float:
        """The end of the share of ``run`` and the join (and of a start-up hook the token
        interrupted): ``shutdown_deadline - stop_reserve`` after the token fired."""
        return self._fired() + self._config.run_and_join_budget

    def _stop_end(self, start: float) -> float:
        """The end of the stop hooks' window when they start at ``start``: what is left of
        the budget, never less than the reserve."""
        config = self._config
        return max(self._fired() + config.shutdown_deadline, start + config.stop_reserve)

    def _report(self) -> ShutdownReport:
        """The report of the shutdown, as it stands now (its end)."""
        loop = asyncio.get_running_loop()
        fired = self._fired()
        watch = self._fire_watch
        if watch is not None and not watch.done():
            watch.cancel()
        self._fire_watch = None
        return trusted_shutdown_report(
            _reason_of(self._token),
            max(0.0, loop.time() - fired),
            self._live_at_fire,
            [self._phases.get(name) or _SKIPPED[name] for name in PHASE_NAMES],
            list(self._stragglers),
        )

    @staticmethod
    def _attach(failed: ServiceError | _Escape, report: ShutdownReport) -> None:
        """Attach ``report`` to the error that is raised (and recorded)."""
        error = failed.error if isinstance(failed, _Escape) else failed
        error.report = report

    def _outcome(
        self, failures: Sequence[tuple[str, BaseException | None, ServiceError | None]]
    ) -> ServiceError | _Escape | None:
        """The failure to report, from ``(stage, hook exception, error)`` in priority order.

        A hook's ``BaseException`` that is not an ``Exception`` (``SystemExit``,
        ``KeyboardInterrupt``, ...) comes first: ``start()`` re-raises it. Otherwise the
        first error is raised. The others are logged and noted on what is raised.
        """
        raised = [(what, exc, err) for what, exc, err in failures if err is not None]
        if not raised:
            return None
        first = next((i for i, (_, exc, _) in enumerate(raised) if _escapes(exc)), 0)
        _, exc, err = raised.pop(first)
        assert err is not None
        self._with_secondary(err, [(w, e) for w, _, e in raised])
        if exc is not None and _escapes(exc):
            return _Escape(exc, err)
        return err

    def _finish_phase(self) -> None:
        self._enter(_EXITED_PHASE)

    def _fire_after(self, hook: str, exc: BaseException) -> None:
        """Cancel the token after ``hook`` failed with ``exc``, so that the tasks wind down:
        ``UserRequested`` for a ``KeyboardInterrupt``, else ``Fatal``."""
        if isinstance(exc, KeyboardInterrupt):
            self._token.cancel(ShutdownReason.UserRequested())
        else:
            verb = "raised" if _escapes(exc) else "failed:"
            self._token.cancel(ShutdownReason.Fatal(f"{hook} {verb} {describe_exc(exc)}"))

    @overload
    def _hook_failure(
        self, kind: type[ServiceError], hook: str, exc: BaseException
    ) -> ServiceError: ...
    @overload
    def _hook_failure(
        self, kind: type[ServiceError], hook: str, exc: BaseException | None
    ) -> ServiceError | None: ...
    def _hook_failure(
        self, kind: type[ServiceError], hook: str, exc: BaseException | None
    ) -> ServiceError | None:
        """``kind`` naming the service and the hook, with ``exc`` as its cause."""
        if exc is None:
            return None
        if isinstance(exc, asyncio.CancelledError) and self._startup_aborted:
            what = f"{hook} was cancelled (start() was cancelled)"
        elif _escapes(exc):
            what = f"{hook} raised {describe_exc(exc)}"
        else:
            what = f"{hook} failed: {describe_exc(exc)}"
        return _chain(kind(f"service {self._label!r}: {what}"), exc)

    def _with_secondary(
        self, primary: ServiceError, others: Sequence[tuple[str, BaseException | None]]
    ) -> ServiceError:
        """Log every secondary failure and note it on the error that is raised."""
        for what, err in others:
            if err is None:
                continue
            primary.add_note(f"also, {what} failed: {err}")
            logger.error(
                "service %s: %s failed too (reported: %s)",
                self._label,
                what,
                type(primary).__name__,
                exc_info=err,
            )
        return primary

    def _call_hook(
        self, hook: str, target: object, *args: object
    ) -> asyncio.Task[Any] | BaseException:
        """Start ``target.hook(*args)`` in its own task (sharing the hooks' context)."""
        loop = asyncio.get_running_loop()
        try:
            fn: Callable[..., object] = getattr(target, hook)
            awaitable = fn(*args)
        except Exception as exc:  # a hook that raises before returning a coroutine
            return exc
        # A coroutine (what an `async def` hook returns) is awaitable: asked of anything else.
        if type(awaitable) is not _CoroutineType and not inspect.isawaitable(awaitable):
            return TypeError(
                f"{type(target).__name__}.{hook}() returned {type(awaitable).__name__}, "
                f"not a coroutine; declare it `async def {hook}(...)`"
            )
        return loop.create_task(
            _guarded(awaitable),
            name=hook_task_name(hook, self._label),
            context=self._hook_context,
        )

    def _start_context(self) -> StartContext:
        """The context of ``pre_start`` and ``on_start`` (one for both), made when the
        first of them is called: none for a node that keeps both defaults."""
        if self._start_ctx is None:
            self._start_ctx = trusted_start_context(self._name, self._token, self._tasks)
        return self._start_ctx

    def _stop_context(self, exit_reason: ExitReason) -> StopContext:
        """The context of ``on_stop`` and ``post_stop`` (one for both), made when the
        first of them is called: none for a node that keeps both defaults."""
        if self._stop_ctx is None:
            self._stop_ctx = trusted_stop_context(self._token, self._tasks, exit_reason)
        return self._stop_ctx

    def _passed_over(self, hook: Phase) -> bool:
        """Whether the edge hook ``hook`` is ``NodeLifecycle``'s own (it does nothing) and
        was passed over here, at once: its stage entered and recorded (``"ok"``) as
        ``_edge_hook`` does for it, with no call, no task, no coroutine and no context.
        ``False``: ``_edge_hook`` runs it (or says why it does not run)."""
        if self._startup_aborted and (hook is _PRE_START or hook is _ON_START):
            return False  # not started: _edge_hook says so
        name = _HOOK_NAMES[hook]
        # NodeLifecycle's own: found on the node's class, not shadowed by the instance,
        # and not replaced since import.
        node = self._node
        own = getattr(node, "__dict__", None)
        if (own is not None and name in own) or getattr(
            type(node), name, None
        ) is not _DEFAULT_HOOKS.get(name):
            return False
        if self._phase_listeners:
            self._enter(hook)
        else:
            self._phase_value = hook  # what _enter does when nobody listens
        if hook is _ON_STOP or hook is _POST_STOP:
            # Recorded for the report as a hook that ran: "ok", in no time (it was not called).
            self._phases[name] = _PASSED_OVER[name]
        return True

    async def _edge_hook(
        self, hook: Phase, ctx: object, *, stop_by: float | None = None
    ) -> BaseException | None:
        """Run one edge hook; return its exception, or ``None`` if it succeeded.

        The hook is bounded by ``hook_timeout`` from its start and by its share of the
        shutdown budget: a start-up hook, once the token fired, by the end of the share
        of ``run`` and the join; a stop hook by ``stop_by``, the end of the stop hooks'
        window. A hook that overruns is cancelled (and no longer waited for) and its
        failure is a ``TimeoutError`` saying which limit it hit. A stop hook's duration
        and outcome go into the report.
        """
        self._enter(hook)
        if hook in (_PRE_START, _ON_START) and self._startup_aborted:
            return asyncio.CancelledError(f"{hook} was not started: start() was cancelled")
        loop = asyncio.get_running_loop()
        started = loop.time()
        name = _HOOK_NAMES[hook]
        task = self._call_hook(name, self._node, ctx)
        if isinstance(task, BaseException):
            self._record_phase(hook, started, "failed")
            return task
        self._hook_task = task
        token, hook_timeout = self._token, self._config.hook_timeout
        hook_end = None if hook_timeout is None else started + hook_timeout
        budget_end: float | None = stop_by
        try:
            if stop_by is None:
                fired = token._park()  # a plain future: resolved when the token fires
                if fired is not None:
                    try:
                        await self._wait((task, fired), within=hook_timeout)
                    finally:
                        if not fired.done():
                            fired.cancel()
                if not task.done() and token.is_cancelled():
                    budget_end = self._share_end()
            if not task.done() and budget_end is not None:
                end = budget_end if hook_end is None else min(budget_end, hook_end)
                await self._wait((task,), within=max(0.0, end - loop.time()))
        finally:
            self._hook_task = None
        if not task.done():
            task.cancel()
            _reap(task, self._label, hook)
            await self._wait((task,), within=0)  # one step to handle the cancellation
            self._record_phase(hook, started, "timed_out")
            if budget_end is not None and (hook_end is None or budget_end < hook_end):
                limit = (
                    f"its share of the shutdown budget ({self._config.shutdown_deadline:g}s "
                    "from the token firing, ServiceConfig.shutdown_deadline / stop_reserve)"
                )
            else:
                limit = f"{hook_timeout:g}s (ServiceConfig.hook_timeout)"
            return TimeoutError(
                f"hook `{hook}` of service {self._label!r} did not finish within {limit} "
                "and was cancelled"
            )
        exc = _hook_exception(task)
        self._record_phase(hook, started, "ok" if exc is None else "failed")
        return exc

    def _record_phase(self, hook: Phase, started: float, outcome: PhaseOutcome) -> None:
        """Record a stop hook's duration and outcome for the report."""
        if hook is _ON_STOP or hook is _POST_STOP:
            took = asyncio.get_running_loop().time() - started
            name = _HOOK_NAMES[hook]
            self._phases[name] = trusted_phase_report(name, took, outcome)  # type: ignore[arg-type]

    async def _drive_run(self) -> tuple[ExitReason, BaseException | None, bool]:
        """Run ``run`` until it returns, bounded by its share of the budget once the token
        fired.

        Returns ``(exit_reason, run_exception, run_overran)``. Whatever the
        outcome, the token has fired when this returns.
        """
        token = self._token
        if self._phase_listeners:
            self._enter(_RUN)
        else:
            self._phase_value = _RUN  # what _enter does when nobody listens
        run_ctx = trusted_run_context(token, self._tasks)
        run_task = self._call_hook("run", self._node, run_ctx)
        if isinstance(run_task, BaseException):
            self._fire_after("run", run_task)
            self._run_phase("failed")
            return ExitReason.RunError(run_task), run_task, False

        overran = False
        while not run_task.done() and not token.is_cancelled():
            # The future parked on the token since start() (`_watch_fire`) is resolved when
            # it fires: waited on as is (not cancelled here: it stamps the firing), with no
            # other parked for this wait (the core parks, then wakes, each one).
            fired = self._fire_watch
            parked = fired is None or fired.done()  # then a future of this wait's own
            if parked:
                fired = token._park()
            if fired is None:
                break
            try:
                await self._wait((run_task, fired))
            finally:
                if parked and not fired.done():
                    fired.cancel()
        if not run_task.done():
            # The token fired first: `run` has its share of the budget to return.
            loop = asyncio.get_running_loop()
            await self._wait((run_task,), within=max(0.0, self._share_end() - loop.time()))
            if not run_task.done():
                overran = True
                run_task.cancel()
                _reap(run_task, self._label, "run")
                await self._wait((run_task,), within=0)

        if overran:
            logger.error(
                "service %s: run did not return within its share of the shutdown budget "
                "(%gs after the token fired); it was cancelled",
                self._label,
                self._config.run_and_join_budget,
            )
            self._run_phase("timed_out")
            return trusted_requested(_reason_of(token)), None, True

        exc = _hook_exception(run_task)
        if isinstance(exc, asyncio.CancelledError) and self._torn_down:
            exc = None  # cancelled along with the lifecycle task: run ended by the shutdown
        if exc is not None:
            self._fire_after("run", exc)
            self._run_phase("failed")
            return ExitReason.RunError(exc), exc, False
        if not token.is_cancelled():
            token.cancel(ShutdownReason.RequestedByRun())
            self._mark_fired()
            if token.reason() == ShutdownReason.RequestedByRun():
                self._run_phase("ok")
                return ExitReason.RunCompleted(), None, False
            # Someone else's reason won the race: it is theirs that is reported.
        self._run_phase("ok")
        return trusted_requested(_reason_of(token)), None, False

    def _run_phase(self, outcome: PhaseOutcome) -> None:
        """Record ``run``'s stage: from the token firing until ``run`` ended."""
        took = max(0.0, asyncio.get_running_loop().time() - self._fired())
        self._phases["run"] = trusted_phase_report("run", took, outcome)

    async def _join(self, until: float) -> ServiceError | None:
        """Join the tracked tasks until ``until`` (loop time); return the error instead of
        raising it, and record the join and its stragglers for the report.

        This is ``TaskRegistry.join_all`` (its body, in the lifecycle task): at ``until``,
        the stacks of the Python stragglers are taken (before they are cancelled), then
        ``_stop_stragglers`` stops every task still live and names them, as
        ``join_all`` does at its deadline. A cancellation of the lifecycle task does not
        cut the join short: it goes on to the same end.
        """
        if self._phase_listeners:
            self._enter(_JOIN)
        else:
            self._phase_value = _JOIN  # what _enter does when nobody listens
        tasks = self._tasks
        loop = asyncio.get_running_loop()
        started = loop.time()
        seen: _Look | None = None
        err: BaseException | None = None
        # The body of `join_all(until - now)`, here, so that the stacks can be taken at the
        # deadline before the stragglers are stopped, with no task of its own.
        while True:
            idle: asyncio.Future[Any] = loop.create_future()
            try:
                if tasks._try_close(idle):  # closed, with no task live
                    break
            except Exception as exc:  # not expected from the core: reported below
                err = exc.with_traceback(None)
                break
            if loop.time() >= until:
                seen = _look_at_stragglers(tasks, loop)
                try:
                    tasks._stop_stragglers(0.0)  # raises ShutdownDeadlineExceeded
                except Exception as exc:  # reported below
                    err = exc.with_traceback(None)
                break
            timer = loop.call_at(until, _resolve, idle, _TIMED_OUT)
            try:
                timed_out = await idle is _TIMED_OUT
            except asyncio.CancelledError:
                self._lifecycle_cancelled()  # the join goes on, to the same end
                timed_out = False
            finally:
                timer.cancel()
            if timed_out:
                # At the deadline: one last chance to be closed by now, else stop them.
                until = min(until, loop.time())
        took = loop.time() - started
        if err is None:
            self._phases["join"] = trusted_phase_report("join", took, "ok")
            return None
        if isinstance(err, ShutdownDeadlineExceeded):
            self._phases["join"] = trusted_phase_report("join", took, "timed_out")
            self._stragglers = _stragglers(err.pending_names, seen)
            # A new one: the whole budget as the deadline, and no traceback through our
            # frames, which hold the service.
            deadline = self._config.shutdown_deadline
            return ShutdownDeadlineExceeded(deadline, err.pending, err.pending_names)
        self._phases["join"] = trusted_phase_report("join", took, "failed")
        # Not expected from the core: report it, keep going.
        what = f"service {self._label!r}: joining tasks failed: {describe_exc(err)}"
        return _chain(ServiceError(what), err.with_traceback(None))


_SKIPPED: Final = {name: PhaseReport(name, 0.0, "skipped") for name in PHASE_NAMES}
"""The report of each stage that did not run (immutable values: one of each is enough)."""

_PASSED_OVER: Final = {name: PhaseReport(name, 0.0, "ok") for name in ("on_stop", "post_stop")}
"""The report of a stop hook passed over (``Service._passed_over``): ``"ok"``, in no time
(immutable values: one of each is enough)."""

_TIMED_OUT: Final = object()
"""What the join's timer resolves its future with."""


def _resolve(fut: asyncio.Future[Any], value: object) -> None:
    if not fut.done():
        fut.set_result(value)


class _Look:
    """What the lifecycle saw of the live tasks at the join's deadline, before stopping
    them: their summaries, and the stacks of (up to ``MAX_STACKS`` of) the Python ones."""

    __slots__ = ("stacks", "summaries")

    def __init__(self, summaries: list[TaskSummary], stacks: dict[str, list[str]]) -> None:
        self.summaries = summaries
        self.stacks = stacks


def _look_at_stragglers(tasks: TaskRegistry, loop: asyncio.AbstractEventLoop) -> _Look:
    """The registry's snapshot, and the stacks of its Python tasks running on ``loop``
    (by name, in spawn order for same-named ones), taken while they are still suspended
    where they were stuck."""
    summaries = tasks.snapshot()
    wanted: dict[str, int] = {}
    for s in summaries:
        if s.origin == "python" and sum(wanted.values()) < MAX_STACKS:
            wanted[s.name] = wanted.get(s.name, 0) + 1
    stacks: dict[str, list[str]] = {}
    if wanted:
        for task in asyncio.all_tasks(loop):
            name = task.get_name()
            if len(stacks.get(name, ())) < wanted.get(name, 0):
                stacks.setdefault(name, []).append(format_task_stack(task))
    return _Look(summaries, stacks)


def _stragglers(names: Sequence[str], look: _Look | None) -> list[StragglerReport]:
    """A report of each straggler ``join_all`` named, with what was seen of it just before
    (a task spawned after the look has no kind or age to tell: a placeholder)."""
    by_name: dict[str, list[TaskSummary]] = {}
    stacks: dict[str, list[str]] = {}
    if look is not None:
        for s in look.summaries:
            by_name.setdefault(s.name, []).append(s)
        stacks = {name: list(found) for name, found in look.stacks.items()}
    now = time.monotonic()
    report = []
    for name in names:
        same = by_name.get(name)
        if not same:
            report.append(StragglerReport(name, TaskKind.BackgroundLoop, "python", 0.0, None))
            continue
        s = same.pop(0)
        stack = None
        if s.origin == "python" and stacks.get(name):
            stack = stacks[name].pop(0)
        report.append(StragglerReport(name, s.kind, s.origin, max(0.0, now - s.spawned_at), stack))
    return report


class _Escape:
    """A hook raised ``exc``, a ``BaseException`` that is not an ``Exception``: the service
    wound down as for an ``Exception`` (``error``, what ``wait_for_exit`` raises), and
    ``start()`` re-raises ``exc``."""

    __slots__ = ("error", "exc")

    def __init__(self, exc: BaseException, error: ServiceError) -> None:
        self.exc = exc
        self.error = error


class _Raised:
    """What a hook task returns instead of raising ``KeyboardInterrupt``/``SystemExit``."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _escapes(exc: BaseException | None) -> bool:
    """Whether ``exc`` is a ``BaseException`` that ``start()`` re-raises (after winding
    down): not an ``Exception``, not a cancellation."""
    return exc is not None and not isinstance(exc, Exception | asyncio.CancelledError)


async def _guarded(awaitable: Awaitable[object]) -> object:
    """A hook, in its task.

    A ``KeyboardInterrupt`` or ``SystemExit`` raised in a task is re-raised by
    asyncio out of the event loop at once, stopping the loop in the middle of
    the lifecycle: the hook's task returns it instead, the lifecycle winds the
    service down, and ``start()`` raises it then.
    """
    try:
        return await awaitable
    except (KeyboardInterrupt, SystemExit) as exc:
        return _Raised(exc)


async def _first_done(
    loop: asyncio.AbstractEventLoop,
    futs: tuple[asyncio.Future[Any], ...],
    end: float | None = None,
) -> None:
    """Wait until one of ``futs`` is done or the loop's clock reaches ``end``: what
    ``asyncio.wait(futs, timeout=..., return_when=FIRST_COMPLETED)`` does, with one future
    and one callback a future instead of a set and a counter. A cancellation of the
    waiting task cancels only its own waiter, never one of ``futs``."""
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    for fut in futs:
        fut.add_done_callback(wake)
    timer = None if end is None else loop.call_at(end, wake)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        for fut in futs:
            fut.remove_done_callback(wake)


def _hook_exception(task: asyncio.Task[Any]) -> BaseException | None:
    """What a finished hook task raised (or returned as ``_Raised``), or ``None``."""
    if task.cancelled():
        try:
            task.result()
        except asyncio.CancelledError as cancelled:
            # Raised here: its traceback is this frame's, nothing of the hook's
            # (the hook's own CancelledError is its context).
            return cancelled.with_traceback(None)
    exc = task.exception()
    if exc is not None:
        return exc
    result = task.result()
    return result.exc if isinstance(result, _Raised) else None


def _escape_of(lifecycle: asyncio.Task[Any]) -> _Escape | None:
    if lifecycle.done() and not lifecycle.cancelled() and lifecycle.exception() is None:
        result = lifecycle.result()
        if isinstance(result, _Escape):
            return result
    return None


def _result_of(lifecycle: asyncio.Task[Any], slot: ExitSlot) -> ExitStatus:
    """What ``start()`` returns (or raises) once its lifecycle task is done."""
    if lifecycle.cancelled():
        # Torn down (asyncio.run's clean-up cancels every task), with start()'s
        # caller still waiting: what it recorded, if it got that far.
        outcome = slot.outcome()
        if isinstance(outcome, ExitStatus):
            return outcome
        if outcome is None or isinstance(outcome, AlreadyStopped):
            raise asyncio.CancelledError
        raise outcome
    result = lifecycle.result()
    if isinstance(result, _Escape):
        raise result.exc
    if isinstance(result, ServiceError):
        raise result
    assert isinstance(result, ExitStatus)
    return result


def _reason_of(token: ShutdownToken) -> ShutdownReason:
    reason = token.reason()
    if reason is None:  # pragma: no cover - callers only ask once the token fired
        raise AssertionError("the shutdown token has no reason although it fired")
    return reason


def _reap(task: asyncio.Task[Any], label: str, hook: str) -> None:
    """Log what an abandoned hook task does once it finally ends (never lose an error)."""

    def done(t: asyncio.Task[Any]) -> None:
        if t.cancelled():
            return
        exc = t.exception()
        if exc is None and isinstance(t.result(), _Raised):
            exc = t.result().exc
        if exc is not None:
            logger.error("service %s: %s raised after it was abandoned", label, hook, exc_info=exc)

    task.add_done_callback(done)
