//! Property tests (proptest) of the Rust `Service` and `TaskRegistry`.
//!
//! - [`any_interleaving_ends_as_the_contract_says`]: a node whose hooks
//!   succeed, fail or panic on demand, the tasks its `on_start` spawns (each
//!   returns `Ok`, an error or panics; stops on the token or ignores it) and
//!   a list of steps a driver plays while `run` runs (a shutdown request from
//!   the service, a handle or another thread; "task i ends now"; "`run`
//!   returns / fails / panics now"). [`Model`] predicts from the scenario
//!   alone what `Service::start` must return (the contract table on
//!   `Service::start`, with its priority run > on_stop > post_stop > join),
//!   the hooks that run, the token's reason, the registry's counters and the
//!   stragglers. Afterwards no tracked task may be live, and every injected
//!   failure must be in the returned error or in a `tracing` event.
//! - [`registry_join_counts_are_exact`]: native and foreign tasks with random
//!   durations and outcomes, some spawned while `join_all` waits, joined
//!   under a deadline: exact stragglers and counters.
//!
//! Both run on a paused-clock current-thread runtime: deadlines pass in
//! virtual time (no wall-clock waits, no flakiness), so each case takes
//! microseconds. Cases come from a fixed seed, so CI sees the same ones.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::future::pending;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dig_service::{
    ExitReason, ExitStatus, ForeignTask, NodeLifecycle, RunContext, Service, ServiceConfig,
    ServiceError, ShutdownReason, ShutdownToken, StartContext, StopContext, TaskHandle, TaskKind,
    TaskOutcome, TaskRegistry, TaskStats,
};
use parking_lot::Mutex;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use tokio::sync::{watch, Notify};

const DEADLINE: Duration = Duration::from_millis(100);
const BG: TaskKind = TaskKind::BackgroundLoop;

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x5EED_0006),
        ..Config::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime")
}

/// Injected panics are expected: keep them off stderr (others still print).
fn quiet_injected_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if !msg.contains("injected") {
                default(info);
            }
        }));
    });
}

// ---------------------------------------------------------------------------
// Capturing `tracing` events (the crate's logs), without tracing-subscriber.
//
// One global subscriber, recording into a per-thread buffer while a capture
// is active on that thread (the paused runtime runs every task on the
// thread that calls `block_on`). A global one, not `with_default`: callsite
// interest is cached process-wide, and a callsite first hit on a thread with
// no subscriber would be cached as "never" and then missed by a scoped one.

#[derive(Debug, Clone)]
struct Captured {
    level: tracing::Level,
    target: String,
    fields: String,
}

thread_local! {
    static EVENTS: RefCell<Option<Vec<Captured>>> = const { RefCell::new(None) };
}

struct Capture;

struct FieldText<'a>(&'a mut String);

impl tracing::field::Visit for FieldText<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        use fmt::Write as _;
        let _ = write!(self.0, "{}={:?}; ", field.name(), value);
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        EVENTS.with(|events| {
            if let Some(events) = events.borrow_mut().as_mut() {
                let mut fields = String::new();
                event.record(&mut FieldText(&mut fields));
                events.push(Captured {
                    level: *event.metadata().level(),
                    target: event.metadata().target().to_owned(),
                    fields,
                });
            }
        });
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Run `f`, returning what it returned and the events it emitted on this thread.
fn capture_events<R>(f: impl FnOnce() -> R) -> (R, Vec<Captured>) {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        tracing::subscriber::set_global_default(Capture).expect("no other global subscriber");
    });
    EVENTS.with(|e| *e.borrow_mut() = Some(Vec::new()));
    let out = f();
    let events = EVENTS.with(|e| e.borrow_mut().take()).unwrap_or_default();
    (out, events)
}

// ---------------------------------------------------------------------------
// Scenarios.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Ok,
    Fail,
    Panic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunAct {
    UntilShutdown,
    Returns,
    Fails,
    Panics,
}

#[derive(Debug, Clone, Copy)]
struct TaskSpec {
    ends: Act,
    honors_shutdown: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Service,
    Handle,
    Thread,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Shutdown(usize, Via),
    /// "task `i % tasks.len()` ends now" (nothing if there are no tasks).
    TaskEnds(usize),
    RunEnds,
}

#[derive(Debug, Clone)]
struct Scenario {
    pre_start: Act,
    on_start: Act,
    run: RunAct,
    on_stop: Act,
    post_stop: Act,
    tasks: Vec<TaskSpec>,
    steps: Vec<Step>,
}

