"""``python -m dig_service``: the command line.

``python -m dig_service run [MODULE:ATTR] [options]`` runs a service until
it is told to stop (see ``--help``); ``ps SOCKET`` and ``stop SOCKET`` ask
one that runs with ``--control-socket SOCKET`` (see ``_ctl``). Errors in
the command line itself — an unknown option, a target that cannot be
imported, found or turned into a ``Service`` — are one line on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Final, NoReturn

from ._errors import describe_exc
from ._lifecycle import NODE_HOOKS

__all__ = ["TargetError", "main", "resolve_target"]

PROG: Final = "python -m dig_service"
EXIT_USAGE: Final = 2

_DESCRIPTION: Final = """\
Run a dig-service Service in the foreground until it is told to stop.

TARGET is MODULE:ATTR (ATTR may be dotted, e.g. pkg.mod:factories.make). The
attribute may be:
  - a node class (NodeLifecycle subclass, or any class with the five async
    hooks), instantiated with no arguments;
  - a node instance;
  - a Service (then --shutdown-deadline/--hook-timeout/--stop-reserve cannot be applied:
    set its ServiceConfig in code);
  - a zero-argument function returning any of the above.
The current directory is on the import path. With no TARGET, a bundled demo
service runs: a heartbeat loop, simulated peer connections, a maintenance
task, a native tokio task and an RPC API.
"""

_SIGNALS_HELP: Final = """\
signals:
  {stop:<16} shut down (ShutdownReason.UserRequested); the shutdown shows
                   the tasks still running and the time left, then names any
                   straggler with the stack it is stuck in
  the same again   during the shutdown: stop waiting, exit at once (128 + signal)
{hup}
{usr1}
"""

_HUP_HELP: Final = """\
  SIGHUP           shut down with ShutdownReason.ReloadRequested, so that the
                   supervisor starts the service again"""
_USR1_HELP: Final = """\
  SIGUSR1          log the live tasks (name, kind, origin, age)"""
_NO_HUP_HELP: Final = """\
  SIGHUP           not on this platform: reload by signal is off (request a
                   shutdown with ShutdownReason.ReloadRequested from code)"""
_NO_USR1_HELP: Final = """\
  SIGUSR1          not on this platform: the task snapshot by signal is off"""


def signals_help() -> str:
    """The ``signals:`` part of ``run --help``, for the signals this platform has.

    On Windows: Ctrl-C (SIGINT) and Ctrl-Break (SIGBREAK) stop the service;
    there is no SIGHUP or SIGUSR1, so those two features are said to be off.
    """
    if hasattr(signal, "SIGBREAK"):
        stop_col = "Ctrl-C, Ctrl-Break (SIGINT, SIGBREAK)\n                  "
    else:
        stop_col = "SIGINT, SIGTERM"
    return _SIGNALS_HELP.format(
        stop=stop_col,
        hup=_HUP_HELP if hasattr(signal, "SIGHUP") else _NO_HUP_HELP,
        usr1=_USR1_HELP if hasattr(signal, "SIGUSR1") else _NO_USR1_HELP,
    )


_EPILOG: Final = """\
exit status:
  0        graceful stop (requested shutdown, or run() returned)
  1        the service failed: a hook raised, a Fatal shutdown, tasks outlived
           the shutdown deadline, or any other ServiceError
  2        bad command line or bad TARGET, the control socket is held by a live
           process (or is not a socket), or --metrics-addr cannot be served
  128 + n  forced exit by a second signal n (130 for SIGINT, 143 for SIGTERM)

environment:
  NOTIFY_SOCKET   set by systemd (Type=notify): READY=1 is sent after on_start,
                  STOPPING=1 when shutdown begins, then STATUS= with the stage
                  and the time left (Linux only; ignored elsewhere)
  WATCHDOG_USEC   set by systemd (WatchdogSec=): WATCHDOG=1 every half period,
                  sent by a timer on the event loop: a stuck loop sends none, so
                  systemd restarts the service

