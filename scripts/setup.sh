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
  # The first install holds the downloaded wheels (~4 GB) and the installed packages
  # (~5.2 GB) at once (about 9 GB); say so up front rather than let pip fail half way with ENOSPC.
  free_kb=$(df -Pk "$DISTILL_VENV" | awk 'NR == 2 { print $4 }')
  echo "setup: installing $(grep -vc '^#' "$req") pinned packages (torch is ~4.6 GB the first time;" \
    "$((free_kb / 1024 / 1024)) GB free at $DISTILL_VENV, ~9 GB needed during the install)"
  if (( free_kb < 9 * 1024 * 1024 )) && ! compgen -G "$DISTILL_VENV/lib/python3*/site-packages/torch" >/dev/null; then
    echo "setup: not enough disk for torch at $DISTILL_VENV ($((free_kb / 1024)) MB free, ~9 GB needed);" \
      "free some space or set DISTILL_VENV to a larger disk" >&2
    exit 1
  fi
  "$DISTILL_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir -r "$req"
  cp "$req" "$stamp"
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
echo "setup: building distill ${profile_flag:-(debug)}"
cargo build $profile_flag --bins
