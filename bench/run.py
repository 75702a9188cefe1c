#!/usr/bin/env python3
"""dig_service performance suite: the targets of SPEC section 5.

One entry point for P1-P5, P7 and P8 (P6 is the Rust bench
``cargo bench --bench registry``; ``--rust`` runs it from here too)::

    .venv/bin/python bench/run.py                 # full run, default asyncio loop
    .venv/bin/python bench/run.py --loop uvloop   # the same on uvloop
    .venv/bin/python bench/run.py --loop both     # P1-P3 on both loops, the rest on asyncio
    .venv/bin/python bench/run.py --quick --no-assert   # CI smoke check (< 60 s)
    .venv/bin/python bench/run.py --only P1,P3 --json out.json

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
  ``asyncio.TaskGroup`` and an anyio task group: the ``async with`` block.
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
- P7: ``import dig_service`` in fresh interpreters, timed around the import
  statement; threads counted in ``/proc/self/task`` before and after the
  import, after loading the native core, and after running Python tasks
  through a registry (the tokio runtime must not start for those).
- P8: ``snapshot()`` with 100k live registry tasks (each named ``peer-<i>``),
  several calls on each of a few fresh loops.

Exit status 1 when a target is missed. ``--no-assert`` ignores the timing
targets (noisy on shared machines) but still fails on the functional checks
(a registry not empty, a wrong ``pending`` count, RSS growth, a thread
started at import), so a smoke run still proves the suite and the package work.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import anyio

from dig_service import (
    ShutdownDeadlineExceeded,
    ShutdownReason,
    ShutdownToken,
    TaskKind,
    TaskRegistry,
)

ROOT = Path(__file__).resolve().parent.parent
KIND = TaskKind.BackgroundLoop
# P1/P5 give every task this one name: the baselines name nothing, so the
# registry is not charged for formatting names a bare `create_task` skips.
NAME = "bench-task"

T = TypeVar("T")
perf = time.perf_counter
cpu = time.process_time
# Which clock the ratio targets are judged on ("wall" or "cpu"); set by --clock.
CLOCK = "wall"


class Dur(NamedTuple):
    """A measured duration on both clocks, in seconds."""

    wall: float
    cpu: float

    def on(self, clock: str) -> float:
        return self.wall if clock == "wall" else self.cpu


class Stamp(NamedTuple):
    wall: float
    cpu: float

    @staticmethod
    def now() -> Stamp:
        return Stamp(perf(), cpu())

    def since(self, earlier: Stamp) -> Dur:
        return Dur(self.wall - earlier.wall, self.cpu - earlier.cpu)

    def elapsed(self) -> Dur:
        return Stamp.now().since(self)


# ---------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Config:
    """Sizes and repeat counts of one run."""

    mode: str
    n: int  # P1-P3 tasks
    repeats: int
    p4_tasks: int
    p4_deadline: float
    p5_total: int
    p5_wave: int
    p5_base_after: int
    p7_runs: int
    p8_tasks: int
    p8_rounds: int
    p8_calls: int

    @staticmethod
    def for_mode(quick: bool, repeats: int | None) -> Config:
        if quick:
            return Config(
                mode="quick",
                n=10_000,
                repeats=repeats or 3,
                p4_tasks=10_000,
                p4_deadline=0.2,
                p5_total=100_000,
                p5_wave=1_000,
                p5_base_after=10_000,
                p7_runs=5,
                p8_tasks=20_000,
                p8_rounds=1,
                p8_calls=3,
            )
        return Config(
            mode="full",
            n=100_000,
            repeats=repeats or 15,
            p4_tasks=10_000,
            p4_deadline=0.2,
            p5_total=1_000_000,
            p5_wave=1_000,
            p5_base_after=10_000,
            p7_runs=15,
            p8_tasks=100_000,
            p8_rounds=3,
            p8_calls=5,
        )


# ---------------------------------------------------------------------------
# Statistics and reporting


@dataclass
class Series:
    """The samples of one variant, on the wall clock and the process CPU clock."""

    name: str
    samples: list[Dur] = field(default_factory=list)

    def add(self, d: Dur) -> None:
        self.samples.append(d)

    def values(self, clock: str | None = None) -> list[float]:
        return [d.on(clock or CLOCK) for d in self.samples]

    def median(self, clock: str | None = None) -> float:
        return statistics.median(self.values(clock))

    def spread(self, clock: str | None = None) -> float:
        v, m = self.values(clock), self.median(clock)
        return (max(v) - min(v)) / m if m > 0 else 0.0

    def line(self) -> str:
        w = self.values("wall")
        return (
            f"    {self.name:<36} median {fmt_s(self.median('wall')):>9}   "
            f"min {fmt_s(min(w)):>9}   max {fmt_s(max(w)):>9}   "
            f"spread {self.spread('wall') * 100:5.1f}%   "
            f"cpu median {fmt_s(self.median('cpu')):>9} (spread {self.spread('cpu') * 100:4.1f}%)"
            f"   n={len(w)}"
        )


def fmt_s(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


@dataclass
class Row:
    """One line of the final table."""

    id: str
    loop: str
    what: str
    measured: str
    target: str
    ok: bool | None  # None: informational, not a target
    functional: bool = False  # deterministic check: asserted even with --no-assert
    value: float | None = None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    series: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        mark = {True: "ok", False: "MISSED", None: "info"}[row.ok]
        print(
            f"  -> {row.id} [{row.loop}] {row.what}: {row.measured}  (target {row.target}) {mark}"
        )

    def keep(self, key: str, series: Sequence[Series]) -> None:
        self.series[key] = {s.name: [[d.wall, d.cpu] for d in s.samples] for s in series}


def ratio_row(
    report: Report,
    pid: str,
    loop: str,
    cand: Series,
    base: Series,
    limit: float | None,
    *,
    strict: bool = False,
) -> None:
    """Add `cand / base` to the table; `limit` None means informational.

    The verdict uses the ratio of medians on the `--clock` clock; the other
    clock's ratio and the median of the per-repeat paired ratios are shown.
    """
    r = cand.median() / base.median()
    other = "cpu" if CLOCK == "wall" else "wall"
    r_other = cand.median(other) / base.median(other)
    paired = statistics.median(
        c / b for c, b in zip(cand.values(), base.values(), strict=True) if b > 0
    )
    if limit is None:
        target, ok = "info", None
    elif strict:
        target, ok = f"< {limit:.2f}x", r < limit
    else:
        target, ok = f"<= {limit:.2f}x", r <= limit
    report.add(
        Row(
            pid,
            loop,
            f"{cand.name} / {base.name}",
            f"{r:.3f}x {CLOCK} ({other} {r_other:.3f}x, paired {paired:.3f}x; "
            f"{fmt_s(cand.median())} vs {fmt_s(base.median())})",
            target,
            ok,
            value=r,
        )
    )


# ---------------------------------------------------------------------------
# Running samples


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_on(loop: str, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one sample on a fresh loop; the coroutine returns its timed duration.

    Everything alive before the sample is collected and then frozen out of
    the collector's way, so the sample's garbage collections walk the
    sample's own objects, not whatever earlier samples or imports left.
    """
    gc.collect()
    gc.freeze()
    try:
        with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
            return runner.run(make())
    finally:
        gc.unfreeze()


