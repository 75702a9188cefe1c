#!/usr/bin/env bash
# Run bench/run.py on every CPython >= 3.11 on this machine, one after another,
# each against the wheel from dist/ installed in its own venv: one table per
# version. Arguments go to run.py unchanged, e.g.
#
#   bash bench/all_versions.sh --quick --no-assert
#   bash bench/all_versions.sh --only P1,P7,P9,P10,P11 --loop both
#
# Interpreters: pyenv's versions and python3.N on PATH, the newest patch
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

probe() {
    "$1" - 2>/dev/null <<'PY' || true
import platform, sys, sysconfig
if (platform.python_implementation() == "CPython" and sys.version_info >= (3, 11)
        and not sysconfig.get_config_var("Py_GIL_DISABLED")):
    print(f"{sys.version_info[0]}.{sys.version_info[1]}\t{sys.version_info[2]}\t{sys.executable}")
PY
}

candidates=()
if command -v pyenv >/dev/null 2>&1; then
    for exe in "$(pyenv root)"/versions/*/bin/python3; do candidates+=("$exe"); done
fi
for minor in $(seq 11 20); do
    exe="$(command -v "python3.$minor" || true)"
    [ -n "$exe" ] && candidates+=("$exe")
done

declare -A BEST_PATCH=() BEST_EXE=()
for exe in "${candidates[@]}"; do
    line="$(probe "$exe")"
    [ -n "$line" ] || continue
    IFS=$'\t' read -r minor patch real <<<"$line"
    if [ -z "${BEST_PATCH[$minor]:-}" ] || [ "$patch" -gt "${BEST_PATCH[$minor]}" ]; then
        BEST_PATCH[$minor]="$patch"
        BEST_EXE[$minor]="$real"
    fi
done
mapfile -t MINORS < <(printf '%s\n' "${!BEST_EXE[@]}" | sort -t. -k2,2n)
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
