//! P6 (SPEC section 5): 100k native tokio tasks spawned through the Rust
//! `TaskRegistry` and joined, against `tokio_util::task::TaskTracker` and
//! `tokio::task::JoinSet` doing the same work.
//!
//! Run with `cargo bench --bench registry` (add `-- --quick` for a smoke
//! run, `-- --n N --repeats R` to change the sizes, `-- --glibc-defaults`
//! to keep glibc's heap trimming; see [`TUNABLES`]). Every repeat runs each
//! variant once, in an order rotated by one per repeat, on the same
//! runtime; the medians are compared. The last line of the output is a
//! `BENCH_JSON {...}` record that `bench/run.py --rust` reads.
//!
//! Timed per sample: spawning `n` trivial tasks from a task on the runtime,
//! then waiting until every one of them has finished (`join_all` for the
//! registry, `close` + `wait` for the tracker, draining `join_next` for the
//! join set).

use std::time::{Duration, Instant};

use dig_service::{ShutdownToken, TaskKind, TaskName, TaskRegistry};
use tokio::runtime::{Builder, Runtime};
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

/// Spawn `n` tasks named by `name` through a registry and join them.
async fn registry<N: Into<TaskName>>(n: usize, name: impl Fn() -> N) -> Duration {
    let reg = TaskRegistry::new(ShutdownToken::new());
    let t0 = Instant::now();
    for _ in 0..n {
        let h = reg
            .spawn(name(), TaskKind::BackgroundLoop, async { Ok(()) })
            .expect("registry is open");
        drop(h);
    }
    reg.join_all(Duration::from_secs(600))
        .await
        .expect("every task finished");
    let dt = t0.elapsed();
    assert!(reg.is_empty());
    assert_eq!(reg.stats().completed, n as u64);
    dt
}

async fn task_tracker(n: usize) -> Duration {
    let tracker = TaskTracker::new();
    let t0 = Instant::now();
    for _ in 0..n {
        drop(tracker.spawn(async {}));
    }
    tracker.close();
    tracker.wait().await;
    t0.elapsed()
}

async fn join_set(n: usize) -> Duration {
    let mut set = JoinSet::new();
    let t0 = Instant::now();
    for _ in 0..n {
        set.spawn(async {});
    }
    while let Some(r) = set.join_next().await {
        r.expect("task did not panic");
    }
    t0.elapsed()
}

#[derive(Clone, Copy)]
enum Variant {
    RegistryStr,
    RegistryShared,
    Tracker,
    JoinSet,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::RegistryStr,
        Variant::RegistryShared,
        Variant::Tracker,
        Variant::JoinSet,
    ];

    fn label(self) -> &'static str {
        match self {
            Variant::RegistryStr => "TaskRegistry::spawn (&str name)",
            Variant::RegistryShared => "TaskRegistry::spawn (shared TaskName)",
            Variant::Tracker => "TaskTracker::spawn",
            Variant::JoinSet => "JoinSet::spawn",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Variant::RegistryStr => "registry",
            Variant::RegistryShared => "registry_shared_name",
            Variant::Tracker => "tracker",
            Variant::JoinSet => "joinset",
        }
    }

    /// One sample, spawned from a task on `rt` (as a service would).
    fn run(self, rt: &Runtime, n: usize) -> Duration {
        let work = async move {
            match self {
                // A `&str` name: the registry makes a `TaskName` per task.
                Variant::RegistryStr => registry(n, || "bench-task").await,
                // One `TaskName` cloned per task.
                Variant::RegistryShared => {
                    let name = TaskName::from("bench-task");
                    registry(n, || name.clone()).await
                }
                Variant::Tracker => task_tracker(n).await,
                Variant::JoinSet => join_set(n).await,
            }
        };
        rt.block_on(async move { tokio::spawn(work).await.expect("bench task") })
    }
}

/// SPEC 5 P6: registry / TaskTracker (judged on the multi-thread runtime).
const TARGET: f64 = 1.15;

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Args {
    n: usize,
    repeats: usize,
    workers: usize,
    /// Only this variant (by key), for profiling.
    only: Option<String>,
    /// With `--only`: on a current-thread runtime.
    current: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        n: 100_000,
        repeats: 21,
        workers: 2,
        only: None,
        current: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut num = |what: &str| -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{what} needs a positive integer"))
        };
        match a.as_str() {
            "--quick" => {
                args.n = 10_000;
                args.repeats = 3;
            }
            "--n" => args.n = num("--n"),
            "--repeats" => args.repeats = num("--repeats"),
            "--workers" => args.workers = num("--workers"),
            "--only" => args.only = it.next(),
            "--current" => args.current = true,
            "--glibc-defaults" => {}
            // `cargo bench` passes `--bench`; filters and other flags do not apply.
            _ => {}
        }
    }
    args
}

