"""Races where processes end or split (issue 12, items 4 and 5), repeated until a
regression would show.

- ``os.fork()`` while native awaits complete on the tokio workers: every child
  works, none hangs (``test_forked_children_never_hang_while_workers_are_busy``).
- Interpreter exit while daemon threads run event loops awaiting native handles and
  token waiters, and Rust futures are still pending: it never aborts, and every
  pending Rust future is dropped by the exit hook
  (``test_interpreter_exit_with_busy_daemon_loops_never_aborts``).

Each test states how often the race broke before the fix, and so how likely its
repetitions are to have caught it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

SCRIPT_TIMEOUT = 120.0
"""A script that has not exited by then is hung (a healthy one needs a few seconds)."""


def run_script(source: str, *args: str, dev: bool) -> subprocess.CompletedProcess[str]:
    """Run ``source`` in a fresh interpreter, in development mode or not (whatever the
    suite runs in); fail the test (not hang) if it does not exit."""
    flags = ["-X", "dev"] if dev else []
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDEVMODE"}
    try:
        return subprocess.run(
            [sys.executable, *flags, "-c", textwrap.dedent(source), *args],
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"the script hung (no exit within {SCRIPT_TIMEOUT}s)\n"
            f"--- stdout\n{exc.stdout!r}\n--- stderr\n{exc.stderr!r}"
        ) from None


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


# --------------------------------------------------------------------------- item 4

FORK_STRESS_SCRIPT = """
    import asyncio, os, signal, sys, time, warnings
    from dig_service import ShutdownToken, TaskRegistry
    from dig_service.testing import spawn_native_sleeper

    FORKS, CHURNERS = int(sys.argv[1]), int(sys.argv[2])
    HANG = 5.0  # a child that has not exited by then is hung (a healthy one: ~10 ms)

    async def churn(registry, stop):
        # Native awaits completing on the tokio workers all the time: their
        # completions take the runtime's locks while the parent forks.
        while not stop:
            await spawn_native_sleeper(registry, "churn", 0)

    def child():
        async def main():
            await spawn_native_sleeper(TaskRegistry(ShutdownToken()), "child", 0)
        try:
            asyncio.run(main())
        except BaseException as exc:  # a clear error is acceptable; a hang is not
            os.write(2, f"child error: {exc!r}\\n".encode())
            os._exit(3)
        os._exit(0)

    def reap(pids, until):
        codes = []
        while pids:
            for pid in list(pids):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    pids.remove(pid)
                    codes.append(os.waitstatus_to_exitcode(status))
            if time.monotonic() >= until or not pids:
                break
            time.sleep(0.005)
        return codes

    async def main():
        registry = TaskRegistry(ShutdownToken())
        stop = []
        churners = [asyncio.ensure_future(churn(registry, stop)) for _ in range(CHURNERS)]
        await asyncio.sleep(0.01)
        pids, codes = set(), []
        for _ in range(FORKS):
            await asyncio.sleep(0.002)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork, threads
                pid = os.fork()
            if pid == 0:
                child()
            pids.add(pid)
            codes += reap(pids, 0)
        codes += reap(pids, time.monotonic() + HANG)
        hung = len(pids)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        stop.append(True)
        await asyncio.gather(*churners)
        failed = len(codes) - codes.count(0)
        print(f"forks {FORKS} ok {codes.count(0)} failed {failed} hung {hung}")

    asyncio.run(main())
