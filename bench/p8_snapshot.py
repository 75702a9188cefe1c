"""P8: ``snapshot()`` with N live tasks."""

from __future__ import annotations

import asyncio
import gc

from harness import (
    KIND,
    Config,
    Dur,
    Report,
    Row,
    Series,
    Stamp,
    check,
    fmt_s,
    ratio_row,
    run_on,
    settle,
)
from p3_join import exits_on_cancel

from dig_service import (
    ShutdownReason,
    ShutdownToken,
    TaskRegistry,
)


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
