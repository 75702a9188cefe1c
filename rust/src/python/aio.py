"""asyncio glue of the native module ``dig_service._core``.

This source is compiled into ``_core`` when it is imported (``aio.rs``). Its
functions are private to ``_core`` (no ``_core`` attribute names them) and
run on the event loop's thread; the one exception is ``format_task_stack``,
which ``_core`` exposes as ``_format_task_stack`` and which reads a task's
frames on whichever thread asks. They are Python because what they do
(awaiting a future, setting many futures' results, a timer) is what asyncio
itself does fastest, and because ``ShutdownToken.cancelled()`` and
``TaskRegistry.join_all()`` must return real coroutines (users hand them to
``asyncio.create_task``). It imports nothing but ``asyncio`` (and
``linecache``, when a stack is formatted): the errors it raises are raised by
the ``_core`` methods it calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any, Protocol


class _Parkable(Protocol):
    def _park(self) -> asyncio.Future[None] | None: ...


async def wait_cancelled(token: _Parkable) -> None:
    """The body of ``ShutdownToken.cancelled()``: park one future, await it."""
    fut = token._park()
    if fut is not None:
        await fut


def wake_all(futs: Iterable[asyncio.Future[None]]) -> None:
    """Resolve every pending future in ``futs`` (one call per loop, not per waiter)."""
    for fut in futs:
        if not fut.done():
            fut.set_result(None)


def cancel_all(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel every task in ``tasks`` (the stragglers of a join on this loop: one call per
    loop, not per task)."""
    for task in tasks:
        task.cancel()


def resolve(fut: asyncio.Future[Any], value: Any = None) -> None:
    """Set ``fut``'s result unless it is already done (cancelled or timed out)."""
    if not fut.done():
        fut.set_result(value)


def settle(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    """Settle ``fut`` with a native future's outcome (``error`` if it failed), unless
    ``fut`` is already done (the awaiting coroutine was cancelled)."""
    if not fut.done():
        if error is None:
            fut.set_result(value)
        else:
            fut.set_exception(error)


class _Joinable(Protocol):
    def _try_close(self, fut: asyncio.Future[None]) -> bool: ...
    def _stop_stragglers(self, deadline: float) -> None: ...


_TIMED_OUT = object()


async def join_all(registry: _Joinable, deadline: float) -> None:
    """``TaskRegistry.join_all``: wait for every task, up to ``deadline`` seconds.

    Tasks spawned while waiting are waited for too. At the deadline,
    ``registry._stop_stragglers`` cancels the Python stragglers and aborts
    the native ones (they unwind on their loops' next turns: waiting a turn
    here would put their unwinding, tens of ms for 10k tasks, on top of the
    deadline) and raises ``ShutdownDeadlineExceeded`` naming them. The
    registry is closed either way.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        idle: asyncio.Future[Any] = loop.create_future()
        if registry._try_close(idle):
            return
        remaining = end - loop.time()
        if remaining <= 0:
            break
        timer = loop.call_later(remaining, resolve, idle, _TIMED_OUT)
        try:
            timed_out = await idle is _TIMED_OUT
        finally:
            timer.cancel()
        if timed_out:
            break
    registry._stop_stragglers(deadline)


class _Supervised(Protocol):
    def _incarnation(self) -> Coroutine[Any, Any, Any]: ...
    def _ended(self, exc: BaseException | None, cancelled: bool) -> float | None: ...


class _Token(_Parkable, Protocol):
    def is_cancelled(self) -> bool: ...


async def supervise(handle: _Supervised, token: _Token) -> None:
    """The coroutine of a supervised task: its incarnations, and the waits between them.

    Every decision is the core's: ``handle._ended`` asks it, logs, and fires the token
    when told to; this loop only carries the decision out. Returns when the task ended
    cleanly or by shutdown; raises the last error when it stopped after a failure; a
    cancel (``abort()``, the join's deadline, the loop's teardown) stops it for good.
    """
    task = asyncio.current_task()
    assert task is not None
    while True:
        try:
            await handle._incarnation()
        except (asyncio.CancelledError, GeneratorExit):
            # Cancelled, or closed with its loop: stopped for good.
            handle._ended(None, True)
            raise
        except BaseException as exc:
            delay = handle._ended(exc, task.cancelling() > 0)
            if delay is None:
                raise
        else:
            delay = handle._ended(None, task.cancelling() > 0)
            if delay is None:
                return
        if not await _backoff(delay, token):
            return


async def _backoff(delay: float, token: _Token) -> bool:
    """Wait ``delay`` seconds, or until ``token`` fires: whether to go on (it has not fired).

    A zero delay still yields one loop turn, so a crash loop never holds the loop.
    """
    if delay > 0:
        fut = token._park()
        if fut is None:
            return False
        timer = asyncio.get_running_loop().call_later(delay, resolve, fut, _TIMED_OUT)
        try:
            await fut
        finally:
            timer.cancel()
    else:
        await asyncio.sleep(0)
    return not token.is_cancelled()


def format_task_stack(task: asyncio.Task[Any]) -> str:
    """Where ``task`` is suspended, as text: one ``File "...", line N, in f`` entry (with
    its source line) a frame, down the chain of its ``await``\\ s (what
    ``task.print_stack()`` shows of a coroutine is only its outermost frame), then what
    the innermost one awaits when that is not a coroutine. Never raises (an
    ``Exception``): what could not be read is said in the text.

    ``_core._format_task_stack``: the stacks of Python stragglers in a shutdown report,
    the Python ``Service``'s and (through the core's foreign tasks) a Rust ``Service``'s
    in a mixed binary."""
    import linecache  # only when a report wants stacks

    lines: list[str] = []
    try:
        obj: Any = task.get_coro()
        for _ in range(128):  # a bounded walk: an await chain is never this deep
            frame = _first_attr(obj, _FRAMES)
            if frame is None:
                break
            code = frame.f_code
            lines.append(f'File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}')
            source = linecache.getline(code.co_filename, frame.f_lineno).strip()
            if source:
                lines.append(f"  {source}")
            nxt = _first_attr(obj, _AWAITED)
            if nxt is None:
                break
            if not any(hasattr(nxt, a) for a in _FRAMES):
                lines.append(f"awaiting {_describe_awaitable(nxt)}")
                break
            obj = nxt
    except Exception as exc:  # a task or an awaitable whose attributes raise
        lines.append(f"(the rest of its stack could not be read: {exc!r})")
    return "\n".join(lines)


# The frame of a coroutine, a generator, an async generator; what each awaits.
_FRAMES = ("cr_frame", "gi_frame", "ag_frame")
_AWAITED = ("cr_await", "gi_yieldfrom", "ag_await")


def _first_attr(obj: object, names: tuple[str, ...]) -> Any:
    """``getattr(obj, a, None) or getattr(obj, b, None) or ...`` over ``names``."""
    value = None
    for name in names:
        value = getattr(obj, name, None)
        if value:
            break
    return value


def _describe_awaitable(obj: object) -> str:
    if type(obj).__name__ == "FutureIter":  # the C implementation of Future.__await__
        return "an asyncio Future"
    if isinstance(obj, asyncio.Future):
        state = "cancelled" if obj.cancelled() else ("done" if obj.done() else "pending")
        return f"a {type(obj).__name__} ({state})"
    return type(obj).__qualname__
