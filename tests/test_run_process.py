"""Real-process tests of ``python -m dig_service run``: real signals, real exit codes.

Every test starts ``sys.executable -m dig_service run ...`` in a subprocess
with ``tests/`` on ``PYTHONPATH`` (the targets live in ``tests/targets``) and
synchronises on the lines the process prints (node markers on stdout, log
records on stderr) or on datagrams on a notify socket, never on sleeps.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _support import python_child, reap

pytestmark = pytest.mark.skipif(
    sys.platform == "win32",
    reason="POSIX signals, pty and unix sockets; the Windows signal path is in "
    "test_platform_fallbacks.py",
)

TESTS_DIR = Path(__file__).resolve().parent
WAIT = 15.0
"""Upper bound for any single wait; a healthy run needs a fraction of it."""


class Proc:
    """A ``python -m dig_service run`` child whose stdout/stderr lines are collected live."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        full_env = os.environ.copy()
        for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            full_env.pop(var, None)
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(TESTS_DIR), full_env.get("PYTHONPATH", "")) if p
        )
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        # Default signal dispositions in the child, whatever this process ignores.
        self.popen = subprocess.Popen(
            python_child("-m", "dig_service", "run", *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=full_env,
            cwd=TESTS_DIR,
        )
        self.lines: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._open = 2
        self._readers = [
            threading.Thread(target=self._read, args=(self.popen.stdout, "out", self.stdout)),
            threading.Thread(target=self._read, args=(self.popen.stderr, "err", self.stderr)),
        ]
        for reader in self._readers:
            reader.daemon = True
            reader.start()

    def _read(self, stream: object, tag: str, sink: list[str]) -> None:
        assert hasattr(stream, "readline")
        for line in iter(stream.readline, ""):
            sink.append(line.rstrip("\n"))
            self.lines.put((tag, line.rstrip("\n")))
        self.lines.put(None)

    @property
    def output(self) -> str:
        return "\n".join(["--- stdout", *self.stdout, "--- stderr", *self.stderr])

    def wait_for(self, pattern: str, timeout: float = WAIT) -> str:
        """Block until a line (stdout or stderr) matches ``pattern``; return it."""
        regex = re.compile(pattern)
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no line matching {pattern!r} within {timeout}s\n{self.output}"
                )
            try:
                item = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if item is None:
                self._open -= 1
                if self._open == 0:
                    raise AssertionError(
                        f"the process ended (rc={self.popen.wait()}) before a line matched "
                        f"{pattern!r}\n{self.output}"
                    )
                continue
            if regex.search(item[1]):
                return item[1]

    def send(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def finish(self, timeout: float = WAIT) -> int:
        """Wait for the exit; return the exit code (with all output collected)."""
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(
                f"the process did not exit within {timeout}s\n{self.output}"
            ) from None
        for reader in self._readers:
            reader.join(WAIT)
        return rc

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()

    def close(self) -> None:
        """Kill the child if it is still alive, reap it, then release its pipes (no
        ResourceWarning)."""
        self.kill()
        for reader in self._readers:
            reader.join(WAIT)
        reap(self.popen)


@pytest.fixture
def spawn() -> Iterator[type[Proc]]:
    """``spawn(*args)`` starts a child; every child still alive at teardown is killed."""
    started: list[Proc] = []

    class Tracked(Proc):
        def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
            super().__init__(*args, env=env)
            started.append(self)

    yield Tracked
    failures: list[BaseException] = []
    for proc in started:  # every child, even if closing an earlier one failed
        try:
            proc.close()
        except BaseException as exc:
            failures.append(exc)
    if failures:
        raise failures[0]


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_exits_0_after_on_stop_and_post_stop(spawn: type[Proc], sig: int) -> None:
    """SIGTERM and SIGINT each request a ``UserRequested`` shutdown: ``run`` sees it,
    ``on_stop`` and ``post_stop`` run (in that order) and the exit status is 0.

    Catches: a signal that kills the process (default handler, KeyboardInterrupt
    traceback), a shutdown that skips the stop hooks, a wrong reason or exit code."""
    proc = spawn("targets.nodes:Basic")
    proc.wait_for("^run started$")
    proc.send(sig)
    assert proc.finish() == 0, proc.output
    assert "run saw ShutdownReason.UserRequested()" in proc.stdout, proc.output
    stops = [line for line in proc.stdout if line in ("on_stop ran", "post_stop ran")]
    assert stops == ["on_stop ran", "post_stop ran"], proc.output
    assert "Traceback" not in proc.output


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (signal.SIGTERM, signal.SIGTERM),
        (signal.SIGINT, signal.SIGINT),
        (signal.SIGTERM, signal.SIGINT),
    ],
    ids=["TERM-TERM", "INT-INT", "TERM-INT"],
)
def test_second_signal_exits_at_once_with_128_plus_n(
    spawn: type[Proc], first: int, second: int
) -> None:
    """A second SIGINT/SIGTERM while the shutdown waits for a straggler (30 s deadline)
    makes the process exit within a second with 128 + the second signal's number.

    Catches: a second signal that is ignored (waiting out the deadline, like aiorun),
    an exit that hangs in interpreter teardown (abandoned tasks, tokio threads), a wrong
    exit code."""
    proc = spawn("targets.nodes:Stubborn", "--shutdown-deadline", "30")
    proc.wait_for("^run started$")
    proc.send(first)
    proc.wait_for("shutdown started")
    sent = time.monotonic()
    proc.send(second)
    rc = proc.finish()
    elapsed = time.monotonic() - sent
    assert rc == 128 + second, proc.output
    assert elapsed < 1.0, f"took {elapsed:.2f}s\n{proc.output}"
    assert "stubborn-worker" in proc.output  # the forced exit says what it abandoned


