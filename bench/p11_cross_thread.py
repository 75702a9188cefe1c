"""P11: cross-thread wake latency: ``ShutdownToken.cancel()`` called from
another thread until a waiter on the loop resumes, vs
``loop.call_soon_threadsafe(event.set)`` until an ``Event.wait()`` resumes.

Each sample: a fresh token (or event) and one waiter task on the loop, given
two turns to park; then the loop thread hands the signaller thread a
request (``queue.SimpleQueue``) and awaits the waiter, so the loop is idle
in its selector when the signal comes, as in a service waiting for a
shutdown. The signaller thread stamps ``perf_counter()`` immediately before
``token.cancel(reason)`` / ``loop.call_soon_threadsafe(event.set)``; the
waiter stamps it as the first thing after it resumes. Latency: the
difference. The variants alternate sample by sample in one process; each
repeat is a fresh child process, which reports its p50 and p99 a variant.
The table gives the median over repeats of each percentile and their ratios
(target: both <= 1.2x).
"""

from __future__ import annotations

import asyncio
import json
import queue
import statistics
import threading
from collections.abc import Callable
from typing import Any

from harness import Config, Report, Row, check, perf, run_child

from dig_service import ShutdownReason, ShutdownToken

P11_SAMPLES = 5_000
P11_SAMPLES_QUICK = 1_000
LIMIT = 1.2


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def p11_child(n: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    requests: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
    stamps: list[float] = []
    reason = ShutdownReason.UserRequested()

    def signaller() -> None:
        while (fire := requests.get()) is not None:
            stamps.append(perf())
            fire()

    thread = threading.Thread(target=signaller, name="p11-signaller", daemon=True)
    thread.start()

    async def token_sample() -> float:
        token = ShutdownToken()
        resumed: list[float] = []

        async def waiter() -> None:
            await token.cancelled()
            resumed.append(perf())

        task = loop.create_task(waiter())
        for _ in range(2):
            await asyncio.sleep(0)
        requests.put(lambda: token.cancel(reason))
        await task
        return resumed[0] - stamps[-1]

    async def event_sample() -> float:
        event = asyncio.Event()
        resumed: list[float] = []

        async def waiter() -> None:
            await event.wait()
            resumed.append(perf())

        task = loop.create_task(waiter())
        for _ in range(2):
            await asyncio.sleep(0)
        requests.put(lambda: loop.call_soon_threadsafe(event.set))
        await task
        return resumed[0] - stamps[-1]

    for _ in range(50):  # warm-up
        await token_sample()
        await event_sample()
    lat: dict[str, list[float]] = {"token": [], "event": []}
    for i in range(n):
        if i % 2 == 0:
            lat["token"].append(await token_sample())
            lat["event"].append(await event_sample())
        else:
            lat["event"].append(await event_sample())
            lat["token"].append(await token_sample())
    requests.put(None)
    thread.join()
    check(all(v > 0 for vs in lat.values() for v in vs), "P11: a waiter resumed before the signal")
    return {
        k: {"p50": percentile(v, 0.50), "p99": percentile(v, 0.99), "n": len(v)}
        for k, v in lat.items()
    }


def bench_p11(cfg: Config, loop: str, report: Report) -> None:
    n = P11_SAMPLES_QUICK if cfg.mode == "quick" else P11_SAMPLES
    reps = max(3, cfg.repeats // 3)
    print(f"\nP11 [{loop}] cross-thread wake, {n:,} samples a variant in each of {reps} children")
    outs = [
        run_child(["--_child", "p11", "--loop", loop, "--_args", json.dumps([n])])
        for _ in range(reps)
    ]
    med: dict[tuple[str, str], float] = {}
    labels = (("token", "ShutdownToken.cancel()"), ("event", "call_soon_threadsafe(set)"))
    for variant, label in labels:
        line = f"    {label:<28}"
        for q in ("p50", "p99"):
            vs = [float(o[variant][q]) for o in outs]
            med[(variant, q)] = statistics.median(vs)
            each = ", ".join(f"{v * 1e6:.1f}" for v in vs)
            line += f" {q} median {med[(variant, q)] * 1e6:6.1f} us ({each})  "
        print(line)
    for q in ("p50", "p99"):
        r = med[("token", q)] / med[("event", q)]
        report.add(
            Row(
                "P11",
                loop,
                f"cross-thread wake {q}, token.cancel / call_soon_threadsafe(set)",
                f"{r:.3f}x ({med[('token', q)] * 1e6:.1f} vs {med[('event', q)] * 1e6:.1f} us)",
                f"<= {LIMIT:.2f}x",
                r <= LIMIT,
                value=r,
            )
        )
