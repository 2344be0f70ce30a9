#!/usr/bin/env bash
# Scale benchmark (release build): random models at published shapes, distill against
# transformers / PyTorch eager in one run; prints markdown tables (docs/scale.md).
# Usage: scripts/bench_scale.sh [--sections precompute,train,recompute,rows,memory,kd60,vocab] [--device cpu|cuda:0] [--students SHAPE,...] [--quick]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --release >&2
source scripts/env.sh
python scripts/bench_scale.py target/release/distill .cache/bench-scale "$@"
