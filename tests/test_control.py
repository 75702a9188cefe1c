"""The control socket in process (SPEC section 9, issue 16 points 1 and 2): how the
socket is created and removed, every method, and every hostile input, on asyncio and
uvloop. The real-process behaviour (``run --control-socket``, ``ps``, ``stop``, other
uids, exit codes) is in ``test_control_process.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from _support import loop_kinds, uvloop

from dig_service import (
    NodeLifecycle,
    RpcApi,
    RunContext,
    Service,
    ShutdownReason,
    StartContext,
    TaskKind,
)
from dig_service._control import (
    LINE_TOO_LONG,
    MAX_LINE,
    PEER_REFUSED,
    TOO_MANY_CONNECTIONS,
    ControlServer,
    ControlSocketError,
    bind_control_socket,
    final_outcome,
)
from dig_service._ctl import CtlError, _describe_outcome, call
from dig_service._runner import run
from dig_service.testing import spawn_native_sleeper

WAIT = 10.0
"""Upper bound for one answer; a healthy server needs milliseconds."""

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no Unix sockets on Windows")
HAVE_PEERCRED = hasattr(socket, "SO_PEERCRED")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short private directory (pytest's tmp_path can exceed a socket path's 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="dsc", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _until_shutdown(ctx: StartContext) -> None:
    await ctx.shutdown.cancelled()


class Busy(NodeLifecycle):
    """Spawns a Python task and a native task; ``running`` is set once ``run`` began."""

    NAME = "busy"

    def __init__(self) -> None:
        self.running = asyncio.Event()

    async def on_start(self, ctx: StartContext) -> None:
        ctx.tasks.spawn("py-worker", TaskKind.BackgroundLoop, _until_shutdown(ctx))
        spawn_native_sleeper(ctx.tasks, "native-worker", 3600.0, kind=TaskKind.PeerConnection)

    async def run(self, ctx: RunContext) -> None:
        self.running.set()
        await ctx.shutdown.cancelled()


@contextlib.asynccontextmanager
async def serving(
    sock_dir: Path, rpc_api: Any = None, **limits: Any
) -> AsyncIterator[tuple[ControlServer, Service[Any, Any, Any]]]:
    """A running ``Busy`` service with its control server; both stopped afterwards."""
    node = Busy()
    service: Service[Any, Any, Any] = Service(node, rpc_api=rpc_api)
    starting = asyncio.ensure_future(service.start())
    await asyncio.wait_for(node.running.wait(), WAIT)
    bound = bind_control_socket(str(sock_dir / "c.sock"))
    server = ControlServer(bound, service, label="busy", **limits)
    await server.start()
    try:
        yield server, service
    finally:
        service.request_shutdown(ShutdownReason.UserRequested())
        await asyncio.wait_for(starting, WAIT)
        server.finish(await final_outcome(service, 0, False))
        await server.close()
        bound.remove()


class Client:
    """One connection to the control socket, one JSON line each way."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: Path) -> Client:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 24)
        return cls(reader, writer)

    async def send(self, message: object) -> None:
        raw = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        self.writer.write(raw)
        await self.writer.drain()

    async def recv(self) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), WAIT)
        assert line.endswith(b"\n"), f"connection closed instead of an answer: {line!r}"
        answer = json.loads(line)
        assert isinstance(answer, dict)
        return answer

    async def ask(self, method: str, params: object = None, request_id: object = 1) -> Any:
        request: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            request["params"] = params
        await self.send(request)
        answer = await self.recv()
        assert answer.get("id") == request_id, answer
        assert "result" in answer, answer
        return answer["result"]

    async def at_eof(self) -> bool:
        """Whether the server closed the connection (end of stream, or a reset: a server
        that closes with our request unread resets it)."""
        try:
            return await asyncio.wait_for(self.reader.read(), WAIT) == b""
        except ConnectionResetError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def _code(answer: dict[str, Any]) -> int:
    assert "error" in answer, answer
    code = answer["error"]["code"]
    assert isinstance(code, int)
    return code


# --------------------------------------------------------------------------- the socket file


