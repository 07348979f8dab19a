#!/usr/bin/env bash
# The whole GPU procedure on a bare, offline machine (docs: README "On a GPU", bench/gpu_check.py):
#
#   bench/gpu_check.sh --wheels DIR       download the pure-Python wheels the GPU image lacks into DIR
#                                         (`make gpu-wheels`; needs a package registry, run it here)
#   bench/gpu_check.sh --install VENV     create VENV with --system-site-packages on $PYTHON (default python3)
#                                         and install those wheels and racedit with --no-index --no-deps
#   bench/gpu_check.sh [ARGS...]          both of the above offline (VENV .gpu/venv), then
#                                         `VENV/bin/python bench/gpu_check.py ARGS...` (`make gpu-check`)
#
# The GPU image has torch, accelerate, timm, numpy, ... but no diffusers, omegaconf, antlr4-python3-runtime or
# torch-fidelity, and reaches no registry: only the working tree travels, with .gpu/wheels in it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${GPU_WHEELS:-$ROOT/.gpu/wheels}"
PYTHON="${PYTHON:-python3}"

pin() {  # the version constraints.txt pins for package $1
    local v
    v="$(sed -n "s/^$1==\([^ ]*\).*/\1/p" "$ROOT/constraints.txt")"
    [ -n "$v" ] || { echo "error: constraints.txt pins no version of $1" >&2; exit 2; }
    echo "$v"
}

download_wheels() {
    local dir="$1"
    # diffusers, omegaconf and torch-fidelity at the versions CI is green with. antlr4-python3-runtime is
    # what omegaconf < 2.4 needs (2.4.0 no longer imports it; shipped so an older omegaconf on the image still
    # works). setuptools builds racedit itself offline (--no-build-isolation): Python 3.12 venvs have none.
    local pins=("diffusers==$(pin diffusers)" "omegaconf==$(pin omegaconf)" "torch-fidelity==$(pin torch-fidelity)"
                "antlr4-python3-runtime==4.13.2" "setuptools==80.9.0")
    rm -rf "$dir.partial" && mkdir -p "$dir.partial"
    # --platform any --abi none: pip refuses anything but pure-Python wheels, so they install on any CPython 3.12
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
        --abi none --platform any --dest "$dir.partial" "${pins[@]}"
    rm -rf "$dir" && mv "$dir.partial" "$dir"
    local f
    for f in "$dir"/*; do
        case "$f" in *-none-any.whl) ;; *) echo "error: $f is not a pure-Python wheel" >&2; exit 1 ;; esac
    done
    du -k "$dir"/*.whl | awk '{printf "  %6.2f MiB  %s\n", $1 / 1024, $2}'
    du -sk "$dir" | awk '{printf "  %6.2f MiB  in all\n", $1 / 1024}'
}

install_into() {
    local venv="$1"
    ls "$WHEELS"/*.whl > /dev/null 2>&1 || { echo "error: no wheels in $WHEELS; run 'make gpu-wheels' first" >&2; exit 2; }
    if [ ! -x "$venv/bin/python" ]; then
        # without ensurepip (a Debian python3 lacking python3-venv) the venv borrows the system's pip
        "$PYTHON" -m venv --system-site-packages "$venv" 2>/dev/null \
            || { rm -rf "$venv"; "$PYTHON" -m venv --system-site-packages --without-pip "$venv"; }
    fi
    local py="$venv/bin/python"
    if ! "$py" -c "import torch" 2> /dev/null && "$PYTHON" -c "import torch" 2> /dev/null; then
        # $PYTHON is itself a venv's (or a user site's): --system-site-packages reaches its base interpreter, not
        # where torch is. Its own paths go after the venv's, so the wheels installed below still come first.
        "$PYTHON" -c "import site, sysconfig; p = sysconfig.get_paths(); \
print('\n'.join(dict.fromkeys([*site.getsitepackages(), site.getusersitepackages(), p['purelib'], p['platlib']])))" \
            > "$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz_gpu_check_system.pth"
    fi
    "$py" -m pip --version > /dev/null || { echo "error: no pip for $py (neither in the venv nor the system)" >&2; exit 2; }
    local pipi=("$py" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --no-warn-script-location)
    "${pipi[@]}" --force-reinstall "$WHEELS"/*.whl
    # racedit from a copy of its sources, so the build leaves nothing in the working tree
    local src
    src="$(mktemp -d)"
    cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/racedit" "$src/"
    "${pipi[@]}" --no-build-isolation --force-reinstall "$src"
    rm -rf "$src"
    # what comes from where (from /, so no checkout shadows the install): the wheels and racedit from the venv
    (cd / && "$py" - <<'PY'
import importlib, sys
for name in ("racedit", "diffusers", "omegaconf", "torch_fidelity", "torch"):
    try:
        m = importlib.import_module(name)
        print(f"  {name:15s} {getattr(m, '__version__', '?'):12s} {m.__file__}")
    except Exception as e:  # reported by gpu_check.py's environment stage too; do not stop here
        print(f"  {name:15s} NOT IMPORTABLE: {type(e).__name__}: {e}")
print(f"  python          {sys.version.split()[0]:12s} {sys.executable}")
PY
    )
}

case "${1:-}" in
    --wheels) download_wheels "${2:?--wheels DIR}" ;;
    --install) install_into "${2:?--install VENV}" ;;
    *)
        VENV="${GPU_VENV:-$ROOT/.gpu/venv}"
        echo "== installing into $VENV (offline)"
        install_into "$VENV"
        echo "== bench/gpu_check.py $*"
        cd "$ROOT"
        exec "$VENV/bin/python" bench/gpu_check.py "$@"
        ;;
esac