def test_straggler_past_deadline_exits_1_and_is_named_with_its_stack(spawn: type[Proc]) -> None:
    """A task that ignores the shutdown outlives ``--shutdown-deadline``: while waiting,
    plain progress lines (stderr is not a terminal) show what still runs and the time
    left; then the exit status is 1 and the output names the straggler, the stack it was
    awaiting in (file, function, source line), and the native straggler as native.

    Catches: a straggler that hangs the process or exits 0, a silent wait, a report
    without names or without the Python stack, a deadline option that is not applied."""
    proc = spawn("targets.nodes:Stubborn", "--shutdown-deadline", "2.6")
    proc.wait_for("^run started$")
    sent = time.monotonic()
    proc.send(signal.SIGTERM)
    # run and the join share 2.6 - 0.65 (the default reserve, 2.6 / 4) = 1.95 s.
    progress = proc.wait_for(
        r"joining tasks \(\d\.\ds of 1\.95s left; \d\.\ds of the 2\.6s budget\)"
    )
    assert "2 task(s) still running: stubborn-worker, stubborn-native" in progress
    rc = proc.finish()
    assert rc == 1, proc.output
    assert time.monotonic() - sent < 6.0
    err = "\n".join(proc.stderr)
    assert "\r" not in err and "\x1b[" not in err  # no terminal control codes in a log
    assert "deadline of 2.6s exceeded" in err, proc.output
    assert re.search(r"- stubborn-worker \(PeerConnection, python", err), proc.output
    assert "in hold_forever" in err and "await asyncio.sleep(3600)" in err, proc.output
    assert re.search(r"- stubborn-native \(BackgroundLoop, native.*no stack", err)
    assert "on_stop ran" in proc.stdout and "post_stop ran" in proc.stdout


