#!/usr/bin/env python3
"""dig_service performance suite: the targets of SPEC section 5.

One entry point for P1-P5 and P7-P12 (P6 is the Rust bench
``cargo bench --bench registry``; ``--rust`` runs it from here too)::

    .venv/bin/python bench/run.py                 # full run, default asyncio loop
    .venv/bin/python bench/run.py --loop uvloop   # the same on uvloop
    .venv/bin/python bench/run.py --loop both     # P1-P3, P9-P12 on both loops, the rest on asyncio
    .venv/bin/python bench/run.py --quick --no-assert   # CI smoke check (< 90 s)
    .venv/bin/python bench/run.py --only P1,P3 --json out.json
    bash bench/all_versions.sh --only P1,P9   # the same on every CPython >= 3.11 here

Method. Every target is a ratio against a baseline measured in the same
run (or an absolute bound the spec fixes). Candidate and baselines run
interleaved: each repeat runs every variant once, in an order rotated by one
per repeat. P1-P3 run every sample in a fresh child process (a small
untimed run of the same case first, then ``gc.collect()`` and
``gc.freeze()``, then the timed run on a fresh event loop), so no sample
inherits another's heap, allocator state or garbage: in one long-lived
process the registry's samples came out 10-15% slower than in fresh ones,
depending on what ran before them. P4 and P8 run in this process. Each
sample is timed on the wall clock and on the process CPU clock. Printed: median, min, max and
spread ``(max - min) / median`` of each variant; a ratio is
``median(candidate) / median(baseline)`` on the ``--clock`` clock (wall by
default), shown with the other clock's ratio and the median of the
per-repeat paired ratios. P4 deadlines, P7 and P8 are wall-clock always.

What each target measures (the interpretation is ours where the spec is terse):

- P1: N trivial coroutines (``async def nop(): pass``) spawned and run to
  completion, timed from the first spawn until all are done. Registry:
  ``reg.spawn(NAME, kind, nop())``, then poll ``len(reg)`` with ``sleep(0)``;
  bare: the asyncio docs' idiom with ``loop.create_task`` (``tasks.add(t)``,
  ``t.add_done_callback(tasks.discard)``), the same poll on the set;
  ``asyncio.TaskGroup`` and an anyio task group: the ``async with`` block;
  untracked ``loop.create_task`` alone (no set, no callback; only the last
  task kept, polled until done): the floor, target <= 1.3x.
  Every variant is written as its docs write it, nothing hoisted out of the
  loop; the bare idiom with its bound methods hoisted is shown as info. One
  constant name for every registry task.
- P2: N tasks parked on ``await token.cancelled()`` vs on ``await
  event.wait()``; timed from ``cancel()`` / ``set()`` until every waiter has
  resumed (a shared countdown). Parking is timed too and shown as info.
- P3: the same N tasks (each ``await token.cancelled()``), spawned through
  the registry or with ``create_task``; timed from ``cancel()`` until
  ``join_all`` / ``asyncio.gather`` returns.
- P4: 10k tasks that ignore the shutdown: they never look at the token
  (``await asyncio.sleep(3600)``). ``join_all(0.2)`` must return (raise
  ``ShutdownDeadlineExceeded``) within 0.20-0.25 s with ``pending == 10000``.
  A second variant also swallows ``Task.cancel()`` (catches
  ``CancelledError`` and sleeps again), so either reading of "ignore
  cancel" is checked; ``asyncio.wait(timeout=0.2)`` + cancel is shown as info.
- P5: 1M trivial tasks in waves of 1k (spawn 1k, wait until the registry is
  empty, repeat) in a fresh child process; RSS from ``/proc/self/statm``
  after the first 10k (after ``gc.collect()``) vs at the end and at its peak.
- P7: ``import dig_service`` and ``Service(node)`` with a trivial node, in
  fresh interpreters, minus ``import asyncio`` in others (<= 50 ms); threads
  counted in ``/proc/self/task`` before and after the import, after building
  the service and after running Python tasks through a registry (the tokio
  runtime must not start for those). See ``p7_import.py``.
- P9: 1,000 services (10 tracked tasks each) started and stopped one after
  another vs the same lifecycle on ``asyncio.TaskGroup`` + ``asyncio.Event``;
  RSS, threads and fds before and after (``p9_churn.py``).
- P10: bytes a live task, 100k parked tasks, registry vs the bare set idiom,
  from RSS in fresh children (``p10_task_memory.py`` says why not tracemalloc).
- P11: ``ShutdownToken.cancel()`` from another thread until a waiter on the
  loop resumes vs ``loop.call_soon_threadsafe(event.set)``: p50 and p99
  (``p11_cross_thread.py``).
- P12: a supervised task that fails at once, restarted with zero backoff 10k times, vs
  10k plain tasks that fail at once, spawned one after another (each awaited before the
  next); the ``dig_service.tasks`` logger disabled in both (see ``p12_supervise.py``).
- P8: ``snapshot()`` with 100k live registry tasks (each named ``peer-<i>``),
  several calls on each of a few fresh loops.

Layout: ``harness.py`` (clocks, samples, statistics, the report) and one
module a target (``p1_spawn.py``, ``p2_wake.py``, ``p3_join.py``,
``p4_deadline.py``, ``p5_memory.py``, ``p6_native.py``, ``p7_import.py``,
``p8_snapshot.py``, ``p9_churn.py``, ``p10_task_memory.py``,
``p11_cross_thread.py``, ``p12_supervise.py``); this file is the entry point.
``all_versions.sh`` runs it on every CPython >= 3.11 on the machine.

Exit status 1 when a target is missed. ``--no-assert`` ignores the timing
targets (noisy on shared machines) but still fails on the functional checks
(a registry not empty, a wrong ``pending`` count, RSS growth, a thread
started at import), so a smoke run still proves the suite and the package work.
"""

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import harness
from harness import Config, Dur, Report, machine, perf, print_table, run_on
from p1_spawn import (
    bench_p1,
    p1_anyio,
    p1_bare,
    p1_bare_hoisted,
    p1_registry,
    p1_taskgroup,
    p1_untracked,
)
from p2_wake import bench_p2, p2_event, p2_token
from p3_join import bench_p3, p3_gather, p3_join_all
from p4_deadline import bench_p4
from p5_memory import bench_p5, p5_child
from p6_native import bench_p6
from p7_import import bench_p7
from p8_snapshot import bench_p8
from p9_churn import bench_p9, p9_resources_child, p9_service, p9_taskgroup
from p10_task_memory import bench_p10, p10_child
from p11_cross_thread import bench_p11, p11_child
from p12_supervise import bench_p12, p12_plain, p12_plain_nop, p12_supervised