def test_socket_is_0600_before_it_appears_whatever_the_umask(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves: with umask 0 (the loosest), the socket is already mode 0600, in a 0700
    directory of its own, at the instant it is linked into place; the final socket is
    0600 and no staging directory is left behind.

    Catches: bind-then-chmod at the final path (a window in which anyone could connect),
    a mode that follows the umask, a leaked staging directory."""
    seen: list[tuple[int, int]] = []
    real_link = os.link

    def checking_link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        seen.append(
            (
                stat.S_IMODE(os.stat(src).st_mode),
                stat.S_IMODE(os.stat(os.path.dirname(src)).st_mode),
            )
        )
        real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", checking_link)
    old_umask = os.umask(0)
    try:
        bound = bind_control_socket(str(sock_dir / "c.sock"))
    finally:
        os.umask(old_umask)
    try:
        assert seen == [(0o600, 0o700)]
        st = os.stat(sock_dir / "c.sock")
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert os.listdir(sock_dir) == ["c.sock"]
    finally:
        bound.remove()
    assert os.listdir(sock_dir) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_a_long_path_is_bound_through_proc_when_the_staging_path_is_too_long(
    sock_dir: Path,
) -> None:
    """Proves: a socket path that fits the 107-byte limit works even when the staging
    path (one directory deeper) would not; a path over the limit is a one-line error.

    Catches: valid paths refused because of the private staging directory."""
    deep = sock_dir / ("d" * (100 - len(str(sock_dir)) - 8))
    deep.mkdir()
    path = str(deep / "c.sock")
    assert 95 <= len(path) <= 107, len(path)
    bound = bind_control_socket(path)
    try:
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(path)
        probe.close()
    finally:
        bound.remove()
    with pytest.raises(ControlSocketError, match="at most 107"):
        bind_control_socket(str(deep / ("x" * 20)))


def test_a_stale_socket_is_replaced(sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Proves: a socket file nobody listens on (its process died) is replaced, and the
    replacement is said in the log.

    Catches: a service that cannot restart after a crash until someone deletes the file."""
    path = sock_dir / "c.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()
    caplog.set_level(logging.INFO, logger="dig_service.control")
    bound = bind_control_socket(str(path))
    try:
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(str(path))
        probe.close()
    finally:
        bound.remove()
    assert any("stale" in r.getMessage() for r in caplog.records)


def test_a_live_socket_is_an_error_and_is_left_alone(sock_dir: Path) -> None:
    """Proves: binding where a live process listens fails with a message naming the path
    and the holder's pid, and the live socket keeps working.

    Catches: a second copy of a service silently stealing the first one's socket."""
    path = sock_dir / "c.sock"
    first = bind_control_socket(str(path))
    try:
        with pytest.raises(
            ControlSocketError, match=rf"in use by a live process \(pid {os.getpid()}\)"
        ):
            bind_control_socket(str(path))
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(str(path))
        probe.close()
        assert os.listdir(sock_dir) == ["c.sock"]
    finally:
        first.remove()


def test_not_a_socket_and_a_missing_directory_are_errors(sock_dir: Path) -> None:
    """Proves: a regular file at the path is neither replaced nor touched, and a missing
    directory is named; both are ``ControlSocketError`` (exit 2 in the runner).

    Catches: an operator's file deleted by a typo in --control-socket."""
    regular = sock_dir / "notes.txt"
    regular.write_text("keep me")
    with pytest.raises(ControlSocketError, match="not a socket"):
        bind_control_socket(str(regular))
    assert regular.read_text() == "keep me"
    with pytest.raises(ControlSocketError, match="does not exist"):
        bind_control_socket(str(sock_dir / "missing" / "c.sock"))


def test_remove_leaves_a_socket_another_process_put_there(sock_dir: Path) -> None:
    """Proves: ``remove()`` unlinks the path only if it is still the file this process
    created.

    Catches: a service that exits after its socket was replaced deleting the new one."""
    path = sock_dir / "c.sock"
    bound = bind_control_socket(str(path))
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))
    try:
        bound.remove()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        other.close()


# --------------------------------------------------------------------------- methods


