"""A Python straggler's stack, as a shutdown report shows it.

One formatter (``aio.py``'s ``format_task_stack``, exposed as
``_core._format_task_stack``) writes the stacks of both reports: the Python
``Service``'s, and a Rust ``Service``'s in a mixed binary (through the core's foreign
tasks; ``rust/tests/mixed.rs`` checks that one). These tests pin what it writes and that
it never raises.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from _support import loops, run_on

from dig_service import _core, _report


async def _inner(gate: asyncio.Event) -> None:
    await gate.wait()


async def _outer(gate: asyncio.Event) -> None:
    await _inner(gate)


def test_the_report_formats_with_the_core_formatter() -> None:
    """Proves: the package's ``format_task_stack`` is the core's formatter itself.

    Catches: a second copy of the formatter in the package, free to drift from the one
    that writes a Rust report's Python stacks.
    """
    assert _report.format_task_stack is _core._format_task_stack


@loops
def test_the_stack_runs_down_the_await_chain_to_what_it_waits_on(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Proves: a suspended task's stack names each coroutine frame of its ``await``
    chain, outermost first, with its file, line and source, then what the innermost one
    awaits.

    Catches: only the outermost frame shown (what ``task.print_stack()`` gives), frames
    out of order, or the source lines lost.
    """

    async def main() -> str:
        gate = asyncio.Event()
        task = asyncio.ensure_future(_outer(gate))
        await asyncio.sleep(0)
        try:
            return _core._format_task_stack(task)
        finally:
            gate.set()
            await task

    stack = run_on(loop_factory, main()).splitlines()
    frames = [ln for ln in stack if ln.startswith("File ")]
    assert [f.rsplit(" in ", 1)[1] for f in frames[:2]] == ["_outer", "_inner"], stack
    assert all(__file__ in f for f in frames[:2]), stack
    assert "  await _inner(gate)" in stack and "  await gate.wait()" in stack, stack
    assert stack[-1].startswith("awaiting "), stack


class _Unreadable(asyncio.Future[None]):
    """A task-like future whose coroutine cannot be read."""

    def get_coro(self) -> Any:
        raise RuntimeError("no coroutine here")


@loops
def test_an_unreadable_stack_is_said_so_not_raised(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """Proves: when a task's coroutine cannot be read, the formatter returns text saying
    so, with the error, instead of raising.

    Catches: a shutdown report (Python's, or a Rust one asking from a tokio worker) that
    fails, or shows no stack without a word, because one straggler's ``get_coro``
    raised.
    """

    async def main() -> str:
        fut = _Unreadable()
        return _core._format_task_stack(fut)  # type: ignore[arg-type]

    text = run_on(loop_factory, main())
    assert text == "(the rest of its stack could not be read: RuntimeError('no coroutine here'))"
