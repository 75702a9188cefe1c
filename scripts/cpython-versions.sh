# Sourced by scripts/test-wheels.sh and bench/all_versions.sh: the CPython
# interpreters this machine has that the abi3 wheel installs on.
#
# find_cpythons fills MINORS (the minor versions, "3.11" ..., sorted),
# BEST_EXE[minor] and BEST_PATCH[minor]: for each minor version >= 3.11, the
# newest patch release found among pyenv's versions, python3.N and python3 on
# PATH, GIL builds only (abi3 wheels do not install on free-threaded ones).
# MINORS is empty if there is none.

# "MINOR<TAB>PATCH<TAB>EXECUTABLE" for a CPython >= 3.11 with the GIL; nothing
# for anything else.
probe_cpython() {
    "$1" - 2>/dev/null <<'PY' || true
import platform, sys, sysconfig
if (platform.python_implementation() == "CPython" and sys.version_info >= (3, 11)
        and not sysconfig.get_config_var("Py_GIL_DISABLED")):
    print(f"{sys.version_info[0]}.{sys.version_info[1]}\t{sys.version_info[2]}\t{sys.executable}")
PY
}

find_cpythons() {
    local candidates=() exe minor patch real line
    if command -v pyenv >/dev/null 2>&1; then
        for exe in "$(pyenv root)"/versions/*/bin/python3; do
            [ -e "$exe" ] && candidates+=("$exe")
        done
    fi
    for minor in $(seq 11 20); do
        exe="$(command -v "python3.$minor" || true)"
        [ -n "$exe" ] && candidates+=("$exe")
    done
    exe="$(command -v python3 || true)"
    [ -n "$exe" ] && candidates+=("$exe")

    declare -gA BEST_PATCH=() BEST_EXE=()
    for exe in "${candidates[@]}"; do
        line="$(probe_cpython "$exe")"
        [ -n "$line" ] || continue
        IFS=$'\t' read -r minor patch real <<<"$line"
        if [ -z "${BEST_PATCH[$minor]:-}" ] || [ "$patch" -gt "${BEST_PATCH[$minor]}" ]; then
            BEST_PATCH[$minor]="$patch"
            BEST_EXE[$minor]="$real"
        fi
    done
    mapfile -t MINORS < <(printf '%s\n' "${!BEST_EXE[@]}" | sort -t. -k2,2n)
    # An empty map prints one empty line.
    [ -n "${MINORS[0]:-}" ] || MINORS=()
}
