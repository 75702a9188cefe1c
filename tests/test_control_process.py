"""Real-process tests of the control socket, ``ps``, ``stop`` and the loop-stall watchdog
(SPEC section 9, issue 16 "Done when").

Each test starts ``python -m dig_service run targets.control_nodes:X --control-socket
PATH`` as a child with default signal dispositions (``_support.python_child``), talks
to it with the real ``python -m dig_service ps|stop`` commands (or raw sockets for the
hostile cases), and synchronises on its output lines, never on sleeps. Every child
is killed and reaped on every exit path (the ``spawn`` fixture).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _support import python_child

import dig_service

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="Unix sockets and POSIX signals (there are no Windows ones)"
)

TESTS_DIR = Path(__file__).resolve().parent
WAIT = 20.0
"""Upper bound for any single wait; a healthy run needs a fraction of it."""


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ.copy()
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Service:
    """A ``python -m dig_service run`` child whose output lines are collected live."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.popen = subprocess.Popen(
            python_child("-m", "dig_service", "run", *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=_child_env(env),
            cwd=TESTS_DIR,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._seen: list[str] = []
        self._open = 2
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.popen.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.popen.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: object, sink: list[str]) -> None:
        assert hasattr(stream, "readline")
        for line in iter(stream.readline, ""):
            with self._changed:
                sink.append(line.rstrip("\n"))
                self._seen.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._open -= 1
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(["--- stdout", *self.stdout, "--- stderr", *self.stderr])

    def wait_for(self, pattern: str, timeout: float = WAIT) -> str:
        """Block until an output line (any so far, or a new one) matches ``pattern``."""
        regex = re.compile(pattern)
        end = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self._seen:
                    if regex.search(line):
                        return line
                if self._open == 0:
                    raise AssertionError(
                        f"the service exited (rc={self.popen.wait()}) before a line matched "
                        f"{pattern!r}\n{self.output}"
                    )
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no line matching {pattern!r} in {timeout}s\n{self.output}"
                    )
                self._changed.wait(left)

    def finish(self, timeout: float = WAIT) -> int:
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the service did not exit in {timeout}s\n{self.output}") from None
        for reader in self._readers:
            reader.join(WAIT)
        return rc

    def close(self) -> None:
        """Kill the child if it is still alive, reap it, release its pipes."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        for reader in self._readers:
            reader.join(WAIT)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def spawn() -> Iterator[type[Service]]:
    """``spawn(*args)`` starts a service child; each one is killed and reaped at teardown."""
    started: list[Service] = []

    class Tracked(Service):
        def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
            super().__init__(*args, env=env)
            started.append(self)

    try:
        yield Tracked
    finally:
        for child in started:
            child.close()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for sockets (pytest's tmp_path can exceed 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="dsc", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def ctl(
    *args: str, prefix: tuple[str, ...] = (), python: str = sys.executable
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dig_service ARGS`` (``ps``/``stop``) to completion."""
    return subprocess.run(
        [*prefix, python, "-m", "dig_service", *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=_child_env(),
        cwd=TESTS_DIR,
    )


def start_with_socket(
    spawn: type[Service],
    sock_dir: Path,
    target: str,
    *extra: str,
    env: dict[str, str] | None = None,
) -> tuple[Service, str]:
    path = str(sock_dir / "c.sock")
    child = spawn(f"targets.control_nodes:{target}", "--control-socket", path, *extra, env=env)
    child.wait_for("control socket listening on")
    return child, path


# --------------------------------------------------------------------------- ps and stop


def test_ps_lists_the_python_and_native_tasks(spawn: type[Service], sock_dir: Path) -> None:
    """Proves: ``ps SOCKET`` prints a table with a header and one row per live task,
    Python and native, with its kind, origin, age and restarts; ``--json`` prints the
    same tasks as a JSON array of objects with exactly those keys; both exit 0.

    Catches: a ``ps`` that misses native tasks (what ``python -m asyncio ps`` cannot
    see), a table without the promised columns, JSON that is not an array."""
    child, path = start_with_socket(spawn, sock_dir, "Tasks")
    child.wait_for("^run started$")
    table = ctl("ps", path)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert re.match(r"NAME\s+KIND\s+ORIGIN\s+AGE\s+RESTARTS$", lines[0]), table.stdout
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"py-worker", "py-maintenance", "native-worker"}, table.stdout
    assert rows["py-worker"][1:3] == ["BackgroundLoop", "python"]
    assert rows["py-maintenance"][1:3] == ["Maintenance", "python"]
    assert rows["native-worker"][1:3] == ["PeerConnection", "native"]
    assert all(re.fullmatch(r"\d+\.\ds", row[3]) and row[4] == "0" for row in rows.values())

    as_json = ctl("ps", path, "--json")
    assert as_json.returncode == 0, as_json.stderr
    tasks = json.loads(as_json.stdout)
    assert isinstance(tasks, list) and len(tasks) == 3
    assert {t["name"]: (t["kind"], t["origin"]) for t in tasks} == {
        "py-worker": ("BackgroundLoop", "python"),
        "py-maintenance": ("Maintenance", "python"),
        "native-worker": ("PeerConnection", "native"),
    }
    assert all(set(t) == {"name", "kind", "origin", "age", "restarts"} for t in tasks)
    assert child.popen.poll() is None  # asking changed nothing


