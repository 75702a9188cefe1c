"""Shared pytest configuration: every asyncio test runs on asyncio *and* uvloop.

pytest-asyncio (>= 1.3) parametrises each ``@pytest.mark.asyncio`` test over
the loop factories returned by the ``pytest_asyncio_loop_factories`` hook, so
each test id ends in ``[asyncio]`` or ``[uvloop]``.

Every loop made here records what reaches its exception handler ("Task
exception was never retrieved", "Task was destroyed but it is pending",
errors in callbacks...). The autouse ``loop_errors`` fixture fails the test
if anything was recorded: the package promises that nothing is lost
silently, and noise there is how a lost error shows up.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import uvloop

_recorded: list[dict[str, Any]] = []


def _recording(new_loop: Callable[[], asyncio.AbstractEventLoop]) -> Callable[[], Any]:
    def make() -> asyncio.AbstractEventLoop:
        loop = new_loop()
        loop.set_exception_handler(lambda _loop, context: _recorded.append(context))
        return loop

    return make


LOOP_FACTORIES: Mapping[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": _recording(asyncio.new_event_loop),
    "uvloop": _recording(uvloop.new_event_loop),
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return LOOP_FACTORIES


@pytest.fixture(autouse=True)
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """Fail the test if an event loop reported an unhandled error during it."""
    _recorded.clear()
    yield _recorded
    gc.collect()  # surface "Task was destroyed but it is pending" now, not later
    errors = [f"{c.get('message')}: {c.get('exception')!r}" for c in _recorded]
    _recorded.clear()
    assert not errors, f"the event loop reported unhandled errors: {errors}"
