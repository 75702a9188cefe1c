"""In-process tests of ``dig_service.run``, the CLI's target resolution, sd_notify and
the demo's RPC API (the real-process behaviour is in ``test_run_process.py``)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dig_service import (
    JsonRpcError,
    NodeLifecycle,
    RunContext,
    Service,
    ServiceConfig,
    ShutdownReason,
    StartContext,
    TaskKind,
)
from dig_service._cli import TargetError, main, resolve_target
from dig_service._demo import make_demo_service
from dig_service._runner import run
from dig_service._systemd import Notifier, notify, notify_address, watchdog_interval
from dig_service.testing import TestNode

HANDLED = [
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1")
    if hasattr(signal, name)  # Windows has neither SIGHUP nor SIGUSR1
]

POSIX_SIGNALS = pytest.mark.skipif(
    sys.platform == "win32",
    reason="POSIX signals sent with os.kill (on Windows os.kill terminates the process); "
    "the Windows signal path is in test_platform_fallbacks.py",
)
LINUX_ONLY = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="systemd's notify protocol is Linux-only "
    "(a no-op elsewhere: test_platform_fallbacks.py)",
)


def _loop_factories() -> list[Any]:
    factories: list[Any] = [pytest.param(None, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        factories.append(pytest.param(None, id="uvloop", marks=pytest.mark.skip("no uvloop")))
    else:
        factories.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    return factories


LOOPS = _loop_factories()


@pytest.fixture
def sentinel_handlers() -> Iterator[dict[int, Callable[[int, object], None]]]:
    """Distinct Python handlers on every signal ``run`` handles; the originals come back after."""
    originals = {sig: signal.getsignal(sig) for sig in HANDLED}
    sentinels: dict[int, Callable[[int, object], None]] = {}
    for sig in HANDLED:

        def handler(signum: int, frame: object) -> None:
            raise AssertionError(f"sentinel handler for {signum} was called")

        sentinels[sig] = handler
        signal.signal(sig, handler)
    yield sentinels
    for sig, original in originals.items():
        signal.signal(sig, original)


class SelfSignal(NodeLifecycle):
    """Sends ``sig`` to its own process once running; records the reason ``run`` saw."""

    def __init__(self, sig: int) -> None:
        self.sig = sig
        self.reason: ShutdownReason | None = None

    async def run(self, ctx: RunContext) -> None:
        os.kill(os.getpid(), self.sig)
        await ctx.shutdown.cancelled()
        self.reason = ctx.shutdown.reason()


@POSIX_SIGNALS
@pytest.mark.parametrize("loop_factory", LOOPS)
@pytest.mark.parametrize(
    ("sig", "reason"),
    [
        (signal.SIGTERM, ShutdownReason.UserRequested()),
        (signal.SIGINT, ShutdownReason.UserRequested()),
        (signal.SIGHUP, ShutdownReason.ReloadRequested()),
    ],
    ids=["SIGTERM", "SIGINT", "SIGHUP"],
)
def test_signals_map_to_reasons_and_handlers_are_restored(
    sentinel_handlers: dict[int, Any], loop_factory: Any, sig: int, reason: ShutdownReason
) -> None:
    """A real signal to the process maps to its ``ShutdownReason`` (SIGINT/SIGTERM →
    ``UserRequested``, SIGHUP → ``ReloadRequested``), ``run`` returns 0, and every handler
    that was installed before ``run`` is installed again after it, on asyncio and uvloop.

    Catches: a wrong mapping; handlers left pointing at a closed loop (the next Ctrl-C
    would be swallowed) or reset to the default instead of the previous handler."""
    node = SelfSignal(sig)
    assert run(Service(node), loop_factory=loop_factory) == 0
    assert node.reason == reason
    for s in HANDLED:
        assert signal.getsignal(s) is sentinel_handlers[s], signal.Signals(s).name


def test_exit_codes_follow_exit_status_and_service_errors(caplog: pytest.LogCaptureFixture) -> None:
    """``run`` returns ``ExitStatus.exit_code`` (0 for ``RunCompleted``, 1 for ``Fatal``)
    and 1 for a ``ServiceError``, which is logged with its cause.

    Catches: a ``ServiceError`` escaping ``run`` or mapped to 0; Fatal treated as graceful."""
    assert run(Service(TestNode(run_delay=0.01)), install_signal_handlers=False) == 0

    class FatalRun(NodeLifecycle):
        async def run(self, ctx: RunContext) -> None:
            ctx.shutdown.cancel(ShutdownReason.Fatal("out of disk"))

    assert run(Service(FatalRun()), install_signal_handlers=False) == 1
    with caplog.at_level(logging.ERROR, logger="dig_service"):
        assert run(Service(TestNode(fail_run=True)), install_signal_handlers=False) == 1
    failed = [r for r in caplog.records if r.name == "dig_service.run" and "failed" in r.message]
    assert failed and failed[0].exc_info is not None, caplog.text
    assert "run failure injected" in caplog.text  # the cause's traceback is in the record


@POSIX_SIGNALS
def test_second_signal_returns_128_plus_n_at_once(sentinel_handlers: dict[int, Any]) -> None:
    """In the library path too, a second SIGTERM during a shutdown that waits for a
    straggler makes ``run`` return 143 at once (well inside the 30 s deadline), and the
    handlers are restored.

    Catches: ``run`` waiting for the deadline or hanging on the abandoned tasks at close."""

    class Straggling(NodeLifecycle):
        async def on_start(self, ctx: StartContext) -> None:
            ctx.tasks.spawn("straggler", TaskKind.BackgroundLoop, asyncio.sleep(3600))

        async def run(self, ctx: RunContext) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            await ctx.shutdown.cancelled()
            asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)

    started = time.monotonic()
    code = run(Service(Straggling(), config=ServiceConfig(shutdown_deadline=30)))
    assert code == 128 + signal.SIGTERM
    assert time.monotonic() - started < 2.0
    assert signal.getsignal(signal.SIGTERM) is sentinel_handlers[signal.SIGTERM]


def test_run_refuses_misuse() -> None:
    """``run`` rejects a node (with the fix in the message), a running event loop, and
    signal handlers outside the main thread; from a thread with
    ``install_signal_handlers=False`` it works.

    Catches: a node silently accepted, a nested loop error deep inside asyncio, a
    ``ValueError`` from ``signal`` instead of a clear message."""
    with pytest.raises(TypeError, match=r"run\(Service\(node\)\)"):
        run(TestNode())  # type: ignore[arg-type]

    service = Service(TestNode(run_delay=0.01))

    async def nested() -> None:
        run(service)

    with pytest.raises(RuntimeError, match="running event loop"):
        asyncio.run(nested())
    assert not service.handle().is_running()

    results: dict[str, object] = {}

    def in_thread() -> None:
        try:
            run(Service(TestNode(run_delay=0.01)))
        except RuntimeError as exc:
            results["default"] = exc
        results["no_signals"] = run(
            Service(TestNode(run_delay=0.01)), install_signal_handlers=False
        )

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(10)
    assert "main thread" in str(results["default"])
    assert results["no_signals"] == 0


# --------------------------------------------------------------------------- targets


def test_resolve_target_applies_options_to_every_buildable_form() -> None:
    """``--shutdown-deadline``/``--hook-timeout`` reach the ``ServiceConfig`` of a service
    built from a node class, a node instance or a node factory; a factory of a ``Service``
    is taken as is.

    Catches: options silently dropped for some target forms."""
    for attr in ("Basic", "basic_instance", "make_node"):
        service = resolve_target(f"targets.nodes:{attr}", shutdown_deadline=3, hook_timeout=2)
        assert service.config == ServiceConfig(shutdown_deadline=3, hook_timeout=2), attr
    built = resolve_target("targets.nodes:make_service")
    assert built.config.shutdown_deadline == 5.0
    with pytest.raises(TargetError, match="cannot be applied"):
        resolve_target("targets.nodes:make_service", hook_timeout=1)


def test_stop_reserve_reaches_the_config_of_every_buildable_form() -> None:
    """``--stop-reserve`` reaches the ``ServiceConfig`` of a service built from a node
    class, a node instance or a factory, with the deadline given or defaulted; a built
    ``Service`` refuses it, naming the option.

    Catches: the reserve dropped on the way (the service would get
    ``min(5, deadline/4)`` whatever the operator asked for), or applied to a
    ``Service`` whose config its author fixed."""
    for attr in ("Basic", "basic_instance", "make_node"):
        service = resolve_target(f"targets.nodes:{attr}", shutdown_deadline=12, stop_reserve=7)
        assert service.config == ServiceConfig(shutdown_deadline=12, stop_reserve=7), attr
        assert service.config.run_and_join_budget == 5.0
        service = resolve_target(f"targets.nodes:{attr}", stop_reserve=0)
        assert service.config.stop_reserve == 0.0, attr
        assert service.config.shutdown_deadline == ServiceConfig().shutdown_deadline
    with pytest.raises(TargetError, match="--stop-reserve cannot be applied"):
        resolve_target("targets.nodes:make_service", stop_reserve=1)


def test_a_reserve_over_the_deadline_is_refused_before_the_target_is_imported() -> None:
    """A ``--stop-reserve`` longer than the deadline is a one-line error naming both
    options, raised before the target's module is imported (its import may start
    things), and from ``main`` exit status 2 with the demo too.

    Catches: the contradiction reported as an import error of the target, or
    only once the service is built (after the import's side effects), or a
    traceback instead of a usage error."""
    with pytest.raises(TargetError, match=r"^--shutdown-deadline/--stop-reserve: .*stop_reserve"):
        resolve_target("no_such_module_of_this_test:Node", shutdown_deadline=2, stop_reserve=3)
    assert "no_such_module_of_this_test" not in sys.modules
    assert main(["run", "--stop-reserve", "31"]) == 2


def test_main_reports_the_reserve_error_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """The exit-2 message names the option and the deadline it exceeds, on one line.

    Catches: a message that names neither (the operator cannot tell which flag to fix)."""
    assert main(["run", "--shutdown-deadline", "4", "--stop-reserve", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("python -m dig_service run: error: --shutdown-deadline/--stop-reserve:")
    assert "(6s) must not exceed `shutdown_deadline` (4s)" in err


@pytest.fixture(autouse=False)
def targets_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))


pytestmark = pytest.mark.usefixtures("targets_on_path")


# --------------------------------------------------------------------------- systemd


@LINUX_ONLY
def test_notify_address_forms() -> None:
    """``$NOTIFY_SOCKET`` may be a path or ``@name`` (abstract); anything else is ignored.

    Catches: an abstract name sent to a file called "@name", a relative path used."""
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@sd-notify"}) == b"\0sd-notify"
    for bad in ("", "@", "relative/path", "vsock:2:1234"):
        assert notify_address({"NOTIFY_SOCKET": bad}) is None, bad
    assert notify_address({}) is None


@LINUX_ONLY
def test_notify_reaches_an_abstract_socket() -> None:
    """A datagram reaches a socket in the abstract namespace named ``@name``.

    Catches: abstract addresses built without the leading NUL byte."""
    name = f"dig-service-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        assert notify("READY=1", "STATUS=up", environ={"NOTIFY_SOCKET": f"@{name}"})
        assert sock.recv(100) == b"READY=1\nSTATUS=up"
    finally:
        sock.close()


@LINUX_ONLY
def test_notify_failures_are_quiet(tmp_path: Path) -> None:
    """A notify socket that is gone makes ``send`` return False instead of raising.

    Catches: a supervisor restart taking the service down with an OSError."""
    notifier = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert notifier.send("WATCHDOG=1") is False
    notifier.close()
    assert notify("READY=1", environ={}) is False


@LINUX_ONLY
def test_watchdog_interval() -> None:
    """Pings go every ``WATCHDOG_USEC / 2``, and only to the process ``WATCHDOG_PID`` names.

    Catches: a child process pinging for its parent, a ping period too long to help."""
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 1.5
    mine = {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(mine) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}) is None
    for bad in ("", "0", "-5", "soon"):
        assert watchdog_interval({"WATCHDOG_USEC": bad}) is None


# --------------------------------------------------------------------------- the demo


@pytest.mark.asyncio
async def test_demo_rpc_get_tasks_and_stop_node() -> None:
    """The demo's RPC API lists the live tasks (every kind, both origins) and
    ``stop_node`` shuts the service down with ``RpcRequested``; an unknown method is
    JSON-RPC "method not found".

    Catches: a demo whose RPC API does not reach its own service."""
    service = make_demo_service(ServiceConfig(shutdown_deadline=5))
    rpc = service.rpc_api
    started = asyncio.ensure_future(service.start())
    tasks: list[dict[str, Any]] = []
    for _ in range(500):
        result = await rpc.dispatch("get_tasks", None)
        assert isinstance(result, list)
        tasks = result
        if any(t["name"] == "heartbeat" for t in tasks):
            break
        await asyncio.sleep(0.01)
    kinds = {t["kind"] for t in tasks}
    assert kinds == {"BackgroundLoop", "PeerConnection", "Maintenance"}, tasks
    assert {t["origin"] for t in tasks} == {"python", "native"}
    await rpc.healthz()
    with pytest.raises(JsonRpcError) as info:
        await rpc.dispatch("no_such_method", None)
    assert info.value.code == -32601
    assert await rpc.dispatch("stop_node", None) == {"stopping": True}
    status = await asyncio.wait_for(started, 10)
    assert status.exit_code == 0
    assert service.shutdown_token.reason() == ShutdownReason.RpcRequested()


# --------------------------------------------------------------------------- READY=1 hook


@LINUX_ONLY
def test_ready_is_sent_only_after_on_start_returned(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``READY=1`` has not arrived while ``on_start`` is still running and arrives soon
    after it returned (the runner learns the phase from the service's phase listener);
    ``STOPPING=1`` follows the shutdown.

    Catches: READY sent at start (systemd would start dependent units too early), or
    never sent."""
    address = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(address))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(address))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    received: list[str] = []

    def drain() -> None:
        while True:
            try:
                received.append(sock.recv(4096).decode())
            except BlockingIOError:
                return

    class Node(NodeLifecycle):
        async def on_start(self, ctx: StartContext) -> None:
            await asyncio.sleep(0.1)
            drain()
            assert not any("READY=1" in m for m in received), received

        async def run(self, ctx: RunContext) -> None:
            for _ in range(200):
                drain()
                if any("READY=1" in m for m in received):
                    break
                await asyncio.sleep(0.01)
            ctx.shutdown.cancel(ShutdownReason.UserRequested())

    try:
        assert run(Service(Node()), install_signal_handlers=False) == 0
        drain()
    finally:
        sock.close()
    kinds = [m.split("\n")[0] for m in received]
    # Then the shutdown's progress, as STATUS= alone ("stopping: <stage>, N s left").
    assert kinds[:2] == ["READY=1", "STOPPING=1"], received
    assert all(re.fullmatch(r"STATUS=stopping: .+, \d+\.\d s left", k) for k in kinds[2:]), received
