#!/usr/bin/env bash
# The main job on a built-in default. Today: set up, make a tiny model in Hugging Face
# layout, report the runtime, and score the shipped sample text with it.
# Usage: scripts/run.sh [--device cpu|cuda|auto] [--dtype float32|bfloat16]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --release
source scripts/env.sh
models="$DISTILL_ROOT/.cache/tiny-models"
python scripts/tiny_models.py make "$models"
distill=target/release/distill
$distill env
echo
echo "# distill score --model $models/qwen3 --input tests/data/sample.jsonl $*"
$distill score --model "$models/qwen3" --input tests/data/sample.jsonl "$@"