@pytest.mark.asyncio
async def test_tasks_lists_python_and_native_tasks(sock_dir: Path) -> None:
    """Proves: ``tasks`` returns every live task, Python and native, with its kind's
    variant name, origin, a non-negative age and ``restarts`` (0: no supervision yet).

    Catches: a snapshot missing the native side (what ``python -m asyncio ps`` misses),
    kinds printed as reprs, a missing key that breaks ``ps``."""
    async with serving(sock_dir) as _:
        client = await Client.connect(sock_dir / "c.sock")
        tasks = await client.ask("tasks")
        await client.close()
    by_name = {t["name"]: t for t in tasks}
    assert set(by_name) == {"py-worker", "native-worker"}
    assert by_name["py-worker"]["kind"] == "BackgroundLoop"
    assert by_name["py-worker"]["origin"] == "python"
    assert by_name["native-worker"]["kind"] == "PeerConnection"
    assert by_name["native-worker"]["origin"] == "native"
    for t in tasks:
        assert set(t) == {"name", "kind", "origin", "age", "restarts"}
        assert t["age"] >= 0 and t["restarts"] == 0


@pytest.mark.asyncio
async def test_stats_health_and_report(sock_dir: Path) -> None:
    """Proves: ``stats`` carries the registry's counters, ``health`` says healthz passed,
    the phase, uptime and that it is not stopping, and ``report`` is null while running.

    Catches: methods that answer with the wrong shape or read the wrong service."""
    async with serving(sock_dir) as (_server, service):
        client = await Client.connect(sock_dir / "c.sock")
        stats = await client.ask("stats")
        health = await client.ask("health")
        report = await client.ask("report", {})
        await client.close()
        assert stats["live"] == len(service.tasks) == 2
    assert stats["spawned"] == 2 and stats["failed"] == 0 and stats["restarted"] == 0
    assert set(stats) == {
        "spawned", "completed", "failed", "cancelled", "aborted", "live", "restarted"
    }  # fmt: skip
    assert health["ok"] is True and health["error"] is None
    assert health["phase"] == "run" and health["stopping"] is False and health["reason"] is None
    assert health["uptime"] >= 0 and health["pid"] == os.getpid() and health["service"] == "busy"
    assert report is None


class SickRpc(RpcApi):
    def __init__(self, mode: str) -> None:
        self.mode = mode

    async def healthz(self) -> None:
        if self.mode == "raise":
            raise RuntimeError("database unreachable")
        while True:  # swallows its cancellation: the answer must not wait for it
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if self.mode == "hang":
                    return
                continue


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["raise", "hang"])
async def test_health_reports_a_failing_or_hanging_healthz(sock_dir: Path, mode: str) -> None:
    """Proves: a ``healthz()`` that raises gives ``ok: false`` with the error; one that
    does not answer within the limit gives ``ok: false`` after the limit, and the
    connection stays usable.

    Catches: a health check that hangs the control connection forever, or reports ok
    for a failing healthz."""
    async with serving(sock_dir, rpc_api=SickRpc(mode), healthz_timeout=0.2) as _:
        client = await Client.connect(sock_dir / "c.sock")
        health = await client.ask("health")
        assert health["ok"] is False
        if mode == "raise":
            assert "database unreachable" in health["error"]
        else:
            assert "did not answer within 0.2s" in health["error"]
        assert (await client.ask("stats"))["live"] == 2
        await client.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (None, ShutdownReason.UserRequested()),
        ({"reason": "user"}, ShutdownReason.UserRequested()),
        ({"reason": "rpc"}, ShutdownReason.RpcRequested()),
    ],
    ids=["default", "user", "rpc"],
)
async def test_shutdown_requests_the_reason_asked_for(
    sock_dir: Path, params: Any, expected: ShutdownReason
) -> None:
    """Proves: ``shutdown`` fires the token with ``UserRequested`` by default and
    ``RpcRequested`` for ``{"reason": "rpc"}``, and answers at once when not waiting.

    Catches: a shutdown that is accepted but never requested, or with the wrong reason."""
    async with serving(sock_dir) as (_server, service):
        client = await Client.connect(sock_dir / "c.sock")
        result = await client.ask("shutdown", params)
        await client.close()
        assert result["accepted"] is True
        assert service.shutdown_token.reason() == expected
        assert result["reason"] == str(expected)


