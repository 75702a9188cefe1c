"""P1: spawn and complete N trivial coroutines through ``TaskRegistry`` vs
``loop.create_task`` + a set, ``asyncio.TaskGroup``, an anyio task group, and
untracked ``loop.create_task`` alone (the floor: no tracking at all).
"""

from __future__ import annotations

import asyncio

import anyio
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
)

from dig_service import (
    ShutdownToken,
    TaskRegistry,
)


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


async def p1_untracked(n: int) -> dict[str, Dur]:
    """The floor: ``loop.create_task`` and nothing else (no set, no callback).

    Only the last task is kept, to know when all are done: tasks run in the
    order they were created and each ``nop()`` ends in its first step, so the
    last one done means every one is. The same ``sleep(0)`` poll as the others.
    """
    loop = asyncio.get_running_loop()
    t0 = Stamp.now()
    for _ in range(n):
        task = loop.create_task(nop())
    while not task.done():  # noqa: ASYNC110
        await asyncio.sleep(0)
    dt = t0.elapsed()
    check(task.done() and task.exception() is None, "P1 untracked: last task done")
    return {"main": dt}


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
            ("create_task alone (untracked)", "p1.untracked"),
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
    ratio_row(report, "P1", loop, s[0], s[5], 1.30)
