"""End to end: a real process, a real Ctrl-C (row 10 of the ``start()`` contract)."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from _support import python_child, reap


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_row10_ctrl_c_under_asyncio_run_still_runs_the_clean_up(tmp_path: Path) -> None:
    """Proves: end to end, Ctrl-C (SIGINT) on ``asyncio.run(service.start())`` — which
    cancels the main task — still joins the tasks and runs ``on_stop``/``post_stop``
    before the process ends with ``KeyboardInterrupt``.

    Catches: the most common way a service is stopped during development skipping
    the clean-up hooks.
    """
    script = tmp_path / "svc.py"
    script.write_text(
        "import asyncio\n"
        "from dig_service import NodeLifecycle, Service, TaskKind\n"
        "class Node(NodeLifecycle):\n"
        "    async def on_start(self, ctx):\n"
        "        ctx.tasks.spawn('loop', TaskKind.BackgroundLoop, self.loop(ctx))\n"
        "    async def loop(self, ctx):\n"
        "        await ctx.shutdown.cancelled()\n"
        "        print('task saw', ctx.shutdown.reason(), flush=True)\n"
        "    async def run(self, ctx):\n"
        "        print('running', flush=True)\n"
        "        await ctx.shutdown.cancelled()\n"
        "    async def on_stop(self, ctx):\n"
        "        print('on_stop', flush=True)\n"
        "    async def post_stop(self, ctx):\n"
        "        print('post_stop', flush=True)\n"
        "asyncio.run(Service(Node()).start())\n"
    )
    # Default signal dispositions in the child even if this process ignores SIGINT
    # (pytest run from a background job), and the child reaped on every exit path.
    proc = subprocess.Popen(
        python_child(str(script)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "running"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        reap(proc)
    assert out.splitlines() == ["task saw user requested", "on_stop", "post_stop"], err
    assert "KeyboardInterrupt" in err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signal dispositions")
def test_children_get_default_signal_dispositions_even_from_an_ignoring_parent() -> None:
    """Proves: a child started with ``python_child`` has Python's SIGINT handler and the
    default action for SIGTERM/SIGHUP/SIGUSR1 even when its parent ignores them, while a
    plain ``python`` child of the same parent inherits the ignored SIGINT (the control).

    Catches: the signal tests depending on how pytest itself was started: from a job
    whose shell ignores SIGINT (``(cmd &)`` in a script) a test's Ctrl-C did nothing,
    the test waited 30 s, failed, and left its child running.
    """
    report = (
        "import signal\n"
        "def name(h):\n"
        "    return {signal.SIG_IGN: 'ignored', signal.SIG_DFL: 'default'}.get(h) or h.__name__\n"
        "print(' '.join(f'{n}=' + name(signal.getsignal(getattr(signal, n)))\n"
        "               for n in ('SIGINT', 'SIGTERM', 'SIGHUP', 'SIGUSR1')))\n"
    )
    parent = (
        "import signal, subprocess, sys\n"
        "for n in ('SIGINT', 'SIGTERM', 'SIGHUP', 'SIGUSR1'):\n"
        "    signal.signal(getattr(signal, n), signal.SIG_IGN)\n"
        "out = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=True).stdout\n"
        "print(out, end='')\n"
    )

    def via_ignoring_parent(argv: list[str]) -> str:
        return subprocess.run(
            [sys.executable, "-c", parent, *argv],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()

    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "report.py"
        script.write_text(report)
        plain = via_ignoring_parent([sys.executable, str(script)])
        reset = via_ignoring_parent(python_child(str(script)))
    assert plain == "SIGINT=ignored SIGTERM=ignored SIGHUP=ignored SIGUSR1=ignored", plain
    assert reset == ("SIGINT=default_int_handler SIGTERM=default SIGHUP=default SIGUSR1=default"), (
        reset
    )