@pytest.mark.asyncio
async def test_shutdown_as_a_notification_gets_no_answer_but_happens(sock_dir: Path) -> None:
    """Proves: a request without ``id`` (a JSON-RPC notification) is executed and not
    answered; the next request on the connection is answered normally.

    Catches: notifications answered (clients reading a stray line as the next answer)."""
    async with serving(sock_dir) as (_server, service):
        client = await Client.connect(sock_dir / "c.sock")
        await client.send({"jsonrpc": "2.0", "method": "shutdown"})
        assert (await client.ask("stats", request_id="after"))["live"] >= 0
        assert service.shutdown_token.reason() == ShutdownReason.UserRequested()
        await client.close()


@pytest.mark.asyncio
async def test_shutdown_with_wait_answers_once_stopped_before_the_socket_closes(
    sock_dir: Path,
) -> None:
    """Proves: ``shutdown`` with ``wait`` answers only after the service has stopped,
    with its exit code and status, and ``close()`` sends that answer before it closes
    the socket; the ``report`` method returns what the outcome carries.

    Catches: the ``stop --wait`` race (socket closed before the answer went out), an
    answer sent when the shutdown merely began."""
    node = Busy()
    service: Service[Any, Any, Any] = Service(node)
    starting = asyncio.ensure_future(service.start())
    await asyncio.wait_for(node.running.wait(), WAIT)
    bound = bind_control_socket(str(sock_dir / "c.sock"))
    server = ControlServer(bound, service, label="busy")
    await server.start()
    try:
        waiting = await Client.connect(sock_dir / "c.sock")
        await waiting.send(
            {"jsonrpc": "2.0", "id": 7, "method": "shutdown", "params": {"wait": True}}
        )
        answer_task = asyncio.ensure_future(waiting.recv())
        status = await asyncio.wait_for(starting, WAIT)
        assert not answer_task.done(), "answered before the service had stopped"
        outcome = await final_outcome(service, status.exit_code, False)
        outcome["report"] = {"reason": "user requested", "phases": []}  # as issue 14 will
        server.finish(outcome)
        other = await Client.connect(sock_dir / "c.sock")
        assert await other.ask("report") == outcome["report"]
        await other.close()
        await server.close()
        answer = await asyncio.wait_for(answer_task, WAIT)
        assert await waiting.at_eof()
        await waiting.close()
    finally:
        server.abort()
        bound.remove()
    assert answer["id"] == 7
    result = answer["result"]
    assert result["accepted"] is True and result["exit_code"] == 0 and result["forced"] is False
    assert result["status"] == str(status)
    assert result["report"] == {"reason": "user requested", "phases": []}


