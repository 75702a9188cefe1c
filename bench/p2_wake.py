"""P2: wake N coroutines parked on ``ShutdownToken.cancelled()`` vs
``asyncio.Event.wait()``.
"""

from __future__ import annotations

import asyncio

from harness import (
    Config,
    Countdown,
    Dur,
    Report,
    Stamp,
    interleaved,
    ratio_row,
    settle,
)

from dig_service import (
    ShutdownReason,
    ShutdownToken,
)


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
