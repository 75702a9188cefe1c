"""Prometheus metrics in process (SPEC section 9, issue 16 point 3): ``ServiceCollector``
reads the core's counters (no count of its own), its series as scraped over HTTP from
``MetricsServer`` on loopback and parsed by prometheus-client's own text parser, the loop
lag during a stall, and the server's clean stop. The runner's ``--metrics-addr`` in a
real process is in ``test_control_process.py``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

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
from dig_service.metrics import MetricsServer, ServiceCollector
from dig_service.testing import spawn_native_sleeper

WAIT = 10.0
"""Upper bound for any single wait; a healthy run needs milliseconds."""

KINDS = ("BackgroundLoop", "PeerConnection", "RpcHandler", "Maintenance")
FAMILIES = {
    "dig_service_tasks_live": "gauge",
    "dig_service_tasks_spawned": "counter",
    "dig_service_tasks_failed": "counter",
    "dig_service_task_restarts": "counter",
    "dig_service_shutdown_phase_seconds": "gauge",
    "dig_service_loop_lag_seconds": "gauge",
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def _until_shutdown(ctx: StartContext) -> None:
    await ctx.shutdown.cancelled()


async def _fail_at_once() -> None:
    raise RuntimeError("boom (on purpose)")


class Mixed(NodeLifecycle):
    """Two Python BackgroundLoop tasks and a native PeerConnection task until shutdown,
    and one Python Maintenance task that fails at once (``ready`` once it has)."""

    NAME = "mixed"

    def __init__(self) -> None:
        self.ready = asyncio.Event()

    async def on_start(self, ctx: StartContext) -> None:
        ctx.tasks.spawn("loop-a", TaskKind.BackgroundLoop, _until_shutdown(ctx))
        ctx.tasks.spawn("loop-b", TaskKind.BackgroundLoop, _until_shutdown(ctx))
        spawn_native_sleeper(ctx.tasks, "peer", 3600.0, kind=TaskKind.PeerConnection)
        failing = ctx.tasks.spawn("flaky", TaskKind.Maintenance, _fail_at_once())
        with pytest.raises(RuntimeError, match="boom"):
            await failing

    async def run(self, ctx: RunContext) -> None:
        self.ready.set()
        await ctx.shutdown.cancelled()


@pytest.fixture
def served() -> Iterator[tuple[CollectorRegistry, MetricsServer]]:
    """A fresh registry served on 127.0.0.1 (a free port); the server closed afterwards."""
    registry = CollectorRegistry()
    server = MetricsServer("127.0.0.1", 0, registry)
    server.start()
    try:
        yield registry, server
    finally:
        server.close()


def scrape(server: MetricsServer) -> tuple[dict[str, str], Samples]:
    """GET /metrics over HTTP; the families' types and every sample, as prometheus parses them."""
    host, port = server.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=WAIT) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("dig_service_"):
            types[family.name] = family.type
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_series_are_the_core_counters_scraped_over_http(
    served: tuple[CollectorRegistry, MetricsServer],
) -> None:
    """Proves: ``/metrics`` scraped over HTTP parses with prometheus-client's parser and
    carries every SPEC series with the right type: ``tasks_live`` per kind and origin
    (all eight pairs), ``tasks_spawned_total``/``tasks_failed_total``/
    ``task_restarts_total`` per kind (all four), each equal to what
    ``TaskRegistry.stats_by_kind()`` says; no loop-lag sample without a watchdog and no
    phase sample before a shutdown report; after the shutdown the live gauges drop to 0
    while the totals stay, and each stage of the report has its duration as a phase
    sample.

    Catches: a collector that keeps its own count (it would miss the native task or the
    failure counted in Rust), labels that are not the variant names, a missing kind or
    origin, a lag sample invented without a watchdog."""
    registry, server = served
    node = Mixed()
    service: Service[Any, Any, Any] = Service(node)
    ServiceCollector(service, registry=registry)
    starting = asyncio.ensure_future(service.start())
    try:
        await asyncio.wait_for(node.ready.wait(), WAIT)
        types, samples = await asyncio.to_thread(scrape, server)
    finally:
        service.request_shutdown(ShutdownReason.UserRequested())
        status = await asyncio.wait_for(starting, WAIT)

    assert types == FAMILIES
    expected_live = {
        ("BackgroundLoop", "python"): 2,
        ("PeerConnection", "native"): 1,
    }
    for kind in KINDS:
        for origin in ("python", "native"):
            got = value(samples, "dig_service_tasks_live", kind=kind, origin=origin)
            assert got == expected_live.get((kind, origin), 0), (kind, origin)
    spawned = {"BackgroundLoop": 2, "PeerConnection": 1, "RpcHandler": 0, "Maintenance": 1}
    for kind in KINDS:
        assert value(samples, "dig_service_tasks_spawned_total", kind=kind) == spawned[kind]
        assert value(samples, "dig_service_tasks_failed_total", kind=kind) == (
            1 if kind == "Maintenance" else 0
        )
        assert value(samples, "dig_service_task_restarts_total", kind=kind) == 0
    assert not any(name == "dig_service_loop_lag_seconds" for name, _ in samples)
    assert not any(name == "dig_service_shutdown_phase_seconds" for name, _ in samples)

    # The same numbers as the core's own per-kind counters, now that it has stopped.
    _, after = await asyncio.to_thread(scrape, server)
    for stats in service.tasks.stats_by_kind():
        kind = str(stats.kind).rpartition(".")[2]
        assert stats.live == 0
        assert value(after, "dig_service_tasks_live", kind=kind, origin=stats.origin) == 0
    for kind in KINDS:
        total = sum(
            s.spawned
            for s in service.tasks.stats_by_kind()
            if str(s.kind).rpartition(".")[2] == kind
        )
        assert value(after, "dig_service_tasks_spawned_total", kind=kind) == total
        assert total == spawned[kind]
    # Now there is a shutdown report: one phase sample a stage, its duration there.
    assert status.report is not None
    assert [p.name for p in status.report.phases] == ["run", "join", "on_stop", "post_stop"]
    for phase in status.report.phases:
        got = value(after, "dig_service_shutdown_phase_seconds", phase=phase.name)
        assert got == phase.duration, phase