# --------------------------------------------------------------------------- hostile input


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json\n", -32700),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tasks"} trailing\n', -32700),
        (b"\xff\xfe\xfa garbage\n", -32700),
        (b"[" * 30000 + b"]" * 30000 + b"\n", -32700),
        (
            b'{"jsonrpc": "2.0", "id": 1, "method": "tasks", "params": 1' + b"0" * 5000 + b"}\n",
            -32700,
        ),
        (b"[]\n", -32600),
        (b'[{"jsonrpc": "2.0", "id": 1, "method": "tasks"}]\n', -32600),
        (b'"tasks"\n', -32600),
        (b'{"id": 1, "method": "tasks"}\n', -32600),
        (b'{"jsonrpc": "1.0", "id": 1, "method": "tasks"}\n', -32600),
        (b'{"jsonrpc": "2.0", "id": [1], "method": "tasks"}\n', -32600),
        (b'{"jsonrpc": "2.0", "id": true, "method": "tasks"}\n', -32600),
        (b'{"jsonrpc": "2.0", "id": 1e999, "method": "tasks"}\n', -32600),
        (b'{"jsonrpc": "2.0", "id": 1, "method": 5}\n', -32600),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "nope"}\n', -32601),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "__init__"}\n', -32601),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tasks", "params": {"x": 1}}\n', -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "stats", "params": [1]}\n', -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tasks", "params": "x"}\n', -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "shutdown", "params": {"reason": "x"}}\n', -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "shutdown", "params": {"wait": 1}}\n', -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "shutdown", "params": {"now": true}}\n', -32602),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "shutdown", "params": ["rpc"]}\n', -32602),
    ],
)
async def test_bad_requests_get_their_error_and_the_connection_stays_usable(
    sock_dir: Path, line: bytes, code: int
) -> None:
    """Proves: malformed JSON (including invalid UTF-8, nesting deep enough to hit the
    recursion limit and a 5000-digit number), invalid requests (batches, non-objects, a
    wrong ``jsonrpc``, ``id`` or ``method``), unknown methods and wrong params each get
    their JSON-RPC error code; the same connection then answers a good request, and a
    bad ``shutdown`` shuts nothing down.

    Catches: a connection (or the server) killed by one bad line, an exception leaking
    to the loop's exception handler (the loop_errors fixture), a shutdown triggered by
    a malformed request."""
    async with serving(sock_dir) as (_server, service):
        client = await Client.connect(sock_dir / "c.sock")
        await client.send(line)
        assert _code(await client.recv()) == code
        assert len(await client.ask("tasks", request_id="next")) == 2
        assert not service.shutdown_token.is_cancelled()
        await client.close()


@pytest.mark.asyncio
async def test_a_10_mb_line_gets_one_error_then_the_connection_resyncs(sock_dir: Path) -> None:
    """Proves: a 10 MB line gets exactly one "line too long" error, the rest of it is
    skipped up to its newline without being buffered, and the next request on the same
    connection is answered; the server's memory stays bounded by the line limit.

    Catches: unbounded buffering of a line (memory exhaustion), one error per 64 KiB
    chunk, a connection left unusable after an oversized line."""
    async with serving(sock_dir) as (_server, _service):
        client = await Client.connect(sock_dir / "c.sock")
        chunk = b"x" * (1 << 20)
        writing = asyncio.ensure_future(client.send(b'{"junk": "' + chunk * 10 + b'"}\n'))
        first = await client.recv()
        await asyncio.wait_for(writing, WAIT)
        assert _code(first) == LINE_TOO_LONG
        assert str(MAX_LINE) in first["error"]["message"]
        assert len(await client.ask("tasks", request_id=2)) == 2  # the next line, not an error
        await client.close()


@pytest.mark.asyncio
async def test_a_line_at_the_limit_is_accepted(sock_dir: Path) -> None:
    """Proves: a request of exactly 64 KiB (padded with spaces) is parsed and answered.

    Catches: an off-by-one limit that rejects legal requests."""
    async with serving(sock_dir) as (_server, _service):
        client = await Client.connect(sock_dir / "c.sock")
        request = json.dumps({"jsonrpc": "2.0", "id": 3, "method": "stats"}).encode()
        await client.send(request + b" " * (MAX_LINE - len(request)) + b"\n")
        assert (await client.recv())["result"]["live"] == 2
        await client.close()


@pytest.mark.asyncio
async def test_a_client_that_never_reads_is_dropped_and_others_are_served(
    sock_dir: Path,
) -> None:
    """Proves: a client that sends requests without reading the answers is dropped once
    its answers stop draining (here after 0.3 s), while another client is answered in
    the meantime.

    Catches: unbounded write buffers, a server coroutine stuck forever on one client, a
    slow client that delays everyone else."""
    async with serving(sock_dir, drain_timeout=0.3) as (server, _service):
        hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.connect(str(sock_dir / "c.sock"))
        hog.setblocking(False)
        request = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tasks"}).encode() + b"\n"
        sent = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        # Write until the server stops reading (its answers are not drained by us).
        while loop.time() < deadline:
            try:
                sent += hog.send(request * 64)
            except BlockingIOError:
                break
            except OSError:  # already dropped
                break
            await asyncio.sleep(0)
        assert sent > 0
        other = await Client.connect(sock_dir / "c.sock")
        assert len(await other.ask("tasks")) == 2
        await other.close()
        # The hog is dropped: its connection gets reset/closed.
        end = loop.time() + WAIT
        while server.connections and loop.time() < end:  # noqa: ASYNC110 - no event to await
            await asyncio.sleep(0.02)
        assert server.connections == 0, "the non-reading client was not dropped"
        hog.close()


