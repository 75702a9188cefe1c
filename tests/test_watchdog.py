"""The loop-stall watchdog (SPEC section 9, issue 16 point 4): ``ServiceConfig.stall_warning``,
the native ``LoopWatchdog`` thread and its heartbeat, on asyncio and uvloop. The runner's
``--stall-warning`` in a real process is in ``test_control_process.py``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from _support import eventually

from dig_service import NodeLifecycle, RunContext, Service, ServiceConfig, StartContext, TaskKind
from dig_service._core import LoopWatchdog
from dig_service._watchdog import LoopWatch

WATCHDOG_THREAD = "dig-service-wat"  # the thread's name as the kernel keeps it (15 chars)
needs_proc = pytest.mark.skipif(
    not os.path.isdir("/proc/self/task"), reason="counts threads in /proc/self/task"
)


def watchdog_threads() -> int:
    """Threads of this process named like the watchdog thread (``/proc/self/task/*/comm``)."""
    count = 0
    for comm in Path("/proc/self/task").glob("*/comm"):
        try:
            if comm.read_text().strip() == WATCHDOG_THREAD:
                count += 1
        except OSError:  # the thread ended meanwhile
            pass
    return count


def stall_records(caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str]]:
    """(warnings that a stall began, lines that one ended) on ``dig_service.watchdog``."""
    messages = [r.getMessage() for r in caplog.records if r.name == "dig_service.watchdog"]
    began = [m for m in messages if "has not turned" in m or "did not turn" in m]
    ended = [m for m in messages if "stall ended" in m]
    return began, ended


def blocking_call_under_test(seconds: float) -> None:
    time.sleep(seconds)  # the stall, on purpose