async def test_loop_lag_grows_during_a_stall_and_scrapes_still_answer(
    served: tuple[CollectorRegistry, MetricsServer],
) -> None:
    """Proves: with a watchdog (``stall_warning=0.05``), ``dig_service_loop_lag_seconds``
    is small while the loop turns; while a coroutine blocks the loop for 2 s, scrapes from
    another thread still answer and the lag they show reaches 0.3 s; once the watchdog is
    stopped (the service ended) the sample is gone.

    Catches: a lag measured on the loop itself (a stuck loop could not report it), a
    server that needs the loop, a lag that stays at the last beat's lateness during a
    stall, a stale lag after the watchdog stopped."""
    registry, server = served
    node = Mixed()
    service: Service[Any, Any, Any] = Service(node, config=ServiceConfig(stall_warning=0.05))
    ServiceCollector(service, registry=registry)
    starting = asyncio.ensure_future(service.start())
    blocking = threading.Event()
    unblocked = threading.Event()
    during: list[float] = []

    def watch_the_stall() -> None:
        assert blocking.wait(WAIT)
        while not unblocked.is_set():
            _, samples = scrape(server)
            lag = samples[("dig_service_loop_lag_seconds", ())]
            if not unblocked.is_set():
                during.append(lag)
            if lag >= 0.3:
                return

    try:
        await asyncio.wait_for(node.ready.wait(), WAIT)
        # Several beats so far: a turning loop is at most a fraction of a second late.
        _, idle = await asyncio.to_thread(scrape, server)
        assert 0 <= idle[("dig_service_loop_lag_seconds", ())] < 1.0
        watcher = threading.Thread(target=watch_the_stall)
        watcher.start()
        blocking.set()
        time.sleep(2.0)  # noqa: ASYNC251 - the stall under test: the loop is blocked
        unblocked.set()
        await asyncio.to_thread(watcher.join, WAIT)
    finally:
        service.request_shutdown(ShutdownReason.UserRequested())
        await asyncio.wait_for(starting, WAIT)
    assert during and max(during) >= 0.3, during
    _, after = await asyncio.to_thread(scrape, server)
    assert ("dig_service_loop_lag_seconds", ()) not in after


