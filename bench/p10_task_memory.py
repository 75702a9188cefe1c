"""P10: memory of 100k live tracked tasks, in bytes a task over the bare set idiom.

Each sample is a fresh child process: it parks N tasks on one shared future
(``async def park(f): await f``), spawned through ``TaskRegistry.spawn`` or
with the asyncio docs' idiom (``loop.create_task`` + a set +
``add_done_callback(set.discard)``; unnamed as the docs write it, and with
``name=NAME``, the one constant name the registry's tasks get here), lets
each take its first step (so every coroutine is suspended, its frame live),
collects garbage and reads RSS; reads it again four loop turns later
(settled: the registry has by then given every task its done callback,
see ``young.rs``) and keeps the worse of the two readings;
then releases them and checks every one finished. Per task:
``(RSS with N live - RSS before the first spawn) / N``; target:
``median(registry) - median(bare, named) <= 64`` bytes. Judged against the
named bare idiom: an unnamed asyncio task may format its own "Task-<n>"
string (eagerly on 3.11), which a registry task given a shared constant
name does not; that would credit the registry with ~50 bytes a task that
tracking has nothing to do with. The docs' unnamed idiom is shown as info.

Why RSS and not ``tracemalloc``: ``tracemalloc`` sees only what goes through
Python's allocators. The registry's own slab and each task's native record
are allocated by Rust (the system allocator), which ``tracemalloc`` never
sees: it would report the registry as nearly free. RSS sees everything; its
granularity is a page, which at 100k tasks is 0.04 bytes a task. Its weak
spot, allocator slack (a free list or arena grown but not yet touched),
is the same for both variants. The ``tracemalloc`` figure (Python heap only)
is shown beside it as info, to split the cost into Python and native: it
is taken in a separate child, since tracing slows every allocation and
adds its own memory to RSS (full runs only: ``--quick`` skips it).
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import statistics
import tracemalloc
from typing import Any

from harness import KIND, NAME, Config, Report, Row, check, run_child

from dig_service import ShutdownToken, TaskRegistry

P10_TASKS = 100_000
P10_TASKS_QUICK = 20_000
LIMIT = 64.0


async def park(f: asyncio.Future[None]) -> None:
    await f


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def p10_child(n: int, variant: str, traced: bool) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    reg = TaskRegistry(ShutdownToken())
    tasks: set[asyncio.Task[None]] = set()
    gate: asyncio.Future[None] = loop.create_future()
    # Warm the code paths (imports, caches) with a few tasks first.
    warm: asyncio.Future[None] = loop.create_future()
    for _ in range(100):
        if variant == "registry":
            reg.spawn(NAME, KIND, park(warm))
        else:
            t = loop.create_task(park(warm))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
    await asyncio.sleep(0)
    warm.set_result(None)
    while len(reg) or tasks:  # noqa: ASYNC110
        await asyncio.sleep(0)
    gc.collect()
    if traced:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0] if traced else rss_bytes()
    if variant == "registry":
        for _ in range(n):
            reg.spawn(NAME, KIND, park(gate))
    elif variant == "bare":
        for _ in range(n):
            task = loop.create_task(park(gate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    else:
        for _ in range(n):
            task = loop.create_task(park(gate), name=NAME)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    await asyncio.sleep(0)  # every task takes its first step and parks on `gate`
    gc.collect()
    live = len(reg) if variant == "registry" else len(tasks)
    first = tracemalloc.get_traced_memory()[0] if traced else rss_bytes()
    # Settled: a few more turns, after which the registry has moved every
    # task out of its loop's young set (they get their done callbacks);
    # the memory of a long-lived task is this one. The worse reading counts.
    for _ in range(4):
        await asyncio.sleep(0)
    gc.collect()
    settled = tracemalloc.get_traced_memory()[0] if traced else rss_bytes()
    after = max(first, settled)
    if traced:
        tracemalloc.stop()
    gate.set_result(None)
    while len(reg) or tasks:  # noqa: ASYNC110
        await asyncio.sleep(0)
    if variant == "registry":
        st = reg.stats()
        check(st.completed == n + 100 and st.live == 0, f"P10 registry stats {st}")
    check(live == n, f"P10 {variant}: {live} live of {n}")
    return {
        "per_task": (after - before) / n,
        "first": (first - before) / n,
        "settled": (settled - before) / n,
    }


def bench_p10(cfg: Config, loop: str, report: Report) -> None:
    n = P10_TASKS_QUICK if cfg.mode == "quick" else P10_TASKS
    reps = max(3, cfg.repeats // 3)
    print(f"\nP10 [{loop}] bytes a live task, {n:,} tasks, {reps} fresh children each (RSS)")
    got: dict[tuple[str, bool], list[float]] = {}
    readings: dict[str, list[tuple[float, float]]] = {}
    for rep in range(reps):
        variants = ("registry", "bare_named", "bare")
        k = rep % len(variants)
        order = variants[k:] + variants[:k]
        for traced in (False,) if cfg.mode == "quick" else (False, True):
            for variant in order:
                out = run_child(
                    ["--_child", "p10", "--loop", loop, "--_args", json.dumps([n, variant, traced])]
                )
                got.setdefault((variant, traced), []).append(float(out["per_task"]))
                if not traced:
                    readings.setdefault(variant, []).append(
                        (float(out["first"]), float(out["settled"]))
                    )
    med = {k: statistics.median(v) for k, v in got.items()}
    for (variant, traced), v in sorted(got.items()):
        what = "tracemalloc (Python heap)" if traced else "RSS"
        print(
            f"    {variant:<10} {what:<26} median {med[(variant, traced)]:7.1f} B/task   "
            f"min {min(v):7.1f}   max {max(v):7.1f}   n={len(v)}"
        )
    for variant, pairs in sorted(readings.items()):
        print(
            f"    {variant:<10} RSS after the first step / settled (4 turns later): "
            f"median {statistics.median(p[0] for p in pairs):7.1f} / "
            f"{statistics.median(p[1] for p in pairs):7.1f} B/task (the worse counts)"
        )
    reg = med[("registry", False)]
    for base, label, limit in (
        ("bare_named", "bare set idiom, same name", LIMIT),
        ("bare", "bare set idiom, unnamed (docs)", None),
    ):
        over = reg - med[(base, False)]
        py = med.get(("registry", True), math.nan) - med.get((base, True), math.nan)
        heap = "" if math.isnan(py) else f"; Python heap {py:+.1f} B (tracemalloc)"
        report.add(
            Row(
                "P10",
                loop,
                f"bytes a live task, registry - {label} (RSS, medians)",
                f"{over:+.1f} B ({reg:.1f} vs {med[(base, False)]:.1f}){heap}",
                "info" if limit is None else f"<= +{limit:.0f} B",
                None if limit is None else over <= limit,
                value=over,
            )
        )
