#!/usr/bin/env bash
# Build the release artefacts of this machine into dist/:
#   - one abi3 wheel (CPython >= 3.11) tagged manylinux2014 (glibc 2.17
#     baseline), linked with zig so that it runs on every Linux with glibc
#     >= 2.17 whatever glibc this machine has;
#   - the sdist, which builds with cargo (Cargo.lock, the Rust and Python
#     sources, the README and both licence files inside).
# and check them: `auditwheel show` must accept the wheel as manylinux2014,
# both artefacts must carry LICENSE-APACHE and LICENSE-MIT, and their
# version must be Cargo.toml's (the one source of the version).
#
# Installs what it needs (maturin, ziglang, auditwheel) into the project's
# venv ($VENV, default .venv; created with $PYTHON, default python3).
# Needs cargo on PATH. Usage: bash scripts/build-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
OUT=dist

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'build-wheels.sh: %s\n' "$*" >&2; exit 1; }

step "build tools in $VENV (maturin, ziglang, auditwheel)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VENV="$(cd "$VENV" && pwd)"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "maturin>=1.9.2,<2" "ziglang>=0.13" "auditwheel>=6"
# maturin finds zig through `python -m ziglang` of the python on PATH.
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"

VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
[ -n "$VERSION" ] || die "no version in Cargo.toml"
ARCH="$(uname -m)"

rm -rf "$OUT"
mkdir -p "$OUT"

step "wheel: maturin build --release --zig --compatibility manylinux2014 (dig-service $VERSION, $ARCH)"
maturin build --release --locked --zig --compatibility manylinux2014 \
    --interpreter "$VENV/bin/python" --out "$OUT"

step "sdist: maturin sdist"
maturin sdist --out "$OUT"

step "check the artefacts"
shopt -s nullglob
wheels=("$OUT"/*.whl)
sdists=("$OUT"/*.tar.gz)
[ "${#wheels[@]}" -eq 1 ] || die "expected one wheel in $OUT, found ${#wheels[@]}: ${wheels[*]}"
[ "${#sdists[@]}" -eq 1 ] || die "expected one sdist in $OUT, found ${#sdists[@]}: ${sdists[*]}"
WHEEL="${wheels[0]}"
SDIST="${sdists[0]}"
case "$(basename "$WHEEL")" in
    "dig_service-$VERSION-cp311-abi3-"*"manylinux2014_$ARCH"*.whl) ;;
    *) die "$(basename "$WHEEL") is not the cp311-abi3 manylinux2014_$ARCH wheel of $VERSION" ;;
esac
[ "$(basename "$SDIST")" = "dig_service-$VERSION.tar.gz" ] \
    || die "$(basename "$SDIST") is not the sdist of $VERSION"

# auditwheel's verdict: the most compatible tag the wheel's symbol versions
# allow. manylinux2014 is manylinux_2_17; anything newer is a failure.
AUDIT="$(auditwheel show "$WHEEL")" || die "auditwheel show failed on $WHEEL"
printf '%s\n' "$AUDIT"
VERDICT="$(printf '%s\n' "$AUDIT" | tr '\n' ' ' | tr -s ' ' \
    | sed -n 's/.*consistent with the following platform tag: *"\([^"]*\)".*/\1/p')"
case "$VERDICT" in
    "manylinux_2_17_$ARCH" | "manylinux2014_$ARCH") ;;
    *) die "auditwheel does not accept $(basename "$WHEEL") as manylinux2014: its verdict is '${VERDICT:-none}'" ;;
esac

# Licences, metadata and sources in both artefacts.
"$VENV/bin/python" - "$WHEEL" "$SDIST" "$VERSION" <<'EOF'
import sys
import tarfile
import zipfile
from email.parser import Parser

wheel, sdist, version = sys.argv[1:]
problems = []

with zipfile.ZipFile(wheel) as zf:
    names = set(zf.namelist())
    info = f"dig_service-{version}.dist-info"
    for lic in ("LICENSE-APACHE", "LICENSE-MIT"):
        if f"{info}/licenses/{lic}" not in names:
            problems.append(f"wheel: no {info}/licenses/{lic}")
    for module in ("__init__.py", "_core.pyi", "py.typed"):
        if f"dig_service/{module}" not in names:
            problems.append(f"wheel: no dig_service/{module}")
    if not any(n.startswith("dig_service/_core.") and n.endswith(".so") for n in names):
        problems.append("wheel: no compiled dig_service/_core")
    meta = Parser().parsestr(zf.read(f"{info}/METADATA").decode())
    if meta["Version"] != version:
        problems.append(f"wheel: version {meta['Version']} is not Cargo.toml's {version}")
    if meta["License-Expression"] != "Apache-2.0 OR MIT":
        problems.append(f"wheel: License-Expression is {meta['License-Expression']!r}")

with tarfile.open(sdist) as tf:
    root = f"dig_service-{version}"
    names = {n.removeprefix(root + "/") for n in tf.getnames()}
    for path in (
        "Cargo.toml", "Cargo.lock", "pyproject.toml", "README.md",
        "LICENSE-APACHE", "LICENSE-MIT", "rust/src/lib.rs", "rust/src/python/mod.rs",
        "python/dig_service/__init__.py", "python/dig_service/_core.pyi",
        "python/dig_service/py.typed",
    ):  # fmt: skip
        if path not in names:
            problems.append(f"sdist: no {path}")
    pkg_info = tf.extractfile(f"{root}/PKG-INFO")
    assert pkg_info is not None
    meta = Parser().parsestr(pkg_info.read().decode())
    if meta["Version"] != version:
        problems.append(f"sdist: version {meta['Version']} is not Cargo.toml's {version}")

if problems:
    sys.exit("build-wheels.sh: " + "\n  ".join(["artefacts are incomplete:", *problems]))
print(f"licences, metadata (version {version}) and sources: present in the wheel and the sdist")
EOF

step "built"
ls -l "$OUT"
printf 'auditwheel: %s is consistent with %s (manylinux2014)\n' "$(basename "$WHEEL")" "$VERDICT"
