//! A scriptable node shared by the integration tests.
//!
//! Each hook of [`ScriptNode`] does what its [`Act`] says; every hook
//! entry and exit is appended to an observable log (a `watch` channel, so
//! a test can *wait* for "run has been entered" instead of sleeping).

// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use std::future::pending;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use dig_service::{
    ExitReason, NodeLifecycle, RunContext, ServiceHandle, StartContext, StopContext, TaskKind,
};
use parking_lot::Mutex;
use tokio::sync::watch;

/// The typed error every injected failure carries (wrapped in context),
/// so tests can prove the original error survives as the source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{hook} failure injected")]
pub struct HookError {
    pub hook: &'static str,
}

/// What an edge hook does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Act {
    #[default]
    Ok,
    /// Return `Err(HookError)` wrapped in an anyhow context layer.
    Fail,
    Panic,
    /// Never return.
    Hang,
}

/// What `run` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunAct {
    /// Wait for the shutdown token, then return `Ok`.
    #[default]
    UntilShutdown,
    /// Return `Ok` at once.
    Return,
    Fail,
    Panic,
    /// Never return, shutdown or not.
    IgnoreShutdown,
}

#[derive(Debug, Clone, Default)]
pub struct Script {
    pub pre_start: Act,
    pub on_start: Act,
    pub run: RunAct,
    pub on_stop: Act,
    pub post_stop: Act,
    /// Background loops spawned in `pre_start` (before it acts), named
    /// `worker-<i>`; each waits for the token and logs `worker_exit`.
    pub workers: usize,
    /// Also spawn one task named `stuck` that ignores the token.
    pub stuck_worker: bool,
}

/// What a test can observe of a `ScriptNode`.
pub struct Probe {
    log: watch::Sender<Vec<String>>,
    /// The exit reasons `on_stop` / `post_stop` were handed, in order.
    pub stop_reasons: Mutex<Vec<ExitReason>>,
    /// Set by the test so hooks can look at the handle.
    pub handle: OnceLock<ServiceHandle>,
    /// `handle.is_running()` as seen from inside `on_stop`.
    pub running_in_on_stop: Mutex<Option<bool>>,
}

impl Probe {
    pub fn push(&self, entry: impl Into<String>) {
        let entry = entry.into();
        self.log.send_modify(|log| log.push(entry));
    }

    pub fn log(&self) -> Vec<String> {
        self.log.borrow().clone()
    }

    /// The log without the `worker_exit` lines.
    pub fn hooks(&self) -> Vec<String> {
        self.log()
            .into_iter()
            .filter(|e| e != "worker_exit")
            .collect()
    }

    /// Wait until `entry` has been logged.
    pub async fn reached(&self, entry: &str) {
        self.log
            .subscribe()
            .wait_for(|log| log.iter().any(|e| e == entry))
            .await
            .expect("probe alive");
    }

    pub fn position(&self, entry: &str) -> Option<usize> {
        self.log().iter().position(|e| e == entry)
    }
}

pub struct ScriptNode {
    pub script: Script,
    pub probe: Arc<Probe>,
}

impl ScriptNode {
    pub fn new(script: Script) -> (Self, Arc<Probe>) {
        let probe = Arc::new(Probe {
            log: watch::Sender::new(Vec::new()),
            stop_reasons: Mutex::new(Vec::new()),
            handle: OnceLock::new(),
            running_in_on_stop: Mutex::new(None),
        });
        (
            Self {
                script,
                probe: probe.clone(),
            },
            probe,
        )
    }

    async fn act(&self, hook: &'static str, act: Act) -> anyhow::Result<()> {
        self.probe.push(hook);
        match act {
            Act::Ok => Ok(()),
            Act::Fail => Err(injected(hook)),
            Act::Panic => panic!("{hook} exploded"),
            Act::Hang => pending().await,
        }
    }
}

pub fn injected(hook: &'static str) -> anyhow::Error {
    anyhow::Error::new(HookError { hook }).context(format!("{hook} context"))
}

#[async_trait]
impl NodeLifecycle for ScriptNode {
    const NAME: Option<&'static str> = Some("script");

    async fn pre_start(&self, ctx: &StartContext<'_>) -> anyhow::Result<()> {
        for i in 0..self.script.workers {
            let token = ctx.shutdown.clone();
            let probe = self.probe.clone();
            ctx.tasks.spawn(
                format!("worker-{i}"),
                TaskKind::BackgroundLoop,
                async move {
                    token.cancelled().await;
                    probe.push("worker_exit");
                    Ok(())
                },
            )?;
        }
        if self.script.stuck_worker {
            ctx.tasks.spawn("stuck", TaskKind::BackgroundLoop, async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            })?;
        }
        self.act("pre_start", self.script.pre_start).await
    }

    async fn on_start(&self, _ctx: &StartContext<'_>) -> anyhow::Result<()> {
        self.act("on_start", self.script.on_start).await
    }

    async fn run(&self, ctx: RunContext) -> anyhow::Result<()> {
        self.probe.push("run");
        match self.script.run {
            RunAct::UntilShutdown => ctx.shutdown.cancelled().await,
            RunAct::Return => {}
            RunAct::Fail => return Err(injected("run")),
            RunAct::Panic => panic!("run exploded"),
            RunAct::IgnoreShutdown => pending().await,
        }
        self.probe.push("run_exit");
        Ok(())
    }

    async fn on_stop(&self, ctx: &StopContext<'_>) -> anyhow::Result<()> {
        self.probe.stop_reasons.lock().push(ctx.exit_reason.clone());
        if let Some(h) = self.probe.handle.get() {
            *self.probe.running_in_on_stop.lock() = Some(h.is_running());
        }
        self.act("on_stop", self.script.on_stop).await
    }

    async fn post_stop(&self, ctx: &StopContext<'_>) -> anyhow::Result<()> {
        self.probe.stop_reasons.lock().push(ctx.exit_reason.clone());
        self.act("post_stop", self.script.post_stop).await
    }
}

/// Whether any error in `err`'s source chain is the `HookError` of `hook`.
pub fn chain_has_hook_error(err: &(dyn std::error::Error + 'static), hook: &str) -> bool {
    std::iter::successors(Some(err), |e| e.source()).any(|e| {
        e.downcast_ref::<HookError>()
            .is_some_and(|h| h.hook == hook)
    })
}

/// Strings for comparing logs.
pub fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}