@pytest.mark.asyncio
async def test_connections_over_the_cap_get_an_error_line_and_are_closed(sock_dir: Path) -> None:
    """Proves: with the cap at 2, a third client gets a "too many connections" error
    line and end of stream, the two others keep working, and once one leaves a new
    client is served.

    Catches: an unbounded number of connections (fds, coroutines), extra clients left
    hanging without a word."""
    async with serving(sock_dir, max_connections=2) as (_server, _service):
        a = await Client.connect(sock_dir / "c.sock")
        b = await Client.connect(sock_dir / "c.sock")
        assert len(await a.ask("tasks")) == 2 and len(await b.ask("tasks")) == 2
        c = await Client.connect(sock_dir / "c.sock")
        assert _code(await c.recv()) == TOO_MANY_CONNECTIONS
        assert await c.at_eof()
        await c.close()
        await a.close()
        d = await Client.connect(sock_dir / "c.sock")
        # `a` may still be counted for a moment after its close reached the server.
        for _ in range(100):
            await d.send({"jsonrpc": "2.0", "id": 1, "method": "stats"})
            answer = json.loads(await asyncio.wait_for(d.reader.readline(), WAIT) or b"{}")
            if "result" in answer:
                break
            await d.close()
            await asyncio.sleep(0.02)
            d = await Client.connect(sock_dir / "c.sock")
        assert "result" in answer, answer
        assert len(await b.ask("tasks")) == 2
        await b.close()
        await d.close()


@pytest.mark.asyncio
async def test_a_thousand_clients_at_once(sock_dir: Path) -> None:
    """Proves: 1,000 clients connecting and asking at once each get an answer, a "too
    many connections" error, end of stream or a refused connection (the listen backlog
    is full), never a hang, and afterwards a new client is served normally.

    Catches: a server that stops accepting, hangs, or crashes under a connection storm.
    (The real-process version checks that the service's own timers were not delayed.)"""
    async with serving(sock_dir) as (server, _service):

        async def one() -> str:
            try:
                client = await Client.connect(sock_dir / "c.sock")
            except OSError:
                return "refused"
            try:
                await client.send({"jsonrpc": "2.0", "id": 1, "method": "stats"})
                line = await asyncio.wait_for(client.reader.readline(), WAIT)
                if not line:
                    return "closed"
                answer = json.loads(line)
                if "result" in answer:
                    return "answered"
                assert answer["error"]["code"] == TOO_MANY_CONNECTIONS, answer
                return "too many"
            except ConnectionError:
                return "closed"
            except OSError:  # asyncio's connect to a full backlog (EAGAIN) only seems to succeed
                return "refused"
            finally:
                with contextlib.suppress(OSError):
                    await client.close()

        outcomes = await asyncio.gather(*(one() for _ in range(1000)))
        assert len(outcomes) == 1000
        assert "answered" in outcomes
        assert set(outcomes) <= {"answered", "too many", "closed", "refused"}
        client = await Client.connect(sock_dir / "c.sock")
        assert len(await client.ask("tasks")) == 2
        await client.close()
        assert server.connections <= 1


@pytest.mark.asyncio
async def test_an_idle_connection_is_closed(sock_dir: Path) -> None:
    """Proves: a connection that sends no complete request within the idle timeout is
    closed (here 0.2 s), half a line included.

    Catches: connections that hold a slot of the cap forever by saying nothing."""
    async with serving(sock_dir, idle_timeout=0.2) as (server, _service):
        client = await Client.connect(sock_dir / "c.sock")
        await client.send(b'{"jsonrpc": "2.0", "id"')
        assert await client.at_eof()
        await client.close()
        assert server.connections == 0


