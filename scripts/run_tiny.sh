#!/usr/bin/env bash
# The tiny demo (no downloads beyond setup): make a tiny teacher in Hugging Face
# layout, report the runtime, score the shipped sample text, precompute the teacher's
# targets for it into shards (pipeline/tiny.toml), and train a tiny student on them.
# Usage: scripts/run.sh [extra precompute flags, e.g. --devices cuda:0]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --release
source scripts/env.sh
python scripts/tiny_models.py make .cache/tiny-models
distill=target/release/distill
$distill env
echo
echo "# distill score --model .cache/tiny-models/qwen3 --input tests/data/sample.jsonl --device cpu"
$distill score --model .cache/tiny-models/qwen3 --input tests/data/sample.jsonl --device cpu
echo
echo "# distill precompute --config pipeline/tiny.toml --overwrite $*"
$distill precompute --config pipeline/tiny.toml --overwrite "$@"
python - <<'PY'
import pyarrow.parquet as pq, glob
files = sorted(glob.glob(".cache/shards/tiny/shard-*.parquet"))
t = pq.read_table(files[0], columns=["sample_ids", "num_tokens", "num_targets"])
print(f"\npyarrow reads {len(files)} shard(s); first rows of {files[0]}:")
for r in t.slice(0, 3).to_pylist():
    print(" ", r)
PY
echo
echo "# distill train --student .cache/tiny-models/llama --shards .cache/shards/tiny --steps 20"
remove_train_run .cache/runs/tiny-kd
$distill train --student .cache/tiny-models/llama --shards .cache/shards/tiny --output .cache/runs/tiny-kd \
  --device cpu --steps 20 --batch-tokens 1024 --lr 3e-3 --save-every 20 --hidden-map 2:2 --hidden-weight 0.1
