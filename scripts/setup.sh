#!/usr/bin/env bash
# Idempotent setup: a venv with torch 2.11.0 (libtorch for tch) and the reference
# packages, then a build of distill. Fast when already done.
# Usage: scripts/setup.sh [--release]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$DISTILL_ROOT"

profile_flag=""
[[ "${1:-}" == "--release" ]] && profile_flag="--release"

req=scripts/requirements.txt
stamp="$DISTILL_VENV/.distill-requirements"
if [[ ! -x "$DISTILL_VENV/bin/python" ]]; then
  echo "setup: creating venv at $DISTILL_VENV"
  python3 -m venv "$DISTILL_VENV"
fi
if ! cmp -s "$req" "$stamp" 2>/dev/null; then
  echo "setup: installing $(grep -vc '^#' "$req") pinned packages (torch is ~4.6 GB the first time)"
  "$DISTILL_VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  cp "$req" "$stamp"
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
echo "setup: building distill ${profile_flag:-(debug)}"
cargo build $profile_flag --bins
