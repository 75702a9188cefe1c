"""One of the bench's P1 cases at N tasks, for counting instructions under callgrind.

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/p1_instructions.py registry asyncio 100000

Instructions a task = (count at N - count at N = 0) / N. The cases are
``bench/run.py``'s own (``registry``, ``bare``, ``bare_hoisted``,
``taskgroup``, ``anyio``), run the way it runs them (``run_on``: collected
and frozen out of the collector's way, on a fresh ``asyncio`` or ``uvloop``
loop) after a 50-task warm-up; the time of the measured run is printed
(one sample: for instruction counts, not timing).
"""

from __future__ import annotations

import sys

from run import CASES, run_on  # bench/run.py, beside this script


def main(argv: list[str]) -> None:
    case, loop, n = f"p1.{argv[0]}", argv[1], int(argv[2])
    fn = CASES[case]
    run_on(loop, lambda: fn(50))
    if n:
        out = run_on(loop, lambda: fn(n))
        print(f"{case} {loop} {n}: {out['main'].wall:.4f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
