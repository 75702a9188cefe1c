"""``ServiceHandle``, and the slot that records what ``start()`` ended with.

The result of ``start()`` is recorded once in a thread-safe slot shared by
a ``Service`` and every ``ServiceHandle`` of it; ``wait_for_exit()`` can be
awaited on any event loop, in any thread. A handle holds the slot, the
token and the registry, never the ``Service``: it keeps nothing alive, and
stays valid (its calls harmless) after the service is gone.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Final, final

from ._core import ShutdownReason, ShutdownToken, TaskRegistry, TaskSummary
from ._errors import AlreadyStopped
from ._exit import ExitStatus, check_reason

__all__ = ["EXITED", "ExitSlot", "ServiceHandle"]

_CREATED: Final = 0
_RUNNING: Final = 1
_EXITED: Final = 2
EXITED: Final = _EXITED
"""``ExitSlot._state`` once ``start()``'s outcome is recorded (``Service.__del__`` reads
the state as is)."""


def _release(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class ExitSlot:
    """The one recorded result of ``start()``, shared by a service and its handles.

    Thread-safe: ``finish`` may run on any thread and wakes every waiter on
    its own loop (``call_soon_threadsafe``); a waiter whose loop has closed
    is dropped quietly.
    """

    __slots__ = ("__weakref__", "_lock", "_outcome", "_state", "_waiters")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = _CREATED
        self._outcome: ExitStatus | BaseException | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def begin(self) -> bool:
        """``CREATED → RUNNING``; ``False`` if ``start()`` was called before."""
        with self._lock:
            if self._state != _CREATED:
                return False
            self._state = _RUNNING
            return True

    def is_running(self) -> bool:
        return self._state == _RUNNING

    def is_exited(self) -> bool:
        return self._state == _EXITED

    def state_name(self) -> str:
        """``created``, ``running`` or ``exited`` (for reprs)."""
        return ("created", "running", "exited")[self._state]

    def finish(self, outcome: ExitStatus | BaseException) -> bool:
        """Record ``outcome`` (first record wins) and wake every waiter."""
        with self._lock:
            if self._state == _EXITED:
                return False
            self._state = _EXITED
            self._outcome = outcome
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_release, fut)
            except RuntimeError:  # that loop is closed: its waiter is gone with it
                pass
        return True

    def abandon(self, why: str) -> None:
        """No result will ever come: release the waiters with ``AlreadyStopped``."""
        self.finish(AlreadyStopped(why))

    def outcome(self) -> ExitStatus | BaseException | None:
        """The recorded outcome, or ``None`` before ``finish``."""
        with self._lock:
            return self._outcome

    async def wait(self) -> ExitStatus:
        with self._lock:
            waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
            if self._state != _EXITED:
                loop = asyncio.get_running_loop()
                waiter = (loop, loop.create_future())
                self._waiters.append(waiter)
        if waiter is not None:
            try:
                await waiter[1]
            except asyncio.CancelledError:
                with self._lock:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
                raise
        outcome = self._outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        return outcome


# --------------------------------------------------------------------------- handle


@final
class ServiceHandle:
    """A cheap handle to a ``Service``, for signal handlers, admin RPC and tests.

    It holds the service's token, its registry and its recorded result, but
    not the ``Service``: it never keeps it alive, and it stays valid after
    it is gone. (After a failure, the recorded error keeps its cause's
    traceback, as any kept exception does, and with it what the failing
    hook's frames referenced, such as the node.) Then ``request_shutdown`` cancels a
    token nobody runs on any more, ``tasks()`` is empty and
    ``wait_for_exit()`` returns the recorded result (or raises
    ``AlreadyStopped`` if the service was dropped without finishing
    ``start()``). Every method is safe from any thread; ``wait_for_exit()``
    may be awaited on any event loop.
    """

    __slots__ = ("_name", "_slot", "_tasks", "_token")

    def __init__(self, name: str, token: ShutdownToken, tasks: TaskRegistry, slot: ExitSlot):
        self._name = name
        self._token = token
        self._tasks = tasks
        self._slot = slot

    def name(self) -> str:
        """The node's ``NAME`` (``""`` if it declares none)."""
        return self._name

    def request_shutdown(self, reason: ShutdownReason) -> None:
        """Ask the service to shut down. Only the first reason (from anyone) is kept.

        Raises:
            TypeError: ``reason`` is not a ``ShutdownReason``.
        """
        self._token.cancel(check_reason(reason, "ServiceHandle.request_shutdown()"))

    def is_running(self) -> bool:
        """Whether ``start()`` has been called and has not returned yet.

        Stays ``True`` while the service is *stopping* (token fired, tasks
        joining, ``on_stop``/``post_stop`` running); use
        ``shutdown_token().is_cancelled()`` to tell stopping from serving.
        """
        return self._slot.is_running()

    def shutdown_token(self) -> ShutdownToken:
        """The service's shutdown token."""
        return self._token

    def tasks(self) -> list[TaskSummary]:
        """The live tracked tasks (empty once the service has exited)."""
        return self._tasks.snapshot()

    async def wait_for_exit(self) -> ExitStatus:
        """Wait until ``start()`` has finished and return what it returned (or raise what
        it raised). Returns at once if it already has. Usable from any event loop.

        Raises:
            ServiceError: the error ``start()`` raised; ``AlreadyStopped`` if the
                service was dropped (or its lifecycle task was cancelled) before
                ``start()`` could finish.
        """
        return await self._slot.wait()

    def __repr__(self) -> str:
        return f"<ServiceHandle {self._name!r} {self._slot.state_name()}>"