@pytest.mark.asyncio
@pytest.mark.skipif(not HAVE_PEERCRED, reason="SO_PEERCRED is Linux's")
async def test_a_peer_of_another_uid_is_refused(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Proves: the server reads the peer's credentials (``SO_PEERCRED``) of a real
    connection and refuses a uid other than the one it serves: one -32003 error line,
    end of stream, a warning naming the pid and uid; the blocking client reports the
    refusal. (Here the served uid is set to another one; ``test_control_process`` runs a
    real client as ``nobody``.)

    Catches: a control socket that serves anyone who can reach it (root of another
    service, a container sharing the directory)."""
    caplog.set_level(logging.WARNING, logger="dig_service.control")
    async with serving(sock_dir, allowed_uid=os.geteuid() + 4242) as (server, service):
        client = await Client.connect(sock_dir / "c.sock")
        await client.send({"jsonrpc": "2.0", "id": 1, "method": "shutdown"})
        answer = await client.recv()
        assert _code(answer) == PEER_REFUSED
        assert f"not uid {os.geteuid()}" in answer["error"]["message"]
        assert await client.at_eof()
        await client.close()
        with pytest.raises(CtlError, match="refused this client"):
            await asyncio.to_thread(call, str(sock_dir / "c.sock"), "tasks")
        assert not service.shutdown_token.is_cancelled()
        assert server.connections == 0
    assert any(
        f"refused pid {os.getpid()} of uid {os.geteuid()}" in r.getMessage() for r in caplog.records
    )


# --------------------------------------------------------------------------- the client


def test_client_errors_are_one_line_and_say_what_to_do(sock_dir: Path) -> None:
    """Proves: the client's errors for a missing path, a path that is not a socket and a
    stale socket (nothing listening) each name the path and the cause.

    Catches: tracebacks (ConnectionRefusedError...) instead of messages an operator can
    act on."""
    with pytest.raises(CtlError, match=r"no control socket at .*--control-socket"):
        call(str(sock_dir / "missing.sock"), "tasks")
    regular = sock_dir / "file"
    regular.write_text("")
    with pytest.raises(CtlError, match="is not a socket"):
        call(str(regular), "tasks")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_dir / "stale.sock"))
    stale.close()
    with pytest.raises(CtlError, match=r"nothing is listening .* stale"):
        call(str(sock_dir / "stale.sock"), "tasks")


# --------------------------------------------------------------------------- through run()


class Flagged(NodeLifecycle):
    """Sets a thread-safe flag once ``run`` began (a client thread waits for it)."""

    NAME = "flagged"

    def __init__(self) -> None:
        self.running = threading.Event()
        self.started = False

    async def on_start(self, ctx: StartContext) -> None:
        self.started = True
        spawn_native_sleeper(ctx.tasks, "native-worker", 3600.0)

    async def run(self, ctx: RunContext) -> None:
        self.running.set()
        await ctx.shutdown.cancelled()


@pytest.mark.parametrize("loop_kind", loop_kinds("asyncio", "uvloop"))
def test_run_serves_the_control_socket_until_the_end(sock_dir: Path, loop_kind: str) -> None:
    """Proves: ``run(service, control_socket=PATH)`` serves the socket while the service
    runs (a client thread lists its native task, then stops it with ``wait``), returns
    the exit code, and leaves no socket behind.

    Catches: a ``run`` that ignores ``control_socket``, or leaves the file on exit."""
    path = str(sock_dir / "c.sock")
    node = Flagged()
    seen: dict[str, Any] = {}

    def client() -> None:
        if not node.running.wait(WAIT):
            return
        seen["tasks"] = call(path, "tasks")
        seen["stop"] = call(path, "shutdown", {"wait": True}, timeout=WAIT)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        code = run(
            Service(node),
            install_signal_handlers=False,
            loop_factory=uvloop.new_event_loop if loop_kind == "uvloop" else None,
            control_socket=Path(path),
        )
    finally:
        node.running.set()
        thread.join(WAIT)
    assert code == 0
    assert [t["name"] for t in seen["tasks"]] == ["native-worker"]
    assert seen["stop"]["exit_code"] == 0 and seen["stop"]["forced"] is False
    assert not os.path.exists(path)


def test_run_refuses_a_live_socket_with_exit_2_before_starting(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Proves: ``run`` with a control socket held by a live process returns 2, logs one
    error line naming the path, and runs no hook; bad ``control_socket`` values are a
    ``TypeError``/``ValueError`` naming the parameter, before anything starts.

    Catches: a service started without its control socket, an unnamed bad argument."""
    path = str(sock_dir / "c.sock")
    holder = bind_control_socket(path)
    try:
        node = Flagged()
        caplog.set_level(logging.ERROR, logger="dig_service.run")
        assert run(Service(node), install_signal_handlers=False, control_socket=path) == 2
        assert not node.started
        errors = [r.getMessage() for r in caplog.records if r.name == "dig_service.run"]
        assert len(errors) == 1 and "in use by a live process" in errors[0] and path in errors[0]
    finally:
        holder.remove()
    with pytest.raises(TypeError, match="`control_socket`"):
        run(Service(Flagged()), install_signal_handlers=False, control_socket=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`control_socket`"):
        run(Service(Flagged()), install_signal_handlers=False, control_socket=b"/tmp/x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`control_socket`"):
        run(Service(Flagged()), install_signal_handlers=False, control_socket="")


def test_stop_wait_prints_the_shutdown_report() -> None:
    """Proves: what ``stop --wait`` prints for an answer that carries a shutdown report
    (``ShutdownReport.to_dict()`` as issue 14 builds it: the reason as
    ``{"kind", "message"}``): the status line, then the reason, total
    and live tasks, one line per phase with its outcome and duration, and each straggler
    with its kind, origin, age and (Python) stack; an answer without a report prints the
    status line alone.

    Catches: a report dropped on the floor by the client, a straggler's stack lost, a
    crash on a native straggler (``stack`` null)."""
    report = {
        "reason": {"kind": "UserRequested", "message": None},
        "total": 2.5,
        "tasks_at_start": 3,
        "phases": [
            {"name": "run", "duration": 0.001, "outcome": "ok"},
            {"name": "join", "duration": 2.0, "outcome": "timed_out"},
            {"name": "on_stop", "duration": 0.25, "outcome": "ok"},
            {"name": "post_stop", "duration": 0.0, "outcome": "skipped"},
        ],
        "stragglers": [
            {
                "name": "slow-py",
                "kind": "BackgroundLoop",
                "origin": "python",
                "age": 12.0,
                "stack": 'File "node.py", line 9, in slow\n    await asyncio.sleep(60)\n',
            },
            {
                "name": "slow-rs",
                "kind": "Maintenance",
                "origin": "native",
                "age": 3.5,
                "stack": None,
            },
        ],
    }
    text = _describe_outcome({"status": "ShutdownDeadlineExceeded: ...", "report": report})
    lines = text.splitlines()
    assert lines[0] == "service stopped: ShutdownDeadlineExceeded: ..."
    assert lines[1] == (
        "shutdown report: reason UserRequested, 2.500s in total, 3 task(s) live when it began"
    )
    assert lines[2:6] == [
        "  run: ok (0.001s)",
        "  join: timed_out (2.000s)",
        "  on_stop: ok (0.250s)",
        "  post_stop: skipped (0.000s)",
    ]
    assert lines[6] == "  stragglers (2):"
    assert lines[7].startswith("    - slow-py (BackgroundLoop, python, age ")
    assert lines[8:10] == [
        '        File "node.py", line 9, in slow',
        "            await asyncio.sleep(60)",
    ]
    assert lines[10].startswith("    - slow-rs (Maintenance, native, age ")
    assert len(lines) == 11
    assert _describe_outcome({"status": "stopped", "report": None}) == "service stopped: stopped"
    fatal = {**report, "reason": {"kind": "Fatal", "message": "disk full"}, "stragglers": []}
    assert (
        _describe_outcome({"status": "x", "report": fatal})
        .splitlines()[1]
        .startswith("shutdown report: reason Fatal (disk full), ")
    )
