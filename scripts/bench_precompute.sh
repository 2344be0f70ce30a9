#!/usr/bin/env bash
# Benchmark of distill precompute (release build); prints markdown tables.
# Usage: scripts/bench_precompute.sh [--devices cpu|cuda:0,...] [--tokens N] [--only-compare] [--moe | --family qwen3-moe|gemma2]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --release >&2
source scripts/env.sh
python scripts/bench_precompute.py target/release/distill .cache/bench "$@"
