//! The values a peer API and an RPC API exchange: [`PeerId`], [`PeerInfo`],
//! [`InboundMessage`], [`DisconnectReason`] and [`JsonRpcError`].
//!
//! Guarantees:
//! - **Plain values.** Each is `Clone`, compares by value and holds no
//!   reference into a service.
//! - **A real error.** [`JsonRpcError`] is a `std::error::Error`: it goes
//!   through `anyhow` (`?` in a handler) and downcasts back with its code.

use std::fmt;

/// A stable peer identifier, typically `SHA256(remote cert pubkey)`.
pub type PeerId = [u8; 32];

/// Peer metadata known once the handshake succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerInfo {
    /// The peer's identifier.
    pub peer_id: PeerId,
    /// The remote `"ip:port"`.
    pub remote_addr: String,
    /// The node type the peer declared (for logs).
    pub node_type: String,
}

/// A raw inbound peer-protocol message. Decoding the opcode is the
/// business of the concrete binary.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InboundMessage {
    /// The message opcode.
    pub opcode: u8,
    /// The raw payload.
    pub payload: Vec<u8>,
}

/// Why a peer disconnected.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DisconnectReason {
    /// The peer closed the connection cleanly.
    Graceful,
    /// The local side closed it (shutdown, eviction).
    LocalClose,
    /// The transport failed; the message says how.
    Transport(String),
    /// The peer broke the protocol (and was banned); the message says how.
    ProtocolViolation(String),
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Graceful => f.write_str("graceful"),
            Self::LocalClose => f.write_str("local close"),
            Self::Transport(m) => write!(f, "transport error: {m}"),
            Self::ProtocolViolation(m) => write!(f, "protocol violation: {m}"),
        }
    }
}

/// A JSON-RPC 2.0 error object, as returned by
/// [`RpcApi::dispatch`](crate::RpcApi::dispatch).
#[derive(Debug, Clone, PartialEq)]
pub struct JsonRpcError {
    /// The JSON-RPC error code (−32601 is "method not found").
    pub code: i64,
    /// A short human-readable description.
    pub message: String,
    /// Optional structured details.
    pub data: Option<serde_json::Value>,
}

impl JsonRpcError {
    /// The JSON-RPC code for "method not found".
    pub const METHOD_NOT_FOUND: i64 = -32601;

    /// An error with `code` and `message` and no data.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }

    /// The "method not found" error (code −32601) for `method`.
    pub fn method_not_found(method: &str) -> Self {
        Self::new(
            Self::METHOD_NOT_FOUND,
            format!("method not found: {method:?}"),
        )
    }
}

impl fmt::Display for JsonRpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JSON-RPC error {}: {}", self.code, self.message)
    }
}

impl std::error::Error for JsonRpcError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// **Proves:** `JsonRpcError` is a real `std::error::Error` that can be
    /// carried through `anyhow` and downcast back.
    ///
    /// **Why it matters:** RPC handlers use `?` to lift these into
    /// `anyhow::Error`; the server must recover the code.
    ///
    /// **Catches:** a missing `Error` impl or a lossy conversion.
    #[test]
    fn json_rpc_error_round_trips_through_anyhow() {
        let e = JsonRpcError {
            code: -32000,
            message: "busy".into(),
            data: Some(serde_json::json!({"retry_after": 1})),
        };
        let any = anyhow::Error::new(e.clone());
        assert_eq!(any.downcast_ref::<JsonRpcError>(), Some(&e));
        assert_eq!(e.to_string(), "JSON-RPC error -32000: busy");
    }
}
