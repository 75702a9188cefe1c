//! The traits a service author implements, and the contexts its hooks get.
//!
//! - [`NodeLifecycle`]: the business core with five lifecycle hooks. Every
//!   hook has a default (the four edge hooks do nothing; `run` waits for
//!   the shutdown token), so a node implements only what it needs.
//! - [`PeerApi`]: the peer-protocol dispatcher; every method defaults to a
//!   no-op and `()` implements it.
//! - [`RpcApi`]: the JSON-RPC dispatcher; `()` implements it by answering
//!   every method with [`JsonRpcError::method_not_found`] (code −32601).
//!
//! The contexts ([`StartContext`], [`RunContext`], [`StopContext`]) hand
//! each hook the service's shutdown token and task registry. What the
//! `Service` guarantees about *when* hooks run is documented on
//! `Service::start`.

use std::fmt;

use async_trait::async_trait;

use crate::exit::ExitReason;
use crate::shutdown::ShutdownToken;
use crate::tasks::TaskRegistry;
use crate::wire::{DisconnectReason, InboundMessage, JsonRpcError, PeerId, PeerInfo};

/// What `pre_start` and `on_start` receive.
pub struct StartContext<'a> {
    /// The service name (`N::NAME`, or `""` when the node declares none).
    pub name: &'static str,
    /// The service's shutdown token; clone it into background tasks.
    pub shutdown: ShutdownToken,
    /// The service's task registry; spawn background loops here so they
    /// are joined at shutdown.
    pub tasks: &'a TaskRegistry,
}

/// What `run` receives. Owns its registry handle, since spawning from
/// inside `run` (and from tasks `run` spawns) is the common case.
pub struct RunContext {
    /// The service's shutdown token; `run` returns once it fires.
    pub shutdown: ShutdownToken,
    /// The service's task registry.
    pub tasks: TaskRegistry,
}

/// What `on_stop` and `post_stop` receive.
pub struct StopContext<'a> {
    /// The service's shutdown token (already fired when `run` ran).
    pub shutdown: ShutdownToken,
    /// The service's task registry (joined and closed by now; for
    /// inspection).
    pub tasks: &'a TaskRegistry,
    /// Why the service is stopping.
    pub exit_reason: ExitReason,
}

impl fmt::Debug for StartContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StartContext")
            .field("name", &self.name)
            .field("shutdown", &self.shutdown)
            .field("tasks", self.tasks)
            .finish()
    }
}

impl fmt::Debug for RunContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunContext")
            .field("shutdown", &self.shutdown)
            .field("tasks", &self.tasks)
            .finish()
    }
}

impl fmt::Debug for StopContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StopContext")
            .field("shutdown", &self.shutdown)
            .field("tasks", self.tasks)
            .field("exit_reason", &self.exit_reason)
            .finish()
    }
}

/// The business core of a service: owns its state and exposes five hooks.
///
/// `Service::start` calls them in the order
/// `pre_start → on_start → run → on_stop → post_stop`; the full contract
/// (which hook runs after which failure, timeouts, panics) is on
/// `Service::start`. A hook that panics is treated as a hook that failed.
#[async_trait]
pub trait NodeLifecycle: Send + Sync + 'static {
    /// A static name for logs and `ServiceHandle::name`; `None` for none.
    const NAME: Option<&'static str> = None;

    /// Before the servers bind: open stores, replay journals.
    /// Default: nothing.
    async fn pre_start(&self, _ctx: &StartContext<'_>) -> anyhow::Result<()> {
        Ok(())
    }

    /// After the servers bind, before `run`: announce, warm caches.
    /// Default: nothing.
    async fn on_start(&self, _ctx: &StartContext<'_>) -> anyhow::Result<()> {
        Ok(())
    }

    /// The main loop. Return `Ok(())` when `ctx.shutdown` fires (or when
    /// the work is done), `Err` on a fatal error. Default: wait for the
    /// shutdown token.
    async fn run(&self, ctx: RunContext) -> anyhow::Result<()> {
        ctx.shutdown.cancelled().await;
        Ok(())
    }

    /// After `run` and the task join: flush stores, write snapshots.
    /// Its failure does not stop `post_stop`. Default: nothing.
    async fn on_stop(&self, _ctx: &StopContext<'_>) -> anyhow::Result<()> {
        Ok(())
    }

    /// The last hook: close stores, release locks. Also runs after a
    /// failed `on_start`. Default: nothing.
    async fn post_stop(&self, _ctx: &StopContext<'_>) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The peer-protocol dispatcher. Every method defaults to a no-op; `()`
/// implements it for services without a peer surface.
#[async_trait]
pub trait PeerApi: Send + Sync + 'static {
    /// An inbound message from a connected peer. Default: ignored.
    async fn on_message(&self, _peer: PeerId, _msg: InboundMessage) -> anyhow::Result<()> {
        Ok(())
    }

    /// A peer connected (after the handshake). Default: ignored.
    async fn on_peer_connected(&self, _peer: PeerId, _info: PeerInfo) {}

    /// A peer disconnected. Default: ignored.
    async fn on_peer_disconnected(&self, _peer: PeerId, _reason: DisconnectReason) {}
}

#[async_trait]
impl PeerApi for () {}

/// The JSON-RPC dispatcher; `()` implements it for services without RPC.
#[async_trait]
pub trait RpcApi: Send + Sync + 'static {
    /// Handle one request; `params` is the method's JSON payload.
    async fn dispatch(
        &self,
        method: &str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, JsonRpcError>;

    /// A health probe. Default: healthy.
    async fn healthz(&self) -> Result<(), JsonRpcError> {
        Ok(())
    }
}

#[async_trait]
impl RpcApi for () {
    /// Rejects every method with "method not found" (−32601).
    async fn dispatch(
        &self,
        method: &str,
        _params: serde_json::Value,
    ) -> Result<serde_json::Value, JsonRpcError> {
        Err(JsonRpcError::method_not_found(method))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// **Proves:** the `()` RPC API rejects every method with −32601 and
    /// reports healthy; the `()` peer API accepts everything.
    ///
    /// **Why it matters:** peer-only and RPC-only services plug `()` into
    /// the unused slot; it must answer per JSON-RPC, not panic or hang.
    ///
    /// **Catches:** a wrong error code, or a default that errors.
    #[tokio::test]
    async fn unit_apis_are_inert() {
        let err = ().dispatch("get_blocks", serde_json::json!([])).await;
        let err = err.unwrap_err();
        assert_eq!(err.code, -32601);
        assert_eq!(err.code, JsonRpcError::METHOD_NOT_FOUND);
        assert!(err.message.contains("get_blocks"), "{err}");
        assert!(err.data.is_none());
        assert!(().healthz().await.is_ok());

        let peer = [7u8; 32];
        let msg = InboundMessage {
            opcode: 1,
            payload: vec![1, 2],
        };
        assert!(().on_message(peer, msg).await.is_ok());
        ().on_peer_disconnected(peer, DisconnectReason::Transport("reset".into()))
            .await;
    }
}