__all__ = ["CASES", "main", "run_on"]

CASES: dict[str, Callable[[int], Coroutine[Any, Any, dict[str, Dur]]]] = {
    "p1.registry": p1_registry,
    "p1.bare": p1_bare,
    "p1.bare_hoisted": p1_bare_hoisted,
    "p1.taskgroup": p1_taskgroup,
    "p1.anyio": p1_anyio,
    "p1.untracked": p1_untracked,
    "p2.token": p2_token,
    "p2.event": p2_event,
    "p3.join_all": p3_join_all,
    "p3.gather": p3_gather,
    "p12.supervised": p12_supervised,
    "p12.plain": p12_plain,
    "p12.plain_nop": p12_plain_nop,
    "p9.service": p9_service,
    "p9.taskgroup": p9_taskgroup,
}

"""The cases a child process samples (``--_child sample``), by id; also what
``bench/instructions.py`` runs under callgrind."""


def sample_child(loop: str, case: str, n: int) -> dict[str, list[float]]:
    """One sample of `case` in this (fresh) process.

    A small untimed run of the same case warms the imports, the caches and
    the allocator first; then everything is collected and frozen out of the
    collector's way, and the real run is timed.
    """
    fn = CASES[case]
    run_on(loop, lambda: fn(min(n, 1_000)))
    parts: dict[str, Dur] = {}

    async def timed() -> Dur:
        out = await fn(n)
        parts.update(out)
        return out["main"]

    run_on(loop, timed)
    return {key: [d.wall, d.cpu] for key, d in parts.items()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small N, few repeats (< 90 s)")
    p.add_argument(
        "--loop",
        choices=("asyncio", "uvloop", "both"),
        default="asyncio",
        help="loop(s) for P1-P3 and P9-P12; P4, P5, P8 run on the first one named",
    )
    p.add_argument("--repeats", type=int, default=None, help="repeats per variant")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="clock the ratio targets are judged on (both are always printed); "
        "P4 deadlines, P7 and P8 are always wall-clock",
    )
    p.add_argument("--only", default="", help="comma-separated subset, e.g. P1,P3")
    p.add_argument(
        "--no-assert",
        action="store_true",
        help="exit 0 even if a timing target is missed (functional checks still count)",
    )
    p.add_argument("--rust", action="store_true", help="also run P6 (cargo bench --bench registry)")
    p.add_argument("--json", type=Path, default=None, help="write rows and samples to this file")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_args", default="[]", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._child == "sample":
        case, n = json.loads(args._args)
        print(json.dumps(sample_child(args.loop, case, n)))
        return 0
    if args._child == "p5":
        total, wave, base_after, variant = json.loads(args._args)
        with asyncio.Runner(loop_factory=harness.loop_factory(args.loop)) as runner:
            out = runner.run(p5_child(total, wave, base_after, variant))
        print(json.dumps(out))
        return 0
    if args._child in ("p9", "p10", "p11"):
        child_args = json.loads(args._args)
        coro = {
            "p9": lambda: p9_resources_child(*child_args),
            "p10": lambda: p10_child(*child_args),
            "p11": lambda: p11_child(*child_args),
        }[args._child]
        with asyncio.Runner(loop_factory=harness.loop_factory(args.loop)) as runner:
            res = runner.run(coro())
        print(json.dumps(res))
        return 0

    harness.CLOCK = args.clock
    cfg = Config.for_mode(args.quick, args.repeats)
    only = {s.strip().upper() for s in args.only.split(",") if s.strip()}

    def want(pid: str) -> bool:
        return not only or pid in only

    loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    report = Report()
    started = perf()
    print(f"dig_service bench ({cfg.mode}): {machine()}")
    clock = harness.CLOCK
    print(f"loops {loops}; repeats {cfg.repeats}; N = {cfg.n:,}; ratios judged on {clock} clock")
    for loop in loops:
        if want("P1"):
            bench_p1(cfg, loop, report)
        if want("P2"):
            bench_p2(cfg, loop, report)
        if want("P3"):
            bench_p3(cfg, loop, report)
        if want("P12"):
            bench_p12(cfg, loop, report)
        if want("P9"):
            bench_p9(cfg, loop, report)
        if want("P10"):
            bench_p10(cfg, loop, report)
        if want("P11"):
            bench_p11(cfg, loop, report)
    main_loop = loops[0]
    if want("P4"):
        bench_p4(cfg, main_loop, report)
    if want("P5"):
        bench_p5(cfg, main_loop, report)
    if want("P7"):
        bench_p7(cfg, report)
    if want("P8"):
        bench_p8(cfg, main_loop, report)
    if args.rust or "P6" in only:
        bench_p6(report)

    print_table(report)
    elapsed = perf() - started
    print(f"\n{cfg.mode} run took {elapsed:.1f} s; {machine()}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "mode": cfg.mode,
                    "machine": machine(),
                    "config": cfg.__dict__,
                    "rows": [r.__dict__ for r in report.rows],
                    "samples": report.series,
                },
                indent=1,
            )
        )
    missed = [r for r in report.rows if r.ok is False and (r.functional or not args.no_assert)]
    ignored = [r for r in report.rows if r.ok is False and not (r.functional or not args.no_assert)]
    if ignored:
        print(f"{len(ignored)} timing target(s) missed, not asserted (--no-assert)")
    if missed:
        print(
            f"FAILED: {len(missed)} target(s) missed: "
            + ", ".join(f"{r.id} {r.what}" for r in missed)
        )
        return 1
    print("all asserted targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
