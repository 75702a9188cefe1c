#!/usr/bin/env python3
"""What the loop-stall watchdog costs a busy event loop (SPEC section 9, issue 16 point 4).

    .venv/bin/python bench/watchdog.py                 # asyncio and uvloop, 15 repeats
    .venv/bin/python bench/watchdog.py --loop asyncio --repeats 31 --turns 1000000
    .venv/bin/python bench/watchdog.py --quick         # a smoke run
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python bench/watchdog.py --count watchdog --loop asyncio --turns 200000

A *turn* is one iteration of the event loop: a callback that schedules itself
again with ``call_soon``, so each iteration runs exactly one callback (the
busiest a loop gets, and the one where a per-turn cost would show most).
Each sample runs ``--turns`` turns on a fresh loop and reports turns per
second. Variants, interleaved (every repeat runs each once, in an order
rotated by one per repeat; ``gc.collect()`` before each):

- ``bare``: nothing else on the loop, and no other thread in the process.
- ``watchdog``: a ``LoopWatch`` with ``stall_warning=1.0`` (the runner's
  default): its heartbeat timer fires every 0.25 s.
- ``watchdog-0.04``: ``stall_warning=0.04``, a beat every 10 ms (25 times as
  many beats: shows what a beat itself costs).

and, to tell where a difference comes from:

- ``one-timer``: one unrelated ``call_later(3600, ...)`` timer: a loop with
  any pending timer (every real service has some) looks at its timer heap
  each turn.
- ``rearmed-timer``: a Python timer that re-arms itself every 0.25 s and
  does nothing else: the watchdog's loop-side work without the native beat.
- ``idle-thread``: a second thread, parked for the whole sample (as the
  watchdog thread is, as the tokio runtime's are once a native task ran):
  once a process has two threads, glibc takes its cancellation-point path
  around each blocking system call, the event loop's ``epoll_wait`` included.
- ``thread+timer``: both of the above: everything the watchdog does but the
  native beat itself.

Each sample is timed on the wall clock and on the process CPU clock (all
threads: the watchdog thread's own CPU time counts against it). On a shared,
loaded machine the CPU clock is the steadier one: wall time also counts the
moments the process was not scheduled at all.

Printed, per clock: median turns/s with min-max spread per variant, each
variant's median relative to ``bare`` and to ``thread+timer``, and the median of
the per-repeat paired ratios to ``bare`` (each repeat's variant over the same
repeat's ``bare``: load that drifts between repeats cancels out). Stalls the
watchdogs saw are counted (a loaded machine that deschedules the process for
40 ms is a stall to a 0.04 s watchdog).

``--count VARIANT`` runs one untimed sample of ``--turns`` turns (after a
1,000-turn warm-up) on one loop, for counting executed instructions under
callgrind: instructions a turn = (count at N turns - count at 0 turns) / N,
all threads included. Under callgrind the program runs ~50x slower, so the
heartbeat fires ~50x more often per turn than in a real run: the count
overstates a beat's share.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import statistics
import sys
import threading
import time
from collections.abc import Callable

from dig_service._watchdog import LoopWatch

VARIANTS = (
    "bare",
    "one-timer",
    "rearmed-timer",
    "idle-thread",
    "thread+timer",
    "watchdog",
    "watchdog-0.04",
)


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


STALLS: dict[str, int] = {}


def sample(
    make_loop: Callable[[], asyncio.AbstractEventLoop], variant: str, turns: int
) -> tuple[float, float]:
    """Turns per second (wall, CPU) of one run of ``turns`` self-rescheduling callbacks
    (``turns`` 0: set up and tear down only)."""
    loop = make_loop()
    try:

        async def main() -> tuple[float, float]:
            running = asyncio.get_running_loop()
            watch = None
            timer = None
            if variant == "watchdog":
                watch = LoopWatch(running, 1.0, "bench")
            elif variant == "watchdog-0.04":
                watch = LoopWatch(running, 0.04, "bench")
            elif variant == "one-timer":
                timer = running.call_later(3600, lambda: None)
            if variant in ("rearmed-timer", "thread+timer"):

                def rearm() -> None:
                    nonlocal timer
                    timer = running.call_later(0.25, rearm)

                rearm()
            parked = None
            release = threading.Event()
            if variant in ("idle-thread", "thread+timer"):
                parked = threading.Thread(target=release.wait)
                parked.start()
            done = running.create_future()
            left = turns
            call_soon = running.call_soon

            def turn() -> None:
                nonlocal left
                left -= 1
                if left:
                    call_soon(turn)
                else:
                    done.set_result(None)

            start, start_cpu = time.perf_counter(), time.process_time()
            if turns:
                call_soon(turn)
            else:
                done.set_result(None)
            await done
            wall = time.perf_counter() - start
            cpu = time.process_time() - start_cpu
            if watch is not None:
                STALLS[variant] = STALLS.get(variant, 0) + watch.stalls
                watch.stop()
            if timer is not None:
                timer.cancel()
            if parked is not None:
                release.set()
                parked.join()
            return turns / max(wall, 1e-9), turns / max(cpu, 1e-9)

        return loop.run_until_complete(main())
    finally:
        loop.close()


Samples = dict[str, list[tuple[float, float]]]


def run(loop_name: str, repeats: int, turns: int) -> Samples:
    make = loop_factory(loop_name)
    results: Samples = {v: [] for v in VARIANTS}
    sample(make, "watchdog", turns // 10)  # warm-up: imports, the native module, caches
    STALLS.clear()
    for r in range(repeats):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for variant in order:
            gc.collect()
            results[variant].append(sample(make, variant, turns))
    return results


def report(loop_name: str, results: Samples) -> None:
    repeats = len(results["bare"])
    for index, clock in enumerate(("wall", "cpu")):
        series = {v: [pair[index] for pair in xs] for v, xs in results.items()}
        medians = {v: statistics.median(xs) for v, xs in series.items()}
        print(f"\n{loop_name}, {clock} clock: turns/s, median of {repeats} interleaved repeats")
        print(f"  {'variant':<14} {'median':>11} {'min':>11} {'max':>11} {'spread':>7}"
              f" {'vs bare':>8} {'vs thread+timer':>15} {'paired':>7}")  # fmt: skip
        for variant, xs in series.items():
            med = medians[variant]
            spread = (max(xs) - min(xs)) / med
            paired = statistics.median(x / b for x, b in zip(xs, series["bare"], strict=True))
            print(
                f"  {variant:<14} {med:>11,.0f} {min(xs):>11,.0f} {max(xs):>11,.0f} "
                f"{spread:>6.1%} {med / medians['bare']:>8.3f} "
                f"{med / medians['thread+timer']:>15.3f} {paired:>7.3f}"
            )
    if STALLS:
        print(f"  stalls the watchdogs saw: {STALLS}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loop", choices=("asyncio", "uvloop", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--turns", type=int, default=500_000)
    parser.add_argument("--quick", action="store_true", help="3 repeats of 50k turns")
    parser.add_argument("--count", choices=VARIANTS, help="one untimed sample (for callgrind)")
    args = parser.parse_args(argv)
    if args.count is not None:
        make = loop_factory("asyncio" if args.loop == "both" else args.loop)
        sample(make, args.count, 1000)
        if args.turns:
            sample(make, args.count, args.turns)
        return 0
    if args.quick:
        args.repeats, args.turns = 3, 50_000
    # A stall the watchdogs see (the process descheduled on a loaded machine) is counted,
    # not logged with its stack in the middle of the table.
    logging.getLogger("dig_service.watchdog").setLevel(logging.ERROR)
    loops = ("asyncio", "uvloop") if args.loop == "both" else (args.loop,)
    print(f"Python {sys.version.split()[0]}, {args.turns:,} turns a sample")
    for name in loops:
        report(name, run(name, args.repeats, args.turns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