def test_collector_arguments_and_registration() -> None:
    """Proves: a non-Service or a non-registry is a ``TypeError`` naming the parameter;
    ``registry=None`` registers nowhere; a second collector of the same series in one
    registry is a ``ValueError`` (prometheus-client's duplicate check, through
    ``describe``), and the first stays registered.

    Catches: a collector that fails only at scrape time on bad input, or two services
    silently overwriting each other's series in one registry."""
    service: Service[Any, Any, Any] = Service(Mixed())
    with pytest.raises(TypeError, match="`service`"):
        ServiceCollector(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`registry`"):
        ServiceCollector(service, registry=object())  # type: ignore[arg-type]
    registry = CollectorRegistry()
    loose = ServiceCollector(service, registry=None)
    assert registry.get_sample_value("dig_service_tasks_spawned_total", {"kind": "RpcHandler"}) is (
        None
    )
    registry.register(loose)
    assert registry.get_sample_value("dig_service_tasks_spawned_total", {"kind": "RpcHandler"}) == 0
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        ServiceCollector(service, registry=registry)
    assert registry.get_sample_value(
        "dig_service_tasks_live", {"kind": "Maintenance", "origin": "native"}
    ) == (0)


def test_server_close_ends_a_scrape_in_flight_and_its_threads() -> None:
    """Proves: ``MetricsServer.close()`` returns promptly (well under the 10 s request
    timeout) even with a client that sent half a request and waits, and leaves no
    ``dig-service-metrics`` thread nor scrape thread behind; the port is released.

    Catches: a close that waits for a slow client's timeout (a stop delayed by a stuck
    scraper), daemon threads left running into interpreter exit."""
    before = set(threading.enumerate())
    server = MetricsServer("127.0.0.1", 0, CollectorRegistry())
    server.start()
    host, port = server.address
    slow = socket.create_connection((host, port), timeout=WAIT)
    try:
        slow.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        # The scrape's thread exists once the server accepted the connection.
        deadline = time.monotonic() + WAIT
        while len(set(threading.enumerate()) - before) < 2:
            assert time.monotonic() < deadline, "the server never took the connection"
            time.sleep(0.01)
        started = time.monotonic()
        server.close()
        took = time.monotonic() - started
    finally:
        slow.close()
    assert took < 5.0, took
    assert set(threading.enumerate()) - before == set()
    with socket.create_server((host, port)):  # free again
        pass


@pytest.mark.parametrize(
    ("text", "addr"),
    [
        ("9464", ("127.0.0.1", 9464)),
        (":9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9464", ("::1", 9464)),
    ],
)
def test_metrics_addr_forms(text: str, addr: tuple[str, int]) -> None:
    """Proves: ``--metrics-addr`` takes HOST:PORT, :PORT and PORT (host 127.0.0.1, the
    SPEC's default) and a bracketed IPv6 host.

    Catches: a default host that listens on every interface, a bracketed IPv6 host kept
    with its brackets."""
    args = build_parser().parse_args(["run", "--metrics-addr", text])
    assert args.metrics_addr == addr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("localhost", "must be HOST:PORT or PORT"),
        ("127.0.0.1:65536", "the port must be 0..65535"),
        ("::1:9464", "an IPv6 address goes in brackets"),
        ("", "must be HOST:PORT or PORT"),
    ],
)
def test_bad_metrics_addr_is_a_usage_error(
    text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Proves: a malformed ``--metrics-addr`` is a usage error (exit 2) whose message
    names the option and says what is expected.

    Catches: a traceback, or a bad port found only when binding."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["run", "--metrics-addr", text])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--metrics-addr" in err and message in err, err
