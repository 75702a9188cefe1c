"""Deep chains of child tokens (issue 12, item 6): cancelled and freed at any depth.

A reconnect loop that derives each connection's token from the last one's
builds a chain as long as the process has reconnected. Cancelling its root,
or dropping an uncancelled chain, used to recurse once per link in the Rust
core and crashed the interpreter (SIGSEGV) at 50,000 links for a cancel and
1,000,000 for a drop. Each scenario runs in a child interpreter, so that a
crash is reported as a failed test (with its signal) instead of taking the
test session down, and runs twice there: on the main thread, as the
reproducer did, and on a thread with a 2 MiB stack (a tokio worker's).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

CANCEL_DEPTH = 50_000
DROP_DEPTH = 1_000_000


def run_child(body: str) -> None:
    """Run ``body`` (defining ``scenario()``) on the main thread and on a 2 MiB thread."""
    code = textwrap.dedent(
        """
        import threading
        from dig_service import ShutdownReason, ShutdownToken

        {body}

        scenario()
        threading.stack_size(2 * 1024 * 1024)
        errors = []
        def on_thread():
            try:
                scenario()
            except BaseException as exc:
                errors.append(exc)
        t = threading.Thread(target=on_thread)
        t.start()
        t.join()
        if errors:
            raise errors[0]
        print("ok")
        """
    ).format(body=textwrap.dedent(body))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    assert proc.returncode == 0, (
        f"child exited with {proc.returncode} (a negative code is a signal: -11 is SIGSEGV)\n"
        f"stderr:\n{proc.stderr[-4000:]}"
    )
    assert proc.stdout.strip() == "ok", proc.stdout


def test_cancel_reaches_the_end_of_a_50k_chain() -> None:
    """Proves cancelling the root of a 50,000-deep chain reaches the deepest token.

    The deepest token reports the root's reason and wakes its waiter; the
    chain is then freed, cancelled, without a crash.

    Catches: a recursive cancel in the Rust core (one native stack frame per
    link: the interpreter died with SIGSEGV at 50,000 links).
    """
    run_child(
        f"""
        import asyncio

        def scenario():
            root = ShutdownToken()
            t = root
            for _ in range({CANCEL_DEPTH}):
                t = t.child_token()
            leaf = t

            async def wait_then_cancel():
                waiter = asyncio.ensure_future(leaf.cancelled())
                await asyncio.sleep(0)
                root.cancel(ShutdownReason.UserRequested())
                await asyncio.wait_for(waiter, 30)

            asyncio.run(wait_then_cancel())
            assert leaf.is_cancelled()
            assert leaf.reason() == ShutdownReason.UserRequested(), leaf.reason()
            del t, leaf, root
        """
    )


def test_dropping_a_1m_uncancelled_chain() -> None:
    """Proves an uncancelled 1,000,000-deep chain is freed when its last token goes.

    Only the deepest token is kept while the chain is built (each link is
    kept alive by its child), so deleting it frees the whole chain at once,
    in the Rust core. The root, held apart, is still usable afterwards.

    Catches: a recursive drop of the parent links (SIGSEGV at 1,000,000
    links on the main thread, at 50,000 on a 2 MiB stack).
    """
    run_child(
        f"""
        import gc

        def scenario():
            root = ShutdownToken()
            t = root.child_token()
            for _ in range({DROP_DEPTH}):
                t = t.child_token()
            del t
            gc.collect()
            assert not root.is_cancelled()
            child = root.child_token()
            root.cancel(ShutdownReason.RpcRequested())
            assert child.reason() == ShutdownReason.RpcRequested()
        """
    )
