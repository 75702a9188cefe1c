//! The `start()` contract table, `contract/start.toml`, run against the Rust
//! [`Service`].
//!
//! Every row of the table is one test here, on the current-thread and on the
//! multi-thread runtime (`<row> [current_thread]`, `<row> [multi_thread]`);
//! `tests/test_contract.py` runs the same rows against the Python `Service`.
//! This file only translates the table's words (its header defines them)
//! into a node, a shutdown trigger and checks: what a row expects is written
//! in the table, never here, so the two implementations are held to one
//! contract. A custom harness (`libtest-mimic`) names each row as a test.

use std::error::Error as _;
use std::future::pending;
use std::pin::pin;
use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use dig_service::{
    ExitReason, ExitStatus, HookTimeout, NodeLifecycle, PhaseOutcome, RunContext, Service,
    ServiceConfig, ServiceError, ServiceHandle, ShutdownReason, ShutdownReport, ShutdownToken,
    StartContext, StopContext, TaskKind, TaskOrigin, TaskRegistry,
};
use libtest_mimic::{Arguments, Failed, Trial};
use serde::Deserialize;
use tokio::sync::watch;

const TABLE: &str = include_str!("../../contract/start.toml");
const HOOKS: [&str; 5] = ["pre_start", "on_start", "run", "on_stop", "post_stop"];

// ---------------------------------------------------------------------------
// The table, as read.

#[derive(Deserialize)]
struct Table {
    row: Vec<Row>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Row {
    name: String,
    #[allow(dead_code)] // documentation for the reader of the table
    spec: String,
    #[serde(default)]
    node: NodeSpec,
    #[serde(default)]
    shutdown: ShutdownSpec,
    #[serde(default)]
    config: ConfigSpec,
    expect: Expect,
    #[serde(default)]
    start_twice: bool,
    #[serde(default)]
    repeat: Option<u32>,
}

#[derive(Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct NodeSpec {
    pre_start: Option<String>,
    on_start: Option<String>,
    run: Option<String>,
    on_stop: Option<String>,
    post_stop: Option<String>,
    #[serde(default)]
    tasks: Vec<TaskSpec>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct TaskSpec {
    name: String,
    does: String,
    #[serde(default)]
    critical: bool,
    spawn_in: Option<String>,
}

#[derive(Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct ShutdownSpec {
    at: Option<String>,
    reason: Option<String>,
    from: Option<String>,
    via: Option<String>,
}

#[derive(Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct ConfigSpec {
    shutdown_deadline: Option<f64>,
    hook_timeout: Option<f64>,
    stop_reserve: Option<f64>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Expect {
    hooks: Vec<String>,
    result: String,
    exit: Option<String>,
    exit_code: Option<i32>,
    cause: Option<String>,
    pending: Option<Vec<String>>,
    token: Option<String>,
    stats: Option<Stats>,
    waited: Option<String>,
    finished: Option<Vec<String>>,
    elapsed: Option<Bounds>,
    report: Option<ReportSpec>,
}

#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
struct Bounds {
    min: f64,
    max: f64,
}

/// `expect.report`: `"none"` or a table.
#[derive(Deserialize, Clone, Debug)]
#[serde(untagged)]
enum ReportSpec {
    None(String),
    Some(ReportTable),
}

#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
struct ReportTable {
    phases: Option<std::collections::BTreeMap<String, String>>,
    stragglers: Option<Vec<String>>,
    #[serde(default)]
    stacks: bool,
    tasks_at_start: Option<usize>,
}

#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Stats {
    completed: u64,
    failed: u64,
    stopped: u64,
}

// ---------------------------------------------------------------------------
// The node.

/// The error a hook or a task returns when the table says `"fail"`.
#[derive(Debug, thiserror::Error)]
#[error("{0} failure injected")]
struct InjectedFailure(String);

fn reason_named(name: &str) -> ShutdownReason {
    match name {
        "UserRequested" => ShutdownReason::UserRequested,
        "RpcRequested" => ShutdownReason::RpcRequested,
        "ReloadRequested" => ShutdownReason::ReloadRequested,
        "RequestedByRun" => ShutdownReason::RequestedByRun,
        "Fatal" => ShutdownReason::Fatal("requested".into()),
        other => panic!("unknown reason {other:?} in the table"),
    }
}

fn reason_name(reason: &ShutdownReason) -> &'static str {
    match reason {
        ShutdownReason::UserRequested => "UserRequested",
        ShutdownReason::RpcRequested => "RpcRequested",
        ShutdownReason::ReloadRequested => "ReloadRequested",
        ShutdownReason::RequestedByRun => "RequestedByRun",
        ShutdownReason::Fatal(_) => "Fatal",
        other => panic!("a reason the table has no word for: {other:?}"),
    }
}

