"""P12: a supervised task that fails at once, restarted with zero backoff N times, vs
spawning N plain tasks that fail at once, one after another (each awaited before the
next is spawned).

Both variants run the same incarnation (``raise`` at once) through the same registry,
and both pay for the ``dig_service.tasks`` logger (a restart line, or a task failure)
with that logger disabled, so no handler's cost is timed: the ratio is the
supervisor's bookkeeping (the core's decision, the restart count, one loop turn per
restart) against a by-hand respawn loop. A by-hand loop of plain ``nop`` tasks is shown
as info.
"""

from __future__ import annotations

import logging

from harness import KIND, NAME, Config, Dur, Report, Stamp, check, interleaved, ratio_row

from dig_service import Restart, RestartPolicy, ShutdownToken, TaskRegistry

P12_N = 10_000
P12_N_QUICK = 2_000


async def fail() -> None:
    raise ConnectionResetError("peer hung up")


async def nop() -> None:
    return None


def quiet() -> None:
    """The task logger disabled: each log call is made, no handler runs."""
    logging.getLogger("dig_service.tasks").disabled = True


async def p12_supervised(n: int) -> dict[str, Dur]:
    quiet()
    reg = TaskRegistry(ShutdownToken())
    policy = RestartPolicy(
        Restart.Permanent, max_restarts=n, within=3600.0, backoff=0, max_backoff=0, critical=False
    )
    t0 = Stamp.now()
    handle = reg.supervise(NAME, KIND, fail, policy=policy)
    try:
        await handle
    except ConnectionResetError:
        pass
    dt = t0.elapsed()
    st = reg.stats()
    check(
        st.restarted == n and st.failed == 1 and st.live == 0 and handle.restarts == n,
        f"P12 supervised stats {st}",
    )
    return {"main": dt}


async def p12_plain(n: int) -> dict[str, Dur]:
    quiet()
    reg = TaskRegistry(ShutdownToken())
    t0 = Stamp.now()
    for _ in range(n + 1):
        try:
            await reg.spawn(NAME, KIND, fail())
        except ConnectionResetError:
            pass
    dt = t0.elapsed()
    st = reg.stats()
    check(st.failed == n + 1 and st.live == 0, f"P12 plain stats {st}")
    return {"main": dt}


async def p12_plain_nop(n: int) -> dict[str, Dur]:
    reg = TaskRegistry(ShutdownToken())
    t0 = Stamp.now()
    for _ in range(n + 1):
        await reg.spawn(NAME, KIND, nop())
    dt = t0.elapsed()
    check(reg.stats().completed == n + 1, "P12 plain nop stats")
    return {"main": dt}


def bench_p12(cfg: Config, loop: str, report: Report) -> None:
    n = P12_N_QUICK if cfg.mode == "quick" else P12_N
    print(f"\nP12 [{loop}] a supervised task failing at once, restarted {n:,} times")
    got = interleaved(
        loop,
        [
            ("supervise (fails at once)", "p12.supervised"),
            ("spawn one after another (fails at once)", "p12.plain"),
            ("spawn one after another (nop)", "p12.plain_nop"),
        ],
        cfg.repeats,
        n,
    )
    s = list(got.values())
    report.keep(f"P12/{loop}", s)
    ratio_row(report, "P12", loop, s[0], s[1], 2.0)
    ratio_row(report, "P12", loop, s[0], s[2], None)
