"""Test helpers: a node whose hooks are scripted per test, and small utilities."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from dig_service import NodeLifecycle, RunContext, StartContext, StopContext

Hook = Callable[[Any], Awaitable[None]]


class ScriptedNode(NodeLifecycle):
    """A node that records every hook call and runs an optional script per hook.

    Without a script, each edge hook does nothing and ``run`` waits for the
    shutdown token (the ``NodeLifecycle`` defaults). ``run_started`` is set
    when ``run`` begins, so tests can synchronise on it instead of sleeping.
    """

    NAME = "scripted"

    def __init__(self, **scripts: Hook) -> None:
        unknown = set(scripts) - {"pre_start", "on_start", "run", "on_stop", "post_stop"}
        assert not unknown, unknown
        self.scripts = scripts
        self.calls: list[str] = []
        self.contexts: dict[str, Any] = {}
        self.run_started = asyncio.Event()

    async def _hook(self, name: str, ctx: Any) -> None:
        self.calls.append(name)
        self.contexts[name] = ctx
        script = self.scripts.get(name)
        if script is not None:
            await script(ctx)

    async def pre_start(self, ctx: StartContext) -> None:
        await self._hook("pre_start", ctx)

    async def on_start(self, ctx: StartContext) -> None:
        await self._hook("on_start", ctx)

    async def run(self, ctx: RunContext) -> None:
        self.run_started.set()
        if "run" in self.scripts:
            await self._hook("run", ctx)
        else:
            self.calls.append("run")
            self.contexts["run"] = ctx
            await ctx.shutdown.cancelled()

    async def on_stop(self, ctx: StopContext) -> None:
        await self._hook("on_stop", ctx)

    async def post_stop(self, ctx: StopContext) -> None:
        await self._hook("post_stop", ctx)


def raiser(exc: BaseException) -> Hook:
    """A hook script that raises ``exc``."""

    async def hook(ctx: Any) -> None:
        raise exc

    return hook


async def forever(ctx: Any = None) -> None:
    """A hook script (or task body) that never finishes unless cancelled."""
    await asyncio.Event().wait()


async def returns_at_once(ctx: Any = None) -> None:
    """A ``run`` script that returns by itself."""


async def eventually(predicate: Callable[[], bool], within: float = 2.0) -> None:
    """Wait until ``predicate()`` holds, for state that another *thread* updates
    (the tokio runtime) and that offers nothing to await; fail after ``within`` s."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not predicate():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.005)
