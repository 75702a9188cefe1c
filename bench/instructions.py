"""One of the bench's cases at N units, for counting instructions under callgrind.

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/instructions.py p1.registry asyncio 100000

CASE is a case id of ``bench/run.py``'s ``CASES`` (a wrong one prints them),
e.g. ``p1.registry``, ``p1.untracked``, ``p1.taskgroup``,
``p9.service``, ``p9.taskgroup``. Instructions a unit (a task for P1, a
service for P9) = (count at N - count at N = 0) / N. The case runs the way
``bench/run.py`` runs it (``run_on``: collected and frozen out of the
collector's way, on a fresh ``asyncio`` or ``uvloop`` loop) after a 50-unit
warm-up; the time of the measured run is printed (one sample: for
instruction counts, not timing).
"""

from __future__ import annotations

import sys

from run import CASES, run_on  # bench/run.py, beside this script


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[0] not in CASES:
        known = ", ".join(sorted(CASES))
        sys.exit(f"usage: instructions.py CASE LOOP N  (CASE one of: {known})")
    case, loop, n = argv[0], argv[1], int(argv[2])
    fn = CASES[case]
    run_on(loop, lambda: fn(50))
    if n:
        out = run_on(loop, lambda: fn(n))
        print(f"{case} {loop} {n}: {out['main'].wall:.4f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
