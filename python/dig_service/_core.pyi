"""Type stubs for the native core ``dig_service._core`` (checked by ``mypy.stubtest``)."""

from asyncio import Future, Task
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from datetime import timedelta
from typing import Any, ClassVar, Self, final

from typing_extensions import disjoint_base

from dig_service._report import ShutdownReport

__all__ = [
    "AlreadyRunning",
    "AlreadyStopped",
    "KindStats",
    "LoopWatchdog",
    "OnStartFailed",
    "OnStopFailed",
    "PreStartFailed",
    "Restart",
    "RestartPolicy",
    "RunFailed",
    "ServiceError",
    "ShutdownDeadlineExceeded",
    "ShutdownReason",
    "ShutdownToken",
    "SupervisedHandle",
    "TaskHandle",
    "TaskKind",
    "TaskRegistry",
    "TaskStats",
    "TaskSummary",
    "__version__",
    "_after_fork_in_child",
    "_after_fork_in_parent",
    "_before_fork",
    "_bridged_sleep",
    "_emit_tracing_event",
    "_format_task_stack",
    "_restore_reason",
    "_shutdown_at_exit",
    "runtime_started",
    "shutdown_runtime",
    "spawn_native_sleeper",
]

__version__: str

# The ServiceError family: defined by _core itself (compiled from
# rust/src/python/errors.py), re-exported by dig_service._errors.

class ServiceError(Exception):
    """Base class of every error raised by a ``Service`` or its ``TaskRegistry``.

    Attributes:
        report: the ``ShutdownReport`` of the shutdown this error ended, set by
            ``Service.start()`` whenever a shutdown began; ``None`` otherwise.
    """

    report: ShutdownReport | None

class PreStartFailed(ServiceError):
    """``pre_start`` raised (or timed out); no later hook ran."""

class OnStartFailed(ServiceError):
    """``on_start`` raised (or timed out); ``post_stop`` ran, ``run`` and ``on_stop`` did not."""

class RunFailed(ServiceError):
    """``run`` raised; tasks were joined and ``on_stop`` and ``post_stop`` still ran."""

class OnStopFailed(ServiceError):
    """``on_stop`` or ``post_stop`` raised (or timed out); the later hook still ran."""

class AlreadyRunning(ServiceError):
    """``start()`` was called on a service that was already started."""

class AlreadyStopped(ServiceError):
    """The task registry is closed (``join_all`` has finished): nothing more can be spawned."""

class ShutdownDeadlineExceeded(ServiceError):
    """Tracked tasks were still running when the shutdown deadline passed.

    Attributes:
        deadline: the deadline, in seconds.
        pending: how many tasks were still running when it passed.
        pending_names: their names.
    """

    deadline: float
    pending: int
    pending_names: list[str]
    def __init__(self, deadline: float, pending: int, pending_names: Sequence[str]) -> None: ...
    def __reduce__(
        self,
    ) -> tuple[type[ShutdownDeadlineExceeded], tuple[float, int, list[str]]]: ...

@final
class TaskKind:
    """What a tracked task is for (observability only)."""

    BackgroundLoop: ClassVar[TaskKind]
    PeerConnection: ClassVar[TaskKind]
    RpcHandler: ClassVar[TaskKind]
    Maintenance: ClassVar[TaskKind]
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@disjoint_base
class ShutdownReason:
    """Why the service is shutting down. Variants compare by value."""

    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __reduce__(self) -> tuple[Callable[[str, str], ShutdownReason], tuple[str, str]]: ...
    @final
    class UserRequested(ShutdownReason):
        __match_args__: ClassVar[tuple[()]] = ()
        def __new__(cls) -> Self: ...

    @final
    class RpcRequested(ShutdownReason):
        __match_args__: ClassVar[tuple[()]] = ()
        def __new__(cls) -> Self: ...

    @final
    class ReloadRequested(ShutdownReason):
        __match_args__: ClassVar[tuple[()]] = ()
        def __new__(cls) -> Self: ...

    @final
    class RequestedByRun(ShutdownReason):
        __match_args__: ClassVar[tuple[()]] = ()
        def __new__(cls) -> Self: ...

    @final
    class Fatal(ShutdownReason):
        __match_args__: ClassVar[tuple[str]] = ("message",)
        def __new__(cls, message: str) -> Self: ...
        @property
        def message(self) -> str: ...

