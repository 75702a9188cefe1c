"""The benchmark harness: clocks, configuration, running samples (interleaved,
each in a fresh child process of ``run.py``), statistics and the report.

The targets (``p1_spawn.py`` ... ``p8_snapshot.py``) measure; this module
runs their samples and judges them; ``run.py`` is the entry point.
"""

from __future__ import annotations

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

from dig_service import TaskKind

ROOT = Path(__file__).resolve().parent.parent
RUN_PY = Path(__file__).resolve().with_name("run.py")
"""The entry point: child processes run it (``--_child``)."""
KIND = TaskKind.BackgroundLoop
# P1/P5 give every task this one name: the baselines name nothing, so the
# registry is not charged for formatting names a bare `create_task` skips.
NAME = "bench-task"

T = TypeVar("T")
perf = time.perf_counter
cpu = time.process_time
# Which clock the ratio targets are judged on ("wall" or "cpu"); set by
# run.py's --clock (as `harness.CLOCK`), read at each use.
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


def run_child(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(RUN_PY), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


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
