"""The "Writing a service" guide (the README section ``Writing a service``) is runnable as written.

Issue 3, bullet 7 and "Done when": the example runs, and each common mistake
produces the message the guide shows (which says what to change).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "README.md"


def marked_blocks(marker: str) -> list[tuple[str, str | None]]:
    """``(python_code, following_text_block_or_None)`` for each block after ``<!-- marker -->``."""
    text = GUIDE.read_text()
    pattern = re.compile(
        rf"<!-- {marker}[^>]*-->\s*```python\n(?P<code>.*?)```(?:\s*```text\n(?P<out>.*?)```)?",
        re.S,
    )
    return [(m["code"], m["out"]) for m in pattern.finditer(text)]


def run_python(code: str, tmp_path: Path, name: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / name
    script.write_text(code)
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )


@pytest.mark.skipif(
    sys.platform == "win32",
    reason="the example installs its SIGTERM handler with loop.add_signal_handler (POSIX only)",
)
def test_the_complete_example_runs_and_prints_what_the_guide_says(tmp_path: Path) -> None:
    """Proves: the guide's complete example (node with a background loop, an RPC API,
    a handle used to stop it) runs as a script, exits 0, and prints the lines the guide
    shows (tick counts aside).

    Catches: a guide that drifted from the API (the first thing a new user copies
    failing), or an example that hangs instead of stopping through its handle.
    """
    blocks = marked_blocks("example")
    assert len(blocks) == 1, "the guide must mark exactly one complete example"
    code, _ = blocks[0]
    proc = run_python(code, tmp_path, "ticker.py")
    assert proc.returncode == 0, proc.stderr
    expected = re.search(r"It prints.*?```text\n(.*?)```", GUIDE.read_text(), re.S)
    assert expected is not None
    normalise = lambda s: re.sub(r"\d+ ticks|'ticks': \d+", "N", s).strip().splitlines()  # noqa: E731
    assert normalise(proc.stdout) == normalise(expected[1])


def test_the_complete_example_passes_mypy_strict(tmp_path: Path) -> None:
    """Proves: the example type-checks under ``mypy --strict`` with the shipped stubs.

    Catches: docs teaching code that a typed codebase would reject.
    """
    code, _ = marked_blocks("example")[0]
    script = tmp_path / "ticker.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("index", range(len(marked_blocks("runnable"))))
def test_other_runnable_snippets_run(index: int, tmp_path: Path) -> None:
    """Proves: the guide's smaller runnable snippets (the TestNode test) run cleanly.

    Catches: a testing recipe in the docs that fails when pasted.
    """
    code, _ = marked_blocks("runnable")[index]
    proc = run_python(code, tmp_path, f"snippet{index}.py")
    assert proc.returncode == 0, proc.stderr


MISTAKES = marked_blocks("mistake")


def test_the_guide_documents_the_four_classic_mistakes() -> None:
    """Proves: the guide shows the mistakes the issue lists (sync hook, wrong kind, bad
    peer id, start twice), each with its message.

    Catches: a mistake section silently dropped from the guide.
    """
    shown = "\n".join(code for code, _ in MISTAKES)
    assert "def on_start(self, ctx):" in shown
    assert '"background"' in shown
    assert "PeerInfo(" in shown
    assert shown.count("await service.start()") == 2
    assert all(out is not None for _, out in MISTAKES)


@pytest.mark.parametrize(("code", "message"), MISTAKES, ids=lambda v: str(v)[:40])
def test_each_mistake_raises_the_message_the_guide_shows(code: str, message: str) -> None:
    """Proves: running each mistake snippet raises exactly the exception and message the
    guide prints, and that message names what to change.

    Catches: error messages reworded in code but not in the docs (or vice versa), and
    messages that stop saying how to fix the mistake.
    """
    namespace: dict[str, object] = {"__name__": "__guide__"}
    with pytest.raises(Exception) as info:
        exec(compile(code, "<guide>", "exec"), namespace)
    assert f"{type(info.value).__name__}: {info.value}" == message.strip()


def layout_paths() -> list[str]:
    """Every file or directory the README's ``Layout`` block names, relative to the root.

    A line names one path, or several (``a, b``; ``a + b``; ``x/{a,b}.rs``) before its
    description; an indented line is relative to the last unindented directory.
    """
    block = re.search(r"## Layout\n\n```\n(.*?)```", GUIDE.read_text(), re.S)
    assert block is not None, "the README has no Layout block"
    paths: list[str] = []
    parent = ""
    for line in block[1].splitlines():
        indented = line.startswith("  ")
        field = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        names: list[str] = []
        for part in re.findall(r"[^\s,{]*\{[^}]*\}[^\s,]*|[^\s,+]+", field):
            if not part or part == "...":
                continue
            brace = re.fullmatch(r"(.*)\{(.+)\}(.*)", part)
            if brace:
                names += [brace[1] + alt + brace[3] for alt in brace[2].split(",")]
            else:
                names.append(part)
        if indented:
            paths += [parent + name for name in names]
        else:
            paths += names
            if names and names[0].endswith("/"):
                parent = names[0]
    return paths


def test_the_layout_names_the_real_files() -> None:
    """Proves: every file and directory the README's ``Layout`` section names exists.

    Catches: a layout that names files that were split, moved or renamed (it named
    ``tasks.rs`` long after ``rust/src/tasks/`` replaced it).
    """
    paths = layout_paths()
    assert "rust/src/tasks/reap.rs" in paths and "python/dig_service/_runner.py" in paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"the README's Layout names files that do not exist: {missing}"


def test_the_supervised_tasks_example_prints_what_the_guide_says(tmp_path: Path) -> None:
    """Proves: the "Supervised tasks" example runs, restarts its failing sync twice, and
    prints exactly the lines the guide shows after it.

    Catches: a guide whose supervision example drifted from the API or the behaviour.
    """
    text = GUIDE.read_text()
    section = text[text.index("### Supervised tasks") :]
    code = re.search(r"<!-- runnable -->\s*```python\n(.*?)```", section, re.S)
    shown = re.search(r"It prints[^\n]*\n\n```text\n(.*?)```", section, re.S)
    assert code is not None and shown is not None
    assert "supervise(" in code[1]
    proc = run_python(code[1], tmp_path, "supervised.py")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == shown[1].splitlines()
    assert proc.stderr.count("Traceback (most recent call last)") == 1, proc.stderr
    assert "failed again, restarting in" in proc.stderr
