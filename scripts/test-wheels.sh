#!/usr/bin/env bash
# Test the built artefacts as a user gets them (run scripts/build-wheels.sh first):
#
# 1. The wheel, on every CPython >= 3.11 on this machine (pyenv's versions
#    and python3.N on PATH, one per minor version): a fresh venv each, the
#    wheel and its `test` extras installed from binaries only with no cargo
#    or rustc on PATH, a check that `dig_service` and its native core are
#    imported from that venv's site-packages (not from python/), then the
#    whole pytest suite (asyncio and uvloop, dev mode, warnings as errors).
# 2. The sdist, on the first of those: `pip install dist/*.tar.gz` into a
#    fresh venv builds the extension with cargo; then a smoke run and the
#    package-surface tests against what it installed.
#
# Every minor version named in $WHEEL_TEST_REQUIRE (default "3.11 3.12 3.13")
# must be found, so that a missing interpreter fails instead of shrinking the
# matrix; set it empty to test whatever is there. $WHEEL_TEST_SDIST=0 skips
# step 2. Each pytest run is stopped after $WHEEL_TEST_TIMEOUT s (default 900).
# Venvs live under target/wheel-venvs/ (ignored by git).
#
# Usage: bash scripts/test-wheels.sh [WHEEL]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

REQUIRE="${WHEEL_TEST_REQUIRE-3.11 3.12 3.13}"
TEST_SDIST="${WHEEL_TEST_SDIST:-1}"
PYTEST_TIMEOUT="${WHEEL_TEST_TIMEOUT:-900}"
VENVS="$ROOT/target/wheel-venvs"

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'test-wheels.sh: %s\n' "$*" >&2; exit 1; }