@final
class ShutdownToken:
    """A broadcast cancellation flag with a typed, first-wins reason.

    Thread-safe: ``cancel`` from any thread (or from Rust) wakes every
    ``cancelled()`` waiter on every event loop, with one wake-up per loop.
    """

    def __new__(cls) -> Self: ...
    def is_cancelled(self) -> bool: ...
    def cancel(self, reason: ShutdownReason) -> None: ...
    def reason(self) -> ShutdownReason | None: ...
    def cancelled(self) -> Coroutine[Any, Any, None]: ...
    def _park(self) -> Future[None] | None:
        """Internal: park a future on the running loop until the token fires (the body
        of ``cancelled()``); ``None`` if it already has."""

    def child_token(self) -> ShutdownToken: ...
    def same_as(self, other: ShutdownToken) -> bool: ...

@final
class TaskSummary:
    """One live task: its name, kind, ``time.monotonic()`` spawn instant and origin.

    ``spawned_at`` is read from the kernel's coarse clock, so it may be up
    to one clock tick (a few milliseconds) early. Within one registry, a
    later spawn never has an earlier ``spawned_at``.
    """

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> TaskKind: ...
    @property
    def spawned_at(self) -> float: ...
    @property
    def origin(self) -> str: ...
    @property
    def restarts(self) -> int:
        """Restarts of a supervised task so far; 0 for a plain task."""