fn reasons() -> [ShutdownReason; 4] {
    [
        ShutdownReason::UserRequested,
        ShutdownReason::RpcRequested,
        ShutdownReason::ReloadRequested,
        ShutdownReason::Fatal("operator says stop".into()),
    ]
}

fn task_name(i: usize) -> String {
    format!("task-{i}")
}

/// Mostly `Ok`: most cases reach `run`.
fn edge_act() -> impl Strategy<Value = Act> {
    prop_oneof![6 => Just(Act::Ok), 1 => Just(Act::Fail), 1 => Just(Act::Panic)]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let task = (
        prop_oneof![Just(Act::Ok), Just(Act::Fail), Just(Act::Panic)],
        any::<bool>(),
    )
        .prop_map(|(ends, honors_shutdown)| TaskSpec {
            ends,
            honors_shutdown,
        });
    let step = prop_oneof![
        (
            0..reasons().len(),
            prop_oneof![Just(Via::Service), Just(Via::Handle), Just(Via::Thread)]
        )
            .prop_map(|(r, via)| Step::Shutdown(r, via)),
        (0usize..8).prop_map(Step::TaskEnds),
        Just(Step::RunEnds),
    ];
    let run = prop_oneof![
        Just(RunAct::UntilShutdown),
        Just(RunAct::Returns),
        Just(RunAct::Fails),
        Just(RunAct::Panics),
    ];
    (
        edge_act(),
        edge_act(),
        run,
        edge_act(),
        edge_act(),
        prop::collection::vec(task, 0..5),
        prop::collection::vec(step, 0..7),
    )
        .prop_map(
            |(pre_start, on_start, run, on_stop, post_stop, tasks, steps)| Scenario {
                pre_start,
                on_start,
                run,
                on_stop,
                post_stop,
                tasks,
                steps,
            },
        )
}

// ---------------------------------------------------------------------------
// The model.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Error {
    PreStart,
    OnStart,
    Run,
    OnStop,
    Deadline,
}

#[derive(Debug)]
struct Model {
    hooks: Vec<&'static str>,
    /// `Err(kind)` or the exit reason (a `RunError` never reaches `Ok`).
    result: Result<ExitReason, Error>,
    /// `None`: some `Fatal(..)` set by the service (message containing `fatal_mentions`).
    token_reason: Option<ShutdownReason>,
    fatal_mentions: &'static str,
    completed: u64,
    failed: u64,
    stragglers: Vec<String>,
    /// The steps the driver plays; those after `run` ended (except
    /// shutdown requests) are skipped.
    played: Vec<Step>,
}

impl Model {
    fn of(sc: &Scenario) -> Self {
        let mut m = Model {
            hooks: vec!["pre_start"],
            result: Err(Error::PreStart),
            token_reason: None,
            fatal_mentions: "pre_start",
            completed: 0,
            failed: 0,
            stragglers: Vec::new(),
            played: Vec::new(),
        };
        if sc.pre_start != Act::Ok {
            return m;
        }
        m.hooks.push("on_start");
        let mut ended = vec![false; sc.tasks.len()];
        if sc.on_start != Act::Ok {
            m.hooks.push("post_stop");
            m.result = Err(Error::OnStart);
            m.fatal_mentions = "on_start";
            m.wind_down(sc, &ended);
            return m;
        }
        m.hooks.extend(["run", "on_stop", "post_stop"]);

        let mut reason: Option<ShutdownReason> = None;
        let mut run_ended_by_step = false;
        let mut over = false;
        for &step in &sc.steps {
            match step {
                Step::Shutdown(r, _) => {
                    m.played.push(step);
                    reason.get_or_insert_with(|| reasons()[r].clone());
                    over = true;
                }
                _ if over => {}
                Step::TaskEnds(i) => {
                    if sc.tasks.is_empty() || ended[i % sc.tasks.len()] {
                        continue;
                    }
                    let i = i % sc.tasks.len();
                    m.played.push(Step::TaskEnds(i));
                    ended[i] = true;
                    m.count(sc.tasks[i].ends);
                }
                Step::RunEnds => {
                    if sc.run == RunAct::UntilShutdown {
                        continue;
                    }
                    m.played.push(step);
                    run_ended_by_step = true;
                    over = true;
                }
            }
        }
        if !over {
            m.played.push(Step::Shutdown(0, Via::Service));
            reason = Some(ShutdownReason::UserRequested);
        }

        let run_failed = run_ended_by_step && matches!(sc.run, RunAct::Fails | RunAct::Panics);
        let exit_reason = if run_failed {
            ExitReason::RunError(Arc::new(anyhow::anyhow!("placeholder")))
        } else {
            match &reason {
                Some(r) => ExitReason::RequestedShutdown(r.clone()),
                None => ExitReason::RunCompleted,
            }
        };
        m.token_reason = match reason {
            Some(r) => Some(r),
            None if run_failed => None,
            None => Some(ShutdownReason::RequestedByRun),
        };
        m.fatal_mentions = "run failed";
        m.wind_down(sc, &ended);
        m.result = if run_failed {
            Err(Error::Run)
        } else if sc.on_stop != Act::Ok || sc.post_stop != Act::Ok {
            Err(Error::OnStop)
        } else if !m.stragglers.is_empty() {
            Err(Error::Deadline)
        } else {
            Ok(exit_reason)
        };
        m
    }

