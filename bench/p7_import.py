"""P7: the cost of ``import dig_service`` and of first use, and that no thread
starts before a native task needs the runtime (fresh interpreters).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from harness import (
    ROOT,
    Config,
    Dur,
    Report,
    Row,
    Series,
    fmt_s,
)

P7_CHILD = r"""
import json, os, sys, time
def threads():
    return len(os.listdir("/proc/self/task"))
out = {"threads_start": threads()}
t = time.perf_counter()
import dig_service
out["import"] = time.perf_counter() - t
out["threads_import"] = threads()
t = time.perf_counter()
from dig_service import ShutdownToken, TaskRegistry, TaskKind
out["core"] = time.perf_counter() - t
t = time.perf_counter()
import dig_service._service
out["service"] = time.perf_counter() - t
out["threads_core"] = threads()
import asyncio
async def use():
    reg = TaskRegistry(ShutdownToken())
    async def nop():
        pass
    reg.spawn("x", TaskKind.BackgroundLoop, nop())
    await reg.join_all(1.0)
asyncio.run(use())
from dig_service import _core
out["threads_used"] = threads()
out["runtime_started"] = _core.runtime_started()
t = time.perf_counter()
print(json.dumps(out))
"""

P7_BASE = r"""
import json, time
t = time.perf_counter()
import asyncio
print(json.dumps({"asyncio": time.perf_counter() - t}))
"""


def bench_p7(cfg: Config, report: Report) -> None:
    print(f"\nP7 import cost, {cfg.p7_runs} fresh interpreters each")

    def child(code: str) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
        )
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return out

    child(P7_CHILD)  # warm the bytecode cache
    runs: list[dict[str, Any]] = []
    base = Series("import asyncio (reference)")
    for _ in range(cfg.p7_runs):
        runs.append(child(P7_CHILD))
        t = float(child(P7_BASE)["asyncio"])
        base.add(Dur(t, t))

    def series(name: str, key: str) -> Series:
        return Series(name, [Dur(float(r[key]), float(r[key])) for r in runs])

    imp = series("import dig_service", "import")
    core = series("+ first name from _core", "core")
    svc = series("+ dig_service._service", "service")
    for s in (imp, core, svc, base):
        print(s.line())
    report.keep("P7", [imp, core, svc, base])
    report.add(
        Row(
            "P7",
            "-",
            "import dig_service (median)",
            fmt_s(imp.median("wall")),
            "<= 50 ms",
            imp.median("wall") <= 0.050,
            value=imp.median("wall"),
        )
    )
    report.add(
        Row(
            "P7",
            "-",
            "import + _core + _service (median, info)",
            fmt_s(imp.median("wall") + core.median("wall") + svc.median("wall")),
            "info",
            None,
        )
    )
    starts = {r["threads_start"] for r in runs}
    after = {(r["threads_import"], r["threads_core"], r["threads_used"]) for r in runs}
    started = {r["runtime_started"] for r in runs}
    ok = all(
        r["threads_import"] == r["threads_start"]
        and r["threads_core"] == r["threads_start"]
        and r["threads_used"] == r["threads_start"]
        for r in runs
    ) and started == {False}
    report.add(
        Row(
            "P7",
            "-",
            "threads: start -> import, _core, Python-task use",
            f"{sorted(starts)} -> {sorted(after)}; runtime_started {sorted(started)}",
            "no new thread",
            ok,
            functional=True,
        )
    )