@final
class TaskStats:
    """Counters of a registry since it was created."""

    @property
    def spawned(self) -> int: ...
    @property
    def completed(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def cancelled(self) -> int: ...
    @property
    def aborted(self) -> int: ...
    @property
    def restarted(self) -> int:
        """Restarts of supervised tasks (each supervised task counts once in ``spawned``)."""

    @property
    def live(self) -> int: ...

@final
class KindStats:
    """The counters of one task kind and origin (see ``TaskRegistry.stats_by_kind``)."""

    @property
    def kind(self) -> TaskKind: ...
    @property
    def origin(self) -> str: ...
    @property
    def spawned(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def restarted(self) -> int: ...
    @property
    def live(self) -> int: ...

@final
class TaskHandle:
    """A tracked task: abort it, ask whether it finished, or await its result."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> TaskKind: ...
    @property
    def origin(self) -> str: ...
    def abort(self) -> None: ...
    def is_finished(self) -> bool: ...
    def __await__(self) -> Generator[Any, None, Any]: ...
    def __call__(self, task: Any, /) -> None:
        """Internal: the done callback of the handle's own asyncio task.

        It reports the task's end to the registry (once); the event loop
        calls it. Called with any other object it raises TypeError.
        """

@final
class Restart:
    """When a supervised task is restarted."""

    Permanent: ClassVar[Restart]
    """Restarted whenever it ends (returns or raises) while the service runs."""
    Transient: ClassVar[Restart]
    """Restarted only when it raises."""
    Temporary: ClassVar[Restart]
    """Never restarted."""

    def __eq__(self, value: object, /) -> bool: ...
    def __ne__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __int__(self) -> int: ...

@final
class RestartPolicy:
    """How a supervised task is restarted, and when it gives up.

    Every field is checked here, naming the field: a policy that exists is valid.
    """

    def __new__(
        cls,
        restart: Restart = ...,
        max_restarts: int = 5,
        within: float | timedelta = 60.0,
        backoff: float | timedelta = 0.1,
        max_backoff: float | timedelta = 30.0,
        critical: bool = True,
    ) -> Self: ...
    @property
    def restart(self) -> Restart: ...
    @property
    def max_restarts(self) -> int: ...
    @property
    def within(self) -> float: ...
    @property
    def backoff(self) -> float: ...
    @property
    def max_backoff(self) -> float: ...
    @property
    def critical(self) -> bool: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __ne__(self, value: object, /) -> bool: ...

@final
class SupervisedHandle:
    """A supervised task: its name, kind and restarts; stop it for good, or await its end.

    Awaiting it returns when the task ended cleanly or by shutdown, and raises the last
    error when it stopped after a failure (gave up, or a failure not restarted).
    """

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> TaskKind: ...
    @property
    def restarts(self) -> int: ...
    def abort(self) -> None: ...
    def is_finished(self) -> bool: ...
    def __await__(self) -> Generator[Any]: ...
    def _incarnation(self) -> Coroutine[Any, Any, Any]:
        """Internal: start an incarnation; the coroutine the factory made."""

    def _ended(self, exc: BaseException | None, cancelled: bool) -> float | None:
        """Internal: an incarnation ended; the delay before the next, or None to stop."""

    def __call__(self, task: Any, /) -> None:
        """Internal: the done callback of the handle's own asyncio task."""

@final
class TaskRegistry:
    """Named, tracked tasks (asyncio and tokio) joined under one deadline."""

    def __new__(cls, shutdown: ShutdownToken) -> Self: ...
    @property
    def shutdown(self) -> ShutdownToken: ...
    def spawn(
        self,
        name: str,
        kind: TaskKind,
        coro: Coroutine[Any, Any, Any],
        *,
        critical: bool = False,
    ) -> TaskHandle: ...
    def supervise(
        self,
        name: str,
        kind: TaskKind,
        factory: Callable[[], Coroutine[Any, Any, Any]],
        *,
        policy: RestartPolicy = ...,
    ) -> SupervisedHandle: ...
    def join_all(self, deadline: float | timedelta) -> Coroutine[Any, Any, None]: ...
    def _try_close(self, fut: Future[None]) -> bool:
        """Internal (the body of ``join_all``): close the registry and return ``True`` if
        no task is live; else return ``False`` and resolve ``fut`` once none is."""

    def _stop_stragglers(self, deadline: float) -> None:
        """Internal (the end of ``join_all``): close the registry, cancel or abort every
        live task, and raise ``ShutdownDeadlineExceeded(deadline, ...)`` naming them."""

    def snapshot(self) -> list[TaskSummary]: ...
    def stats(self) -> TaskStats: ...
    def stats_by_kind(self) -> list[KindStats]:
        """One ``KindStats`` per kind and origin, always all of them, in a fixed order
        (kinds in declaration order, ``"native"`` before ``"python"``)."""

    def is_empty(self) -> bool: ...
    def is_closed(self) -> bool: ...
    def __len__(self) -> int: ...

@final
class LoopWatchdog:
    """A native thread that warns when an event loop stops turning.

    ``LoopWatchdog(stall_warning, thread_id, label, logger)`` starts the
    thread (``thread_id`` is ``threading.get_ident()`` of the loop's thread);
    the loop calls ``beat()`` every ``interval`` seconds; when no beat comes
    for ``stall_warning`` seconds past its due time, one warning with the
    loop thread's stack goes to ``logger`` (default ``dig_service.watchdog``),
    then the stall's length when the loop turns again. ``stop()`` ends the
    thread and waits for it (GIL released).
    """

    def __new__(
        cls,
        stall_warning: float | timedelta,
        thread_id: int,
        label: str,
        logger: str | None = None,
    ) -> Self: ...
    @property
    def interval(self) -> float: ...
    @property
    def stall_warning(self) -> float: ...
    @property
    def stalls(self) -> int: ...
    @property
    def lag(self) -> float:
        """Seconds the loop is behind: how late its last beat came, or how overdue
        the next one is (a stall shows as a growing lag). Safe from any thread."""

    def beat(self) -> None: ...
    def is_running(self) -> bool: ...
    def stop(self) -> None: ...

def spawn_native_sleeper(
    registry: TaskRegistry,
    name: str,
    seconds: float | timedelta,
    *,
    honor_shutdown: bool = True,
    kind: TaskKind | None = None,
) -> TaskHandle: ...
def shutdown_runtime() -> None: ...
def runtime_started() -> bool: ...
def _emit_tracing_event(level: str, message: str) -> None: ...
def _bridged_sleep(
    seconds: float | timedelta, on_drop: Callable[[], object]
) -> Awaitable[None]: ...
def _restore_reason(variant: str, message: str) -> ShutdownReason: ...
def _format_task_stack(task: Task[Any]) -> str: ...
def _before_fork() -> None: ...
def _after_fork_in_parent() -> None: ...
def _after_fork_in_child() -> None: ...
def _shutdown_at_exit() -> None: ...
