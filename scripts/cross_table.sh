#!/usr/bin/env bash
# A teacher with another tokenizer (`train --cross-tokenizer`): the main job's teacher,
# SmolLM2-135M-Instruct (byte-level BPE, 49,152 ids, no BOS), teaches a student with its
# own tokenizer (`real_data.py student`: a SentencePiece-style BPE of VOCAB ids trained on
# the main job's corpora, BOS in front; a Llama of the main job's student's width with
# fresh weights). Students from the same initial weights, the same student-side rows in
# the same order, STEPS steps of BATCH_TOKENS tokens each:
#   kd-A  cross-tokenizer KD: hard-label CE (weight A, for each A in KD_ALPHAS) and, with
#         weight 1 - A, ULD + KL on the matched ids
#   sft   the hard labels alone (alpha 1)
# Judged on the held-out text rows (perplexity in the student's tokens) and on the
# held-out top-64 shards moved to the student's tokens (ULD per aligned group, KL on the
# matched ids). Prints the table (also in RUN_DIR/cross.md). Run scripts/run.sh once
# first (teacher, data, shards, tools, release build).
#
# Knobs (environment): VOCAB LAYERS STEPS BATCH_TOKENS LR ULD_WEIGHT KD_ALPHAS
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${VOCAB:=8192}" "${LAYERS:=15}" "${STEPS:=96}" "${BATCH_TOKENS:=2048}" "${LR:=1e-3}" "${ULD_WEIGHT:=1}"
: "${KD_ALPHAS:=0.5}"
cache=.cache/real
run=${RUN_DIR:-.cache/runs/cross-$STEPS}
started=$(date +%s)
stamp() { echo "[$(( $(date +%s) - started ))s] $*"; }
data=$cache/data-270-50
hash=$(cat "$data"/*.jsonl 2>/dev/null | sha256sum | cut -c1-12)
train_shards=$cache/shards-$hash-k16-s16-256/train
heldout_shards=$cache/shards-$hash-k64-256/heldout
for d in $cache/teacher "$train_shards" "$heldout_shards"; do
  [[ -d $d ]] || { echo "$d is missing: run scripts/run.sh once first" >&2; exit 1; }
done
scripts/setup.sh --release
source scripts/env.sh
distill=target/release/distill
student=$cache/student-spm-$VOCAB-$LAYERS
mkdir -p "$run"

stamp "student with its own tokenizer ($VOCAB ids, $LAYERS layers, fresh weights)"
python scripts/real_data.py student "$student" --vocab "$VOCAB" --layers "$LAYERS" --cache $cache/npm
grep -v '"messages"' "$data/heldout.jsonl" > "$run/heldout-text.jsonl"
stamp "held-out top-64 shards in the student's tokens"
$distill cross-tokenize --shards "$heldout_shards" --student "$student" --output "$run/heldout-student"

ckpt=$(printf "checkpoint-%07d" "$STEPS")
modes=()
for a in $KD_ALPHAS; do modes+=("kd-$a"); done
modes+=(sft)
for mode in "${modes[@]}"; do
  alpha=${mode#kd-}; [[ $mode == sft ]] && alpha=1
  [[ -d $run/$mode/$ckpt ]] && continue
  stamp "train $mode ($STEPS steps of $BATCH_TOKENS tokens, alpha $alpha)"
  $distill train --student "$student" --shards "$train_shards" --output "$run/$mode" --resume --cross-tokenizer \
    --uld-weight "$ULD_WEIGHT" --device cpu --steps "$STEPS" --batch-tokens "$BATCH_TOKENS" --pack --seq-len 512 \
    --lr "$LR" --warmup-steps 4 --alpha "$alpha" --save-every "$STEPS" --keep-last 1 2>&1 | tail -2
done

stamp "evaluate"
models=(--model student-init="$student")
for mode in "${modes[@]}"; do models+=(--model "$mode=$run/$mode/$ckpt"); done
$distill eval --device cpu --text "$run/heldout-text.jsonl" --shards "$run/heldout-student" "${models[@]}" \
  --json > "$run/results.json"
python - "$run" <<'PY'
import json, sys
run = sys.argv[1]
rows = json.load(open(f"{run}/results.json"))
lines = ["| model | held-out text PPL (student tokens) | ULD per group (held-out top-64, 0..2) "
         "| KL on matched ids (held-out) | shard CE |", "|---|---|---|---|---|"]
for r in rows:
    t, s = r["text"], r["shards"]
    lines.append(f"| {r['name']} | {t['perplexity']:.2f} | {s['uld']:.4f} | {s['kl_to_teacher']:.4f} | {s['cross_entropy']:.4f} |")
table = "\n".join(lines)
open(f"{run}/cross.md", "w").write(table + "\n")
print(table)
PY
stamp "done: $run/cross.md"
