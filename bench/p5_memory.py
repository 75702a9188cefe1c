"""P5: 1M tasks spawned in waves of 1k live, in a fresh child process: the
registry ends empty and RSS stays flat after the first 10k.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
from typing import Any

from harness import (
    KIND,
    NAME,
    Config,
    Report,
    Row,
    fmt_s,
    perf,
    run_child,
)
from p1_spawn import nop

from dig_service import (
    ShutdownToken,
    TaskRegistry,
)


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
