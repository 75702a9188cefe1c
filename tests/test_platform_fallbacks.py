"""The runner on a platform like Windows: no ``loop.add_signal_handler``, no SIGHUP or
SIGUSR1, a SIGBREAK (Ctrl-Break), no systemd.

Simulated here by monkeypatching: an event loop whose ``add_signal_handler`` raises
``NotImplementedError`` (as asyncio's loops do on Windows), the ``signal`` module
without SIGHUP/SIGUSR1 and with SIGBREAK (a spare POSIX signal stands in for it),
and ``sys.platform``. Signals are raised with ``signal.raise_signal``, which works
on Windows too.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dig_service import (
    NodeLifecycle,
    RunContext,
    Service,
    ServiceConfig,
    ShutdownReason,
    StartContext,
    TaskKind,
)
from dig_service._cli import build_parser
from dig_service._runner import run
from dig_service._systemd import Notifier, notify, notify_address, watchdog_interval
from dig_service.testing import TestNode

REAL: dict[str, int] = {
    name: getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGBREAK")
    if hasattr(signal, name)
}
"""The platform's real signal numbers, read before any test patches ``signal``."""


class NoSignalLoop(asyncio.SelectorEventLoop):
    """A loop without signal support, like asyncio's loops on Windows."""

    def add_signal_handler(self, sig: int, callback: Any, *args: Any) -> None:
        raise NotImplementedError

    def remove_signal_handler(self, sig: int) -> bool:
        raise NotImplementedError


@pytest.fixture
def sentinels() -> Iterator[dict[int, Callable[[int, object], None]]]:
    """A distinct handler on every real signal the runner may touch; originals restored."""
    originals = {num: signal.getsignal(num) for num in REAL.values()}
    handlers: dict[int, Callable[[int, object], None]] = {}
    for num in REAL.values():

        def handler(signum: int, frame: object) -> None:
            raise AssertionError(f"sentinel handler for signal {signum} was called")

        handlers[num] = handler
        signal.signal(num, handler)
    yield handlers
    for num, original in originals.items():
        signal.signal(num, original)


@pytest.fixture
def windows_like(monkeypatch: pytest.MonkeyPatch) -> int:
    """``signal`` as on Windows: no SIGHUP/SIGUSR1; SIGBREAK (returned) is real there,
    SIGUSR2 stands in for it elsewhere."""
    monkeypatch.delattr(signal, "SIGHUP", raising=False)
    monkeypatch.delattr(signal, "SIGUSR1", raising=False)
    if "SIGBREAK" not in REAL:
        monkeypatch.setattr(signal, "SIGBREAK", REAL["SIGUSR2"], raising=False)
    return int(signal.SIGBREAK)  # type: ignore[attr-defined]


class RaisesSignal(NodeLifecycle):
    """Raises ``sig`` in its own process once running; records what it saw."""

    def __init__(self, sig: int, watch: tuple[int, ...] = ()) -> None:
        self.sig = sig
        self.watch = watch
        self.during: dict[int, Any] = {}
        self.reason: ShutdownReason | None = None

    async def run(self, ctx: RunContext) -> None:
        self.during = {num: signal.getsignal(num) for num in self.watch}
        signal.raise_signal(self.sig)
        await ctx.shutdown.cancelled()
        self.reason = ctx.shutdown.reason()


def test_without_add_signal_handler_ctrl_c_and_sigterm_go_through_signal_signal(
    sentinels: dict[int, Any],
) -> None:
    """Proves: on a loop without ``add_signal_handler``, ``run`` installs SIGINT and SIGTERM
    handlers with ``signal.signal``; a real SIGINT (and SIGTERM) requests a shutdown with
    ``UserRequested``, ``run`` returns 0, and the previous handlers come back.

    Catches: the Windows runner ignoring Ctrl-C (the loop refuses signal handlers and
    the runner just logged it), Ctrl-C raising ``KeyboardInterrupt`` through the service,
    or the handlers left installed after ``run``.
    """
    for name in ("SIGINT", "SIGTERM"):
        num = REAL[name]
        node = RaisesSignal(num, watch=(num,))
        assert run(Service(node), loop_factory=NoSignalLoop) == 0, name
        assert node.reason == ShutdownReason.UserRequested(), name
        during = node.during[num]
        assert callable(during) and during is not sentinels[num], name
        assert signal.getsignal(num) is sentinels[num], name


