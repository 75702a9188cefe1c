"""P7: ``import dig_service`` and first use of ``Service``, over ``import
asyncio``; and that no thread starts before first use (fresh interpreters).

SPEC 5: "``import dig_service`` and first use of ``Service``: <= 50 ms over
``import asyncio``; starts no thread until first use". Read here as:

- candidate, in a fresh interpreter: ``import dig_service``, then ``from
  dig_service import NodeLifecycle, Service`` and ``Service(Node())`` with a
  trivial node (the first use: it loads the native core and the lifecycle
  modules, asyncio among them, and builds a token and a registry); timed from
  before the import until the service exists;
- baseline, in another fresh interpreter: ``import asyncio``;
- the same candidate in a third fresh interpreter that imports ``asyncio``
  first (untimed): what ``dig_service`` adds over ``import asyncio``,
  measured directly;
- target: both ``median(candidate) - median(baseline)`` and the median of
  the third <= 50 ms. The difference of two medians from different
  processes is fragile on a loaded machine (``import asyncio`` alone moved
  from 56 to 105 ms between runs here), so the verdict takes the worse of
  the two readings.

Shown as info: the import alone, the first use alone, and one
``start()``/shutdown of that service.

Threads are counted in ``/proc/self/task`` (what ``threading.active_count()``
misses: threads a native library starts) and the tokio runtime is asked
(``_core.runtime_started()``): no new thread after the import; none after
building the ``Service``, nor after Python tasks ran through a registry
(the runtime is for native tasks; it must not start for Python ones). After a
``start()`` the count is shown as info.
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

LIMIT = 0.050

P7_CHILD = r"""
import json, os, sys, threading, time
def threads():
    return len(os.listdir("/proc/self/task"))
pre = "asyncio" in sys.argv[1:]
out = {"threads_start": threads(), "py_threads_start": threading.active_count()}
if pre:
    import asyncio
t0 = time.perf_counter()
import dig_service
t1 = time.perf_counter()
out["threads_import"] = threads()
from dig_service import NodeLifecycle, Service
class Node(NodeLifecycle):
    NAME = "p7"
svc = Service(Node())
t2 = time.perf_counter()
out["import"] = t1 - t0
out["first_use"] = t2 - t1
out["total"] = t2 - t0
out["threads_service"] = threads()
out["py_threads_service"] = threading.active_count()
from dig_service import _core, TaskRegistry, ShutdownToken, TaskKind, ShutdownReason
out["runtime_after_service"] = _core.runtime_started()
import asyncio
async def use():
    reg = TaskRegistry(ShutdownToken())
    async def nop():
        pass
    reg.spawn("x", TaskKind.BackgroundLoop, nop())
    await reg.join_all(1.0)
asyncio.run(use())
out["threads_tasks"] = threads()
out["runtime_after_tasks"] = _core.runtime_started()
async def lifecycle():
    t = asyncio.get_running_loop().create_task(svc.start())
    await asyncio.sleep(0)
    svc.request_shutdown(ShutdownReason.UserRequested())
    status = await t
    assert status.is_graceful(), status
t3 = time.perf_counter()
asyncio.run(lifecycle())
out["start_stop"] = time.perf_counter() - t3
out["threads_started"] = threads()
out["runtime_after_start"] = _core.runtime_started()
print(json.dumps(out))
"""

P7_BASE = r"""
import json, time
t = time.perf_counter()
import asyncio
print(json.dumps({"asyncio": time.perf_counter() - t}))
"""


def bench_p7(cfg: Config, report: Report) -> None:
    print(f"\nP7 import + first use of Service, {cfg.p7_runs} fresh interpreters each")

    def child(code: str, *args: str) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return out

    child(P7_CHILD)  # warm the bytecode cache
    runs: list[dict[str, Any]] = []
    pre: list[dict[str, Any]] = []
    base = Series("import asyncio (baseline)")
    for _ in range(cfg.p7_runs):  # interleaved: candidate, baseline, asyncio-first
        runs.append(child(P7_CHILD))
        t = float(child(P7_BASE)["asyncio"])
        base.add(Dur(t, t))
        pre.append(child(P7_CHILD, "asyncio"))

    def series(name: str, key: str, rs: list[dict[str, Any]]) -> Series:
        return Series(name, [Dur(float(r[key]), float(r[key])) for r in rs])

    total = series("import dig_service + Service(node)", "total", runs)
    imp = series("  of which import dig_service", "import", runs)
    use = series("  of which first use of Service", "first_use", runs)
    pre_use = series("first use, asyncio imported before", "total", pre)
    start = series("one start() + shutdown (info)", "start_stop", runs)
    for s in (total, imp, use, base, pre_use, start):
        print(s.line())
    report.keep("P7", [total, imp, use, base, pre_use, start])
    over = total.median("wall") - base.median("wall")
    direct = pre_use.median("wall")
    report.add(
        Row(
            "P7",
            "-",
            "import + first Service over import asyncio: difference; asyncio first",
            f"{fmt_s(over)} ({fmt_s(total.median('wall'))} - {fmt_s(base.median('wall'))}); "
            f"{fmt_s(direct)}",
            f"both <= {LIMIT * 1e3:.0f} ms",
            max(over, direct) <= LIMIT,
            value=max(over, direct),
        )
    )
    everything = runs + pre
    stages = ("threads_import", "threads_service", "threads_tasks")
    seen = sorted({tuple(r[k] for k in ("threads_start", *stages)) for r in everything})
    py_seen = sorted({(r["py_threads_start"], r["py_threads_service"]) for r in everything})
    rt = sorted({(r["runtime_after_service"], r["runtime_after_tasks"]) for r in everything})
    ok = all(
        all(r[k] == r["threads_start"] for k in stages)
        and r["py_threads_service"] == r["py_threads_start"]
        and not r["runtime_after_service"]
        and not r["runtime_after_tasks"]
        for r in everything
    )
    report.add(
        Row(
            "P7",
            "-",
            "OS threads: start, import, Service(node), Python tasks",
            f"{seen}; threading {py_seen}; runtime_started {rt}",
            "no new thread",
            ok,
            functional=True,
        )
    )
    after = sorted({(r["threads_started"], r["runtime_after_start"]) for r in everything})
    report.add(
        Row(
            "P7",
            "-",
            "OS threads, runtime_started after one start() (info)",
            f"{after}",
            "info",
            None,
        )
    )