def test_stop_wait_stops_the_service_and_prints_the_outcome(
    spawn: type[Service], sock_dir: Path
) -> None:
    """Proves: ``stop SOCKET --wait`` exits 0 only after the service has stopped, printing
    its final status and the service's shutdown report; the service saw ``UserRequested``, exited 0, and removed its socket.

    Catches: a ``stop --wait`` that returns before the end or fails because the socket
    closed first (the race the one-request design avoids), a leftover socket file."""
    child, path = start_with_socket(spawn, sock_dir, "Tasks")
    child.wait_for("^run started$")
    stopped = ctl("stop", path, "--wait")
    assert stopped.returncode == 0, stopped.stderr
    lines = stopped.stdout.splitlines()
    assert lines[0] == (
        "service stopped: shutdown requested (user requested) (exit code 0)"
    ), stopped.stdout
    assert lines[1].startswith("shutdown report: reason UserRequested, "), stopped.stdout
    # The answer came after the service stopped, and it exits at once.
    assert "run saw ShutdownReason.UserRequested()" in child.stdout, child.output
    assert child.finish() == 0, child.output
    assert not os.path.exists(path)
    assert "Traceback" not in child.output


def test_stop_wait_gets_its_answer_even_when_the_exit_is_forced(
    spawn: type[Service], sock_dir: Path
) -> None:
    """Proves: a ``stop --wait`` pending while the operator forces the exit (SIGTERM
    twice during a shutdown stuck on a straggler) still gets its answer, saying the
    exit was forced and its code (143), and exits 0; the service exits 143 and removes
    its socket.

    Catches: a waiting client left with a closed connection and no word when the runner
    takes its fast exit path (the socket closed before the pending answer went out)."""
    path = str(sock_dir / "c.sock")
    child = spawn("targets.nodes:Stubborn", "--shutdown-deadline", "30", "--control-socket", path)
    child.wait_for("^run started$")
    waiting = subprocess.Popen(
        [sys.executable, "-m", "dig_service", "stop", path, "--wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_child_env(),
    )
    try:
        child.wait_for("shutdown started")
        # The shutdown came through the socket: the first SIGTERM is the operator's
        # first signal, the second one forces the exit.
        child.popen.send_signal(signal.SIGTERM)
        child.wait_for("SIGTERM received: already shutting down")
        child.popen.send_signal(signal.SIGTERM)
        assert child.finish() == 128 + signal.SIGTERM, child.output
        out, err = waiting.communicate(timeout=WAIT)
    finally:
        if waiting.poll() is None:
            waiting.kill()
        waiting.communicate()
    assert waiting.returncode == 0, err
    assert out.strip() == "service stopped: forced exit (143) while shutting down", out
    assert not os.path.exists(path)


def test_stop_without_wait_returns_once_accepted(spawn: type[Service], sock_dir: Path) -> None:
    """Proves: ``stop SOCKET`` exits 0 as soon as the shutdown is accepted and says so;
    the service then stops by itself and exits 0.

    Catches: a ``stop`` that blocks until the end, or that is accepted but ignored."""
    child, path = start_with_socket(spawn, sock_dir, "Tasks")
    child.wait_for("^run started$")
    stopped = ctl("stop", path)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == "shutdown requested (user requested)"
    assert child.finish() == 0, child.output
    assert "control socket: shutdown requested by pid" in child.output


def test_ps_and_stop_fail_with_one_line_when_the_service_cannot_be_asked(sock_dir: Path) -> None:
    """Proves: a missing socket, a path that is not a socket and a stale socket (nothing
    listening) each make ``ps`` and ``stop`` exit 1 with one line on stderr naming the
    path, and nothing on stdout.

    Catches: tracebacks, exit 0 on failure (a script would think the service stopped)."""
    regular = sock_dir / "file"
    regular.write_text("")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_dir / "stale.sock"))
    stale.close()
    cases = {
        str(sock_dir / "missing.sock"): "no control socket at",
        str(regular): "is not a socket",
        str(sock_dir / "stale.sock"): "nothing is listening",
    }
    for path, message in cases.items():
        for command in (["ps", path], ["stop", path, "--wait"]):
            proc = ctl(*command)
            assert proc.returncode == 1, (command, proc.stdout, proc.stderr)
            assert proc.stdout == ""
            lines = proc.stderr.splitlines()
            assert len(lines) == 1 and message in lines[0] and path in lines[0], proc.stderr
            assert lines[0].startswith(f"python -m dig_service {command[0]}: error: ")


