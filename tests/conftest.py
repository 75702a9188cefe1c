"""Shared pytest configuration: every asyncio test runs on asyncio *and* uvloop.

pytest-asyncio (>= 1.3) parametrises each ``@pytest.mark.asyncio`` test over
the loop factories returned by the ``pytest_asyncio_loop_factories`` hook, so
each test id ends in ``[asyncio]`` or ``[uvloop]``. Where uvloop is not
installed (it has no Windows build), the tests run on asyncio only.

The registry and Service tests (``TASK_FACTORY_MODULES``) also run on loops
with a task factory, because ``TaskRegistry.spawn`` makes its task one way
on a stock loop (``asyncio.Task`` directly) and another way when a factory
is set (``loop.create_task``):

- ``[asyncio-eager]``/``[uvloop-eager]`` (CPython >= 3.12):
  ``asyncio.eager_task_factory``, so a task runs its first step, and may
  finish, inside ``spawn``;
- ``[asyncio-lazy]``/``[uvloop-lazy]`` (every version): a plain factory
  that makes an ordinary task and counts it, so the ``create_task`` path is
  tested on 3.11 too.

Every loop made here records what reaches its exception handler ("Task
exception was never retrieved", "Task was destroyed but it is pending",
errors in callbacks...). The autouse ``loop_errors`` fixture fails the test
if anything was recorded: the package promises that nothing is lost
silently, and noise there is how a lost error shows up.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

try:
    import uvloop
except ImportError:  # no uvloop build for this platform (Windows)
    uvloop = None

_recorded: list[dict[str, Any]] = []

HAVE_UVLOOP = uvloop is not None
HAVE_EAGER = sys.version_info >= (3, 12)

TASK_FACTORY_MODULES = frozenset(
    {
        "test_core_registry",
        "test_tasks_in_service",
        "test_service_and_handle",
        "test_start_contract",
        "test_lifecycle",
        "test_task_factories",
        "test_supervise",
    }
)
"""Test modules whose async tests also run under the task factories below.

(``test_spawn_fast_path`` is about the no-factory path and tests the factory
path itself, with its own factory; ``test_task_factories`` covers what only
happens under a factory.)"""

lazy_tasks_made = 0
"""How many tasks ``lazy_task_factory`` made (tests prove the factory was used)."""


def lazy_task_factory(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
) -> asyncio.Task[Any]:
    """A task factory that makes the task ``create_task`` would, and counts it.

    Keyword arguments other than ``name`` and ``context`` (uvloop passes
    ``eager_start=None`` on 3.13) are not the task's business here.
    """
    global lazy_tasks_made
    lazy_tasks_made += 1
    known = {k: v for k, v in kwargs.items() if k in ("name", "context") and v is not None}
    return asyncio.Task(coro, loop=loop, **known)


def eager_task_factory(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
) -> asyncio.Task[Any]:
    """``asyncio.eager_task_factory``, minus the ``eager_start`` keyword.

    uvloop 0.22+ passes ``eager_start=None`` to a task factory, which the
    stdlib's eager factory accepts only from 3.14; on the asyncio loop the
    call is exactly ``asyncio.eager_task_factory(loop, coro, **kwargs)``.
    """
    kwargs.pop("eager_start", None)
    return asyncio.eager_task_factory(loop, coro, **kwargs)  # type: ignore[attr-defined,no-any-return]


def _recording(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
    task_factory: Callable[..., asyncio.Task[Any]] | None = None,
) -> Callable[[], asyncio.AbstractEventLoop]:
    def make() -> asyncio.AbstractEventLoop:
        loop = new_loop()
        loop.set_exception_handler(lambda _loop, context: _recorded.append(context))
        if task_factory is not None:
            loop.set_task_factory(task_factory)  # type: ignore[arg-type]
        return loop

    return make


def _factories() -> tuple[dict[str, Any], dict[str, Any]]:
    new_loops: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    if uvloop is not None:
        new_loops["uvloop"] = uvloop.new_event_loop
    plain = {name: _recording(new) for name, new in new_loops.items()}
    extended = dict(plain)
    for name, new in new_loops.items():
        if HAVE_EAGER:
            extended[f"{name}-eager"] = _recording(new, eager_task_factory)
        extended[f"{name}-lazy"] = _recording(new, lazy_task_factory)
    return plain, extended


LOOP_FACTORIES, TASK_FACTORY_LOOP_FACTORIES = _factories()


def pytest_configure(config: pytest.Config) -> None:
    """With ``$DIG_SERVICE_EXPECT_SITE`` set (scripts/test-wheels.sh sets it to the
    venv's site-packages), refuse to test any ``dig_service`` but the one installed
    there: the suite must exercise the wheel, not the ``python/`` source tree."""
    expected = os.environ.get("DIG_SERVICE_EXPECT_SITE")
    if not expected:
        return
    import dig_service
    import dig_service._core

    site = Path(expected).resolve()
    for module in (dig_service, dig_service._core):
        where = Path(module.__file__ or "").resolve()
        if not where.is_relative_to(site):
            raise pytest.UsageError(
                f"{module.__name__} was imported from {where}, not from the installed wheel "
                f"in {site}"
            )


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    module = getattr(item, "module", None)
    name = getattr(module, "__name__", "").rpartition(".")[2]
    if name in TASK_FACTORY_MODULES:
        return TASK_FACTORY_LOOP_FACTORIES
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