def interleaved(
    loop: str,
    variants: Sequence[tuple[str, str]],
    repeats: int,
    n: int,
    extras: Sequence[str] = (),
) -> dict[str, Series]:
    """Every variant once per repeat, the order rotated by one each repeat.

    `variants` are (label, case id) pairs. Each sample runs in a fresh child
    process (see `sample_child`), so no sample inherits another's heap,
    allocator state or garbage. Returns one series per label, plus one per
    `extras` key a case reports (labelled "<label>: <key>").
    """
    series: dict[str, Series] = {label: Series(label) for label, _ in variants}
    for label, _ in variants:
        for key in extras:
            series[f"{label}: {key}"] = Series(f"{label}: {key}")
    k = len(variants)
    for rep in range(repeats):
        for j in range(k):
            label, case = variants[(rep + j) % k]
            out = run_child(
                ["--_child", "sample", "--loop", loop, "--_args", json.dumps([case, n])]
            )
            series[label].add(Dur(*out["main"]))
            for key in extras:
                series[f"{label}: {key}"].add(Dur(*out[key]))
    for sr in series.values():
        print(sr.line())
    return series


def interleaved_here(
    loop: str,
    variants: Sequence[tuple[str, Callable[[], Coroutine[Any, Any, Dur]]]],
    repeats: int,
) -> list[Series]:
    """Like `interleaved`, in this process (P4: each sample is mostly a timer)."""
    for _name, make in variants:
        run_on(loop, make)  # warm-up
    series = [Series(name) for name, _ in variants]
    k = len(variants)
    for rep in range(repeats):
        for j in range(k):
            i = (rep + j) % k
            series[i].add(run_on(loop, variants[i][1]))
    for sr in series:
        print(sr.line())
    return series


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


