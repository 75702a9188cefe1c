//! Test helpers (feature `testing`).
//!
//! [`TestNode`] is a ready-made [`NodeLifecycle`] for exercising a
//! `Service` without writing a node: each hook can be told to fail, and
//! `run` either waits for the shutdown token or returns by itself after
//! [`TestNode::run_delay`]. Injected failures are plain `anyhow` errors
//! whose message names the hook (`"pre_start failure injected"`, ...).

use std::time::Duration;

use async_trait::async_trait;

use crate::traits::{NodeLifecycle, RunContext, StartContext, StopContext};

/// A minimal node with switchable failures. `TestNode::default()` never
/// fails and runs until shutdown.
#[derive(Debug, Clone, Default)]
pub struct TestNode {
    /// `pre_start` returns an error.
    pub fail_pre_start: bool,
    /// `on_start` returns an error.
    pub fail_on_start: bool,
    /// `run` returns an error at once instead of waiting.
    pub fail_run: bool,
    /// `on_stop` returns an error.
    pub fail_on_stop: bool,
    /// When non-zero, `run` returns `Ok(())` by itself after this long
    /// (unless shutdown comes first). Zero: wait for shutdown only.
    pub run_delay: Duration,
}

#[async_trait]
impl NodeLifecycle for TestNode {
    const NAME: Option<&'static str> = Some("test");

    async fn pre_start(&self, _ctx: &StartContext<'_>) -> anyhow::Result<()> {
        if self.fail_pre_start {
            anyhow::bail!("pre_start failure injected");
        }
        Ok(())
    }

    async fn on_start(&self, _ctx: &StartContext<'_>) -> anyhow::Result<()> {
        if self.fail_on_start {
            anyhow::bail!("on_start failure injected");
        }
        Ok(())
    }

    async fn run(&self, ctx: RunContext) -> anyhow::Result<()> {
        if self.fail_run {
            anyhow::bail!("run failure injected");
        }
        if self.run_delay.is_zero() {
            ctx.shutdown.cancelled().await;
        } else {
            tokio::select! {
                () = ctx.shutdown.cancelled() => {}
                () = tokio::time::sleep(self.run_delay) => {}
            }
        }
        Ok(())
    }

    async fn on_stop(&self, _ctx: &StopContext<'_>) -> anyhow::Result<()> {
        if self.fail_on_stop {
            anyhow::bail!("on_stop failure injected");
        }
        Ok(())
    }
}
