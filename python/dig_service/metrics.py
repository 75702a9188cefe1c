"""Prometheus metrics of a running service (``pip install dig-service[metrics]``).

``ServiceCollector(service)`` registers into a ``prometheus_client``
``CollectorRegistry`` (the default one unless told otherwise) and, at each
scrape, reads the service's own counters: the Rust registry's per-kind
counters (``TaskRegistry.stats_by_kind()``), its shutdown report and its
loop-stall watchdog. It keeps no count of its own, so the numbers are the
ones ``ps``, ``stats`` and the shutdown report show.

Series (SPEC section 9; ``kind`` is the ``TaskKind`` variant's name, e.g.
``BackgroundLoop``; ``origin`` is ``python`` or ``native``):

- ``dig_service_tasks_live{kind,origin}`` (gauge): tasks live now.
- ``dig_service_tasks_spawned_total{kind}`` (counter): tasks ever spawned.
- ``dig_service_tasks_failed_total{kind}`` (counter): tasks that failed.
- ``dig_service_task_restarts_total{kind}`` (counter): restarts of
  supervised tasks.
- ``dig_service_shutdown_phase_seconds{phase}`` (gauge): how long each phase
  of the shutdown took (``run``, ``join``, ``on_stop``, ``post_stop``), from
  the shutdown report; no sample until the service has one.
- ``dig_service_loop_lag_seconds`` (gauge): how far behind the event loop is
  (how late the watchdog's last heartbeat timer ran, or, during a stall, how
  overdue the next one is: a stall shows as a growing lag, and a scrape
  still answers while the loop is stuck). Measured by the loop-stall
  watchdog, so it has a sample only while one watches the service's loop:
  ``ServiceConfig(stall_warning=...)``, or the runner's ``--stall-warning``
  (on by default there). Its resolution is ``stall_warning / 4``.

A scrape may come from any thread (``prometheus_client``'s HTTP server runs
its own): every read is a native counter read or an attribute read, and no
hook, coroutine or lock of the service's loop is involved.

The runner serves these, with the default registry (so the process's own
metrics and any the service registers come along), on ``--metrics-addr
HOST:PORT``: see ``MetricsServer``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

try:
    from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised without the extra only
    raise ImportError(
        "dig_service.metrics needs prometheus-client: pip install 'dig-service[metrics]'"
    ) from exc

from ._control import kind_name, shutdown_report

if TYPE_CHECKING:
    from ._service import Service

__all__ = ["MetricsServer", "ServiceCollector"]


class ServiceCollector(Collector):
    """A ``prometheus_client`` collector of one ``Service``'s counters.

    ``ServiceCollector(service)`` registers itself into ``registry`` (the
    default ``prometheus_client.REGISTRY``); ``registry=None`` registers it
    nowhere (``registry.register(collector)`` later). It holds the service
    (not a copy of any number) and may be scraped before, while and after
    the service runs.

    Raises:
        TypeError: ``service`` is not a ``dig_service.Service``, or
            ``registry`` is not a ``CollectorRegistry`` (or ``None``).
        ValueError: ``registry`` already has a collector with these series
            (``prometheus_client``'s "Duplicated timeseries"): one service a
            registry.
    """

    def __init__(
        self,
        service: Service[Any, Any, Any],
        *,
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        from ._service import Service

        if not isinstance(service, Service):
            raise TypeError(
                "ServiceCollector(): `service` must be a dig_service.Service, "
                f"got {type(service).__name__}"
            )
        if registry is not None and not isinstance(registry, CollectorRegistry):
            raise TypeError(
                "ServiceCollector(): `registry` must be a prometheus_client.CollectorRegistry "
                f"or None, got {type(registry).__name__}"
            )
        self._service = service
        if registry is not None:
            registry.register(self)

    def describe(self) -> Iterable[Metric]:
        """The metric families, without samples (so ``register`` checks names only)."""
        return _families()

    def collect(self) -> Iterable[Metric]:
        """The families with one sample per label set, read from the service now."""
        service = self._service
        (live, spawned, failed, restarts, phases, lag) = _families()
        per_kind: dict[str, list[int]] = {}  # every kind: stats_by_kind lists them all
        for stats in service.tasks.stats_by_kind():
            kind = kind_name(stats.kind)
            live.add_metric([kind, stats.origin], stats.live)
            totals = per_kind.setdefault(kind, [0, 0, 0])
            totals[0] += stats.spawned
            totals[1] += stats.failed
            totals[2] += stats.restarted
        for kind, (n_spawned, n_failed, n_restarts) in per_kind.items():
            spawned.add_metric([kind], n_spawned)
            failed.add_metric([kind], n_failed)
            restarts.add_metric([kind], n_restarts)
        report = shutdown_report(service._slot.outcome())
        if report is not None:
            for phase in report.phases:
                phases.add_metric([phase.name], phase.duration)
        watch = service._loop_watch
        if watch is not None and watch.is_running():
            lag.add_metric([], watch.lag)
        return (live, spawned, failed, restarts, phases, lag)


def _families() -> tuple[
    GaugeMetricFamily,
    CounterMetricFamily,
    CounterMetricFamily,
    CounterMetricFamily,
    GaugeMetricFamily,
    GaugeMetricFamily,
]:
    return (
        GaugeMetricFamily(
            "dig_service_tasks_live",
            "Tracked tasks live now, by kind and origin (python or native).",
            labels=["kind", "origin"],
        ),
        CounterMetricFamily(
            "dig_service_tasks_spawned",
            "Tracked tasks ever spawned, by kind.",
            labels=["kind"],
        ),
        CounterMetricFamily(
            "dig_service_tasks_failed",
            "Tracked tasks that failed, by kind.",
            labels=["kind"],
        ),
        CounterMetricFamily(
            "dig_service_task_restarts",
            "Restarts of supervised tasks, by kind.",
            labels=["kind"],
        ),
        GaugeMetricFamily(
            "dig_service_shutdown_phase_seconds",
            "How long each phase of the service's shutdown took (from its shutdown report).",
            labels=["phase"],
        ),
        GaugeMetricFamily(
            "dig_service_loop_lag_seconds",
            "How far behind the event loop is, measured by the loop-stall watchdog.",
        ),
    )


# --------------------------------------------------------------------------- the server


REQUEST_TIMEOUT: Final = 10.0
"""Seconds a scrape connection may take to send its request and read the answer."""
POLL_INTERVAL: Final = 0.2
"""How often the serving thread checks whether to stop: ``close()`` waits up to this."""


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a scrape every few seconds is not worth a line on stderr."""


class _Server(ThreadingMixIn, WSGIServer):
    """One thread a scrape (a slow client never holds another); ``server_close()``
    ends the open connections and waits for their threads."""

    daemon_threads = False
    block_on_close = True
    # A restarted service gets its port back despite TIME_WAIT; not on Windows, where
    # SO_REUSEADDR would let it bind a port another process listens on.
    allow_reuse_address = os.name != "nt"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def end_connections(self) -> None:
        with self._open_lock:
            open_now = list(self._open)
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """``/metrics`` of a ``CollectorRegistry`` over HTTP, served by a thread of its own.

    ``MetricsServer(host, port, registry)`` binds at once (port 0: any free
    port; ``address`` says which); ``start()`` starts serving; ``close()``
    stops, ends the scrapes in flight and waits for every thread it started
    (idempotent). A scrape runs on its own thread, so it answers while the
    event loop is stuck (``dig_service_loop_lag_seconds`` then shows it).

    Raises:
        OSError: the address cannot be bound (in use, not local...).
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry = REGISTRY) -> None:
        family = _family_of(host, port)
        server_class = _Server6 if family == socket.AF_INET6 else _Server
        self._server = server_class((host, port), _Handler)
        self._server.set_app(make_wsgi_app(registry))
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Serve on a new (non-daemon) thread named ``dig-service-metrics``."""
        if self._thread is not None or self._closed:
            return
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL},
            name="dig-service-metrics",
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving, drop the scrapes in flight, wait for every thread."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
        self._server.end_connections()
        self._server.server_close()  # joins the scrape threads (block_on_close)


def _family_of(host: str, port: int) -> int:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return int(infos[0][0])