# --------------------------------------------------------------------------- other uids


def _nobody_python() -> list[str] | None:
    """``setpriv`` to ``nobody`` plus a Python >= 3.11 that ``nobody`` can run, if any."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    for python in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.access(python, os.X_OK):
            continue
        probe = subprocess.run(
            [*prefix, python, "-c", "import sys; print(sys.version_info >= (3, 11))"],
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        if probe.stdout.strip() == "True":
            return [*prefix, python]
    return None


NOBODY = _nobody_python()


@pytest.mark.skipif(
    NOBODY is None,
    reason="needs root, setpriv and a system Python >= 3.11 that nobody can run; "
    "test_control.py::test_a_peer_of_another_uid_is_refused covers the server's check",
)
def test_another_uid_is_refused(spawn: type[Service], sock_dir: Path) -> None:
    """Proves: run as ``nobody`` (``setpriv``), ``ps`` and ``stop`` against a root
    service fail with exit 1 and one line: first because the socket is mode 0600
    (permission denied), then, with the socket made world-writable on purpose, because
    the service checks the peer's uid (``SO_PEERCRED``) and refuses it; the service
    logs the refusal, is not stopped, and still serves its own user.

    Catches: a control socket another user can use to stop or inspect the service,
    through loose file modes or a missing peer check."""
    assert NOBODY is not None
    os.chmod(sock_dir, 0o755)  # the directory is searchable: the socket's own mode decides
    child, path = start_with_socket(spawn, sock_dir, "Tasks")
    child.wait_for("^run started$")
    # Wherever the package is installed (a private venv, say), nobody can read this
    # copy of it (the abi3 native module included: the CLI imports it).
    package_root = sock_dir / "pkg"
    shutil.copytree(
        Path(dig_service.__file__).resolve().parent,
        package_root / "dig_service",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for copied in (package_root, *package_root.rglob("*")):
        copied.chmod(0o755 if copied.is_dir() else 0o644)
    as_nobody = [*NOBODY[:-1], "env", f"PYTHONPATH={package_root}", NOBODY[-1]]

    def run_as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*as_nobody, "-m", "dig_service", *args],
            capture_output=True,
            text=True,
            timeout=WAIT,
            cwd="/",
        )

    for command in (["ps", path], ["stop", path]):
        proc = run_as_nobody(*command)
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert "permission denied connecting to" in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1

    os.chmod(path, 0o666)  # past the file mode: the uid check must still refuse
    for command in (["ps", path], ["stop", path, "--wait"]):
        proc = run_as_nobody(*command)
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert "refused this client" in proc.stderr and "not uid 65534" in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1
    child.wait_for(r"control socket .*: refused pid \d+ of uid 65534")

    assert child.popen.poll() is None, child.output
    assert ctl("ps", path).returncode == 0
    assert ctl("stop", path, "--wait").returncode == 0
    assert child.finish() == 0, child.output


# --------------------------------------------------------------------------- stale and live sockets


def test_a_socket_held_by_a_live_service_is_exit_2(spawn: type[Service], sock_dir: Path) -> None:
    """Proves: a second service started on the socket of a running one exits 2 at once
    with a one-line error naming the path and the holder's pid, without running its
    node; the first one keeps serving.

    Catches: a second copy stealing the socket (the first becomes unreachable), or
    starting anyway without one."""
    first, path = start_with_socket(spawn, sock_dir, "Tasks")
    first.wait_for("^run started$")
    second = spawn("targets.control_nodes:Tasks", "--control-socket", path)
    assert second.finish() == 2, second.output
    assert second.stdout == []  # the node never ran
    errors = [line for line in second.stderr if line.strip()]
    assert len(errors) == 1, second.output
    assert errors[0].startswith("python -m dig_service run: error: control socket")
    assert f"in use by a live process (pid {first.popen.pid})" in errors[0]
    assert ctl("ps", path).returncode == 0
    assert first.popen.poll() is None


def test_a_stale_socket_left_by_a_killed_service_is_replaced(
    spawn: type[Service], sock_dir: Path
) -> None:
    """Proves: a service killed with SIGKILL leaves its socket file behind; the next
    service on that path replaces it (and says so), serves ``ps``, and removes it on exit.

    Catches: a service that cannot come back after a crash until someone deletes the
    file by hand (a restart loop under systemd)."""
    first, path = start_with_socket(spawn, sock_dir, "Tasks")
    first.wait_for("^run started$")
    first.popen.send_signal(signal.SIGKILL)
    assert first.finish() == -signal.SIGKILL
    assert os.path.exists(path)
    assert ctl("ps", path).returncode == 1
    second, _ = start_with_socket(spawn, sock_dir, "Tasks")
    second.wait_for("^run started$")
    assert any("replacing a stale socket" in line for line in second.stderr), second.output
    assert ctl("ps", path).returncode == 0
    assert ctl("stop", path, "--wait").returncode == 0
    assert second.finish() == 0
    assert not os.path.exists(path)


# --------------------------------------------------------------------------- hostile clients


def test_hostile_clients_do_not_delay_the_service(spawn: type[Service], sock_dir: Path) -> None:
    """Proves: while 1,000 clients connect at once and ask, one sends a 10 MB line and
    one floods requests without reading answers, the service's own 10 ms timers are
    never late by 0.5 s (typically 10-60 ms here), its loop-stall watchdog (0.5 s) never
    fires, every client gets an answer, an error line, end of stream or (the listen
    backlog full) a refused connect, and a well-behaved client is then served.

    Catches: handlers that block the loop, unbounded buffering, a server that stops
    accepting or serving after abuse."""
    # Production conditions: without development mode (inherited from the test run),
    # whose asyncio debug mode captures a stack for every future and would be the delay.
    child, path = start_with_socket(
        spawn, sock_dir, "Ticker", "--stall-warning", "0.5", env={"PYTHONDEVMODE": ""}
    )
    child.wait_for("^run started$")
    request = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tasks"}).encode() + b"\n"

    def storm() -> list[str]:
        """1,000 connections opened at once, then a request on each, then the answers."""
        socks = []
        outcomes = []
        try:
            for _ in range(1000):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(WAIT)
                try:
                    sock.connect(path)
                except BlockingIOError:  # the listen backlog is full: dropped by the kernel
                    sock.close()
                    outcomes.append("dropped")
                    continue
                socks.append(sock)
            for sock in socks:
                try:
                    sock.sendall(request)
                except ConnectionError:  # refused already (its error line is waiting)
                    pass
            for sock in socks:
                reader = sock.makefile("rb")
                try:
                    line = reader.readline()
                except ConnectionError:
                    line = b""
                finally:
                    reader.close()
                if not line:
                    outcomes.append("closed")
                    continue
                answer = json.loads(line)
                outcomes.append(
                    "answered" if "result" in answer else f"error {answer['error']['code']}"
                )
        finally:
            for sock in socks:
                sock.close()
        return outcomes

    def big_line(sock: socket.socket) -> str:
        try:
            sock.sendall(b"[" + b" " * (10 << 20) + b"]\n" + request)
            reader = sock.makefile("rb")
            first, second = json.loads(reader.readline()), json.loads(reader.readline())
            reader.close()
            return f"{first['error']['code']} then {'result' in second}"
        finally:
            sock.close()

    big_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    big_sock.settimeout(WAIT)
    big_sock.connect(path)  # before the storm takes every free slot
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hog.connect(path)
    hog.setblocking(False)
    flooded = 0
    try:
        while True:
            flooded += hog.send(request * 256)
    except BlockingIOError:
        pass
    with ThreadPoolExecutor(max_workers=2) as pool:
        big = pool.submit(big_line, big_sock)
        outcomes = storm()
        assert big.result(WAIT) == "-32001 then True"
    assert flooded > 0
    assert len(outcomes) == 1000
    assert "answered" in outcomes
    assert set(outcomes) <= {"answered", "error -32002", "closed", "dropped"}, set(outcomes)
    assert ctl("ps", path).returncode == 0
    hog.close()
    stopped = ctl("stop", path, "--wait")
    assert stopped.returncode == 0, stopped.stderr
    assert child.finish() == 0, child.output
    worst = float(child.wait_for(r"^worst lateness ").rpartition(" ")[2])
    assert worst < 0.5, child.output
    assert not any("has not turned" in line for line in child.stderr), child.output


# --------------------------------------------------------------------------- watchdog


def test_stall_warning_names_the_blocking_function_once_then_the_length(
    spawn: type[Service], sock_dir: Path
) -> None:
    """Proves: with ``--stall-warning 0.5``, a task that calls ``time.sleep(2)`` on the
    loop gives exactly one warning whose stack names the sleeping function and line,
    then exactly one "stall ended" line with a length between 0.5 and 2 s; the service
    then stops normally.

    Catches: no warning (the blocked loop goes unnoticed), a warning per check while it
    lasts, a stack of the wrong thread, no end line."""
    child, path = start_with_socket(spawn, sock_dir, "Stall", "--stall-warning", "0.5")
    ended = child.wait_for(r"stall ended after")
    child.wait_for("^unblocked$")
    assert ctl("stop", path, "--wait").returncode == 0
    assert child.finish() == 0, child.output
    warnings = [i for i, line in enumerate(child.stderr) if "has not turned" in line]
    assert len(warnings) == 1, child.output
    assert sum("stall ended" in line for line in child.stderr) == 1, child.output
    # The stack follows the warning's first line, up to the next log record.
    stack = []
    for line in child.stderr[warnings[0] + 1 :]:
        if re.match(r"\d{4}-\d\d-\d\d ", line):
            break
        stack.append(line)
    text = "\n".join(stack)
    assert "in blocking_sleeper\n    time.sleep(2)  # a blocking call" in text, child.output
    assert "in _stall_once" in text
    length = float(re.search(r"after ([\d.]+)s", ended)[1])  # type: ignore[index]
    assert 0.5 <= length <= 2.05, ended


def test_stall_warning_off_disables_the_watchdog(spawn: type[Service], sock_dir: Path) -> None:
    """Proves: ``--stall-warning off`` runs no watchdog: the same 2 s block gives no
    warning.

    Catches: an option that cannot turn the watchdog off."""
    child, path = start_with_socket(spawn, sock_dir, "Stall", "--stall-warning", "off")
    child.wait_for("^unblocked$")
    assert ctl("stop", path, "--wait").returncode == 0
    assert child.finish() == 0, child.output
    assert not any("dig_service.watchdog" in line for line in child.stderr), child.output


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="systemd's notify protocol is Linux-only"
)
def test_systemd_watchdog_pings_stop_while_the_loop_is_blocked(
    spawn: type[Service], sock_dir: Path
) -> None:
    """Proves: under systemd (``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` = 0.2 s, so a ping
    every 0.1 s), ``WATCHDOG=1`` is sent before and after a 1 s block of the event loop
    and never during it (the node marks the block's start and end on the same socket).

    Catches: pings sent by something that keeps running while the loop is stuck (a
    thread), which would stop systemd from restarting a hung service."""
    notify_path = str(sock_dir / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(notify_path)
    receiver.settimeout(WAIT)
    try:
        child = spawn(
            "targets.control_nodes:NotifyStall",
            env={"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "200000"},
        )
        received: list[str] = []
        while "X_BLOCK=end" not in received:
            received.append(receiver.recv(4096).decode())
        # A few more: pings resume once the loop turns again.
        while received[received.index("X_BLOCK=end") :].count("WATCHDOG=1") < 2:
            received.append(receiver.recv(4096).decode())
        child.popen.send_signal(signal.SIGTERM)
        assert child.finish() == 0, child.output
    finally:
        receiver.close()
    begin, end = received.index("X_BLOCK=begin"), received.index("X_BLOCK=end")
    assert "WATCHDOG=1" in received[:begin], received
    assert "WATCHDOG=1" not in received[begin:end], received
    assert "WATCHDOG=1" in received[end:], received


# --------------------------------------------------------------------------- metrics


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=WAIT) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_addr_serves_the_series_over_http(spawn: type[Service]) -> None:
    """Proves: ``run --metrics-addr 127.0.0.1:0`` logs the URL it serves; ``/metrics``
    fetched over HTTP from another process parses with prometheus-client's parser and
    carries every SPEC series for the running service: live Python and native tasks by
    kind and origin, spawned and failed totals by kind, restarts, and the loop lag (the
    runner's default watchdog is on); the process metrics of the default registry come
    along; after SIGTERM the service exits 0 and the port is closed.

    Catches: an option that is parsed but serves nothing, a server bound to another
    interface, series missing for native tasks, a server thread that keeps the process
    alive after the service stopped."""
    child = spawn("targets.control_nodes:Metrics", "--metrics-addr", "127.0.0.1:0")
    line = child.wait_for(r"metrics on http://127\.0\.0\.1:\d+/metrics")
    url = re.search(r"http://\S+/metrics", line)[0]  # type: ignore[index]
    child.wait_for("^run started$")
    samples = _scrape(url)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("dig_service_tasks_live", kind="BackgroundLoop", origin="python") == 1
    assert value("dig_service_tasks_live", kind="Maintenance", origin="python") == 1
    assert value("dig_service_tasks_live", kind="PeerConnection", origin="native") == 1
    assert value("dig_service_tasks_live", kind="RpcHandler", origin="native") == 0
    assert value("dig_service_tasks_spawned_total", kind="Maintenance") == 2
    assert value("dig_service_tasks_spawned_total", kind="PeerConnection") == 1
    assert value("dig_service_tasks_failed_total", kind="Maintenance") == 1
    assert value("dig_service_tasks_failed_total", kind="BackgroundLoop") == 0
    assert value("dig_service_task_restarts_total", kind="BackgroundLoop") == 0
    assert 0 <= value("dig_service_loop_lag_seconds") < 5.0
    assert ("process_cpu_seconds_total", ()) in samples  # the default registry's own
    child.popen.send_signal(signal.SIGTERM)
    assert child.finish() == 0, child.output
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=WAIT)


def test_metrics_addr_in_use_is_exit_2_before_anything_starts(spawn: type[Service]) -> None:
    """Proves: a ``--metrics-addr`` whose port is taken exits 2 with a one-line message
    naming the option and the address, and the service never started (no hook ran).

    Catches: a service that runs without the metrics it was asked to serve, a traceback,
    a bind error found after ``pre_start`` ran."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        child = spawn("targets.control_nodes:Metrics", "--metrics-addr", f"127.0.0.1:{port}")
        assert child.finish() == 2, child.output
    errors = [line for line in child.stderr if line.strip()]
    assert len(errors) == 1, child.output
    assert f"--metrics-addr 127.0.0.1:{port}: cannot listen there" in errors[0], child.output
    assert "run started" not in child.stdout
