"""The stages of a ``Service``'s lifecycle, and the names of its hooks' asyncio tasks.

``Service`` moves through the phases in this order (skipping those a
failure skips) and tells its listeners (``dig_service.run``: ``READY=1``,
the shutdown display) each time it enters one. Private: the phase is read
through ``Service._phase``.
"""

from __future__ import annotations

from enum import StrEnum, unique
from typing import Final

__all__ = ["STARTUP_PHASES", "Phase", "hook_task_name"]


@unique
class Phase(StrEnum):
    """A lifecycle stage. A ``StrEnum``: ``.value`` (and ``str()``) is the stage's name."""

    CREATED = "created"
    """``start()`` has not been called."""
    PRE_START = "pre_start"
    ON_START = "on_start"
    RUN = "run"
    """``run`` is running (``on_start`` returned successfully)."""
    JOIN = "join"
    """The token has fired and ``run`` has returned: the tracked tasks are being joined."""
    ON_STOP = "on_stop"
    POST_STOP = "post_stop"
    EXITED = "exited"
    """``start()`` has its result."""


STARTUP_PHASES: Final = frozenset({Phase.CREATED, Phase.PRE_START, Phase.ON_START})
"""The phases before ``run``: the service is not serving yet."""


def hook_task_name(hook: str, label: str) -> str:
    """The name of the asyncio task that runs ``hook`` of the service labelled ``label``
    (``dig_service.run[mynode]``): how ``Service`` names it and how the runner finds it."""
    return f"dig_service.{hook}[{label}]"