def spinning_call_under_test(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # holds the GIL but for the switch interval
        pass


# --------------------------------------------------------------------------- config


def test_stall_warning_is_validated_and_part_of_the_config() -> None:
    """Proves: ``stall_warning`` defaults to ``None``, takes seconds or a ``timedelta``,
    and a bad value is a ``TypeError``/``ValueError`` naming ``stall_warning`` (zero,
    negative, NaN, infinite, below 0.01, not a number); it is part of equality, hash,
    repr and pickling.

    Catches: a silently ignored or unnamed bad value, two configs that differ only in
    the watchdog comparing equal."""
    assert ServiceConfig().stall_warning is None
    assert ServiceConfig(stall_warning=0.5).stall_warning == 0.5
    assert ServiceConfig(stall_warning=timedelta(milliseconds=250)).stall_warning == 0.25
    assert ServiceConfig(stall_warning=2).stall_warning == 2.0
    for bad in (0, 0.0, -1, math.nan, math.inf, 0.005):
        with pytest.raises(ValueError, match="`stall_warning`"):
            ServiceConfig(stall_warning=bad)
    for wrong in ("1", True, [1]):
        with pytest.raises(TypeError, match="`stall_warning`"):
            ServiceConfig(stall_warning=wrong)  # type: ignore[arg-type]
    config = ServiceConfig(shutdown_deadline=3, stall_warning=0.5)
    assert config != ServiceConfig(shutdown_deadline=3)
    assert hash(config) == hash(ServiceConfig(shutdown_deadline=3, stall_warning=0.5))
    assert "stall_warning=0.5" in repr(config)
    assert pickle.loads(pickle.dumps(config)) == config


@needs_proc
def test_loop_watchdog_checks_its_arguments() -> None:
    """Proves: the native ``LoopWatchdog`` names the parameter it refuses, before it
    starts any thread.

    Catches: a thread started (and leaked) by a constructor that then fails."""
    before = watchdog_threads()
    with pytest.raises(TypeError, match="`stall_warning`"):
        LoopWatchdog("1", 1, "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`stall_warning` must be at least 0\.01"):
        LoopWatchdog(0.001, 1, "x")
    with pytest.raises(TypeError, match="`label`"):
        LoopWatchdog(1.0, 1, 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`logger`"):
        LoopWatchdog(1.0, 1, "x", 5)  # type: ignore[arg-type]
    assert watchdog_threads() == before


@needs_proc
def test_loop_watchdog_thread_starts_when_built_and_stop_joins_it() -> None:
    """Proves: building a ``LoopWatchdog`` starts one native thread, ``stop()`` ends it
    before returning (the thread is gone from the process), and ``stop()`` is
    idempotent; the beat interval is a quarter of ``stall_warning``.

    Catches: a thread left running after the service ended, a stop that returns while
    the thread may still log."""
    before = watchdog_threads()
    dog = LoopWatchdog(1.0, 1, "x")
    try:
        assert dog.is_running() and dog.interval == 0.25 and dog.stall_warning == 1.0
        deadline = time.monotonic() + 5.0
        while watchdog_threads() != before + 1:  # the thread names itself once it runs
            assert time.monotonic() < deadline, "no watchdog thread"
            time.sleep(0.001)
    finally:
        dog.stop()
    assert not dog.is_running()
    assert watchdog_threads() == before
    dog.stop()
    assert "stopped" in repr(dog)


# --------------------------------------------------------------------------- in a service


class Staller(NodeLifecycle):
    """A task that blocks the loop with ``call`` for ``seconds``, ``times`` times."""

    NAME = "staller"

    def __init__(self, call: Any, seconds: float, times: int = 1) -> None:
        self.call = call
        self.seconds = seconds
        self.times = times
        self.done = asyncio.Event()

    async def on_start(self, ctx: StartContext) -> None:
        ctx.tasks.spawn("staller", TaskKind.BackgroundLoop, self._stall())

    async def _stall(self) -> None:
        for _ in range(self.times):
            await asyncio.sleep(0.1)
            self.call(self.seconds)
        self.done.set()

    async def run(self, ctx: RunContext) -> None:
        await self.done.wait()


def test_lag_is_the_last_beats_lateness_or_how_overdue_the_next_one_is() -> None:
    """Proves: ``LoopWatchdog.lag`` is 0 while beats come on time; while the next beat is
    overdue it is how overdue it is (bounded by the time the test itself measured), and
    it keeps growing; a late beat leaves its lateness as the lag; an on-time beat brings
    it back to 0.

    Catches: a lag that only shows after the loop turned again (a stall invisible to a
    scrape), one that stays at a past stall's size, or a lag counted from the wrong beat."""
    dog = LoopWatchdog(0.4, threading.get_ident(), "lag", "dig_service.test.lag")
    interval = dog.interval
    try:
        start = time.monotonic()
        dog.beat()
        beat_at = time.monotonic()
        fresh = dog.lag  # 0 unless this machine paused us for an interval
        assert fresh <= max(0.0, time.monotonic() - start - interval), fresh
        time.sleep(0.3)  # the quantity under test: time without a beat
        first = dog.lag
        elapsed = time.monotonic() - beat_at
        assert 0.3 - interval - 0.01 <= first <= elapsed - interval + 0.01, (first, elapsed)
        time.sleep(0.05)
        assert dog.lag > first  # still overdue: growing
        before = time.monotonic()
        dog.beat()  # late by about 0.25 s
        late = dog.lag
        assert 0.3 - interval - 0.01 <= late <= before - beat_at - interval + 0.01, late
        dog.beat()  # at once: on time (0 unless this machine paused us for an interval)
        back = dog.lag
        assert back <= max(0.0, time.monotonic() - before - interval), back
    finally:
        dog.stop()


@pytest.mark.asyncio
@needs_proc
async def test_a_blocking_call_is_warned_once_with_its_stack_then_its_length(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proves: with ``stall_warning=0.2``, a ``time.sleep(0.8)`` in a task gives exactly
    one warning on ``dig_service.watchdog`` whose stack names the blocking function and
    its line, then exactly one "stall ended" line with a length between the warning
    threshold and the sleep; the watchdog thread is running during ``start()`` only.

    Catches: a stall not noticed (the systemd-watchdog-fed-by-a-timer trap), a warning
    repeated for every check while the stall lasts, a stack of the wrong thread, a
    missing or wrong length, a thread that outlives the service."""
    caplog.set_level(logging.WARNING, logger="dig_service.watchdog")
    before = watchdog_threads()
    node = Staller(blocking_call_under_test, 0.8)
    service = Service(node, config=ServiceConfig(stall_warning=0.2))
    assert watchdog_threads() == before  # not at construction
    starting = asyncio.ensure_future(service.start())
    await eventually(lambda: watchdog_threads() == before + 1)
    await starting
    assert watchdog_threads() == before
    # `start()` returned: the watchdog thread has ended, every line is logged.
    began, ended = stall_records(caplog)
    assert len(began) == 1 and len(ended) == 1, (began, ended)
    assert "service staller: event loop has not turned for" in began[0]
    assert "in blocking_call_under_test" in began[0]
    assert "time.sleep(seconds)  # the stall, on purpose" in began[0]
    length = float(ended[0].rpartition("after ")[2].rstrip("s"))
    assert 0.2 <= length <= 0.8 + 0.05, ended[0]


@pytest.mark.asyncio
async def test_a_cpu_bound_callback_is_reported_while_it_holds_the_gil(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proves: a pure-Python busy loop (which keeps taking the GIL back) is reported
    with its stack too: the watchdog thread gets the GIL at a switch interval.

    Catches: a watchdog that can only see stalls in calls that release the GIL."""
    caplog.set_level(logging.WARNING, logger="dig_service.watchdog")
    node = Staller(spinning_call_under_test, 0.8)
    service = Service(node, config=ServiceConfig(stall_warning=0.2))
    await service.start()
    began, ended = stall_records(caplog)
    assert len(began) == 1 and "in spinning_call_under_test" in began[0], began
    assert len(ended) == 1, ended


@pytest.mark.asyncio
async def test_two_stalls_give_two_warnings(caplog: pytest.LogCaptureFixture) -> None:
    """Proves: each stall is reported once, and a second stall after the loop turned
    again is reported again.

    Catches: a watchdog that reports the first stall only (a flag never reset)."""
    caplog.set_level(logging.WARNING, logger="dig_service.watchdog")
    node = Staller(blocking_call_under_test, 0.5, times=2)
    await Service(node, config=ServiceConfig(stall_warning=0.15)).start()
    began, ended = stall_records(caplog)
    assert len(began) == 2 and len(ended) == 2, (began, ended)


@pytest.mark.asyncio
async def test_a_busy_loop_that_keeps_turning_is_not_a_stall(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proves: a loop kept busy for 1 s by many short callbacks (each well under
    ``stall_warning``), and one that is idle, give no warning.

    Catches: false alarms on a loaded but healthy service (the heartbeat must be a
    timer that runs whenever the loop turns)."""
    caplog.set_level(logging.WARNING, logger="dig_service.watchdog")
    loop = asyncio.get_running_loop()
    watch = LoopWatch(loop, 0.25, "busy")
    try:
        end = loop.time() + 1.0
        while loop.time() < end:
            spinning_call_under_test(0.005)
            await asyncio.sleep(0)
        await asyncio.sleep(0.6)  # idle
    finally:
        watch.stop()
    assert stall_records(caplog) == ([], [])
    assert watch.stalls == 0


# --------------------------------------------------------------------------- process edges


def run_script(code: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_interpreter_exit_with_a_running_or_reporting_watchdog_is_clean() -> None:
    """Proves: a process that exits without stopping its watchdogs, one of them in the
    middle of reporting a stall (nothing beats it), exits 0 without hanging, crashing or
    printing a traceback.

    Catches: a native thread touching a finalising interpreter (abort, hang at exit)."""
    proc = run_script(
        """
        import logging, sys, time
        logging.basicConfig(stream=sys.stderr)
        from dig_service._core import LoopWatchdog
        quiet = LoopWatchdog(5.0, 1, "quiet")
        noisy = LoopWatchdog(0.01, 1, "noisy")  # never beaten: reports a stall at once
        time.sleep(0.2)
        print("exiting", flush=True)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "exiting\n"
    assert "Traceback" not in proc.stderr and "panicked" not in proc.stderr
    assert "service noisy: event loop has not turned" in proc.stderr


def test_interpreter_exit_waits_for_a_report_in_progress() -> None:
    """Proves: when the interpreter exits while the watchdog thread is in the middle of a
    report (a logging filter that takes 0.3 s, the GIL released meanwhile), the exit
    waits for the report to finish (its atexit hook) and the process exits 0.

    Catches: a watchdog thread left waiting for the GIL while the interpreter
    finalises, which CPython ends with a forced unwind through Rust frames: the report
    cut off (without the hook, "report written" never comes), or an abort ("FATAL:
    exception not rethrown") where the unwind meets a frame that catches panics."""
    proc = run_script(
        """
        import logging, sys, threading, time
        started = threading.Event()

        def slow(record):  # a filter runs outside the handler's lock, which logging's
            started.set()  # own atexit hook would otherwise wait for
            time.sleep(0.3)  # the GIL is released: the main thread goes on exiting
            return True

        class Printer(logging.Handler):
            def emit(self, record):
                print("report written", flush=True)

        handler = Printer()
        handler.addFilter(slow)
        logging.getLogger("dig_service.watchdog").addHandler(handler)
        from dig_service._core import LoopWatchdog
        dog = LoopWatchdog(0.01, threading.get_ident(), "exiting")  # never beaten
        assert started.wait(10)
        print("exiting", flush=True)
        """
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert proc.stdout.splitlines()[:2] == ["exiting", "report written"], proc.stdout
    assert "FATAL" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_stop_in_a_forked_child_does_not_wait_for_the_parents_thread() -> None:
    """Proves: a watchdog inherited across ``os.fork()`` can be stopped in the child
    (which has no such thread) without hanging, and still works in the parent.

    Catches: a child that joins a thread that only exists in its parent (a hang)."""
    proc = run_script(
        """
        import os, warnings
        warnings.simplefilter("ignore", DeprecationWarning)
        from dig_service._core import LoopWatchdog
        dog = LoopWatchdog(5.0, 1, "forked")
        pid = os.fork()
        if pid == 0:
            dog.stop()
            os._exit(0 if not dog.is_running() else 3)
        _, status = os.waitpid(pid, 0)
        assert dog.is_running()
        dog.stop()
        print(os.waitstatus_to_exitcode(status), flush=True)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "0\n"
