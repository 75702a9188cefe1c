"""systemd's notify protocol (``sd_notify``), without a dependency.

A service started by systemd with ``Type=notify`` finds the address of the
supervisor's datagram socket in ``$NOTIFY_SOCKET`` (a filesystem path, or
``@name`` for a socket in the abstract namespace) and reports its state by
sending it newline-separated ``KEY=VALUE`` assignments, one datagram per
report. This module implements the three reports a service runner needs:

- ``READY=1`` once start-up is complete (after ``on_start``),
- ``STOPPING=1`` when shutdown begins (the token fired),
- ``WATCHDOG=1`` every ``$WATCHDOG_USEC / 2`` while running, when systemd
  asks for keep-alive pings (``WatchdogSec=`` in the unit).

Every send is best effort: a supervisor that went away must not take the
service down with it, so errors are logged at debug level and swallowed.

systemd exists only on Linux: elsewhere (macOS, Windows) ``$NOTIFY_SOCKET``
is ignored, ``Notifier.from_env()`` is ``None`` and ``notify`` a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping
from typing import Final

__all__ = ["Notifier", "notify", "notify_address", "watchdog_interval"]

logger: Final = logging.getLogger("dig_service.systemd")


def notify_address(environ: Mapping[str, str] | None = None) -> str | bytes | None:
    """The address ``$NOTIFY_SOCKET`` names, ready for ``socket.sendto``, or ``None``.

    Always ``None`` off Linux. ``@name`` becomes the abstract-namespace address ``b"\\0name"``; an
    absolute path is returned as is. Anything else (unset, empty, a
    relative path, a ``vsock:`` address) is ``None``: not for us.
    """
    if not sys.platform.startswith("linux"):
        return None  # no systemd here (and no AF_UNIX datagrams with SOCK_CLOEXEC)
    env = os.environ if environ is None else environ
    raw = env.get("NOTIFY_SOCKET", "")
    if raw.startswith("@") and len(raw) > 1:
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or ``None`` if systemd wants none (or off Linux).

    Half of ``$WATCHDOG_USEC`` (as ``sd_watchdog_enabled`` advises), when it is
    a positive integer and ``$WATCHDOG_PID`` is unset or names this process.
    """
    if not sys.platform.startswith("linux"):
        return None
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


class Notifier:
    """A connection to the supervisor's notify socket.

    ``Notifier.from_env()`` is ``None`` when ``$NOTIFY_SOCKET`` is not set,
    so a caller writes ``if notifier: notifier.send("READY=1")``.
    """

    __slots__ = ("_address", "_sock")

    def __init__(self, address: str | bytes) -> None:
        self._address = address
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier | None:
        """A notifier for ``$NOTIFY_SOCKET``, or ``None`` if it is unset or unusable."""
        address = notify_address(environ)
        return None if address is None else cls(address)

    @property
    def address(self) -> str | bytes:
        """Where the reports go (``b"\\0name"`` for an abstract socket)."""
        return self._address

    def send(self, *assignments: str) -> bool:
        """Send ``assignments`` (e.g. ``"READY=1"``, ``"STATUS=serving"``) in one datagram.

        Returns whether the datagram was sent. Never raises ``OSError``.
        """
        message = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self._address)
        except OSError as exc:
            logger.debug("sd_notify to %r failed: %s", self._address, exc)
            return False
        return True

    def close(self) -> None:
        """Close the socket (a later ``send`` opens a new one)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __repr__(self) -> str:
        return f"Notifier({self._address!r})"


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """``sd_notify(0, ...)``: one report to ``$NOTIFY_SOCKET``; ``False`` if unset or failed."""
    notifier = Notifier.from_env(environ)
    if notifier is None:
        return False
    try:
        return notifier.send(*assignments)
    finally:
        notifier.close()
