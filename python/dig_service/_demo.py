"""The demo service ``python -m dig_service run`` runs when given no target.

It shows, in a few dozen log lines, what the scaffold does for a service:

- a **heartbeat** ``BackgroundLoop`` that logs the live task count every second;
- a few **simulated peer connections** (``PeerConnection`` tasks) that feed
  inbound messages to the ``PeerApi`` and, at shutdown, take a moment to say
  goodbye (so the shutdown display has something to show). They are
  *supervised* (``TaskRegistry.supervise``, transient): ``peer-0`` drops its
  connection once, a few seconds in, and is reconnected by its supervisor
  after a short backoff (the log shows the restart; SIGUSR1 its count);
- a periodic **Maintenance** task;
- a **native tokio task** (``origin == "native"``) tracked by the same registry;
- an **RpcApi** answering ``get_tasks`` (the live snapshot), ``healthz`` and
  ``stop_node`` (which requests a shutdown with ``ShutdownReason.RpcRequested()``).

It runs until told to stop: Ctrl-C / SIGTERM (a second one exits at once),
SIGHUP (reload), or ``stop_node``. SIGUSR1 logs the task snapshot.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import time
from typing import Any, ClassVar, Final

from ._config import ServiceConfig
from ._core import (
    Restart,
    RestartPolicy,
    ShutdownReason,
    ShutdownToken,
    TaskKind,
    spawn_native_sleeper,
)
from ._handle import ServiceHandle
from ._lifecycle import NodeLifecycle, PeerApi, RpcApi, RunContext, StartContext, StopContext
from ._service import Service
from ._wire import DisconnectReason, InboundMessage, JsonRpcError, PeerInfo

__all__ = ["DemoNode", "DemoPeerApi", "DemoRpcApi", "make_demo_service"]

logger: Final = logging.getLogger("dig_service.demo")

PEERS: Final = 3
HEARTBEAT_EVERY: Final = 1.0
MAINTENANCE_EVERY: Final = 5.0
MESSAGE_EVERY: Final = 2.5
DROP_AFTER: Final = 2
"""``peer-0``'s first connection drops after this many messages (a simulated reset)."""
PEER_POLICY: Final = RestartPolicy(
    Restart.Transient, max_restarts=5, within=60.0, backoff=1.0, max_backoff=30.0, critical=False
)
"""A peer connection that fails is reconnected (1 s, then 2 s, 4 s... with jitter); more
than 5 failures a minute and the node gives that peer up, without stopping the service."""


def _peer_id(i: int) -> bytes:
    return hashlib.sha256(f"demo-peer-{i}".encode()).digest()


class DemoPeerApi(PeerApi):
    """Counts what the simulated peers send."""

    def __init__(self) -> None:
        self.connected: dict[bytes, PeerInfo] = {}
        self.messages = 0

    async def on_peer_connected(self, peer: bytes, info: PeerInfo) -> None:
        self.connected[peer] = info
        logger.info("peer %s connected from %s", peer.hex()[:8], info.remote_addr)

    async def on_message(self, peer: bytes, msg: InboundMessage) -> None:
        self.messages += 1
        logger.debug(
            "peer %s sent opcode %d (%d bytes)", peer.hex()[:8], msg.opcode, len(msg.payload)
        )

    async def on_peer_disconnected(self, peer: bytes, reason: DisconnectReason) -> None:
        self.connected.pop(peer, None)
        logger.info("peer %s disconnected: %s", peer.hex()[:8], reason)


class DemoRpcApi(RpcApi):
    """``get_tasks``, ``stop_node`` and ``healthz`` over the service's handle."""

    def __init__(self) -> None:
        self._handle: ServiceHandle | None = None

    def bind(self, handle: ServiceHandle) -> None:
        self._handle = handle

    def _need_handle(self) -> ServiceHandle:
        if self._handle is None:
            raise JsonRpcError(-32000, "the demo RPC API is not bound to a service")
        return self._handle

    async def dispatch(self, method: str, params: object) -> object:
        handle = self._need_handle()
        if method == "get_tasks":
            now = time.monotonic()
            return [
                {
                    "name": s.name,
                    "kind": str(s.kind).rpartition(".")[2],
                    "origin": s.origin,
                    "age": round(now - s.spawned_at, 3),
                }
                for s in sorted(handle.tasks(), key=lambda s: s.spawned_at)
            ]
        if method == "stop_node":
            logger.info("stop_node called over RPC: shutting down")
            handle.request_shutdown(ShutdownReason.RpcRequested())
            return {"stopping": True}
        return await super().dispatch(method, params)

    async def healthz(self) -> None:
        if self._need_handle().shutdown_token().is_cancelled():
            raise JsonRpcError(-32000, "shutting down")


