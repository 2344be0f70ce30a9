#!/usr/bin/env bash
# Token-level, sequence-level and on-policy KD side by side, at the same budget, on the
# main job's teacher and student. One base student (token-level KD on the main job's
# text + math data, BASE_STEPS steps) continues for STEPS more steps of BATCH_TOKENS
# tokens in each row, on:
#   token       the main job's fixed data (text + math chats with reference answers)
#   token-math  math chats with their reference answers (token-level KD on that text)
#   seq         the teacher's own replies to the same math prompts, targets captured
#               while it wrote them (`generate --capture`: one teacher pass)
#   onpolicy    the base student's own samples for those prompts, scored by the teacher
#               (one round of scripts/onpolicy.sh)
#   onpolicy-2x4  the same budget in two rounds of half the steps (round 2 samples from
#               round 1's student)
#   onpolicy-mix  one round whose shards also hold MIX_ROWS of the math chats with their
#               reference answers (GKD's mixture of on-policy and fixed data)
# and every model is judged on held-out math prompts by its greedy replies (the
# teacher's NLL of them, exact match, length) and on held-out text (perplexity, full
# KL to the teacher). Prints the table (also in RUN_DIR/recipes.md). Run scripts/run.sh
# once first (teacher, data, tools, release build). Finished stages are kept.
#
# Knobs (environment): MATH_TRAIN MATH_HELDOUT BASE_STEPS STEPS BATCH_TOKENS LR (the base's)
# CONT_LR (the rows', from the base) LAYERS MAX_NEW_TOKENS (teacher replies and student
# samples) SAMPLES (student samples per prompt) MIX_ROWS (fixed rows in onpolicy-mix)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${MATH_TRAIN:=256}" "${MATH_HELDOUT:=64}" "${BASE_STEPS:=16}" "${STEPS:=8}" "${BATCH_TOKENS:=2048}"
: "${LR:=1e-3}" "${CONT_LR:=3e-4}" "${LAYERS:=15}" "${MAX_NEW_TOKENS:=48}" "${SAMPLES:=1}" "${MIX_ROWS:=128}"
run=${RUN_DIR:-.cache/runs/recipes}
source scripts/real_tables.sh
train_flags=(--device cpu --batch-tokens "$BATCH_TOKENS" --pack --seq-len 256 --warmup-steps 2 --alpha 0.5)

python scripts/real_data.py data $cache/data-270-50 --train-docs 270 --heldout-docs 50 --cache $cache/npm
python scripts/real_data.py math $cache/math-$MATH_TRAIN-$MATH_HELDOUT --train "$MATH_TRAIN" --heldout "$MATH_HELDOUT"
data=$cache/data-270-50 math=$cache/math-$MATH_TRAIN-$MATH_HELDOUT
mkdir -p "$run"
[[ -d $run/student-init ]] || $distill student init --teacher $teacher --output "$run/student-init" --num-layers "$LAYERS"

precompute() {  # input output
  $distill precompute --teacher $teacher --input "$1" --output "$2" --top-k 16 --sample 16 --max-len 256 \
    --devices cpu --no-progress | { grep -E "tokens|time" || true; }
}
train() {  # name student shards steps lr
  local final=$run/$1/$(printf "checkpoint-%07d" "$4")
  [[ -d $final ]] && return 0
  stamp "train $1: $4 steps from $2 at learning rate $5"
  $distill train --student "$2" --shards "$3" --output "$run/$1" --resume --steps "$4" --save-every "$4" \
    --keep-last 1 --lr "$5" "${train_flags[@]}" 2>&1 | tail -1
}
ckpt() { echo "$run/$1/$(printf "checkpoint-%07d" "$2")"; }

stamp "shards of the fixed data"
precompute "$data/train.jsonl" "$run/shards-data"
precompute "$math/train.jsonl" "$run/shards-math"
train base "$run/student-init" "$run/shards-data" "$BASE_STEPS" "$LR"
base=$(ckpt base "$BASE_STEPS")

train token "$base" "$run/shards-data" "$STEPS" "$CONT_LR"
train token-math "$base" "$run/shards-math" "$STEPS" "$CONT_LR"

