#!/usr/bin/env bash
# Runs the official-client compatibility suite against real `meridian standalone` processes.
#
#   compat/run.sh [pytest args...]      e.g. compat/run.sh -k key_shared -x
#                                       or   compat/run.sh compat/test_admin.py
#
# - creates (once) a virtualenv in compat/.venv and installs compat/requirements.txt into it,
#   again only when that file changes;
# - finds the broker binary: $MERIDIAN_BIN, else <target dir>/debug/meridian (the target dir is
#   $CARGO_TARGET_DIR or <repo>/target), building it with `cargo build -p meridian` if the
#   default binary is missing;
# - runs `pytest compat -v` from the repository root with the given arguments (only the named
#   files when the arguments name files under compat/).
set -euo pipefail

compat_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$compat_dir/.." && pwd)"
venv="$compat_dir/.venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "== creating $venv"
    if ! "$python" -m venv "$venv"; then
        rm -rf "$venv"
        echo "error: '$python -m venv' failed; on Debian install the python3-venv package" >&2
        exit 1
    fi
fi

stamp="$venv/.requirements.sha256"
wanted="$(sha256sum "$compat_dir/requirements.txt" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    echo "== installing compat/requirements.txt"
    "$venv/bin/python" -m pip install --disable-pip-version-check --quiet -r "$compat_dir/requirements.txt"
    echo "$wanted" > "$stamp"
fi

if [ -n "${MERIDIAN_BIN:-}" ]; then
    if [ ! -x "$MERIDIAN_BIN" ]; then
        echo "error: MERIDIAN_BIN=$MERIDIAN_BIN is not an executable file" >&2
        exit 1
    fi
else
    target_dir="${CARGO_TARGET_DIR:-$repo_root/target}"
    case "$target_dir" in /*) ;; *) target_dir="$repo_root/$target_dir" ;; esac
    MERIDIAN_BIN="$target_dir/debug/meridian"
    if [ ! -x "$MERIDIAN_BIN" ]; then
        echo "== building the broker (cargo build -p meridian)"
        (cd "$repo_root" && cargo build -p meridian)
    fi
fi
export MERIDIAN_BIN
echo "== broker binary: $MERIDIAN_BIN"

cd "$repo_root"
# The whole suite unless the arguments name test files (`compat/test_x.py` or
# `compat/test_x.py::test_y`): then only those.
targets=(compat)
for arg in "$@"; do
    case "$arg" in
        compat/*) if [ -e "${arg%%::*}" ]; then targets=(); break; fi ;;
    esac
done
exec "$venv/bin/python" -m pytest ${targets[@]+"${targets[@]}"} -v "$@"
