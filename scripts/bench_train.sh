#!/usr/bin/env bash
# Benchmark of distill train against PyTorch eager (release build); prints a markdown table.
# Usage: scripts/bench_train.sh [--device cpu|cuda:0] [--steps N] [--batch-tokens N] [--reps N] [--student DIR --shards DIR] [--nproc N]
# --nproc N: data-parallel lines instead (1 process vs N, ZeRO-1, bf16 gradients).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --release >&2
source scripts/env.sh
python scripts/bench_train.py target/release/distill .cache/bench-train "$@"