if [[ ! -f $run/shards-seq/manifest.json ]] || ! grep -q '"complete": true' "$run/shards-seq/manifest.json"; then
  stamp "sequence-level: the teacher answers the $MATH_TRAIN math prompts, targets captured as it writes"
  $distill generate --model $teacher --input "$math/train.jsonl" --output "$run/teacher-replies.jsonl" \
    --capture "$run/shards-seq" --target-top-k 16 --target-sample 16 --max-new-tokens "$MAX_NEW_TOKENS" \
    --device cpu --no-progress --overwrite
fi
train seq "$base" "$run/shards-seq" "$STEPS" "$CONT_LR"

stamp "on-policy: one round from the base student"
DISTILL_BIN=$distill scripts/onpolicy.sh --teacher $teacher --student "$base" --prompts "$math/train.jsonl" \
  --output "$run/onpolicy" --rounds 1 --steps "$STEPS" --samples "$SAMPLES" --max-new-tokens "$MAX_NEW_TOKENS" \
  -- --lr "$CONT_LR" "${train_flags[@]:2}"

half=$((STEPS / 2))
stamp "on-policy: two rounds of $half steps from the base student"
DISTILL_BIN=$distill scripts/onpolicy.sh --teacher $teacher --student "$base" --prompts "$math/train.jsonl" \
  --output "$run/onpolicy-2x$half" --rounds 2 --steps "$half" --samples "$SAMPLES" --max-new-tokens "$MAX_NEW_TOKENS" \
  -- --lr "$CONT_LR" "${train_flags[@]:2}"

stamp "on-policy with fixed data: one round, $MIX_ROWS math chats with reference answers mixed in"
DISTILL_BIN=$distill scripts/onpolicy.sh --teacher $teacher --student "$base" --prompts "$math/train.jsonl" \
  --output "$run/onpolicy-mix" --rounds 1 --steps "$STEPS" --samples "$SAMPLES" --max-new-tokens "$MAX_NEW_TOKENS" \
  --mix "$math/train.jsonl" --mix-rows "$MIX_ROWS" -- --lr "$CONT_LR" "${train_flags[@]:2}"

stamp "evaluate: held-out text, and greedy replies to the $MATH_HELDOUT held-out math prompts"
models=(--model teacher=$teacher --model base="$base" --model token="$(ckpt token "$STEPS")"
  --model token-math="$(ckpt token-math "$STEPS")" --model seq="$(ckpt seq "$STEPS")"
  --model onpolicy="$run/onpolicy/round-1/run/$(printf "checkpoint-%07d" "$STEPS")"
  --model onpolicy-2x$half="$run/onpolicy-2x$half/round-2/run/$(printf "checkpoint-%07d" "$half")"
  --model onpolicy-mix="$run/onpolicy-mix/round-1/run/$(printf "checkpoint-%07d" "$STEPS")")
# Evaluated again when the list of models changes.
if [[ ! -f $run/results.json ]] || [[ "$(cat "$run/results.models" 2>/dev/null)" != "${models[*]}" ]]; then
  $distill eval --device cpu --text "$data/heldout.jsonl" --teacher $teacher \
    --generate "$math/heldout.jsonl" --max-new-tokens 32 --side-by-side "$run/replies.md" \
    "${models[@]}" --json > "$run/results.tmp"
  mv "$run/results.tmp" "$run/results.json"
  echo "${models[*]}" > "$run/results.models"
fi
python - "$run" <<'PY'
import json, sys
run = sys.argv[1]
rows = json.load(open(f"{run}/results.json"))
n = rows[0]["generation"]["with_reference"]
lines = [f"| model | KL to teacher on its own replies ({n} held-out math prompts) | teacher NLL of its replies "
         "| exact match | reply tokens | stopped | held-out text PPL | KL to teacher on text |",
         "|---|---|---|---|---|---|---|---|"]
for r in rows:
    t, g = r["text"], r["generation"]
    lines.append(f"| {r['name']} | {g['kl_on_replies']:.4f} | {g['teacher_nll']:.3f} | {100 * g['exact_match']:.1f}% "
                 f"| {g['mean_new_tokens']:.1f} | {100 * g['stopped']:.0f}% | {t['perplexity']:.2f} | {t['kl_to_teacher']:.4f} |")
table = "\n".join(lines)
open(f"{run}/recipes.md", "w").write(table + "\n")
print(table)
PY
stamp "done: $run/recipes.md; replies side by side $run/replies.md"
