"""``python -m dig_service ps|stop SOCKET``: the control socket's client side.

Both commands speak JSON-RPC 2.0 over the Unix socket a service opened
with ``--control-socket`` (see ``_control``), with plain blocking sockets:
no event loop and no thread is started in this process.

Exit status: 0 when the service answered; 1 with a one-line message on
stderr when it could not be asked (no socket, not a socket, nothing
listening, another user's service, refused, closed without an answer) or
answered with an error; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import stat
import sys
import time
from typing import Any, Final

__all__ = ["CtlError", "add_commands", "call", "main"]

EXIT_FAILED: Final = 1
TIMEOUT: Final = 10.0
"""Seconds to connect and to get an answer (``stop --wait`` waits without limit)."""
_MAX_ANSWER: Final = 1 << 30
"""Refuse answers longer than this (a broken or hostile peer)."""

_PS_EPILOG: Final = """\
columns: NAME, KIND (the TaskKind), ORIGIN (python: an asyncio task; native: a
tokio task), AGE (since it was spawned), RESTARTS (by its supervisor).

exit status: 0 listed; 1 the service could not be asked (one line on stderr)
"""

_STOP_EPILOG: Final = """\
The service shuts down as on SIGTERM (ShutdownReason.UserRequested).

exit status: 0 the shutdown was accepted (with --wait: the service has
stopped; its own exit code is printed); 1 the service could not be asked
(one line on stderr)
"""


class CtlError(Exception):
    """The service could not be asked, or answered with an error (one-line message)."""


def add_commands(commands: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Add ``ps`` and ``stop`` to the CLI's sub-command parsers."""
    ps = commands.add_parser(
        "ps",
        help="list the live tasks of a running service (through its control socket)",
        description="List the live tasks of a service started with --control-socket SOCKET.",
        epilog=_PS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ps.add_argument("socket", metavar="SOCKET", help="the service's --control-socket path")
    ps.add_argument(
        "--json",
        action="store_true",
        help="print a JSON array of {name, kind, origin, age, restarts} instead of a table",
    )
    stop = commands.add_parser(
        "stop",
        help="ask a running service to shut down (through its control socket)",
        description="Ask a service started with --control-socket SOCKET to shut down.",
        epilog=_STOP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stop.add_argument("socket", metavar="SOCKET", help="the service's --control-socket path")
    stop.add_argument(
        "--wait",
        action="store_true",
        help="wait until the service has stopped, then print how it ended "
        "(its shutdown report, or its final status)",
    )
    stop.add_argument("--json", action="store_true", help="print the service's answer as JSON")


# --------------------------------------------------------------------------- client


def call(path: str, method: str, params: object = None, *, timeout: float | None = TIMEOUT) -> Any:
    """Send one request to the control socket at ``path``; return its ``result``.

    ``timeout`` bounds the connection and the wait for the answer
    (``None``: wait for the answer as long as it takes).

    Raises:
        CtlError: no socket at ``path``, not a socket, nothing listening,
            permission denied, refused by the service, closed without an
            answer, a malformed answer, or a JSON-RPC error answer.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CtlError(
            f"no control socket at {path!r} (is the service running with --control-socket {path}?)"
        ) from None
    except OSError as exc:
        raise CtlError(f"cannot reach {path!r}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise CtlError(f"{path!r} is not a socket (not a service's control socket)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(TIMEOUT if timeout is None else timeout)
        try:
            _connect(sock, path, TIMEOUT if timeout is None else timeout)
        except ConnectionRefusedError:
            raise CtlError(
                f"nothing is listening on {path!r} (the service has stopped; the socket is stale)"
            ) from None
        except PermissionError:
            raise CtlError(
                f"permission denied connecting to {path!r}: the service runs as another user"
            ) from None
        except FileNotFoundError:
            raise CtlError(f"no control socket at {path!r}") from None
        except TimeoutError:
            raise CtlError(f"connecting to {path!r} timed out") from None
        except OSError as exc:
            raise CtlError(f"cannot connect to {path!r}: {exc.strerror or exc}") from None
        request: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method}
        if params is not None:
            request["params"] = params
        sock.settimeout(timeout)
        try:
            try:
                sock.sendall(json.dumps(request).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused at once? The reason is the line waiting to be read.
            line = _read_line(sock)
        except TimeoutError:
            raise CtlError(f"the service at {path!r} did not answer within {timeout:g}s") from None
        except OSError as exc:
            raise CtlError(f"the connection to {path!r} failed: {exc.strerror or exc}") from None
    finally:
        sock.close()
    if line is None:
        raise CtlError(
            f"the service at {path!r} closed the connection without answering "
            "(it stopped or was killed)"
        )
    try:
        answer = json.loads(line)
    except ValueError:
        raise CtlError(f"the service at {path!r} sent a malformed answer") from None
    if not isinstance(answer, dict):
        raise CtlError(f"the service at {path!r} sent a malformed answer")
    error = answer.get("error")
    if error is not None:
        message = error.get("message") if isinstance(error, dict) else error
        code = error.get("code") if isinstance(error, dict) else None
        if code == -32003:
            raise CtlError(f"the service at {path!r} refused this client: {message}")
        raise CtlError(f"the service at {path!r} answered with an error: {message} ({code})")
    if "result" not in answer:
        raise CtlError(f"the service at {path!r} sent a malformed answer")
    return answer["result"]


def _connect(sock: socket.socket, path: str, timeout: float) -> None:
    """``connect``, retrying while the service's listen backlog is full (``EAGAIN``)."""
    end = time.monotonic() + timeout
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= end:
                raise TimeoutError from None
            time.sleep(0.01)


def _read_line(sock: socket.socket) -> bytes | None:
    """One newline-terminated line, or ``None`` at end of stream before a newline."""
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None
        newline = chunk.find(b"\n")
        if newline >= 0:
            chunks.append(chunk[:newline])
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > _MAX_ANSWER:
            raise CtlError("the answer is too long")


# --------------------------------------------------------------------------- commands


def main(args: argparse.Namespace, prog: str) -> int:
    """Run ``ps`` or ``stop`` with the parsed ``args``; return the exit status."""
    try:
        if args.command == "ps":
            return _ps(args)
        return _stop(args)
    except CtlError as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 128 + 2
    except BrokenPipeError:  # `ps | head`
        _quiet_stdout()
        return EXIT_FAILED


def _quiet_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _ps(args: argparse.Namespace) -> int:
    tasks = call(args.socket, "tasks")
    if not isinstance(tasks, list):
        raise CtlError(f"the service at {args.socket!r} sent a malformed answer")
    rows = [_task_row(t) for t in tasks]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(_table(rows))
    return 0


def _task_row(task: object) -> dict[str, Any]:
    if not isinstance(task, dict):
        raise CtlError("the service sent a malformed task list")
    return {key: task.get(key) for key in ("name", "kind", "origin", "age", "restarts")}


def _table(rows: list[dict[str, Any]]) -> str:
    header = ("NAME", "KIND", "ORIGIN", "AGE", "RESTARTS")
    cells = [
        (
            str(r["name"]),
            str(r["kind"]),
            str(r["origin"]),
            _age(r["age"]),
            str(r["restarts"] if r["restarts"] is not None else 0),
        )
        for r in rows
    ]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(header)]
    lines = []
    for row in [header, *cells]:
        left = "  ".join(f"{c:<{w}}" for c, w in zip(row[:3], widths[:3], strict=True))
        right = "  ".join(f"{c:>{w}}" for c, w in zip(row[3:], widths[3:], strict=True))
        lines.append(f"{left}  {right}")
    return "\n".join(lines)


def _age(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _stop(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"wait": True} if args.wait else {}
    result = call(args.socket, "shutdown", params, timeout=None if args.wait else TIMEOUT)
    if not isinstance(result, dict):
        raise CtlError(f"the service at {args.socket!r} sent a malformed answer")
    if args.json:
        print(json.dumps(result))
        return 0
    if not args.wait:
        print(f"shutdown requested ({result.get('reason')})")
        return 0
    print(_describe_outcome(result))
    return 0


def _describe_outcome(result: dict[str, Any]) -> str:
    """The final status line, then the shutdown report when the service made one."""
    lines = [f"service stopped: {result.get('status')}"]
    report = result.get("report")
    if isinstance(report, dict):
        lines.extend(_describe_report(report))
    return "\n".join(lines)


def _reason_text(reason: object) -> str:
    """The report's ``reason``: ``{"kind", "message"}`` (a ``Fatal`` one has a message)."""
    if isinstance(reason, dict):
        kind, message = reason.get("kind"), reason.get("message")
        return f"{kind} ({message})" if message else str(kind)
    return str(reason)


def _describe_report(report: dict[str, Any]) -> list[str]:
    """``ShutdownReport.to_dict()`` (fields per SPEC section 7) as text."""
    total = report.get("total")
    head = f"shutdown report: reason {_reason_text(report.get('reason'))}"
    if isinstance(total, int | float):
        head += f", {total:.3f}s in total"
    if report.get("tasks_at_start") is not None:
        head += f", {report.get('tasks_at_start')} task(s) live when it began"
    lines = [head]
    for phase in report.get("phases") or []:
        if isinstance(phase, dict):
            duration = phase.get("duration")
            took = f"{duration:.3f}s" if isinstance(duration, int | float) else "?"
            lines.append(f"  {phase.get('name')}: {phase.get('outcome')} ({took})")
    stragglers = report.get("stragglers") or []
    if stragglers:
        lines.append(f"  stragglers ({len(stragglers)}):")
        for s in stragglers:
            if not isinstance(s, dict):
                continue
            lines.append(
                f"    - {s.get('name')} ({s.get('kind')}, {s.get('origin')}, "
                f"age {_age(s.get('age'))})"
            )
            stack = s.get("stack")
            if isinstance(stack, str) and stack:
                lines.extend(f"        {line}" for line in stack.rstrip().splitlines())
    return lines