def test_shutdown_progress_is_updated_in_place_on_a_terminal(tmp_path: Path) -> None:
    """When stderr is a terminal, the shutdown progress is one status line redrawn in
    place (carriage return + erase line) with the time left, cleared before the next
    log record, instead of a stream of log lines.

    Catches: terminal output that scrolls a line per tick, or control codes that leave a
    half-erased status line under the final report."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH")) if p)
    env["TERM"] = "xterm"
    args = ["targets.nodes:Stubborn", "--shutdown-deadline", "0.8"]
    master, slave = os.openpty()
    popen = subprocess.Popen(
        python_child("-m", "dig_service", "run", *args),
        stdout=subprocess.PIPE,
        stderr=slave,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=TESTS_DIR,
    )
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert popen.stdout is not None
        for line in popen.stdout:
            if line.strip() == b"run started":
                break
        popen.send_signal(signal.SIGTERM)
        assert popen.wait(WAIT) == 1
        reader.join(WAIT)
    finally:
        reap(popen)
        os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    redraws = re.findall(
        r"\r\x1b\[2Kshutting down, joining tasks \((\d\.\d)s of 0\.6s left; ", text
    )
    assert len(redraws) >= 2, text
    assert float(redraws[0]) > float(redraws[-1]), redraws  # counting down
    # The final report starts on a clean line: the status line was erased before it.
    assert re.search(r"\r\x1b\[2K[^\r\n]*ERROR", text), text


def test_fatal_shutdown_exits_1(spawn: type[Proc]) -> None:
    """A critical task that raises cancels the token with ``Fatal``: the service stops on
    its own (stop hooks run) and the exit status is 1; the error is logged.

    Catches: Fatal mapped to exit 0, a critical failure that does not stop the service."""
    proc = spawn("targets.nodes:FatalNode")
    rc = proc.finish()
    assert rc == 1, proc.output
    assert any("Fatal" in line for line in proc.stdout), proc.output
    assert "disk on fire" in proc.output
    assert "post_stop ran" in proc.stdout


def test_run_returning_exits_0(spawn: type[Proc]) -> None:
    """``run`` returning by itself (``RunCompleted``) ends the process with status 0, with
    no signal needed.

    Catches: a runner that waits for a signal after the service already finished."""
    proc = spawn("targets.nodes:Completes")
    assert proc.finish() == 0, proc.output
    assert "post_stop ran" in proc.stdout


def test_sighup_requests_reload_and_exits_0(spawn: type[Proc]) -> None:
    """SIGHUP shuts down with ``ReloadRequested`` (graceful, exit 0): the supervisor restarts.

    Catches: SIGHUP killing the process (its default action) or mapped to another reason."""
    proc = spawn("targets.nodes:Basic")
    proc.wait_for("^run started$")
    proc.send(signal.SIGHUP)
    assert proc.finish() == 0, proc.output
    assert "run saw ShutdownReason.ReloadRequested()" in proc.stdout


def test_sigusr1_logs_the_task_snapshot(spawn: type[Proc]) -> None:
    """SIGUSR1 logs every live task with its kind, origin and age, and the service keeps
    running (a later SIGTERM still stops it cleanly).

    Catches: SIGUSR1 killing the process (its default action), a snapshot missing native
    tasks or a column."""
    proc = spawn("targets.nodes:Stubborn")
    proc.wait_for("^run started$")
    proc.send(signal.SIGUSR1)
    proc.wait_for(r"live task\(s\)")
    proc.wait_for(r"^\s+stubborn-worker\s+PeerConnection\s+python\s+\d+\.\ds$")
    proc.wait_for(r"^\s+native-worker\s+BackgroundLoop\s+native\s+\d+\.\ds$")
    proc.send(signal.SIGTERM)
    proc.wait_for("shutdown started")
    proc.send(signal.SIGTERM)  # the stubborn task would otherwise hold it for 30 s
    assert proc.finish() == 128 + signal.SIGTERM, proc.output


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    "target",
    ["Basic", "basic_instance", "basic_service", "make_node", "make_service"],
)
def test_every_target_form_runs(spawn: type[Proc], target: str) -> None:
    """MODULE:ATTR may name a node class, a node instance, a Service, or a zero-argument
    factory of a node or of a Service; each one runs and stops cleanly.

    Catches: a form that is rejected or built wrongly (e.g. a factory run as a node)."""
    proc = spawn(f"targets.nodes:{target}")
    proc.wait_for("^run started$")
    proc.send(signal.SIGTERM)
    assert proc.finish() == 0, proc.output
    assert "post_stop ran" in proc.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["no_such_module:Node"], "no such module"),
        (["targets.nodes:Missing"], "has no attribute 'Missing'"),
        (["targets.nodes"], "is not MODULE:ATTR"),
        (["targets.nodes:not_a_node"], "is an int, not a node class"),
        (["targets.broken_import:Node"], "this module cannot be imported"),
        (["targets.nodes:broken_factory"], "the factory is broken"),
        (["targets.nodes:NeedsArgs"], "constructible with no arguments"),
        (["targets.nodes:SyncHook"], "async def"),
        (["targets.nodes:basic_service", "--shutdown-deadline", "3"], "cannot be applied"),
    ],
    ids=[
        "no-module",
        "no-attr",
        "no-colon",
        "not-a-node",
        "import-fails",
        "factory-raises",
        "class-needs-args",
        "sync-hook",
        "option-on-built-service",
    ],
)
def test_bad_target_is_one_line_exit_2(spawn: type[Proc], args: list[str], expected: str) -> None:
    """A target that cannot be imported, found or made into a Service is reported in one
    line on stderr that names the target and says what is wrong; exit status 2, no
    traceback, nothing on stdout.

    Catches: a traceback dump, an exit status that a supervisor would read as a service
    failure (1), an error that does not say which target was wrong."""
    proc = spawn(*args)
    assert proc.finish() == 2, proc.output
    assert proc.stdout == []
    assert len(proc.stderr) == 1, proc.output
    line = proc.stderr[0]
    assert "Traceback" not in line
    assert args[0] in line and expected in line, line


def test_help_documents_every_option_signal_and_exit_code(spawn: type[Proc]) -> None:
    """``run --help`` documents the target forms, every option, the signals, the exit
    codes and systemd's variables.

    Catches: an option added without help, a help text that drifted from the behaviour."""
    proc = spawn("--help")
    assert proc.finish() == 0
    text = "\n".join(proc.stdout)
    for needle in (
        "MODULE:ATTR",
        "node class",
        "factory",
        "--shutdown-deadline",
        "--hook-timeout",
        "--log-level",
        "--log-format",
        "--uvloop",
        "SIGTERM",
        "SIGHUP",
        "SIGUSR1",
        "128 + n",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "demo",
    ):
        assert needle in text, needle


# --------------------------------------------------------------------------- the demo


def test_demo_runs_until_sigint_and_stops_cleanly(spawn: type[Proc]) -> None:
    """With no target the bundled demo runs: it starts, its heartbeat keeps beating
    (proof that it keeps running rather than exiting), and SIGINT stops it cleanly with
    exit 0 after its peers said goodbye and its store was closed.

    Catches: a demo that exits by itself, crashes, or does not wind down its tasks."""
    proc = spawn()
    proc.wait_for("service demo: started")
    proc.wait_for("heartbeat #2: 6 live task")
    proc.send(signal.SIGINT)
    assert proc.finish() == 0, proc.output
    err = "\n".join(proc.stderr)
    assert err.count("disconnected: local close") == 3, proc.output
    assert "store closed" in err
    assert proc.stdout == []  # nothing on stdout behind the user's back


# --------------------------------------------------------------------------- systemd


def _recv_until(sock: socket.socket, wanted: str, seen: list[str]) -> str:
    end = time.monotonic() + WAIT
    while True:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"no {wanted} on the notify socket; got {seen}") from None
        seen.append(data)
        if wanted in data.split("\n"):
            return data


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="systemd's notify protocol is Linux-only"
)
def test_notify_socket_gets_ready_after_on_start_then_stopping(
    spawn: type[Proc], tmp_path: Path
) -> None:
    """With ``NOTIFY_SOCKET`` set, a unix datagram socket receives ``READY=1`` only once
    ``on_start`` has returned, ``WATCHDOG=1`` pings when ``WATCHDOG_USEC`` asks for them,
    and ``STOPPING=1`` after SIGTERM; the process still exits 0.

    Catches: READY sent before start-up completed (systemd would route traffic too
    early), no STOPPING, no watchdog pings (systemd would kill a healthy service)."""
    address = tmp_path / "notify.sock"
    mark = tmp_path / "on_start.done"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(address))
    seen: list[str] = []
    try:
        proc = spawn(
            "targets.nodes:SlowStart",
            env={
                "NOTIFY_SOCKET": str(address),
                "WATCHDOG_USEC": "200000",
                "ON_START_MARK": str(mark),
            },
        )
        _recv_until(sock, "READY=1", seen)
        assert mark.exists(), "READY=1 arrived before on_start returned"
        _recv_until(sock, "WATCHDOG=1", seen)
        proc.send(signal.SIGTERM)
        _recv_until(sock, "STOPPING=1", seen)
        assert proc.finish() == 0, proc.output
    finally:
        sock.close()
    ready = next(i for i, m in enumerate(seen) if "READY=1" in m.split("\n"))
    stopping = next(i for i, m in enumerate(seen) if "STOPPING=1" in m.split("\n"))
    assert ready < stopping


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="systemd's notify protocol is Linux-only"
)
def test_notify_socket_gets_the_shutdown_stage_and_time_left_as_status(
    spawn: type[Proc], tmp_path: Path
) -> None:
    """While shutting down, systemd gets ``STATUS=`` with the stage and the time left of
    the budget: joining the stragglers first, then ``on_stop`` (``systemctl status``
    shows where a slow stop is).

    Catches: a STATUS that stays at "stopping: <reason>" for the whole shutdown, or one
    that counts down a per-stage deadline instead of the one budget."""
    address = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(address))
    seen: list[str] = []
    try:
        proc = spawn(
            "targets.nodes:SlowFlush",
            "--shutdown-deadline",
            "2",
            env={"NOTIFY_SOCKET": str(address)},
        )
        _recv_until(sock, "READY=1", seen)
        proc.send(signal.SIGTERM)
        assert proc.finish() == 1, proc.output  # the stragglers
        sock.settimeout(0.1)
        while True:
            try:
                seen.append(sock.recv(4096).decode())
            except TimeoutError:
                break
    finally:
        sock.close()
    joining = [m for m in seen if m.startswith("STATUS=stopping: joining ")]
    assert joining, seen
    assert re.fullmatch(r"STATUS=stopping: joining \d+ tasks?, (2\.0|1\.\d) s left", joining[0])
    # The stop hooks' window: what is left of the 2 s budget after the 1.5 s join.
    on_stop = [m for m in seen if m.startswith("STATUS=stopping: running on_stop, ")]
    assert on_stop and re.fullmatch(r".*, 0\.[3-5] s left", on_stop[0]), seen


# --------------------------------------------------------------------------- loops, logging


def test_uvloop_option_runs_and_stops(spawn: type[Proc]) -> None:
    """``--uvloop`` runs the service on uvloop; signals and exit codes work the same.

    Catches: signal handling or the core's awaitables that only work on asyncio's loop."""
    pytest.importorskip("uvloop")
    proc = spawn("targets.nodes:Basic", "--uvloop")
    proc.wait_for("^run started$")
    proc.send(signal.SIGTERM)
    assert proc.finish() == 0, proc.output
    assert "post_stop ran" in proc.stdout


def test_user_logging_configuration_is_kept(spawn: type[Proc]) -> None:
    """When the target configured logging (a handler on the root logger), the runner adds
    none: every dig_service record goes through the user's handler, once.

    Catches: a runner that calls basicConfig regardless (duplicate, reformatted lines)."""
    proc = spawn("targets.configured_logging:Node")
    proc.wait_for("^run started$")
    proc.send(signal.SIGTERM)
    assert proc.finish() == 0, proc.output
    assert any(line.startswith("CUSTOM dig_service.run SIGTERM received") for line in proc.stderr)
    assert all(line.startswith(("CUSTOM ", "  ")) for line in proc.stderr), proc.output


def test_log_level_option_filters_records(spawn: type[Proc]) -> None:
    """``--log-level warning`` hides the INFO records of a clean run (and the runner still
    writes nothing to stdout).

    Catches: a --log-level that is parsed but not applied."""
    proc = spawn("targets.nodes:Basic", "--log-level", "warning")
    proc.wait_for("^run started$")
    proc.send(signal.SIGTERM)
    assert proc.finish() == 0, proc.output
    assert proc.stderr == [], proc.output


def test_sigterm_during_pre_start_exits_0_with_only_pre_start_and_post_stop(
    spawn: type[Proc],
) -> None:
    """SIGTERM while ``pre_start`` is still running (replaying a journal, watching
    ``ctx.shutdown``): the hook sees the request and returns, ``on_start``, ``run`` and
    ``on_stop`` never run, ``post_stop`` does, and the exit status is 0 (SPEC 7,
    issue 14's done-when).

    Catches: a request during start-up that is ignored until start-up ends (the node
    starts, then stops), a start-up shutdown reported as a failure (exit 1), or
    ``on_stop`` run for a node that never finished starting."""
    proc = spawn("targets.nodes:StuckInPreStart")
    proc.wait_for("^pre_start replaying$")
    proc.send(signal.SIGTERM)
    rc = proc.finish()
    assert rc == 0, proc.output
    assert proc.stdout == ["pre_start replaying", "pre_start stopped replaying", "post_stop ran"]
    err = "\n".join(proc.stderr)
    assert re.search(r"post_stop +\d+\.\d\ds  ok", err), proc.output  # the report


def test_sigterm_with_stragglers_and_a_slow_on_stop_ends_inside_the_budget(
    spawn: type[Proc],
) -> None:
    """SIGTERM to a node whose tasks ignore the shutdown (a Python and a native one) and
    whose ``on_stop`` flushes for 0.3 s, with ``--shutdown-deadline 2``: the stragglers
    are stopped after run and the join's share (1.5 s), ``on_stop`` runs to its end in
    the reserve, the process exits inside the budget (plus the interpreter's exit), and
    the one report record names both stragglers, the Python one with its stack.

    Catches: stragglers eating the flush's time (on_stop cut short or never reached), a
    shutdown longer than the grace period a supervisor gets (deadline + margin), a report
    that is missing, logged twice, or without the stack."""
    proc = spawn("targets.nodes:SlowFlush", "--shutdown-deadline", "2")
    proc.wait_for("^run started$")
    sent = time.monotonic()
    proc.send(signal.SIGTERM)
    rc = proc.finish()
    elapsed = time.monotonic() - sent
    assert rc == 1, proc.output  # ShutdownDeadlineExceeded: the stragglers
    assert 1.5 <= elapsed < 2.0 + 1.0, f"{elapsed:.2f}s\n{proc.output}"
    assert proc.stdout[-3:] == ["on_stop flushing", "on_stop flushed", "post_stop ran"]
    err = "\n".join(proc.stderr)
    reports = [line for line in proc.stderr if "task(s) live when it began" in line]
    assert len(reports) == 1, proc.output
    assert re.search(r"join +1\.\d\ds  timed_out", err), proc.output
    assert re.search(r"on_stop +0\.[3-9]\ds  ok", err), proc.output
    assert re.search(r"- stubborn-worker \(PeerConnection, python, age [\d.]+s\), awaiting", err)
    assert "in hold_forever" in err and "await asyncio.sleep(3600)" in err, proc.output
    assert re.search(r"- stubborn-native \(BackgroundLoop, native, .*no stack", err), proc.output


def test_log_format_json_writes_one_json_object_a_line_with_the_report(
    spawn: type[Proc],
) -> None:
    """``--log-format json``: every line the runner writes on stderr parses as one JSON
    object with time, level, logger and message; the shutdown report is one of them,
    with the report as structured data (phases, stragglers with their stacks).

    Catches: a JSON mode that leaves some records (or the multi-line report, or the
    progress display) as plain text, or that puts the report in as a pre-formatted
    string instead of data."""
    # A reserve of 1.6 / 4 = 0.4 s: room for the 0.3 s flush.
    proc = spawn("targets.nodes:SlowFlush", "--shutdown-deadline", "1.6", "--log-format", "json")
    proc.wait_for("^run started$")
    proc.send(signal.SIGTERM)
    rc = proc.finish()
    assert rc == 1, proc.output
    records = [json.loads(line) for line in proc.stderr]  # every line is one object
    assert records, proc.output
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record), record
    reports = [r for r in records if "report" in r]
    assert len(reports) == 1, proc.output
    (record,) = reports
    assert record["logger"] == "dig_service.run"
    report = record["report"]
    assert report["reason"] == {"kind": "UserRequested", "message": None}
    assert [p["name"] for p in report["phases"]] == ["run", "join", "on_stop", "post_stop"]
    assert report["phases"][1]["outcome"] == "timed_out"
    assert report["phases"][2]["outcome"] == "ok"
    by_name = {s["name"]: s for s in report["stragglers"]}
    assert set(by_name) == {"stubborn-worker", "stubborn-native"}
    assert by_name["stubborn-worker"]["origin"] == "python"
    assert by_name["stubborn-worker"]["kind"] == "PeerConnection"
    assert "in hold_forever" in by_name["stubborn-worker"]["stack"]
    assert by_name["stubborn-native"]["stack"] is None


# --------------------------------------------------------------------------- supervision


def test_a_crash_looping_supervised_task_gives_up_with_fatal(spawn: type[Proc]) -> None:
    """A critical supervised task that keeps failing is restarted ``max_restarts`` times,
    each restart logged (the first with its traceback, the next on one line), then gives
    up: the token fires with ``Fatal("task 'flaky-sync' gave up after 3 restarts in W s:
    ...")``, the service stops on its own (stop hooks run) and the exit status is 1.

    Catches: a crash loop that never ends, a give-up that does not stop the service, a
    traceback per restart (a flooded log), a Fatal reason without the task or its error."""
    proc = spawn("targets.supervised:CrashLoop")
    assert proc.finish() == 1, proc.output
    err = "\n".join(proc.stderr)
    assert "task 'flaky-sync' (BackgroundLoop) failed, restarting in" in err, proc.output
    assert err.count("failed again, restarting in") == 2, proc.output
    assert err.count("Traceback (most recent call last)") == 2, proc.output  # first + give-up
    assert "gave up after 3 restarts in" in err
    assert "(attempt 2)" in err and "(attempt 4)" in err
    fatal = [line for line in proc.stdout if "Fatal" in line]
    assert fatal and "task 'flaky-sync' gave up after 3 restarts in " in fatal[0], proc.output
    assert "ConnectionRefusedError: full node refused the connection (attempt 4)" in fatal[0]
    assert "post_stop ran" in proc.stdout


def test_sigusr1_snapshot_shows_restarts(spawn: type[Proc]) -> None:
    """SIGUSR1's snapshot shows a supervised task once, with how often it restarted, and
    the registry's restart count in its header.

    Catches: a supervised task listed once per incarnation, restarts missing from the
    snapshot."""
    proc = spawn("targets.supervised:Restarting")
    proc.wait_for("^restarted 3$")
    proc.send(signal.SIGUSR1)
    proc.wait_for(r"live task\(s\).*restarted \d+")
    proc.wait_for(r"^\s+reconnect\s+PeerConnection\s+python\s+\d+\.\ds  restarted \d+x$")
    proc.send(signal.SIGTERM)
    assert proc.finish() == 0, proc.output
    assert sum("reconnect " in line for line in proc.stderr if "restarted" in line) == 1