/// One interleaved comparison on `rt`; returns the medians, in `Variant::ALL` order.
fn suite(rt: &Runtime, flavor: &str, args: &Args) -> Vec<Duration> {
    println!(
        "\nP6 [{flavor}] {} native tasks, {} repeats",
        args.n, args.repeats
    );
    // Warm-up: allocator, runtime threads, the slab.
    for v in Variant::ALL {
        v.run(rt, args.n);
    }
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); Variant::ALL.len()];
    for rep in 0..args.repeats {
        for j in 0..Variant::ALL.len() {
            let i = (rep + j) % Variant::ALL.len();
            samples[i].push(Variant::ALL[i].run(rt, args.n));
        }
    }
    let medians: Vec<Duration> = samples.iter().map(|s| median(s)).collect();
    for (i, v) in Variant::ALL.iter().enumerate() {
        let s = &samples[i];
        let (lo, hi) = (s.iter().min().unwrap(), s.iter().max().unwrap());
        println!(
            "    {:<38} median {:>8.2} ms   min {:>8.2} ms   max {:>8.2} ms   spread {:>5.1}%   ({:.0} ns/task)",
            v.label(),
            ms(medians[i]),
            ms(*lo),
            ms(*hi),
            (ms(*hi) - ms(*lo)) / ms(medians[i]) * 100.0,
            medians[i].as_secs_f64() * 1e9 / args.n as f64,
        );
    }
    let ratio = |a: usize, b: usize| medians[a].as_secs_f64() / medians[b].as_secs_f64();
    let paired = |a: usize, b: usize| {
        let mut r: Vec<f64> = samples[a]
            .iter()
            .zip(&samples[b])
            .map(|(x, y)| x.as_secs_f64() / y.as_secs_f64())
            .collect();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    let (reg, shared, tracker, joinset) = (0, 1, 2, 3);
    let over_tracker = ratio(reg, tracker);
    println!(
        "  -> P6 [{flavor}] TaskRegistry / TaskTracker: {:.3}x (paired {:.3}x)  (target <= {TARGET:.2}x) {}",
        over_tracker,
        paired(reg, tracker),
        if over_tracker <= TARGET { "ok" } else { "MISSED" }
    );
    println!(
        "  -> P6 [{flavor}] TaskRegistry / JoinSet: {:.3}x (paired {:.3}x)  (info)",
        ratio(reg, joinset),
        paired(reg, joinset)
    );
    println!(
        "  -> P6 [{flavor}] TaskRegistry (shared TaskName) / TaskTracker: {:.3}x  (info)",
        ratio(shared, tracker)
    );
    medians
}

fn json_fields(prefix: &str, medians: &[Duration]) -> String {
    let ratio = |a: usize, b: usize| medians[a].as_secs_f64() / medians[b].as_secs_f64();
    let mut fields: Vec<String> = Variant::ALL
        .iter()
        .enumerate()
        .map(|(i, v)| format!("\"{prefix}{}_ms\": {:.4}", v.key(), ms(medians[i])))
        .collect();
    fields.push(format!(
        "\"{prefix}registry_over_tracker\": {:.4}",
        ratio(0, 2)
    ));
    fields.push(format!(
        "\"{prefix}registry_over_joinset\": {:.4}",
        ratio(0, 3)
    ));
    fields.push(format!(
        "\"{prefix}shared_name_over_tracker\": {:.4}",
        ratio(1, 2)
    ));
    fields.join(", ")
}

/// glibc returns freed heap to the kernel whenever the top of the heap is
/// free for more than the trim threshold; a sample that follows such a trim
/// page-faults its memory back in (100k task cells are ~25 MB), and which
/// variant pays for it depends only on the order of the samples. With a
/// high trim threshold and a fixed mmap threshold every sample starts from
/// a warm heap. `--glibc-defaults` keeps glibc's defaults.
const TUNABLES: &str = "glibc.malloc.trim_threshold=1073741824:glibc.malloc.top_pad=67108864:glibc.malloc.mmap_threshold=4194304";

/// Re-run this bench with [`TUNABLES`] set (they are read at process start).
fn reexec_with_tunables() -> Option<i32> {
    if std::env::var_os("GLIBC_TUNABLES").is_some()
        || std::env::args().any(|a| a == "--glibc-defaults")
    {
        return None;
    }
    let exe = std::env::current_exe().ok()?;
    let status = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("GLIBC_TUNABLES", TUNABLES)
        .status()
        .ok()?;
    Some(status.code().unwrap_or(1))
}

fn main() {
    if let Some(code) = reexec_with_tunables() {
        std::process::exit(code);
    }
    let args = parse_args();
    let multi = Builder::new_multi_thread()
        .worker_threads(args.workers)
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!(
        "P6: {} native tasks spawned from a task and joined; {} CPUs; GLIBC_TUNABLES={}",
        args.n,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::env::var("GLIBC_TUNABLES").unwrap_or_else(|_| "(glibc defaults)".into())
    );

    if let Some(key) = &args.only {
        let v = Variant::ALL
            .into_iter()
            .find(|v| v.key() == key)
            .unwrap_or_else(|| panic!("--only: no variant {key:?}"));
        let rt = if args.current {
            Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
        } else {
            multi
        };
        let s: Vec<Duration> = (0..args.repeats).map(|_| v.run(&rt, args.n)).collect();
        println!("    {:<38} median {:>8.2} ms", v.label(), ms(median(&s)));
        return;
    }

    let m = suite(
        &multi,
        &format!("multi-thread, {} workers", args.workers),
        &args,
    );
    drop(multi);
    let current = Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let c = suite(&current, "current-thread", &args);
    println!(
        "BENCH_JSON {{\"n\": {}, \"repeats\": {}, \"workers\": {}, {}, {}}}",
        args.n,
        args.repeats,
        args.workers,
        json_fields("", &m),
        json_fields("current_", &c)
    );
}
