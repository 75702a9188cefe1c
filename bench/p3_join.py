"""P3: ``join_all`` over N tasks that exit when the token fires vs ``asyncio.gather``."""

from __future__ import annotations

import asyncio

from harness import (
    KIND,
    NAME,
    Config,
    Dur,
    Report,
    Stamp,
    check,
    interleaved,
    ratio_row,
    settle,
)

from dig_service import (
    ShutdownReason,
    ShutdownToken,
    TaskRegistry,
)


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
