"""``ServiceConfig``: the timing limits of a ``Service``, and how durations are read.

A duration is given as float (or int) seconds or a ``datetime.timedelta``
and stored as float seconds; a wrong type is a ``TypeError``, a negative,
NaN or infinite value a ``ValueError``, and either message names the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import final

__all__ = ["ServiceConfig", "seconds"]


def seconds(value: object, owner: str, field: str) -> float:
    """``value`` as finite, non-negative float seconds, or an error naming ``field``."""
    if isinstance(value, timedelta):
        secs = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            secs = float(value)
        except OverflowError:  # an int beyond float range: as infinite, refused below
            raise ValueError(
                f"{owner}: `{field}` must be a finite number of seconds >= 0, "
                "got an int too large for a float"
            ) from None
    else:
        raise TypeError(
            f"{owner}: `{field}` must be a number of seconds (int or float) or a "
            f"datetime.timedelta, got {type(value).__name__}"
        )
    if math.isnan(secs) or math.isinf(secs) or secs < 0:
        raise ValueError(f"{owner}: `{field}` must be a finite number of seconds >= 0, got {secs}")
    return secs


@final
@dataclass(frozen=True, slots=True, init=False)
class ServiceConfig:
    """Timing limits of a ``Service``.

    Args:
        shutdown_deadline: seconds (or a ``timedelta``): the **total** budget
            of a shutdown, from the token firing until ``start()`` returns,
            whatever the node does. ``run`` and the join of the tracked tasks
            share ``shutdown_deadline - stop_reserve`` (stragglers are
            cancelled/aborted and ``start()`` raises
            ``ShutdownDeadlineExceeded``); ``on_stop`` and ``post_stop`` get
            what is left, never less than ``stop_reserve`` (a hook past it is
            abandoned and fails with a ``TimeoutError`` cause). Default 30.
        hook_timeout: seconds (or a ``timedelta``) each edge hook
            (``pre_start``, ``on_start``, ``on_stop``, ``post_stop``) may take;
            a hook that outlives it is cancelled and counts as failed, with a
            ``TimeoutError`` as cause. ``None`` (the default): no limit.
        stop_reserve: seconds (or a ``timedelta``) of ``shutdown_deadline``
            kept for ``on_stop`` and ``post_stop``, so that stragglers cannot
            eat the time a flush needs. ``None`` (the default):
            ``min(5.0, shutdown_deadline / 4)``. Must not exceed
            ``shutdown_deadline``.
        stall_warning: seconds (or a ``timedelta``) the event loop may go
            without turning while ``start()`` runs before a native watchdog
            thread logs a warning on ``dig_service.watchdog`` with the loop
            thread's Python stack (once per stall, then the stall's length
            when it ends). At least 0.01. ``None`` (the default): no watchdog.

    Immutable (assigning a field raises ``AttributeError``: build a new one);
    compares and hashes by value; pickles.

    Raises:
        TypeError: a field is not a number, a ``timedelta`` (or ``None`` for
            ``hook_timeout``, ``stop_reserve`` and ``stall_warning``); the message
            names the field.
        ValueError: a field is negative, NaN or infinite (an int too large
            for a float counts as infinite: there is no "no limit" spelling of
            a deadline), ``hook_timeout`` is zero, ``stop_reserve`` exceeds
            ``shutdown_deadline`` or ``stall_warning`` is below 0.01; the message
            names the field.
    """

    shutdown_deadline: float
    hook_timeout: float | None
    stop_reserve: float
    """The reserve in force (the default already worked out when none was given)."""
    stall_warning: float | None

    def __init__(
        self,
        shutdown_deadline: float | timedelta = 30.0,
        hook_timeout: float | timedelta | None = None,
        stop_reserve: float | timedelta | None = None,
        stall_warning: float | timedelta | None = None,
    ) -> None:
        deadline = seconds(shutdown_deadline, "ServiceConfig", "shutdown_deadline")
        timeout: float | None = None
        if hook_timeout is not None:
            timeout = seconds(hook_timeout, "ServiceConfig", "hook_timeout")
            if timeout == 0:
                raise ValueError(
                    "ServiceConfig: `hook_timeout` must be > 0 seconds "
                    "(every hook would time out at once); use None for no limit"
                )
        if stop_reserve is None:
            reserve = min(5.0, deadline / 4)
        else:
            reserve = seconds(stop_reserve, "ServiceConfig", "stop_reserve")
            if reserve > deadline:
                raise ValueError(
                    f"ServiceConfig: `stop_reserve` ({reserve:g}s) must not exceed "
                    f"`shutdown_deadline` ({deadline:g}s): the reserve is the part of the "
                    "shutdown budget kept for on_stop and post_stop"
                )
        stall: float | None = None
        if stall_warning is not None:
            stall = seconds(stall_warning, "ServiceConfig", "stall_warning")
            if stall < 0.01:
                raise ValueError(
                    "ServiceConfig: `stall_warning` must be at least 0.01 seconds, "
                    f"got {stall}; use None for no loop-stall watchdog"
                )
        # Frozen: the fields are set once, here, past the dataclass's guard.
        object.__setattr__(self, "shutdown_deadline", deadline)
        object.__setattr__(self, "hook_timeout", timeout)
        object.__setattr__(self, "stop_reserve", reserve)
        object.__setattr__(self, "stall_warning", stall)

    @property
    def run_and_join_budget(self) -> float:
        """``shutdown_deadline - stop_reserve``: what ``run`` and the join share."""
        return self.shutdown_deadline - self.stop_reserve

    def __reduce__(
        self,
    ) -> tuple[type[ServiceConfig], tuple[float, float | None, float, float | None]]:
        # Rebuilt through __init__, so an unpickled config is validated too.
        return (
            ServiceConfig,
            (self.shutdown_deadline, self.hook_timeout, self.stop_reserve, self.stall_warning),
        )