class DemoNode(NodeLifecycle):
    """A node with the background work a real DIG node has, simulated."""

    NAME: ClassVar[str | None] = "demo"

    def __init__(self, peer_api: DemoPeerApi | None = None, peers: int = PEERS) -> None:
        self.peer_api = peer_api if peer_api is not None else DemoPeerApi()
        self.peers = peers
        self.beats = 0
        self.connections = 0

    async def pre_start(self, ctx: StartContext) -> None:
        logger.info("demo: opening the (imaginary) store")

    async def on_start(self, ctx: StartContext) -> None:
        for i in range(self.peers):
            ctx.tasks.supervise(
                f"peer-{i}",
                TaskKind.PeerConnection,
                functools.partial(self._peer, i, ctx.shutdown),
                policy=PEER_POLICY,
            )
        ctx.tasks.spawn("maintenance", TaskKind.Maintenance, self._maintenance(ctx.shutdown))
        spawn_native_sleeper(ctx.tasks, "native-sync", 24 * 3600.0, honor_shutdown=True)
        logger.info(
            "demo running (pid %d): Ctrl-C or `kill -TERM %d` stops it, a second one exits at "
            "once; `kill -USR1 %d` lists its tasks; `kill -HUP %d` asks for a reload",
            os.getpid(),
            os.getpid(),
            os.getpid(),
            os.getpid(),
        )

    async def run(self, ctx: RunContext) -> None:
        ctx.tasks.spawn("heartbeat", TaskKind.BackgroundLoop, self._heartbeat(ctx))
        await ctx.shutdown.cancelled()

    async def on_stop(self, ctx: StopContext) -> None:
        logger.info(
            "demo: flushing the store (%d heartbeats, %d peer messages)",
            self.beats,
            self.peer_api.messages,
        )

    async def post_stop(self, ctx: StopContext) -> None:
        logger.info("demo: store closed")

    async def _heartbeat(self, ctx: RunContext) -> None:
        while not ctx.shutdown.is_cancelled():
            self.beats += 1
            live = ctx.tasks.snapshot()
            native = sum(1 for s in live if s.origin == "native")
            logger.info(
                "heartbeat #%d: %d live task(s) (%d native), %d peer(s) connected",
                self.beats,
                len(live),
                native,
                len(self.peer_api.connected),
            )
            await _sleep_or_shutdown(HEARTBEAT_EVERY, ctx.shutdown)

    async def _peer(self, i: int, shutdown: ShutdownToken) -> None:
        """One connection to peer ``i`` (an incarnation of the supervised ``peer-i``)."""
        peer = _peer_id(i)
        self.connections += 1
        first = self.connections <= self.peers
        await self.peer_api.on_peer_connected(
            peer, PeerInfo(peer, f"203.0.113.{10 + i}:9444", "full_node")
        )
        opcode = 0
        while not await _sleep_or_shutdown(MESSAGE_EVERY + i * 0.3, shutdown):
            opcode = (opcode + 1) % 256
            await self.peer_api.on_message(peer, InboundMessage(opcode, os.urandom(16)))
            if i == 0 and first and opcode == DROP_AFTER:
                reason = "connection reset by peer (simulated)"
                await self.peer_api.on_peer_disconnected(peer, DisconnectReason.Transport(reason))
                raise ConnectionResetError(reason)
        # A polite goodbye takes a moment: the shutdown display shows it.
        await asyncio.sleep(0.2 + 0.2 * i)
        await self.peer_api.on_peer_disconnected(peer, DisconnectReason.LocalClose())

    async def _maintenance(self, shutdown: ShutdownToken) -> None:
        rounds = 0
        while not await _sleep_or_shutdown(MAINTENANCE_EVERY, shutdown):
            rounds += 1
            logger.info("maintenance #%d: compacting the store", rounds)


async def _sleep_or_shutdown(seconds: float, shutdown: ShutdownToken) -> bool:
    """Sleep ``seconds``; ``True`` (at once) if the token fired meanwhile."""
    if shutdown.is_cancelled():
        return True
    waiter: asyncio.Future[Any] = asyncio.ensure_future(shutdown.cancelled())
    try:
        await asyncio.wait((waiter,), timeout=seconds)
    finally:
        if not waiter.done():
            waiter.cancel()
    return shutdown.is_cancelled()


def make_demo_service(
    config: ServiceConfig | None = None,
) -> Service[DemoNode, DemoPeerApi, DemoRpcApi]:
    """The demo service: ``DemoNode`` with its peer and RPC APIs, wired together."""
    peer_api = DemoPeerApi()
    rpc_api = DemoRpcApi()
    service = Service(DemoNode(peer_api), peer_api, rpc_api, config=config)
    rpc_api.bind(service.handle())
    return service
