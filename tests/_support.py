"""Test helpers: a node whose hooks are scripted per test, and small utilities."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from dig_service import NodeLifecycle, RunContext, StartContext, StopContext

Hook = Callable[[Any], Awaitable[None]]

try:
    import uvloop as _uvloop
except ImportError:  # no uvloop build for this platform (Windows)
    _uvloop = None

uvloop: Any = _uvloop
"""The uvloop module, or ``None`` where it is not installed (it has no Windows build)."""


def loop_kinds(*kinds: str) -> list[Any]:
    """``pytest.param`` per loop kind; a uvloop kind is skipped, visibly, without uvloop."""
    return [
        pytest.param(
            kind,
            id=kind,
            marks=pytest.mark.skipif(
                uvloop is None and kind == "uvloop", reason="uvloop is not installed"
            ),
        )
        for kind in kinds
    ]


loops = pytest.mark.parametrize(
    "loop_factory",
    [
        pytest.param(asyncio.new_event_loop, id="asyncio"),
        pytest.param(
            uvloop.new_event_loop if uvloop is not None else None,
            id="uvloop",
            marks=pytest.mark.skipif(uvloop is None, reason="uvloop is not installed"),
        ),
    ],
)
"""Run the test once a loop kind, with ``loop_factory`` a new-loop callable (for
``asyncio.Runner``); the uvloop case is skipped, visibly, without uvloop."""


def run_on(loop_factory: Callable[[], asyncio.AbstractEventLoop], coro: Any) -> Any:
    """Run ``coro`` to its end on a new loop from ``loop_factory`` (see ``loops``)."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)


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


# --------------------------------------------------------------------------- child processes

_DEFAULT_DISPOSITIONS_PRELUDE = """\
import runpy, signal, sys
for _name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGQUIT", "SIGBREAK"):
    _sig = getattr(signal, _name, None)
    if _sig is not None:
        signal.signal(_sig, signal.default_int_handler if _name == "SIGINT" else signal.SIG_DFL)
_mode, _target, *_rest = sys.argv[1:]
sys.argv = [_target, *_rest]
if _mode == "-m":
    runpy.run_module(_target, run_name="__main__", alter_sys=True)
else:
    runpy.run_path(_target, run_name="__main__")
"""


def python_child(*args: str) -> list[str]:
    """The argv of a Python child that starts with default signal dispositions.

    ``python_child("-m", "dig_service", "run")`` runs like ``python -m dig_service
    run``, and ``python_child("script.py", "arg")`` like ``python script.py arg``,
    except that SIGINT gets Python's usual ``KeyboardInterrupt`` handler and the
    other signals a test may send get their default action first. A child
    inherits ignored signals across ``exec``: started from a job whose shell
    ignores SIGINT (``(cmd &)`` in a script), ``python`` leaves SIGINT ignored
    and a test's Ctrl-C would do nothing. The reset runs in the child's own
    interpreter, so no Python code runs between ``fork`` and ``exec`` (unlike
    ``preexec_fn``, which is unsafe with the tokio threads of the test process).
    """
    if not args or (args[0] == "-m" and len(args) < 2):
        raise ValueError("python_child() needs a script path or '-m' and a module name")
    mode, rest = ("-m", args[1:]) if args[0] == "-m" else ("script", args)
    return [sys.executable, "-c", _DEFAULT_DISPOSITIONS_PRELUDE, mode, *rest]


def reap(proc: subprocess.Popen[Any]) -> None:
    """Kill ``proc`` if it is still running, wait for it, and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
