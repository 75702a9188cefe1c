"""The Python half of the mixed Rust/Python example (``rust/examples/mixed.rs``).

The Rust binary embeds CPython, starts an asyncio event loop on a thread of
its own and runs :func:`serve` there with a Python view of the *Rust*
service's task registry. Everything spawned here is tracked by that one
registry, next to the Rust node's tokio tasks, and is joined under the same
shutdown deadline when the Rust side cancels the token (Ctrl-C / SIGTERM).

Nothing here knows it is embedded: it is plain ``dig_service`` code that would
run the same way under ``python -m dig_service``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from dig_service import ShutdownToken, TaskKind, TaskRegistry

log = logging.getLogger("mixed.python")


async def ticker(token: ShutdownToken, period: float) -> str:
    """A background loop: does a bit of work every ``period`` seconds until the token fires."""
    beats = 0
    while not token.is_cancelled():
        try:
            # Wake on the token at once, or after one period.
            await asyncio.wait_for(token.cancelled(), period)
        except TimeoutError:
            beats += 1
            log.info("py-ticker: beat %d", beats)
    log.info("py-ticker: saw the token fire (%r) after %d beats; stopping", token.reason(), beats)
    return f"observed {token.reason()!r}"


async def flush_on_stop(token: ShutdownToken) -> str:
    """A task that only waits for shutdown, then does its (short) cleanup."""
    await token.cancelled()
    log.info("py-flusher: token fired (%r); flushing", token.reason())
    await asyncio.sleep(0.05)  # stands for writing state to disk
    log.info("py-flusher: flushed")
    return f"observed {token.reason()!r}"


async def stubborn() -> str:
    """A task that ignores the token: only the deadline stops it."""
    log.warning("py-stubborn: ignoring the shutdown token (the deadline will cancel me)")
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        log.warning("py-stubborn: cancelled by the shutdown deadline")
        raise
    return "finished"


async def serve(
    registry: TaskRegistry,
    ready: Callable[[list[str]], None],
    *,
    stubborn_task: bool = False,
    period: float = 1.0,
) -> dict[str, str]:
    """Spawn the Python tasks into ``registry`` (the Rust service's), then see them out.

    ``ready(names)`` tells the Rust side that the tasks are tracked. Returns,
    per task, what became of it: ``"observed <reason>"`` for a task that saw
    the token, ``"cancelled"`` for one the deadline stopped.
    """
    token = registry.shutdown
    handles = [
        registry.spawn("py-ticker", TaskKind.BackgroundLoop, ticker(token, period)),
        registry.spawn("py-flusher", TaskKind.Maintenance, flush_on_stop(token)),
    ]
    if stubborn_task:
        handles.append(registry.spawn("py-stubborn", TaskKind.BackgroundLoop, stubborn()))
    log.info("python: spawned %s into the Rust registry", ", ".join(h.name for h in handles))
    ready([h.name for h in handles])

    await token.cancelled()
    log.info("python: token fired (%r); waiting for the Python tasks", token.reason())
    # Each task either returns once it saw the token, or is cancelled by the
    # Rust side's join_all when the shutdown deadline passes.
    results = await asyncio.gather(*handles, return_exceptions=True)
    outcomes: dict[str, str] = {}
    for handle, result in zip(handles, results, strict=True):
        if isinstance(result, asyncio.CancelledError):
            outcomes[handle.name] = "cancelled"
        elif isinstance(result, BaseException):
            outcomes[handle.name] = f"failed: {result!r}"
        else:
            outcomes[handle.name] = str(result)
    log.info("python: all Python tasks are done: %s", outcomes)
    return outcomes
