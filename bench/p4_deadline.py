"""P4: ``join_all(0.2)`` over tasks that ignore the shutdown (and over tasks that
also swallow ``Task.cancel()``): the deadline holds and names them all.
"""

from __future__ import annotations

import asyncio

from harness import (
    KIND,
    Config,
    Dur,
    Report,
    Row,
    Stamp,
    check,
    fmt_s,
    interleaved_here,
    settle,
)

from dig_service import (
    ShutdownDeadlineExceeded,
    ShutdownReason,
    ShutdownToken,
    TaskRegistry,
)


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