    fn count(&mut self, act: Act) {
        match act {
            Act::Ok => self.completed += 1,
            Act::Fail | Act::Panic => self.failed += 1,
        }
    }

    /// The token fired: tasks that heed it end now, the others straggle.
    fn wind_down(&mut self, sc: &Scenario, ended: &[bool]) {
        for (i, spec) in sc.tasks.iter().enumerate() {
            if ended[i] {
                continue;
            }
            if spec.honors_shutdown {
                self.count(spec.ends);
            } else {
                self.stragglers.push(task_name(i));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The node.

struct Probe {
    calls: Mutex<Vec<&'static str>>,
    run_started: watch::Sender<bool>,
    run_go: Notify,
    task_go: Vec<Notify>,
    handles: Mutex<Vec<Option<TaskHandle>>>,
}

struct ScenarioNode {
    sc: Scenario,
    probe: Arc<Probe>,
}

fn act(hook: &'static str, a: Act) -> anyhow::Result<()> {
    match a {
        Act::Ok => Ok(()),
        Act::Fail => Err(anyhow::anyhow!("{hook} failure injected")),
        Act::Panic => panic!("{hook} panic injected"),
    }
}

#[async_trait]
impl NodeLifecycle for ScenarioNode {
    const NAME: Option<&'static str> = Some("prop");

    async fn pre_start(&self, _ctx: &StartContext<'_>) -> anyhow::Result<()> {
        self.probe.calls.lock().push("pre_start");
        act("pre_start", self.sc.pre_start)
    }

    async fn on_start(&self, ctx: &StartContext<'_>) -> anyhow::Result<()> {
        self.probe.calls.lock().push("on_start");
        for (i, spec) in self.sc.tasks.iter().copied().enumerate() {
            let probe = self.probe.clone();
            let token = ctx.shutdown.clone();
            let handle = ctx.tasks.spawn(task_name(i), BG, async move {
                tokio::select! {
                    biased;
                    () = probe.task_go[i].notified() => {}
                    () = token.cancelled(), if spec.honors_shutdown => {}
                }
                match spec.ends {
                    Act::Ok => Ok(()),
                    Act::Fail => Err(anyhow::anyhow!("{} failure injected", task_name(i))),
                    Act::Panic => panic!("{} panic injected", task_name(i)),
                }
            })?;
            self.probe.handles.lock().push(Some(handle));
        }
        act("on_start", self.sc.on_start)
    }

    async fn run(&self, ctx: RunContext) -> anyhow::Result<()> {
        self.probe.calls.lock().push("run");
        self.probe.run_started.send_replace(true);
        // `biased`: a "run ends" step followed at once by a shutdown request
        // is a "run ends" step (as the model says).
        let go = tokio::select! {
            biased;
            () = self.probe.run_go.notified() => true,
            () = ctx.shutdown.cancelled() => false,
        };
        match self.sc.run {
            RunAct::Fails if go => Err(anyhow::anyhow!("run failure injected")),
            RunAct::Panics if go => panic!("run panic injected"),
            _ => Ok(()),
        }
    }

    async fn on_stop(&self, _ctx: &StopContext<'_>) -> anyhow::Result<()> {
        self.probe.calls.lock().push("on_stop");
        act("on_stop", self.sc.on_stop)
    }

    async fn post_stop(&self, _ctx: &StopContext<'_>) -> anyhow::Result<()> {
        self.probe.calls.lock().push("post_stop");
        act("post_stop", self.sc.post_stop)
    }
}

type ScenarioService = Service<ScenarioNode, (), ()>;

/// Start the service and play the model's steps while `run` runs.
async fn play(
    svc: Arc<ScenarioService>,
    probe: Arc<Probe>,
    model: &Model,
) -> dig_service::Result<ExitStatus> {
    let mut runner = tokio::spawn({
        let svc = svc.clone();
        async move { svc.start().await }
    });
    let mut started = probe.run_started.subscribe();
    let finished_early = tokio::select! {
        biased;
        res = &mut runner => Some(res.expect("start() did not panic")),
        _ = started.wait_for(|s| *s) => None,
    };
    if let Some(res) = finished_early {
        return res;
    }
    for &step in &model.played {
        match step {
            Step::Shutdown(r, via) => {
                let reason = reasons()[r].clone();
                match via {
                    Via::Service => svc.request_shutdown(reason),
                    Via::Handle => svc.handle().request_shutdown(reason),
                    Via::Thread => {
                        let handle = svc.handle();
                        std::thread::spawn(move || handle.request_shutdown(reason))
                            .join()
                            .expect("request_shutdown from a thread");
                    }
                }
            }
            Step::TaskEnds(i) => {
                probe.task_go[i].notify_one();
                let handle = probe.handles.lock()[i].take().expect("each task ends once");
                // Its entry has left the registry when its handle resolves.
                let _ = handle.await;
            }
            Step::RunEnds => probe.run_go.notify_one(),
        }
    }
    runner.await.expect("start() did not panic")
}

fn check(
    sc: &Scenario,
    model: &Model,
    res: &dig_service::Result<ExitStatus>,
    svc: &ScenarioService,
    probe: &Probe,
    events: &[Captured],
) -> Result<(), TestCaseError> {
    prop_assert_eq!(&*probe.calls.lock(), &model.hooks);

    match (&model.result, res) {
        (Ok(want), Ok(status)) => {
            prop_assert_eq!(format!("{:?}", status.reason), format!("{want:?}"));
            let graceful = !matches!(
                want,
                ExitReason::RequestedShutdown(ShutdownReason::Fatal(_))
            );
            prop_assert_eq!(status.is_graceful(), graceful);
            prop_assert_eq!(status.exit_code(), if graceful { 0 } else { 1 });
        }
        (Err(kind), Err(err)) => {
            let ok = match (kind, err) {
                (Error::PreStart, ServiceError::PreStartFailed(..))
                | (Error::OnStart, ServiceError::OnStartFailed(..))
                | (Error::Run, ServiceError::RunFailed(..))
                | (Error::OnStop, ServiceError::OnStopFailed(..)) => true,
                (
                    Error::Deadline,
                    ServiceError::ShutdownDeadlineExceeded {
                        pending,
                        pending_names,
                        ..
                    },
                ) => *pending == model.stragglers.len() && *pending_names == model.stragglers,
                _ => false,
            };
            prop_assert!(ok, "expected {:?}, got {:?}", kind, err);
        }
        (want, got) => prop_assert!(false, "expected {:?}, got {:?}", want, got),
    }

    let reason = svc.shutdown_token().reason();
    match &model.token_reason {
        Some(want) => prop_assert_eq!(reason.as_ref(), Some(want)),
        None => prop_assert!(
            matches!(&reason, Some(ShutdownReason::Fatal(m)) if m.contains(model.fatal_mentions)),
            "token reason {:?}, expected Fatal mentioning {:?}",
            reason,
            model.fatal_mentions
        ),
    }

    // Exact counters, nothing live.
    prop_assert_eq!(
        svc.tasks().stats(),
        TaskStats {
            spawned: sc.tasks.len() as u64 * u64::from(sc.pre_start == Act::Ok),
            completed: model.completed,
            failed: model.failed,
            cancelled: 0,
            aborted: model.stragglers.len() as u64,
            restarted: 0,
            live: 0,
        }
    );
    prop_assert!(probe
        .handles
        .lock()
        .iter()
        .flatten()
        .all(TaskHandle::is_finished));

    // Every injected failure is in the returned error or in an error event.
    let returned = match res {
        Err(e) => format!("{e:#} {:?}", std::error::Error::source(e)),
        Ok(_) => String::new(),
    };
    let logged = |needle: &str| {
        events
            .iter()
            .any(|e| e.level <= tracing::Level::WARN && e.fields.contains(needle))
    };
    for (hook, a) in [
        ("pre_start", sc.pre_start),
        ("on_start", sc.on_start),
        ("on_stop", sc.on_stop),
        ("post_stop", sc.post_stop),
    ] {
        if a != Act::Ok && model.hooks.contains(&hook) {
            let needle = format!(
                "{hook} {}",
                if a == Act::Fail { "failure" } else { "panic" }
            );
            prop_assert!(
                returned.contains(&needle) || logged(&needle),
                "{} was neither returned nor logged",
                needle
            );
        }
    }
    let spawned = sc.pre_start == Act::Ok;
    for (i, spec) in sc.tasks.iter().enumerate() {
        if spawned && spec.ends != Act::Ok && !model.stragglers.contains(&task_name(i)) {
            let needle = format!("task={}", task_name(i));
            prop_assert!(
                events.iter().any(|e| e.target == "dig_service::tasks"
                    && e.level == tracing::Level::ERROR
                    && e.fields.contains(&needle)),
                "the failure of {} was not logged",
                task_name(i)
            );
        }
    }
    Ok(())
}

fn run_scenario(sc: &Scenario) -> Result<(), TestCaseError> {
    quiet_injected_panics();
    let model = Model::of(sc);
    let probe = Arc::new(Probe {
        calls: Mutex::new(Vec::new()),
        run_started: watch::Sender::new(false),
        run_go: Notify::new(),
        task_go: (0..sc.tasks.len()).map(|_| Notify::new()).collect(),
        handles: Mutex::new(Vec::new()),
    });
    let node = ScenarioNode {
        sc: sc.clone(),
        probe: probe.clone(),
    };
    let svc = Arc::new(Service::with_config(
        node,
        (),
        (),
        ServiceConfig::new().with_shutdown_deadline(DEADLINE),
    ));
    let (res, events) = capture_events(|| {
        runtime().block_on(async {
            let res = play(svc.clone(), probe.clone(), &model).await;
            // Aborted stragglers leave the registry when the runtime drops
            // them; a join on the closed registry waits for exactly that.
            svc.tasks()
                .join_all(Duration::from_secs(3600))
                .await
                .expect("every task ended");
            res
        })
    });
    check(sc, &model, &res, &svc, &probe, &events)
}

proptest! {
    #![proptest_config(config(512))]

    /// **Proves:** for any scenario, `Service::start` returns what the
    /// contract table prescribes (exit reason and exit code, or the error
    /// kind with its priority run > on_stop > post_stop > join, and the exact
    /// stragglers), exactly the prescribed hooks run, the token's reason is
    /// the first one requested (or the service's `Fatal`), the registry's
    /// counters are exact with nothing live, and every injected failure is
    /// in the returned error or in a `tracing` error event.
    ///
    /// **Catches:** any divergence from the table on a combination the
    /// example tests do not spell out (a request racing `run`'s own return,
    /// a panicking `post_stop` after a failed `on_start` with a stubborn
    /// task, ...), and any failure that disappears without a trace.
    #[test]
    fn any_interleaving_ends_as_the_contract_says(sc in scenario()) {
        run_scenario(&sc)?;
    }
}

// ---------------------------------------------------------------------------
// The registry alone.

#[derive(Debug, Clone, Copy)]
enum Body {
    Ok,
    Fail,
    Panic,
    Hang,
}

#[derive(Debug, Clone, Copy)]
struct RegTask {
    body: Body,
    /// Virtual milliseconds (even).
    millis: u64,
    /// A foreign task (ended through `finish_foreign`), else native.
    foreign: bool,
    /// Spawned once `join_all` has started waiting.
    late: bool,
}

fn reg_task() -> impl Strategy<Value = RegTask> {
    (
        prop_oneof![4 => Just(Body::Ok), 2 => Just(Body::Fail), 1 => Just(Body::Panic), 1 => Just(Body::Hang)],
        (0u64..200).prop_map(|half| half * 2),
        any::<bool>(),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(body, millis, foreign, late)| RegTask {
            body,
            millis,
            foreign,
            late,
        })
}

/// A foreign task whose owner is told to stop through a channel.
struct Foreign(tokio::sync::mpsc::UnboundedSender<()>);

impl ForeignTask for Foreign {
    fn cancel(&self) {
        let _ = self.0.send(());
    }
}

fn spawn_reg_task(reg: &TaskRegistry, i: usize, t: RegTask) {
    let name = format!("r{i}");
    let sleep = Duration::from_millis(t.millis);
    if t.foreign {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let id = reg
            .track_foreign(name, BG, Arc::new(Foreign(tx)))
            .expect("open");
        let reg = reg.clone();
        tokio::spawn(async move {
            let outcome = tokio::select! {
                () = tokio::time::sleep(sleep), if !matches!(t.body, Body::Hang) => match t.body {
                    Body::Ok => TaskOutcome::Completed,
                    _ => TaskOutcome::Failed,
                },
                _ = rx.recv() => TaskOutcome::Cancelled,
            };
            assert!(reg.finish_foreign(id, outcome), "finished once");
        });
    } else {
        reg.spawn(name.clone(), BG, async move {
            match t.body {
                Body::Hang => pending().await,
                _ => tokio::time::sleep(sleep).await,
            }
            match t.body {
                Body::Ok => Ok(()),
                Body::Panic => panic!("{name} panic injected"),
                _ => Err(anyhow::anyhow!("{name} failure injected")),
            }
        })
        .expect("open");
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// **Proves:** native and foreign tasks with random durations and
    /// outcomes (some spawned while `join_all` is already waiting), joined
    /// under a 251 ms deadline: the tasks still running at the deadline are
    /// exactly those that hang or need longer (named in spawn order),
    /// natives among them are aborted and foreign ones cancelled through
    /// their owner, every other task is counted as completed or failed, and
    /// nothing is live afterwards.
    ///
    /// **Catches:** lost or double-counted outcomes, late spawns not waited
    /// for, a straggler report that is not exactly the live set, or a
    /// foreign task never told to stop.
    #[test]
    fn registry_join_counts_are_exact(tasks in prop::collection::vec(reg_task(), 0..24)) {
        quiet_injected_panics();
        // Odd, while every duration is even: never a tie (tokio timers tick in ms).
        let deadline = Duration::from_millis(251);
        let (early, late): (Vec<_>, Vec<_>) =
            tasks.iter().copied().enumerate().partition(|(_, t)| !t.late);
        let holder = RegTask { body: Body::Ok, millis: 2, foreign: false, late: false };
        let runs_past = |t: &RegTask| {
            matches!(t.body, Body::Hang) || Duration::from_millis(t.millis) > deadline
        };
        let mut want_stragglers: Vec<String> = early
            .iter()
            .chain(&late)
            .filter(|(_, t)| runs_past(t))
            .map(|(i, _)| format!("r{i}"))
            .collect();
        let ended: Vec<RegTask> = tasks.iter().copied().filter(|t| !runs_past(t)).collect();
        // + the holder, which keeps the registry open until the late spawns.
        let completed = ended.iter().filter(|t| matches!(t.body, Body::Ok)).count() as u64 + 1;
        let aborted = tasks.iter().filter(|t| runs_past(t) && !t.foreign).count() as u64;
        let cancelled = tasks.iter().filter(|t| runs_past(t) && t.foreign).count() as u64;

        let (res, stats) = runtime().block_on(async {
            let reg = TaskRegistry::new(ShutdownToken::new());
            spawn_reg_task(&reg, usize::MAX, holder);
            for &(i, t) in &early {
                spawn_reg_task(&reg, i, t);
            }
            let join = tokio::spawn({
                let reg = reg.clone();
                async move { reg.join_all(deadline).await }
            });
            tokio::task::yield_now().await; // join_all is waiting now
            for &(i, t) in &late {
                spawn_reg_task(&reg, i, t);
            }
            let res = join.await.expect("join_all did not panic");
            reg.join_all(Duration::from_secs(3600)).await.expect("every task ended");
            (res, reg.stats())
        });
        match res {
            Ok(()) => prop_assert!(want_stragglers.is_empty(), "{:?}", want_stragglers),
            Err(ServiceError::ShutdownDeadlineExceeded { pending_names, .. }) => {
                // Spawn order: early ones first, then the late ones.
                let got: BTreeSet<_> = pending_names.iter().cloned().collect();
                want_stragglers.sort_by_key(|n| {
                    let i: usize = n[1..].parse().unwrap();
                    (tasks[i].late, i)
                });
                prop_assert_eq!(got.len(), pending_names.len());
                prop_assert_eq!(pending_names, want_stragglers);
            }
            Err(other) => prop_assert!(false, "unexpected {:?}", other),
        }
        prop_assert_eq!(
            stats,
            TaskStats {
                spawned: tasks.len() as u64 + 1,
                completed,
                failed: ended.len() as u64 + 1 - completed,
                cancelled,
                aborted,
                restarted: 0,
                live: 0,
            }
        );
    }
}
