"""P9: 1,000 services started and stopped one after another in one process
(10 tracked tasks each, default hooks) vs the same lifecycle hand-written on
``asyncio.TaskGroup`` and an ``asyncio.Event``; and no growth in RSS, threads
or open fds.

One service, both variants, the same shape:

- dig_service: ``Service(node)`` whose ``pre_start``, ``on_start``, ``on_stop``
  and ``post_stop`` are the defaults (they do nothing); ``run`` spawns 10
  tasks through ``ctx.tasks`` that each ``await ctx.shutdown.cancelled()``,
  says it is ready, and waits for the token like the default ``run``. The
  driver starts ``svc.start()`` as a task, waits until ``run`` is ready and
  the 10 tasks have started, calls ``svc.request_shutdown(UserRequested)``
  and awaits ``start()`` (graceful exit checked).
- hand-written: ``async with asyncio.TaskGroup() as tg`` running a ``run``
  coroutine that spawns 10 tasks in the group that each ``await
  event.wait()``, says it is ready and waits on the event; the driver waits
  the same way, sets the event and awaits the group's task.

Timed: the 1,000 lifecycles, one after another. The split of each variant's
time into start-up (task created -> ready and the 10 tasks started) and
shut-down (stop requested -> exited) is shown as info.

Resources (a separate fresh child): 100 services to warm up, then RSS
(``/proc/self/statm``, after ``gc.collect()``), OS threads
(``/proc/self/task``) and open fds (``/proc/self/fd``); then N services and
the same readings, then N more: the second batch must not grow them (the
first may still be filling caches and free lists).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
from typing import Any

from harness import (
    KIND,
    Config,
    Countdown,
    Dur,
    Report,
    Row,
    Stamp,
    check,
    interleaved,
    ratio_row,
    run_child,
)

from dig_service import NodeLifecycle, RunContext, Service, ShutdownReason

TASKS = 10
NAMES = [f"worker-{i}" for i in range(TASKS)]
P9_SERVICES = 1_000
P9_SERVICES_QUICK = 200
WARMUP = 100
# RSS growth allowed over a whole second batch of services (allocator slack,
# not a leak: a leak of even 1 KB a service is 1 MB at N = 1000).
RSS_SLACK = 512 * 1024


async def worker(token: Any, started: Countdown) -> None:
    started.hit()
    await token.cancelled()


class ChurnNode(NodeLifecycle):
    """Default hooks; ``run`` spawns the 10 tasks, then is the default ``run``."""

    NAME = "churn"

    def __init__(self, ready: asyncio.Future[None], started: Countdown) -> None:
        self.ready = ready
        self.started = started

    async def run(self, ctx: RunContext) -> None:
        for name in NAMES:
            ctx.tasks.spawn(name, KIND, worker(ctx.shutdown, self.started))
        self.ready.set_result(None)
        await ctx.shutdown.cancelled()


async def one_service(parts: list[float]) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    started = Countdown(TASKS)
    t0 = Stamp.now()
    svc = Service(ChurnNode(ready, started))
    main = loop.create_task(svc.start())
    await ready
    await started.done
    t1 = Stamp.now()
    svc.request_shutdown(ShutdownReason.UserRequested())
    status = await main
    t2 = Stamp.now()
    parts[0] += t1.wall - t0.wall
    parts[1] += t2.wall - t1.wall
    if not status.is_graceful():  # the message only on failure: formatting is not the lifecycle's
        check(False, f"P9 service exit {status}")


async def event_worker(event: asyncio.Event, started: Countdown) -> None:
    started.hit()
    await event.wait()


async def one_taskgroup(parts: list[float]) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    started = Countdown(TASKS)
    event = asyncio.Event()

    async def lifecycle() -> None:
        async with asyncio.TaskGroup() as tg:

            async def run() -> None:
                for name in NAMES:
                    tg.create_task(event_worker(event, started), name=name)
                ready.set_result(None)
                await event.wait()

            tg.create_task(run(), name="run")

    t0 = Stamp.now()
    main = loop.create_task(lifecycle())
    await ready
    await started.done
    t1 = Stamp.now()
    event.set()
    await main
    t2 = Stamp.now()
    parts[0] += t1.wall - t0.wall
    parts[1] += t2.wall - t1.wall


def _case(one: Any) -> Any:
    async def case(n: int) -> dict[str, Dur]:
        parts = [0.0, 0.0]
        t0 = Stamp.now()
        for _ in range(n):
            await one(parts)
        dt = t0.elapsed()
        up, down = Dur(parts[0], parts[0]), Dur(parts[1], parts[1])
        return {"main": dt, "start-up": up, "shut-down": down}

    return case


p9_service = _case(one_service)
p9_taskgroup = _case(one_taskgroup)


def resources() -> dict[str, int]:
    gc.collect()
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {
        "rss": rss,
        "threads": len(os.listdir("/proc/self/task")),
        "fds": len(os.listdir("/proc/self/fd")),
    }


async def p9_resources_child(n: int) -> dict[str, Any]:
    parts = [0.0, 0.0]
    for _ in range(WARMUP):
        await one_service(parts)
    marks = [resources()]
    for _ in range(2):
        for _ in range(n):
            await one_service(parts)
        marks.append(resources())
    return {"marks": marks}


def bench_p9(cfg: Config, loop: str, report: Report) -> None:
    n = P9_SERVICES_QUICK if cfg.mode == "quick" else P9_SERVICES
    print(f"\nP9 [{loop}] {n:,} services started and stopped, {TASKS} tasks each")
    got = interleaved(
        loop,
        [("Service start/stop", "p9.service"), ("asyncio.TaskGroup + Event", "p9.taskgroup")],
        cfg.repeats,
        n,
        extras=("start-up", "shut-down"),
    )
    s = list(got.values())
    report.keep(f"P9/{loop}", s)
    svc, tg = got["Service start/stop"], got["asyncio.TaskGroup + Event"]
    ratio_row(report, "P9", loop, svc, tg, 1.5)
    for label, series in (("Service", svc), ("TaskGroup", tg)):
        up = got[f"{series.name}: start-up"].median("wall") / n
        down = got[f"{series.name}: shut-down"].median("wall") / n
        report.add(
            Row(
                "P9",
                loop,
                f"{label}: a service, start-up + shut-down (medians, info)",
                f"{series.median('wall') / n * 1e6:.1f} us = {up * 1e6:.1f} + {down * 1e6:.1f} us",
                "info",
                None,
            )
        )
    out = run_child(["--_child", "p9", "--loop", loop, "--_args", json.dumps([n])])
    m = out["marks"]
    kb = 1024
    marks = "; ".join(
        f"RSS {x['rss'] / kb:.0f} KiB, {x['threads']} threads, {x['fds']} fds" for x in m
    )
    print(f"    resources after warm-up, after N, after 2N: {marks}")
    grow = m[2]["rss"] - m[1]["rss"]
    report.add(
        Row(
            "P9",
            loop,
            f"growth over the second {n:,} services: RSS; threads; fds",
            f"{grow / kb:+.0f} KiB (first batch {(m[1]['rss'] - m[0]['rss']) / kb:+.0f}); "
            f"{m[0]['threads']}->{m[1]['threads']}->{m[2]['threads']}; "
            f"{m[0]['fds']}->{m[1]['fds']}->{m[2]['fds']}",
            f"RSS <= +{RSS_SLACK // kb} KiB; threads, fds flat",
            grow <= RSS_SLACK
            and m[0]["threads"] == m[1]["threads"] == m[2]["threads"]
            and m[0]["fds"] == m[1]["fds"] == m[2]["fds"],
            functional=True,
            value=grow,
        )
    )