def test_windows_like_platform_ctrl_break_stops_and_sighup_sigusr1_are_left_alone(
    sentinels: dict[int, Any],
    windows_like: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proves: where ``signal`` has SIGBREAK and no SIGHUP/SIGUSR1 and the loop has no
    ``add_signal_handler``, Ctrl-Break requests a ``UserRequested`` shutdown (the log
    says to press Ctrl-Break again to force it), and the runner touches no other signal.

    Catches: ``run`` failing with ``AttributeError`` on ``signal.SIGHUP`` (Windows has
    none), Ctrl-Break killing the process (its default action on Windows), or handlers
    installed for signals the platform does not have.
    """
    untouched = tuple(REAL[n] for n in ("SIGHUP", "SIGUSR1") if n in REAL)
    node = RaisesSignal(windows_like, watch=(windows_like, *untouched))
    with caplog.at_level(logging.INFO, logger="dig_service.run"):
        assert run(Service(node), loop_factory=NoSignalLoop) == 0
    assert node.reason == ShutdownReason.UserRequested()
    assert node.during[windows_like] is not sentinels[windows_like]
    for num in untouched:
        assert node.during[num] is sentinels[num], num
    assert "send Ctrl-Break again to exit at once" in caplog.text
    assert signal.getsignal(windows_like) is sentinels[windows_like]


def test_second_ctrl_c_without_add_signal_handler_exits_at_once_with_130(
    sentinels: dict[int, Any],
) -> None:
    """Proves: through the ``signal.signal`` path too, a second Ctrl-C during a shutdown
    that waits for a straggler makes ``run`` return 128 + SIGINT at once.

    Catches: the fallback path losing the "second signal forces the exit" rule (an
    operator on Windows would wait out the whole deadline).
    """
    sigint = REAL["SIGINT"]

    class Straggling(NodeLifecycle):
        async def on_start(self, ctx: StartContext) -> None:
            ctx.tasks.spawn("straggler", TaskKind.BackgroundLoop, asyncio.sleep(3600))

        async def run(self, ctx: RunContext) -> None:
            signal.raise_signal(sigint)
            await ctx.shutdown.cancelled()
            asyncio.get_running_loop().call_soon(signal.raise_signal, sigint)

    service = Service(Straggling(), config=ServiceConfig(shutdown_deadline=60))
    assert run(service, loop_factory=NoSignalLoop) == 128 + sigint
    assert signal.getsignal(sigint) is sentinels[sigint]


def test_help_says_which_signal_features_are_off(
    windows_like: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Proves: on a platform without SIGHUP/SIGUSR1, ``run --help`` names Ctrl-C and
    Ctrl-Break as the stop keys and says that reload and the snapshot by signal are off;
    on this platform's real ``signal`` module the help describes what it has.

    Catches: a help text promising SIGHUP/SIGUSR1 features on Windows, where they
    cannot work.
    """
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    assert "Ctrl-C, Ctrl-Break (SIGINT, SIGBREAK)" in text
    assert "SIGHUP           not on this platform: reload by signal is off" in text
    assert "SIGUSR1          not on this platform: the task snapshot by signal is off" in text


def test_help_on_this_platform_describes_its_own_signals(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Proves: with the real ``signal`` module, the help lists exactly the features the
    platform supports (all of them on Linux and macOS).

    Catches: the "not on this platform" wording leaking onto POSIX, or the reverse.
    """
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    assert ("reload by signal is off" in text) is ("SIGHUP" not in REAL)
    assert ("snapshot by signal is off" in text) is ("SIGUSR1" not in REAL)
    assert ("Ctrl-Break" in text) is ("SIGBREAK" in REAL)


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_sd_notify_is_a_no_op_off_linux(monkeypatch: pytest.MonkeyPatch, platform: str) -> None:
    """Proves: off Linux, ``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC`` are ignored: no
    address, no notifier, no watchdog interval, and ``notify`` sends nothing.

    Catches: the runner trying systemd's protocol where there is no systemd (on macOS
    ``SOCK_CLOEXEC`` does not exist: an ``AttributeError`` at the first report).
    """
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1000000"}
    monkeypatch.setattr(sys, "platform", "linux")
    assert notify_address(env) == "/run/systemd/notify"  # Linux: used
    assert watchdog_interval(env) == 0.5
    monkeypatch.setattr(sys, "platform", platform)
    assert notify_address(env) is None
    assert notify_address({"NOTIFY_SOCKET": "@abstract"}) is None
    assert Notifier.from_env(env) is None
    assert watchdog_interval(env) is None
    assert notify("READY=1", environ=env) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Linux case needs Linux")
@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_the_runner_speaks_sd_notify_only_on_linux(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, platform: str
) -> None:
    """Proves: ``run`` with ``$NOTIFY_SOCKET`` set sends ``READY=1`` on Linux and nothing
    at all when the platform is not Linux, and the service runs the same either way.

    Catches: the no-op being wired only into the helpers and not into the runner (or the
    runner never speaking the protocol at all, which the Linux case would show).
    """
    address = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(address))
    listener.setblocking(False)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", str(address))
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        monkeypatch.setattr(sys, "platform", platform)
        assert run(Service(TestNode(run_delay=0.01)), install_signal_handlers=False) == 0
        received: list[str] = []
        while True:
            try:
                received.append(listener.recv(4096).decode())
            except BlockingIOError:
                break
    finally:
        listener.close()
    if platform == "linux":
        assert any("READY=1" in r.split("\n") for r in received), received
    else:
        assert received == []


def test_platform_facts_used_by_the_simulation_hold() -> None:
    """Proves the simulation's premise: asyncio's base loop has no signal support
    (``NotImplementedError``), which is what Windows' loops inherit.

    Catches: a ``NoSignalLoop`` that no longer matches what asyncio does on Windows.
    """
    loop = asyncio.BaseEventLoop()
    try:
        with pytest.raises(NotImplementedError):
            loop.add_signal_handler(REAL["SIGINT"], lambda: None)
    finally:
        loop.close()


def test_the_core_imports_and_works_where_os_has_no_register_at_fork() -> None:
    """Proves: in a process whose ``os`` has no ``register_at_fork`` (Windows has no
    ``fork()``), ``dig_service._core`` still imports, and a registry runs a Python and
    a native task to completion.

    Catches: the fork guard's registration failing the import of the native module on
    every platform without ``fork()`` (an ``AttributeError`` at ``import dig_service``).
    """
    script = (
        "import os, asyncio\n"
        "del os.register_at_fork\n"
        "from dig_service import ShutdownToken, TaskKind, TaskRegistry\n"
        "from dig_service.testing import spawn_native_sleeper\n"
        "async def main():\n"
        "    reg = TaskRegistry(ShutdownToken())\n"
        "    spawn_native_sleeper(reg, 'native', 0.01)\n"
        "    reg.spawn('python', TaskKind.BackgroundLoop, asyncio.sleep(0.01))\n"
        "    await reg.join_all(5.0)\n"
        "    s = reg.stats()\n"
        "    print(s.spawned, s.completed)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "2"], proc.stdout


@pytest.mark.parametrize(
    ("platform", "expected"),
    [
        ("win32", "--uvloop: uvloop does not exist for Windows; run without --uvloop"),
        ("linux", "--uvloop: uvloop is not installed (pip install 'dig-service[uvloop]')"),
    ],
)
def test_uvloop_option_without_uvloop_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    platform: str,
    expected: str,
) -> None:
    """Proves: ``run --uvloop`` where uvloop cannot be imported is one line and exit 2,
    telling a Windows user that there is no uvloop there (the extra installs nothing)
    and anyone else how to install it.

    Catches: a Windows user sent to ``pip install 'dig-service[uvloop]'``, which does
    not install uvloop there, or a traceback instead of the usage error.
    """
    from dig_service._cli import main

    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` fail
    monkeypatch.setattr(sys, "platform", platform)
    assert main(["run", "--uvloop"]) == 2
    err = capsys.readouterr().err
    assert err == f"python -m dig_service run: error: {expected}\n"


def test_forwarders_do_not_outlive_run_when_the_previous_handler_was_not_pythons(
    sentinels: dict[int, Any],
) -> None:
    """Proves: when ``signal.getsignal`` could not name the previous handler (``None``:
    one installed outside Python), ``run`` on a loop without ``add_signal_handler``
    still takes its forwarders down afterwards, leaving the defaults (Python's
    ``KeyboardInterrupt`` handler for SIGINT), as ``remove_signal_handler`` would.

    Catches: a forwarder left installed after ``run``: later signals would be posted to
    a closed loop and silently dropped (Ctrl-C would do nothing any more).
    """
    sigint, sigterm = REAL["SIGINT"], REAL["SIGTERM"]
    real_getsignal = signal.getsignal
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(signal, "getsignal", lambda signum: None)
        assert run(Service(RaisesSignal(sigterm)), loop_factory=NoSignalLoop) == 0
    assert real_getsignal(sigint) is signal.default_int_handler
    assert real_getsignal(sigterm) == signal.SIG_DFL
