#!/usr/bin/env bash
# GPU checks. Here (the build machine): builds distill and the ignored GPU tests and
# stages them with the tiny models under .dev/gpu. There (a CUDA machine with torch
# 2.11 in a venv, no cargo): `scripts/gpu_check.sh run [PYTHON]` runs them against that
# machine's libtorch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
stage=.dev/gpu
if [[ "${1:-}" == "run" ]]; then
  python="${2:-/opt/torch/.venv/bin/python}"
  torch_lib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
  export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  "$stage/distill" env
  DISTILL_REPO="$PWD" DISTILL_BIN="$stage/distill" DISTILL_FIXTURES="$stage/tiny-models" "$stage/gpu-tests" --ignored --nocapture --test-threads 1
  exit 0
fi
scripts/setup.sh --release
source scripts/env.sh
cargo test --release --test gpu --no-run
mkdir -p "$stage"
cp target/release/distill "$stage/distill"
test_bin=$(ls -t target/release/deps/gpu-* | grep -v '\.d$' | head -1)
cp "$test_bin" "$stage/gpu-tests"
python scripts/tiny_models.py make "$stage/tiny-models"
echo "staged in $stage; on the GPU machine run: scripts/gpu_check.sh run  (carry $stage)"
