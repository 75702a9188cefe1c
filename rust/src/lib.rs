//! # dig-service
//!
//! The service scaffold every DIG Network process stands on: a node with
//! five lifecycle hooks, optional peer and RPC APIs, ordered start-up and
//! shut-down, a registry of named background tasks joined under a deadline,
//! a broadcast [`ShutdownToken`] with a typed [`ShutdownReason`], a
//! [`ServiceHandle`] usable from anywhere, and an [`ExitStatus`] an
//! operator can trust.
//!
//! The same core backs the Python package `dig_service` (feature `python`):
//! asyncio tasks are tracked by the same [`TaskRegistry`] as tokio tasks,
//! under one token and one deadline.
//!
//! ## Lifecycle
//!
//! ```text
//! pre_start → on_start → run ─┬→ cancel token → join tasks → on_stop → post_stop
//!                              └ from the token firing, one budget (shutdown_deadline):
//!                                run + join share deadline - stop_reserve,
//!                                the stop hooks get the rest (>= stop_reserve)
//! ```
//!
//! ## Feature flags
//!
//! | flag | effect |
//! |---|---|
//! | `testing` | ships `testing::TestNode` |
//! | `python` | the PyO3 bindings (`dig_service._core`) |
//! | `abi3` | `python`, built against the stable ABI (CPython >= 3.11) |

#![warn(missing_docs)]

mod config;
mod error;
mod exit;
mod handle;
mod report;
mod service;
mod shutdown;
mod tasks;
mod traits;
mod wire;

#[cfg(feature = "testing")]
pub mod testing;

#[cfg(feature = "python")]
pub mod python;

pub use tokio::task::JoinHandle;
pub use tokio_util::sync::CancellationToken;

pub use config::ServiceConfig;
pub use error::{HookTimeout, Result, ServiceError, NAMES_SHOWN};
pub use exit::{ExitReason, ExitStatus};
pub use handle::ServiceHandle;
pub use report::{
    PhaseOutcome, PhaseReport, ShutdownPhase, ShutdownReport, StragglerReport, MAX_STACKS,
};
pub use service::Service;
pub use shutdown::{OnCancelGuard, ShutdownReason, ShutdownToken};
pub use tasks::{
    ForeignTask, ForeignTaskId, KindStats, Restart, RestartPolicy, Straggler, Stragglers,
    SupervisedHandle, TaskFailure, TaskHandle, TaskKind, TaskName, TaskOrigin, TaskOutcome,
    TaskRegistry, TaskStats, TaskSummary,
};
pub use traits::{NodeLifecycle, PeerApi, RpcApi, RunContext, StartContext, StopContext};
pub use wire::{DisconnectReason, InboundMessage, JsonRpcError, PeerId, PeerInfo};