"""


def test_forked_children_never_hang_while_workers_are_busy() -> None:
    """Proves: 250 children forked (one every ~2 ms) from a process whose tokio workers
    are completing native awaits all the while (32 loops of ``await
    spawn_native_sleeper(...)``) all run a native await of their own and exit 0; none
    hangs (a child alive 5 s after the last fork counts as hung, and is killed).

    Catches: the before-fork hook holding the runtime lock across the fork, and the
    child's unlock handing it to a worker parked on it at the fork (parking_lot's fair
    hand-off), a thread that does not exist in the child: the child's first native
    call waited for ever. Before the fix, 44 of 2,000 forks hung (2.2 %) in this very
    script (8 runs of 250, each with at least one hang); 250 forks all passing had a
    chance of (1 - 0.022) ** 250 = 0.4 % with the bug in: this test catches it 99.6 %
    of the time. Runs in about 2 s.

    Also catches, more rarely (1 child in about 750 on CPython 3.12, in CI), a worker
    releasing a Python reference unattached at the fork: PyO3 defers it onto a list
    behind a lock, the child inherits that lock held, and its first call into ``_core``
    (every call drains the list) waits for ever. The deterministic check for that one
    is the suite's run on a build without PyO3's deferred pool (``scripts/test.sh``),
    where such a release aborts.
    """
    proc = run_script(FORK_STRESS_SCRIPT, "250", "32", dev=False)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.strip() == "forks 250 ok 250 failed 0 hung 0", describe(proc)


# --------------------------------------------------------------------------- item 5

EXIT_STRESS_SCRIPT = """
    import asyncio, os, random, sys, threading, time
    from dig_service import ShutdownReason, ShutdownToken, TaskRegistry, _core
    from dig_service.testing import spawn_native_sleeper

    DAEMONS, PENDING = 2, 4
    rng = random.Random(int(sys.argv[1]))
    running = threading.Barrier(DAEMONS + 1)

    def say(line):
        os.write(1, (line + "\\n").encode())  # one write a line: threads print too

    def daemon():
        async def main():
            token = ShutdownToken()
            registry = TaskRegistry(token)
            rounds = 0
            while True:
                # Native handles and token waiters, round after round, until exit.
                child = token.child_token()
                waiter = None
                try:
                    waiter = asyncio.ensure_future(child.cancelled())
                    await spawn_native_sleeper(registry, "nap", 0)
                    child.cancel(ShutdownReason.UserRequested())
                    await waiter
                except RuntimeError as exc:  # after the exit hook: the clear refusal
                    if "interpreter is exiting" not in str(exc):
                        raise
                    if waiter is not None:
                        if not waiter.done():
                            waiter.cancel()
                        elif not waiter.cancelled():
                            waiter.exception()  # the same refusal, seen
                    return
                rounds += 1
                if rounds == 10:
                    running.wait()

        # Debug mode: a new future reads source lines for its traceback, so a
        # daemon often waits for the GIL inside calls from Rust (the abort's trigger).
        asyncio.run(main(), debug=True)

    for _ in range(DAEMONS):
        threading.Thread(target=daemon, daemon=True).start()

    async def main():
        # Rust futures still sleeping at exit: each must be dropped (its callback
        # printing) by the exit hook's runtime shutdown.
        pending = [_core._bridged_sleep(3600, lambda: say("dropped")) for _ in range(PENDING)]
        running.wait(10)
        return pending

    pending = asyncio.run(main())
    time.sleep(rng.random() * 0.02)  # exit at some point of the daemons' rounds
    say("exiting")
"""


def test_interpreter_exit_with_busy_daemon_loops_never_aborts() -> None:
    """Proves: an interpreter that exits while two daemon threads run event loops (in
    debug mode) awaiting native handles and token waiters, and while Rust futures are
    still pending, exits 0 with no fatal error, 16 times out of 16 at random points of
    the daemons' rounds; and each time every pending Rust future was dropped by the exit
    hook (its drop callback printed): no runtime was built after the hook shut the
    runtime down.

    Catches: (1) a daemon thread waiting for the GIL inside a Rust frame (a PyO3
    trampoline, a pyo3-async-runtimes completion, a detached section) when CPython
    3.11-3.13 end it with ``pthread_exit``: the forced unwind meets a ``catch_unwind``
    and the process aborts ("FATAL: exception not rethrown", rc 134); (2) the exit
    hook's runtime shutdown racing the daemons (or the bridge's worker-side spawns),
    which then built a new runtime that was never shut down, so a pending Rust future
    was never dropped. Before the fix, 15 of 40 runs of this script failed (37.5 %):
    16 passing runs had a chance of 0.625 ** 16 = 0.05 % with the bug in. Runs in about
    3 s (4 at a time).
    """
    runs = 16
    with ThreadPoolExecutor(max_workers=4) as pool:
        procs = list(
            pool.map(lambda i: run_script(EXIT_STRESS_SCRIPT, str(i), dev=True), range(runs))
        )
    for proc in procs:
        assert proc.returncode == 0, describe(proc)
        for fatal in ("Fatal Python error", "FATAL", "Traceback", "panicked"):
            assert fatal not in proc.stderr, describe(proc)
        lines = proc.stdout.splitlines()
        assert "exiting" in lines, describe(proc)
        assert lines.count("dropped") == 4, describe(proc)
