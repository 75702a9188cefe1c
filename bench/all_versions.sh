#!/usr/bin/env bash
# Run bench/run.py on every CPython >= 3.11 on this machine, one after another,
# each against the wheel from dist/ installed in its own venv: one table per
# version. Arguments go to run.py unchanged, e.g.
#
#   bash bench/all_versions.sh --quick --no-assert
#   bash bench/all_versions.sh --only P1,P7,P9,P10,P11 --loop both
#
# Interpreters (scripts/cpython-versions.sh): pyenv's versions, python3.N and python3 on PATH, the newest patch
# release of each minor version, GIL builds only (the abi3 wheel does not
# install on free-threaded ones). The wheel: dist/'s manylinux2014 abi3 wheel
# (built with `bash scripts/build-wheels.sh` if dist/ has none); the venvs
# (target/bench-venvs/3.N, ignored by git) get the wheel with its `uvloop`
# extra, and anyio (P1's anyio baseline); a venv whose wheel is older than
# dist/'s is refreshed. $BENCH_VERSIONS (e.g. "3.12 3.13") narrows the list.
# Exit status: 1 if any version's run failed, after running all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENVS="$ROOT/target/bench-venvs"

die() { printf 'all_versions.sh: %s\n' "$*" >&2; exit 1; }

shopt -s nullglob
wheels=("$ROOT"/dist/dig_service-*-abi3-*manylinux2014_*.whl)
if [ "${#wheels[@]}" -eq 0 ]; then
    bash scripts/build-wheels.sh
    wheels=("$ROOT"/dist/dig_service-*-abi3-*manylinux2014_*.whl)
fi
[ "${#wheels[@]}" -eq 1 ] || die "expected one manylinux2014 abi3 wheel in dist/, found ${#wheels[@]}"
WHEEL="${wheels[0]}"

# shellcheck source=../scripts/cpython-versions.sh
source "$ROOT/scripts/cpython-versions.sh"
find_cpythons
[ "${#MINORS[@]}" -gt 0 ] || die "no CPython >= 3.11 found (pyenv, or python3.N on PATH)"
if [ -n "${BENCH_VERSIONS:-}" ]; then
    keep=()
    for minor in "${MINORS[@]}"; do
        case " $BENCH_VERSIONS " in *" $minor "*) keep+=("$minor") ;; esac
    done
    MINORS=("${keep[@]}")
    [ "${#MINORS[@]}" -gt 0 ] || die "none of BENCH_VERSIONS=$BENCH_VERSIONS found"
fi
printf 'CPython versions: %s; wheel %s\n' "${MINORS[*]}" "$(basename "$WHEEL")"

failed=()
for minor in "${MINORS[@]}"; do
    venv="$VENVS/$minor"
    stamp="$venv/.wheel"
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$(sha256sum "$WHEEL")" ]; then
        rm -rf "$venv"
        "${BEST_EXE[$minor]}" -m venv "$venv"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check \
            "$WHEEL[uvloop]" "anyio>=4"
        sha256sum "$WHEEL" >"$stamp"
    fi
    printf '\n==================== CPython %s.%s (%s) ====================\n' \
        "$minor" "${BEST_PATCH[$minor]}" "${BEST_EXE[$minor]}"
    # From /: the package must come from the venv, not from python/ in the tree.
    if ! (cd / && "$venv/bin/python" "$ROOT/bench/run.py" "$@"); then
        failed+=("$minor")
    fi
done
if [ "${#failed[@]}" -gt 0 ]; then
    printf '\nall_versions.sh: run.py failed on CPython %s\n' "${failed[*]}"
    exit 1
fi
