"""P6 (optional): the Rust bench, ``cargo bench --bench registry``: native
tokio tasks through the Rust ``TaskRegistry`` vs ``tokio_util``'s ``TaskTracker``.
"""

from __future__ import annotations

import json
import subprocess
import sys

from harness import (
    ROOT,
    Report,
    Row,
)

# SPEC 5 P6: registry / TaskTracker on the multi-thread runtime.
TARGET = 1.15


def bench_p6(report: Report) -> None:
    print("\nP6 cargo bench --bench registry")
    proc = subprocess.run(
        ["cargo", "bench", "--bench", "registry"], capture_output=True, text=True, cwd=ROOT
    )
    sys.stdout.write(proc.stdout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        report.add(
            Row("P6", "tokio", "cargo bench failed", proc.stderr[-300:], f"<= {TARGET:.2f}x", False)
        )
        return
    data = json.loads(line.removeprefix("BENCH_JSON "))
    r = float(data["registry_over_tracker"])
    report.add(
        Row(
            "P6",
            "tokio mt",
            "TaskRegistry / TaskTracker (multi-thread, 2 workers)",
            f"{r:.3f}x (JoinSet {data['registry_over_joinset']:.3f}x; "
            f"shared name {data['shared_name_over_tracker']:.3f}x)",
            f"<= {TARGET:.2f}x",
            r <= TARGET,
            value=r,
        )
    )
    rc = float(data["current_registry_over_tracker"])
    report.add(
        Row(
            "P6",
            "tokio ct",
            "TaskRegistry / TaskTracker (current-thread)",
            f"{rc:.3f}x (JoinSet {data['current_registry_over_joinset']:.3f}x)",
            "info",
            None,
            value=rc,
        )
    )