logging:
  If the target has not configured logging (no handler on the root logger),
  log records go to stderr at --log-level (default INFO); --log-format json
  makes every record one JSON object a line. After a shutdown, its report
  (each stage's time and outcome, every straggler with its stack) is logged
  once on dig_service.run. Nothing is written to stdout by dig-service itself.

examples:
  python -m dig_service run                              # the demo
  python -m dig_service run myapp.node:MyNode --shutdown-deadline 20
  python -m dig_service run myapp.main:build_service --uvloop
  python -m dig_service run myapp.node:MyNode --control-socket /run/mynode/control.sock
  python -m dig_service ps /run/mynode/control.sock
  python -m dig_service stop /run/mynode/control.sock --wait
  python -m dig_service run myapp.node:MyNode --metrics-addr :9464
"""

DEFAULT_STALL_WARNING: Final = 1.0
"""The runner's --stall-warning when none is given."""
DEFAULT_METRICS_HOST: Final = "127.0.0.1"
"""The host of a --metrics-addr given as a port only."""


class TargetError(Exception):
    """A target that cannot be imported, found, or made into a ``Service``."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0 seconds")
    return value


_LEVELS: Final = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


def _stall_warning(text: str) -> float:
    """Seconds (>= 0.01), or 0 for "off"."""
    if text.strip().lower() in ("off", "none", "0"):
        return 0.0
    value = _seconds(text)
    if value != 0 and value < 0.01:
        raise argparse.ArgumentTypeError(f"must be at least 0.01 seconds (or off), got {text}")
    return value


def _metrics_addr(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (host 127.0.0.1); an IPv6 host in brackets."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(
            f"an IPv6 address goes in brackets, e.g. [::1]:9100; got {text!r}"
        )
    try:
        port = int(port_text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be HOST:PORT or PORT (a port number), got {text!r}"
        ) from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"the port must be 0..65535, got {port}")
    return host or DEFAULT_METRICS_HOST, port


def _socket_path(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must be a path, got an empty string")
    return text


def _level(text: str) -> str:
    upper = text.upper()
    if upper == "WARN":
        upper = "WARNING"
    if upper not in _LEVELS:
        raise argparse.ArgumentTypeError(
            f"unknown level {text!r}; use one of {', '.join(lv.lower() for lv in _LEVELS)}"
        )
    return upper


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="dig-service: the service scaffold of DIG Network processes.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = commands.add_parser(
        "run",
        help="run a service (or the bundled demo) until it is told to stop",
        description=_DESCRIPTION,
        epilog=signals_help() + "\n" + _EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "target",
        nargs="?",
        metavar="TARGET",
        help="MODULE:ATTR naming a node class, node instance, Service, or a zero-argument "
        "factory of one (default: the bundled demo)",
    )
    run.add_argument(
        "--shutdown-deadline",
        type=_seconds,
        metavar="S",
        help="the whole budget of a shutdown, in seconds, from the request until the "
        "process exits: run and the task join share it minus the stop reserve "
        "(--stop-reserve), on_stop and post_stop get the rest; stragglers are then "
        "cancelled and the exit status is 1 (default: 30, ServiceConfig's). Set the "
        "supervisor's grace period to S plus a small margin",
    )
    run.add_argument(
        "--stop-reserve",
        type=_seconds,
        metavar="S",
        help="seconds of the shutdown deadline kept for on_stop and post_stop: run and the "
        "task join share the deadline minus S, the stop hooks never get less than S "
        "(default: min(5, deadline/4), ServiceConfig's); must not exceed the deadline",
    )
    run.add_argument(
        "--hook-timeout",
        type=_positive_seconds,
        metavar="S",
        help="seconds each of pre_start, on_start, on_stop and post_stop may take "
        "(default: no limit)",
    )
    run.add_argument(
        "--log-level",
        type=_level,
        metavar="L",
        help="debug, info, warning, error or critical (default: info). Sets the root "
        "logger's level; a handler on stderr is added only if none is configured",
    )
    run.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text (default) or json: every log record as one JSON object a line on "
        'stderr, the shutdown report as structured data in its "report" field',
    )
    run.add_argument(
        "--uvloop",
        action="store_true",
        help="run on uvloop instead of the default asyncio loop (pip install uvloop)",
    )
    run.add_argument(
        "--control-socket",
        type=_socket_path,
        metavar="PATH",
        help="serve a control socket at PATH (Unix socket, mode 0600, this user only) for "
        "`ps` and `stop`; a stale one is replaced, a live one is an error (exit 2)",
    )
    run.add_argument(
        "--stall-warning",
        type=_stall_warning,
        metavar="S",
        help="warn, with the event loop thread's stack, when the loop has not turned for S "
        "seconds (a blocking call in a coroutine); 0 or off disables it (default: "
        f"{DEFAULT_STALL_WARNING:g}, or the Service's ServiceConfig.stall_warning)",
    )
    run.add_argument(
        "--metrics-addr",
        type=_metrics_addr,
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (HOST defaults to "
        f"{DEFAULT_METRICS_HOST}; port 0 picks a free one, logged at start; needs "
        "pip install 'dig-service[metrics]'); an address that cannot be bound is an error "
        "(exit 2)",
    )
    from ._ctl import add_commands

    add_commands(commands, _Parser)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("dig-service")
    except Exception:
        return "unknown"


# --------------------------------------------------------------------------- targets


def _is_node(obj: object) -> bool:
    return all(callable(getattr(obj, hook, None)) for hook in NODE_HOOKS)


def _service_class() -> type:
    from ._service import Service

    return Service


def _where(exc: BaseException) -> str:
    """`` (file.py, line N)`` for the innermost frame of ``exc``'s traceback, if any."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" ({exc.filename}, line {exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" ({last.filename}, line {last.lineno})"


def _import_target(target: str) -> tuple[object, str]:
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise TargetError(
            f"target {target!r} is not MODULE:ATTR (e.g. myapp.node:MyNode); "
            "leave it out to run the demo"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (
            module_name == exc.name or module_name.startswith(exc.name + ".")
        ):
            raise TargetError(
                f"cannot import module {module_name!r} of target {target!r}: no such module "
                f"(is its directory the current one, or on PYTHONPATH?)"
            ) from None
        raise TargetError(
            f"importing module {module_name!r} of target {target!r} failed: "
            f"{describe_exc(exc)}{_where(exc)}"
        ) from None
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise TargetError(
            f"importing module {module_name!r} of target {target!r} failed: "
            f"{describe_exc(exc)}{_where(exc)}"
        ) from None
    obj: object = module
    walked = module_name
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(f"target {target!r}: {walked!r} has no attribute {part!r}") from None
        walked = f"{walked}:{part}" if walked == module_name else f"{walked}.{part}"
    return obj, target


@dataclass(frozen=True)
class Overrides:
    """The ``ServiceConfig`` fields given on the command line (``None``: not given)."""

    shutdown_deadline: float | None = None
    hook_timeout: float | None = None
    stop_reserve: float | None = None

    def flags(self) -> list[str]:
        """The options given, as spelled on the command line."""
        return [
            "--" + f.name.replace("_", "-")
            for f in fields(self)
            if getattr(self, f.name) is not None
        ]

    def config(self) -> Any:
        """The ``ServiceConfig``: the options given, ``ServiceConfig``'s defaults for the
        rest.

        Raises:
            TargetError: the options contradict each other (a stop reserve over the
                deadline); the message names the options.
        """
        from ._config import ServiceConfig

        given = {f.name: getattr(self, f.name) for f in fields(self)}
        try:
            return ServiceConfig(**{k: v for k, v in given.items() if v is not None})
        except (TypeError, ValueError) as exc:
            raise TargetError(f"{'/'.join(self.flags())}: {exc}") from None


def resolve_target(
    target: str,
    *,
    shutdown_deadline: float | None = None,
    hook_timeout: float | None = None,
    stop_reserve: float | None = None,
) -> Any:
    """Turn ``MODULE:ATTR`` into a ``Service`` configured from the options.

    Raises:
        TargetError: the options contradict each other, the target cannot be
            imported or found, is not one of the accepted kinds, or building
            the service failed; the message is one line and names the target
            or the options.
    """
    overrides = Overrides(shutdown_deadline, hook_timeout, stop_reserve)
    config = overrides.config()  # checked before the target's module is imported
    obj, _ = _import_target(target)
    return _to_service(obj, target, overrides, config, depth=0)


def _to_service(obj: object, target: str, overrides: Overrides, config: Any, depth: int) -> Any:
    """The ``Service`` that ``obj`` names; ``config`` (from ``overrides``) for one built
    here, ``overrides`` named in the error for one built already."""
    service_cls = _service_class()
    if isinstance(obj, service_cls):
        given = overrides.flags()
        if given:
            raise TargetError(
                f"target {target!r} is an already built Service, so {' and '.join(given)} "
                "cannot be applied; set ServiceConfig(...) where it is built, or point the "
                "target at its node class or a factory"
            )
        return obj
    if isinstance(obj, type):
        if issubclass(obj, service_cls):
            raise TargetError(
                f"target {target!r} is the Service class itself; name a node class, a "
                "node instance, a Service instance or a factory of one"
            )
        if not _is_node(obj):
            raise TargetError(
                f"target {target!r} is the class {obj.__qualname__}, which is not a node "
                f"(it lacks the hooks {', '.join(h for h in NODE_HOOKS if not hasattr(obj, h))})"
            )
        try:
            node = obj()
        except Exception as exc:
            raise TargetError(
                f"target {target!r}: {obj.__qualname__}() failed: {describe_exc(exc)}{_where(exc)} "
                "(a node class must be constructible with no arguments; otherwise name a "
                "factory)"
            ) from None
        return _build(node, target, config)
    if _is_node(obj):
        return _build(obj, target, config)
    if callable(obj) and depth == 0:
        if inspect.iscoroutinefunction(obj):
            raise TargetError(
                f"target {target!r} is an async function; a factory must be a plain "
                "function returning a node or a Service"
            )
        try:
            result = obj()
        except Exception as exc:
            raise TargetError(
                f"target {target!r}: calling the factory failed: {describe_exc(exc)}{_where(exc)}"
            ) from None
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            raise TargetError(
                f"target {target!r} returned an awaitable; a factory must return a node "
                "or a Service"
            )
        return _to_service(result, target, overrides, config, depth + 1)
    what = "factory returned" if depth else "is"
    raise TargetError(
        f"target {target!r} {what} {_a(type(obj).__name__)}, not a node class, node "
        "instance, Service or zero-argument factory of one"
    )


def _a(name: str) -> str:
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


def _build(node: object, target: str, config: Any) -> Any:
    service_cls = _service_class()
    try:
        return service_cls(node, config=config)
    except (TypeError, ValueError) as exc:
        raise TargetError(f"target {target!r}: {exc}") from None


# --------------------------------------------------------------------------- main


def _configure_logging(level: str | None, log_format: str = "text") -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=level or "INFO",
            stream=sys.stderr,
            format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        )
    elif level is not None:
        root.setLevel(level)
    if log_format == "json":
        from ._logjson import JsonFormatter

        # Asked for explicitly: every handler of the root logger writes JSON lines.
        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())


