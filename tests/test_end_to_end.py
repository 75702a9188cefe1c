"""End to end: a real process, a real Ctrl-C (row 10 of the ``start()`` contract)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest


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
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "running"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert out.splitlines() == ["task saw user requested", "on_stop", "post_stop"], err
    assert "KeyboardInterrupt" in err
