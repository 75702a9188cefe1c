#!/usr/bin/env bash
# Every check, Rust and Python, from a bare checkout: installs what it needs
# (Rust crates through cargo, Python packages through pip into ./.venv),
# builds the extension, runs the linters, the Rust tests and the pytest
# suite on the default asyncio loop and on uvloop.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"

step() { printf '\n==> %s\n' "$*"; }

step "python environment ($VENV)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "maturin>=1.5,<2"
# One interpreter for every cargo step (pyo3's build script reads it, and a
# change would rebuild pyo3); the Rust tests that embed CPython link
# libpython, so tell the loader where it is.
export PYO3_PYTHON="$(cd "$VENV" && pwd)/bin/python"
LIBDIR="$("$PYO3_PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')"
export LD_LIBRARY_PATH="${LIBDIR}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --all-targets --all-features -- -D warnings

step "cargo test"
cargo test --all-features

step "build the extension into $VENV (with the test extras)"
VIRTUAL_ENV="$(cd "$VENV" && pwd)" "$VENV/bin/maturin" develop --release --extras test

step "ruff"
LINT=(python tests rust/examples)
[ -d bench ] && LINT+=(bench)
"$VENV/bin/ruff" check "${LINT[@]}"
"$VENV/bin/ruff" format --check "${LINT[@]}"

step "mypy --strict"
"$VENV/bin/mypy" --strict python/
"$VENV/bin/python" -m mypy.stubtest dig_service._core

step "benchmark smoke check (bench/run.py --quick; ratios not asserted: CI machines are noisy)"
"$VENV/bin/python" bench/run.py --quick --no-assert

step "pytest (PYTHONDEVMODE=1, -W error)"
# Once, in Python's development mode with every warning an error: a
# ResourceWarning, a "coroutine ... was never awaited" or a "Task was
# destroyed but it is pending" fails the suite instead of scrolling by.
# (`-W error` for the interpreter covers imports and collection; pytest's
# own `-W error` covers each test, where pytest resets the filters.)
PYTHONDEVMODE=1 "$VENV/bin/python" -W error -m pytest -W error -q tests