async def settle(turns: int = 2) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


class Countdown:
    """Resolves `done` once `hit()` has been called `n` times (cheap, same for all variants)."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def hit(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.done.set_result(None)


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(f"functional check failed: {what}")


# ---------------------------------------------------------------------------
# P1: spawn + complete N trivial coroutines


async def nop() -> None:
    return None


# Each variant is written the way its documentation writes it (the asyncio
# docs' "keep a reference in a set" idiom for the bare baseline), with no
# hoisting of bound methods out of the loop; "create_task + set (hoisted)"
# shows what hoisting buys the bare baseline.


async def p1_registry(n: int) -> dict[str, Dur]:
    reg = TaskRegistry(ShutdownToken())
    t0 = Stamp.now()
    for _ in range(n):
        reg.spawn(NAME, KIND, nop())
    while len(reg):  # noqa: ASYNC110 (same cheap poll for every variant)
        await asyncio.sleep(0)
    dt = t0.elapsed()
    st = reg.stats()
    check(st.completed == n and st.live == 0, f"P1 registry stats {st}")
    return {"main": dt}


async def p1_bare(n: int) -> dict[str, Dur]:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    t0 = Stamp.now()
    for _ in range(n):
        task = loop.create_task(nop())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:  # noqa: ASYNC110
        await asyncio.sleep(0)
    return {"main": t0.elapsed()}


async def p1_bare_hoisted(n: int) -> dict[str, Dur]:
    create = asyncio.get_running_loop().create_task
    tasks: set[asyncio.Task[None]] = set()
    add, discard = tasks.add, tasks.discard
    t0 = Stamp.now()
    for _ in range(n):
        t = create(nop())
        add(t)
        t.add_done_callback(discard)
    while tasks:  # noqa: ASYNC110
        await asyncio.sleep(0)
    return {"main": t0.elapsed()}


async def p1_taskgroup(n: int) -> dict[str, Dur]:
    t0 = Stamp.now()
    async with asyncio.TaskGroup() as tg:
        for _ in range(n):
            tg.create_task(nop())
    return {"main": t0.elapsed()}


async def p1_anyio(n: int) -> dict[str, Dur]:
    t0 = Stamp.now()
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(nop)
    return {"main": t0.elapsed()}


def bench_p1(cfg: Config, loop: str, report: Report) -> None:
    n = cfg.n
    print(f"\nP1 [{loop}] spawn + complete {n:,} trivial coroutines")
    got = interleaved(
        loop,
        [
            ("TaskRegistry.spawn", "p1.registry"),
            ("create_task + set", "p1.bare"),
            ("asyncio.TaskGroup", "p1.taskgroup"),
            ("anyio task group", "p1.anyio"),
            ("create_task + set (hoisted)", "p1.bare_hoisted"),
        ],
        cfg.repeats,
        n,
    )
    s = list(got.values())
    report.keep(f"P1/{loop}", s)
    ratio_row(report, "P1", loop, s[0], s[1], 1.15)
    ratio_row(report, "P1", loop, s[0], s[2], 1.00, strict=True)
    ratio_row(report, "P1", loop, s[0], s[3], None)
    ratio_row(report, "P1", loop, s[0], s[4], None)


# ---------------------------------------------------------------------------
# P2: wake N coroutines parked on ShutdownToken.cancelled() vs asyncio.Event


async def p2_token(n: int) -> dict[str, Dur]:
    tok = ShutdownToken()
    cd = Countdown(n)

    async def waiter() -> None:
        await tok.cancelled()
        cd.hit()

    create = asyncio.get_running_loop().create_task
    t0 = Stamp.now()
    tasks = [create(waiter()) for _ in range(n)]
    await settle()
    t1 = Stamp.now()
    tok.cancel(ShutdownReason.UserRequested())
    await cd.done
    t2 = Stamp.now()
    del tasks
    return {"main": t2.since(t1), "park": t1.since(t0)}


async def p2_event(n: int) -> dict[str, Dur]:
    ev = asyncio.Event()
    cd = Countdown(n)

    async def waiter() -> None:
        await ev.wait()
        cd.hit()

    create = asyncio.get_running_loop().create_task
    t0 = Stamp.now()
    tasks = [create(waiter()) for _ in range(n)]
    await settle()
    t1 = Stamp.now()
    ev.set()
    await cd.done
    t2 = Stamp.now()
    del tasks
    return {"main": t2.since(t1), "park": t1.since(t0)}


def bench_p2(cfg: Config, loop: str, report: Report) -> None:
    n = cfg.n
    print(
        f"\nP2 [{loop}] wake {n:,} coroutines parked on one shutdown signal"
        " (timed: signal -> all resumed)"
    )
    got = interleaved(
        loop,
        [
            ("ShutdownToken.cancel -> waiters", "p2.token"),
            ("asyncio.Event.set -> waiters", "p2.event"),
        ],
        cfg.repeats,
        n,
        extras=("park",),
    )
    s = list(got.values())
    report.keep(f"P2/{loop}", s)
    ratio_row(report, "P2", loop, s[0], s[1], 1.2)
    park_tok, park_ev = s[2], s[3]
    ratio_row(report, "P2", loop, park_tok, park_ev, None)


# ---------------------------------------------------------------------------
# P3: join_all over N tasks that exit when the token fires vs asyncio.gather


async def exits_on_cancel(tok: ShutdownToken) -> None:
    await tok.cancelled()


async def p3_join_all(n: int) -> dict[str, Dur]:
    tok = ShutdownToken()
    reg = TaskRegistry(tok)
    spawn = reg.spawn
    for _ in range(n):
        spawn(NAME, KIND, exits_on_cancel(tok))
    await settle()
    t0 = Stamp.now()
    tok.cancel(ShutdownReason.UserRequested())
    await reg.join_all(600.0)
    dt = t0.elapsed()
    check(len(reg) == 0 and reg.stats().completed == n, f"P3 registry after join {reg.stats()}")
    return {"main": dt}


async def p3_gather(n: int) -> dict[str, Dur]:
    tok = ShutdownToken()
    create = asyncio.get_running_loop().create_task
    tasks = [create(exits_on_cancel(tok)) for _ in range(n)]
    await settle()
    t0 = Stamp.now()
    tok.cancel(ShutdownReason.UserRequested())
    await asyncio.gather(*tasks)
    return {"main": t0.elapsed()}


def bench_p3(cfg: Config, loop: str, report: Report) -> None:
    n = cfg.n
    print(
        f"\nP3 [{loop}] join {n:,} tasks that exit when the token fires (timed: cancel -> joined)"
    )
    got = interleaved(
        loop,
        [("TaskRegistry.join_all", "p3.join_all"), ("asyncio.gather", "p3.gather")],
        cfg.repeats,
        n,
    )
    s = list(got.values())
    report.keep(f"P3/{loop}", s)
    ratio_row(report, "P3", loop, s[0], s[1], 1.2)


CASES: dict[str, Callable[[int], Coroutine[Any, Any, dict[str, Dur]]]] = {
    "p1.registry": p1_registry,
    "p1.bare": p1_bare,
    "p1.bare_hoisted": p1_bare_hoisted,
    "p1.taskgroup": p1_taskgroup,
    "p1.anyio": p1_anyio,
    "p2.token": p2_token,
    "p2.event": p2_event,
    "p3.join_all": p3_join_all,
    "p3.gather": p3_gather,
}


# ---------------------------------------------------------------------------
# P4: join_all(0.2) over tasks that ignore the shutdown


async def ignores_token() -> None:
    # Never looks at the token; obeys Task.cancel() like any coroutine.
    await asyncio.sleep(3600)


class Stubborn:
    """Tasks that also swallow Task.cancel() until `release`d."""

    def __init__(self) -> None:
        self.released = False

    async def body(self) -> None:
        while not self.released:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    def release(self) -> None:
        self.released = True


async def p4_registry(n: int, deadline: float, stubborn: bool, out: dict[str, float]) -> Dur:
    tok = ShutdownToken()
    reg = TaskRegistry(tok)
    s = Stubborn()
    handles = [
        reg.spawn(f"straggler-{i}", KIND, s.body() if stubborn else ignores_token())
        for i in range(n)
    ]
    await settle()
    tok.cancel(ShutdownReason.UserRequested())
    pending = -1
    t0 = Stamp.now()
    try:
        await reg.join_all(deadline)
    except ShutdownDeadlineExceeded as e:
        pending = e.pending
    dt = t0.elapsed()
    out["pending"] = pending
    if stubborn:
        check(len(reg) == n, f"P4 stubborn tasks still tracked ({len(reg)})")
        s.release()
        for h in handles:
            h.abort()
    for _ in range(20):
        if not len(reg):
            break
        await asyncio.sleep(0)
    out["left"] = len(reg)
    return dt


async def p4_wait(n: int, deadline: float) -> Dur:
    create = asyncio.get_running_loop().create_task
    tasks = [create(ignores_token()) for _ in range(n)]
    await settle()
    t0 = Stamp.now()
    _, pending = await asyncio.wait(tasks, timeout=deadline)
    for t in pending:
        t.cancel()
    await asyncio.sleep(0)
    return t0.elapsed()


def bench_p4(cfg: Config, loop: str, report: Report) -> None:
    n, d = cfg.p4_tasks, cfg.p4_deadline
    print(f"\nP4 [{loop}] join_all({d}) over {n:,} tasks that ignore the shutdown token")
    info: dict[str, list[float]] = {"pending": [], "left": [], "s_pending": [], "s_left": []}

    async def plain() -> Dur:
        out: dict[str, float] = {}
        dt = await p4_registry(n, d, False, out)
        info["pending"].append(out["pending"])
        info["left"].append(out["left"])
        return dt

    async def stubborn() -> Dur:
        out: dict[str, float] = {}
        dt = await p4_registry(n, d, True, out)
        info["s_pending"].append(out["pending"])
        info["s_left"].append(out["left"])
        return dt

    s = interleaved_here(
        loop,
        [
            ("join_all: ignore token", plain),
            ("join_all: ignore token+Task.cancel", stubborn),
            ("asyncio.wait(timeout)+cancel", lambda: p4_wait(n, d)),
        ],
        max(3, cfg.repeats // 2 + 1),
    )
    report.keep(f"P4/{loop}", s)
    lo, hi = d, d + 0.05
    for series, pk, lk in ((s[0], "pending", "left"), (s[1], "s_pending", "s_left")):
        # A deadline is a wall-clock promise, whatever --clock says.
        med, worst = series.median("wall"), max(series.values("wall"))
        report.add(
            Row(
                "P4",
                loop,
                f"{series.name}: wall elapsed (median; worst)",
                f"{fmt_s(med)}; {fmt_s(worst)}",
                f"{lo:.2f}-{hi:.2f} s",
                lo <= med <= hi,
                value=med,
            )
        )
        pend = sorted(set(info[pk]))
        left = sorted(set(info[lk]))
        report.add(
            Row(
                "P4",
                loop,
                f"{series.name}: pending; tracked after",
                f"pending {pend}; left {left}",
                f"pending == {n}; 0 left",
                pend == [n] and left == [0],
                functional=True,
            )
        )
    report.add(
        Row(
            "P4",
            loop,
            f"{s[2].name}: wall elapsed (median)",
            fmt_s(s[2].median("wall")),
            "info",
            None,
        )
    )


# ---------------------------------------------------------------------------
# P5: 1M tasks in waves of 1k live (run in a fresh child process)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def p5_child(total: int, wave: int, base_after: int, variant: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    reg = TaskRegistry(ShutdownToken())
    tasks: set[asyncio.Task[None]] = set()
    base = peak = 0
    spawned = 0
    t0 = perf()
    while spawned < total:
        if variant == "registry":
            for _ in range(wave):
                reg.spawn(NAME, KIND, nop())
            while len(reg):  # noqa: ASYNC110
                await asyncio.sleep(0)
        else:
            for _ in range(wave):
                task = loop.create_task(nop())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:  # noqa: ASYNC110
                await asyncio.sleep(0)
        spawned += wave
        if spawned == base_after:
            gc.collect()
            base = peak = rss_bytes()
        elif spawned > base_after and spawned % (wave * 50) == 0:
            peak = max(peak, rss_bytes())
    elapsed = perf() - t0
    gc.collect()
    end = rss_bytes()
    peak = max(peak, end)
    st = reg.stats()
    return {
        "variant": variant,
        "elapsed": elapsed,
        "rss_base": base,
        "rss_end": end,
        "rss_peak": peak,
        "len": len(reg) if variant == "registry" else len(tasks),
        "spawned": st.spawned if variant == "registry" else spawned,
        "completed": st.completed if variant == "registry" else spawned,
    }


def run_child(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def bench_p5(cfg: Config, loop: str, report: Report) -> None:
    total, wave = cfg.p5_total, cfg.p5_wave
    print(f"\nP5 [{loop}] {total:,} tasks in waves of {wave:,} live (fresh child process each)")
    res: dict[str, dict[str, Any]] = {}
    for variant in ("registry", "bare"):
        r = run_child(
            [
                "--_child",
                "p5",
                "--loop",
                loop,
                "--_args",
                json.dumps([total, wave, cfg.p5_base_after, variant]),
            ]
        )
        res[variant] = r
        mb = 1024 * 1024
        print(
            f"    {variant:<10} {fmt_s(r['elapsed']):>9}  RSS at {cfg.p5_base_after:,}: "
            f"{r['rss_base'] / mb:.1f} MB, end {r['rss_end'] / mb:.1f} MB "
            f"(+{(r['rss_end'] - r['rss_base']) / mb:.2f}), "
            f"peak +{(r['rss_peak'] - r['rss_base']) / mb:.2f} MB"
        )
    r = res["registry"]
    grow = (r["rss_end"] - r["rss_base"]) / (1024 * 1024)
    peak = (r["rss_peak"] - r["rss_base"]) / (1024 * 1024)
    report.add(
        Row(
            "P5",
            loop,
            f"RSS growth after the first {cfg.p5_base_after:,} (end; peak)",
            f"+{grow:.2f} MB; +{peak:.2f} MB",
            "<= 5 MB",
            grow <= 5.0 and peak <= 5.0,
            functional=True,
            value=grow,
        )
    )
    report.add(
        Row(
            "P5",
            loop,
            "registry at the end: len; spawned; completed",
            f"{r['len']}; {r['spawned']:,}; {r['completed']:,}",
            f"0; {total:,}; {total:,}",
            r["len"] == 0 and r["spawned"] == total and r["completed"] == total,
            functional=True,
        )
    )
    b = res["bare"]
    report.add(
        Row(
            "P5",
            loop,
            "time registry / create_task + set",
            f"{r['elapsed'] / b['elapsed']:.3f}x ({fmt_s(r['elapsed'])} vs {fmt_s(b['elapsed'])})",
            "info",
            None,
        )
    )


# ---------------------------------------------------------------------------
# P7: import cost and threads (fresh interpreter each run)

P7_CHILD = r"""
import json, os, sys, time
def threads():
    return len(os.listdir("/proc/self/task"))