def _fail(message: str) -> int:
    print(f"{PROG} run: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _flush_all() -> None:
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (a forced exit does not return)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("ps", "stop"):
        from ._ctl import main as ctl_main

        return ctl_main(args, PROG)
    if args.command != "run":
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    loop_factory = None
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            if sys.platform == "win32":
                return _fail("--uvloop: uvloop does not exist for Windows; run without --uvloop")
            return _fail("--uvloop: uvloop is not installed (pip install 'dig-service[uvloop]')")
        loop_factory = uvloop.new_event_loop

    try:
        if args.target is None:
            from ._demo import make_demo_service

            overrides = Overrides(args.shutdown_deadline, args.hook_timeout, args.stop_reserve)
            service = make_demo_service(overrides.config())
        else:
            # The current directory is on sys.path (`python -m` puts it there).
            service = resolve_target(
                args.target,
                shutdown_deadline=args.shutdown_deadline,
                hook_timeout=args.hook_timeout,
                stop_reserve=args.stop_reserve,
            )
    except TargetError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 128 + 2
    if args.stall_warning is not None and service.config.stall_warning is not None:
        return _fail(
            f"target {args.target!r} is a Service with ServiceConfig.stall_warning set, so "
            "--stall-warning cannot be applied; change it where the Service is built"
        )
    stall = DEFAULT_STALL_WARNING if args.stall_warning is None else args.stall_warning

    _configure_logging(args.log_level, args.log_format)

    from ._control import ControlSocketError
    from ._runner import MetricsError, run_service

    try:
        outcome = run_service(
            service,
            loop_factory=loop_factory,
            # JSON lines only: no status line redrawn in place on a terminal.
            plain_status=args.log_format == "json",
            control_socket=args.control_socket,
            stall_warning=stall or None,
            metrics_addr=args.metrics_addr,
        )
    except (ControlSocketError, MetricsError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:  # before the handlers were installed
        return 128 + 2
    if outcome.forced:
        # The operator asked to stop now: no interpreter teardown (which would
        # wait for abandoned threads and tasks).
        _flush_all()
        os._exit(outcome.code)
    return outcome.code
