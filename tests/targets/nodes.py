"""Target nodes for the real-process tests (``python -m dig_service run targets.nodes:X``).

Each node prints marker lines on stdout (flushed) that the tests wait for,
so that the tests synchronise on what the process did rather than on sleeps.
"""

from __future__ import annotations

import asyncio
import os
import pathlib

from dig_service import (
    NodeLifecycle,
    RunContext,
    Service,
    ServiceConfig,
    StartContext,
    StopContext,
    TaskKind,
)
from dig_service.testing import spawn_native_sleeper


def mark(text: str) -> None:
    print(text, flush=True)


async def _until_shutdown(ctx: StartContext) -> None:
    await ctx.shutdown.cancelled()


async def hold_forever() -> None:
    """Ignores the shutdown token: a straggler."""
    while True:  # noqa: ASYNC110 - a straggler on purpose
        await asyncio.sleep(3600)


class Basic(NodeLifecycle):
    """Starts a well-behaved worker and a native task; reports every hook on stdout."""

    NAME = "basic"

    async def on_start(self, ctx: StartContext) -> None:
        ctx.tasks.spawn("worker", TaskKind.BackgroundLoop, _until_shutdown(ctx))
        spawn_native_sleeper(ctx.tasks, "native-worker", 3600.0)
        mark("on_start done")

    async def run(self, ctx: RunContext) -> None:
        mark("run started")
        await ctx.shutdown.cancelled()
        mark(f"run saw {ctx.shutdown.reason()!r}")

    async def on_stop(self, ctx: StopContext) -> None:
        mark("on_stop ran")

    async def post_stop(self, ctx: StopContext) -> None:
        mark("post_stop ran")


class Stubborn(Basic):
    """Adds a task that ignores shutdown (a straggler) and a native one that ignores it too."""

    NAME = "stubborn"

    async def on_start(self, ctx: StartContext) -> None:
        ctx.tasks.spawn("stubborn-worker", TaskKind.PeerConnection, hold_forever())
        spawn_native_sleeper(ctx.tasks, "stubborn-native", 3600.0, honor_shutdown=False)
        await super().on_start(ctx)


class SlowFlush(Stubborn):
    """Stragglers (a Python one and a native one) and an ``on_stop`` that flushes for 0.3 s:
    the flush must run to its end inside the budget, whatever the stragglers do."""

    NAME = "slow-flush"

    async def on_stop(self, ctx: StopContext) -> None:
        mark("on_stop flushing")
        await asyncio.sleep(0.3)
        mark("on_stop flushed")


class StuckInPreStart(NodeLifecycle):
    """``pre_start`` replays a journal until the shutdown is requested (it watches
    ``ctx.shutdown``); every hook reports on stdout."""

    NAME = "stuck-in-pre-start"

    async def pre_start(self, ctx: StartContext) -> None:
        mark("pre_start replaying")
        await ctx.shutdown.cancelled()
        mark("pre_start stopped replaying")

    async def on_start(self, ctx: StartContext) -> None:
        mark("on_start ran")

    async def run(self, ctx: RunContext) -> None:
        mark("run ran")

    async def on_stop(self, ctx: StopContext) -> None:
        mark("on_stop ran")

    async def post_stop(self, ctx: StopContext) -> None:
        mark("post_stop ran")


class FatalNode(Basic):
    """A critical task fails shortly after start: the token fires with ``Fatal``."""

    NAME = "fatal"

    async def on_start(self, ctx: StartContext) -> None:
        await super().on_start(ctx)
        ctx.tasks.spawn("doomed", TaskKind.BackgroundLoop, self._doomed(), critical=True)

    async def _doomed(self) -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("disk on fire")


class Completes(Basic):
    """``run`` returns by itself: ``RunCompleted``, exit 0, no signal needed."""

    NAME = "completes"

    async def run(self, ctx: RunContext) -> None:
        mark("run started")


class SlowStart(Basic):
    """``on_start`` takes a moment, then touches ``$ON_START_MARK``: READY=1 must come after."""

    NAME = "slow-start"

    async def on_start(self, ctx: StartContext) -> None:
        await asyncio.sleep(0.2)
        await super().on_start(ctx)
        pathlib.Path(os.environ["ON_START_MARK"]).touch()  # noqa: ASYNC240 - instant


basic_instance = Basic()
basic_service = Service(Basic(), config=ServiceConfig(shutdown_deadline=5.0))


def make_node() -> Basic:
    return Basic()


def make_service() -> Service[Basic, None, None]:
    return Service(Basic(), config=ServiceConfig(shutdown_deadline=5.0))


not_a_node = 42


def broken_factory() -> Basic:
    raise ValueError("the factory is broken")


class NeedsArgs(Basic):
    def __init__(self, port: int) -> None:
        self.port = port


class SyncHook(NodeLifecycle):
    def on_start(self, ctx: StartContext) -> None:  # type: ignore[override]
        pass