out = {"threads_start": threads()}
t = time.perf_counter()
import dig_service
out["import"] = time.perf_counter() - t
out["threads_import"] = threads()
t = time.perf_counter()
from dig_service import ShutdownToken, TaskRegistry, TaskKind
out["core"] = time.perf_counter() - t
t = time.perf_counter()
import dig_service._service
out["service"] = time.perf_counter() - t
out["threads_core"] = threads()
import asyncio
async def use():
    reg = TaskRegistry(ShutdownToken())
    async def nop():
        pass
    reg.spawn("x", TaskKind.BackgroundLoop, nop())
    await reg.join_all(1.0)
asyncio.run(use())
from dig_service import _core
out["threads_used"] = threads()
out["runtime_started"] = _core.runtime_started()
t = time.perf_counter()
print(json.dumps(out))
"""

P7_BASE = r"""
import json, time
t = time.perf_counter()
import asyncio
print(json.dumps({"asyncio": time.perf_counter() - t}))
"""


def bench_p7(cfg: Config, report: Report) -> None:
    print(f"\nP7 import cost, {cfg.p7_runs} fresh interpreters each")

    def child(code: str) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
        )
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return out

    child(P7_CHILD)  # warm the bytecode cache
    runs: list[dict[str, Any]] = []
    base = Series("import asyncio (reference)")
    for _ in range(cfg.p7_runs):
        runs.append(child(P7_CHILD))
        t = float(child(P7_BASE)["asyncio"])
        base.add(Dur(t, t))

    def series(name: str, key: str) -> Series:
        return Series(name, [Dur(float(r[key]), float(r[key])) for r in runs])

    imp = series("import dig_service", "import")
    core = series("+ first name from _core", "core")
    svc = series("+ dig_service._service", "service")
    for s in (imp, core, svc, base):
        print(s.line())
    report.keep("P7", [imp, core, svc, base])
    report.add(
        Row(
            "P7",
            "-",
            "import dig_service (median)",
            fmt_s(imp.median("wall")),
            "<= 50 ms",
            imp.median("wall") <= 0.050,
            value=imp.median("wall"),
        )
    )
    report.add(
        Row(
            "P7",
            "-",
            "import + _core + _service (median, info)",
            fmt_s(imp.median("wall") + core.median("wall") + svc.median("wall")),
            "info",
            None,
        )
    )
    starts = {r["threads_start"] for r in runs}
    after = {(r["threads_import"], r["threads_core"], r["threads_used"]) for r in runs}
    started = {r["runtime_started"] for r in runs}
    ok = all(
        r["threads_import"] == r["threads_start"]
        and r["threads_core"] == r["threads_start"]
        and r["threads_used"] == r["threads_start"]
        for r in runs
    ) and started == {False}
    report.add(
        Row(
            "P7",
            "-",
            "threads: start -> import, _core, Python-task use",
            f"{sorted(starts)} -> {sorted(after)}; runtime_started {sorted(started)}",
            "no new thread",
            ok,
            functional=True,
        )
    )


# ---------------------------------------------------------------------------
# P8: snapshot() with N live tasks


async def p8_round(n: int, calls: int, snap: Series, base: Series) -> Dur:
    tok = ShutdownToken()
    reg = TaskRegistry(tok)
    loop = asyncio.get_running_loop()
    handles = [reg.spawn(f"peer-{i}", KIND, exits_on_cancel(tok)) for i in range(n)]
    await settle()
    tasks = list(asyncio.all_tasks(loop))
    for _ in range(calls):
        gc.collect()
        t0 = Stamp.now()
        s = reg.snapshot()
        snap.add(t0.elapsed())
        check(len(s) == n, f"P8 snapshot has {len(s)} entries")
        del s
        gc.collect()
        t0 = Stamp.now()
        b = [(t.get_name(), t.get_coro()) for t in tasks]
        base.add(t0.elapsed())
        del b
    tok.cancel(ShutdownReason.UserRequested())
    await reg.join_all(600.0)
    del handles
    return Dur(0.0, 0.0)


def bench_p8(cfg: Config, loop: str, report: Report) -> None:
    n = cfg.p8_tasks
    print(
        f"\nP8 [{loop}] snapshot() with {n:,} live tasks ({cfg.p8_rounds} x {cfg.p8_calls} calls)"
    )
    snap = Series("TaskRegistry.snapshot()")
    base = Series("[(t.get_name(), t.get_coro()) ...]")
    run_on(loop, lambda: p8_round(min(n, 1000), 1, Series("w"), Series("w")))
    for _ in range(cfg.p8_rounds):
        run_on(loop, lambda: p8_round(n, cfg.p8_calls, snap, base))
    print(snap.line())
    print(base.line())
    report.keep(f"P8/{loop}", [snap, base])
    report.add(
        Row(
            "P8",
            loop,
            f"snapshot() with {n:,} live: wall (median; worst)",
            f"{fmt_s(snap.median('wall'))}; {fmt_s(max(snap.values('wall')))}",
            "<= 50 ms",
            snap.median("wall") <= 0.050,
            value=snap.median("wall"),
        )
    )
    ratio_row(report, "P8", loop, snap, base, None)


# ---------------------------------------------------------------------------
# P6 (optional): the Rust bench


def bench_p6(report: Report) -> None:
    print("\nP6 cargo bench --bench registry")
    proc = subprocess.run(
        ["cargo", "bench", "--bench", "registry"], capture_output=True, text=True, cwd=ROOT
    )
    sys.stdout.write(proc.stdout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        report.add(Row("P6", "tokio", "cargo bench failed", proc.stderr[-300:], "<= 1.30x", False))
        return
    data = json.loads(line.removeprefix("BENCH_JSON "))
    r = float(data["registry_over_tracker"])
    report.add(
        Row(
            "P6",
            "tokio mt",
            "TaskRegistry / TaskTracker (multi-thread, 2 workers)",
            f"{r:.3f}x (JoinSet {data['registry_over_joinset']:.3f}x; "
            f"shared name {data['shared_name_over_tracker']:.3f}x)",
            "<= 1.30x",
            r <= 1.30,
            value=r,
        )
    )
    rc = float(data["current_registry_over_tracker"])
    report.add(
        Row(
            "P6",
            "tokio ct",
            "TaskRegistry / TaskTracker (current-thread)",
            f"{rc:.3f}x (JoinSet {data['current_registry_over_joinset']:.3f}x)",
            "info",
            None,
            value=rc,
        )
    )


# ---------------------------------------------------------------------------
# Main


def machine() -> str:
    cpu = "?"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return (
        f"{platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} CPU "
        f"({cpu}); Python {platform.python_version()}; "
        f"load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def print_table(report: Report) -> None:
    headers = ("id", "loop", "what", "measured", "target", "result")
    rows = [
        (
            r.id,
            r.loop,
            r.what,
            r.measured,
            r.target,
            {True: "ok", False: "MISSED", None: "info"}[r.ok],
        )
        for r in report.rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    print()
    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small N, few repeats (< 60 s)")
    p.add_argument(
        "--loop",
        choices=("asyncio", "uvloop", "both"),
        default="asyncio",
        help="loop(s) for P1-P3; P4, P5, P8 run on the first one named",
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
        with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
            out = runner.run(p5_child(total, wave, base_after, variant))
        print(json.dumps(out))
        return 0

    global CLOCK
    CLOCK = args.clock
    cfg = Config.for_mode(args.quick, args.repeats)
    only = {s.strip().upper() for s in args.only.split(",") if s.strip()}

    def want(pid: str) -> bool:
        return not only or pid in only

    loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    report = Report()
    started = perf()
    print(f"dig_service bench ({cfg.mode}): {machine()}")
    print(f"loops {loops}; repeats {cfg.repeats}; N = {cfg.n:,}; ratios judged on {CLOCK} clock")
    for loop in loops:
        if want("P1"):
            bench_p1(cfg, loop, report)
        if want("P2"):
            bench_p2(cfg, loop, report)
        if want("P3"):
            bench_p3(cfg, loop, report)
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
