"""Target nodes for the control-socket and watchdog process tests (``test_control_process``).

Each node prints marker lines on stdout (flushed) that the tests wait for.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

from dig_service import NodeLifecycle, RunContext, StartContext, TaskKind
from dig_service.testing import spawn_native_sleeper


def mark(text: str) -> None:
    print(text, flush=True)


async def _until_shutdown(ctx: StartContext) -> None:
    await ctx.shutdown.cancelled()


class Tasks(NodeLifecycle):
    """Two Python tasks of different kinds and one native task, all until shutdown."""

    NAME = "tasks"

    async def on_start(self, ctx: StartContext) -> None:
        ctx.tasks.spawn("py-worker", TaskKind.BackgroundLoop, _until_shutdown(ctx))
        ctx.tasks.spawn("py-maintenance", TaskKind.Maintenance, _until_shutdown(ctx))
        spawn_native_sleeper(ctx.tasks, "native-worker", 3600.0, kind=TaskKind.PeerConnection)

    async def run(self, ctx: RunContext) -> None:
        mark("run started")
        await ctx.shutdown.cancelled()
        mark(f"run saw {ctx.shutdown.reason()!r}")


def blocking_sleeper() -> None:
    """The synchronous call the watchdog must name."""
    time.sleep(2)  # a blocking call on the event loop, on purpose


async def _stall_once() -> None:
    await asyncio.sleep(0.2)
    mark("blocking")
    blocking_sleeper()
    mark("unblocked")


class Stall(NodeLifecycle):
    """A task that blocks the event loop for 2 s, once."""

    NAME = "stall"

    async def on_start(self, ctx: StartContext) -> None:
        ctx.tasks.spawn("staller", TaskKind.BackgroundLoop, _stall_once())

    async def run(self, ctx: RunContext) -> None:
        mark("run started")
        await ctx.shutdown.cancelled()


def _notify(text: str) -> None:
    """Send ``text`` to ``$NOTIFY_SOCKET`` (a marker among the runner's datagrams)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(text.encode(), os.environ["NOTIFY_SOCKET"])


async def _stall_between_markers() -> None:
    await asyncio.sleep(0.5)  # a few WATCHDOG=1 pings first
    _notify("X_BLOCK=begin")
    time.sleep(1.0)  # noqa: ASYNC251 - a blocking call on the event loop, on purpose
    _notify("X_BLOCK=end")


class NotifyStall(NodeLifecycle):
    """Blocks the loop for 1 s between two markers sent to the notify socket."""

    NAME = "notify-stall"

    async def on_start(self, ctx: StartContext) -> None:
        ctx.tasks.spawn("staller", TaskKind.BackgroundLoop, _stall_between_markers())

    async def run(self, ctx: RunContext) -> None:
        mark("run started")
        await ctx.shutdown.cancelled()


async def _tick_and_measure(ctx: StartContext) -> None:
    """Sleep 10 ms at a time and print the worst lateness seen when the service stops."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    while not ctx.shutdown.is_cancelled():
        before = loop.time()
        await asyncio.sleep(0.01)
        worst = max(worst, loop.time() - before - 0.01)
    mark(f"worst lateness {worst:.3f}")


class Ticker(NodeLifecycle):
    """Measures how late its own timers run while clients hammer the control socket."""

    NAME = "ticker"

    async def on_start(self, ctx: StartContext) -> None:
        ctx.tasks.spawn("ticker", TaskKind.BackgroundLoop, _tick_and_measure(ctx))

    async def run(self, ctx: RunContext) -> None:
        mark("run started")
        await ctx.shutdown.cancelled()


async def _fail_at_once() -> None:
    raise RuntimeError("metrics test: a task that fails (on purpose)")


class Metrics(NodeLifecycle):
    """``Tasks``' three tasks, plus a Python Maintenance task that failed before ``run``."""

    NAME = "metrics"

    async def on_start(self, ctx: StartContext) -> None:
        await Tasks().on_start(ctx)
        failing = ctx.tasks.spawn("py-flaky", TaskKind.Maintenance, _fail_at_once())
        try:
            await failing
        except RuntimeError:
            pass

    async def run(self, ctx: RunContext) -> None:
        mark("run started")
        await ctx.shutdown.cancelled()
