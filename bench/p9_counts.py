"""P9, counted: what one service lifecycle costs in event-loop work, against the
same lifecycle hand-written on ``asyncio.TaskGroup`` + ``asyncio.Event``.

The wall clock of this machine is noisy; counts are not. For each variant of
``p9_churn.py`` this runs N lifecycles on the default asyncio loop and reports,
per lifecycle:

- loop iterations (``BaseEventLoop._run_once`` calls),
- callbacks run (``events.Handle._run`` calls: task steps, done callbacks,
  ``call_soon`` callbacks),
- futures created (``loop.create_future`` and ``loop.create_task`` calls; tasks the
  package makes with ``asyncio.Task(...)`` directly are not seen),
- Python function calls (``sys.setprofile`` "call" events, the whole process:
  the package, asyncio's Python parts and the driver).

Run: ``python bench/p9_counts.py [N]`` (default 200; asyncio loop only: uvloop's
loop is compiled and cannot be counted this way).
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import asyncio.events
import collections
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import p9_churn


def _count(n: int, one: Callable[[list[float]], Coroutine[Any, Any, None]]) -> dict[str, Any]:
    counts = {"iterations": 0, "callbacks": 0, "futures": 0, "calls": 0}
    where: collections.Counter[str] = collections.Counter()

    run_once = asyncio.base_events.BaseEventLoop._run_once
    handle_run = asyncio.events.Handle._run

    def counted_run_once(self: Any) -> None:
        counts["iterations"] += 1
        run_once(self)

    def counted_handle_run(self: Any) -> None:
        counts["callbacks"] += 1
        handle_run(self)

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            counts["calls"] += 1
            code = frame.f_code
            where[f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}"] += 1
            if code.co_name in ("create_future", "create_task") and code.co_filename.endswith(
                "base_events.py"
            ):
                counts["futures"] += 1

    async def main() -> None:
        parts = [0.0, 0.0]
        for _ in range(20):  # warm-up: imports, caches
            await one(parts)
        base = dict(counts)
        where.clear()
        sys.setprofile(profile)
        try:
            for _ in range(n):
                await one(parts)
        finally:
            sys.setprofile(None)
        for k in counts:
            counts[k] -= base[k]

    asyncio.base_events.BaseEventLoop._run_once = counted_run_once  # type: ignore[method-assign]
    asyncio.events.Handle._run = counted_handle_run  # type: ignore[method-assign]
    try:
        asyncio.run(main())
    finally:
        asyncio.base_events.BaseEventLoop._run_once = run_once  # type: ignore[method-assign]
        asyncio.events.Handle._run = handle_run  # type: ignore[method-assign]
    # setprofile sees the two patched wrappers' own calls too: not the loop's work.
    counts["calls"] -= counts["iterations"] + counts["callbacks"]
    per = {k: v / n for k, v in counts.items()}
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 25
    per["top"] = [(k, v / n) for k, v in where.most_common(top)]
    return per


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    print(f"P9 counts per lifecycle (asyncio loop, CPython {sys.version.split()[0]}, N={n})")
    for label, one in (
        ("Service start/stop", p9_churn.one_service),
        ("asyncio.TaskGroup + Event", p9_churn.one_taskgroup),
    ):
        got = _count(n, one)
        print(
            f"  {label:28} iterations {got['iterations']:6.1f}  callbacks "
            f"{got['callbacks']:6.1f}  futures {got['futures']:6.1f}  Python calls "
            f"{got['calls']:7.1f}"
        )
        if "-v" in sys.argv:
            for name, per in got["top"]:
                print(f"      {per:7.1f}  {name}")


if __name__ == "__main__":
    main()