fn error_name(err: &ServiceError) -> &'static str {
    match err {
        ServiceError::PreStartFailed(..) => "PreStartFailed",
        ServiceError::OnStartFailed(..) => "OnStartFailed",
        ServiceError::RunFailed(..) => "RunFailed",
        ServiceError::OnStopFailed(..) => "OnStopFailed",
        ServiceError::ShutdownDeadlineExceeded { .. } => "ShutdownDeadlineExceeded",
        ServiceError::AlreadyRunning => "AlreadyRunning",
        ServiceError::AlreadyStopped => "AlreadyStopped",
        other => panic!("an error the table has no word for: {other:?}"),
    }
}

/// A node whose hooks and tasks do what a row's `[row.node]` says.
struct ContractNode {
    spec: NodeSpec,
    /// The hooks entered, in order; a `watch` so the driver can wait for one.
    calls: watch::Sender<Vec<String>>,
    /// The hooks that ran to their end (returned by themselves), in order.
    finished: std::sync::Mutex<Vec<String>>,
    handle: OnceLock<ServiceHandle>,
    /// The row's `shutdown.reason`, for the `run` acts that fire the token
    /// themselves.
    reason: ShutdownReason,
}

impl ContractNode {
    fn enter(&self, hook: &'static str, shutdown: &ShutdownToken, tasks: &TaskRegistry) {
        for task in &self.spec.tasks {
            if task.spawn_in.as_deref().unwrap_or("pre_start") == hook {
                spawn_task(tasks, task, shutdown.clone());
            }
        }
        self.calls.send_modify(|calls| calls.push(hook.to_owned()));
    }

    async fn act(&self, hook: &'static str, act: &Option<String>, shutdown: &ShutdownToken) {
        match act.as_deref().unwrap_or("ok") {
            "ok" => {}
            "hang" | "hang_shielded" => pending::<()>().await,
            "wait_shutdown" => shutdown.cancelled().await,
            sleep if sleep.starts_with("sleep:") => {
                let secs: f64 = sleep["sleep:".len()..].parse().expect("sleep:SECONDS");
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            }
            "fail" => unreachable!("handled by edge()"),
            other => panic!("unknown act {other:?} for {hook}"),
        }
    }

    async fn edge(
        &self,
        hook: &'static str,
        act: &Option<String>,
        shutdown: &ShutdownToken,
        tasks: &TaskRegistry,
    ) -> anyhow::Result<()> {
        self.enter(hook, shutdown, tasks);
        if act.as_deref() == Some("fail") {
            return Err(InjectedFailure(hook.to_owned()).into());
        }
        self.act(hook, act, shutdown).await;
        self.finish(hook);
        Ok(())
    }

    fn finish(&self, hook: &str) {
        self.finished.lock().unwrap().push(hook.to_owned());
    }
}

fn spawn_task(tasks: &TaskRegistry, task: &TaskSpec, shutdown: ShutdownToken) {
    let name = task.name.clone();
    let does = task.does.clone();
    let body = async move {
        match does.as_str() {
            "until_shutdown" => shutdown.cancelled().await,
            // A tokio task cannot refuse an abort: "shielded" is "ignore" here.
            "ignore_shutdown" | "ignore_shutdown_shielded" => pending::<()>().await,
            "fail" => return Err(InjectedFailure(format!("task {name}")).into()),
            "return" => {}
            other => panic!("unknown task behaviour {other:?}"),
        }
        Ok(())
    };
    if task.critical {
        tasks
            .spawn_critical(task.name.clone(), TaskKind::BackgroundLoop, body)
            .expect("spawn a critical task");
    } else {
        tasks
            .spawn(task.name.clone(), TaskKind::BackgroundLoop, body)
            .expect("spawn a task");
    }
}

#[async_trait]
impl NodeLifecycle for ContractNode {
    const NAME: Option<&'static str> = Some("contract");

    async fn pre_start(&self, ctx: &StartContext<'_>) -> anyhow::Result<()> {
        let act = &self.spec.pre_start;
        self.edge("pre_start", act, &ctx.shutdown, ctx.tasks).await
    }

    async fn on_start(&self, ctx: &StartContext<'_>) -> anyhow::Result<()> {
        let act = &self.spec.on_start;
        self.edge("on_start", act, &ctx.shutdown, ctx.tasks).await
    }

