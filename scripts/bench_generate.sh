#!/usr/bin/env bash
# Greedy replies of distill generate vs transformers generate (identical tokens, and
# tokens/s of each in one run; release build); prints a markdown table.
# Usage: scripts/bench_generate.sh [--prompts N] [--max-new-tokens N] [--batch N] [--device cpu] [--reps N] [--model DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --release >&2
source scripts/env.sh
python scripts/bench_generate.py target/release/distill .cache/bench-generate "$@"
