"""One P1 variant at N tasks, for counting instructions under callgrind.

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/p1_instructions.py registry asyncio 100000

Instructions a task = (count at N - count at N = 0) / N. Variants:
``registry`` (``TaskRegistry.spawn``), ``taskgroup`` (``asyncio.TaskGroup``),
``bare`` (the docs' ``create_task`` + set idiom); loops ``asyncio`` or
``uvloop``. Like ``bench/run.py``, a small run warms the caches first and
everything alive is frozen out of the collector's way; the time of the
measured run is printed (one sample: for instruction counts, not timing).
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from dig_service import ShutdownToken, TaskKind, TaskRegistry


async def nop() -> None:
    return None


async def registry(n: int) -> None:
    reg = TaskRegistry(ShutdownToken())
    for _ in range(n):
        reg.spawn("bench-task", TaskKind.BackgroundLoop, nop())
    while len(reg):  # noqa: ASYNC110 (the same poll bench/run.py uses)
        await asyncio.sleep(0)


async def taskgroup(n: int) -> None:
    async with asyncio.TaskGroup() as tg:
        for _ in range(n):
            tg.create_task(nop())


async def bare(n: int) -> None:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    for _ in range(n):
        task = loop.create_task(nop())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:  # noqa: ASYNC110
        await asyncio.sleep(0)


VARIANTS: dict[str, Callable[[int], Coroutine[Any, Any, None]]] = {
    "registry": registry,
    "taskgroup": taskgroup,
    "bare": bare,
}


def main(argv: list[str]) -> None:
    variant, loop, n = VARIANTS[argv[0]], argv[1], int(argv[2])
    factory = asyncio.new_event_loop
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop

    def run(count: int) -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(variant(count))

    run(50)
    gc.collect()
    gc.freeze()
    if n:
        t0 = time.perf_counter()
        run(n)
        print(f"{argv[0]} {loop} {n}: {time.perf_counter() - t0:.4f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