    async fn run(&self, ctx: RunContext) -> anyhow::Result<()> {
        self.enter("run", &ctx.shutdown, &ctx.tasks);
        match self.spec.run.as_deref().unwrap_or("until_shutdown") {
            "until_shutdown" => ctx.shutdown.cancelled().await,
            "return" => {}
            "fail" => return Err(InjectedFailure("run".into()).into()),
            "ignore_shutdown" | "ignore_shutdown_shielded" => pending::<()>().await,
            "race" => {
                let handle = self.handle.get().expect("handle set").clone();
                let reason = self.reason.clone();
                std::thread::spawn(move || handle.request_shutdown(reason));
            }
            "request_shutdown" => ctx.shutdown.cancel(self.reason.clone()),
            other => panic!("unknown run act {other:?}"),
        }
        self.finish("run");
        Ok(())
    }

    async fn on_stop(&self, ctx: &StopContext<'_>) -> anyhow::Result<()> {
        let act = &self.spec.on_stop;
        self.edge("on_stop", act, &ctx.shutdown, ctx.tasks).await
    }

    async fn post_stop(&self, ctx: &StopContext<'_>) -> anyhow::Result<()> {
        let act = &self.spec.post_stop;
        self.edge("post_stop", act, &ctx.shutdown, ctx.tasks).await
    }
}

// ---------------------------------------------------------------------------
// Playing a row.

/// What the caller of `start()` saw.
enum Outcome {
    Returned(dig_service::Result<ExitStatus>),
    /// The `start()` future was dropped (the row's `via = "cancel_start"`).
    Cancelled,
}

fn request(handle: &ServiceHandle, reason: ShutdownReason, from: &str) {
    match from {
        "loop" => handle.request_shutdown(reason),
        "thread" => {
            let handle = handle.clone();
            std::thread::spawn(move || handle.request_shutdown(reason))
                .join()
                .expect("the requesting thread");
        }
        other => panic!("unknown `from` {other:?}"),
    }
}

async fn play(row: &Row) -> Result<(), String> {
    let spec = &row.shutdown;
    let reason = reason_named(spec.reason.as_deref().unwrap_or("UserRequested"));
    let from = spec.from.as_deref().unwrap_or("loop");
    let cancel_start = match spec.via.as_deref().unwrap_or("request") {
        "request" => false,
        "cancel_start" => true,
        other => panic!("unknown `via` {other:?}"),
    };
    let mut config = ServiceConfig::new()
        .with_shutdown_deadline(Duration::from_secs_f64(
            row.config.shutdown_deadline.unwrap_or(5.0),
        ))
        .with_hook_timeout(row.config.hook_timeout.map(Duration::from_secs_f64));
    if let Some(reserve) = row.config.stop_reserve {
        config = config.with_stop_reserve(Duration::from_secs_f64(reserve));
    }
    let node = ContractNode {
        spec: row.node.clone(),
        calls: watch::Sender::new(Vec::new()),
        finished: std::sync::Mutex::new(Vec::new()),
        handle: OnceLock::new(),
        reason: reason.clone(),
    };
    let mut calls = node.calls.subscribe();
    let svc = Service::with_config(node, (), (), config);
    let handle = svc.handle();
    let _ = svc.node().handle.set(handle.clone());

    let mut requested_at = None;
    if spec.at.as_deref() == Some("before_start") {
        requested_at = Some(std::time::Instant::now());
        request(&handle, reason.clone(), from);
    }
    let outcome = {
        let mut start = pin!(svc.start());
        match spec.at.as_deref() {
            None | Some("before_start") => Outcome::Returned(start.await),
            Some(at) => {
                assert!(HOOKS.contains(&at), "unknown `at` {at:?}");
                let entered = calls.wait_for(|c| c.iter().any(|h| h == at));
                tokio::select! {
                    biased;
                    _ = entered => {}
                    res = &mut start => {
                        return Err(format!(
                            "the row requests shutdown in `{at}`, but start() returned first: {res:?}"
                        ));
                    }
                }
                requested_at = Some(std::time::Instant::now());
                if cancel_start {
                    Outcome::Cancelled // `start` is dropped at the end of this block
                } else {
                    request(&handle, reason.clone(), from);
                    Outcome::Returned(start.await)
                }
            }
        }
    };
    let elapsed = requested_at.map(|at| at.elapsed());
    check(row, &svc, outcome, elapsed).await
}

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

