"""One of the bench's P9 cases at N services, for counting instructions under callgrind.

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/p9_instructions.py service asyncio 1000

Instructions a service = (count at N - count at N = 0) / N. The cases are
``bench/run.py``'s own (``service``, ``taskgroup``), run the way it runs
them (``run_on``, on a fresh ``asyncio`` or ``uvloop`` loop) after a
50-service warm-up (see ``p1_instructions.py``, the same method for P1).
"""

from __future__ import annotations

import sys

from run import CASES, run_on  # bench/run.py, beside this script


def main(argv: list[str]) -> None:
    case, loop, n = f"p9.{argv[0]}", argv[1], int(argv[2])
    fn = CASES[case]
    run_on(loop, lambda: fn(50))
    if n:
        out = run_on(loop, lambda: fn(n))
        print(f"{case} {loop} {n}: {out['main'].wall:.4f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
