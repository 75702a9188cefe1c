"""Supervised-task targets for the real-process tests (``python -m dig_service run
targets.supervised:X``). Marker lines go to stdout (flushed), so the tests synchronise on
what the process did rather than on sleeps.
"""

from __future__ import annotations

from dig_service import Restart, RestartPolicy, StartContext, TaskKind

from .nodes import Basic, mark


class CrashLoop(Basic):
    """A critical supervised task that fails at once, every time: after 3 restarts within
    a minute it gives up and takes the service down with ``Fatal``."""

    NAME = "crash-loop"

    async def on_start(self, ctx: StartContext) -> None:
        await super().on_start(ctx)
        self.attempts = 0
        ctx.tasks.supervise(
            "flaky-sync",
            TaskKind.BackgroundLoop,
            self._sync,
            policy=RestartPolicy(max_restarts=3, within=60.0, backoff=0.05, max_backoff=1.0),
        )

    async def _sync(self) -> None:
        self.attempts += 1
        raise ConnectionRefusedError(f"full node refused the connection (attempt {self.attempts})")


class Restarting(Basic):
    """A non-critical supervised task that keeps failing and being restarted; it prints
    ``restarted 3`` once it has been restarted three times."""

    NAME = "restarting"

    async def on_start(self, ctx: StartContext) -> None:
        await super().on_start(ctx)
        self.attempts = 0
        ctx.tasks.supervise(
            "reconnect",
            TaskKind.PeerConnection,
            self._reconnect,
            policy=RestartPolicy(
                Restart.Permanent,
                max_restarts=10_000,
                backoff=0.01,
                max_backoff=0.05,
                critical=False,
            ),
        )

    async def _reconnect(self) -> None:
        self.attempts += 1
        if self.attempts == 4:
            mark("restarted 3")
        raise TimeoutError("peer did not answer")