async fn check(
    row: &Row,
    svc: &Service<ContractNode, (), ()>,
    outcome: Outcome,
    elapsed: Option<Duration>,
) -> Result<(), String> {
    let expect = &row.expect;
    let (status, error) = match (expect.result.as_str(), outcome) {
        ("cancelled", Outcome::Cancelled) => {
            // What the service recorded as it wound down, after the drop.
            match svc.wait_for_exit().await {
                Ok(status) => {
                    ensure!(
                        expect.waited.is_none(),
                        "wait_for_exit() returned {status}, the row expects {:?}",
                        expect.waited
                    );
                    (Some(status), None)
                }
                Err(err) => {
                    ensure!(
                        expect.waited.as_deref() == Some(error_name(&err)),
                        "wait_for_exit(): {err:?}, the row expects {:?}",
                        expect.waited
                    );
                    (None, Some(err))
                }
            }
        }
        ("cancelled", Outcome::Returned(res)) => {
            return Err(format!("start() was not cancelled: {res:?}"))
        }
        (_, Outcome::Cancelled) => unreachable!("only `via = \"cancel_start\"` drops start()"),
        ("ok" | "AlreadyRunning", Outcome::Returned(Ok(status))) => (Some(status), None),
        ("ok" | "AlreadyRunning", Outcome::Returned(Err(err))) => {
            return Err(format!("start() failed: {err:?}"))
        }
        (name, Outcome::Returned(Ok(status))) => {
            return Err(format!("start() returned {status}, the row expects {name}"))
        }
        (name, Outcome::Returned(Err(err))) => {
            ensure!(
                error_name(&err) == name,
                "start() failed with {err:?}, expected {name}"
            );
            (None, Some(err))
        }
    };

    let calls = svc.node().calls.borrow().clone();
    ensure!(
        calls == expect.hooks,
        "hooks run: {calls:?}, expected {:?}",
        expect.hooks
    );

    if expect.result == "AlreadyRunning" {
        let again = svc.start().await;
        ensure!(
            matches!(again, Err(ServiceError::AlreadyRunning)),
            "a second start() gave {again:?}"
        );
        return Ok(());
    }
    ensure!(!row.start_twice, "start_twice rows expect AlreadyRunning");

    if let Some(want) = &expect.finished {
        let finished = svc.node().finished.lock().unwrap().clone();
        ensure!(
            &finished == want,
            "hooks that ran to their end: {finished:?}, expected {want:?}"
        );
    }
    if let Some(bounds) = &expect.elapsed {
        let took = elapsed
            .ok_or("the row expects a time but requests no shutdown")?
            .as_secs_f64();
        ensure!(
            bounds.min <= took && took <= bounds.max,
            "{took:.3}s from the request to start() returning, expected {bounds:?}"
        );
    }
    if let Some(want) = &expect.report {
        let report = status
            .as_ref()
            .and_then(ExitStatus::report)
            .or_else(|| error.as_ref().and_then(ServiceError::report));
        check_report(want, report)?;
    }

    let token_reason = svc.shutdown_token().reason();
    if let Some(word) = &expect.exit {
        let status = status.as_ref().ok_or("the row expects an exit status")?;
        check_exit(word, status, token_reason.as_ref())?;
    }
    if let Some(code) = expect.exit_code {
        let status = status.as_ref().ok_or("the row expects an exit status")?;
        ensure!(
            status.exit_code() == code,
            "exit code {}",
            status.exit_code()
        );
    }
    if let Some(word) = &expect.cause {
        let err = error.as_ref().ok_or("the row expects an error")?;
        check_cause(word, err)?;
    }
    if let Some(names) = &expect.pending {
        match &error {
            Some(ServiceError::ShutdownDeadlineExceeded {
                pending,
                pending_names,
                ..
            }) => {
                ensure!(pending_names == names, "pending {pending_names:?}");
                ensure!(*pending == names.len(), "pending count {pending}");
            }
            other => return Err(format!("expected ShutdownDeadlineExceeded, got {other:?}")),
        }
    }
    if let Some(word) = &expect.token {
        let reason = token_reason.as_ref().ok_or("the token has not fired")?;
        ensure!(reason_name(reason) == word, "token reason {reason:?}");
    }
    // A native straggler stops at its next poll, on a worker: its end (and
    // its count) lands just after `start()` returned.
    let tasks = svc.tasks();
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while !tasks.is_empty() && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    ensure!(tasks.is_empty(), "tasks still live: {:?}", tasks.snapshot());
    ensure!(tasks.is_closed(), "the registry is not closed");
    if let Some(want) = &expect.stats {
        let s = tasks.stats();
        let seen = Stats {
            completed: s.completed,
            failed: s.failed,
            stopped: s.cancelled + s.aborted,
        };
        ensure!(&seen == want, "task stats {seen:?}, expected {want:?}");
    }
    Ok(())
}

