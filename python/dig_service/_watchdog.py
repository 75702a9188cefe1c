"""The loop-stall watchdog, loop side: a heartbeat timer for the native watchdog thread.

A synchronous call on the event loop's thread (``time.sleep``, a blocking
socket, a CPU-bound loop) stops every coroutine, timer and I/O callback of
the service, and nothing notices: the loop cannot report on itself while it
is stuck. ``LoopWatch`` arms a ``loop.call_later`` timer that stores a
timestamp in the native ``LoopWatchdog`` every ``stall_warning / 4``
seconds; the watchdog's own thread (Rust, no GIL while it waits) warns on
the ``dig_service.watchdog`` logger, with the loop thread's Python stack,
when that timer is ``stall_warning`` seconds overdue, and logs the stall's
length when the loop turns again. One stall, one warning.

Cost on a turning loop: one timer callback every ``stall_warning / 4``
seconds (an atomic store in Rust); nothing per loop turn beyond what any
pending timer costs (``bench/watchdog.py``).
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ._core import LoopWatchdog

__all__ = ["LoopWatch", "watch_running_loop"]

LOGGER_NAME: Final = "dig_service.watchdog"


class LoopWatch:
    """A native watchdog over the running event loop, fed by a heartbeat timer.

    Built on the loop's thread, while the loop runs; ``stop()`` (idempotent)
    cancels the timer and ends the watchdog thread, waiting for it.
    """

    __slots__ = ("_dog", "_handle", "_interval", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, stall_warning: float, label: str) -> None:
        from ._core import LoopWatchdog

        self._loop = loop
        self._dog: LoopWatchdog = LoopWatchdog(
            stall_warning, threading.get_ident(), label, LOGGER_NAME
        )
        self._interval = self._dog.interval
        self._handle: asyncio.TimerHandle | None = loop.call_later(self._interval, self._tick)

    def _tick(self) -> None:
        self._dog.beat()
        self._handle = self._loop.call_later(self._interval, self._tick)

    @property
    def stalls(self) -> int:
        """How many stalls were reported so far."""
        return self._dog.stalls

    @property
    def lag(self) -> float:
        """Seconds the loop is behind (see ``LoopWatchdog.lag``); any thread may read it."""
        return self._dog.lag

    def is_running(self) -> bool:
        """Whether the watchdog still watches (``stop()`` not called)."""
        return self._dog.is_running()

    def stop(self) -> None:
        """Cancel the heartbeat and stop the watchdog thread (waits for it).

        Called on the loop's thread, so the loop is turning: that is one last
        beat, which closes a stall still open (its "stall ended" line is
        logged before this returns).
        """
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()
            self._dog.beat()
        self._dog.stop()


def watch_running_loop(stall_warning: float | None, label: str) -> LoopWatch | None:
    """A ``LoopWatch`` on the running loop, or ``None`` when ``stall_warning`` is ``None``."""
    if stall_warning is None:
        return None
    return LoopWatch(asyncio.get_running_loop(), stall_warning, label)