shopt -s nullglob
if [ $# -ge 1 ]; then
    WHEEL="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
else
    wheels=("$ROOT"/dist/dig_service-*-abi3-*manylinux2014_*.whl)
    [ "${#wheels[@]}" -eq 1 ] \
        || die "expected one manylinux2014 abi3 wheel in dist/ (run scripts/build-wheels.sh), found ${#wheels[@]}"
    WHEEL="${wheels[0]}"
fi
[ -f "$WHEEL" ] || die "no wheel at $WHEEL"

# ---------------------------------------------------------------- interpreters

# shellcheck source=cpython-versions.sh
source "$ROOT/scripts/cpython-versions.sh"
find_cpythons
[ "${#MINORS[@]}" -gt 0 ] || die "no CPython >= 3.11 found (pyenv, or python3.N on PATH)"
for want in $REQUIRE; do
    [ -n "${BEST_EXE[$want]:-}" ] || die "CPython $want is required (WHEEL_TEST_REQUIRE='$REQUIRE') but was not found"
done
printf 'wheel: %s\n' "$(basename "$WHEEL")"
for minor in "${MINORS[@]}"; do
    printf 'CPython %s.%s: %s\n' "$minor" "${BEST_PATCH[$minor]}" "${BEST_EXE[$minor]}"
done

# PATH without cargo or rustc: the installed wheel must need no Rust
# toolchain, and pip must not be able to fall back to a source build. A PATH
# directory that holds them is replaced by a directory of links to its other
# programs (so that a /usr/bin with a distribution's cargo keeps the rest).
mkdir -p "$VENVS"
NO_RUST_PATH=""
SHADOW="$VENVS/no-rust-bin"
rm -rf "$SHADOW"
IFS=':' read -r -a path_dirs <<<"$PATH"
for dir in "${path_dirs[@]}"; do
    [ -n "$dir" ] && [ -d "$dir" ] || continue
    if [ -e "$dir/cargo" ] || [ -e "$dir/rustc" ] || [ -e "$dir/rustup" ]; then
        mkdir -p "$SHADOW"
        for prog in "$dir"/*; do
            name="$(basename "$prog")"
            case "$name" in cargo* | rust* | clippy-driver | rls) continue ;; esac
            [ -e "$SHADOW/$name" ] || ln -s "$prog" "$SHADOW/$name"
        done
        case ":$NO_RUST_PATH:" in *":$SHADOW:"*) ;; *) NO_RUST_PATH="${NO_RUST_PATH:+$NO_RUST_PATH:}$SHADOW" ;; esac
        continue
    fi
    NO_RUST_PATH="${NO_RUST_PATH:+$NO_RUST_PATH:}$dir"
done
if env PATH="$NO_RUST_PATH" sh -c 'command -v cargo || command -v rustc' >/dev/null 2>&1; then
    die "could not remove cargo/rustc from PATH"
fi

# The installed-package check, run by each venv's python from a neutral
# directory: dig_service and its native core come from this venv.
CHECK_INSTALLED='
import pathlib, sys, sysconfig
import dig_service, dig_service._core as core
site = {pathlib.Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
for mod in (dig_service, core):
    where = pathlib.Path(mod.__file__).resolve()
    assert any(where.is_relative_to(s) for s in site), f"{mod.__name__} imported from {where}, not from {site}"
    print(f"  {mod.__name__}: {where}")
'

# ---------------------------------------------------------------- the wheel

declare -A SUMMARY=()
failed=()
for minor in "${MINORS[@]}"; do
    exe="${BEST_EXE[$minor]}"
    venv="$VENVS/py$minor"
    step "CPython $minor.${BEST_PATCH[$minor]}: fresh venv, the wheel and its test extras (no cargo on PATH)"
    rm -rf "$venv"
    "$exe" -m venv "$venv"
    env PATH="$NO_RUST_PATH" "$venv/bin/python" -m pip install -q --upgrade pip
    env PATH="$NO_RUST_PATH" \
        "$venv/bin/python" -m pip install -q --only-binary=:all: "$WHEEL[test]"
    (cd / && env PATH="$NO_RUST_PATH" "$venv/bin/python" -c "$CHECK_INSTALLED")

    step "CPython $minor: pytest against the installed wheel (PYTHONDEVMODE=1, -W error)"
    log="$VENVS/pytest-py$minor.log"
    set +e
    # `python -m pytest` puts the repository root on sys.path: it holds
    # python/, not dig_service/, so `import dig_service` finds the wheel
    # (the check above and DIG_SERVICE_EXPECT_SITE in conftest make sure).
    # A hung test must not eat CI's budget: a whole run takes 2-3 minutes.
    env PATH="$NO_RUST_PATH" PYTHONDEVMODE=1 \
        DIG_SERVICE_EXPECT_SITE="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')" \
        timeout --kill-after=30 "$PYTEST_TIMEOUT" \
        "$venv/bin/python" -W error -m pytest -W error -q -p no:cacheprovider tests 2>&1 | tee "$log"
    rc="${PIPESTATUS[0]}"
    set -e
    SUMMARY[$minor]="$(grep -E '^(=+ )?[0-9]+ (passed|failed)|no tests ran' "$log" | tail -n 1 || true)"
    [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || SUMMARY[$minor]="timed out after ${PYTEST_TIMEOUT}s"
    [ "$rc" -eq 0 ] || failed+=("$minor (pytest exit $rc)")
done

# ---------------------------------------------------------------- the sdist

if [ "$TEST_SDIST" != "0" ]; then
    sdists=("$ROOT"/dist/dig_service-*.tar.gz)
    [ "${#sdists[@]}" -eq 1 ] || die "expected one sdist in dist/, found ${#sdists[@]}"
    minor="${MINORS[0]}"
    venv="$VENVS/sdist-py$minor"
    step "sdist on CPython $minor: pip install $(basename "${sdists[0]}") (cargo builds it)"
    rm -rf "$venv"
    "${BEST_EXE[$minor]}" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    # Share the repository's cargo target directory so that the dependencies
    # built before are reused, but never the crate itself: cargo names its
    # artefact by paths relative to the package root (the same for the sdist
    # and the checkout), and the sdist's files carry a fixed old mtime, so a
    # dig-service library built there before (by `maturin develop --release`,
    # or by an earlier run from an older sdist) looks fresh and would be
    # installed in place of the sdist's code.
    cargo clean -q --release -p dig-service --manifest-path "$ROOT/Cargo.toml" --target-dir "$ROOT/target"
    CARGO_TARGET_DIR="$ROOT/target" "$venv/bin/python" -m pip install -q "${sdists[0]}[test]"
    (cd / && "$venv/bin/python" -c "$CHECK_INSTALLED")
    (cd / && "$venv/bin/python" - <<'EOF')
import asyncio
from importlib.metadata import distribution

from dig_service import NodeLifecycle, RunContext, Service, ShutdownReason, StartContext, TaskKind
from dig_service.testing import spawn_native_sleeper

files = {f.name for f in distribution("dig-service").files or ()}
assert {"LICENSE-APACHE", "LICENSE-MIT"} <= files, sorted(files)


class Node(NodeLifecycle):
    async def on_start(self, ctx: StartContext) -> None:
        spawn_native_sleeper(ctx.tasks, "native", 3600)
        ctx.tasks.spawn("python", TaskKind.BackgroundLoop, ctx.shutdown.cancelled())

    async def run(self, ctx: RunContext) -> None:
        assert {s.origin for s in ctx.tasks.snapshot()} == {"native", "python"}
        ctx.shutdown.cancel(ShutdownReason.UserRequested())


status = asyncio.run(Service(Node()).start())
assert status.exit_code == 0, status
print(f"  sdist build works: {status}")
EOF
    log="$VENVS/pytest-sdist.log"
    set +e
    PYTHONDEVMODE=1 "$venv/bin/python" -W error -m pytest -W error -q -p no:cacheprovider \
        tests/test_package.py tests/test_core_registry.py 2>&1 | tee "$log"
    rc="${PIPESTATUS[0]}"
    set -e
    SUMMARY[sdist]="$(grep -E '^(=+ )?[0-9]+ (passed|failed)|no tests ran' "$log" | tail -n 1 || true)"
    [ "$rc" -eq 0 ] || failed+=("sdist (pytest exit $rc)")
fi

# ---------------------------------------------------------------- summary

step "summary: $(basename "$WHEEL")"
for minor in "${MINORS[@]}"; do
    printf '  CPython %-5s %s\n' "$minor" "${SUMMARY[$minor]:-no summary}"
done
[ -z "${SUMMARY[sdist]:-}" ] || printf '  sdist         %s\n' "${SUMMARY[sdist]}"
if [ "${#failed[@]}" -gt 0 ]; then
    die "failed: ${failed[*]}"
fi