fn check_report(want: &ReportSpec, report: Option<&ShutdownReport>) -> Result<(), String> {
    let want = match want {
        ReportSpec::None(word) => {
            assert_eq!(word, "none", "a report word of the table");
            ensure!(
                report.is_none(),
                "a report where none was expected: {report:?}"
            );
            return Ok(());
        }
        ReportSpec::Some(table) => table,
    };
    let report = report.ok_or("no report")?;
    let names: Vec<&str> = report.phases.iter().map(|p| p.name.as_str()).collect();
    ensure!(
        names == ["run", "join", "on_stop", "post_stop"],
        "phases {names:?}"
    );
    for p in &report.phases {
        ensure!(
            p.outcome != PhaseOutcome::Skipped || p.duration.is_zero(),
            "a skipped phase with a duration: {p:?}"
        );
    }
    if let Some(phases) = &want.phases {
        for p in &report.phases {
            let want = phases.get(p.name.as_str()).map(String::as_str);
            ensure!(
                want == Some(p.outcome.as_str()),
                "phase {} was {}, expected {want:?}\n{report}",
                p.name,
                p.outcome
            );
        }
    }
    if let Some(names) = &want.stragglers {
        let seen: Vec<&str> = report.stragglers.iter().map(|s| s.name.as_str()).collect();
        ensure!(&seen == names, "stragglers {seen:?}, expected {names:?}");
    }
    if want.stacks {
        for s in &report.stragglers {
            ensure!(
                s.origin == TaskOrigin::Native && s.stack.is_none(),
                "a native straggler with a stack (or not native): {s:?}"
            );
        }
    }
    if let Some(n) = want.tasks_at_start {
        ensure!(
            report.tasks_at_start == n,
            "tasks_at_start {}, expected {n}",
            report.tasks_at_start
        );
    }
    Ok(())
}

fn check_exit(
    word: &str,
    status: &ExitStatus,
    token: Option<&ShutdownReason>,
) -> Result<(), String> {
    let ok = match (word, &status.reason) {
        ("consistent", reason) => match (token, reason) {
            (Some(ShutdownReason::RequestedByRun), ExitReason::RunCompleted) => true,
            (Some(won), ExitReason::RequestedShutdown(r)) => {
                r == won && *won != ShutdownReason::RequestedByRun
            }
            _ => false,
        },
        ("RunCompleted", ExitReason::RunCompleted) => true,
        (word, ExitReason::RequestedShutdown(reason)) => {
            word.strip_prefix("RequestedShutdown(")
                .and_then(|w| w.strip_suffix(')'))
                .expect("an exit word of the table")
                == reason_name(reason)
        }
        _ => false,
    };
    ensure!(
        ok,
        "exit status {status} (token: {token:?}), the row expects {word}"
    );
    Ok(())
}

fn check_cause(word: &str, err: &ServiceError) -> Result<(), String> {
    let (kind, hook) = word.split_once(':').expect("cause is KIND:HOOK");
    let matches = |e: &(dyn std::error::Error + 'static)| match kind {
        "injected" => e
            .downcast_ref::<InjectedFailure>()
            .is_some_and(|f| f.0 == hook),
        "timeout" => e
            .downcast_ref::<HookTimeout>()
            .is_some_and(|t| t.hook == hook),
        other => panic!("unknown cause kind {other:?}"),
    };
    let mut found = false;
    let mut next = err.source();
    while let Some(e) = next {
        found |= matches(e);
        next = e.source();
    }
    ensure!(found, "the cause of {err:?} is not {word}");
    Ok(())
}

// ---------------------------------------------------------------------------
// The harness: one trial per row and runtime flavour.

fn runtime(multi_thread: bool) -> tokio::runtime::Runtime {
    let mut builder = if multi_thread {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder.enable_all().build().expect("a tokio runtime")
}

fn trial(row: Row, multi_thread: bool) -> Trial {
    let flavour = if multi_thread {
        "multi_thread"
    } else {
        "current_thread"
    };
    let name = format!("{} [{flavour}]", row.name);
    Trial::test(name, move || {
        let rt = runtime(multi_thread);
        for i in 0..row.repeat.unwrap_or(1) {
            rt.block_on(play(&row))
                .map_err(|e| Failed::from(format!("run {i}: {e}")))?;
        }
        Ok(())
    })
}

fn main() {
    let args = Arguments::from_args();
    let table: Table = toml::from_str(TABLE).expect("contract/start.toml parses");
    let mut names = std::collections::HashSet::new();
    for row in &table.row {
        assert!(
            names.insert(row.name.clone()),
            "two rows named {}",
            row.name
        );
    }
    let trials = table
        .row
        .into_iter()
        .flat_map(|row| [trial(row.clone(), false), trial(row, true)])
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
