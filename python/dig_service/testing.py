"""Helpers for testing services and code built on ``dig_service``.

- :class:`TestNode`: a ready-made node whose hooks fail on demand, as the
  Rust ``dig_service::testing::TestNode``.
- :func:`spawn_native_sleeper`: a real tokio task in a ``TaskRegistry``, to
  exercise native tracking from Python (``origin == "native"``).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import ClassVar

from ._config import seconds
from ._core import spawn_native_sleeper
from ._lifecycle import NodeLifecycle, RunContext, StartContext, StopContext

__all__ = ["TestNode", "spawn_native_sleeper"]


def _flag(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"TestNode: `{field}` must be bool, got {type(value).__name__}")
    return value


class TestNode(NodeLifecycle):
    """A minimal node with switchable failures (``NAME == "test"``).

    ``TestNode()`` never fails and runs until shutdown. Injected failures
    raise ``RuntimeError`` whose message names the hook
    (``"pre_start failure injected"``, ...).

    Args:
        fail_pre_start: ``pre_start`` raises.
        fail_on_start: ``on_start`` raises.
        fail_run: ``run`` raises at once instead of waiting.
        fail_on_stop: ``on_stop`` raises.
        run_delay: when non-zero, ``run`` returns by itself after this many
            seconds (or ``timedelta``) unless shutdown comes first. Zero: wait
            for shutdown only.

    Attributes:
        calls: the hooks that ran, in order (``["pre_start", "on_start", ...]``).
    """

    __test__: ClassVar[bool] = False  # not a pytest test class despite its name
    NAME: ClassVar[str | None] = "test"

    def __init__(
        self,
        fail_pre_start: bool = False,
        fail_on_start: bool = False,
        fail_run: bool = False,
        fail_on_stop: bool = False,
        run_delay: float | timedelta = 0.0,
    ) -> None:
        self.fail_pre_start = _flag(fail_pre_start, "fail_pre_start")
        self.fail_on_start = _flag(fail_on_start, "fail_on_start")
        self.fail_run = _flag(fail_run, "fail_run")
        self.fail_on_stop = _flag(fail_on_stop, "fail_on_stop")
        self.run_delay = seconds(run_delay, "TestNode", "run_delay")
        self.calls: list[str] = []

    def __repr__(self) -> str:
        flags = [
            name
            for name in ("fail_pre_start", "fail_on_start", "fail_run", "fail_on_stop")
            if getattr(self, name)
        ]
        args = [f"{name}=True" for name in flags]
        if self.run_delay:
            args.append(f"run_delay={self.run_delay!r}")
        return f"TestNode({', '.join(args)})"

    async def pre_start(self, ctx: StartContext) -> None:
        self.calls.append("pre_start")
        if self.fail_pre_start:
            raise RuntimeError("pre_start failure injected")

    async def on_start(self, ctx: StartContext) -> None:
        self.calls.append("on_start")
        if self.fail_on_start:
            raise RuntimeError("on_start failure injected")

    async def run(self, ctx: RunContext) -> None:
        self.calls.append("run")
        if self.fail_run:
            raise RuntimeError("run failure injected")
        if self.run_delay == 0:
            await ctx.shutdown.cancelled()
            return
        try:
            async with asyncio.timeout(self.run_delay):
                await ctx.shutdown.cancelled()
        except TimeoutError:
            pass  # run_delay elapsed first: return by ourselves

    async def on_stop(self, ctx: StopContext) -> None:
        self.calls.append("on_stop")
        if self.fail_on_stop:
            raise RuntimeError("on_stop failure injected")

    async def post_stop(self, ctx: StopContext) -> None:
        self.calls.append("post_stop")
