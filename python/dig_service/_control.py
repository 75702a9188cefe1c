"""The control socket: ask a running service what it is doing, or stop it, from a shell.

``dig_service.run(service, control_socket=PATH)`` (``python -m dig_service
run --control-socket PATH``) serves a Unix stream socket at ``PATH``
speaking JSON-RPC 2.0, one JSON object a line each way (SPEC section 9).

Methods (every ``params`` is optional):

- ``tasks``: the live tasks, oldest first: ``[{"name", "kind", "origin",
  "age", "restarts"}]`` (``kind`` is the ``TaskKind`` variant's name, ``age``
  seconds).
- ``stats``: the registry's counters (``spawned``, ``completed``, ``failed``,
  ``cancelled``, ``aborted``, ``live``, ``restarted``).
- ``health``: ``{"ok", "error", "phase", "uptime", "stopping", "reason",
  "service", "pid"}``; ``ok`` is whether ``RpcApi.healthz()`` succeeded
  (within 5 s).
- ``report``: the shutdown report once the service has stopped
  (``ShutdownReport.to_dict()``), else ``null``.
- ``shutdown``: ``{"reason": "user"}`` (the default, ``UserRequested``) or
  ``{"reason": "rpc"}`` (``RpcRequested``); with ``{"wait": true}`` the
  answer comes once the service has stopped and carries ``exit_code``,
  ``status`` and ``report``. The runner sends such answers before it
  closes the socket, so a waiting client never races the socket's removal.

Safety (a hostile or broken client is part of the contract):

- The socket is created with mode 0600 from the first instant (bound in a
  private 0700 directory, chmod-ed, then hard-linked into place, which also
  never replaces a path that appeared meanwhile), and every connection's
  peer must have this process's effective uid (``SO_PEERCRED``); another
  uid gets one error line and is closed.
- Lines are at most 64 KiB: a longer one gets one error and is skipped up
  to its newline (the connection stays usable); nothing is buffered beyond
  that. Malformed JSON, invalid requests, unknown methods and wrong params
  each get their JSON-RPC error.
- At most 64 connections are served at once; more get an error line and
  are closed. A connection that sends nothing for 60 s is closed; one that
  does not read its answers is dropped once its write buffer has not
  drained for 10 s (requests are read only after the previous answer was
  written, so the buffer stays bounded).
- Every handler is a coroutine on the service's loop that never blocks it;
  a large ``tasks`` answer is built in batches that yield to the loop.

Error codes: the JSON-RPC ones (-32700 parse error, -32600 invalid request,
-32601 method not found, -32602 invalid params, -32603 internal error) and
-32001 line too long, -32002 too many connections, -32003 peer refused
(another uid).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import math
import os
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from ._core import ShutdownReason
from ._errors import ServiceError
from ._exit import ExitStatus
from ._report import ShutdownReport

if TYPE_CHECKING:
    from ._service import Service

__all__ = [
    "BoundSocket",
    "ControlServer",
    "ControlSocketError",
    "bind_control_socket",
    "final_outcome",
    "kind_name",
    "shutdown_report",
]

logger: Final = logging.getLogger("dig_service.control")

MAX_LINE: Final = 64 * 1024
"""Longest request line, in bytes (without its newline)."""
MAX_CONNECTIONS: Final = 64
"""Connections served at once; more are answered with an error and closed."""
IDLE_TIMEOUT: Final = 60.0
"""Seconds a connection may stay silent (no complete request) before it is closed."""
DRAIN_TIMEOUT: Final = 10.0
"""Seconds an answer may sit unread in the write buffer before the connection is dropped."""
HEALTHZ_TIMEOUT: Final = 5.0
"""Seconds ``RpcApi.healthz()`` has to answer a ``health`` request."""
BACKLOG: Final = 128
"""The listening socket's backlog. asyncio accepts up to this many connections in one
callback, so it also bounds how long a connection storm can hold the loop (1,024 let
a storm of 1,000 delay the service's timers by up to 0.4 s; 128 keeps it under 0.1 s);
clients beyond a full backlog see their connect refused (``EAGAIN``)."""
MAX_SUN_PATH: Final = 107
"""The longest Unix socket path Linux accepts, in bytes."""

_READ_CHUNK: Final = 64 * 1024
_TASKS_BATCH: Final = 2000
"""Tasks described between two yields to the loop in a ``tasks`` answer."""

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
LINE_TOO_LONG: Final = -32001
TOO_MANY_CONNECTIONS: Final = -32002
PEER_REFUSED: Final = -32003

_PEERCRED: Final = getattr(socket, "SO_PEERCRED", None)
_CRED_FORMAT: Final = "3i"


class ControlSocketError(Exception):
    """The control socket cannot be set up (in use, not a socket, no such directory...).

    The message is one line that names the path; the runner exits with status 2.
    """


# --------------------------------------------------------------------------- binding


class BoundSocket:
    """A listening Unix socket at ``path`` that this process created.

    ``remove()`` closes it and unlinks ``path`` if it is still the file this
    process created (never a socket another process has put there since).
    """

    __slots__ = ("_identity", "path", "sock")

    def __init__(self, sock: socket.socket, path: str, identity: tuple[int, int]) -> None:
        self.sock = sock
        self.path = path
        self._identity = identity

    def remove(self) -> None:
        """Close the socket and unlink its path (idempotent)."""
        self.sock.close()
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._identity:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def __repr__(self) -> str:
        return f"<BoundSocket {self.path!r}>"


def bind_control_socket(path: str) -> BoundSocket:
    """Create the listening control socket at ``path``, mode 0600, with no window.

    A stale socket at ``path`` (nothing accepts on it: its process died) is
    replaced; a live one, or anything that is not a socket, is an error.

    Raises:
        ControlSocketError: the path is in use by a live process, is not a
            socket, is too long, or its directory is missing or not writable.
    """
    if not hasattr(socket, "AF_UNIX"):
        raise ControlSocketError(f"control socket {path!r}: this platform has no Unix sockets")
    if len(os.fsencode(path)) > MAX_SUN_PATH:
        raise ControlSocketError(
            f"control socket {path!r}: the path is {len(os.fsencode(path))} bytes long; "
            f"a Unix socket path is at most {MAX_SUN_PATH} (use a shorter path)"
        )
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ControlSocketError(
            f"control socket {path!r}: the directory {directory!r} does not exist"
        )
    _clear_stale(path)
    try:
        private = tempfile.mkdtemp(prefix=".dig-control-", dir=directory)  # mode 0700
    except OSError as exc:
        raise ControlSocketError(
            f"control socket {path!r}: cannot create it in {directory!r}: {exc.strerror or exc}"
        ) from None
    staged = os.path.join(private, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _bind_staged(sock, private, staged)
        # Nobody else can reach `staged` (its directory is 0700): make it 0600
        # before it becomes visible at `path`.
        os.chmod(staged, 0o600)
        try:
            os.link(staged, path)  # never replaces an existing path
        except FileExistsError:
            raise ControlSocketError(
                f"control socket {path!r}: another process created it just now; "
                "is a second copy of this service starting?"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            os.rename(staged, path)  # a filesystem without hard links
        st = os.lstat(path)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except ControlSocketError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise ControlSocketError(
            f"control socket {path!r}: cannot create it: {exc.strerror or exc}"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(staged)
        with contextlib.suppress(OSError):
            os.rmdir(private)
    return BoundSocket(sock, path, (st.st_dev, st.st_ino))


def _bind_staged(sock: socket.socket, private: str, staged: str) -> None:
    """Bind ``sock`` at ``staged``, through ``/proc/self/fd`` if the path is too long."""
    if len(os.fsencode(staged)) <= MAX_SUN_PATH:
        sock.bind(staged)
        return
    fd = os.open(private, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sock.bind(f"/proc/self/fd/{fd}/s")
    finally:
        os.close(fd)


def _clear_stale(path: str) -> None:
    """Remove a stale socket at ``path``; raise if it is live or not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ControlSocketError(f"control socket {path!r}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSocketError(
            f"control socket {path!r}: the path exists and is not a socket; refusing to replace it"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        pass  # stale: left by a process that died
    except FileNotFoundError:
        return
    except PermissionError:
        raise ControlSocketError(
            f"control socket {path!r}: in use and not ours (permission denied)"
        ) from None
    except OSError as exc:  # a timeout: a live process that does not accept quickly
        raise ControlSocketError(
            f"control socket {path!r}: in use (connecting to it: {exc.strerror or exc})"
        ) from None
    else:
        holder = ""
        pid = _peer_pid(probe)
        if pid is not None:
            holder = f" (pid {pid})"
        raise ControlSocketError(
            f"control socket {path!r} is in use by a live process{holder}; "
            "stop it or choose another path"
        )
    finally:
        probe.close()
    logger.info("control socket %s: replacing a stale socket left by a dead process", path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _peer_pid(sock: socket.socket) -> int | None:
    if _PEERCRED is None:
        return None
    try:
        pid, _uid, _gid = struct.unpack(
            _CRED_FORMAT,
            sock.getsockopt(socket.SOL_SOCKET, _PEERCRED, struct.calcsize(_CRED_FORMAT)),
        )
    except OSError:
        return None
    return int(pid)


def peer_credentials(sock: Any) -> tuple[int, int, int] | None:
    """``(pid, uid, gid)`` of the peer of a connected Unix socket (``SO_PEERCRED``)."""
    if _PEERCRED is None or sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _PEERCRED, struct.calcsize(_CRED_FORMAT))
    except OSError:
        return None
    pid, uid, gid = struct.unpack(_CRED_FORMAT, raw)
    return int(pid), int(uid), int(gid)


# --------------------------------------------------------------------------- JSON-RPC


class _RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _error(request_id: object, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def _encode(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _valid_id(value: object) -> bool:
    if value is None or isinstance(value, str):
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _no_params(method: str, params: object) -> None:
    if params is None or params == {} or params == []:
        return
    raise _RpcError(INVALID_PARAMS, f"method {method!r} takes no params")


def _phase_of(service: Service[Any, Any, Any]) -> str:
    return service._phase.value


def kind_name(kind: object) -> str:
    """A ``TaskKind``'s variant name (``"BackgroundLoop"``), as ``ps`` and the metrics show it."""
    return str(kind).rpartition(".")[2]


def shutdown_report(outcome: ExitStatus | BaseException | None) -> ShutdownReport | None:
    """The ``ShutdownReport`` a service's recorded outcome carries (an ``ExitStatus``
    or a ``ServiceError``), or ``None`` (no outcome yet, no shutdown began, or an
    exception that is not a ``ServiceError``).

    The one place the control socket (``report``, ``stop --wait``) and the
    metrics (``dig_service_shutdown_phase_seconds``) read a report from.
    """
    if isinstance(outcome, (ExitStatus, ServiceError)):
        return outcome.report
    return None


def _report_dict(report: ShutdownReport | None) -> dict[str, Any] | None:
    """``report.to_dict()`` (JSON-serialisable), or ``None``."""
    return None if report is None else report.to_dict()


async def final_outcome(service: Service[Any, Any, Any], code: int, forced: bool) -> dict[str, Any]:
    """What a ``shutdown`` request with ``wait`` answers once the service has stopped."""

    out: dict[str, Any] = {"exit_code": code, "forced": forced, "status": None, "report": None}
    if forced:
        out["status"] = f"forced exit ({code}) while shutting down"
        return out
    try:
        status = await asyncio.wait_for(service.wait_for_exit(), 1.0)
    except ServiceError as err:
        out["status"] = f"{type(err).__name__}: {err}"
        out["report"] = _report_dict(shutdown_report(err))
    except Exception as exc:  # never recorded: say what we know
        out["status"] = f"stopped (no status recorded: {type(exc).__name__})"
    else:
        out["status"] = str(status)
        out["report"] = _report_dict(shutdown_report(status))
    return out


# --------------------------------------------------------------------------- server


class _Connection:
    __slots__ = ("owes_answer", "peer", "reader", "writer")

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: tuple[int, int, int] | None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.owes_answer = False
        """A ``shutdown`` with ``wait`` is being answered on this connection."""


class ControlServer:
    """Serves the control socket of one service on the running loop.

    ``start()`` begins accepting on ``bound``; ``finish(outcome)`` records
    how the service ended (``final_outcome``) and releases the ``shutdown``
    requests that wait for it; ``close()`` lets their answers go out (up to
    ``grace`` seconds), then closes every connection and stops accepting.
    ``allowed_uid`` (default: this process's effective uid) is the only
    peer uid served; the limits are the module's constants unless given.
    """

    def __init__(
        self,
        bound: BoundSocket,
        service: Service[Any, Any, Any],
        *,
        label: str,
        started_at: float | None = None,
        allowed_uid: int | None = None,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
        drain_timeout: float = DRAIN_TIMEOUT,
        healthz_timeout: float = HEALTHZ_TIMEOUT,
    ) -> None:
        self.bound = bound
        self.service = service
        self.label = label
        self.started_at = time.monotonic() if started_at is None else started_at
        self.allowed_uid = os.geteuid() if allowed_uid is None else allowed_uid
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.drain_timeout = drain_timeout
        self.healthz_timeout = healthz_timeout
        self._server: asyncio.AbstractServer | None = None
        self._accepting = False
        self._connections: dict[asyncio.Task[Any], _Connection] = {}
        self._final: dict[str, Any] | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._pending_answers = 0
        self._answers_sent: asyncio.Event | None = None
        self._methods: dict[str, Callable[[_Connection, Any], Awaitable[Any]]] = {
            "tasks": self._tasks,
            "stats": self._stats,
            "health": self._health,
            "report": self._report,
            "shutdown": self._shutdown,
        }

    @property
    def path(self) -> str:
        return self.bound.path

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return len(self._connections)

    async def start(self) -> None:
        """Start accepting connections on the running loop."""
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        self._answers_sent = asyncio.Event()
        self._answers_sent.set()
        self._accepting = True
        self._server = await asyncio.start_unix_server(
            self._on_connect, sock=self.bound.sock, limit=MAX_LINE, backlog=BACKLOG
        )

    def finish(self, outcome: dict[str, Any]) -> None:
        """Record how the service ended; answer the ``shutdown`` requests waiting for it."""
        if self._final is None:
            self._final = outcome
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    async def close(self, grace: float = 5.0) -> None:
        """Send the pending ``wait`` answers (up to ``grace`` s), then close everything."""
        if self._answers_sent is not None and self._pending_answers and grace > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._answers_sent.wait(), grace)
        self.abort()
        tasks = list(self._connections)
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)

    def abort(self) -> None:
        """Stop accepting and drop every connection now (no awaiting)."""
        self._accepting = False
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task, conn in list(self._connections.items()):
            conn.writer.transport.abort()
            task.cancel()
        if self._stopped is not None and not self._stopped.done():
            self._stopped.cancel()

    # ----------------------------------------------------------------- connections

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            peer = peer_credentials(writer.get_extra_info("socket"))
            refusal = self._refusal(peer)
            if refusal is not None:
                code, message = refusal
                await self._refuse(writer, code, message)
                return
            conn = _Connection(reader, writer, peer)
            self._connections[task] = conn
            try:
                await self._serve(conn)
            finally:
                del self._connections[task]
        except asyncio.CancelledError:
            # Only `abort()` (or the runner's final clean-up) cancels a connection, to
            # drop it: end the task normally. (A cancelled callback task makes
            # CPython 3.11's StreamReaderProtocol log "Exception in callback".)
            writer.transport.abort()
        except (ConnectionError, TimeoutError, OSError):
            writer.transport.abort()
        except Exception:  # a bug here must not reach the loop's exception handler
            logger.exception("control socket %s: a connection failed", self.path)
            writer.transport.abort()
        else:
            writer.close()

    def _refusal(self, peer: tuple[int, int, int] | None) -> tuple[int, str] | None:
        if not self._accepting:
            return TOO_MANY_CONNECTIONS, "the control socket is closing"
        if peer is None:
            if _PEERCRED is None:  # no SO_PEERCRED here: the socket's mode 0600 is the check
                return self._over_capacity()
            return PEER_REFUSED, "cannot tell the peer's uid (SO_PEERCRED): refused"
        pid, uid, _gid = peer
        if uid != self.allowed_uid:
            logger.warning(
                "control socket %s: refused pid %d of uid %d (only uid %d is served)",
                self.path,
                pid,
                uid,
                self.allowed_uid,
            )
            return (
                PEER_REFUSED,
                f"permission denied: this service serves uid {self.allowed_uid} only, "
                f"not uid {uid}",
            )
        return self._over_capacity()

    def _over_capacity(self) -> tuple[int, str] | None:
        if len(self._connections) >= self.max_connections:
            return (
                TOO_MANY_CONNECTIONS,
                f"too many control connections ({self.max_connections}); try again later",
            )
        return None

    async def _refuse(self, writer: asyncio.StreamWriter, code: int, message: str) -> None:
        """One error line (it fits the socket buffer of a new connection), then close."""
        writer.write(_encode(_error(None, code, message)))
        writer.close()

    async def _serve(self, conn: _Connection) -> None:
        buf = bytearray()
        skipping = False  # inside a line that was too long: drop up to its newline
        while True:
            try:
                chunk = await asyncio.wait_for(conn.reader.read(_READ_CHUNK), self.idle_timeout)
            except TimeoutError:
                return
            if not chunk:
                if buf and not skipping:
                    await self._handle_line(conn, bytes(buf))
                return
            buf += chunk
            while True:
                newline = buf.find(b"\n")
                if skipping:
                    if newline < 0:
                        buf.clear()
                        break
                    del buf[: newline + 1]
                    skipping = False
                    continue
                if newline < 0:
                    if len(buf) > MAX_LINE:
                        buf.clear()
                        skipping = True
                        await self._send(conn, _error(None, LINE_TOO_LONG, _TOO_LONG))
                    break
                line = bytes(buf[:newline])
                del buf[: newline + 1]
                if len(line) > MAX_LINE:
                    await self._send(conn, _error(None, LINE_TOO_LONG, _TOO_LONG))
                    continue
                await self._handle_line(conn, line)

    async def _send(self, conn: _Connection, message: object) -> None:
        conn.writer.write(_encode(message))
        await asyncio.wait_for(conn.writer.drain(), self.drain_timeout)

    async def _handle_line(self, conn: _Connection, line: bytes) -> None:
        if not line.strip():
            return
        try:
            answer = await self._answer(conn, line)
            if answer is not None:
                await self._send(conn, answer)
        finally:
            if conn.owes_answer:  # sent (or failed): `close()` need not wait for it
                conn.owes_answer = False
                self._pending_answers -= 1
                if not self._pending_answers and self._answers_sent is not None:
                    self._answers_sent.set()

    async def _answer(self, conn: _Connection, line: bytes) -> dict[str, Any] | None:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError) as exc:
            return _error(None, PARSE_ERROR, f"parse error: {_short(exc)}")
        if not isinstance(request, dict):
            what = (
                "batch requests are not supported; send one request object a line"
                if isinstance(request, list)
                else "a request must be a JSON object"
            )
            return _error(None, INVALID_REQUEST, f"invalid request: {what}")
        notification = "id" not in request
        request_id = request.get("id")
        if not _valid_id(request_id):
            return _error(
                None, INVALID_REQUEST, "invalid request: `id` must be a string, a number or null"
            )
        if request.get("jsonrpc") != "2.0":
            return _error(request_id, INVALID_REQUEST, 'invalid request: `jsonrpc` must be "2.0"')
        method = request.get("method")
        if not isinstance(method, str):
            return _error(request_id, INVALID_REQUEST, "invalid request: `method` must be a string")
        params = request.get("params")
        try:
            if params is not None and not isinstance(params, dict | list):
                raise _RpcError(INVALID_PARAMS, "`params` must be an object or an array")
            handler = self._methods.get(method)
            if handler is None:
                raise _RpcError(
                    METHOD_NOT_FOUND,
                    f"method not found: {method[:100]!r}; methods: {', '.join(self._methods)}",
                )
            result = await handler(conn, params)
        except _RpcError as err:
            return None if notification else _error(request_id, err.code, err.message)
        except Exception as exc:
            logger.exception("control socket %s: method %r failed", self.path, method)
            return (
                None
                if notification
                else _error(request_id, INTERNAL_ERROR, f"internal error: {_short(exc)}")
            )
        if notification:
            return None
        return {"jsonrpc": "2.0", "id": request_id, "result": result}

    # ----------------------------------------------------------------- methods

    async def _tasks(self, conn: _Connection, params: Any) -> list[dict[str, Any]]:
        _no_params("tasks", params)
        live = sorted(self.service.tasks.snapshot(), key=lambda s: s.spawned_at)
        now = time.monotonic()
        out: list[dict[str, Any]] = []
        for start in range(0, len(live), _TASKS_BATCH):
            if start:
                await asyncio.sleep(0)  # a huge registry must not hold the loop
            for s in live[start : start + _TASKS_BATCH]:
                out.append(
                    {
                        "name": s.name,
                        "kind": kind_name(s.kind),
                        "origin": s.origin,
                        "age": round(max(0.0, now - s.spawned_at), 3),
                        "restarts": s.restarts,
                    }
                )
        return out

    async def _stats(self, conn: _Connection, params: Any) -> dict[str, int]:
        _no_params("stats", params)
        stats = self.service.tasks.stats()
        return {
            "spawned": stats.spawned,
            "completed": stats.completed,
            "failed": stats.failed,
            "cancelled": stats.cancelled,
            "aborted": stats.aborted,
            "live": stats.live,
            "restarted": stats.restarted,
        }

    async def _health(self, conn: _Connection, params: Any) -> dict[str, Any]:
        _no_params("health", params)
        from ._lifecycle import RpcApi

        api = self.service.rpc_api
        if api is None:
            api = RpcApi()
        ok, error = True, None
        # Not wait_for: a healthz() that swallows its cancellation must not hold the answer.
        check = asyncio.ensure_future(api.healthz())
        try:
            await asyncio.wait((check,), timeout=self.healthz_timeout)
        finally:
            if not check.done():
                check.cancel()
                check.add_done_callback(_consume)
        if not check.done():
            ok, error = False, f"healthz() did not answer within {self.healthz_timeout:g}s"
        elif check.cancelled():
            ok, error = False, "healthz() was cancelled"
        elif check.exception() is not None:
            ok, error = False, f"healthz() raised {_short(check.exception())}"
        token = self.service.shutdown_token
        reason = token.reason()
        return {
            "ok": ok,
            "error": error,
            "phase": _phase_of(self.service),
            "uptime": round(time.monotonic() - self.started_at, 3),
            "stopping": token.is_cancelled(),
            "reason": None if reason is None else str(reason),
            "service": self.label,
            "pid": os.getpid(),
        }

    async def _report(self, conn: _Connection, params: Any) -> Any:
        _no_params("report", params)
        return None if self._final is None else self._final.get("report")

    async def _shutdown(self, conn: _Connection, params: Any) -> dict[str, Any]:
        reason: ShutdownReason = ShutdownReason.UserRequested()
        wait = False
        if isinstance(params, list):
            if params:
                raise _RpcError(INVALID_PARAMS, "shutdown takes named params: reason, wait")
        elif params is not None:
            unknown = sorted(set(params) - {"reason", "wait"})
            if unknown:
                raise _RpcError(
                    INVALID_PARAMS,
                    f"shutdown: unknown param(s) {', '.join(map(repr, unknown))}; "
                    "expected reason, wait",
                )
            name = params.get("reason", "user")
            if name == "rpc":
                reason = ShutdownReason.RpcRequested()
            elif name != "user":
                raise _RpcError(INVALID_PARAMS, 'shutdown: `reason` must be "user" or "rpc"')
            wait = params.get("wait", False)
            if not isinstance(wait, bool):
                raise _RpcError(INVALID_PARAMS, "shutdown: `wait` must be true or false")
        pid = conn.peer[0] if conn.peer is not None else -1
        token = self.service.shutdown_token
        if not token.is_cancelled():
            logger.info("control socket: shutdown requested by pid %d (%s)", pid, kind_name(reason))
        self.service.request_shutdown(reason)
        result: dict[str, Any] = {"accepted": True, "reason": str(token.reason())}
        if not wait:
            return result
        stopped = self._stopped
        assert stopped is not None and self._answers_sent is not None
        # `close()` waits (up to its grace) until this answer has been written.
        conn.owes_answer = True
        self._pending_answers += 1
        self._answers_sent.clear()
        await asyncio.shield(stopped)
        result.update(self._final or {})
        return result


_TOO_LONG: Final = f"request line longer than {MAX_LINE} bytes; skipped up to its newline"


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned task's outcome (no "exception was never retrieved")."""
    if not task.cancelled():
        task.exception()


def _short(exc: BaseException | None) -> str:
    text = str(exc)
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
