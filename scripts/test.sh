#!/usr/bin/env bash
# Every check, Rust and Python, from a bare checkout (what CI runs, through
# .ci/run): installs what it needs (Rust crates through cargo, Python
# packages through pip into ./.venv and into one venv per CPython), then
#   1. cargo fmt, clippy -D warnings, rustdoc -D warnings (public and
#      private views: no broken intra-doc link), cargo test;
#   2. the release artefacts (scripts/build-wheels.sh): the manylinux2014
#      abi3 wheel, checked by auditwheel, and the sdist;
#   3. ruff, mypy --strict, stubtest and the benchmark smoke run, against
#      that wheel installed into ./.venv;
#   4. the GitHub workflows: schema check and zizmor (offline);
#   5. the pytest suite on a build where PyO3 has no deferred-release pool
#      (--cfg pyo3_disable_reference_pool): a Python reference released by
#      a thread not attached to the interpreter aborts the process there,
#      so the suite proves none is (a fork could copy the pool's lock held:
#      rust/src/python/release.rs);
#   6. the pytest suite against that wheel on every CPython >= 3.11 here
#      (3.11, 3.12 and 3.13 at least), on asyncio and uvloop, with no cargo
#      on PATH; and the sdist built by pip with cargo (scripts/test-wheels.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
started=$SECONDS

step() { printf '\n==> %s  [%ds]\n' "$*" "$((SECONDS - started))"; }

step "python environment ($VENV)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "maturin>=1.9.2,<2" "check-jsonschema>=0.29" "zizmor>=1.5"
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

step "cargo doc (-D warnings; the public view, then the private one)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --all-features
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --all-features --document-private-items

step "cargo test"
cargo test --all-features

step "release artefacts: scripts/build-wheels.sh (manylinux2014 abi3 wheel + sdist)"
VENV="$VENV" bash scripts/build-wheels.sh
WHEEL="$(ls dist/dig_service-*-abi3-*manylinux2014_*.whl)"

step "install the wheel into $VENV, with the test extras (for the linters, stubtest, bench)"
"$VENV/bin/python" -m pip uninstall -q -y dig-service >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q "$WHEEL[test]"

step "ruff"
LINT=(python tests examples rust/src/python)
[ -d bench ] && LINT+=(bench)
"$VENV/bin/ruff" check "${LINT[@]}"
"$VENV/bin/ruff" format --check "${LINT[@]}"

step "mypy --strict"
"$VENV/bin/mypy" --strict python/
# The Python source compiled into the native module (its errors, its asyncio glue).
"$VENV/bin/mypy" --strict rust/src/python/errors.py rust/src/python/aio.py
"$VENV/bin/python" -m mypy.stubtest dig_service._core

step "benchmark smoke check (bench/run.py --quick; ratios not asserted: CI machines are noisy)"
"$VENV/bin/python" bench/run.py --quick --no-assert

step "GitHub workflows: schema (check-jsonschema) and zizmor --offline"
"$VENV/bin/check-jsonschema" --builtin-schema vendor.github-workflows .github/workflows/*.yml
"$VENV/bin/zizmor" --offline --no-progress .github/workflows/

step "no Python reference released unattached: pytest on a build with --cfg pyo3_disable_reference_pool"
REFCHECK=target/refcheck
rm -rf "$REFCHECK/dist" "$REFCHECK/venv"
RUSTFLAGS="--cfg pyo3_disable_reference_pool" CARGO_TARGET_DIR="$REFCHECK" \
    "$VENV/bin/maturin" build --release -q -i "$PYO3_PYTHON" -o "$REFCHECK/dist"
"$PYO3_PYTHON" -m venv "$REFCHECK/venv"
"$REFCHECK/venv/bin/python" -m pip install -q "$(ls "$REFCHECK"/dist/dig_service-*.whl)[test]"
PYTHONDEVMODE=1 \
    DIG_SERVICE_EXPECT_SITE="$("$REFCHECK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')" \
    timeout --kill-after=30 900 \
    "$REFCHECK/venv/bin/python" -W error -m pytest -W error -q -p no:cacheprovider tests

step "pytest against the installed wheel on every CPython >= 3.11, and the sdist (scripts/test-wheels.sh)"
bash scripts/test-wheels.sh "$WHEEL"

step "all checks passed in $((SECONDS - started)) s"
